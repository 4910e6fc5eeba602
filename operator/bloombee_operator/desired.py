"""Desired state: what must run for a DistributedLLM, decided without any I/O.

``desired_state`` turns the resource, the model's shape and a placement (layer spans) into
stage and gateway specs. Backends realise those specs: ``backends/local.py`` as processes on
this machine today; a Kubernetes backend as Deployments and Services with the same names and
arguments.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from bloombee_contract.launch import DEFAULT_DRAFT_TOKENS, GatewayLaunch, StageLaunch

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import equal_split

CODEC_FOR_COMPRESSION = {"off": "raw", "auto": "auto", "zstd": "zstd", "byteplane": "byteplane", "exponent": "exponent"}


@dataclass(frozen=True)
class StagePlan:
    """One planned stage: where it runs, its span and its offload budgets (from the planner)."""

    cluster: str
    layers: tuple[int, int]
    node: str | None = None
    offload_weights: float = 0.0
    offload_kv: float = 0.0
    kv_budget_gib: float | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    index: int
    cluster: str
    layers: tuple[int, int]
    dtype: str
    codec: str
    micro_batch: int | None = None  # the plan's: the stage refuses steps with more rows
    offload_weights: float = 0.0
    offload_kv: float = 0.0
    kv_budget_gib: float | None = None  # the KV cache the plan sized this stage for (None: the server's default)
    link_mbps: float | None = None  # measured bandwidth to the next stage's cluster (None: same cluster or unknown)

    def launch(self, model_source: str) -> StageLaunch:
        """How its server is started (the backend adds where it listens and its thread count)."""
        return StageLaunch(model=model_source, layers=self.layers, dtype=self.dtype, name=self.name, codec=self.codec,
                           link_mbps=self.link_mbps, micro_batch=self.micro_batch,
                           offload_weights=self.offload_weights, offload_kv=self.offload_kv,
                           **({"kv_budget_gib": self.kv_budget_gib} if self.kv_budget_gib else {}))  # fmt: skip


@dataclass(frozen=True)
class GatewayDesired:
    name: str
    served_model_name: str
    port: int
    replicas: int
    draft: str = "none"
    draft_max: int = DEFAULT_DRAFT_TOKENS
    draft_layers: int | None = None  # early-exit: the model's first layers that draft
    draft_source: str | None = None  # model draft: the small model's source
    micro_batch: int = 1  # rows per step: the plan's micro-batch size
    service_type: str = "ClusterIP"  # how clients reach it in Kubernetes
    relay_hops: tuple[bool, ...] = ()  # per hop between stages: the gateway forwards it (the plan's choice)
    max_sequences: int | None = None  # generations at once per gateway replica; more wait (None: no cap)

    def launch(self, model_source: str, stages: tuple[tuple[str, ...], ...], public_url: str | None) -> GatewayLaunch:
        """How the gateway is started, given where its stages are and where it is reached from."""
        return GatewayLaunch(
            model=model_source, stages=stages, served_model_name=self.served_model_name, port=self.port,
            public_url=public_url, draft=self.draft, draft_max=self.draft_max,
            draft_layers=self.draft_layers if self.draft == "early-exit" else None,
            draft_model=self.draft_source if self.draft == "model" else None, micro_batch=self.micro_batch,
            relay_hops=self.relay_hops if any(self.relay_hops) else None, max_sequences=self.max_sequences,
        )  # fmt: skip


@dataclass(frozen=True)
class DesiredState:
    name: str
    namespace: str
    model_source: str
    stages: tuple[StageSpec, ...]  # in pipeline order: stage i serves the span after stage i - 1
    gateway: GatewayDesired
    plan_hash: str = field(default="")


def _plan_hash(stages: tuple[StageSpec, ...]) -> str:
    text = json.dumps([asdict(stage) for stage in stages], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def desired_state(
    resource: DistributedLLM, shape: ModelShape, spans: list[tuple[int, int]] | None = None, num_stages: int = 3,
    link_mbps: Mapping[tuple[str, str], float] | None = None, micro_batch: int | None = None,
    planned: list[StagePlan] | None = None, relay_hops: tuple[bool, ...] = (), max_sequences: int | None = None,
) -> DesiredState:  # fmt: skip
    """Stages for ``planned`` (the planner's stages), or for ``spans`` placed on the clusters in turn
    (default: an equal split over ``num_stages``).

    ``micro_batch``: the plan's micro-batch size, the most rows the gateway packs into one step
    (default: the resource's ``planner.maxMicroBatch``). ``relay_hops``: the hops the gateway forwards.
    ``max_sequences``: the sequences the plan admits, shared among the gateway replicas (None: no cap).

    ``link_mbps`` holds measured bandwidths between clusters (either direction); each stage gets
    that of its link to the next stage, which ``compression: auto`` weighs its codecs against.
    """
    if planned is None:
        if spans is None:
            spans = equal_split(shape.num_layers, min(num_stages, shape.num_layers))
        clusters = [cluster.name for cluster in resource.spec.clusters]
        planned = [StagePlan(clusters[index % len(clusters)], span) for index, span in enumerate(spans)]
    _check_spans([stage.layers for stage in planned], shape.num_layers)
    known = {cluster.name for cluster in resource.spec.clusters}
    unknown = sorted({stage.cluster for stage in planned} - known)
    if unknown:
        raise ValueError(f"stages placed on clusters {unknown} that spec.clusters does not name")
    name = resource.metadata.name
    spec = resource.spec
    placed = [stage.cluster for stage in planned]
    stages = tuple(
        StageSpec(
            name=f"{name}-stage-{index}",
            index=index,
            cluster=stage.cluster,
            layers=stage.layers,
            dtype=spec.model.dtype,
            codec=CODEC_FOR_COMPRESSION[spec.compression],
            micro_batch=micro_batch or spec.planner.max_micro_batch,
            offload_weights=stage.offload_weights,
            offload_kv=stage.offload_kv,
            kv_budget_gib=stage.kv_budget_gib,
            link_mbps=_onward_link(link_mbps or {}, placed, index),
        )
        for index, stage in enumerate(planned)
    )
    if spec.draft.kind == "early-exit" and not 1 <= (spec.draft.layers or 0) < shape.num_layers:
        raise ValueError(f"spec.draft.layers must lie in 1..{shape.num_layers - 1} (the model has {shape.num_layers})")
    gateway = GatewayDesired(
        name=f"{name}-gateway",
        served_model_name=name,
        port=spec.gateway.service.port,
        replicas=spec.gateway.replicas,
        draft=spec.draft.kind,
        draft_max=spec.draft.max_tokens,
        draft_layers=spec.draft.layers,
        draft_source=spec.draft.source,
        micro_batch=micro_batch or spec.planner.max_micro_batch,
        service_type=spec.gateway.service.type,
        relay_hops=tuple(relay_hops),
        max_sequences=max(1, max_sequences // spec.gateway.replicas) if max_sequences else None,
    )
    return DesiredState(
        name=name,
        namespace=resource.metadata.namespace,
        model_source=spec.model.source,
        stages=stages,
        gateway=gateway,
        plan_hash=_plan_hash(stages),
    )


def _onward_link(link_mbps: Mapping[tuple[str, str], float], clusters: list[str], index: int) -> float | None:
    if index + 1 >= len(clusters) or clusters[index] == clusters[index + 1]:
        return None
    here, there = clusters[index], clusters[index + 1]
    return link_mbps.get((here, there)) or link_mbps.get((there, here))


def _check_spans(spans: list[tuple[int, int]], num_layers: int) -> None:
    """Spans must tile [0, num_layers) in order, without gaps or overlaps."""
    expected_start = 0
    for index, (start, end) in enumerate(spans):
        if start != expected_start or end <= start:
            raise ValueError(f"span {index} is [{start}, {end}); it must start at {expected_start} and be non-empty")
        expected_start = end
    if expected_start != num_layers:
        raise ValueError(f"spans cover layers [0, {expected_start}) but the model has {num_layers}")
