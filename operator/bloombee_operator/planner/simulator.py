"""A discrete-event simulator of a planned pipeline, CPU only, on the planner's own cost model.

Requests arrive as a Poisson process and wait for a seat. The pipeline has n micro-batch slots
of m seats each (the plan's n and m); a slot with at least one occupant travels round the cycle
gateway -> stage 1 -> ... -> stage P -> gateway (through the gateway between stages when the
plan relays), each stage a FIFO server taking
``cost.stage_option`` seconds for the slot's current occupancy, each link a FIFO wire busy for
bytes / bandwidth plus half the round-trip time of flight. Back at the gateway every occupant
gets one token; finished requests leave and waiting ones take their seats (continuous
batching). Prompts are costed as the planner costs them (``Options.layer_seconds``: their
measured share of every step, packed or as steps of their own), not as events of their own.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from dataclasses import dataclass, field

from bloombee_operator.planner.cost import Links, ModelProfile, Node, Options, Plan, hop, legs, stage_option


@dataclass
class SimulationResult:
    tokens_per_second: float
    mean_token_latency_s: float  # time between two tokens of one request
    p95_token_latency_s: float
    mean_queue_wait_s: float
    completed_requests: int
    simulated_s: float


@dataclass
class _Request:
    arrival: float
    remaining: float
    seated_at: float = 0.0
    last_token_at: float = 0.0
    tokens: float = 0.0
    gaps: list[float] = field(default_factory=list)


def simulate(
    plan: Plan, model: ModelProfile, nodes: dict[str, Node], links: Links, context: int,
    arrival_rate: float, requests: int = 200, tokens_per_request: int = 32, seed: int = 0,
    options: Options | None = None,
) -> SimulationResult:  # fmt: skip
    """Run ``requests`` requests of ``tokens_per_request`` tokens arriving at ``arrival_rate`` per second.

    With ``options`` their measured terms apply: the gateway's part of each round, and stages of a
    shared host slowed while more of its stages compute at once than it does in parallel.
    """
    options = options or Options()
    rng = random.Random(seed)
    seats = math.ceil(plan.micro_batch)
    slots: list[list[_Request]] = [[] for _ in range(math.ceil(plan.batch / plan.micro_batch))]
    waiting: list[_Request] = []
    stage_free = [0.0] * len(plan.stages)
    link_free: dict[tuple[int, int], float] = {}
    trip = legs(model, nodes, [stage.node for stage in plan.stages], plan.relay_hops)
    events: list[tuple[float, int, str, int, int]] = []  # (time, tie, kind, slot, position)
    tie = 0
    clock = 0.0
    for _ in range(requests):
        clock += rng.expovariate(arrival_rate)
        events.append((clock, tie := tie + 1, "arrive", -1, 0))
    heapq.heapify(events)
    finished: list[_Request] = []
    moving = [False] * len(slots)

    def cross(position: int, now: float, occupants: int) -> float:
        """Send a slot over the leg into ``position`` (each crossing a FIFO wire); return its arrival time."""
        for crossing, (source, target, per_token, codecs) in enumerate(trip[position]):
            latency, busy = hop(links.get(source, target), options.step_tokens(occupants) * per_token, codecs,
                                links.frame_s)  # fmt: skip
            start = max(now, link_free.get((position, crossing), 0.0))
            link_free[(position, crossing)] = start + busy
            now = start + latency
        return now

    def seat_and_go(slot: int, now: float) -> None:
        nonlocal tie
        while waiting and len(slots[slot]) < seats and sum(map(len, slots)) < plan.batch:
            request = waiting.pop(0)
            request.seated_at = request.last_token_at = now
            slots[slot].append(request)
        if slots[slot] and not moving[slot]:
            moving[slot] = True
            heapq.heappush(events, (cross(0, now, len(slots[slot])), tie := tie + 1, "stage", slot, 0))

    while events:
        now, _, kind, slot, position = heapq.heappop(events)
        if kind == "arrive":
            request = _Request(arrival=now, remaining=tokens_per_request)
            waiting.append(request)
            for index in range(len(slots)):
                seat_and_go(index, now)
            continue
        occupants = len(slots[slot])
        if position < len(plan.stages):
            stage = plan.stages[position]
            node = nodes[stage.node]
            layers = stage.layers[1] - stage.layers[0]
            seconds = stage_option(model, node, layers, occupants, plan.batch, context, stage.offload_weights,
                                   stage.offload_kv, plan.held, options.layer_seconds(node, occupants))  # fmt: skip
            if position == len(plan.stages) - 1:
                seconds += options.head_seconds(node, occupants)
            start = max(now, stage_free[position])
            if node.host in options.host_parallelism:  # the host's other stages computing then share its cores
                busy = sum(1 for other, free in zip(plan.stages, stage_free, strict=True)
                           if free > start and other is not stage and nodes[other.node].host == node.host)  # fmt: skip
                seconds *= max(1.0, (busy + 1) / options.host_parallelism[node.host])
            done = start + seconds
            stage_free[position] = done
            heapq.heappush(events, (cross(position + 1, done, occupants), tie := tie + 1, "stage", slot, position + 1))
            continue
        yielded = options.speculation.tokens_per_round
        for request in slots[slot]:  # back at the gateway: one token each, more with speculation
            request.gaps.append((now - request.last_token_at) / yielded)
            request.last_token_at = now
            request.remaining -= yielded
            request.tokens += yielded
        finished += [r for r in slots[slot] if r.remaining <= 0]
        slots[slot] = [r for r in slots[slot] if r.remaining > 0]
        moving[slot] = False
        seat_and_go(slot, now + options.overhead_s(occupants))

    gaps = sorted(g for r in finished for g in r.gaps)
    first = min(r.arrival for r in finished)
    last = max(r.last_token_at for r in finished)
    return SimulationResult(
        tokens_per_second=sum(r.tokens for r in finished) / (last - first),
        mean_token_latency_s=statistics.fmean(gaps),
        p95_token_latency_s=gaps[int(0.95 * (len(gaps) - 1))],
        mean_queue_wait_s=statistics.fmean(r.seated_at - r.arrival for r in finished),
        completed_requests=len(finished),
        simulated_s=last - first,
    )
