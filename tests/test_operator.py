"""The operator against a real kube-apiserver (``scripts/cluster.sh up --nodes none``): kopf in this
process as the cluster admin, on a control plane without a node, so the children's pods stay
Pending and cost nothing: what the operator asks of the API server is the point here.

The operator as a pod under the chart's identity, its children running on a real node until
``Ready``, calibrated and answering, are proven in ``test_real_nodes.py``; two clusters joined
through real packet delay in ``test_two_clusters.py``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from bloombee_contract.launch import GatewayLaunch
from bloombee_contract.route import Route
from clusters import GROUP, PLURAL, VERSION, create_namespace, get_resource, wait_for
from pipelines import SMOLLM2

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
THREE_NODES = [{"name": name, "memoryGiB": 1} for name in ("a", "b", "c")]
NOWHERE = {"bloombee.test/node": "none"}  # no node has this label: the pods stay Pending


def resource(name: str, namespace: str, source: str, **spec) -> dict:
    clusters = [{"name": "home", "nodes": THREE_NODES}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DistributedLLM",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"source": source}, "clusters": clusters, **spec}}  # fmt: skip


def create(api, body: dict) -> dict:
    """Create ``body`` on the API server and return it as stored (uid, defaults filled in)."""
    from kubernetes import client

    meta = body["metadata"]
    create_namespace(api, meta["namespace"])
    return client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL,
                                                                        body)  # fmt: skip


def deployments(api, namespace: str) -> dict:
    from kubernetes import client

    return {item.metadata.name: item for item in client.AppsV1Api(api).list_namespaced_deployment(namespace).items}


def services(api, namespace: str) -> set[str]:
    from kubernetes import client

    return {item.metadata.name for item in client.CoreV1Api(api).list_namespaced_service(namespace).items}


def arg(deployment, flag: str) -> str:
    args = deployment.spec.template.spec.containers[0].args
    return args[args.index(flag) + 1]


@pytest.fixture()
def operator(real_cluster: Path, real_api, monkeypatch, request) -> Iterator[str]:
    """kopf running bloombee_operator.handlers in this process, for the test's namespace only."""
    from kopf.testing import KopfRunner

    namespace = f"op-{zlib.crc32(request.node.name.encode()):08x}"
    monkeypatch.setenv("KUBECONFIG", str(real_cluster))
    monkeypatch.setenv("BLOOMBEE_RECHECK_S", "1")
    create_namespace(real_api, namespace)
    with KopfRunner(["run", "--standalone", "--namespace", namespace, "-m", "bloombee_operator.handlers"]) as runner:
        yield namespace
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def test_create_restore_and_delete(operator, real_api, tiny_dir):
    """Children owned by the resource, as the plan says, a deleted child re-created, and the
    finalizer and the garbage collector removing everything on delete."""
    from kubernetes import client

    namespace = operator
    created = create(real_api, resource("chat", namespace, str(tiny_dir)))

    def planned() -> dict | None:
        status = (get_resource(real_api, namespace, "chat") or {}).get("status", {})
        return status if status.get("plan") else None

    status = wait_for("the plan in status", planned)
    plan = status["plan"]["planHash"]
    stages = [f"chat-stage-{i}-{plan[:6]}" for i in range(len(status["plan"]["stages"]))]
    names = {*stages, "chat-gateway"}
    wait_for("the children", lambda: names <= set(deployments(real_api, namespace)))
    children = deployments(real_api, namespace)
    for name in names:
        (owner,) = children[name].metadata.owner_references
        assert owner.uid == created["metadata"]["uid"] and owner.controller and owner.block_owner_deletion
        assert children[name].metadata.labels["app.kubernetes.io/instance"] == "chat"
    assert names <= services(real_api, namespace)
    for name, stage in zip(stages, status["plan"]["stages"], strict=True):
        assert arg(children[name], "--layers") == "{}:{}".format(*stage["layers"])
    # Every part speaks mutual TLS with a certificate of the resource's own CA, from its Secret.
    core = client.CoreV1Api(real_api)
    ca = core.read_namespaced_secret("chat-ca", namespace)
    assert ca.metadata.owner_references[0].uid == created["metadata"]["uid"]
    for name in names:
        volumes = {v.name: v for v in children[name].spec.template.spec.volumes}
        assert volumes["tls"].secret.secret_name == f"{name}-tls"
        files = {"ca.crt", "tls.crt", "tls.key"} | ({"measure.key"} if "-stage-" in name else set())
        assert set(core.read_namespaced_secret(f"{name}-tls", namespace).data) == files  # stages: signed /profile
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Planned"]["status"] == "True" and f"{stages[0]} home" in conditions["Planned"]["message"]
    assert conditions["LinksMeasured"]["reason"] == "SingleCluster"
    assert status["endpoint"] == f"http://chat-gateway.{namespace}.svc:8000/v1"
    gateway = GatewayLaunch.parse(children["chat-gateway"].spec.template.spec.containers[0].args)
    route = Route.loads(core.read_namespaced_config_map("chat-route", namespace).data["route.json"])
    assert gateway.route_file == "/etc/bloombee/route/route.json" and route.plan == plan
    assert route.micro_batch == status["plan"]["microBatch"] and route.max_sequences == status["plan"]["maxSequences"]
    assert [urls[0].split("//")[1].split(".")[0] for urls in route.stages] == stages

    client.AppsV1Api(real_api).delete_namespaced_deployment(stages[-1], namespace)

    def degraded() -> list[dict]:
        conditions = get_resource(real_api, namespace, "chat")["status"]["conditions"]
        return [c for c in conditions if c["type"] == "Degraded" and c["status"] == "True"]

    reported = wait_for("the Degraded condition", degraded, timeout_s=60)
    assert "re-created" in reported[0]["message"] and stages[-1] in reported[0]["message"]
    wait_for("the lost stage to come back", lambda: stages[-1] in deployments(real_api, namespace), timeout_s=60)

    client.CustomObjectsApi(real_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chat")
    wait_for("the resource to go (finalizer released)", lambda: get_resource(real_api, namespace, "chat") is None)
    pods = client.CoreV1Api(real_api).list_namespaced_pod
    wait_for("every child to go", lambda: not (deployments(real_api, namespace) or services(real_api, namespace)
                                               or pods(namespace).items), timeout_s=120)  # fmt: skip


def test_bloombee_delete_waits_for_the_operator_and_does_its_work_where_none_runs(real_cluster, real_api,
                                                                                    monkeypatch, tiny_dir):  # fmt: skip
    """`bloombee delete` (what the chart's pre-delete hook runs): with the operator running, the
    operator's finalizer removes the children and the command waits for it; with none, after its
    bounded wait the command removes the children itself and drops the finalizer, saying so. Either
    way nothing labelled as the resource's is left, nor its Secrets."""
    from bloombee_operator import admin
    from bloombee_operator.api.crd import FINALIZER
    from kopf.testing import KopfRunner
    from kubernetes import client

    namespace = "op-delete"
    monkeypatch.setenv("KUBECONFIG", str(real_cluster))
    create_namespace(real_api, namespace)
    core = client.CoreV1Api(real_api)

    def deployed(name: str) -> bool:
        meta = (get_resource(real_api, namespace, name) or {}).get("metadata", {})
        return FINALIZER in meta.get("finalizers", []) and f"{name}-gateway" in deployments(real_api, namespace)

    def secrets_of(name: str) -> list[str]:
        return [item.metadata.name for item in core.list_namespaced_secret(namespace).items
                if item.metadata.name.startswith(name)]  # fmt: skip

    with KopfRunner(["run", "--standalone", "--namespace", namespace, "-m", "bloombee_operator.handlers"]) as runner:
        for name in ("kept", "orphan"):
            body = resource(name, namespace, str(tiny_dir))
            body["metadata"]["labels"] = {"app.kubernetes.io/instance": "rel"}  # as the chart's example
            create(real_api, body)
        for name in ("kept", "orphan"):
            wait_for(f"{name} deployed, with its finalizer", lambda name=name: deployed(name))
        said: list[str] = []
        assert admin.delete_resources(real_api, namespace, ["kept"], None, 60, said.append), said
        assert any(line.startswith(f"the operator removed {namespace}/kept in") for line in said), said
        assert not any("no operator removed it" in line for line in said) and not secrets_of("kept-")
    assert runner.exception is None, runner.output

    # No operator now: orphan keeps its finalizer and its children, and nobody would remove them.
    assert deployed("orphan")
    said = []
    assert admin.delete_resources(real_api, namespace, [], "app.kubernetes.io/instance=rel", 3, said.append), said
    text = "\n".join(said)
    assert f"{namespace}/orphan is still there after 3 s: no operator removed it" in text, text
    assert f"{namespace}/orphan: removed" in text and f"dropped the finalizer {FINALIZER}" in text, text
    assert get_resource(real_api, namespace, "orphan") is None
    assert not deployments(real_api, namespace) and not services(real_api, namespace) and not secrets_of("orphan-")
    assert not core.list_namespaced_pod(namespace).items


def test_a_resource_the_schema_admits_but_cannot_run_gets_a_condition_and_an_event(operator, real_api):
    """The schema cannot know the model file is missing; the operator says so on the resource."""
    from kubernetes import client

    namespace = operator
    create(real_api, resource("broken", namespace, "/nowhere/model.gguf"))

    def failed() -> dict | None:
        status = (get_resource(real_api, namespace, "broken") or {}).get("status", {})
        return status if status.get("phase") == "Failed" else None

    status = wait_for("the Failed phase", failed)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ModelUnreadable"
    assert "/nowhere/model.gguf" in ready["message"]

    def warnings() -> list:
        events = client.CoreV1Api(real_api).list_namespaced_event(namespace).items
        return [e for e in events if e.reason == "ModelUnreadable" and e.involved_object.name == "broken"]

    (event, *_) = wait_for("the warning event", warnings)
    assert event.type == "Warning" and "/nowhere/model.gguf" in event.message
    assert not deployments(real_api, namespace)


def backend_for(api, stored: dict):
    from bloombee_operator.api.resource import parse_resource
    from bloombee_operator.backends.kubernetes.backend import Cluster, KubernetesBackend
    from bloombee_operator.backends.kubernetes.objects import Images, Owner

    meta = stored["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    return KubernetesBackend(Cluster(api), parse_resource(stored), owner, Images())


def test_a_new_plan_starts_beside_the_old_and_the_route_waits_for_it(real_api):
    """The Kubernetes backend under the reconcile steps (no kopf), with server-side apply; the API
    server takes the children's NetworkPolicies; a TLS Secret whose certificate nears its end is
    renewed by the keep pass. A new plan is make-before-break: its stages (new names) are created
    beside the old plan's, the gateway is not touched, and its route keeps naming the old plan
    while the new stages are not ready (here never: no node runs them), which PlanSwitching says."""
    import base64

    from bloombee_operator import reconcile
    from bloombee_operator.backends.kubernetes.backend import Cluster
    from bloombee_operator.backends.kubernetes.tls_secrets import DeploymentSecrets
    from bloombee_operator.pki import due_for_renewal, issue
    from kubernetes import client

    namespace = "op-replan"
    body = create(real_api, resource("chat", namespace, SMOLLM2))  # its 30 layers split 10/10/10
    body["spec"]["clusters"][0]["nodeSelector"] = NOWHERE
    core = client.CoreV1Api(real_api)

    def step() -> reconcile.Outcome:
        parsed = reconcile.read(body)
        outcome = reconcile.deploy(parsed, backend_for(real_api, body))
        body["status"] = outcome.applied_to(parsed.status)
        return outcome

    def deployed(outcome: reconcile.Outcome) -> str:
        return next((e.message for e in outcome.events if e.reason == "Deployed"), "")

    def routed() -> Route:
        return Route.loads(core.read_namespaced_config_map("chat-route", namespace).data["route.json"])

    first = deployed(step())
    old_plan = body["status"]["plan"]["planHash"]
    old = [f"chat-stage-{i}-{old_plan[:6]}" for i in range(len(body["status"]["plan"]["stages"]))]
    assert len(old) == 3 and old[-1] in first and "chat-gateway" in first, first
    assert deployed(step()) == ""  # the same plan again: nothing is rewritten
    assert routed().plan == old_plan  # the first route names the first plan at once: nothing serves yet
    policies = client.NetworkingV1Api(real_api).list_namespaced_network_policy(namespace).items
    assert sorted(p.metadata.name for p in policies) == ["chat-gateway", *old]

    # A certificate near its end is renewed by the next keep pass (and only then).
    ca = DeploymentSecrets("chat", namespace, None).ca(Cluster(real_api))[0]
    expiring = issue(ca, f"stage/{old[0]}", [old[0]], days=0)
    core.patch_namespaced_secret(f"{old[0]}-tls", namespace, {"data": {
        "tls.crt": base64.b64encode(expiring.cert).decode(), "tls.key": base64.b64encode(expiring.key).decode()}})
    untouched = core.read_namespaced_secret(f"{old[1]}-tls", namespace).data["tls.crt"]
    reconcile.keep(reconcile.read(body), backend_for(real_api, body))
    renewed = base64.b64decode(core.read_namespaced_secret(f"{old[0]}-tls", namespace).data["tls.crt"])
    assert renewed != expiring.cert and not due_for_renewal(renewed)
    assert core.read_namespaced_secret(f"{old[1]}-tls", namespace).data["tls.crt"] == untouched
    gateway_version = deployments(real_api, namespace)["chat-gateway"].metadata.resource_version

    # As if the old plan served and was profiled: it keeps serving through the switch.
    body["status"].update(phase="Ready", profiles={"measuredAt": "2026-12-07T00:00:00Z"})
    body["spec"]["clusters"][0]["nodes"] = THREE_NODES[:2]  # one node fewer
    switched = step()
    new_plan = body["status"]["plan"]["planHash"]
    new = [f"chat-stage-{i}-{new_plan[:6]}" for i in range(2)]
    message = deployed(switched)
    assert new_plan != old_plan and all(name in message for name in new), message
    assert not any(name in message for name in [*old, "chat-gateway"]), message
    children = deployments(real_api, namespace)
    assert set(children) == {"chat-gateway", *old, *new} and set(new) <= services(real_api, namespace)
    assert children["chat-gateway"].metadata.resource_version == gateway_version  # no plan in its pods
    layers = [s["layers"] for s in body["status"]["plan"]["stages"]]
    assert [arg(children[name], "--layers") for name in new] == [f"{a}:{b}" for a, b in layers]
    assert layers == [[0, 15], [15, 30]]
    assert body["status"]["phase"] == "Ready" and routed().plan == old_plan  # the new stages are not ready
    kept = reconcile.keep(reconcile.read(body), backend_for(real_api, body))
    switching = next(c for c in kept.conditions if c.type == "PlanSwitching")
    assert switching.status == "True" and f"from plan {old_plan[:6]} to plan {new_plan}" in switching.message
    assert "the new plan's stages to be ready (0 of 2" in switching.message, switching.message
    assert set(deployments(real_api, namespace)) == {"chat-gateway", *old, *new}  # nothing removed meanwhile


def test_a_due_replan_whose_probes_are_down_still_restores_stages(real_api):
    """Re-planning needs fresh links; while the probes cannot answer (their pods never start here),
    the timer keeps the pipeline whole on the current plan and says why it did not re-plan."""
    import time as clock

    from bloombee_operator import reconcile
    from kubernetes import client

    namespace = "op-probes-down"
    body = resource("duo", namespace, SMOLLM2)
    body["spec"]["clusters"] = [{"name": "a", "nodes": THREE_NODES[:2], "nodeSelector": NOWHERE},
                                {"name": "b", "nodes": THREE_NODES[2:], "nodeSelector": NOWHERE}]  # fmt: skip
    body = create(real_api, body)
    # measured earlier (status.links as the probes left it)
    body["status"] = {"links": [{"from": "a", "to": "b", "rttMs": 1.0, "mbps": 1000.0},
                                {"from": "gateway", "to": "b", "rttMs": 1.0, "mbps": 1000.0}]}  # fmt: skip
    backend = backend_for(real_api, body)
    first = reconcile.deploy(reconcile.read(body), backend)
    body["status"] = first.applied_to(reconcile.read(body).status)
    stages = sorted(s for s in deployments(real_api, namespace) if "-stage-" in s)
    assert len(stages) == 2 and not any("probe" in name for name in deployments(real_api, namespace))

    client.AppsV1Api(real_api).delete_namespaced_deployment(stages[0], namespace)
    later = reconcile.keep(reconcile.read(body), backend, clock=lambda: clock.time() + 601)  # replanEvery is due
    conditions = {c.type: c for c in later.conditions}
    assert conditions["LinksMeasured"].status == "False" and conditions["LinksMeasured"].reason == "ProbesStarting"
    assert conditions["Degraded"].status == "True" and stages[0] in conditions["Degraded"].message
    assert later.status["phase"] == "Degraded" and stages[0] in deployments(real_api, namespace)
    assert {"duo-probe-0", "duo-probe-1"} <= set(deployments(real_api, namespace))  # asked for; never up here
