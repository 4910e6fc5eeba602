"""Desired state: what must run for a DistributedLLM, decided without any I/O.

``desired_state`` turns the resource, the model's shape and its plan (``status.plan``) into
stage and gateway specs; each spec renders the launch spec its server starts from
(``bloombee_contract.launch``) and the route its gateway follows (``bloombee_contract.route``).
Backends realise them: ``backends/local.py`` as processes on this machine, ``backends/kubernetes``
as Deployments and Services with the same arguments.

A stage's name carries its plan's hash (``<name>-stage-<i>-<plan>``), so a new plan's stages
start beside the running ones and the gateway, whose own launch spec names no stage, moves over
to them when its route changes: a plan switch is make-before-break.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from bloombee_contract.launch import DEFAULT_DRAFT_TOKENS, DEFAULT_TREE_WIDTH, GatewayLaunch, StageLaunch
from bloombee_contract.route import Route

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import LinkStatus, PlanStage, PlanStatus
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import equal_split
from bloombee_operator.planner.profile import GIB, profile_from_config

# Python, torch and transformers, the tokenizer, the embeddings or LM head and the activations of
# a step: a SmolLM2 stage process holds about 0.6 GiB before its span's weights and KV.
RUNTIME_GIB = 0.75
# Converting a GGUF file to the Hugging Face layout dequantizes the whole model at once, in every pod
# that loads it: the process peaks at about this many times the model's float32 size above its
# runtime (measured: 1.82 GiB peak RSS for SmolLM2-135M, 0.50 GiB in float32, so 2.9 times). Pods
# loading such a source get a memory limit that holds the peak, or the kernel kills them mid-load.
GGUF_LOAD_PEAK_FACTOR = 3.0
DEFAULT_KV_GIB = 2.0  # a stage's KV budget where the plan sizes none (the server's default)

PLAN_NAME_CHARS = 6  # of a plan's hash in its stages' names: enough to tell the two plans of a switch apart
CODEC_FOR_COMPRESSION = {"off": "raw", "auto": "auto", "zstd": "zstd", "byteplane": "byteplane", "exponent": "exponent"}


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
    memory_gib: float = 0.0  # what its pod requests: resident weights, KV budget and the runtime (memory_estimate_gib)
    cpu: float = 1.0  # cores its pod requests: its node hint's
    load_peak_gib: float = 0.0  # what loading the model peaks at, where it exceeds what serving holds
    node: str = ""  # the planner's node serving it (status.plan), whose measured profile it reports
    plan: str = ""  # the hash of the plan it serves (its steps must name it)

    def launch(self, model_source: str) -> StageLaunch:
        """How its server is started (the backend adds where it listens and its thread count)."""
        return StageLaunch(model=model_source, layers=self.layers, dtype=self.dtype, name=self.name, codec=self.codec,
                           link_mbps=self.link_mbps, micro_batch=self.micro_batch, plan=self.plan or None,
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
    draft_width: int = DEFAULT_TREE_WIDTH
    draft_layers: int | None = None  # early-exit: the model's first layers that draft
    draft_source: str | None = None  # model draft: the small model's source
    micro_batch: int = 1  # rows per step: the plan's micro-batch size
    service_type: str = "ClusterIP"  # how clients reach it in Kubernetes
    relay_hops: tuple[bool, ...] = ()  # per hop between stages: the gateway forwards it (the plan's choice)
    max_sequences: int | None = None  # generations at once per gateway replica; more wait (None: no cap)
    memory_gib: float = RUNTIME_GIB  # what its pod requests: the runtime and the draft's layers
    cpu: float = 0.25  # cores each pod requests
    load_peak_gib: float = 0.0  # what loading the model peaks at (see StageSpec)

    def launch(self, model_source: str, route_file: str, public_url: str | None) -> GatewayLaunch:
        """How the gateway is started, given where it reads its route and where it is reached from.
        Nothing of the plan is in it (that is the route's), so a new plan does not restart it."""
        return GatewayLaunch(
            model=model_source, route_file=route_file, served_model_name=self.served_model_name, port=self.port,
            public_url=public_url, draft=self.draft, draft_max=self.draft_max, draft_width=self.draft_width,
            draft_layers=self.draft_layers if self.draft == "early-exit" else None,
            draft_model=self.draft_source if self.draft == "model" else None,
        )  # fmt: skip


@dataclass(frozen=True)
class DesiredState:
    name: str
    namespace: str
    model_source: str
    stages: tuple[StageSpec, ...]  # in pipeline order: stage i serves the span after stage i - 1
    gateway: GatewayDesired
    plan_hash: str = field(default="")
    max_micro_batch: int = 8  # planner.maxMicroBatch: the step sizes a profiling run times

    def route(self, stages: tuple[tuple[str, ...], ...]) -> Route:
        """The route the gateway follows to this plan's stages, at the URLs the backend gives them."""
        gateway = self.gateway
        return Route(plan=self.plan_hash, stages=stages, micro_batch=gateway.micro_batch,
                     relay_hops=gateway.relay_hops if any(gateway.relay_hops) else (),
                     max_sequences=gateway.max_sequences)  # fmt: skip

    def owns_stage(self, name: str) -> bool:
        """Whether ``name`` is a stage of this resource, of this plan or another."""
        return stage_plan(self.name, name) is not None


def _load_peak_gib(source: str, shape: ModelShape) -> float:
    """What a pod peaks at while it loads ``source``: the runtime and a GGUF file's conversion, which
    works in float32 whatever the serving dtype (0: no peak beyond serving)."""
    if not source.startswith("gguf://"):
        return 0.0
    config = shape.config()
    float32_gib = (profile_from_config(config, "float32").weight_bytes_per_layer * shape.num_layers
                   + 4 * shape.vocab_size * shape.hidden_size) / GIB  # fmt: skip
    return round(RUNTIME_GIB + GGUF_LOAD_PEAK_FACTOR * float32_gib, 2)


def _plan_hash(stages: tuple[StageSpec, ...]) -> str:
    """What the stages are, whatever they are named: two plans with the same stages are one."""
    text = json.dumps([asdict(replace(stage, name="", plan="")) for stage in stages], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def stage_name(resource: str, index: int, plan_hash: str) -> str:
    return f"{resource}-stage-{index}-{plan_hash[:PLAN_NAME_CHARS]}"


def stage_plan(resource: str, name: str) -> str | None:
    """The plan-hash prefix in the name of one of ``resource``'s stages (None: not one of its stages)."""
    prefix = f"{resource}-stage-"
    index, _, plan = name.removeprefix(prefix).partition("-")
    if not name.startswith(prefix) or not index.isdigit() or len(plan) != PLAN_NAME_CHARS or not plan.isalnum():
        return None
    return plan


def desired_state(
    resource: DistributedLLM, shape: ModelShape, plan: PlanStatus | None = None, *, links: Sequence[LinkStatus] = (),
    spans: list[tuple[int, int]] | None = None, num_stages: int = 3, micro_batch: int | None = None,
) -> DesiredState:  # fmt: skip
    """The stages and gateway for ``plan`` (a ``status.plan``: spans, nodes, offload, KV budgets,
    micro-batch, relay hops, admitted sequences), or without a plan for ``spans`` placed on the
    clusters in turn (default: an equal split over ``num_stages``) with ``micro_batch`` (default:
    the resource's ``planner.maxMicroBatch``).

    ``links`` are the measured links between clusters (``status.links``); each stage gets the
    bandwidth of its link to the next stage, which ``compression: auto`` weighs its codecs against.
    """
    spec = resource.spec
    if plan is None:
        if spans is None:
            spans = equal_split(shape.num_layers, min(num_stages, shape.num_layers))
        clusters = [cluster.name for cluster in spec.clusters]
        placed = [PlanStage(node=clusters[i % len(clusters)], cluster=clusters[i % len(clusters)], layers=span)
                  for i, span in enumerate(spans)]  # fmt: skip
        micro_batch, relay_hops, max_sequences = micro_batch or spec.planner.max_micro_batch, (), None
    else:
        placed, micro_batch = plan.stages, plan.micro_batch
        relay_hops, max_sequences = tuple(plan.relay_hops), plan.max_sequences
    _check_spans([stage.layers for stage in placed], shape.num_layers)
    unknown = sorted({stage.cluster for stage in placed} - {cluster.name for cluster in spec.clusters})
    if unknown:
        raise ValueError(f"stages placed on clusters {unknown} that spec.clusters does not name")
    name = resource.metadata.name
    mbps = {(link.from_, link.to): link.mbps for link in links}
    layer_gib = profile_from_config(shape.config(), spec.model.dtype).weight_bytes_per_layer / GIB
    cpu_of = {f"{cluster.name}-{hint.name}": hint.cpu for cluster in spec.clusters for hint in cluster.nodes}
    load_peak_gib = _load_peak_gib(spec.model.source, shape)
    stages = tuple(
        StageSpec(
            name="",
            index=index,
            node=stage.node,
            cpu=cpu_of.get(stage.node, 1.0),
            load_peak_gib=load_peak_gib,
            cluster=stage.cluster,
            layers=stage.layers,
            dtype=spec.model.dtype,
            codec=CODEC_FOR_COMPRESSION[spec.compression],
            micro_batch=micro_batch,
            offload_weights=stage.offload.weights,
            offload_kv=stage.offload.kv,
            kv_budget_gib=stage.kv_budget_gi_b,
            link_mbps=_onward_link(mbps, [s.cluster for s in placed], index),
            # Offloaded weights and KV still occupy this pod's memory (host tier) unless they go to
            # disk; the request counts them all, so a pod is never scheduled where it cannot run.
            memory_gib=round(layer_gib * (stage.layers[1] - stage.layers[0])
                             + (stage.kv_budget_gi_b or DEFAULT_KV_GIB) + RUNTIME_GIB, 2),
        )
        for index, stage in enumerate(placed)
    )
    plan_hash = _plan_hash(stages)
    stages = tuple(replace(stage, name=stage_name(name, stage.index, plan_hash), plan=plan_hash) for stage in stages)
    if spec.draft.kind == "early-exit" and not 1 <= (spec.draft.layers or 0) < shape.num_layers:
        raise ValueError(f"spec.draft.layers must lie in 1..{shape.num_layers - 1} (the model has {shape.num_layers})")
    gateway = GatewayDesired(
        name=f"{name}-gateway",
        served_model_name=name,
        port=spec.gateway.service.port,
        replicas=spec.gateway.replicas,
        draft=spec.draft.kind,
        draft_max=spec.draft.max_tokens,
        draft_width=spec.draft.tree_width,
        draft_layers=spec.draft.layers,
        draft_source=spec.draft.source,
        micro_batch=micro_batch,
        service_type=spec.gateway.service.type,
        cpu=spec.gateway.cpu,
        load_peak_gib=load_peak_gib,
        relay_hops=relay_hops,
        max_sequences=max(1, max_sequences // spec.gateway.replicas) if max_sequences else None,
        memory_gib=round(RUNTIME_GIB + (layer_gib * spec.draft.layers if spec.draft.kind == "early-exit" else 0.0)
                         + (1.0 if spec.draft.kind == "model" else 0.0), 2),
    )
    return DesiredState(
        name=name,
        namespace=resource.metadata.namespace,
        model_source=spec.model.source,
        stages=stages,
        gateway=gateway,
        plan_hash=plan_hash,
        max_micro_batch=spec.planner.max_micro_batch,
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
