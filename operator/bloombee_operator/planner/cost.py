"""The performance model shared by the planner, the baselines and the simulator.

Notation (SI units: seconds, bytes, bytes/second):

    L            transformer layers, all alike (same weights and cost per layer)
    w            weight bytes of one layer
    k            KV-cache bytes per token per layer
    h            hidden-state bytes per token (raw; compression is a per-hop choice, below)
    B, S         the workload: B sequences in flight, S tokens of context each
    m            micro-batch size; n = ceil(B / m) micro-batches flow through the pipeline
    node u:      M_u device memory, a_u + b_u * m seconds per layer for a micro-batch of m
                 tokens (a_u: reading the weights, b_u: per-token compute), H_u host/disk
                 bandwidth for offloaded weights and KV
    link u->v:   rtt_uv, bw_uv (the gateway is node "gateway" in the link matrix)

A stage is node u serving l contiguous layers with weight offload fraction f_w and KV offload
fraction f_kv (fractions of the stage's bytes kept in host memory or on disk):

    device memory   l * w * (1 - f_w) + l * k * S * B * (1 - f_kv)  <=  M_u
    compute         l * (a_u + b_u * m)
    streaming       (l * w * f_w / n  +  l * k * S * m * f_kv) / H_u
                    offloaded weights are loaded once per round and serve all n micro-batches
                    (FlexGen's zig-zag order); offloaded KV is paged in per micro-batch
    stage time      t = max(compute, streaming) + i_u * streaming
                    prefetch overlaps the two; i_u is the share of streaming that still
                    delays compute: 0 where a copy engine moves the bytes (GPU), > 0 on a CPU
                    node, where the copy and the layer's own weight reads share memory
                    bandwidth (bench/offload.py measures it)

Measured deployments add what a step costs outside its layers (cost.py's fixed terms, each 0
unless measured, ``planning_inputs`` fills them from the stages' and the gateway's profiles):

    s_u          per step on node u outside its layers (decoding the frame, sessions): stage time + s_u
    head_u(m)    the final norm, LM head and token choice, on the last stage only: g_u + p_u * m
    o            per crossing: HTTP, TLS and (de)serialisation of one frame, added to each hop
    g            the gateway's own part of a round (a step's rows' results to the step leaving:
                 tokens, streaming, drafting, gathering the rows), added to C once; rows that
                 leave alone (micro-batch 1) are not gathered and have a g of their own
    q, P         prompt positions per row and round, and per prompt (the gateway's prompt
                 positions computed over its rounds and its prompts): sequences finish and new ones
                 start, and their prompts take stage time too. A step of m rows carries m * q / P
                 prompts: a short one (P <= SHORT_ROW, as the gateway packs rows) adds P positions
                 to the step it rides, a long one is a step of P positions of its own. Spreading
                 q over every row instead would charge it at the slope of the cost at m rows, which
                 on a CPU jumps from one row to two (GEMV to GEMM)

Stages that share a host (``bloombee up`` runs every stage on one machine) also share its cores:
a host that does ``P_h`` stages' worth of work at once (measured on traffic: its stages' steps
beside each other against the same steps alone; or their profiling run alone and all together)
needs at least n * (sum of its stages' times) / P_h per round, a third bound on T beside C and
n * beta. And with n >= 2 micro-batches in flight its stages compute beside each other, so a
micro-batch's trip is slower too: in C each of the host's stage times counts min(n, k_h) / P_h
times (at least once), k_h the plan's stages there (the simulator slows each step by how many
of them compute at that moment).

A hop u->v costs rtt_uv / 2 + m * h / bw_uv (the gateway sends token ids, 8 bytes a token, and
gets token ids back). A link is busy for m * h / bw_uv of that per micro-batch. With compression,
hidden states of x = m * h bytes cost rtt_uv / 2 + o + x / e + x / (r * bw_uv) + x / d instead
(codec ratio r, encode/decode speeds e/d, per-frame cost o: bloombee_stage.codec_policy, the rule
the stages apply) and keep the link busy for x / (r * bw_uv); each hop takes the fastest of the
model's candidate codecs, which for ``compression: auto`` are raw and every codec. Under relay
execution (Petals: the client forwards every hop) the hop from stage i to stage i+1 is two
crossings, stage i -> gateway -> stage i+1, each carrying the hidden states. BloomBee may relay
single hops the same way where the path through the gateway beats the direct link (internet
paths need not obey the triangle inequality); the planner decides per hop.

One decode round gives every sequence one token. Micro-batches chase each other round the
cycle gateway -> stage 1 -> ... -> stage P -> gateway, so

    C  = sum of stage times + sum of hop times        one micro-batch's trip round the cycle
    beta = max(stage times, link busy times)          the bottleneck resource per micro-batch
    T  = max(C, n * beta, host bounds)                seconds per round
    tokens/s = B / T,   per-token latency = T

Objective "throughput" maximises B / T, with the workload's B as the demand: the plan may
admit fewer sequences (dp.batch_sizes) when that gives more tokens/s. "latency" times a single
sequence (B = 1), where T is the time between two tokens of one conversation, while the device
memory still holds the KV of the whole demand (R sequences resident: S * R in place of S * B
above, and a micro-batch pages in its own share, k * S * m * f_kv per layer).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from bloombee_contract.batching import SHORT_ROW
from bloombee_contract.codec_cost import RAW, CodecProfile, wire_seconds

GATEWAY = "gateway"
TOKEN_BYTES = 8


class PlanningError(ValueError):
    """No plan exists (e.g. the model does not fit); the message says by how much."""


@dataclass(frozen=True)
class ModelProfile:
    num_layers: int
    weight_bytes_per_layer: float
    kv_bytes_per_token_per_layer: float
    hidden_bytes_per_token: float  # raw, before compression
    codecs: tuple[CodecProfile, ...] = (RAW,)  # candidates per hop for hidden states; the fastest is used


@dataclass(frozen=True)
class Node:
    name: str
    cluster: str
    memory_bytes: float
    seconds_per_layer: float  # a: fixed cost per layer per micro-batch (weight reads)
    seconds_per_layer_token: float  # b: extra cost per token in the micro-batch
    host_bandwidth: float = 2e9  # bytes/s for streaming offloaded weights/KV
    stream_interference: float = 0.0  # share of streaming time that also delays compute (CPU nodes: > 0)
    step_seconds: float = 0.0  # s: per step outside the layers
    head_seconds: float = 0.0  # g: the LM head's fixed cost per step, when this node serves the last layer
    head_seconds_per_token: float = 0.0  # p: and per token
    host: str | None = None  # the machine it shares with other nodes (None: a machine of its own)
    # Measured (tokens, seconds) points, where they exist, in place of the lines above: a step's
    # cost is not linear in its tokens on every device (one row and several take different kernels)
    layer_points: tuple[tuple[float, float], ...] = ()  # seconds per layer
    head_points: tuple[tuple[float, float], ...] = ()

    def layer(self, micro_batch: float) -> float:
        """Seconds per layer for a micro-batch of ``micro_batch`` tokens."""
        if self.layer_points:
            return interpolate(self.layer_points, micro_batch)
        return self.seconds_per_layer + self.seconds_per_layer_token * micro_batch

    def head(self, micro_batch: float) -> float:
        if self.head_points:
            return interpolate(self.head_points, micro_batch)
        return self.head_seconds + self.head_seconds_per_token * micro_batch


def interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear through ``points`` (sorted by x), extended past the ends by the nearest
    segment (flat with one point); never below 0."""
    if len(points) == 1:
        return points[0][1]
    index = 1
    while index < len(points) - 1 and x > points[index][0]:
        index += 1
    (x0, y0), (x1, y1) = points[index - 1], points[index]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0)) if x1 != x0 else y1


@dataclass(frozen=True)
class Link:
    rtt_s: float
    bandwidth: float  # bytes/s


@dataclass
class Links:
    """Links between clusters; nodes of one cluster share ``local`` unless ``between`` has the
    cluster with itself (a cluster whose own links are slow, as under ``bloombee up --link-delay-ms``)."""

    between: dict[tuple[str, str], Link] = field(default_factory=dict)
    local: Link = field(default_factory=lambda: Link(rtt_s=0.0002, bandwidth=1.25e9))
    frame_s: float = 0.0  # o: each crossing's fixed cost in the processes at its ends (measured)

    def get(self, a: str, b: str) -> Link:
        if a == b:
            return self.between.get((a, a), self.local)
        link = self.between.get((a, b)) or self.between.get((b, a))
        if link is None:
            raise PlanningError(f"no measured link between clusters {a!r} and {b!r}")
        return link


@dataclass(frozen=True)
class Workload:
    batch: int = 8  # B: sequences in flight
    context: int = 1024  # S: tokens of context per sequence


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding as the gateway runs it (measured on its traffic): each row carries
    ``drafted`` tokens beside its own, so the stages compute 1 + drafted positions per row and the
    links carry as many, and a round yields ``tokens_per_round`` tokens per row; drafting costs
    the gateway ``draft_s`` per round. The default is no speculation."""

    tokens_per_round: float = 1.0
    drafted: float = 0.0
    draft_s: float = 0.0

    @property
    def positions(self) -> float:
        return 1.0 + self.drafted


@dataclass(frozen=True)
class Options:
    objective: str = "throughput"  # or "latency"
    max_micro_batch: int = 8
    allow_offload: bool = True
    offload_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    exact_node_limit: int = 12  # up to this many nodes the node order is searched exactly (~1 s at 12)
    relay_hops: bool = True  # may a hop go through the gateway when that is faster than the direct link
    round_overhead_s: float = 0.0  # g: the gateway's own part of every round of packed steps (measured)
    alone_overhead_s: float | None = None  # g where each row leaves alone (micro-batch 1; None: as packed)
    host_parallelism: dict[str, float] = field(default_factory=dict)  # P_h per shared host (measured)
    speculation: Speculation = field(default_factory=Speculation)
    prefill_per_round: float = 0.0  # q: prompt positions per row and round: sequences turning over (measured)
    prompt_positions: float = 1.0  # P: positions per prompt (measured); q / P prompts per row and round

    def step_tokens(self, micro_batch: float) -> float:
        """Positions a step of ``micro_batch`` rows carries: each row's token, its draft and its
        share of the prompts of the sequences that replace finished ones."""
        return micro_batch * (self.speculation.positions + self.prefill_per_round)

    def layer_seconds(self, node: Node, micro_batch: float) -> float:
        """Seconds per layer of a step of ``micro_batch`` rows (with their drafts), and its share of
        the prompts: m * q / P prompts of P positions per step, each packed into the step as one
        more row when short (``SHORT_ROW``, as the gateway packs them) or a step of its own."""
        positions = micro_batch * self.speculation.positions
        rows_only = node.layer(positions)
        if not self.prefill_per_round:
            return rows_only
        prompts = micro_batch * self.prefill_per_round / self.prompt_positions
        if self.prompt_positions <= SHORT_ROW:
            return rows_only + prompts * (node.layer(positions + self.prompt_positions) - rows_only)
        return rows_only + prompts * node.layer(self.prompt_positions)

    def head_seconds(self, node: Node, micro_batch: float) -> float:
        """The LM head of such a step: every row's positions (a prompt adds only its last, its row's own)."""
        return node.head(micro_batch * self.speculation.positions)

    def overhead_s(self, micro_batch: float) -> float:
        """The gateway's own part of a round: rows that leave alone do not wait to be gathered."""
        alone = self.alone_overhead_s if micro_batch <= 1 else None
        return (self.round_overhead_s if alone is None else alone) + self.speculation.draft_s

    def effective_batch(self, workload: Workload) -> int:
        return 1 if self.objective == "latency" else workload.batch

    def held(self, workload: Workload, batch: int) -> int:
        """Sequences whose KV the stages hold for a plan timed at ``batch`` in flight: those very
        sequences under throughput; under latency, where one conversation is timed alone, the
        whole demand, which stays resident between its turns."""
        return batch if self.objective == "throughput" else workload.batch

    def offload_choices(self) -> tuple[float, ...]:
        return self.offload_grid if self.allow_offload else (0.0,)


@dataclass(frozen=True)
class StageChoice:
    node: str
    layers: tuple[int, int]
    offload_weights: float
    offload_kv: float
    seconds: float


@dataclass(frozen=True)
class Plan:
    stages: tuple[StageChoice, ...]
    micro_batch: int
    batch: int
    cycle_s: float  # C
    bottleneck_s: float  # beta
    round_s: float  # T
    method: str = "dp"
    relay_hops: tuple[bool, ...] = ()  # per hop between stages: through the gateway instead of direct
    resident: int | None = None  # sequences whose KV the stages hold (Options.held); None: ``batch``
    tokens_per_round: float = 1.0  # per row, with speculation (Options.speculation)

    @property
    def held(self) -> int:
        return self.resident or self.batch

    @property
    def relay(self) -> bool:
        return any(self.relay_hops)

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.tokens_per_round / self.round_s

    @property
    def latency_s(self) -> float:
        """Per token: a round, shared by the tokens it yields."""
        return self.round_s / self.tokens_per_round


def micro_batches(batch: int, micro_batch: int) -> int:
    return math.ceil(batch / micro_batch)


def stage_option(
    model: ModelProfile, node: Node, layers: int, micro_batch: int, batch: int, context: int,
    offload_weights: float, offload_kv: float, resident: int | None = None, per_layer: float | None = None,
) -> float:  # fmt: skip
    """Seconds per micro-batch for ``node`` serving ``layers`` layers, or inf when it does not fit.

    ``resident``: sequences whose KV is held (default ``batch``); a micro-batch pages in its own
    share. ``per_layer``: a layer's seconds for the step, when more than its rows' (drafts and
    prompts: ``Options.layer_seconds``).
    """
    resident = resident or batch
    weights = layers * model.weight_bytes_per_layer
    kv = layers * model.kv_bytes_per_token_per_layer * context * resident
    if weights * (1 - offload_weights) + kv * (1 - offload_kv) > node.memory_bytes:
        return math.inf
    compute = layers * (node.layer(micro_batch) if per_layer is None else per_layer) + node.step_seconds
    n = micro_batches(batch, micro_batch)
    streamed = weights * offload_weights / n + kv * offload_kv * micro_batch / resident
    stream = streamed / node.host_bandwidth
    return max(compute, stream) + node.stream_interference * stream


def best_stage(
    model: ModelProfile, node: Node, layers: int, micro_batch: int, batch: int, context: int, options: Options,
    resident: int | None = None,
) -> tuple[float, float, float]:  # fmt: skip
    """The fastest (seconds, f_w, f_kv) on the offload grid; seconds is inf when nothing fits.

    Every plan cost is non-decreasing in each stage's time, so a stage's best offload choice does
    not depend on the rest of the plan.
    """
    best = (math.inf, 0.0, 0.0)
    for f_w in options.offload_choices():
        for f_kv in options.offload_choices():
            seconds = stage_option(model, node, layers, micro_batch, batch, context, f_w, f_kv, resident,
                                   options.layer_seconds(node, micro_batch))  # fmt: skip
            if seconds < best[0]:
                best = (seconds, f_w, f_kv)
    return best


def hop(link: Link, payload_bytes: float, codecs: tuple[CodecProfile, ...] = (RAW,),
        frame_s: float = 0.0) -> tuple[float, float]:  # fmt: skip
    """(latency, busy time) of sending ``payload_bytes`` over ``link`` with the fastest of ``codecs``."""
    codec = min(codecs, key=lambda profile: wire_seconds(payload_bytes, link.bandwidth, profile))
    return link.rtt_s / 2 + frame_s + wire_seconds(
        payload_bytes, link.bandwidth, codec
    ), payload_bytes / codec.ratio / link.bandwidth


def hop_path(source: str, target: str, via_gateway: bool = False) -> list[tuple[str, str]]:
    """The cluster-to-cluster crossings of one hop: direct, or out to the gateway and back in."""
    return [(source, GATEWAY), (GATEWAY, target)] if via_gateway else [(source, target)]


def crossing(links: Links, source: str, target: str, payload_bytes: float, via_gateway: bool = False,
             codecs: tuple[CodecProfile, ...] = (RAW,)):  # fmt: skip
    """(latency, busy time) of one hop between clusters; relayed, busy is that of its busier link."""
    latency = busy = 0.0
    for a, b in hop_path(source, target, via_gateway):
        hop_latency, hop_busy = hop(links.get(a, b), payload_bytes, codecs, links.frame_s)
        latency, busy = latency + hop_latency, max(busy, hop_busy)
    return latency, busy


def relay_flags(relay: bool | tuple[bool, ...], stages: int) -> tuple[bool, ...]:
    """Per-hop relay flags from one flag for every hop, or from the flags themselves."""
    flags = tuple(relay) if isinstance(relay, tuple) else (bool(relay),) * max(stages - 1, 0)
    if len(flags) != max(stages - 1, 0):
        raise PlanningError(f"{len(flags)} relay flags for {stages} stages")
    return flags


def legs(model: ModelProfile, nodes: dict[str, Node], order: list[str], relay: bool | tuple[bool, ...] = False):
    """The link crossings of one trip round the cycle: leg i enters stage i, the last leg returns.

    Each leg is a list of (from cluster, to cluster, bytes per token, candidate codecs) crossings.
    """
    clusters = [nodes[name].cluster for name in order]
    hidden = model.hidden_bytes_per_token
    trip = [[(GATEWAY, clusters[0], TOKEN_BYTES, (RAW,))]]
    flags = relay_flags(relay, len(order))
    for (before, after), via_gateway in zip(itertools.pairwise(clusters), flags, strict=True):
        trip.append([(a, b, hidden, model.codecs) for a, b in hop_path(before, after, via_gateway)])
    trip.append([(clusters[-1], GATEWAY, TOKEN_BYTES, (RAW,))])
    return trip


def evaluate(
    model: ModelProfile, nodes: dict[str, Node], links: Links, order: list[str], spans: list[int],
    micro_batch: int, batch: int, context: int, offloads: list[tuple[float, float]] | None = None,
    method: str = "given", options: Options | None = None, relay: bool | tuple[bool, ...] = False,
    resident: int | None = None,
) -> Plan:  # fmt: skip
    """The cost of a fully specified pipeline (order of nodes, layers per stage, micro-batch, offloads).

    With ``offloads`` None each stage takes its best offload choice on ``options``' grid.
    ``resident``: sequences whose KV the stages hold, when more than the ``batch`` timed.
    """
    options = options or Options()
    if sum(spans) != model.num_layers or any(s < 1 for s in spans) or len(spans) != len(order):
        raise PlanningError(f"spans {spans} do not give each of {len(order)} stages >= 1 of {model.num_layers} layers")
    stages, cycle, bottleneck, start = [], 0.0, 0.0, 0
    slowdown = shared_slowdown([nodes[name].host for name in order], micro_batches(batch, micro_batch), options)
    for index, (name, layers) in enumerate(zip(order, spans, strict=True)):
        node = nodes[name]
        if offloads is None:
            seconds, f_w, f_kv = best_stage(model, node, layers, micro_batch, batch, context, options, resident)
        else:
            f_w, f_kv = offloads[index]
            seconds = stage_option(model, node, layers, micro_batch, batch, context, f_w, f_kv, resident,
                                   options.layer_seconds(node, micro_batch))  # fmt: skip
        if index == len(order) - 1:
            seconds += options.head_seconds(node, micro_batch)
        cycle += seconds * slowdown.get(node.host or "", 1.0)
        bottleneck = max(bottleneck, seconds)
        stages.append(StageChoice(name, (start, start + layers), f_w, f_kv, seconds))
        start += layers
    for leg in legs(model, nodes, order, relay):
        for source, target, per_token, codecs in leg:
            latency, busy = hop(links.get(source, target), options.step_tokens(micro_batch) * per_token, codecs,
                                links.frame_s)  # fmt: skip
            cycle += latency
            bottleneck = max(bottleneck, busy)
    cycle += options.overhead_s(micro_batch)
    n = micro_batches(batch, micro_batch)
    shared = host_bound([nodes[s.node].host for s in stages], [s.seconds for s in stages], n, options)
    flags = relay_flags(relay, len(order))
    return Plan(tuple(stages), micro_batch, batch, cycle, bottleneck, max(cycle, n * bottleneck, shared), method,
                flags, resident if resident and resident != batch else None,
                options.speculation.tokens_per_round)  # fmt: skip


def shared_slowdown(hosts: list[str | None], n: int, options: Options) -> dict[str, float]:
    """Per shared host, how much slower its stages compute while ``n`` micro-batches are in flight:
    min(n, its stages in the plan) of them compute at once, each at that over its parallelism."""
    stages: dict[str, int] = {}
    for host in hosts:
        if host is not None and host in options.host_parallelism:
            stages[host] = stages.get(host, 0) + 1
    return {host: max(1.0, min(n, count) / options.host_parallelism[host])
            for host, count in stages.items() if min(n, count) >= 2}  # fmt: skip


def host_bound(hosts: list[str | None], seconds: list[float], n: int, options: Options) -> float:
    """The least round a shared host allows: n micro-batches through each of its stages, at
    ``options.host_parallelism[host]`` stages' worth of work at once (0 where no host is shared)."""
    work: dict[str, float] = {}
    for host, stage_seconds in zip(hosts, seconds, strict=True):
        if host is not None and host in options.host_parallelism:
            work[host] = work.get(host, 0.0) + stage_seconds
    return max((n * total / options.host_parallelism[host] for host, total in work.items()), default=0.0)
