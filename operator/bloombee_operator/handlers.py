"""kopf handlers for DistributedLLM: the thin shell around the pure reconcile core.

``reconcile.py`` decides what runs where, ``backends/kubernetes.py`` turns that into objects,
``backends/kubernetes_apply.py`` applies them; this module reads the resource, calls those, and
writes the outcome into status (phase, endpoint, plan, conditions with reason and message) and
events. A timer re-applies children that went missing (a deleted stage comes back) and reports
readiness; deletion removes every child (the finalizer).

    kopf run -m bloombee_operator.handlers --all-namespaces

Environment: ``BLOOMBEE_RECHECK_S`` (timer interval, default 30), ``BLOOMBEE_STAGE_IMAGE``,
``BLOOMBEE_API_KEY_SECRET`` (a Secret with key ``api-key`` the gateway then requires).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import kopf
from kubernetes import client, config

from bloombee_operator.backends.kubernetes import Images, Owner, Placement, render
from bloombee_operator.backends.kubernetes_apply import Cluster
from bloombee_operator.crd import GROUP, PLURAL, VERSION
from bloombee_operator.model_shape import ModelShapeError, model_shape
from bloombee_operator.reconcile import DesiredState, desired_state
from bloombee_operator.resource import DistributedLLM, ResourceError, parse_resource

FINALIZER = "bloombee.ai/cleanup"
RECHECK_S = float(os.environ.get("BLOOMBEE_RECHECK_S", "30"))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": _now()}  # fmt: skip


def merge_conditions(current: list[dict], *updates: dict) -> list[dict]:
    """Replace conditions by type; keep the transition time of one whose status did not change."""
    merged = {item["type"]: item for item in current or []}
    for update in updates:
        previous = merged.get(update["type"])
        if previous and previous.get("status") == update["status"]:
            update = {**update, "lastTransitionTime": previous.get("lastTransitionTime", update["lastTransitionTime"])}
        merged[update["type"]] = update
    return list(merged.values())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="bloombee.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="bloombee.ai")
    settings.posting.level = logging.INFO
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    memo.local = Cluster(client.ApiClient())
    memo.images = Images(stage=os.environ.get("BLOOMBEE_STAGE_IMAGE", Images.stage),
                         gateway=os.environ.get("BLOOMBEE_STAGE_IMAGE", Images.gateway))  # fmt: skip


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, its service account; elsewhere the kubeconfig that $KUBECONFIG names at this moment."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _fail(body: Any, patch: kopf.Patch, reason: str, message: str) -> kopf.PermanentError:
    """A resource that cannot be served as written: say so in status and in an event; do not retry."""
    patch.status["phase"] = "Failed"
    patch.status["conditions"] = merge_conditions(body.get("status", {}).get("conditions", []),
                                                  condition("Planned", False, reason, message),
                                                  condition("Ready", False, reason, message))  # fmt: skip
    kopf.warn(body, reason=reason, message=message)
    return kopf.PermanentError(f"{reason}: {message}")


def _desired(body: Any, patch: kopf.Patch) -> tuple[DistributedLLM, DesiredState]:
    try:
        resource = parse_resource(dict(body), f"{body['metadata']['namespace']}/{body['metadata']['name']}")
    except ResourceError as error:
        raise _fail(body, patch, "InvalidSpec", str(error)) from None
    try:
        shape = model_shape(resource.spec.model.source)
    except ModelShapeError as error:
        raise _fail(body, patch, "ModelUnreadable", str(error)) from None
    hinted = sum(len(cluster.nodes) for cluster in resource.spec.clusters)
    try:
        desired = desired_state(resource, shape, num_stages=hinted or 3)
    except ValueError as error:
        raise _fail(body, patch, "Unplannable", str(error)) from None
    return resource, desired


def _placement(resource: DistributedLLM) -> Placement:
    local = next((c.name for c in resource.spec.clusters if not c.kubeconfig_secret), resource.spec.clusters[0].name)
    return Placement(local=local, node_selectors={c.name: c.node_selector for c in resource.spec.clusters})


def _children(body: Any, patch: kopf.Patch, memo: kopf.Memo) -> tuple[DistributedLLM, DesiredState, list[dict]]:
    resource, desired = _desired(body, patch)
    placement = _placement(resource)
    owner = Owner(name=body["metadata"]["name"], namespace=body["metadata"]["namespace"], uid=body["metadata"]["uid"])
    objects = render(desired, owner, placement, memo.images, os.environ.get("BLOOMBEE_API_KEY_SECRET") or None)
    remote = sorted(set(objects) - {placement.local})
    if remote:
        raise _fail(body, patch, "RemoteClustersUnsupported",
                    f"stages placed on {remote}: this operator version deploys to its own cluster only")  # fmt: skip
    return resource, desired, objects[placement.local]


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def deploy(body: Any, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    _, desired, objects = _children(body, patch, memo)
    for obj in objects:
        memo.local.apply(obj)
    spans = ", ".join(f"{s.name} [{s.layers[0]}, {s.layers[1]})" for s in desired.stages)
    patch.status["phase"] = "Deploying"
    patch.status["endpoint"] = f"http://{desired.gateway.name}.{desired.namespace}.svc:{desired.gateway.port}/v1"
    patch.status["stagesReady"] = f"0/{len(desired.stages)}"
    patch.status["plan"] = {"planHash": desired.plan_hash, "microBatch": desired.gateway.micro_batch,
                            "stages": [{"name": s.name, "cluster": s.cluster, "layers": list(s.layers)}
                                       for s in desired.stages]}  # fmt: skip
    patch.status["conditions"] = merge_conditions(
        body.get("status", {}).get("conditions", []),
        condition("LinksMeasured", True, "SingleCluster", "all stages run in the operator's cluster"),
        condition("Planned", True, "Planned", f"{len(desired.stages)} stages: {spans}"),
        condition("StagesReady", False, "Deploying", "waiting for stage pods"),
        condition("Ready", False, "Deploying", "waiting for stage pods"),
    )
    kopf.info(body, reason="Deployed", message=f"applied {len(objects)} objects (plan {desired.plan_hash})")
    logger.info("applied %d objects for plan %s", len(objects), desired.plan_hash)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECHECK_S, initial_delay=RECHECK_S, idle=0)
def keep(body: Any, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Re-apply children that went missing; report how many stages are ready."""
    if body.get("status", {}).get("phase") == "Failed":
        return
    _, desired, objects = _children(body, patch, memo)
    restored = [obj for obj in objects if not memo.local.exists(obj)]
    for obj in restored:
        memo.local.apply(obj)
        kopf.warn(body, reason="Restored", message=f"{obj['kind']} {obj['metadata']['name']} was missing; re-created")
    ready = 0
    for obj in objects:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] != desired.gateway.name:
            ready += int(memo.local.ready_replicas(obj) >= 1)
    total = len(desired.stages)
    all_ready = ready == total and not restored
    patch.status["stagesReady"] = f"{ready}/{total}"
    patch.status["phase"] = "Ready" if all_ready else "Degraded" if restored else "Deploying"
    message = f"{ready} of {total} stages ready" + (f"; re-created {len(restored)} missing objects" if restored else "")
    patch.status["conditions"] = merge_conditions(
        body.get("status", {}).get("conditions", []),
        condition("StagesReady", ready == total, "AllReady" if ready == total else "Waiting", message),
        condition("Degraded", bool(restored), "ChildrenMissing" if restored else "AllPresent", message),
        condition("Ready", all_ready, "Serving" if all_ready else "NotReady", message),
    )


@kopf.on.delete(GROUP, VERSION, PLURAL)
def cleanup(body: Any, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Delete every child. In the operator's cluster owner references would do it too, but remote
    clusters have none, and deleting explicitly does not wait on the garbage collector."""
    try:
        _, _, objects = _children(body, patch, memo)
    except kopf.PermanentError:
        return  # never deployed
    deleted = sum(memo.local.delete(obj) for obj in objects)
    logger.info("deleted %d children", deleted)
