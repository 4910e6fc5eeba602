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

Node order:

* up to ``Options.exact_node_limit`` nodes (default 8): exact, a DP over subsets of nodes
  (state: used set, last node, layers covered), as Held-Karp does for tours;
* beyond: a heuristic. Keep the ``exact_node_limit * 2`` nodes with the best layers-per-second
  score, chain their clusters by nearest round-trip time from the gateway (fastest nodes first
  within a cluster), and run the DP over that fixed order where any node may be skipped.

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


def stage_table(model: ModelProfile, nodes: list[Node], m: int, batch: int, context: int, options: Options):
    """Vectorised cost.best_stage for every node and every layer count: seconds [N, L+1]."""
    layers = np.arange(model.num_layers + 1, dtype=float)[None, :]
    memory = np.array([n.memory_bytes for n in nodes])[:, None]
    a = np.array([n.seconds_per_layer for n in nodes])[:, None]
    b = np.array([n.seconds_per_layer_token for n in nodes])[:, None]
    host = np.array([n.host_bandwidth for n in nodes])[:, None]
    interference = np.array([n.stream_interference for n in nodes])[:, None]
    weights = layers * model.weight_bytes_per_layer
    kv = layers * model.kv_bytes_per_token_per_layer * context * batch
    compute = layers * (a + b * m)
    n = micro_batches(batch, m)
    best = np.full((len(nodes), model.num_layers + 1), INF)
    for f_w in options.offload_choices():
        for f_kv in options.offload_choices():
            fits = weights * (1 - f_w) + kv * (1 - f_kv) <= memory
            streamed = weights * f_w / n + kv * f_kv * m / batch
            stream = streamed / host
            seconds = np.where(fits, np.maximum(compute, stream) + interference * stream, INF)
            best = np.minimum(best, seconds)
    best[:, 0] = INF
    return best


def _tables(model: ModelProfile, nodes: list[Node], links: Links, m: int, batch: int, context: int,
            options: Options) -> _Tables:  # fmt: skip
    count = len(nodes)
    hop_latency, hop_busy = np.zeros((count, count)), np.zeros((count, count))
    relay_latency, relay_busy = np.full((count, count), INF), np.full((count, count), INF)
    in_latency, in_busy, out_latency, out_busy = (np.zeros(count) for _ in range(4))
    hidden = m * model.hidden_bytes_per_token
    by_clusters: dict[tuple[str, str, bool], tuple[float, float]] = {}
    for i, u in enumerate(nodes):
        in_latency[i], in_busy[i] = crossing(links, GATEWAY, u.cluster, m * TOKEN_BYTES)
        out_latency[i], out_busy[i] = crossing(links, u.cluster, GATEWAY, m * TOKEN_BYTES)
        for j, v in enumerate(nodes):
            for via_gateway in (False, True) if options.relay_hops else (False,):
                key = (u.cluster, v.cluster, via_gateway)
                if key not in by_clusters:
                    by_clusters[key] = crossing(links, u.cluster, v.cluster, hidden, via_gateway, model.codecs)
                if via_gateway:
                    relay_latency[i, j], relay_busy[i, j] = by_clusters[key]
                else:
                    hop_latency[i, j], hop_busy[i, j] = by_clusters[key]
    stage = stage_table(model, nodes, m, batch, context, options)
    return _Tables(stage, hop_latency, hop_busy, relay_latency, relay_busy, in_latency, in_busy, out_latency,
                   out_busy)  # fmt: skip


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


def _best_chain(tables: _Tables, tau: float, order_free: bool) -> tuple[float, list[tuple[int, int]]]:
    """Minimum cycle time C with every stage and link <= tau: (C, [(node index, layers), ...]).

    order_free: DP over subsets (any order); otherwise nodes keep their index order and may be skipped.
    States are (used set, last node) -- or (last node, last node) in a fixed order -- each holding the
    best cost for every number of layers covered, with parent pointers. A state is expanded only after
    every state that can lead to it: by the number of nodes used, or by node index in a fixed order.
    """
    count, width = tables.stage.shape
    layers = width - 1
    stage = np.where(tables.stage <= tau, tables.stage, INF)
    grow = [_toeplitz(stage[v]) for v in range(count)]
    hop_latency, _ = _hops_under(tables, tau)
    best: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    by_rank: dict[int, list[tuple[int, int]]] = {}

    def relax(key: tuple[int, int], values: np.ndarray, parent: int, covered_before: np.ndarray) -> None:
        current = best.get(key)
        if current is None:
            best[key] = (values, np.full(width, parent), covered_before)
            by_rank.setdefault(bin(key[0]).count("1") if order_free else key[1], []).append(key)
            return
        better = values < current[0]
        current[0][better] = values[better]
        current[1][better] = parent
        current[2][better] = covered_before[better]

    for v in range(count):
        if tables.in_busy[v] <= tau:
            relax((1 << v if order_free else v, v), tables.in_latency[v] + stage[v], -1, np.zeros(width, dtype=int))
    for rank in range(count + 1):
        for used, u in by_rank.get(rank, []):
            costs = best[(used, u)][0]
            if not np.isfinite(costs[:layers]).any():
                continue
            targets = [v for v in range(count) if not used >> v & 1] if order_free else range(u + 1, count)
            for v in targets:
                if np.isfinite(hop_latency[u, v]):
                    values, covered_before = _min_plus(costs + hop_latency[u, v], grow[v])
                    relax((used | 1 << v, v) if order_free else (v, v), values, u, covered_before)
    finished_value, finished_key = INF, None
    for key, (costs, _, _) in best.items():
        total = costs[layers] + tables.out_latency[key[1]]
        if tables.out_busy[key[1]] <= tau and total < finished_value:
            finished_value, finished_key = total, key
    if finished_key is None:
        return INF, []
    return finished_value, _unwind(best, finished_key, layers, order_free)


def _unwind(best, key, layers: int, order_free: bool) -> list[tuple[int, int]]:
    chain = []
    covered = layers
    while True:
        used, v = key
        _, parents, previous_covered = best[key]
        parent = int(parents[covered])
        before = int(previous_covered[covered]) if parent >= 0 else 0
        chain.append((v, covered - before))
        if parent < 0:
            break
        key = (used & ~(1 << v), parent) if order_free else (parent, parent)
        covered = before
    return chain[::-1]


def _candidate_taus(tables: _Tables) -> np.ndarray:
    relay = tables.relay_busy[np.isfinite(tables.relay_busy)]
    values = np.concatenate([tables.stage[np.isfinite(tables.stage)], tables.hop_busy.ravel(), relay, tables.in_busy])
    return np.unique(values)


def _plan_for_micro_batch(tables: _Tables, n: int, order_free: bool) -> tuple[float, list[tuple[int, int]], float]:
    """Bisection over tau for min max(C(tau), n * tau); returns (value, chain, tau)."""
    taus = _candidate_taus(tables)
    if taus.size == 0:
        return INF, [], INF
    top_value, top_chain = _best_chain(tables, taus[-1], order_free)
    if not top_chain:
        return INF, [], INF
    low, high = 0, taus.size - 1  # invariant: at taus[high], n * tau >= C(tau) or high is the last
    best_value, best_chain, best_tau = max(top_value, n * taus[-1]), top_chain, taus[-1]
    while low < high:
        mid = (low + high) // 2
        value, chain = _best_chain(tables, taus[mid], order_free)
        if chain and max(value, n * taus[mid]) < best_value:
            best_value, best_chain, best_tau = max(value, n * taus[mid]), chain, taus[mid]
        if not chain or value > n * taus[mid]:
            low = mid + 1
        else:
            high = mid
    for index in (low - 1, low):  # the minimum sits at the crossing or just before it
        if index < 0:
            continue
        value, chain = _best_chain(tables, taus[index], order_free)
        if chain and max(value, n * taus[index]) < best_value:
            best_value, best_chain, best_tau = max(value, n * taus[index]), chain, taus[index]
    return best_value, best_chain, best_tau


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


def plan(model: ModelProfile, nodes: list[Node], links: Links, workload: Workload, options: Options) -> Plan:
    """The best plan under the performance model; raises PlanningError when nothing fits."""
    if not nodes:
        raise PlanningError("no nodes to plan on")
    batch = options.effective_batch(workload)
    exact = len(nodes) <= options.exact_node_limit
    candidates = nodes if exact else heuristic_order(nodes, links, model, 2 * options.exact_node_limit)
    best: tuple[float, int, list[tuple[int, int]], tuple[bool, ...]] = (INF, 0, [], ())
    for m in micro_batch_sizes(batch, options.max_micro_batch):
        tables = _tables(model, candidates, links, m, batch, workload.context, options)
        value, chain, tau = _plan_for_micro_batch(tables, micro_batches(batch, m), order_free=exact)
        if chain and value < best[0]:
            _, relayed = _hops_under(tables, tau)
            flags = tuple(bool(relayed[u, v]) for (u, _), (v, _) in itertools.pairwise(chain))
            best = (value, m, chain, flags)
    if not best[2]:
        raise PlanningError(_shortfall(model, nodes, workload, options))
    _, m, chain, flags = best
    by_name = {n.name: n for n in nodes}
    order = [candidates[i].name for i, _ in chain]
    spans = [layers for _, layers in chain]
    return evaluate(model, by_name, links, order, spans, m, batch, workload.context,
                    method="dp-exact" if exact else "dp-heuristic", options=options, relay=flags)  # fmt: skip


def _shortfall(model: ModelProfile, nodes: list[Node], workload: Workload, options: Options) -> str:
    min_offload = max(options.offload_choices())
    per_layer = model.weight_bytes_per_layer * (1 - min_offload) + model.kv_bytes_per_token_per_layer * (
        workload.context * options.effective_batch(workload) * (1 - min_offload)
    )
    needed = per_layer * model.num_layers
    have = sum(n.memory_bytes for n in nodes)
    gib = 1 << 30
    return (
        f"the model does not fit: {model.num_layers} layers need {needed / gib:.2f} GiB of device memory "
        f"(with the most offloading allowed), the {len(nodes)} nodes have {have / gib:.2f} GiB; "
        f"short by {max(needed - have, 0) / gib:.2f} GiB, or no link is fast enough"
    )
