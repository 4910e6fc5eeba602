"""NetworkPolicies enforced on a real node by kube-network-policies (``scripts/k8s/node.sh``).

The controller runs in the node's network namespace beside kube-proxy: the first packet of each
connection to or from a pod that a policy selects goes to an nfqueue, where it is accepted or
dropped by the policies. Here a pod outside a policy's allowed set cannot connect while the pods it
names can, the kubelet's probes still pass, and the operator's own rendered policies let through
exactly the flows its plan needs (gateway -> first stage -> ... -> gateway, the probes) and nothing
else. The clients are busybox (Debian's static build, pushed to the machine's registry): nothing to
pull from outside, and no model.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import control_planes, create_namespace, kubectl, needs_root, settings, wait_for

pytestmark = pytest.mark.cluster

BUSYBOX = "bloombee-test/busybox:1"
WAIT_S = 2  # how long a client waits for a connection: a dropped SYN is an unanswered one
# Every server answers HTTP on these ports (a stage's, the gateway's API and peer ports).
PORTS = (8080, 8000, 8443)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Path]:
    needs_root()
    with control_planes(f"np{os.getpid()}", nodes="real") as (kubeconfig,):
        yield kubeconfig


@pytest.fixture(scope="module")
def api(cluster: Path):
    from kubernetes import config

    return config.new_client_from_config(str(cluster))


@pytest.fixture(scope="module")
def busybox(cluster: Path) -> str:
    """Debian's static busybox as an image in the machine's registry (built and pushed once)."""
    registry = settings(cluster)["REGISTRY"]
    name, tag = BUSYBOX.split(":")
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    manifest = urllib.request.Request(f"http://{registry}/v2/{name}/manifests/{tag}", method="HEAD",
                                      headers={"Accept": accept})  # fmt: skip
    try:
        with urllib.request.urlopen(manifest, timeout=5):
            return f"{registry}/{BUSYBOX}"
    except OSError:
        pass
    with tempfile.TemporaryDirectory() as tmp:

        def run(*command: str) -> str:
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
            return done.stdout.strip()

        if subprocess.run(["apt-get", "download", "busybox-static"], cwd=tmp, capture_output=True).returncode:
            run("apt-get", "update", "-qq")
            run("apt-get", "download", "busybox-static")
        run("sh", "-c", "dpkg-deb -x busybox-static_*.deb root")
        container = run("buildah", "from", "scratch")
        try:
            run("buildah", "copy", container, f"{tmp}/root/bin/busybox", "/bin/busybox")
            run("buildah", "config", "--entrypoint", '["/bin/busybox"]', container)
            run("buildah", "commit", "--quiet", container, f"localhost/{BUSYBOX}")
        finally:
            run("buildah", "rm", container)
        pushed = f"docker://{registry}/{BUSYBOX}"
        run("buildah", "push", "--quiet", "--tls-verify=false", f"localhost/{BUSYBOX}", pushed)
    return f"{registry}/{BUSYBOX}"


def _server(name: str, image: str, labels: dict[str, str]) -> dict:
    """A pod answering HTTP on every port of PORTS, Ready by the kubelet's HTTP probe on the first."""
    serve = " && ".join(f"busybox httpd -p {port} -h /www" for port in PORTS)
    every_second = {"periodSeconds": 1, "failureThreshold": 1}
    return {"metadata": {"name": name, "labels": labels}, "spec": {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": image, "command": [
            "/bin/busybox", "sh", "-c",
            f"/bin/busybox --install -s /bin && mkdir /www && echo ok >/www/index.html && {serve} && exec sleep 3600"],
            # One failed probe turns the pod unready: a probe the policy dropped would show.
            "readinessProbe": {"httpGet": {"path": "/", "port": PORTS[0]}, **every_second},
            "livenessProbe": {"tcpSocket": {"port": PORTS[0]}, **every_second}}]}}  # fmt: skip


def _client(name: str, image: str, labels: dict[str, str]) -> dict:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [
        {"name": "main", "image": image, "command": ["/bin/busybox", "sleep", "3600"]}]}}  # fmt: skip


def _ready(api, namespace: str, *names: str) -> dict[str, str]:
    """Waits until the pods are Ready: their IPs."""
    from kubernetes import client

    core = client.CoreV1Api(api)

    def check() -> dict[str, str] | None:
        pods = {name: core.read_namespaced_pod(name, namespace) for name in names}
        ready = all(any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
                    for p in pods.values())  # fmt: skip
        return {name: p.status.pod_ip for name, p in pods.items()} if ready else None

    return wait_for(f"pods {', '.join(names)} to be Ready", check, timeout_s=120)


def _reaches(cluster: Path, namespace: str, client_pod: str, address: str, port: int) -> bool:
    """Whether the client pod connects to address:port within WAIT_S seconds (busybox nc; its wget
    crashes in Debian's static build)."""
    connected = kubectl(cluster, "exec", "-n", namespace, client_pod, "--", "/bin/busybox", "nc", "-w", str(WAIT_S),
                        address, str(port), timeout_s=30)  # fmt: skip
    return connected.returncode == 0


def _enforced(cluster: Path, namespace: str, client_pod: str, address: str, port: int) -> None:
    """Waits until the controller has the new policy in its rules (the client no longer gets through)."""
    wait_for("the policy to be enforced", lambda: not _reaches(cluster, namespace, client_pod, address, port),
             timeout_s=30, interval_s=0.2)  # fmt: skip


def _not_ready_since(api, namespace: str, name: str, since: float) -> list[str]:
    """What says the pod failed a probe after ``since``: unready now, restarted, or the kubelet's events."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    pod = core.read_namespaced_pod(name, namespace)
    found = [f"{c.type}={c.status}" for c in pod.status.conditions or [] if c.type == "Ready" and c.status != "True"]
    found += [f"restarts={s.restart_count}" for s in pod.status.container_statuses or [] if s.restart_count]
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    found += [e.message for e in events if e.reason == "Unhealthy"
              and (e.last_timestamp or e.event_time).timestamp() >= since]  # fmt: skip
    return found


def test_a_policy_admits_only_the_pods_it_names_and_the_kubelets_probes(api, cluster, busybox):
    """A server selected by a policy that admits pods labelled role=client on one port: such a pod
    connects (directly and through the Service's DNS name), a pod without the label does not, though
    both did before the policy; the kubelet's probes keep passing, and a pod under a deny-all policy
    becomes Ready though nobody can connect to it."""
    from kubernetes import client

    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    namespace = "np"
    create_namespace(api, namespace)
    core.create_namespaced_pod(namespace, _server("server", busybox, {"app": "server"}))
    core.create_namespaced_pod(namespace, _client("allowed", busybox, {"role": "client"}))
    core.create_namespaced_pod(namespace, _client("other", busybox, {"role": "other"}))
    core.create_namespaced_service(namespace, {"metadata": {"name": "server"}, "spec": {
        "selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": PORTS[0]}]}})  # fmt: skip
    ips = _ready(api, namespace, "server", "allowed", "other")
    server = ips["server"]

    # Without a policy every pod connects: what follows can fail.
    assert _reaches(cluster, namespace, "allowed", server, PORTS[0])
    assert _reaches(cluster, namespace, "other", server, PORTS[0])

    networking.create_namespaced_network_policy(namespace, {"metadata": {"name": "server"}, "spec": {
        "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"protocol": "TCP", "port": PORTS[0]}]}]}})  # fmt: skip
    enforced_at = time.time()
    _enforced(cluster, namespace, "other", server, PORTS[0])
    assert _reaches(cluster, namespace, "allowed", server, PORTS[0])
    assert not _reaches(cluster, namespace, "allowed", server, PORTS[1])  # a port the policy does not list
    assert not _reaches(cluster, namespace, "other", server, PORTS[0])
    # Through kube-proxy's Service address, by CoreDNS's name: the policy sees the pod behind it.
    assert _reaches(cluster, namespace, "allowed", "server", 80)
    assert not _reaches(cluster, namespace, "other", "server", 80)

    # The kubelet's probes come from the node itself, which a policy never blocks: a pod created
    # under a policy that admits nobody still becomes Ready, and nobody reaches it.
    networking.create_namespaced_network_policy(namespace, {"metadata": {"name": "deny-all"}, "spec": {
        "podSelector": {"matchLabels": {"app": "isolated"}}, "policyTypes": ["Ingress"]}})  # fmt: skip
    core.create_namespaced_pod(namespace, _server("isolated", busybox, {"app": "isolated"}))
    isolated = _ready(api, namespace, "isolated")["isolated"]
    isolated_ready_at = time.time()  # (probes before its server listened were refused, as anywhere)
    assert not _reaches(cluster, namespace, "allowed", isolated, PORTS[0])
    time.sleep(3)  # more probe periods of both servers under their policies
    assert _not_ready_since(api, namespace, "server", enforced_at) == []
    assert _not_ready_since(api, namespace, "isolated", isolated_ready_at) == []

    # Deleting the policy opens the server again.
    networking.delete_namespaced_network_policy("server", namespace)
    wait_for("the policy to be lifted", lambda: _reaches(cluster, namespace, "other", server, PORTS[0]),
             timeout_s=30, interval_s=0.2)  # fmt: skip
    core.delete_namespace(namespace)


def test_the_operators_policies_admit_the_plans_flows_and_nothing_else(api, cluster, busybox):
    """The NetworkPolicies the operator renders for a three-stage plan in one cluster, applied to
    pods labelled as its Deployments label theirs: the gateway reaches every stage, each stage the
    next and the last the gateway's peer port, the probes reach the stages, anyone the gateway's
    API, the API server's proxy (the operator's calibration) the stages; a pod of no role, and a
    stage calling one it does not follow, reach no stage, and the API server not the gateway's peer
    port."""
    from bloombee_operator.api.resource import parse_resource
    from bloombee_operator.backends.kubernetes.backend import Cluster
    from bloombee_operator.backends.kubernetes.objects import Owner, Placement, render, render_probes
    from bloombee_operator.desired import desired_state
    from bloombee_operator.model_shape import ModelShape
    from kubernetes import client

    resource = parse_resource({"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM",
                               "metadata": {"name": "geo", "namespace": "llm"},
                               "spec": {"model": {"source": "gguf://x/y.gguf"},
                                        "clusters": [{"name": "eu"}]}})  # fmt: skip
    owner = Owner(name="geo", namespace="llm", uid="0b5c3c55-7f31-4c2a-9d3b-2b0d5e1f7a10")
    # Where the API server reaches pods from, as the operator reads it: the host's end of the node link.
    api_servers = Cluster(api).api_server_addresses()
    assert api_servers == (settings(cluster)["API_SERVER"].split("//")[1].split(":")[0],)
    placement = Placement.of(resource, {"eu": api_servers})
    desired = desired_state(resource, ModelShape(30, 576, 9, 3, 1536), num_stages=3)
    s0, s1, s2 = (stage.name for stage in desired.stages)  # <name>-stage-<i>-<plan>
    rendered = [*render(desired, owner, placement, tls=True)["eu"],
                *render_probes(resource, owner, placement, tls=True)["eu"]]  # fmt: skip
    policies = [o for o in rendered if o["kind"] == "NetworkPolicy"]
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in rendered
            if o["kind"] == "Deployment"}  # fmt: skip
    assert set(pods) == {s0, s1, s2, "geo-gateway", "geo-probe-0"}
    assert {p["metadata"]["name"] for p in policies} == {s0, s1, s2, "geo-gateway"}

    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    create_namespace(api, "llm")
    for name, labels in pods.items():
        core.create_namespaced_pod("llm", _server(name, busybox, labels))
    core.create_namespaced_pod("llm", _client("outsider", busybox, {"app": "outsider"}))
    ips = _ready(api, "llm", *pods, "outsider")
    assert _reaches(cluster, "llm", "outsider", ips[s1], 8080)  # before the policies
    for policy in policies:
        policy["metadata"].pop("ownerReferences", None)  # the resource they name is not here
        networking.create_namespaced_network_policy("llm", policy)
    _enforced(cluster, "llm", "outsider", ips[s1], 8080)

    def reach(source: str, target: str, port: int) -> bool:
        return _reaches(cluster, "llm", source, ips[target], port)

    stages = [s0, s1, s2]
    allowed = [("geo-gateway", stage, 8080) for stage in stages] + [("geo-probe-0", stage, 8080) for stage in stages]
    allowed += [(s0, s1, 8080), (s1, s2, 8080),
                (s2, "geo-gateway", 8443), ("outsider", "geo-gateway", 8000)]  # fmt: skip
    refused = [("outsider", stage, 8080) for stage in stages]
    refused += [(s2, s0, 8080), (s0, s2, 8080),
                ("outsider", "geo-gateway", 8443), (s0, "geo-gateway", 8443)]  # fmt: skip
    assert [flow for flow in allowed if not reach(*flow)] == []
    assert [flow for flow in refused if reach(*flow)] == []

    def proxied(pod: str, port: int) -> bool:  # the API server's proxy to a pod, as the operator's calibration
        got = kubectl(cluster, "get", "--raw", f"/api/v1/namespaces/llm/pods/{pod}:{port}/proxy/",
                      "--request-timeout=5s", timeout_s=30)  # fmt: skip
        return got.returncode == 0 and got.stdout.strip() == "ok"

    assert [stage for stage in stages if not proxied(stage, 8080)] == []
    assert not proxied("geo-gateway", 8443)  # its peer port admits the last stage only
    core.delete_namespace("llm")


def test_the_controller_runs_in_the_node_and_its_rules_are_there(cluster):
    """The controller is one of the cluster's processes, in the node's network namespace, and its
    nftables table sends the pods that policies select to the queue it reads (through xtables'
    NFQUEUE target on this kernel, which nft lists as a queue)."""
    node_ns = f"bbn{(cluster.parent / 'node-index').read_text().strip()}"
    rules = subprocess.run(["ip", "netns", "exec", node_ns, "nft", "list", "table", "inet", "kube-network-policies"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert rules.returncode == 0, rules.stderr
    assert "ip daddr @podips-v4 queue num 100" in rules.stdout, rules.stdout
    assert "meta skuid 0 accept" in rules.stdout  # the node's own (root's) connections: the kubelet's probes
    queues = subprocess.run(["ip", "netns", "exec", node_ns, "cat", "/proc/net/netfilter/nfnetlink_queue"],
                            capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    pid = (cluster.parent / "pids" / "kube-network-policies.pid").read_text().strip()
    assert [line.split()[:2] for line in queues.splitlines()] == [["100", pid]]  # the controller reads it
    assert "enforcing NetworkPolicies" in (cluster.parent / "logs" / "kube-network-policies.log").read_text()
