"""From a DistributedLLM and its measured links to a plan, and back: the planner's glue (pure).

The operator and ``bloombee up`` both call ``decide``: it builds the planner's inputs from the
resource (node hints, ``planner`` settings, ``compression``) and ``status.links``, runs the DP,
and weighs the result against the plan in ``status.plan`` with the resource's hysteresis
(``planner.minGain``), so a plan is replaced only for a clear gain or when it cannot run any
more. ``plan_status`` / ``plan_from_status`` convert a plan to and from ``status.plan``
(``api.status.PlanStatus``); state lives in status, never in the operator's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import GatewayProfile, LinkStatus, PlanStage, PlanStatus, ProfilesStatus, StageOffload
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import Links, ModelProfile, Node, Options, Plan, Workload, evaluate
from bloombee_operator.planner.cost import StageChoice, hop, legs
from bloombee_operator.planner.profile import GIB, profile_from_config
from bloombee_operator.planner.replan import Decision, replan
from bloombee_operator.planning_inputs import links_from_entries, nodes_from_resource, with_profiles


@dataclass(frozen=True)
class PlannerInputs:
    profile: ModelProfile
    nodes: list[Node]
    links: Links
    workload: Workload
    options: Options


def planner_inputs(resource: DistributedLLM, shape: ModelShape, links: list[LinkStatus],
                   profiles: ProfilesStatus | None = None) -> PlannerInputs:  # fmt: skip
    """What the planner works from: the spec's hints, measured links, and measured profiles where
    ``status.profiles`` has them."""
    spec = resource.spec
    profile = profile_from_config(shape.config(), spec.model.dtype, spec.compression)
    clusters = [cluster.name for cluster in spec.clusters]
    options = Options(objective=spec.planner.objective, max_micro_batch=spec.planner.max_micro_batch,
                      allow_offload=spec.planner.allow_offload)  # fmt: skip
    workload = Workload(batch=spec.planner.concurrency, context=spec.planner.context_tokens)
    nodes, matrix, options = with_profiles(nodes_from_resource(resource, profile),
                                           links_from_entries(links, clusters), options, profiles)  # fmt: skip
    return PlannerInputs(profile, nodes, matrix, workload, options)


def profile_request(max_micro_batch: int, steps: int = 24) -> dict:
    """The body of a stage's ``/profile`` run: decode steps of every step size the planner may
    choose, powers of two up to ``max_micro_batch`` and that size itself, about ``steps`` timed
    steps in all (the planner interpolates between the sizes)."""
    sizes = {1 << k for k in range(max_micro_batch.bit_length()) if 1 << k <= max_micro_batch}
    rows = sorted(sizes | {max_micro_batch})
    return {"rows": rows, "repeats": max(2, steps // len(rows))}


def gateway_profile(measured: dict, inputs: PlannerInputs, plan: PlanStatus) -> GatewayProfile:
    """The gateway's measurements in the planner's terms: its transport time less what the links
    themselves take (half their round trip and the bytes, per crossing of ``plan``), shared out
    over the crossings, is each crossing's fixed cost ``o``; its turnaround less the drafting in it
    (costed on its own, as speculation's ``draft_s``) is the round's own overhead ``g``."""
    nodes = {node.name: node for node in inputs.nodes}
    order = [stage.node for stage in plan.stages]
    flight = 0.0
    crossings = 0
    for leg in legs(inputs.profile, nodes, order, tuple(plan.relay_hops)):
        for source, target, per_token, codecs in leg:
            flight += hop(inputs.links.get(source, target), per_token, codecs)[0]
            crossings += 1
    transport = float(measured.get("transportMs", 0.0))

    def less_drafting(turnaround_ms: float) -> float:
        return round(max(0.0, float(turnaround_ms) - float(measured.get("draftMsPerRound") or 0.0)), 4)

    return GatewayProfile(frame_ms=round(max(0.0, transport - flight * 1000) / max(1, crossings), 4),
                          round_overhead_ms=less_drafting(measured.get("turnaroundMs") or 0.0),
                          alone_overhead_ms=less_drafting(measured["rowTurnaroundMs"])
                          if "rowTurnaroundMs" in measured else None,
                          transport_ms=transport,
                          steps=int(measured.get("steps", 0)), measured_at=measured.get("measuredAt"),
                          tokens_per_round=measured.get("tokensPerRound"),
                          drafted_per_round=measured.get("draftedPerRound"),
                          draft_ms=measured.get("draftMsPerRound"),
                          prefill_per_round=measured.get("prefillPerRound"),
                          prompt_positions=measured.get("promptPositions") or None)  # fmt: skip


def at_load(plan: PlanStatus, inputs: PlannerInputs, concurrency: int) -> Plan:
    """The running ``plan`` costed with ``concurrency`` generations in flight (at most the
    sequences it admits), split into steps as the gateway splits them (gateway/batching.py):
    while no more generations run than steps keep the slowest stage busy over a round (C / beta),
    each row is a step of its own; beyond that, ceil(generations / m) steps share them evenly."""
    current = plan_from_status(plan)
    assert current is not None
    active = max(1, min(concurrency, plan.max_sequences or plan.batch, plan.batch))
    nodes = {node.name: node for node in inputs.nodes}

    def costed(micro_batch: float, batch: int) -> Plan:
        return evaluate(inputs.profile, nodes, inputs.links, [s.node for s in current.stages],
                        [s.layers[1] - s.layers[0] for s in current.stages], micro_batch, batch,  # type: ignore[arg-type]
                        inputs.workload.context, offloads=[(s.offload_weights, s.offload_kv) for s in current.stages],
                        method=current.method, options=inputs.options, relay=current.relay_hops,
                        resident=plan.max_sequences)  # fmt: skip

    alone = costed(1, 1)
    fill = math.ceil(alone.cycle_s / alone.bottleneck_s) if alone.bottleneck_s > 0 else 1
    if active <= fill:
        return costed(1, active)
    steps = math.ceil(active / current.micro_batch)
    return costed(active / steps, active)


def decide(resource: DistributedLLM, shape: ModelShape, links: list[LinkStatus], current: PlanStatus | None,
           profiles: ProfilesStatus | None = None) -> tuple[Decision, PlannerInputs]:  # fmt: skip
    """The plan to run: a fresh optimum, or ``current`` kept under hysteresis; and the planner
    inputs it was decided on."""
    inputs = planner_inputs(resource, shape, links, profiles)
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
        tokens_per_round=round(plan.tokens_per_round, 4),
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
                status.round_ms / 1000, status.method, tuple(status.relay_hops), None,
                status.tokens_per_round)  # fmt: skip
