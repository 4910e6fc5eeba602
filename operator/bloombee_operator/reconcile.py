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

from bloombee_operator.planner import equal_split
from bloombee_operator.resource import DistributedLLM

CODEC_FOR_COMPRESSION = {"off": "raw", "auto": "auto", "zstd": "zstd", "byteplane": "byteplane", "exponent": "exponent"}


@dataclass(frozen=True)
class ModelShape:
    """What the control plane must know of a model (read from its config.json or GGUF header).

    The attention and MLP sizes give the planner bytes per layer; without them (0) the planner
    assumes a standard Llama layer of ``hidden_size``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    intermediate_size: int = 0

    @classmethod
    def from_config(cls, config: Mapping) -> ModelShape:
        heads = int(config.get("num_attention_heads", 0))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        return cls(int(config["num_hidden_layers"]), int(config["hidden_size"]), heads, kv_heads,
                   int(config.get("intermediate_size", 0)))  # fmt: skip

    def config(self) -> dict[str, int]:
        """The config.json fields the planner's model profile reads."""
        heads = self.num_attention_heads or max(1, self.hidden_size // 64)
        return {"num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size, "num_attention_heads": heads,
                "num_key_value_heads": self.num_key_value_heads or heads,
                "intermediate_size": self.intermediate_size or 4 * self.hidden_size}  # fmt: skip


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

    def server_args(self, model_source: str) -> list[str]:
        """Arguments of ``python -m bloombee_stage.server`` (the container's args in Kubernetes)."""
        link = ["--link-mbps", f"{self.link_mbps:g}"] if self.link_mbps else []
        budget = ["--kv-budget-gib", f"{self.kv_budget_gib:.4g}"] if self.kv_budget_gib else []
        budget += ["--micro-batch", str(self.micro_batch)] if self.micro_batch else []
        offload = [*(["--offload-weights", f"{self.offload_weights:g}"] if self.offload_weights else []),
                   *(["--offload-kv", f"{self.offload_kv:g}"] if self.offload_kv else [])]  # fmt: skip
        return [
            "--model", model_source,
            "--layers", f"{self.layers[0]}:{self.layers[1]}",
            "--dtype", self.dtype,
            "--codec", self.codec,
            *link,
            *offload,
            *budget,
            "--name", self.name,
        ]  # fmt: skip


@dataclass(frozen=True)
class GatewayDesired:
    name: str
    served_model_name: str
    port: int
    replicas: int
    draft: str = "none"
    draft_max: int = 8
    draft_layers: int | None = None  # early-exit: the model's first layers that draft
    draft_source: str | None = None  # model draft: the small model's source
    micro_batch: int = 1  # rows per step: the plan's micro-batch size
    service_type: str = "ClusterIP"  # how clients reach it in Kubernetes
    relay_hops: tuple[bool, ...] = ()  # per hop between stages: the gateway forwards it (the plan's choice)
    max_sequences: int | None = None  # generations at once per gateway replica; more wait (None: no cap)

    def server_args(self) -> list[str]:
        """Arguments of ``python -m bloombee_stage.gateway`` beyond the stage URLs and the port."""
        draft = [*(["--draft-layers", str(self.draft_layers)] if self.draft == "early-exit" else []),
                 *(["--draft-model", str(self.draft_source)] if self.draft == "model" else [])]  # fmt: skip
        relay = ["--relay-hops", ",".join(str(int(flag)) for flag in self.relay_hops)] if any(self.relay_hops) else []
        seats = ["--max-sequences", str(self.max_sequences)] if self.max_sequences else []
        return ["--served-model-name", self.served_model_name, "--draft", self.draft,
                "--draft-max", str(self.draft_max), *draft, "--micro-batch", str(self.micro_batch), *relay,
                *seats]  # fmt: skip


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
