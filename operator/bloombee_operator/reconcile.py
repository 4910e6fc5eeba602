"""The reconcile loop's steps, shared by the kopf operator and ``bloombee up``.

Each step reads the resource (as the API server or the YAML file has it, status included),
asks a ``Backend`` to measure or realise things, and returns an ``Outcome``: the status fields to
write and the events to post. The kopf handlers (``handlers.py``) write those into the resource;
``bloombee up`` keeps them in a local status file. Decisions stay in pure code (``planning.py``,
``reconcile.py``); the backend is where the I/O happens:

* ``backends/kubernetes_apply.py`` ``KubernetesBackend``: objects in the clusters, probe pods;
* ``backends/local.py`` ``LocalBackend``: processes on this machine.

Steps:

* ``deploy`` (create, spec update, resume): measure links where there are several clusters,
  plan (keeping the running plan under hysteresis), apply the desired state;
* ``keep`` (a timer): re-create what went missing or died; every ``planner.replanEvery``
  re-measure the links and re-plan, adopting a new plan only for a clear gain;
* ``cleanup`` (deletion): remove everything, in every cluster.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bloombee_contract.status import ConditionStatus, ConditionType, Phase, Reason

from bloombee_operator.api.resource import DistributedLLM, ResourceError, parse_resource
from bloombee_operator.desired import DesiredState, StagePlan, desired_state
from bloombee_operator.model_shape import ModelShape, ModelShapeError
from bloombee_operator.planner import PlanningError
from bloombee_operator.planner.replan import PlanDiff
from bloombee_operator.planning import admission_note, decide, plan_status, stage_plans


class Backend(Protocol):
    """Where a DesiredState is realised."""

    def model_shape(self, source: str) -> ModelShape: ...

    def measure_links(self, resource: DistributedLLM) -> list[dict]:
        """``status.links`` entries between the resource's clusters (raises ``LinksPending`` when
        the probes are not up yet)."""
        ...

    def apply(self, desired: DesiredState) -> list[str]:
        """Make it so; return the names of the stages and gateway that were started or changed."""
        ...

    def restore(self, desired: DesiredState) -> list[str]:
        """Re-create what went missing or died; return what was re-created."""
        ...

    def ready_stages(self, desired: DesiredState) -> int: ...

    def endpoint(self, desired: DesiredState) -> str: ...

    def remove(self, resource: DistributedLLM) -> int:
        """Delete every child of the resource, in every cluster; return how many."""
        ...


class LinksPending(RuntimeError):
    """Links cannot be measured yet (probe pods starting); try again shortly."""


class Permanent(RuntimeError):
    """The resource cannot be served as written; the outcome says why. Not retried."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.conditions[-1]["message"])
        self.outcome = outcome


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: Reason
    message: str


@dataclass
class Outcome:
    status: dict[str, Any] = field(default_factory=dict)
    conditions: list[dict[str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    retry_after_s: float | None = None  # temporary: run the step again after this long

    def merged_status(self, current: dict) -> dict[str, Any]:
        """The status fields to write, conditions merged into the current ones."""
        merged = dict(self.status)
        if self.conditions:
            merged["conditions"] = merge_conditions(current.get("conditions") or [], *self.conditions)
        return merged

    def applied_to(self, current: dict | None) -> dict[str, Any]:
        """The whole status after this outcome (where status is a document, not a patch)."""
        current = current or {}
        return {**current, **self.merged_status(current)}


def now_iso(clock: Callable[[], float] = time.time) -> str:
    return datetime.datetime.fromtimestamp(clock(), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: ConditionType, status: bool, reason: Reason, message: str,
              at: str | None = None) -> dict[str, str]:  # fmt: skip
    truth = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    return {"type": type_.value, "status": truth.value, "reason": reason.value, "message": message,
            "lastTransitionTime": at or now_iso()}  # fmt: skip


def merge_conditions(current: list[dict], *updates: dict) -> list[dict]:
    """Replace conditions by type; keep the transition time of one whose status did not change."""
    merged = {item["type"]: item for item in current or []}
    for update in updates:
        previous = merged.get(update["type"])
        if previous and previous.get("status") == update["status"]:
            update = {**update, "lastTransitionTime": previous.get("lastTransitionTime", update["lastTransitionTime"])}
        merged[update["type"]] = update
    return list(merged.values())


def _failed(reason: Reason, message: str) -> Permanent:
    conditions = [condition(type_, False, reason, message) for type_ in (ConditionType.PLANNED, ConditionType.READY)]
    outcome = Outcome(status={"phase": Phase.FAILED.value}, conditions=conditions,
                      events=[Event("Warning", reason, message)])  # fmt: skip
    return Permanent(outcome)


def _read(body: dict, backend: Backend) -> tuple[DistributedLLM, ModelShape]:
    meta = body.get("metadata", {})
    try:
        resource = parse_resource(dict(body), f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}")
    except ResourceError as error:
        raise _failed(Reason.INVALID_SPEC, str(error)) from None
    try:
        return resource, backend.model_shape(resource.spec.model.source)
    except ModelShapeError as error:
        raise _failed(Reason.MODEL_UNREADABLE, str(error)) from None


def desired_from_plan(resource: DistributedLLM, shape: ModelShape, plan: dict, links: list[dict]) -> DesiredState:
    """The desired state for a ``status.plan`` (what ``deploy`` wrote), so every step rebuilds the
    same children without planning again."""
    planned = [StagePlan(s["cluster"], (s["layers"][0], s["layers"][1]), s["node"], s["offload"]["weights"],
                         s["offload"]["kv"], s.get("kvBudgetGiB")) for s in plan["stages"]]  # fmt: skip
    mbps = {(link["from"], link["to"]): float(link["mbps"]) for link in links}
    return desired_state(resource, shape, planned=planned, micro_batch=plan["microBatch"],
                         relay_hops=tuple(plan.get("relayHops", ())), link_mbps=mbps,
                         max_sequences=plan.get("maxSequences"))  # fmt: skip


def _plan(resource: DistributedLLM, shape: ModelShape, links: list[dict], current: dict | None,
          clock: Callable[[], float]) -> tuple[dict, bool, str, PlanDiff]:  # fmt: skip
    try:
        decision, inputs = decide(resource, shape, links, current)
    except PlanningError as error:
        raise _failed(Reason.UNPLANNABLE, str(error)) from None
    if not decision.adopted and current:
        return {**current, "checkedAt": now_iso(clock)}, False, decision.reason, decision.diff
    planned = plan_status(decision.plan, inputs.nodes)
    for entry, stage in zip(planned["stages"], stage_plans(decision.plan, inputs), strict=True):
        entry["kvBudgetGiB"] = round(stage.kv_budget_gib or 0, 6)
    planned["maxSequences"] = decision.plan.held  # the sequences the stages' KV budgets hold
    planned["plannedAt"] = planned["checkedAt"] = now_iso(clock)
    return planned, True, decision.reason, decision.diff


def _links(resource: DistributedLLM, backend: Backend, clock: Callable[[], float]) -> tuple[list[dict], dict]:
    if len(resource.spec.clusters) < 2:
        message = "one cluster: no links between clusters"
        return [], condition(ConditionType.LINKS_MEASURED, True, Reason.SINGLE_CLUSTER, message, now_iso(clock))
    links = backend.measure_links(resource)
    summary = ", ".join(f"{e['from']}->{e['to']} {e['rttMs']:.1f} ms {e['mbps']:.0f} Mbit/s" for e in links)
    return links, condition(ConditionType.LINKS_MEASURED, True, Reason.MEASURED, summary, now_iso(clock))


def _unmeasured(resource: DistributedLLM, links: list[dict]) -> bool:
    """Whether some cluster of the spec has no measured link (new, or never measured)."""
    measured = {end for link in links for end in (link["from"], link["to"])}
    return len(resource.spec.clusters) < 2 or any(c.name not in measured for c in resource.spec.clusters)


def _describe(desired: DesiredState) -> str:
    return ", ".join(f"{s.name} {s.cluster} [{s.layers[0]}, {s.layers[1]})" for s in desired.stages)


def deploy(body: dict, backend: Backend, clock: Callable[[], float] = time.time, remeasure: bool = False) -> Outcome:
    """Create, update or resume: links, plan, apply."""
    resource, shape = _read(body, backend)
    status = body.get("status") or {}
    outcome = Outcome()
    links = status.get("links") or []
    if remeasure or _unmeasured(resource, links):
        try:
            links, measured = _links(resource, backend, clock)
        except LinksPending as pending:
            message = str(pending)
            outcome.conditions = [
                condition(ConditionType.LINKS_MEASURED, False, Reason.PROBES_STARTING, message, now_iso(clock))
            ]
            outcome.status = {"phase": Phase.MEASURING.value}
            outcome.retry_after_s = 5.0
            return outcome
        outcome.conditions.append(measured)
        outcome.status["links"] = links
    planned, adopted, reason, moves = _plan(resource, shape, links, status.get("plan"), clock)
    try:
        desired = desired_from_plan(resource, shape, planned, links)
    except ValueError as error:
        raise _failed(Reason.UNPLANNABLE, str(error)) from None
    changed = backend.apply(desired)
    planned["planHash"] = desired.plan_hash
    total = len(desired.stages)
    at, generation = now_iso(clock), body.get("metadata", {}).get("generation")
    ready = f"{backend.ready_stages(desired)}/{total}"
    outcome.status.update({"phase": Phase.DEPLOYING.value, "plan": planned, "endpoint": backend.endpoint(desired),
                           "stagesReady": ready, "observedGeneration": generation})  # fmt: skip
    tokens = planned["predictedTokensPerSecond"]
    summary = f"{_describe(desired)}; {tokens:.1f} tokens/s predicted ({reason})"
    asked = resource.spec.planner.concurrency
    admission = admission_note(planned.get("maxSequences", asked), asked)
    if admission:
        summary += f"; {admission}"
    outcome.conditions += [
        condition(ConditionType.PLANNED, True, Reason.PLANNED if adopted else Reason.KEPT, summary, at),
        condition(ConditionType.STAGES_READY, False, Reason.DEPLOYING, "waiting for stages", at),
        condition(ConditionType.READY, False, Reason.DEPLOYING, "waiting for stages", at),
    ]
    if adopted:
        moved = "; ".join(f"{m.node}: load {len(m.load)}, drop {len(m.drop)} layers" for m in moves.moves)
        outcome.events.append(
            Event("Normal", Reason.PLANNED, f"{total} stages, {tokens:.1f} tokens/s predicted: {moved or reason}")
        )
    if changed:
        outcome.events.append(
            Event("Normal", Reason.DEPLOYED, f"started or changed {', '.join(changed)} (plan {desired.plan_hash})")
        )
    return outcome


def _replan_due(status: dict, resource: DistributedLLM, clock: Callable[[], float]) -> bool:
    checked = (status.get("plan") or {}).get("checkedAt")
    if not checked:
        return True
    at = datetime.datetime.strptime(checked, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return clock() - at.timestamp() >= resource.spec.planner.replan_every_s


def keep(body: dict, backend: Backend, clock: Callable[[], float] = time.time) -> Outcome:
    """The timer: re-plan when due; re-create what is missing; report readiness."""
    status = body.get("status") or {}
    if status.get("phase") == Phase.FAILED or not status.get("plan"):
        return Outcome()  # never deployed: create/update owns it
    resource, shape = _read(body, backend)
    waiting: list[dict[str, str]] = []
    if _replan_due(status, resource, clock):
        replanned = deploy(body, backend, clock, remeasure=True)
        if replanned.retry_after_s is None:
            return replanned
        waiting = replanned.conditions  # links cannot be measured now: serve on, try at the next tick
    try:
        desired = desired_from_plan(resource, shape, status["plan"], status.get("links") or [])
    except (KeyError, TypeError, ValueError):
        return deploy(body, backend, clock)  # a plan this version cannot read: plan afresh
    restored = backend.restore(desired)
    ready, total = backend.ready_stages(desired), len(desired.stages)
    all_ready = ready == total and not restored
    message = f"{ready} of {total} stages ready" + (f"; re-created {', '.join(restored)}" if restored else "")
    at = now_iso(clock)
    outcome = Outcome(status={"stagesReady": f"{ready}/{total}",
                              "phase": _phase(all_ready, restored).value})  # fmt: skip
    outcome.conditions = [
        *waiting,
        condition(ConditionType.STAGES_READY, ready == total, Reason.ALL_READY if ready == total else Reason.WAITING,
                  message, at),
        condition(ConditionType.DEGRADED, bool(restored), Reason.RESTORED if restored else Reason.ALL_PRESENT,
                  message, at),
        condition(ConditionType.READY, all_ready, Reason.SERVING if all_ready else Reason.NOT_READY, message, at),
    ]
    outcome.events = [Event("Warning", Reason.RESTORED, f"{name} was missing or had died; re-created")
                      for name in restored]  # fmt: skip
    return outcome


def _phase(all_ready: bool, restored: list[str]) -> Phase:
    return Phase.READY if all_ready else Phase.DEGRADED if restored else Phase.DEPLOYING


def cleanup(body: dict, backend: Backend) -> int:
    """Delete every child in every cluster; a resource that never parsed has none."""
    meta = body.get("metadata", {})
    try:
        resource = parse_resource(dict(body), f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}")
    except ResourceError:
        return 0
    return backend.remove(resource)
