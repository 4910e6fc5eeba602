"""The reconcile loop's steps, shared by the kopf operator and ``bloombee up``.

Each step takes the resource as parsed once by its caller (status included, typed), asks a
``Backend`` to measure or realise things, and returns an ``Outcome``: the status fields to write
and the events to post. The kopf handlers (``handlers.py``) write those into the resource;
``bloombee up`` (``cli.py``) keeps them in a local status file. Decisions stay in pure code
(``planning.py``, ``desired.py``); the backend is where the I/O happens:

* ``backends/kubernetes/backend.py`` ``KubernetesBackend``: objects in the clusters, probe pods;
* ``backends/local.py`` ``LocalBackend``: processes on this machine.

Steps:

* ``read``: the resource from what the API server or the YAML file holds, or a permanent failure;
* ``deploy`` (create, spec update, resume): measure links where there are several clusters,
  plan (keeping the running plan under hysteresis), apply the desired state;
* ``keep`` (a timer): re-create what went missing or died; once all is ready the first time, and
  every ``planner.replanEvery`` after, re-measure the links and the parts' own costs
  (``status.profiles``) and re-plan, adopting a new plan only for a clear gain;
* ``readiness`` (a child's readiness changed): what ``keep`` reports, without its restoring or re-planning;
* ``cleanup`` (deletion): remove everything, in every cluster (a resource that never parsed has
  nothing to remove).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bloombee_contract.status import ConditionStatus, ConditionType, Phase, Reason

from bloombee_operator.api.resource import DistributedLLM, ResourceError, parse_resource
from bloombee_operator.api.status import Condition, DistributedLLMStatus, LinkStatus, PlanStatus, ProfilesStatus
from bloombee_operator.desired import DesiredState, desired_state
from bloombee_operator.faults import Fault
from bloombee_operator.model_shape import ModelShape, ModelShapeError
from bloombee_operator.planner import PlanningError
from bloombee_operator.planner.replan import PlanDiff
from bloombee_operator.planning import admission_note, decide, gateway_profile, plan_status, planner_inputs

Clock = Callable[[], float]


class Backend(Protocol):
    """Where a DesiredState is realised."""

    def model_shape(self, source: str) -> ModelShape: ...

    def measure_links(self, resource: DistributedLLM) -> list[dict]:
        """``status.links`` entries between the resource's clusters (raises ``LinksPending`` when
        the probes are not up yet)."""
        ...

    def local_links(self, resource: DistributedLLM) -> list[dict]:
        """``status.links`` entries of a cluster with itself, where its own links are not the
        usual local ones (``bloombee up --link-delay-ms``); usually none."""
        ...

    def measure_profiles(self, desired: DesiredState) -> dict | None:
        """``status.profiles`` (wire shape, the gateway's part as it measured it) for the running
        ``desired``, or None when they cannot be measured now."""
        ...

    def apply(self, desired: DesiredState) -> list[str]:
        """Make it so; return the names of the stages and gateway that were started or changed."""
        ...

    def restore(self, desired: DesiredState) -> list[str]:
        """Re-create what went missing or died; return what was re-created."""
        ...

    def retire(self, desired: DesiredState) -> Switch:
        """Remove the children of older plans once the gateway serves ``desired``'s and no
        generation runs on them any more; say where the switch stands."""
        ...

    def ready_stages(self, desired: DesiredState) -> int: ...

    def gateway_ready(self, desired: DesiredState) -> bool: ...

    def faults(self, desired: DesiredState) -> list[Fault]:
        """What keeps the children's pods from running, as their kubelets and scheduler say."""
        ...

    def endpoint(self, desired: DesiredState) -> str: ...

    def remove(self, resource: DistributedLLM) -> int:
        """Delete every child of the resource, in every cluster; return how many."""
        ...


class LinksPending(RuntimeError):
    """Links cannot be measured yet (probe pods starting); try again shortly."""


class Permanent(RuntimeError):
    """The resource cannot be served as written; the outcome says why. Not retried."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.conditions[-1].message)
        self.outcome = outcome


@dataclass(frozen=True)
class Switch:
    """Where a plan switch stands (``Backend.retire``)."""

    old: tuple[str, ...] = ()  # older plans (their hashes' first characters) whose children still run
    waiting: str = ""  # what removing them waits for; "" when there were none or they were removed now
    removed: tuple[str, ...] = ()  # children removed now
    serving: str | None = None  # the plan the gateway serves, where it said


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: Reason
    message: str


@dataclass
class Outcome:
    status: dict[str, Any] = field(default_factory=dict)  # status fields to write, in their wire shape
    conditions: list[Condition] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    retry_after_s: float | None = None  # temporary: run the step again after this long

    def merged_status(self, current: DistributedLLMStatus) -> dict[str, Any]:
        """The status fields to write, conditions merged into the current ones."""
        merged = dict(self.status)
        if self.conditions:
            merged["conditions"] = [c.dump() for c in merge_conditions(current.conditions, *self.conditions)]
        return merged

    def applied_to(self, current: DistributedLLMStatus) -> dict[str, Any]:
        """The whole status after this outcome (where status is a document, not a patch)."""
        return {**current.dump(), **self.merged_status(current)}


def now_iso(clock: Clock = time.time) -> str:
    return datetime.datetime.fromtimestamp(clock(), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: ConditionType, status: bool, reason: Reason, message: str, at: str | None = None) -> Condition:
    truth = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    return Condition(type=type_, status=truth, reason=reason, message=message, last_transition_time=at or now_iso())


def merge_conditions(current: list[Condition], *updates: Condition) -> list[Condition]:
    """Replace conditions by type; keep the transition time of one whose status did not change."""
    merged = {item.type: item for item in current}
    for update in updates:
        previous = merged.get(update.type)
        if previous is not None and previous.status == update.status:
            update = update.model_copy(update={"last_transition_time": previous.last_transition_time})
        merged[update.type] = update
    return list(merged.values())


def _failed(reason: Reason, message: str) -> Permanent:
    conditions = [condition(type_, False, reason, message) for type_ in (ConditionType.PLANNED, ConditionType.READY)]
    outcome = Outcome(status={"phase": Phase.FAILED.value}, conditions=conditions,
                      events=[Event("Warning", reason, message)])  # fmt: skip
    return Permanent(outcome)


def read(body: Mapping[str, Any]) -> DistributedLLM:
    """The resource in ``body``, parsed once for a whole step; a spec that cannot work is permanent."""
    meta = body.get("metadata") or {}
    try:
        return parse_resource(dict(body), f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}")
    except ResourceError as error:
        raise _failed(Reason.INVALID_SPEC, str(error)) from None


def _shape(resource: DistributedLLM, backend: Backend) -> ModelShape:
    try:
        return backend.model_shape(resource.spec.model.source)
    except ModelShapeError as error:
        raise _failed(Reason.MODEL_UNREADABLE, str(error)) from None


def _desired(resource: DistributedLLM, shape: ModelShape, plan: PlanStatus, links: list[LinkStatus]) -> DesiredState:
    try:
        return desired_state(resource, shape, plan, links=links)
    except ValueError as error:
        raise _failed(Reason.UNPLANNABLE, str(error)) from None


def _plan(resource: DistributedLLM, shape: ModelShape, links: list[LinkStatus], profiles: ProfilesStatus | None,
          clock: Clock) -> tuple[PlanStatus, bool, str, PlanDiff]:  # fmt: skip
    current = resource.status.plan
    try:
        decision, inputs = decide(resource, shape, links, current, profiles)
    except PlanningError as error:
        raise _failed(Reason.UNPLANNABLE, str(error)) from None
    if not decision.adopted and current is not None:
        # The same stages, their predictions brought up to date with what was measured since.
        kept = plan_status(decision.plan, inputs, current.planned_at)
        return kept.model_copy(update={"checked_at": now_iso(clock)}), False, decision.reason, decision.diff
    return plan_status(decision.plan, inputs, now_iso(clock)), True, decision.reason, decision.diff


def _profiles(resource: DistributedLLM, backend: Backend, shape: ModelShape, links: list[LinkStatus],
              clock: Clock) -> ProfilesStatus | None:  # fmt: skip
    """What the running stages and gateway measure of themselves now; when they cannot say, what
    was measured before, or an empty profile (so a backend that cannot profile is asked again only
    when a re-plan is due); None before anything runs."""
    current = resource.status.plan
    if current is None:
        return None
    try:
        measured = backend.measure_profiles(desired_state(resource, shape, current, links=links))
    except ValueError:
        measured = None
    if measured is None:
        return (resource.status.profiles or ProfilesStatus()).model_copy(update={"measured_at": now_iso(clock)})
    gateway = measured.pop("gateway", None)
    profiles = ProfilesStatus.model_validate({**measured, "measuredAt": now_iso(clock)})
    if gateway:
        inputs = planner_inputs(resource, shape, links, profiles)
        profiles.gateway = gateway_profile(gateway, inputs, current)
    elif resource.status.profiles is not None:
        profiles.gateway = resource.status.profiles.gateway  # no traffic since: what was measured before
    return profiles


def _links(resource: DistributedLLM, backend: Backend, clock: Clock) -> tuple[list[LinkStatus], Condition]:
    if len(resource.spec.clusters) < 2:
        links = [LinkStatus.model_validate(entry) for entry in backend.local_links(resource)]
        message = "one cluster: no links between clusters" + "".join(
            f"; within {e.from_} {e.rtt_ms:.1f} ms round trip" for e in links)  # fmt: skip
        return links, condition(ConditionType.LINKS_MEASURED, True, Reason.SINGLE_CLUSTER, message, now_iso(clock))
    links = [LinkStatus.model_validate(entry) for entry in backend.measure_links(resource)]
    summary = ", ".join(f"{e.from_}->{e.to} {e.rtt_ms:.1f} ms {e.mbps:.0f} Mbit/s" for e in links)
    return links, condition(ConditionType.LINKS_MEASURED, True, Reason.MEASURED, summary, now_iso(clock))


def _unmeasured(resource: DistributedLLM, links: list[LinkStatus]) -> bool:
    """Whether some cluster of the spec has no measured link (new, or never measured)."""
    measured = {end for link in links for end in (link.from_, link.to)}
    return len(resource.spec.clusters) < 2 or any(c.name not in measured for c in resource.spec.clusters)


def _describe(desired: DesiredState) -> str:
    return ", ".join(f"{s.name} {s.cluster} [{s.layers[0]}, {s.layers[1]})" for s in desired.stages)


def deploy(resource: DistributedLLM, backend: Backend, clock: Clock = time.time, remeasure: bool = False,
           reprofile: bool = False) -> Outcome:  # fmt: skip
    """Create, update or resume: links (again with ``remeasure``), the parts' own costs (with
    ``reprofile``, from what runs now), plan, apply."""
    shape = _shape(resource, backend)
    outcome = Outcome()
    links = resource.status.links
    if remeasure or _unmeasured(resource, links):
        try:
            links, measured = _links(resource, backend, clock)
        except LinksPending as pending:
            waiting = condition(ConditionType.LINKS_MEASURED, False, Reason.PROBES_STARTING, str(pending),
                                now_iso(clock))  # fmt: skip
            return Outcome(status={"phase": Phase.MEASURING.value}, conditions=[waiting], retry_after_s=5.0)
        outcome.conditions.append(measured)
        outcome.status["links"] = [link.dump() for link in links]
    profiles = resource.status.profiles
    if reprofile:
        measured = _profiles(resource, backend, shape, links, clock)
        if measured is not None:
            profiles = measured
            outcome.status["profiles"] = profiles.dump()
    planned, adopted, reason, moves = _plan(resource, shape, links, profiles, clock)
    desired = _desired(resource, shape, planned, links)
    changed = backend.apply(desired)
    previous = resource.status.plan.plan_hash if resource.status.plan is not None else None
    planned = planned.model_copy(update={"plan_hash": desired.plan_hash})
    total = len(desired.stages)
    at = now_iso(clock)
    # A plan that serves keeps serving while the next one starts beside it (make-before-break):
    # the resource stays Ready, and PlanSwitching tells the switch until the old plan is removed.
    serving = resource.status.phase == Phase.READY
    outcome.status.update({"plan": planned.dump(), "endpoint": backend.endpoint(desired),
                           "stagesReady": f"{backend.ready_stages(desired)}/{total}"})  # fmt: skip
    if not serving:
        outcome.status["phase"] = Phase.DEPLOYING.value
    if resource.metadata.generation is not None:
        outcome.status["observedGeneration"] = resource.metadata.generation
    tokens = planned.predicted_tokens_per_second
    summary = f"{_describe(desired)}; {tokens:.1f} tokens/s predicted ({reason})"
    asked = resource.spec.planner.concurrency
    admission = admission_note(planned.max_sequences or asked, asked)
    if admission:
        summary += f"; {admission}"
    outcome.conditions.append(
        condition(ConditionType.PLANNED, True, Reason.PLANNED if adopted else Reason.KEPT, summary, at))
    if not serving:
        outcome.conditions += [
            condition(ConditionType.STAGES_READY, False, Reason.DEPLOYING, "waiting for stages", at),
            condition(ConditionType.READY, False, Reason.DEPLOYING, "waiting for stages", at),
        ]  # fmt: skip
    if previous and previous != desired.plan_hash:
        message = (f"from plan {previous} to plan {desired.plan_hash}: the new plan's stages start beside the old "
                   "ones, which serve until the gateway moves over and their generations finish")  # fmt: skip
        outcome.conditions.append(condition(ConditionType.PLAN_SWITCHING, True, Reason.SWITCHING, message, at))
        outcome.events.append(Event("Normal", Reason.SWITCHING, message))
    if adopted:
        moved = "; ".join(f"{m.node}: load {len(m.load)}, drop {len(m.drop)} layers" for m in moves.moves)
        message = f"{total} stages, {tokens:.1f} tokens/s predicted: {moved or reason}"
        outcome.events.append(Event("Normal", Reason.PLANNED, message))
    if changed:
        message = f"started or changed {', '.join(changed)} (plan {desired.plan_hash})"
        outcome.events.append(Event("Normal", Reason.DEPLOYED, message))
    return outcome


def _replan_due(plan: PlanStatus, resource: DistributedLLM, clock: Clock) -> bool:
    if not plan.checked_at:
        return True
    at = datetime.datetime.strptime(plan.checked_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return clock() - at.timestamp() >= resource.spec.planner.replan_every_s


def keep(resource: DistributedLLM, backend: Backend, clock: Clock = time.time) -> Outcome:
    """The timer: re-plan when due; re-create what is missing; report readiness."""
    status = resource.status
    if status.phase in (None, Phase.FAILED):
        return Outcome()  # never deployed, or cannot be: create/update owns it
    if status.plan is None:
        return deploy(resource, backend, clock)  # deployed by a version whose plan this one cannot read
    waiting: list[Condition] = []
    due = _replan_due(status.plan, resource, clock)
    never_profiled = status.profiles is None or status.profiles.measured_at is None
    if due or (never_profiled and status.phase == Phase.READY):  # the first calibration, once all is up
        replanned = deploy(resource, backend, clock, remeasure=due, reprofile=True)
        if replanned.retry_after_s is None:
            return replanned
        waiting = replanned.conditions  # links cannot be measured now: serve on, try at the next tick
    shape = _shape(resource, backend)
    try:
        desired = desired_state(resource, shape, status.plan, links=status.links)
    except ValueError:
        return deploy(resource, backend, clock)  # the spec changed under the plan: plan afresh
    restored = backend.restore(desired)
    return _readiness(status, backend, desired, restored, waiting, clock)


def readiness(resource: DistributedLLM, backend: Backend, clock: Clock = time.time) -> Outcome:
    """What the children's readiness says now, restoring and re-planning nothing: for a child that
    became ready, or stopped being ready, between two passes of ``keep`` (the operator watches its
    Deployments). Nothing to say of a resource not deployed yet, failed, or whose spec changed
    under its plan: ``deploy`` owns those."""
    status = resource.status
    if status.phase in (None, Phase.FAILED) or status.plan is None:
        return Outcome()
    try:
        desired = desired_state(resource, _shape(resource, backend), status.plan, links=status.links)
    except ValueError:
        return Outcome()
    return _readiness(status, backend, desired, [], [], clock)


def _readiness(status: DistributedLLMStatus, backend: Backend, desired: DesiredState, restored: list[str],
               waiting: list[Condition], clock: Clock) -> Outcome:  # fmt: skip
    """Readiness, faults and what was ``restored`` as status, conditions and events."""
    ready, total = backend.ready_stages(desired), len(desired.stages)
    gateway_ready = backend.gateway_ready(desired)
    switch = backend.retire(desired)
    # Ready is what a user can use: the gateway and every stage of the plan it serves (during a
    # switch the old plan's, which its readiness covers, until the new plan's stages are ready).
    all_ready = (ready == total or bool(switch.old)) and gateway_ready and not restored
    faults = backend.faults(desired)
    message = (f"{ready} of {total} stages ready" + ("" if gateway_ready else ", the gateway not ready")
               + (f"; re-created {', '.join(restored)}" if restored else ""))  # fmt: skip
    at = now_iso(clock)
    switching = _switch_condition(switch, desired, ready, total, at)
    # A fault that stops a child is Degraded at once, not a silent Deploying; one a child got over
    # (a container OOM-killed once, running again) stays in the condition while everything serves.
    degraded = bool(restored) or (bool(faults) and not all_ready)
    outcome = Outcome(status={"stagesReady": f"{ready}/{total}",
                              "phase": _phase(all_ready, degraded).value})  # fmt: skip
    if not switch.old or switch.removed:
        outcome.status["servingPlan"] = desired.plan_hash
    elif switch.serving:
        outcome.status["servingPlan"] = switch.serving
    stages_ready = Reason.ALL_READY if ready == total else Reason.WAITING
    if faults:
        degraded_condition = condition(ConditionType.DEGRADED, True, faults[0].reason,
                                       "; ".join(f.message for f in faults), at)  # fmt: skip
    else:
        degraded_condition = condition(ConditionType.DEGRADED, bool(restored),
                                       Reason.RESTORED if restored else Reason.ALL_PRESENT, message, at)  # fmt: skip
    outcome.conditions = [
        *waiting,
        condition(ConditionType.STAGES_READY, ready == total, stages_ready, message, at),
        degraded_condition,
        switching,
        condition(ConditionType.READY, all_ready, Reason.SERVING if all_ready else Reason.NOT_READY, message, at),
    ]
    outcome.events = [Event("Warning", Reason.RESTORED, f"{name} was missing or had died; re-created")
                      for name in restored]  # fmt: skip
    if switch.removed:
        outcome.events.append(Event("Normal", Reason.SWITCHED, switching.message))
    # An event when a fault is new, not at every recheck while it lasts.
    said = next((c.message for c in status.conditions if c.type == ConditionType.DEGRADED), "") or ""
    outcome.events += [Event("Warning", f.reason, f.message) for f in faults if f.message not in said]
    return outcome


def _switch_condition(switch: Switch, desired: DesiredState, ready: int, total: int, at: str) -> Condition:
    """PlanSwitching: true while an older plan's children run beside ``desired``'s."""
    old = ", ".join(switch.old)
    if switch.removed:
        message = f"plan {desired.plan_hash} serves; removed plan {old}'s {', '.join(switch.removed)}"
        return condition(ConditionType.PLAN_SWITCHING, False, Reason.SWITCHED, message, at)
    if not switch.old:
        return condition(ConditionType.PLAN_SWITCHING, False, Reason.ONE_PLAN, f"plan {desired.plan_hash} serves", at)
    waiting = (f"the new plan's stages to be ready ({ready} of {total}; where a cluster has no room for both "
               "plans, their pods wait for it)" if ready < total else switch.waiting)  # fmt: skip
    message = f"from plan {old} to plan {desired.plan_hash}: plan {old} serves until then; waiting for {waiting}"
    if switch.serving == desired.plan_hash:
        message = f"from plan {old} to plan {desired.plan_hash}: plan {desired.plan_hash} serves; waiting for {waiting}"
    return condition(ConditionType.PLAN_SWITCHING, True, Reason.SWITCHING, message, at)


def _phase(all_ready: bool, degraded: bool) -> Phase:
    return Phase.READY if all_ready else Phase.DEGRADED if degraded else Phase.DEPLOYING


def cleanup(resource: DistributedLLM, backend: Backend) -> int:
    """Delete every child in every cluster; return how many."""
    return backend.remove(resource)
