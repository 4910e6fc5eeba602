"""DistributedLLMs on a cluster, seen from outside the operator: ``bloombee delete`` and ``bloombee check``.

* ``delete_resources`` is what the chart's pre-delete hook runs, so that ``helm uninstall`` leaves
  nothing running: it deletes the release's DistributedLLMs while their operator still runs, waits
  until the operator's finalizer has removed their children and the resources are gone, then until
  their pods are gone too. Where no operator removes one within the wait (none runs, or it is
  stuck), it removes the children itself, in every cluster, as the finalizer would
  (``reconcile.cleanup``), and drops the finalizer, saying so.
* ``check_operator`` and ``ready_endpoint`` are what ``helm test`` runs: the operator's Deployment has
  a ready pod whose kopf liveness endpoint answers and its identity can list DistributedLLMs; a named
  resource is ``Ready`` (its endpoint is then chatted with by the CLI).

Every wait is bounded and every failure says what was found and what to look at.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bloombee_contract.status import Phase
from kubernetes import client, config
from urllib3.exceptions import HTTPError

from bloombee_operator import reconcile
from bloombee_operator.api.crd import FINALIZER, GROUP, PLURAL, VERSION
from bloombee_operator.backends.kubernetes.backend import Cluster, KubernetesBackend
from bloombee_operator.backends.kubernetes.objects import Images, Owner, selector
from bloombee_operator.backends.kubernetes.tls_secrets import ca_secret_name

# What talking to a cluster can raise: a refusal, no usable kubeconfig, no connection.
CLUSTER_ERRORS: tuple[type[Exception], ...] = (client.ApiException, config.ConfigException, HTTPError, OSError)
Say = Callable[[str], None]
Clock = Callable[[], float]
POLL_S = 1.0
POD_GRACE_S = 60.0  # pods of deleted children get their termination grace period (30 s by default) to stop
CONFLICTS = 3  # a resource written between our read and our write: read it again, this often


@dataclass(frozen=True, order=True)
class Ref:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In a pod, its service account; elsewhere ``kubeconfig`` (or $KUBECONFIG, or ~/.kube/config)."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig)


def describe(error: Exception) -> str:
    """One line for a CLUSTER_ERRORS error (an ApiException's own text is several lines with headers)."""
    if isinstance(error, client.ApiException):
        body = error.body.decode(errors="replace") if isinstance(error.body, bytes) else str(error.body or "")
        return f"the API server answered {error.status} {error.reason}: {body[:300]}".rstrip(": ")
    return f"cannot reach the cluster: {error}"


def _listed(objects: client.CustomObjectsApi, namespace: str | None, label_selector: str | None) -> list[dict]:
    query = {"label_selector": label_selector} if label_selector else {}
    if namespace is None:
        return objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, **query)["items"]
    return objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **query)["items"]


def _ref(body: dict) -> Ref:
    return Ref(body["metadata"]["namespace"], body["metadata"]["name"])


def _get(objects: client.CustomObjectsApi, ref: Ref) -> dict | None:
    try:
        return objects.get_namespaced_custom_object(GROUP, VERSION, ref.namespace, PLURAL, ref.name)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def _until(check: Callable[[], list[Any]], deadline: float, clock: Clock, sleep: Callable[[float], None]) -> list[Any]:
    """Call ``check`` until it returns nothing or ``deadline`` passes; what it returned last."""
    left = check()
    while left and clock() < deadline:  # bounded by the deadline
        sleep(min(POLL_S, max(0.0, deadline - clock())))
        left = check()
    return left


def delete_resources(api: client.ApiClient, namespace: str | None, names: Iterable[str], label_selector: str | None,
                     wait_s: float, say: Say, clock: Clock = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> bool:  # fmt: skip
    """Delete the DistributedLLMs named (in ``namespace``) or matched by ``label_selector`` (in
    ``namespace``, or every namespace when it is None) and wait until they, their children and their
    pods are gone; whether everything went. ``wait_s`` bounds each wait: for the operator, then
    (where it did not finish) for the deletion this command completes itself, then (at least
    ``POD_GRACE_S``) for what is left of the children, their pods above all."""
    objects, local = client.CustomObjectsApi(api), Cluster(api)
    wanted = set(names)
    targets = sorted(_ref(body) for body in _listed(objects, namespace, label_selector)
                     if not wanted or body["metadata"]["name"] in wanted)  # fmt: skip
    missing = wanted - {ref.name for ref in targets}
    if missing:
        say(f"no DistributedLLM {', '.join(sorted(missing))} in {namespace or 'any namespace'}")
    if not targets:
        say("nothing to delete")
        return not missing
    started = clock()
    for ref in targets:
        try:
            objects.delete_namespaced_custom_object(GROUP, VERSION, ref.namespace, PLURAL, ref.name)
        except client.ApiException as error:
            if error.status != 404:
                raise
    listed = ", ".join(map(str, targets))
    say(f"deleted {listed}; waiting up to {wait_s:.0f} s for the operator to remove their children")

    def present() -> list[tuple[Ref, dict]]:
        return [(ref, body) for ref in targets if (body := _get(objects, ref)) is not None]

    stuck = _until(present, clock() + wait_s, clock, sleep)
    if not stuck:
        say(f"the operator removed {listed} in {clock() - started:.0f} s")
    for ref, body in stuck:
        say(f"{ref} is still there after {wait_s:.0f} s: no operator removed it (none runs, or it is stuck: "
            f"kubectl logs of the operator say which), and its finalizer {FINALIZER} holds it; removing its "
            "children here, in every cluster, and dropping the finalizer")  # fmt: skip
        removed = _clean_up_here(local, objects, body)
        say(f"{ref}: removed {removed} children and dropped the finalizer {FINALIZER}")
    held = _until(present, clock() + wait_s, clock, sleep) if stuck else []
    for ref, body in held:
        say(f"{ref} is still there: other finalizers hold it ({body['metadata'].get('finalizers')})")

    def leftovers() -> list[str]:
        return [f"{ref}: {what}" for ref in targets for what in _left_behind(local, ref)]

    left = _until(leftovers, clock() + max(wait_s, POD_GRACE_S), clock, sleep)
    for line in left:
        say(f"still there after {max(wait_s, POD_GRACE_S):.0f} s: {line} (kubectl describe it: a pod may wait on "
            "a node that is gone)")  # fmt: skip
    if not held and not left:
        say(f"{listed}: the resources, their children and their pods are gone ({clock() - started:.0f} s)")
    _others(objects, set(targets), say)
    return not (missing or held or left)


def _clean_up_here(local: Cluster, objects: client.CustomObjectsApi, body: dict) -> int:
    """What the operator's finalizer does, done here: the children removed in every cluster, then
    the finalizer dropped; how many children went."""
    ref = _ref(body)
    try:
        resource = reconcile.read(body)
    except reconcile.Permanent:  # unreadable by this version: what carries its labels in this cluster
        removed = sum(local.delete(obj) for obj in local.children(selector(ref.name), ref.namespace))
    else:
        owner = Owner(ref.name, ref.namespace, resource.metadata.uid or "")
        removed = reconcile.cleanup(resource, KubernetesBackend(local, resource, owner, Images()))
    _drop_finalizer(objects, ref)
    return removed


def _drop_finalizer(objects: client.CustomObjectsApi, ref: Ref) -> None:
    for _attempt in range(CONFLICTS):
        body = _get(objects, ref)
        finalizers = (body or {}).get("metadata", {}).get("finalizers") or []
        if body is None or FINALIZER not in finalizers:
            return
        patch = {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER],
                              "resourceVersion": body["metadata"]["resourceVersion"]}}  # fmt: skip
        try:
            objects.patch_namespaced_custom_object(GROUP, VERSION, ref.namespace, PLURAL, ref.name, patch)
            return
        except client.ApiException as error:
            if error.status != 409:
                raise
    raise RuntimeError(f"{ref} was rewritten {CONFLICTS} times while its finalizer was being dropped; run again")


def _left_behind(local: Cluster, ref: Ref) -> list[str]:
    """What of a deleted resource is still in this cluster: children by label, pods, its CA Secret."""
    found = [f"{obj['kind']} {obj['metadata']['name']}" for obj in local.children(selector(ref.name), ref.namespace)]
    found += [f"Pod {pod['metadata']['name']}" for pod in local.pods(ref.namespace, selector(ref.name))]
    if local.secret_data(ca_secret_name(ref.name), ref.namespace) is not None:
        found.append(f"Secret {ca_secret_name(ref.name)}")
    return found


def _others(objects: client.CustomObjectsApi, deleted: set[Ref], say: Say) -> None:
    """Say which DistributedLLMs stay: without an operator their children run on unmanaged, and
    deleting one waits for an operator (or ``bloombee delete``) to run its finalizer."""
    try:
        others = sorted({_ref(body) for body in _listed(objects, None, None)} - deleted)
    except client.ApiException:
        return  # not allowed to list every namespace: nothing to say
    if others:
        say(f"{len(others)} other DistributedLLMs stay, not selected: {', '.join(map(str, others))}; their "
            "children keep running, and deleting one later needs an operator running or `bloombee delete`")  # fmt: skip


def check_operator(api: client.ApiClient, namespace: str, deployment: str, wait_s: float, say: Say,
                   clock: Clock = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:  # fmt: skip
    """The operator's Deployment has a ready pod (within ``wait_s``), that pod's liveness endpoint
    (kopf's, as the Deployment's probe names it) answers 200, and this identity (in ``helm test``
    the operator's ServiceAccount) can list DistributedLLMs in every namespace."""
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    where = f"deployment {namespace}/{deployment}"
    deadline = clock() + wait_s
    while True:  # bounded by the deadline
        try:
            found = apps.read_namespaced_deployment(deployment, namespace)
        except client.ApiException as error:
            say(f"cannot read the operator's {where}: {error.status} {error.reason}")
            return False
        ready, wanted = found.status.ready_replicas or 0, found.spec.replicas
        if ready >= 1:
            break
        if wanted == 0:
            say(f"the operator's {where} is scaled to 0: no operator runs")
            return False
        if clock() >= deadline:
            say(f"the operator's {where} has {ready} of {wanted} pods ready after {wait_s:.0f} s "
                f"(kubectl -n {namespace} describe {where.split()[0]} {deployment})")  # fmt: skip
            return False
        sleep(min(2.0, max(0.0, deadline - clock())))
    container = found.spec.template.spec.containers[0]
    probe = container.liveness_probe.http_get if container.liveness_probe else None
    if probe is None:
        say(f"the operator's {where} has no HTTP liveness probe to ask")
        return False
    port = probe.port if isinstance(probe.port, int) else next(
        (p.container_port for p in container.ports or [] if p.name == probe.port), None)  # fmt: skip
    labels = ",".join(f"{k}={v}" for k, v in found.spec.selector.match_labels.items())
    pods = [p for p in core.list_namespaced_pod(namespace, label_selector=labels).items
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]  # fmt: skip
    if port is None or not pods:
        say(f"the operator's {where}: no ready pod, or no port {probe.port!r} to ask")
        return False
    url = f"http://{pods[0].status.pod_ip}:{port}{probe.path or '/'}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            answered = reply.status
    except (urllib.error.URLError, OSError) as error:
        say(f"the operator's liveness endpoint {url} (pod {pods[0].metadata.name}) did not answer: {error}")
        return False
    try:
        resources = _listed(client.CustomObjectsApi(api), None, None)
    except client.ApiException as error:
        say(f"listing DistributedLLMs in every namespace was refused: {error.status} {error.reason}")
        return False
    phases = ", ".join(f"{_ref(r)} {(r.get('status') or {}).get('phase', 'new')}" for r in resources)
    say(f"the operator's {where}: {ready} of {wanted} pods ready; {url} answered {answered}; "
        f"{_identity(api)} lists {len(resources)} DistributedLLMs{': ' + phases if phases else ''}")  # fmt: skip
    return True


def _identity(api: client.ApiClient) -> str:
    """Who this client is, as the API server says (for the message only)."""
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    try:
        return str(client.AuthenticationV1Api(api).create_self_subject_review(review).status.user_info.username)
    except client.ApiException:
        return "this identity"


def ready_endpoint(api: client.ApiClient, ref: Ref, wait_s: float, say: Say, clock: Clock = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> str | None:  # fmt: skip
    """The endpoint of the DistributedLLM ``ref`` once its phase is Ready (within ``wait_s``), or None,
    having said what its status shows instead."""
    objects = client.CustomObjectsApi(api)
    started = clock()
    deadline = started + wait_s
    while True:  # bounded by the deadline
        body = _get(objects, ref)
        status = (body or {}).get("status") or {}
        if status.get("phase") == Phase.READY.value and status.get("endpoint"):
            say(f"{ref} is Ready, {status.get('stagesReady')} stages, at {status['endpoint']}")
            return str(status["endpoint"])
        if body is None or status.get("phase") == Phase.FAILED.value or clock() >= deadline:
            break
        sleep(min(2.0, max(0.0, deadline - clock())))
    if body is None:
        say(f"no DistributedLLM {ref}")
        return None
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    say(f"{ref} is {status.get('phase', 'not deployed yet')}, not Ready, after {clock() - started:.0f} s: "
        f"{ready.get('reason', '')} {ready.get('message', '')}".rstrip())  # fmt: skip
    return None
