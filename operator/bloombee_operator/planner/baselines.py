"""Baseline placements, costed with the same performance model as the DP (cost.py).

They model the systems we compare against, which neither cut batches into micro-batches nor
offload nor compress: each runs the whole batch as one (m = B) with every weight and KV byte on
the device (the KV of the whole demand, under the latency objective too), and sends hidden
states raw whatever codecs the model profile offers.
By default plans are costed with relay execution (the client forwards every hop), as Petals
and the Petals-like system of Sun et al. run; ``relay=False`` costs the same placement under
BloomBee's push execution, to separate the gain of placement from that of execution.

* equal split: every node (in the order given, at most one per layer) takes an equal share.
* Petals' rule: servers join one by one; each holds as many blocks as its memory allows and
  takes the window whose sorted per-block throughputs are lexicographically smallest (Petals'
  ``choose_best_start``); the client then routes the fastest chain through the windows.
* Sun et al. (arXiv 2512.21884), greedy placement: a conservative block count per server (its
  memory minus the KV reserve of the full batch), servers ranked by per-block time, fastest
  first, blocks covered in that order; then shortest-path routing.
"""

from __future__ import annotations

import math
from dataclasses import replace

from bloombee_contract.codec_cost import RAW

from bloombee_operator.planner.cost import (
    GATEWAY,
    TOKEN_BYTES,
    Links,
    ModelProfile,
    Node,
    Options,
    Plan,
    PlanningError,
    Workload,
    crossing,
    evaluate,
    stage_option,
)
from bloombee_operator.planner.split import equal_split

NO_OFFLOAD = Options(allow_offload=False)


def uncompressed(model: ModelProfile) -> ModelProfile:
    return replace(model, codecs=(RAW,))


def _capacity(model: ModelProfile, node: Node, workload: Workload) -> int:
    """Blocks a server holds with the KV of every sequence the workload keeps resident."""
    per_layer = model.weight_bytes_per_layer + model.kv_bytes_per_token_per_layer * workload.context * workload.batch
    return min(model.num_layers, int(node.memory_bytes // per_layer))


def equal_split_plan(
    model: ModelProfile, nodes: list[Node], links: Links, workload: Workload, options: Options, relay: bool = True
) -> Plan:
    batch = options.effective_batch(workload)
    model = uncompressed(model)
    used = nodes[: model.num_layers]
    spans = [end - start for start, end in equal_split(model.num_layers, len(used))]
    plan = evaluate(model, {n.name: n for n in used}, links, [n.name for n in used], spans, batch, batch,
                    workload.context, method="equal-split", options=NO_OFFLOAD, relay=relay,
                    resident=workload.batch)  # fmt: skip
    if math.isinf(plan.round_s):
        raise PlanningError("equal split: a stage does not fit its node's memory")
    return plan


def route(model: ModelProfile, nodes: list[Node], links: Links, workload: Workload, batch: int,
          windows: dict[str, tuple[int, int]], method: str, relay: bool) -> Plan:  # fmt: skip
    """The chain through the servers' windows with the least cycle time (Dijkstra over block boundaries).

    A server may serve any contiguous part of its window; each block is served once.
    """
    by_name = {n.name: n for n in nodes}
    model = uncompressed(model)
    # dist[(covered blocks, last server)] = (cycle time so far, previous state, blocks served by last)
    best: dict[tuple[int, str], tuple[float, tuple[int, str] | None, int]] = {(0, GATEWAY): (0.0, None, 0)}
    for covered in range(model.num_layers):
        # every transition covers more blocks, so the states at `covered` are final by now
        for state in [key for key in best if key[0] == covered]:
            cost, _, _ = best[state]
            previous_cluster = GATEWAY if state[1] == GATEWAY else by_name[state[1]].cluster
            for name, (start, end) in windows.items():
                if not start <= covered < end or name == state[1]:
                    continue
                node = by_name[name]
                payload = batch * (TOKEN_BYTES if covered == 0 else model.hidden_bytes_per_token)
                # relayed: back to the client, then out to the next server
                latency, _ = crossing(links, previous_cluster, node.cluster, payload, relay and covered > 0)
                for stop in range(covered + 1, end + 1):
                    seconds = stage_option(model, node, stop - covered, batch, batch, workload.context, 0.0, 0.0,
                                           workload.batch)  # fmt: skip
                    key = (stop, name)
                    total = cost + latency + seconds
                    if total < best.get(key, (math.inf,))[0]:
                        best[key] = (total, state, stop - covered)
    finals = [
        (cost + crossing(links, by_name[name].cluster, GATEWAY, batch * TOKEN_BYTES)[0], (covered, name))
        for (covered, name), (cost, _, _) in best.items()
        if covered == model.num_layers and name != GATEWAY
    ]
    if not finals or math.isinf(min(finals)[0]):
        raise PlanningError(f"{method}: the servers' windows do not cover all {model.num_layers} layers")
    state: tuple[int, str] | None = min(finals)[1]
    order, spans = [], []
    while state is not None and state[1] != GATEWAY:
        _, previous, served = best[state]
        order.append(state[1])
        spans.append(served)
        state = previous
    return evaluate(model, by_name, links, order[::-1], spans[::-1], batch, batch, workload.context,
                    method=method, options=NO_OFFLOAD, relay=relay, resident=workload.batch)  # fmt: skip


def _block_throughput(node: Node, batch: int) -> float:
    return 1.0 / node.layer(batch)


def petals_plan(model: ModelProfile, nodes: list[Node], links: Links, workload: Workload, options: Options,
                relay: bool = True) -> Plan:  # fmt: skip
    batch = options.effective_batch(workload)
    throughput = [0.0] * model.num_layers
    windows: dict[str, tuple[int, int]] = {}
    for node in nodes:  # servers join in the order given
        blocks = _capacity(model, node, workload)
        if blocks < 1:
            continue
        starts = range(model.num_layers - blocks + 1)
        start = min((sorted(throughput[i:i + blocks]), i) for i in starts)[1]  # fmt: skip
        windows[node.name] = (start, start + blocks)
        for block in range(start, start + blocks):
            throughput[block] += _block_throughput(node, batch)
    return route(model, nodes, links, workload, batch, windows, "petals", relay)


def sun_greedy_plan(model: ModelProfile, nodes: list[Node], links: Links, workload: Workload, options: Options,
                    relay: bool = True) -> Plan:  # fmt: skip
    batch = options.effective_batch(workload)
    ranked = sorted(nodes, key=lambda n: n.layer(batch))
    windows: dict[str, tuple[int, int]] = {}
    next_block = 0
    for node in ranked:
        if next_block >= model.num_layers:
            break
        blocks = _capacity(model, node, workload)
        if blocks < 1:
            continue
        windows[node.name] = (next_block, min(model.num_layers, next_block + blocks))
        next_block = windows[node.name][1]
    return route(model, nodes, links, workload, batch, windows, "sun-greedy", relay)


BASELINES = {"equal-split": equal_split_plan, "petals": petals_plan, "sun-greedy": sun_greedy_plan}
