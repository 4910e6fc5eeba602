"""kopf handlers for DistributedLLM: the thin shell around the reconcile steps.

``reconcile.py`` holds the steps (measure links, plan, apply, restore, clean up) that ``bloombee up``
runs too; this module gives them the Kubernetes backend (``backends/kubernetes_apply.py``) and
writes their outcome into the resource: status fields, conditions and events.

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
from bloombee_contract.status import ConditionType, Reason
from kubernetes import client, config

from bloombee_operator import reconcile
from bloombee_operator.api.crd import FINALIZER, GROUP, PLURAL, VERSION
from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import lenient_status
from bloombee_operator.backends.kubernetes.backend import Cluster, KubernetesBackend, RemoteClusterError
from bloombee_operator.backends.kubernetes.objects import Images, Owner

RECHECK_S = float(os.environ.get("BLOOMBEE_RECHECK_S", "30"))


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
    memo.remote = {}  # remote clusters' clients by kubeconfig Secret name: one per cluster, not per call
    image = os.environ.get("BLOOMBEE_STAGE_IMAGE", Images.stage)
    memo.images = Images(stage=image, gateway=image)


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
