"""From a DistributedLLM and its measured links to a plan, and back: the planner's glue (pure).

The operator and ``bloombee up`` both call ``decide``: it builds the planner's inputs from the
resource (node hints, ``planner`` settings, ``compression``) and ``status.links``, runs the DP,
and weighs the result against the plan in ``status.plan`` with the resource's hysteresis
(``planner.minGain``), so a plan is replaced only for a clear gain or when it cannot run any
more. ``plan_status`` / ``plan_from_status`` convert a plan to and from ``status.plan``; state
lives in status, never in the operator's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.desired import StagePlan
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import Links, ModelProfile, Node, Options, Plan, Workload
from bloombee_operator.planner.cost import StageChoice
from bloombee_operator.planner.inputs import (
    GIB,
    links_from_entries,
    nodes_from_resource,
    parse_links,
    profile_from_config,
)
from bloombee_operator.planner.replan import Decision, replan


@dataclass(frozen=True)
class PlannerInputs:
    profile: ModelProfile
    nodes: list[Node]
    links: Links
    workload: Workload
    options: Options


def planner_inputs(resource: DistributedLLM, shape: ModelShape, links: list[dict]) -> PlannerInputs:
    spec = resource.spec
    profile = profile_from_config(shape.config(), spec.model.dtype, spec.compression)
    nodes = nodes_from_resource(resource, profile)
    clusters = [cluster.name for cluster in spec.clusters]
    options = Options(objective=spec.planner.objective, max_micro_batch=spec.planner.max_micro_batch,
                      allow_offload=spec.planner.allow_offload)  # fmt: skip
    workload = Workload(batch=spec.planner.concurrency, context=spec.planner.context_tokens)
    return PlannerInputs(profile, nodes, links_from_entries(parse_links(links), clusters), workload, options)


def decide(resource: DistributedLLM, shape: ModelShape, links: list[dict],
           current: dict | None) -> tuple[Decision, PlannerInputs]:  # fmt: skip
    """The plan to run: a fresh optimum, or ``current`` (a ``status.plan``) kept under hysteresis;
    and the planner inputs it was decided on."""
    inputs = planner_inputs(resource, shape, links)
    decision = replan(plan_from_status(current), inputs.profile, inputs.nodes, inputs.links, inputs.workload,
                      inputs.options, min_gain=resource.spec.planner.min_gain)  # fmt: skip
    return decision, inputs


def stage_plans(plan: Plan, inputs: PlannerInputs) -> list[StagePlan]:
    """The plan's stages as reconcile takes them: cluster, span, node, offload and KV budgets.

    A stage's KV budget is what the plan sized it for: its layers' KV for the sequences it holds
    (``Plan.held`` x context), all of it, since offloaded KV is paged through the same cache.
    """
    cluster_of = {node.name: node.cluster for node in inputs.nodes}
    per_layer = inputs.profile.kv_bytes_per_token_per_layer * inputs.workload.context * plan.held
    return [StagePlan(cluster_of[s.node], s.layers, s.node, s.offload_weights, s.offload_kv,
                      (s.layers[1] - s.layers[0]) * per_layer / GIB) for s in plan.stages]  # fmt: skip


def admission_note(held: int, asked: int) -> str | None:
    """What users should know when a plan holds fewer sequences than ``planner.concurrency`` asks for."""
    if held >= asked:
        return None
    return (f"admits {held} of the {asked} sequences asked for at once (more would not fit or "
            "would cost more than they bring); the rest wait at the gateway for a seat")  # fmt: skip


def plan_status(plan: Plan, nodes: list[Node] | None = None) -> dict:
    """A plan in the shape of the resource's ``status.plan``."""
    cluster_of = {node.name: node.cluster for node in nodes or []}
    return {
        "method": plan.method,
        "microBatch": plan.micro_batch,
        "batch": plan.batch,
        "predictedTokensPerSecond": round(plan.tokens_per_second, 3),
        "predictedLatencyMs": round(plan.latency_s * 1000, 3),
        "roundMs": round(plan.round_s * 1000, 3),
        "cycleMs": round(plan.cycle_s * 1000, 3),
        "bottleneckMs": round(plan.bottleneck_s * 1000, 3),
        "relayHops": list(plan.relay_hops),
        "stages": [
            {
                "node": s.node,
                **({"cluster": cluster_of[s.node]} if s.node in cluster_of else {}),
                "layers": list(s.layers),
                "offload": {"weights": s.offload_weights, "kv": s.offload_kv},
                "predictedMs": round(s.seconds * 1000, 3),
            }
            for s in plan.stages
        ],
    }


def plan_from_status(status_plan: dict | None) -> Plan | None:
    """The plan in ``status.plan`` (as ``plan_status`` wrote it), or None when there is none."""
    if not status_plan or not status_plan.get("stages"):
        return None
    try:
        stages = tuple(
            StageChoice(
                s["node"], (int(s["layers"][0]), int(s["layers"][1])), float(s["offload"]["weights"]),
                float(s["offload"]["kv"]), float(s.get("predictedMs", 0)) / 1000,
            )
            for s in status_plan["stages"]
        )  # fmt: skip
        return Plan(
            stages, int(status_plan["microBatch"]), int(status_plan["batch"]),
            float(status_plan.get("cycleMs", 0)) / 1000, float(status_plan.get("bottleneckMs", 0)) / 1000,
            float(status_plan["roundMs"]) / 1000, status_plan.get("method", "dp"),
            tuple(bool(flag) for flag in status_plan.get("relayHops", ())),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, IndexError):
        return None  # a plan written by another version: plan afresh
