"""The dynamic program: nodes, their order, layer spans, micro-batch size and offloads, jointly.

For one micro-batch size m the round time is T = max(C, n * beta) (see cost.py): C is a sum
over the pipeline, beta a maximum. The DP handles the maximum with a threshold: for a bound
``tau`` it allows only stages and links whose per-micro-batch time is <= tau and minimises C;
call the result C(tau). C(tau) never increases with tau and n * tau always does, so
max(C(tau), n * tau) over the sorted candidate values of tau (every stage time and link busy
time that can occur) is smallest where the two cross, found by bisection. Each stage's offload
choice is the fastest one that fits (cost.best_stage), because T never decreases when any
stage gets slower. Likewise each hop between stages takes the faster of the direct link and the
path through the gateway among those whose links stay within tau. Micro-batch sizes tried:
m = ceil(B / n) for every n, the only sizes that are not beaten by a smaller m with the same n.

Admission (objective throughput): B is chosen too, the number on ``batch_sizes`` (a grid up to
the demand) that gives the most tokens/s B / T. Admitting fewer than the demand is right when
the demand's KV would need offloading or far nodes that cost more than the extra sequences
bring, and it turns a demand that does not fit at all into a plan for what does. Sizes are tried
best bound first (``_rate_ceiling``, a cheap upper bound on tokens/s from the trip, compute and
streaming a round needs), and the search stops at the first size whose bound the best plan so
far reaches. Within a size, a round slower than B / (best tokens/s so far) cannot win: that is
the incumbent the bisection starts from. Under the latency objective one conversation is timed
(B = 1) while the stages hold the KV of the whole demand (``Options.held``).

Node order:

* up to ``Options.exact_node_limit`` nodes (default 12): exact, a DP over subsets of nodes
  (state: used set, last node, layers covered), as Held-Karp does for tours, vectorised over the
  sets of one size and pruned by the in-order DP's chain as a bound; micro-batch sizes and
  thresholds that cannot beat the best plan so far are skipped (12 nodes: 0.6-1 s here);
* beyond: a heuristic. Keep the ``exact_node_limit * 2`` nodes with the best layers-per-second
  score, chain their clusters by nearest round-trip time from the gateway (fastest nodes first
  within a cluster), and run the DP over that fixed order where any node may be skipped.

Stages on a shared host (cost.py's host bound) are not a DP dimension: each chain the DP finds for
a micro-batch size is held to its host bound before sizes are compared, and the DP runs again on
the first k nodes for every k, since the bound can favour fewer stages than the cycle does.
Among alike nodes of one host (``bloombee up``) that is exact (tested against brute force);
across unlike nodes of one host it can miss a split that balances the host better.

Layers are assumed alike (the same cost per layer), which holds for decoder-only transformers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

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
    micro_batches,
)

INF = math.inf


@dataclass
class _Tables:
    """Per-micro-batch costs of one candidate node set, as arrays."""

    stage: np.ndarray  # [N, L+1] seconds for l layers (inf where it does not fit; column 0 unused)
    hop_latency: np.ndarray  # [N, N] direct
    hop_busy: np.ndarray  # [N, N]
    relay_latency: np.ndarray  # [N, N] through the gateway (inf when relaying is not allowed)
    relay_busy: np.ndarray
    in_latency: np.ndarray  # [N] gateway -> node
    in_busy: np.ndarray
    out_latency: np.ndarray  # [N] node -> gateway
    out_busy: np.ndarray
    twin_before: np.ndarray  # [N] the previous node alike in every respect (cluster, memory, speeds), or -1
    stage_last: np.ndarray  # [N, L+1] as ``stage``, for the last stage: its LM head included


def stage_table(model: ModelProfile, nodes: list[Node], m: int, batch: int, context: int, options: Options,
                resident: int):  # fmt: skip
    """Vectorised cost.best_stage for every node and every layer count: seconds [N, L+1]."""
    layers = np.arange(model.num_layers + 1, dtype=float)[None, :]
    memory = np.array([n.memory_bytes for n in nodes])[:, None]
    per_layer = np.array([options.layer_seconds(n, m) for n in nodes])[:, None]
    host = np.array([n.host_bandwidth for n in nodes])[:, None]
    interference = np.array([n.stream_interference for n in nodes])[:, None]
    weights = layers * model.weight_bytes_per_layer
    kv = layers * model.kv_bytes_per_token_per_layer * context * resident
    step = np.array([n.step_seconds for n in nodes])[:, None]
    compute = layers * per_layer + step
    n = micro_batches(batch, m)
    best = np.full((len(nodes), model.num_layers + 1), INF)
    for f_w in options.offload_choices():
        for f_kv in options.offload_choices():
            fits = weights * (1 - f_w) + kv * (1 - f_kv) <= memory
            streamed = weights * f_w / n + kv * f_kv * m / resident
            stream = streamed / host
            seconds = np.where(fits, np.maximum(compute, stream) + interference * stream, INF)
            best = np.minimum(best, seconds)
    best[:, 0] = INF
    return best


def _tables(model: ModelProfile, nodes: list[Node], links: Links, m: int, batch: int, context: int,
            options: Options, resident: int) -> _Tables:  # fmt: skip
    count = len(nodes)
    hop_latency, hop_busy = np.zeros((count, count)), np.zeros((count, count))
    relay_latency, relay_busy = np.full((count, count), INF), np.full((count, count), INF)
    in_latency, in_busy, out_latency, out_busy = (np.zeros(count) for _ in range(4))
    positions = options.step_tokens(m)  # with speculation, each row's draft rides along
    hidden = positions * model.hidden_bytes_per_token
    by_clusters: dict[tuple[str, str, bool], tuple[float, float]] = {}
    for i, u in enumerate(nodes):
        in_latency[i], in_busy[i] = crossing(links, GATEWAY, u.cluster, positions * TOKEN_BYTES)
        out_latency[i], out_busy[i] = crossing(links, u.cluster, GATEWAY, positions * TOKEN_BYTES)
        # the gateway's own part and its drafting: once per round
        out_latency[i] += options.overhead_s(m)
        for j, v in enumerate(nodes):
            for via_gateway in (False, True) if options.relay_hops else (False,):
                key = (u.cluster, v.cluster, via_gateway)
                if key not in by_clusters:
                    by_clusters[key] = crossing(links, u.cluster, v.cluster, hidden, via_gateway, model.codecs)
                if via_gateway:
                    relay_latency[i, j], relay_busy[i, j] = by_clusters[key]
                else:
                    hop_latency[i, j], hop_busy[i, j] = by_clusters[key]
    stage = stage_table(model, nodes, m, batch, context, options, resident)
    last_alike: dict[tuple, int] = {}
    twin_before = np.full(count, -1)
    for i, u in enumerate(nodes):
        alike = (u.cluster, u.memory_bytes, u.seconds_per_layer, u.seconds_per_layer_token, u.host_bandwidth,
                 u.stream_interference, u.step_seconds, u.head_seconds, u.head_seconds_per_token, u.host,
                 u.layer_points, u.head_points)  # fmt: skip
        twin_before[i] = last_alike.get(alike, -1)
        last_alike[alike] = i
    heads = np.array([options.head_seconds(u, m) for u in nodes])[:, None]
    return _Tables(stage, hop_latency, hop_busy, relay_latency, relay_busy, in_latency, in_busy, out_latency,
                   out_busy, twin_before, stage + heads)  # fmt: skip


def _hops_under(tables: _Tables, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the faster of direct and relayed among those whose links stay <= tau; and whether relayed."""
    direct = np.where(tables.hop_busy <= tau, tables.hop_latency, INF)
    relayed = np.where(tables.relay_busy <= tau, tables.relay_latency, INF)
    return np.minimum(direct, relayed), relayed < direct


def _toeplitz(row: np.ndarray) -> np.ndarray:
    """M[i, j] = row[j - i] for j >= i, else inf: adding l layers to i covered layers gives j."""
    size = row.shape[0]
    index = np.arange(size)[None, :] - np.arange(size)[:, None]
    return np.where(index >= 0, row[np.clip(index, 0, size - 1)], INF)


def _min_plus(covered: np.ndarray, grow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best[j], argmin i) of covered[i] + grow[i, j]."""
    total = covered[:, None] + grow
    arg = np.argmin(total, axis=0)
    return total[arg, np.arange(total.shape[1])], arg


def _best_chain(tables: _Tables, tau: float, order_free: bool, ceiling: float = INF,
                ) -> tuple[float, list[tuple[int, int]]]:  # fmt: skip
    """Minimum cycle time C with every stage and link <= tau: (C, [(node index, layers), ...]).

    order_free: any order of any subset of the nodes (``_subsets``, which drops partial chains
    that cannot finish under ``ceiling``); otherwise the nodes keep their index order and may be
    skipped (``_in_order``).
    """
    return _subsets(tables, tau, ceiling) if order_free else _in_order(tables, tau)


def _stage_under(tables: _Tables, tau: float, last: bool = False) -> np.ndarray:
    """Stage times within ``tau``; ``last``: of the stage that serves the last layer, head included."""
    table = tables.stage_last if last else tables.stage
    return np.where(table <= tau, table, INF)


def _finish(tables: _Tables, tau: float, covered_all: np.ndarray) -> tuple[float, tuple[int, ...] | None]:
    """The best way back to the gateway: (C, index of the best state) over states ending at each node."""
    total = covered_all + np.where(tables.out_busy <= tau, tables.out_latency, INF)
    if not np.isfinite(total).any():
        return INF, None
    index = np.unravel_index(int(np.argmin(total)), total.shape)
    return float(total[index]), tuple(int(i) for i in index)


def _subsets(tables: _Tables, tau: float, ceiling: float = INF) -> tuple[float, list[tuple[int, int]]]:
    """Held-Karp over nodes: cost[used set, last node, layers covered], filled by the size of the set.

    A transition appends node v with l layers after node u; per (set size, u) it runs over every
    set holding u and every v outside it at once, and over l only as far as v can hold within tau,
    so the work is numpy-wide rather than Python-deep (12 nodes plan in seconds). States that cannot
    beat the chain the in-order DP finds (their cost plus a lower bound on finishing exceeds it) are
    dropped: a bound, so the result stays exact. So are states that cannot finish under ``ceiling``
    (what the caller can use at all); then nothing, or a chain under it, is returned.
    """
    count, width = tables.stage.shape
    layers = width - 1
    stage = _stage_under(tables, tau)
    stage_last = _stage_under(tables, tau, last=True)
    bound, _ = _in_order(tables, tau)
    bound = min(bound, ceiling)
    fastest = _cheapest_layer(stage)
    if math.isinf(fastest):
        return INF, []
    finishing = (layers - np.arange(width)) * fastest + float(tables.out_latency.min())
    hopeless = (bound + 1e-9 * abs(bound) - finishing) if np.isfinite(bound) else np.full(width, INF)
    capacity = [int(np.flatnonzero(np.isfinite(stage[v]))[-1]) if np.isfinite(stage[v]).any() else 0
                for v in range(count)]  # fmt: skip
    hop_latency, _ = _hops_under(tables, tau)
    size = 1 << count
    cost = np.full((size, count, width), INF)
    parent = np.full((size, count, width), -1, dtype=np.int16)
    taken = np.zeros((size, count, width), dtype=np.int16)  # layers the last node serves
    # Nodes alike are interchangeable: a chain uses them in index order (any other order is the
    # same chain relabelled), so v may join only once its previous twin is in the set.
    twin_bits = np.where(tables.twin_before >= 0, 1 << np.maximum(tables.twin_before, 0), 0)
    for v in range(count):
        if tables.in_busy[v] <= tau and tables.twin_before[v] < 0:
            cost[1 << v, v] = tables.in_latency[v] + stage[v]
            cost[1 << v, v, layers] = tables.in_latency[v] + stage_last[v, layers]
            taken[1 << v, v] = np.arange(width)
    masks = np.arange(size)
    ranks = np.array([bin(mask).count("1") for mask in range(size)])
    bits = 1 << np.arange(count)
    for rank in range(1, count):
        at_rank = masks[ranks == rank]
        for u in range(count):
            used = at_rank[(at_rank >> u) & 1 == 1]
            rows = cost[used, u]
            alive = np.isfinite(rows[:, :layers]).any(axis=1)
            used, rows = used[alive], rows[alive]
            targets = np.flatnonzero(np.isfinite(hop_latency[u]))
            if not used.size or not targets.size:
                continue
            # every (set, v outside it) pair: the set grown by v, and the cost on arrival at v
            outside = (used[:, None] & bits[targets][None, :]) == 0
            twin_in = (used[:, None] & twin_bits[targets][None, :]) == twin_bits[targets][None, :]
            pair_set, pair_v = np.nonzero(outside & twin_in)
            if not pair_set.size:
                continue
            v = targets[pair_v]
            arrive = rows[pair_set] + hop_latency[u, v][:, None]
            # candidates[p, j, k]: arrive with j - (reach - k) layers covered, v serving reach - k more
            reach = max(capacity[t] for t in targets)
            padded = np.concatenate([np.full((arrive.shape[0], reach), INF), arrive], axis=1)
            windows = np.lib.stride_tricks.sliding_window_view(padded, reach + 1, axis=1)
            candidates = windows + stage[v, reach::-1][:, None, :]
            candidates[:, layers, :] = windows[:, layers, :] + stage_last[v, reach::-1]  # v serves the last layer
            pick = candidates.argmin(axis=2)
            best = np.take_along_axis(candidates, pick[:, :, None], axis=2)[:, :, 0]
            best_l = reach - pick
            best[best > hopeless] = INF
            grown = used[pair_set] | bits[v]
            current = cost[grown, v]
            better = best < current
            cost[grown, v] = np.where(better, best, current)
            parent[grown, v] = np.where(better, u, parent[grown, v])
            taken[grown, v] = np.where(better, best_l, taken[grown, v])
    value, state = _finish(tables, tau, cost[:, :, layers])
    if state is None:
        return INF, []
    used, v = state
    chain, covered = [], layers
    while True:
        served = int(taken[used, v, covered])
        chain.append((v, served))
        previous = int(parent[used, v, covered])
        if previous < 0:
            break
        used, v, covered = used & ~(1 << v), previous, covered - served
    return value, chain[::-1]


def _in_order(tables: _Tables, tau: float) -> tuple[float, list[tuple[int, int]]]:
    """Nodes in index order, any of them skipped: cost[last node, layers covered], node by node."""
    count, width = tables.stage.shape
    layers = width - 1
    stage = _stage_under(tables, tau)
    stage_last = _stage_under(tables, tau, last=True)
    grow = [_toeplitz(stage[v]) for v in range(count)]
    for v in range(count):  # arriving at the last layer, v serves it: its head included
        grow[v][:, layers] = _toeplitz(stage_last[v])[:, layers]
    hop_latency, _ = _hops_under(tables, tau)
    cost = np.full((count, width), INF)
    parent = np.full((count, width), -1, dtype=int)
    before = np.zeros((count, width), dtype=int)
    for v in range(count):
        if tables.in_busy[v] <= tau:
            cost[v] = tables.in_latency[v] + stage[v]
            cost[v, layers] = tables.in_latency[v] + stage_last[v, layers]
        for u in range(v):  # every u < v is final: all its predecessors came before it
            if np.isfinite(hop_latency[u, v]) and np.isfinite(cost[u, :layers]).any():
                values, covered_before = _min_plus(cost[u] + hop_latency[u, v], grow[v])
                better = values < cost[v]
                cost[v] = np.where(better, values, cost[v])
                parent[v] = np.where(better, u, parent[v])
                before[v] = np.where(better, covered_before, before[v])
    value, state = _finish(tables, tau, cost[:, layers])
    if state is None:
        return INF, []
    (v,) = state
    chain, covered = [], layers
    while True:
        previous = int(parent[v, covered])
        start = int(before[v, covered]) if previous >= 0 else 0
        chain.append((v, covered - start))
        if previous < 0:
            break
        v, covered = previous, start
    return value, chain[::-1]


def _candidate_taus(tables: _Tables) -> np.ndarray:
    relay = tables.relay_busy[np.isfinite(tables.relay_busy)]
    last = tables.stage_last[np.isfinite(tables.stage_last)]
    values = np.concatenate([tables.stage[np.isfinite(tables.stage)], last, tables.hop_busy.ravel(), relay,
                             tables.in_busy])  # fmt: skip
    return np.unique(values)


def _cheapest_layer(stage: np.ndarray) -> float:
    """The lowest seconds per layer any node offers in a stage table (inf when none fits)."""
    per_layer = stage[:, 1:] / np.arange(1, stage.shape[1])
    finite = per_layer[np.isfinite(per_layer)]
    return float(finite.min()) if finite.size else INF


def _cycle_floor(tables: _Tables) -> float:
    """A lower bound on any chain's cycle C: in and out at the nearest nodes, every layer at the
    lowest cost per layer any node offers."""
    layers = tables.stage.shape[1] - 1
    return float(tables.in_latency.min() + tables.out_latency.min()) + layers * _cheapest_layer(tables.stage)


def _plan_for_micro_batch(tables: _Tables, n: int, order_free: bool, incumbent: float = INF,
                          ) -> tuple[float, list[tuple[int, int]], float]:  # fmt: skip
    """Bisection over tau for min max(C(tau), n * tau); returns (value, chain, tau).

    ``incumbent``: the best value another micro-batch size reached. A tau with n * tau above it
    cannot beat it, so those are never tried, and when even the loosest tau left gives a cycle
    C above it, this micro-batch size is done without a bisection.
    """
    taus = _candidate_taus(tables)
    taus = taus[n * taus < incumbent]
    if taus.size == 0 or _cycle_floor(tables) >= incumbent:
        return INF, [], INF
    tried: dict[int, tuple[float, list[tuple[int, int]]]] = {}

    def chain_at(index: int) -> tuple[float, list[tuple[int, int]]]:
        if index not in tried:
            tried[index] = _best_chain(tables, taus[index], order_free, incumbent)
        return tried[index]

    top_value, top_chain = chain_at(taus.size - 1)
    if not top_chain or top_value >= incumbent:  # C(tau) only grows as tau shrinks
        return INF, [], INF
    low, high = 0, taus.size - 1  # invariant: at taus[high], n * tau >= C(tau) or high is the last
    best_value, best_chain, best_tau = max(top_value, n * taus[-1]), top_chain, taus[-1]
    while low < high:
        mid = (low + high) // 2
        value, chain = chain_at(mid)
        if chain and max(value, n * taus[mid]) < best_value:
            best_value, best_chain, best_tau = max(value, n * taus[mid]), chain, taus[mid]
        if not chain or value > n * taus[mid]:
            low = mid + 1
        else:
            high = mid
    for index in (low - 1, low):  # the minimum sits at the crossing or just before it
        if index < 0:
            continue
        value, chain = chain_at(index)
        if chain and max(value, n * taus[index]) < best_value:
            best_value, best_chain, best_tau = max(value, n * taus[index]), chain, taus[index]
    return best_value, best_chain, best_tau


def _chain_relays(tables: _Tables, tau: float, chain: list[tuple[int, int]]) -> list[bool]:
    _, relayed = _hops_under(tables, tau)
    return [bool(relayed[u, v]) for (u, _), (v, _) in itertools.pairwise(chain)]


def micro_batch_sizes(batch: int, max_micro_batch: int) -> list[int]:
    return sorted({math.ceil(batch / n) for n in range(1, batch + 1)} & set(range(1, max_micro_batch + 1)))


def heuristic_order(nodes: list[Node], links: Links, model: ModelProfile, keep: int) -> list[Node]:
    """The ``keep`` best nodes by layers held per second, clusters chained by nearest RTT from the gateway."""

    def score(node: Node) -> float:
        held = min(model.num_layers, node.memory_bytes / max(model.weight_bytes_per_layer, 1.0))
        return held / max(node.seconds_per_layer, 1e-12)

    chosen = sorted(nodes, key=score, reverse=True)[:keep]
    by_cluster: dict[str, list[Node]] = {}
    for node in chosen:
        by_cluster.setdefault(node.cluster, []).append(node)
    ordered: list[Node] = []
    here, remaining = GATEWAY, set(by_cluster)
    while remaining:
        nearest = min(sorted(remaining), key=lambda c: links.get(here, c).rtt_s)
        ordered += sorted(by_cluster[nearest], key=lambda n: n.seconds_per_layer)
        remaining.remove(nearest)
        here = nearest
    return ordered


def batch_sizes(demand: int) -> list[int]:
    """Sequences in flight the planner may admit, largest first: the demand itself, and below it a
    geometric grid of two points per doubling (2^k and 3 * 2^k), the grid the optimum is exact on;
    a demand of thousands stays a few dozen sizes."""
    grid = {size for k in range(demand.bit_length()) for size in (1 << k, 3 << k) if size < demand}
    return sorted({demand} | grid, reverse=True)


def _rate_ceiling(model: ModelProfile, nodes: list[Node], links: Links, batch: int, context: int,
                  options: Options, resident: int) -> float:  # fmt: skip
    """An upper bound on the tokens/s of any plan for ``batch`` sequences on ``nodes``, from three
    lower bounds on the round T (cost.py):

    * a token's trip: into the nearest cluster and back, and every layer at the fastest node;
    * compute: n >= B / m_max micro-batches each pass every layer, on at most min(N, L) stages at once;
    * streaming: what does not fit in all the nodes' memory together is streamed once per round,
      at best over all their host links at once.
    """
    layers = model.num_layers
    trip = 2 * min(links.get(GATEWAY, node.cluster).rtt_s / 2 for node in nodes) + layers * min(
        node.layer(1) for node in nodes
    )
    if any(node.layer_points for node in nodes):  # measured points: the cheapest token any step size gives
        sizes = range(1, min(options.max_micro_batch, batch) + 1)
        compute = layers * batch * min(node.layer(m) / m for node in nodes for m in sizes) / min(len(nodes), layers)
    else:
        fastest_a = min(node.seconds_per_layer for node in nodes)
        fastest_b = min(node.seconds_per_layer_token for node in nodes)
        micro = math.ceil(batch / min(options.max_micro_batch, batch))
        compute = layers * (micro * fastest_a + batch * fastest_b) / min(len(nodes), layers)
    needed = layers * (model.weight_bytes_per_layer + model.kv_bytes_per_token_per_layer * context * resident)
    over = max(0.0, needed - sum(node.memory_bytes for node in nodes))
    if over and max(options.offload_choices()) == 0:
        return 0.0
    stream = over / sum(node.host_bandwidth for node in nodes)
    return batch / max(trip, compute, stream, 1e-12)


def plan(model: ModelProfile, nodes: list[Node], links: Links, workload: Workload, options: Options) -> Plan:
    """The best plan under the performance model; raises PlanningError when nothing fits.

    Under the throughput objective ``workload.batch`` is the demand: how many sequences users keep
    in flight. The plan admits the number on ``batch_sizes`` that gives the most tokens/s, which is
    fewer than the demand when more would not fit or would cost more than they bring (offloading
    their KV, a far node); the rest wait at the gateway. ``Plan.batch`` is the number admitted.
    """
    if not nodes:
        raise PlanningError("no nodes to plan on")
    demand = options.effective_batch(workload)
    exact = len(nodes) <= options.exact_node_limit
    candidates = nodes if exact else heuristic_order(nodes, links, model, 2 * options.exact_node_limit)
    best_rate, best = 0.0, None
    # A shared host's bound favours fewer stages (less work outside the layers) where the DP,
    # minimising the cycle, would spread layers over every node: try the first k nodes too.
    pools = [candidates] + ([candidates[:k] for k in range(1, len(candidates))] if options.host_parallelism else [])
    ceilings = {batch: _rate_ceiling(model, candidates, links, batch, workload.context, options,
                                     options.held(workload, batch)) for batch in batch_sizes(demand)}  # fmt: skip
    for batch in sorted(ceilings, key=lambda size: (-ceilings[size], -size)):  # most promising first
        if ceilings[batch] <= best_rate:
            break  # neither this size nor any after it can do better
        for m, pool in itertools.product(micro_batch_sizes(batch, options.max_micro_batch), pools):
            tables = _tables(model, pool, links, m, batch, workload.context, options,
                             options.held(workload, batch))  # fmt: skip
            # a round slower than this gives fewer tokens/s than the best plan so far
            incumbent = batch / best_rate if best_rate else INF
            value, chain, tau = _plan_for_micro_batch(tables, micro_batches(batch, m), exact, incumbent)
            if chain and options.host_parallelism:
                # what the DP leaves out, a shared host's bound: the chain's exact round, so sizes and
                # pools compare on what the plan costs
                value = evaluate(model, {n.name: n for n in pool}, links, [pool[i].name for i, _ in chain],
                                 [layers for _, layers in chain], m, batch, workload.context, options=options,
                                 relay=tuple(bool(r) for r in _chain_relays(tables, tau, chain)),
                                 resident=options.held(workload, batch)).round_s  # fmt: skip
            if chain and batch / value > best_rate:
                flags = tuple(_chain_relays(tables, tau, chain))
                order = [pool[i].name for i, _ in chain]
                best_rate, best = batch / value, (batch, m, chain, flags, order)
    if best is None:
        raise PlanningError(_shortfall(model, nodes, workload.context, options.held(workload, 1), options))
    batch, m, chain, flags, order = best
    by_name = {n.name: n for n in nodes}
    spans = [layers for _, layers in chain]
    return evaluate(model, by_name, links, order, spans, m, batch, workload.context,
                    method="dp-exact" if exact else "dp-heuristic", options=options, relay=flags,
                    resident=options.held(workload, batch))  # fmt: skip


def _shortfall(model: ModelProfile, nodes: list[Node], context: int, sequences: int, options: Options) -> str:
    most_offload = max(options.offload_choices())
    kv = model.kv_bytes_per_token_per_layer * context * sequences
    needed = (model.weight_bytes_per_layer + kv) * (1 - most_offload) * model.num_layers
    have = sum(n.memory_bytes for n in nodes)
    gib = 1 << 30
    held = "a single sequence" if sequences == 1 else f"the KV of {sequences} sequences (planner.concurrency)"
    return (
        f"the model does not fit: {model.num_layers} layers need {needed / gib:.2f} GiB of device memory "
        f"for {held} of {context} tokens (with the most offloading allowed), the {len(nodes)} nodes "
        f"have {have / gib:.2f} GiB; short by {max(needed - have, 0) / gib:.2f} GiB, or no link is fast enough"
    )
