"""Online re-planning: adopt a new plan only for a clear gain, and say which layers move where.

Links are re-measured and nodes come and go; re-planning on every wobble would migrate layers
(seconds to minutes of reloading) for nothing. ``replan`` re-costs the current plan under the new
conditions and adopts the new optimum only when

* the current plan can no longer run (a node of it is gone, or it no longer fits), or
* the new plan predicts at least ``min_gain`` (default 10%) better throughput, or latency under
  the latency objective.

``diff`` lists, per node, the layers it must load and the layers it may drop, so the operator
restarts only the stages whose spans changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bloombee_operator.planner.cost import Links, ModelProfile, Node, Options, Plan, PlanningError, Workload, evaluate
from bloombee_operator.planner.dp import plan as optimal_plan


@dataclass(frozen=True)
class StageMove:
    node: str
    before: tuple[int, int] | None  # None: the node did not serve before
    after: tuple[int, int] | None  # None: the node serves no more
    load: tuple[int, ...]  # layers to load onto the node
    drop: tuple[int, ...]  # layers it no longer needs


@dataclass(frozen=True)
class PlanDiff:
    moves: tuple[StageMove, ...] = field(default_factory=tuple)

    @property
    def layers_to_load(self) -> int:
        return sum(len(move.load) for move in self.moves)

    @property
    def unchanged(self) -> bool:
        return not self.moves


@dataclass(frozen=True)
class Decision:
    plan: Plan
    adopted: bool
    reason: str
    diff: PlanDiff
    current_value: float  # tokens/s (throughput) or seconds per token (latency) of the old plan now
    candidate_value: float


def diff(old: Plan | None, new: Plan) -> PlanDiff:
    before = {s.node: s.layers for s in old.stages} if old else {}
    after = {s.node: s.layers for s in new.stages}
    moves = []
    for node in sorted(set(before) | set(after)):
        was, now = before.get(node), after.get(node)
        if was == now:
            continue
        had = set(range(*was)) if was else set()
        has = set(range(*now)) if now else set()
        moves.append(StageMove(node, was, now, tuple(sorted(has - had)), tuple(sorted(had - has))))
    return PlanDiff(tuple(moves))


def recost(current: Plan, model: ModelProfile, nodes: list[Node], links: Links, workload: Workload,
           options: Options) -> Plan | None:  # fmt: skip
    """The current plan's cost under new conditions, or None when it cannot run any more.

    It keeps the number of sequences it admitted, unless the demand has fallen below it.
    """
    by_name = {n.name: n for n in nodes}
    if any(stage.node not in by_name for stage in current.stages):
        return None
    batch = min(current.batch, options.effective_batch(workload))
    try:
        again = evaluate(model, by_name, links, [s.node for s in current.stages],
                         [s.layers[1] - s.layers[0] for s in current.stages], current.micro_batch, batch,
                         workload.context, offloads=[(s.offload_weights, s.offload_kv) for s in current.stages],
                         method=current.method, options=options, relay=current.relay_hops,
                         resident=options.held(workload, batch))  # fmt: skip
    except PlanningError:
        return None
    return None if math.isinf(again.round_s) else again


def replan(current: Plan | None, model: ModelProfile, nodes: list[Node], links: Links, workload: Workload,
           options: Options, min_gain: float = 0.10) -> Decision:  # fmt: skip
    candidate = optimal_plan(model, nodes, links, workload, options)
    latency = options.objective == "latency"

    def value(p: Plan) -> float:
        return p.latency_s if latency else p.tokens_per_second

    now = recost(current, model, nodes, links, workload, options) if current else None
    if now is None:
        reason = "no current plan" if current is None else "the current plan cannot run any more"
        return Decision(candidate, True, reason, diff(current, candidate), math.nan, value(candidate))
    gain = value(now) / value(candidate) - 1 if latency else value(candidate) / value(now) - 1

    def shown(p: Plan) -> str:
        return f"{p.latency_s * 1000:.1f} ms a token" if latency else f"{p.tokens_per_second:.1f} tokens/s"

    # Both on the same inputs: the current plan's figure at planning time may have come from hints.
    figures = f"on the inputs now, the current plan predicts {shown(now)} and the best {shown(candidate)}"
    if gain >= min_gain:
        reason = f"{figures}: a gain of {gain:.1%} >= {min_gain:.0%}"
        return Decision(candidate, True, reason, diff(current, candidate), value(now), value(candidate))
    reason = f"{figures}: a gain of {gain:.1%} < {min_gain:.0%}, keeping the current plan"
    return Decision(now, False, reason, PlanDiff(), value(now), value(candidate))
