"""What is wrong with the children's pods, in words a user can act on (pure: pods in, faults out).

The kubelet and the scheduler record why a pod does not run in its status: a container waiting to
pull an image it cannot get, a container the kernel killed at its memory limit, a pod no node has
room for. The operator reads the pods of each child and turns those into the resource's
``Degraded`` condition and events, naming the image, the limit and the plan's budget, or the
scheduler's message, so a user never waits in silence on ``Deploying``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bloombee_contract.status import Reason

# A container waiting for one of these will not start until someone changes something.
PULL_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_FAILURES = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


@dataclass(frozen=True)
class Fault:
    child: str  # the Deployment (stage or gateway) whose pod it is
    reason: Reason
    message: str


def pod_faults(pods: Sequence[Mapping[str, Any]], budgets_gib: Mapping[str, float]) -> list[Fault]:
    """The faults of ``pods`` (Kubernetes Pod objects as dicts, labelled ``bloombee.ai/name`` with
    their child); ``budgets_gib``: the memory the plan budgeted for each child."""
    faults: list[Fault] = []
    for pod in pods:
        child = ((pod.get("metadata") or {}).get("labels") or {}).get("bloombee.ai/name", "?")
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        fault = _unschedulable(child, status) or _container_fault(child, spec, status, budgets_gib.get(child))
        if fault is not None and fault not in faults:
            faults.append(fault)
    return faults


def _unschedulable(child: str, status: Mapping[str, Any]) -> Fault | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" \
                and condition.get("reason") == "Unschedulable":  # fmt: skip
            return Fault(child, Reason.UNSCHEDULABLE,
                         f"{child}: no node can run its pod: {condition.get('message') or 'no message'}")  # fmt: skip
    return None


def _container_fault(child: str, spec: Mapping[str, Any], status: Mapping[str, Any],
                     budget_gib: float | None) -> Fault | None:  # fmt: skip
    images = {c.get("name"): c.get("image") for c in spec.get("containers") or []}
    limits = {c.get("name"): ((c.get("resources") or {}).get("limits") or {}).get("memory")
              for c in spec.get("containers") or []}  # fmt: skip
    for container in status.get("containerStatuses") or []:
        name = container.get("name")
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in PULL_FAILURES:
            detail = waiting.get("message") or waiting["reason"]
            return Fault(child, Reason.IMAGE_PULL_FAILED,
                         f"{child}: image {images.get(name) or container.get('image')} cannot be pulled "
                         f"({waiting['reason']}): {detail}")  # fmt: skip
        if waiting.get("reason") in CONFIG_FAILURES:
            return Fault(child, Reason.CONTAINER_FAILED,
                         f"{child}: container {name} cannot start ({waiting['reason']}): {waiting.get('message', '')}")
        killed = (container.get("lastState") or {}).get("terminated") or {}
        if killed.get("reason") == "OOMKilled":
            budget = f"{budget_gib:.2f} GiB" if budget_gib is not None else "nothing"
            return Fault(child, Reason.OOM_KILLED,
                         f"{child}: container {name} was killed by the kernel at its memory limit "
                         f"{limits.get(name) or 'unknown'} ({container.get('restartCount', 0)} restarts so far, "
                         f"the kubelet restarts it with back-off); the plan budgeted {budget} for it: the "
                         "memory model is short for this model or this node")  # fmt: skip
    return None
