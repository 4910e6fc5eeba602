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

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import LinkStatus
from bloombee_operator.planner.cost import GATEWAY, Link, Links, ModelProfile, Node, PlanningError
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
            links.between[(GATEWAY, a)] = LOCAL_LINK if a == clusters[0] else links.get(clusters[0], a)
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
