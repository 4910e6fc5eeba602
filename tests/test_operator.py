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
