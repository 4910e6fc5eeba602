"""From a DistributedLLM and its measured links to a plan, and back: the planner's glue (pure).

The operator and ``bloombee up`` both call ``decide``: it builds the planner's inputs from the
resource (node hints, ``planner`` settings, ``compression``) and ``status.links``, runs the DP,
and weighs the result against the plan in ``status.plan`` with the resource's hysteresis
(``planner.minGain``), so a plan is replaced only for a clear gain or when it cannot run any
more. ``plan_status`` / ``plan_from_status`` convert a plan to and from ``status.plan``
(``api.status.PlanStatus``); state lives in status, never in the operator's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import LinkStatus, PlanStage, PlanStatus, StageOffload
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import Links, ModelProfile, Node, Options, Plan, Workload
from bloombee_operator.planner.cost import StageChoice
from bloombee_operator.planner.profile import GIB, profile_from_config
from bloombee_operator.planner.replan import Decision, replan
from bloombee_operator.planning_inputs import links_from_entries, nodes_from_resource


@dataclass(frozen=True)
class PlannerInputs:
    profile: ModelProfile
    nodes: list[Node]
    links: Links
    workload: Workload
    options: Options


def planner_inputs(resource: DistributedLLM, shape: ModelShape, links: list[LinkStatus]) -> PlannerInputs:
    spec = resource.spec
    profile = profile_from_config(shape.config(), spec.model.dtype, spec.compression)
    nodes = nodes_from_resource(resource, profile)
    clusters = [cluster.name for cluster in spec.clusters]
    options = Options(objective=spec.planner.objective, max_micro_batch=spec.planner.max_micro_batch,
                      allow_offload=spec.planner.allow_offload)  # fmt: skip
    workload = Workload(batch=spec.planner.concurrency, context=spec.planner.context_tokens)
    return PlannerInputs(profile, nodes, links_from_entries(links, clusters), workload, options)


def decide(resource: DistributedLLM, shape: ModelShape, links: list[LinkStatus],
           current: PlanStatus | None) -> tuple[Decision, PlannerInputs]:  # fmt: skip
    """The plan to run: a fresh optimum, or ``current`` kept under hysteresis; and the planner
    inputs it was decided on."""
    inputs = planner_inputs(resource, shape, links)
    decision = replan(plan_from_status(current), inputs.profile, inputs.nodes, inputs.links, inputs.workload,
                      inputs.options, min_gain=resource.spec.planner.min_gain)  # fmt: skip
    return decision, inputs


def admission_note(held: int, asked: int) -> str | None:
    """What users should know when a plan holds fewer sequences than ``planner.concurrency`` asks for."""
    if held >= asked:
        return None
    return (f"admits {held} of the {asked} sequences asked for at once (more would not fit or "
            "would cost more than they bring); the rest wait at the gateway for a seat")  # fmt: skip


def plan_status(plan: Plan, inputs: PlannerInputs, at: str | None = None) -> PlanStatus:
    """A plan as ``status.plan`` holds it: stages placed on clusters with their KV budgets.

    A stage's KV budget is what the plan sized it for: its layers' KV for the sequences it holds
    (``Plan.held`` x context), all of it, since offloaded KV is paged through the same cache.
    """
    cluster_of = {node.name: node.cluster for node in inputs.nodes}
    per_layer = inputs.profile.kv_bytes_per_token_per_layer * inputs.workload.context * plan.held
    stages = [
        PlanStage(
            node=s.node,
            cluster=cluster_of[s.node],
            layers=s.layers,
            offload=StageOffload(weights=s.offload_weights, kv=s.offload_kv),
            predicted_ms=round(s.seconds * 1000, 3),
            kv_budget_gi_b=round((s.layers[1] - s.layers[0]) * per_layer / GIB, 6),
        )
        for s in plan.stages
    ]
    return PlanStatus(
        method=plan.method,
        micro_batch=plan.micro_batch,
        batch=plan.batch,
        max_sequences=plan.held,  # the sequences the stages' KV budgets hold
        predicted_tokens_per_second=round(plan.tokens_per_second, 3),
        predicted_latency_ms=round(plan.latency_s * 1000, 3),
        round_ms=round(plan.round_s * 1000, 3),
        cycle_ms=round(plan.cycle_s * 1000, 3),
        bottleneck_ms=round(plan.bottleneck_s * 1000, 3),
        relay_hops=list(plan.relay_hops),
        stages=stages,
        planned_at=at,
        checked_at=at,
    )


def plan_from_status(status: PlanStatus | None) -> Plan | None:
    """The planner's ``Plan`` for a ``status.plan`` (None when there is none)."""
    if status is None:
        return None
    stages = tuple(StageChoice(s.node, s.layers, s.offload.weights, s.offload.kv, s.predicted_ms / 1000)
                   for s in status.stages)  # fmt: skip
    return Plan(stages, status.micro_batch, status.batch, status.cycle_ms / 1000, status.bottleneck_ms / 1000,
                status.round_ms / 1000, status.method, tuple(status.relay_hops))  # fmt: skip
