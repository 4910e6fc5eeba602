"""The real operator process (kopf) against a Kubernetes API served on loopback by KMock."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from kmock_server import KMockThread
from pipelines import SMOLLM2

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NAMESPACE = "llm"
THREE_NODES = [{"name": name, "memoryGiB": 1} for name in ("a", "b", "c")]  # the planner splits 30 layers 10/10/10


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 60.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def resource(name: str, **spec) -> dict:
    # KMock stores objects as sent: a real API server would assign the uid and resourceVersion.
    metadata = {"name": name, "namespace": NAMESPACE, "uid": str(uuid.uuid4()), "resourceVersion": "1"}
    return {"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM", "metadata": metadata,
            "spec": {"model": {"source": SMOLLM2}, "clusters": [{"name": "home", "nodes": THREE_NODES}],
                     **spec}}  # fmt: skip


@pytest.fixture()
def operator(tmp_path, monkeypatch):
    from kopf.testing import KopfRunner
    from kubernetes import client, config

    with KMockThread() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.setenv("BLOOMBEE_RECHECK_S", "1")
        config.load_kube_config(config_file=str(tmp_path / "kubeconfig"))
        api = client.ApiClient()
        # --all-namespaces: KMock 0.8 answers 500 to the cluster-scoped namespace list that --namespace needs.
        with KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "bloombee_operator.handlers"]) as runner:
            yield server, api
        assert runner.exception is None, runner.output
        assert runner.exit_code == 0, runner.output


def _get(api, name: str) -> dict | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object("bloombee.ai", "v1alpha1", NAMESPACE,
                                                                         "distributedllms", name)  # fmt: skip
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _deployments(api) -> dict[str, dict]:
    from kubernetes import client

    items = client.AppsV1Api(api).list_namespaced_deployment(NAMESPACE).items
    return {item.metadata.name: item for item in items}


def test_create_restore_and_delete(operator):
    from kubernetes import client

    _, api = operator
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object("bloombee.ai", "v1alpha1", NAMESPACE, "distributedllms", resource("chat"))

    names = {"chat-stage-0", "chat-stage-1", "chat-stage-2", "chat-gateway"}
    wait_for("the children", lambda: names <= set(_deployments(api)))
    created = _get(api, "chat")
    deployments = _deployments(api)
    for name in names:
        owners = deployments[name].metadata.owner_references
        assert owners and owners[0].uid == created["metadata"]["uid"] and owners[0].controller
        assert deployments[name].metadata.labels["app.kubernetes.io/instance"] == "chat"
    args = deployments["chat-stage-1"].spec.template.spec.containers[0].args
    assert args[args.index("--layers") + 1] == "10:20"
    services = {s.metadata.name for s in client.CoreV1Api(api).list_namespaced_service(NAMESPACE).items}
    assert names <= services
    status = wait_for("the status", lambda: (_get(api, "chat") or {}).get("status", {}).get("conditions"))
    by_type = {c["type"]: c for c in status}
    assert by_type["Planned"]["status"] == "True" and "chat-stage-1 home [10, 20)" in by_type["Planned"]["message"]
    assert by_type["LinksMeasured"]["reason"] == "SingleCluster"
    status = _get(api, "chat")["status"]
    assert status["endpoint"] == "http://chat-gateway.llm.svc:8000/v1"
    assert [s["layers"] for s in status["plan"]["stages"]] == [[0, 10], [10, 20], [20, 30]]
    assert status["plan"]["predictedTokensPerSecond"] > 0 and status["plan"]["planHash"]
    gateway_args = deployments["chat-gateway"].spec.template.spec.containers[0].args
    assert gateway_args[gateway_args.index("--micro-batch") + 1] == str(status["plan"]["microBatch"])
    # the gateway seats as many generations as the plan admitted, which the stages' KV budgets hold
    assert status["plan"]["maxSequences"] == status["plan"]["batch"] >= 1
    assert gateway_args[gateway_args.index("--max-sequences") + 1] == str(status["plan"]["maxSequences"])

    # The kubelet's part: the stage pods come up; the timer sees it and the resource becomes Ready.
    for name in ("chat-stage-0", "chat-stage-1", "chat-stage-2"):
        pod_up = {"status": {"replicas": 1, "readyReplicas": 1}}
        client.AppsV1Api(api).patch_namespaced_deployment_status(name, NAMESPACE, pod_up)

    def ready() -> bool:
        status = _get(api, "chat")["status"]
        return status["phase"] == "Ready" and {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

    wait_for("the Ready condition", ready)
    assert _get(api, "chat")["status"]["stagesReady"] == "3/3"

    client.AppsV1Api(api).delete_namespaced_deployment("chat-stage-1", NAMESPACE)
    wait_for("the lost stage to come back", lambda: "chat-stage-1" in _deployments(api), timeout_s=30)

    def degraded() -> list[dict]:
        return [
            c for c in _get(api, "chat")["status"]["conditions"] if c["type"] == "Degraded" and c["status"] == "True"
        ]

    reported = wait_for("the Degraded condition", degraded)
    assert "re-created" in reported[0]["message"]

    custom.delete_namespaced_custom_object("bloombee.ai", "v1alpha1", NAMESPACE, "distributedllms", "chat")
    wait_for("the children to go", lambda: not (names & set(_deployments(api))))
    wait_for("the resource to go (finalizer released)", lambda: _get(api, "chat") is None)


def test_a_bad_resource_gets_a_condition_and_an_event(operator):
    from kubernetes import client

    _, api = operator
    bad = resource("broken", draft={"kind": "early-exit"})  # early-exit without layers
    client.CustomObjectsApi(api).create_namespaced_custom_object("bloombee.ai", "v1alpha1", NAMESPACE,
                                                                 "distributedllms", bad)  # fmt: skip
    conditions = wait_for(
        "the failure condition", lambda: (_get(api, "broken") or {}).get("status", {}).get("conditions")
    )
    ready = next(c for c in conditions if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "draft.layers" in ready["message"]
    assert _get(api, "broken")["status"]["phase"] == "Failed"

    def warnings() -> list:
        return [e for e in client.CoreV1Api(api).list_namespaced_event(NAMESPACE).items if e.reason == "InvalidSpec"]

    events = wait_for("the warning event", warnings)
    assert "draft.layers" in events[0].message
    assert not _deployments(api)


class ProbePods:
    """Two real probe servers on loopback standing in for the probe pods of clusters eu and us,
    and what a real API server's service proxy would do: forward the operator's POST to the eu pod.
    Cluster DNS names cannot resolve here, so the forwarded targets are rewritten to loopback."""

    def __init__(self, tmp_path) -> None:
        import json
        import subprocess
        import sys

        self.processes, self.urls = [], {}
        for cluster in ("eu", "us"):
            ready = tmp_path / f"probe-{cluster}.json"
            command = [sys.executable, "-m", "bloombee_stage.probe", "serve", "--host", "127.0.0.1", "--port", "0",
                       "--ready-file", str(ready)]  # fmt: skip
            self.processes.append(subprocess.Popen(command))
            self.urls[cluster] = json.loads(
                wait_for(f"probe {cluster}", lambda r=ready: r.is_file() and r.read_text())
            )["url"]
        self.forwarded: list[dict] = []

    async def proxy(self, request) -> dict:
        import aiohttp

        self.forwarded.append(request.data)
        body = {**request.data, "targets": {name: self.urls[name] for name in request.data["targets"]},
                "bulkBytes": 1 << 20}  # fmt: skip
        async with aiohttp.ClientSession() as http, http.post(self.urls["eu"] + "/probe/measure", json=body) as reply:
            return await reply.json()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait()


def test_two_clusters_links_probed_plan_spread_remote_children_cleaned_up(tmp_path, monkeypatch):
    """eu is the operator's cluster, us a remote one reached through a kubeconfig Secret."""
    import base64

    from kopf.testing import KopfRunner
    from kubernetes import client, config

    probes = ProbePods(tmp_path)
    with KMockThread() as eu, KMockThread() as us:
        eu.handler["post /api/v1/namespaces/llm/services/geo-probe-0:8080/proxy/probe/measure"] << probes.proxy
        monkeypatch.setenv("KUBECONFIG", str(eu.kubeconfig(tmp_path / "eu.yaml")))
        monkeypatch.setenv("BLOOMBEE_RECHECK_S", "1")
        eu_api = config.new_client_from_config(str(tmp_path / "eu.yaml"))
        us_api = config.new_client_from_config(str(us.kubeconfig(tmp_path / "us.yaml")))
        secret = base64.b64encode((tmp_path / "us.yaml").read_bytes()).decode()
        client.CoreV1Api(eu_api).create_namespaced_secret(NAMESPACE, {
            "metadata": {"name": "us-kube", "namespace": NAMESPACE, "uid": str(uuid.uuid4())},
            "data": {"kubeconfig": secret}})  # fmt: skip
        geo = resource("geo")
        # Neither cluster's node holds SmolLM2's 405 MB of float32 weights alone: the plan must use both.
        geo["spec"].update(
            clusters=[{"name": c, "serviceDomain": "svc.clusterset.local", "nodes": [{"name": "n", "memoryGiB": 0.3}],
                       **({"kubeconfigSecret": "us-kube"} if c == "us" else {})} for c in ("eu", "us")],
            planner={"allowOffload": False, "concurrency": 1, "contextTokens": 256},
        )  # fmt: skip
        with KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "bloombee_operator.handlers"]) as runner:
            client.CustomObjectsApi(eu_api).create_namespaced_custom_object("bloombee.ai", "v1alpha1", NAMESPACE,
                                                                            "distributedllms", geo)  # fmt: skip

            # The kubelet's part: the probe pods come up in both clusters.
            for api, probe in ((eu_api, "geo-probe-0"), (us_api, "geo-probe-1")):
                wait_for("a probe Deployment", lambda a=api, p=probe: p in _deployments(a))
                client.AppsV1Api(api).patch_namespaced_deployment_status(
                    probe, NAMESPACE, {"status": {"replicas": 1, "readyReplicas": 1}})  # fmt: skip

            stages = wait_for("stages in both clusters", lambda: {n for n in _deployments(us_api) if "-stage-" in n}
                              and {n for n in _deployments(eu_api) if "-stage-" in n})  # fmt: skip
            status = wait_for("the plan in status", lambda: (_get(eu_api, "geo").get("status") or {}).get("plan") and
                              _get(eu_api, "geo")["status"])  # fmt: skip
            link = next(e for e in status["links"] if (e["from"], e["to"]) == ("eu", "us"))
            assert link["rttMs"] > 0 and link["mbps"] > 0  # measured for real, over loopback
            assert {"gateway"} <= {e["from"] for e in status["links"]}
            assert probes.forwarded[0]["source"] == "eu"
            assert probes.forwarded[0]["targets"] == {"us": "http://geo-probe-1.llm.svc.clusterset.local:8080"}
            conditions = {c["type"]: c for c in status["conditions"]}
            assert (
                conditions["LinksMeasured"]["status"] == "True" and conditions["LinksMeasured"]["reason"] == "Measured"
            )
            planned = {s["cluster"] for s in status["plan"]["stages"]}
            assert planned == {"eu", "us"}, status["plan"]

            eu_deployments, us_deployments = _deployments(eu_api), _deployments(us_api)
            assert stages <= set(eu_deployments) and "geo-gateway" in eu_deployments
            for item in us_deployments.values():  # owner references do not cross clusters
                assert (
                    not item.metadata.owner_references and item.metadata.labels["app.kubernetes.io/instance"] == "geo"
                )
            gateway_args = eu_deployments["geo-gateway"].spec.template.spec.containers[0].args
            remote = next(s for s in status["plan"]["stages"] if s["cluster"] == "us")
            index = status["plan"]["stages"].index(remote)
            assert (
                f"http://geo-stage-{index}.llm.svc.clusterset.local:8080"
                in gateway_args[gateway_args.index("--stages") + 1]
            )
            exports = client.CustomObjectsApi(us_api).list_namespaced_custom_object(
                "multicluster.x-k8s.io", "v1alpha1", NAMESPACE, "serviceexports")["items"]  # fmt: skip
            assert f"geo-stage-{index}" in {e["metadata"]["name"] for e in exports}

            client.CustomObjectsApi(eu_api).delete_namespaced_custom_object("bloombee.ai", "v1alpha1", NAMESPACE,
                                                                            "distributedllms", "geo")  # fmt: skip
            wait_for("the remote children to go", lambda: not _deployments(us_api))
            wait_for("the resource to go (finalizer released)", lambda: _get(eu_api, "geo") is None)
            assert not _deployments(eu_api)
        assert runner.exception is None, runner.output
    probes.stop()


def test_a_new_plan_rewrites_what_it_changes_and_deletes_dropped_stages(tmp_path):
    """The Kubernetes backend under the reconcile steps, straight against KMock (no kopf)."""
    from bloombee_operator import reconcile
    from bloombee_operator.backends.kubernetes.backend import Cluster, KubernetesBackend
    from bloombee_operator.backends.kubernetes.objects import Images, Owner
    from kubernetes import client, config

    def step(body: dict) -> reconcile.Outcome:
        meta = body["metadata"]
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        parsed = reconcile.read(body)
        outcome = reconcile.deploy(parsed, KubernetesBackend(Cluster(api), parsed, owner, Images()))
        body["status"] = outcome.applied_to(parsed.status)
        return outcome

    def deployed(outcome: reconcile.Outcome) -> str:
        return next((e.message for e in outcome.events if e.reason == "Deployed"), "")

    with KMockThread() as server:
        api = config.new_client_from_config(str(server.kubeconfig(tmp_path / "kubeconfig")))
        body = resource("chat")
        assert "chat-stage-2" in deployed(step(body))
        assert deployed(step(body)) == ""  # the same plan again: nothing is rewritten
        body["spec"]["clusters"][0]["nodes"] = THREE_NODES[:2]  # one node fewer: 15 + 15 layers
        message = deployed(step(body))
        assert all(name in message for name in ("chat-stage-0", "chat-stage-1", "chat-gateway")), message
        deployments = _deployments(api)
        assert "chat-stage-2" not in deployments
        assert "chat-stage-2" not in {
            s.metadata.name for s in client.CoreV1Api(api).list_namespaced_service(NAMESPACE).items
        }
        args = deployments["chat-stage-0"].spec.template.spec.containers[0].args
        assert args[args.index("--layers") + 1] == "0:15"


def test_a_due_replan_whose_probes_are_down_still_restores_stages(tmp_path):
    """Re-planning needs fresh links; while the probes cannot answer, the timer keeps the pipeline
    whole on the current plan and says why it did not re-plan."""
    import time as clock

    from bloombee_operator import reconcile
    from bloombee_operator.api.resource import parse_resource
    from bloombee_operator.backends.kubernetes.backend import Cluster, KubernetesBackend
    from bloombee_operator.backends.kubernetes.objects import Images, Owner
    from kubernetes import client, config

    with KMockThread() as server:
        api = config.new_client_from_config(str(server.kubeconfig(tmp_path / "kubeconfig")))
        body = resource("duo")
        body["spec"]["clusters"] = [{"name": "a", "nodes": THREE_NODES[:2]}, {"name": "b", "nodes": THREE_NODES[2:]}]
        # measured earlier (status.links as the probes left it)
        body["status"] = {"links": [{"from": "a", "to": "b", "rttMs": 1.0, "mbps": 1000.0},
                                    {"from": "gateway", "to": "b", "rttMs": 1.0, "mbps": 1000.0}]}  # fmt: skip
        meta = body["metadata"]
        backend = KubernetesBackend(Cluster(api), parse_resource(body), Owner(meta["name"], meta["namespace"],
                                                                              meta["uid"]), Images())  # fmt: skip
        first = reconcile.deploy(reconcile.read(body), backend)
        body["status"] = first.applied_to(reconcile.read(body).status)
        stages = [s for s in _deployments(api) if "-stage-" in s]
        assert len(stages) == 2 and not any("probe" in name for name in _deployments(api))  # links were known

        client.AppsV1Api(api).delete_namespaced_deployment(stages[0], NAMESPACE)
        later = reconcile.keep(reconcile.read(body), backend, clock=lambda: clock.time() + 601)  # replanEvery is due
        conditions = {c.type: c for c in later.conditions}
        assert conditions["LinksMeasured"].status == "False" and conditions["LinksMeasured"].reason == "ProbesStarting"
        assert conditions["Degraded"].status == "True" and stages[0] in conditions["Degraded"].message
        assert later.status["phase"] == "Degraded" and stages[0] in _deployments(api)
        assert {"duo-probe-0", "duo-probe-1"} <= set(_deployments(api))  # asked for, one per cluster; not up yet
