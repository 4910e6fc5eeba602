"""kopf handlers for DistributedLLM: the thin shell around the reconcile steps.

``reconcile.py`` holds the steps (measure links, plan, apply, restore, clean up) that ``bloombee up``
runs too; this module gives them the Kubernetes backend (``backends/kubernetes/backend.py``) and
writes their outcome into the resource: status fields, conditions and events. Besides the
resource's own handlers it watches the Deployments it owns: a child that becomes ready, or stops
being ready, brings the parent's readiness up to date at once (``child_readiness``) instead of at
the next recheck, and so does a resource that was just (re)deployed (``deploying``).

    kopf run -m bloombee_operator.handlers --all-namespaces

Environment: ``BLOOMBEE_RECHECK_S`` (timer interval, default 30), ``BLOOMBEE_STAGE_IMAGE``,
``BLOOMBEE_API_KEY_SECRET`` (a Secret with key ``api-key`` the gateway then requires).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import kopf
from bloombee_contract.status import ConditionType, Phase, Reason
from kubernetes import client, config

from bloombee_operator import reconcile
from bloombee_operator.api.crd import FINALIZER, GROUP, PLURAL, VERSION
from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import lenient_status
from bloombee_operator.backends.kubernetes.backend import (
    Cluster,
    KubernetesBackend,
    RemoteClusterError,
    current_ready_replicas,
)
from bloombee_operator.backends.kubernetes.objects import MANAGED_BY, Images, Owner

RECHECK_S = float(os.environ.get("BLOOMBEE_RECHECK_S", "30"))
READINESS_CONFLICTS = 3  # a status written under us between our read and our write: read again, this often
log = logging.getLogger("bloombee.operator")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="bloombee.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="bloombee.ai")
    settings.posting.level = logging.INFO
    # Only the operator's own Deployments are watched (child_readiness), filtered by the API server.
    settings.watching.label_selectors["apps", "deployments"] = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    memo.local = Cluster(client.ApiClient())
    memo.remote = {}  # remote clusters' clients by kubeconfig Secret name: one per cluster, not per call
    image = os.environ.get("BLOOMBEE_STAGE_IMAGE", Images.stage)
    memo.images = Images(stage=image, gateway=image)
    memo.children_ready = {}  # (namespace, Deployment) -> whether it had a ready replica when last seen


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, its service account; elsewhere the kubeconfig that $KUBECONFIG names at this moment."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _backend(resource: DistributedLLM, memo: kopf.Memo) -> KubernetesBackend:
    meta = resource.metadata
    owner = Owner(name=meta.name, namespace=meta.namespace, uid=meta.uid or "")
    api_key_secret = os.environ.get("BLOOMBEE_API_KEY_SECRET") or None
    return KubernetesBackend(memo.local, resource, owner, memo.images, api_key_secret, memo.remote)


def _write(body: Any, patch: kopf.Patch, outcome: reconcile.Outcome) -> None:
    for key, value in outcome.merged_status(lenient_status(body.get("status"))).items():
        patch.status[key] = value
    for event in outcome.events:
        (kopf.warn if event.type == "Warning" else kopf.info)(body, reason=event.reason, message=event.message)


def _run(step: Callable[[DistributedLLM, KubernetesBackend], reconcile.Outcome], body: Any, patch: kopf.Patch,
         memo: kopf.Memo) -> None:  # fmt: skip
    """Parse the resource once, run one reconcile step on it, and write what it says into status."""
    try:
        resource = reconcile.read(body)
        outcome = step(resource, _backend(resource, memo))
    except reconcile.Permanent as failed:
        _write(body, patch, failed.outcome)
        raise kopf.PermanentError(str(failed)) from None
    except RemoteClusterError as error:
        message = f"{error}; retrying"
        unreachable = reconcile.condition(ConditionType.READY, False, Reason.REMOTE_CLUSTER, message)
        event = reconcile.Event("Warning", Reason.REMOTE_CLUSTER, message)
        _write(body, patch, reconcile.Outcome(conditions=[unreachable], events=[event]))
        raise kopf.TemporaryError(str(error), delay=30) from None
    _write(body, patch, outcome)
    if outcome.retry_after_s is not None:
        raise kopf.TemporaryError(outcome.conditions[0].message, delay=outcome.retry_after_s)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def deploy(body: Any, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _run(reconcile.deploy, body, patch, memo)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECHECK_S, initial_delay=RECHECK_S, idle=0)
def keep(body: Any, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Re-create children that went missing, report readiness, re-plan when due."""
    _run(reconcile.keep, body, patch, memo)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def cleanup(body: Any, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Delete every child. In the operator's cluster owner references would do it too, but remote
    clusters have none, and deleting explicitly does not wait on the garbage collector."""
    try:
        resource = reconcile.read(body)
    except reconcile.Permanent:
        return  # a resource that never parsed never had children
    logger.info("deleted %d children", reconcile.cleanup(resource, _backend(resource, memo)))


def _parent(body: Any) -> str | None:
    """The name of the DistributedLLM that controls this object (owner references never cross clusters,
    so only children in the operator's own cluster name one)."""
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == "DistributedLLM" and owner.get("apiVersion") == f"{GROUP}/{VERSION}":
            return str(owner["name"])
    return None


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
def child_readiness(body: Any, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A child Deployment that became ready or stopped being ready (or went): the parent's readiness
    now, not at its next recheck. Children in remote clusters are not watched; the timer reports them."""
    parent = _parent(body)
    if parent is None:
        return
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    ready = type != "DELETED" and current_ready_replicas(body) >= 1
    if type == "DELETED":
        memo.children_ready.pop(key, None)
    elif memo.children_ready.get(key) == ready:
        return  # a rollout's progress, a scale, a status the controller rewrote: readiness is what it was
    else:
        memo.children_ready[key] = ready
    _refresh_readiness(meta["namespace"], parent, memo)


@kopf.on.event(GROUP, VERSION, PLURAL, field="status.phase", value=Phase.DEPLOYING.value)
def deploying(body: Any, memo: kopf.Memo, **_: Any) -> None:
    """A resource just (re)deployed, whose children may all be ready already and stay so (the operator
    restarted; a spec change or a re-plan that changed no child): its readiness now, not at its next
    recheck. What this writes is an event too; the next one finds nothing new to write."""
    _refresh_readiness(body["metadata"]["namespace"], body["metadata"]["name"], memo)


def _refresh_readiness(namespace: str, name: str, memo: kopf.Memo) -> None:
    """Run ``reconcile.readiness`` on the resource as stored now and write what it says, on the
    condition that nobody wrote the resource in between (its resourceVersion): a plan being applied
    or a recheck is never overwritten with readiness computed from what they replaced."""
    api = client.CustomObjectsApi(memo.local.dynamic.client)
    for _attempt in range(READINESS_CONFLICTS):
        try:
            body = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as error:
            if error.status == 404:
                return
            raise
        if body["metadata"].get("deletionTimestamp"):
            return  # being deleted: its children go, and that is no news
        try:
            resource = reconcile.read(body)
            outcome = reconcile.readiness(resource, _backend(resource, memo))
        except (reconcile.Permanent, RemoteClusterError):
            return  # the resource's own handlers report these
        status = outcome.merged_status(lenient_status(body.get("status")))
        current = body.get("status") or {}
        if all(current.get(key) == value for key, value in status.items()):
            return
        written = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": status}
        try:
            api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, written)
        except client.ApiException as error:
            if error.status == 409:
                continue  # written meanwhile: read it again
            raise
        for event in outcome.events:
            (kopf.warn if event.type == "Warning" else kopf.info)(body, reason=event.reason, message=event.message)
        log.info("%s/%s: %s, stages ready %s (a child's readiness changed)", namespace, name, status.get("phase"),
                 status.get("stagesReady"))  # fmt: skip
        return
    log.info("%s/%s: written by others %d times in a row; its next recheck reports readiness", namespace, name,
             READINESS_CONFLICTS)  # fmt: skip
