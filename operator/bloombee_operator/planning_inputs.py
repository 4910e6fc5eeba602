"""Planner inputs from what users and the operator have: node hints, measured links, files.

Files read by ``bloombee plan``:

    # links.yaml -- the shape of a DistributedLLM's status.links
    links:
      - {from: gateway, to: eu, rttMs: 1.0, mbps: 1000}
      - {from: eu, to: us, rttMs: 92.1, mbps: 87}

    # nodes.yaml
    nodes:
      - {name: a100, cluster: eu, memoryGiB: 40, msPerLayer: 0.3, msPerLayerToken: 0.01, hostGBps: 12}

A node without measurements gets its per-layer time from ``computeTFLOPS`` (per-token compute)
and an assumed 50 GB/s memory bandwidth (reading one layer's weights). A gateway without
measured links sits in the first cluster.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import LinkStatus, NodeProfile, ProfilesStatus
from bloombee_operator.planner.cost import (
    GATEWAY,
    Link,
    Links,
    ModelProfile,
    Node,
    Options,
    PlanningError,
    Speculation,
)
from bloombee_operator.planner.profile import DTYPE_BYTES, GIB

DEFAULT_MEMORY_GIB = 16.0
DEFAULT_TFLOPS = 1.0
ASSUMED_MEMORY_BANDWIDTH = 50e9
LOCAL_LINK = Link(rtt_s=0.0002, bandwidth=1.25e9)
UNMEASURED_LINK = Link(rtt_s=0.001, bandwidth=125e6)


class _File(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class NodeEntry(_File):
    name: str
    cluster: str
    memory_gib: float = Field(alias="memoryGiB", gt=0)
    ms_per_layer: float = Field(alias="msPerLayer", gt=0)
    ms_per_layer_token: float = Field(default=0.0, alias="msPerLayerToken", ge=0)
    # A stage's /info reports these under offload: streamed GB/s while serving, and how much streaming
    # delays compute on its node (bench/offload.py shows how to calibrate both).
    host_gbps: float = Field(default=2.0, alias="hostGBps", gt=0)
    stream_interference: float = Field(default=0.0, alias="streamInterference", ge=0, le=2)


def _load_list(path: str | Path, key: str, entry: type[BaseModel]) -> list:
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise PlanningError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise PlanningError(f"{path}: not valid YAML: {error}") from None
    items = document.get(key) if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise PlanningError(f"{path}: expected a top-level list `{key}:`")
    return _parse_entries(items, entry, f"{path}: {key}")


def _parse_entries(items: list, entry: type[BaseModel], origin: str) -> list:
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(entry.model_validate(item))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PlanningError(f"{origin}[{index}].{where}: {first['msg']}") from None
    return parsed


def load_links(path: str | Path | None, clusters: list[str]) -> Links:
    return links_from_entries(_load_list(path, "links", LinkStatus) if path is not None else [], clusters)


def parse_links(entries: list[dict], origin: str = "status.links") -> list[LinkStatus]:
    """Link entries in the ``status.links`` shape, each checked; errors name the entry and field."""
    return _parse_entries(entries, LinkStatus, origin)


def links_from_entries(entries: list[LinkStatus], clusters: list[str]) -> Links:
    """The planner's link matrix: measured links, and assumptions for what was not measured.

    A pair of clusters never measured gets ``UNMEASURED_LINK``; the gateway sits in the first
    cluster, so it reaches that cluster locally and the others as the first cluster does.
    """
    links = Links(local=LOCAL_LINK)
    for entry in entries:
        links.between[(entry.from_, entry.to)] = Link(entry.rtt_ms / 1000, entry.mbps * 1e6 / 8)
    for index, a in enumerate(clusters):
        for b in clusters[index + 1 :]:
            links.between.setdefault((a, b), UNMEASURED_LINK)
        if (GATEWAY, a) not in links.between and (a, GATEWAY) not in links.between:
            links.between[(GATEWAY, a)] = links.get(clusters[0], a)  # within the first cluster: its own links
    return links


def nodes_from_file(path: str | Path) -> list[Node]:
    return [
        Node(
            e.name,
            e.cluster,
            e.memory_gib * GIB,
            e.ms_per_layer / 1000,
            e.ms_per_layer_token / 1000,
            e.host_gbps * 1e9,
            e.stream_interference,
        )
        for e in _load_list(path, "nodes", NodeEntry)
    ]


def nodes_from_resource(resource: DistributedLLM, model: ModelProfile) -> list[Node]:
    """One node per hint in spec.clusters[].nodes; a cluster without hints counts as one default node."""
    flops_per_token = 2 * model.weight_bytes_per_layer / DTYPE_BYTES[resource.spec.model.dtype]
    nodes = []
    for cluster in resource.spec.clusters:
        hints = cluster.nodes or [None]
        for index, hint in enumerate(hints):
            memory = (hint.memory_gi_b if hint and hint.memory_gi_b else DEFAULT_MEMORY_GIB) * GIB
            tflops = hint.compute_tflops if hint and hint.compute_tflops else DEFAULT_TFLOPS
            name = f"{cluster.name}-{hint.name}" if hint else f"{cluster.name}-{index}"
            nodes.append(Node(name, cluster.name, memory, model.weight_bytes_per_layer / ASSUMED_MEMORY_BANDWIDTH,
                              flops_per_token / (tflops * 1e12)))  # fmt: skip
    return nodes


def with_profiles(nodes: list[Node], links: Links, options: Options,
                  profiles: ProfilesStatus | None) -> tuple[list[Node], Links, Options]:  # fmt: skip
    """The planner's inputs with measured costs in place of hints where ``status.profiles`` has them.

    Stages that share a host run on the same cores, so their per-layer costs are the host's: the
    profiles of one host are pooled (a mean weighted by samples), which also keeps measurement
    noise from telling alike nodes apart and moving layers between them for nothing. A node's LM
    head, should it become the last stage, is costed as the measured head of its host, or of the
    first measured host scaled by how much slower or faster its layers are (the head reads
    weights as the layers do). A node never measured runs on the host that holds every node, where
    there is one (``bloombee up``), or keeps its hints.
    """
    if profiles is None or not profiles.nodes:
        return nodes, links, options
    pooled = {key: _pooled(group) for key, group in _by_host(profiles.nodes).items()}
    reference = next((p for p in pooled.values() if p.head_ms is not None and p.ms_per_layer > 0), None)
    host_of = {p.node: p.host or p.node for p in profiles.nodes}
    everywhere = next((host.name for host in profiles.hosts if host.all_nodes), None)
    updated = []
    for node in nodes:
        profile = pooled.get(host_of.get(node.name, everywhere or ""))
        if profile is not None:
            streams = profile.host_gbps * 1e9 if profile.host_gbps else node.host_bandwidth
            node = replace(node, seconds_per_layer=profile.ms_per_layer / 1000, host=profile.host,
                           seconds_per_layer_token=profile.ms_per_layer_token / 1000 or node.seconds_per_layer_token,
                           step_seconds=profile.step_ms / 1000, layer_points=_seconds(profile.layer_ms_at),
                           host_bandwidth=streams)  # fmt: skip
        head = profile if profile is not None and profile.head_ms is not None else reference
        if head is not None:
            scale = 1.0 if head is profile else node.seconds_per_layer * 1000 / head.ms_per_layer
            node = replace(node, head_seconds=(head.head_ms or 0.0) * scale / 1000,
                           head_seconds_per_token=(head.head_ms_per_token or 0.0) * scale / 1000,
                           head_points=_seconds(head.head_ms_at, scale))  # fmt: skip
        updated.append(node)
    hosts = {host.name: host.parallelism for host in profiles.hosts}
    gateway = profiles.gateway
    if gateway is not None:
        links = replace(links, frame_s=gateway.frame_ms / 1000)
        alone = gateway.alone_overhead_ms / 1000 if gateway.alone_overhead_ms is not None else None
        options = replace(options, round_overhead_s=gateway.round_overhead_ms / 1000, alone_overhead_s=alone,
                          prefill_per_round=gateway.prefill_per_round or 0.0,
                          prompt_positions=gateway.prompt_positions or 1.0)  # fmt: skip
        if gateway.tokens_per_round is not None:  # speculation as it ran: tokens per round, and its costs
            options = replace(options, speculation=Speculation(gateway.tokens_per_round,
                                                               gateway.drafted_per_round or 0.0,
                                                               (gateway.draft_ms or 0.0) / 1000))  # fmt: skip
    return updated, links, replace(options, host_parallelism=hosts)


def _seconds(points: list[tuple[float, float]], scale: float = 1.0) -> tuple[tuple[float, float], ...]:
    return tuple((tokens, ms * scale / 1000) for tokens, ms in sorted(points))


def _mean_points(lists: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Points at each step size any list has, averaged over the lists that have it."""
    at: dict[float, list[float]] = {}
    for points in lists:
        for tokens, ms in points:
            at.setdefault(tokens, []).append(ms)
    return [(tokens, sum(values) / len(values)) for tokens, values in sorted(at.items())]


def _by_host(profiles: list[NodeProfile]) -> dict[str, list[NodeProfile]]:
    """Profiles grouped by the host they share; a node without a host is a group of its own."""
    groups: dict[str, list[NodeProfile]] = {}
    for profile in profiles:
        groups.setdefault(profile.host or profile.node, []).append(profile)
    return groups


def _pooled(group: list[NodeProfile]) -> NodeProfile:
    """One profile for the stages of one host: per-layer and per-step costs averaged by samples,
    the head from the stage that ran it."""
    weights = [max(1, p.samples) for p in group]
    total = sum(weights)

    def mean(values: list[float], of: list[int]) -> float:
        return sum(v * w for v, w in zip(values, of, strict=True)) / max(1, sum(of))

    steps = [(p.step_ms, w) for p, w in zip(group, weights, strict=True) if p.head_ms is None]
    heads = [p for p in group if p.head_ms is not None]
    return group[0].model_copy(update={
        "ms_per_layer": mean([p.ms_per_layer for p in group], weights),
        "ms_per_layer_token": mean([p.ms_per_layer_token for p in group], weights),
        "step_ms": mean([s for s, _ in steps], [w for _, w in steps]) if steps else 0.0,
        "head_ms": heads[0].head_ms if heads else None,
        "head_ms_per_token": heads[0].head_ms_per_token if heads else None,
        "layer_ms_at": _mean_points([p.layer_ms_at for p in group]),
        "host_gbps": min((p.host_gbps for p in group if p.host_gbps), default=None),
        "head_ms_at": heads[0].head_ms_at if heads else [],
        "samples": total,
    })  # fmt: skip
