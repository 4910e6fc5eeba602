"""The DistributedLLM's status as pydantic models: what the operator writes and reads back.

The CRD's status schema is generated from these models (``crd.py``), so the API server refuses
any shape the code does not write, and the code reads status through them, so it never meets a
shape it did not expect. Field names are camelCase on the wire, as in the spec.

A status written by another version may not validate. ``lenient_status`` keeps what does and
drops the rest (a plan this version cannot read is planned afresh), so an upgrade never turns a
running resource into a failed one.
"""

from __future__ import annotations

from typing import Any

from bloombee_contract.status import ConditionStatus, ConditionType, Phase, Reason
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from bloombee_operator.planner.cost import interpolate


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The wire shape: camelCase, JSON types, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Condition(_Status):
    type: ConditionType
    status: ConditionStatus
    reason: Reason
    message: str = ""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class LinkStatus(_Status):
    """One measured link between two clusters (``status.links``; ``bloombee plan --links`` reads the same)."""

    from_: str = Field(alias="from")
    to: str
    rtt_ms: float = Field(ge=0)
    mbps: float = Field(gt=0)
    measured_at: str | None = None


class StageOffload(_Status):
    weights: float = Field(default=0.0, ge=0, le=1, description="fraction of the span's weights streamed in")
    kv: float = Field(default=0.0, ge=0, le=1, description="fraction of the span's KV cache kept off the device")


class PlanStage(_Status):
    node: str
    cluster: str
    layers: tuple[int, int] = Field(description="[first, end) layer indices")
    offload: StageOffload = Field(default_factory=StageOffload)
    predicted_ms: float = Field(default=0.0, ge=0, description="this stage's time per micro-batch")
    kv_budget_gi_b: float | None = Field(default=None, ge=0, alias="kvBudgetGiB",
                                         description="KV cache sized for the sequences the plan holds")  # fmt: skip


class PlanStatus(_Status):
    """``status.plan``: the planner's choice, and what the children were built from."""

    method: str = "dp"
    micro_batch: int = Field(ge=1)
    batch: int = Field(ge=1, description="sequences the plan admits at once")
    max_sequences: int | None = Field(default=None, ge=1, description="sequences the stages' KV budgets hold")
    predicted_tokens_per_second: float = Field(ge=0)
    predicted_latency_ms: float = Field(ge=0)
    round_ms: float = Field(ge=0)
    cycle_ms: float = Field(default=0.0, ge=0)
    bottleneck_ms: float = Field(default=0.0, ge=0)
    tokens_per_round: float = Field(default=1.0, ge=1, description="tokens a round yields per sequence "
                                    "(speculation, as the gateway measured it)")  # fmt: skip
    relay_hops: list[bool] = Field(default_factory=list, description="per hop between stages: through the gateway")
    stages: list[PlanStage] = Field(min_length=1)
    planned_at: str | None = None
    checked_at: str | None = None
    plan_hash: str | None = None


class NodeProfile(_Status):
    """A stage's measured costs (its ``/profile`` run), in the planner's terms (``planner/cost.py``)."""

    node: str
    host: str | None = Field(default=None, description="the machine it shares with other stages, if any")
    ms_per_layer: float = Field(ge=0, description="a: per layer and step")
    ms_per_layer_token: float = Field(default=0.0, ge=0, description="b: per layer and token of the step")
    step_ms: float = Field(default=0.0, ge=0, description="s: per step outside the layers")
    head_ms: float | None = Field(default=None, ge=0, description="g: the LM head per step, measured where last")
    head_ms_per_token: float | None = Field(default=None, ge=0, description="p: and per token")
    layer_ms_at: list[tuple[float, float]] = Field(default_factory=list, description="[tokens, ms per layer] "
                                                    "measured; the planner interpolates between them")  # fmt: skip
    head_ms_at: list[tuple[float, float]] = Field(default_factory=list, description="[tokens, ms of the head]")
    onward_rtt_ms: float | None = Field(default=None, ge=0, description="the link to the next part as its "
                                        "frames found it: round trip, HTTP and TLS included")  # fmt: skip
    onward_mbps: float | None = Field(default=None, gt=0)
    host_gbps: float | None = Field(default=None, gt=0, alias="hostGBps", description="the rate it streams "
                                    "offloaded weights and KV at (measured at its start)")  # fmt: skip
    samples: int = Field(default=0, ge=0)
    traffic_scale: float = Field(default=1.0, gt=0, description="its traffic's step times over its profiling "
                                 "run's (the layer costs above include it)")  # fmt: skip
    head_traffic_scale: float | None = Field(default=None, gt=0, description="the same for its head")
    measured_at: str | None = None

    @classmethod
    def from_run(cls, node: str, host: str | None, run: dict[str, Any]) -> NodeProfile:
        """From a stage's ``/profile`` answer: its profiling run (the last stage's cost beside its
        layers is its head's), scaled to what the traffic it served measured where that traffic has
        enough steps of the run's sizes (``traffic_scale``), traffic's own cost at those sizes
        (``traffic_points``); its onward link and streaming rate from that traffic."""
        fitted = run["profile"]
        served = run.get("served") or {}
        onward = served.get("onward") or {}
        layers = traffic_scale(fitted.get("layerMsAt", []), served.get("layerMsAt", []), served.get("stepsAt", []))
        entry = cls(node=node, host=host, ms_per_layer=round(fitted["msPerLayer"] * layers, 4),
                    ms_per_layer_token=round(fitted["msPerLayerToken"] * layers, 5), samples=fitted["samples"],
                    measured_at=fitted.get("measuredAt"), onward_rtt_ms=onward.get("rttMs"),
                    onward_mbps=onward.get("mbps"), traffic_scale=layers)  # fmt: skip
        stream = served.get("streamBps")
        entry.host_gbps = round(stream / 1e9, 3) if stream else None
        counts = served.get("stepsAt", [])
        entry.layer_ms_at = traffic_points(fitted.get("layerMsAt", []), served.get("layerMsAt", []), counts, layers)
        if run.get("last"):
            head = traffic_scale(fitted.get("stepMsAt", []), served.get("stepMsAt", []), counts)
            return entry.model_copy(update={
                "head_ms": round(fitted["stepMs"] * head, 4),
                "head_ms_per_token": round(fitted["stepMsPerToken"] * head, 5),
                "head_ms_at": traffic_points(fitted.get("stepMsAt", []), served.get("stepMsAt", []), counts, head),
                "head_traffic_scale": head,
            })  # fmt: skip
        return entry.model_copy(update={"step_ms": fitted["stepMs"]})


MIN_TRAFFIC_STEPS = 8  # steps of one size before traffic's median of it is trusted


def trusted_sizes(profiled: list[list[float]], served: list[list[float]],
                  counts: list[list[float]]) -> dict[float, tuple[float, float]]:  # fmt: skip
    """Traffic's median ms and step count at each size it ran at least ``MIN_TRAFFIC_STEPS`` times
    within the profiling run's range of sizes (the only sizes traffic's figures stand for)."""
    sizes = sorted(float(tokens) for tokens, _ in profiled)
    steps = {float(tokens): count for tokens, count in counts}
    return {float(tokens): (float(ms), steps[float(tokens)]) for tokens, ms in served
            if sizes and steps.get(float(tokens), 0) >= MIN_TRAFFIC_STEPS and sizes[0] <= tokens <= sizes[-1]}


def traffic_scale(profiled: list[list[float]], served: list[list[float]], counts: list[list[float]]) -> float:
    """How much slower (above 1) or faster steps ran under traffic than in the profiling run: the
    mean over the step sizes traffic ran often enough (``trusted_sizes``) of served ms / the run's
    ms interpolated there, weighted by those counts; 1 without any.

    The profiling run times a stage alone on the compute thread; under traffic the same steps share
    the cores with the gateway, the links' ends and the other stages, and carry rows of unlike
    lengths, which the run does not. The run keeps the shape of the cost (its sizes span every step
    size the planner may choose); traffic sets its level."""
    points = tuple(sorted((float(tokens), float(ms)) for tokens, ms in profiled))
    weighted = total = 0.0
    for tokens, (ms, count) in trusted_sizes(profiled, served, counts).items():
        expected = interpolate(points, tokens)
        if expected > 0 and ms > 0:
            weighted, total = weighted + count * ms / expected, total + count
    return round(weighted / total, 4) if total else 1.0


def traffic_points(profiled: list[list[float]], served: list[list[float]], counts: list[list[float]],
                   scale: float) -> list[tuple[float, float]]:  # fmt: skip
    """The cost at each step size as traffic found it: traffic's own median at the sizes it ran
    often enough (``trusted_sizes``), the run's points scaled to traffic's level (``traffic_scale``)
    at the others. A profiling run is short, and one noisy size in it would otherwise stand for
    every step of that size the plan runs."""
    measured = {tokens: ms for tokens, (ms, _) in trusted_sizes(profiled, served, counts).items()}
    points = {float(tokens): ms * scale for tokens, ms in profiled if float(tokens) not in measured} | measured
    return [(tokens, round(ms, 4)) for tokens, ms in sorted(points.items())]


class HostProfile(_Status):
    name: str
    parallelism: float = Field(gt=0, description="stages' worth of work it does at once: from traffic (its "
                               "stages' steps beside each other against steps alone) or else their profiling "
                               "run together against each alone")  # fmt: skip
    stages: int = Field(default=1, ge=1)
    all_nodes: bool = Field(default=False, description="every node of the resource runs here (bloombee up)")
    profiled: float | None = Field(default=None, gt=0, description="what its stages' profiling run "
                                   "together gave (parallelism is traffic's where overlappedSteps > 0)")  # fmt: skip
    overlapped_steps: int = Field(default=0, ge=0, description="steps its stages served while another of "
                                  "them computed, compared with steps of the same size served alone")  # fmt: skip


class GatewayProfile(_Status):
    """What a round costs beside the stages' compute, from the gateway's traffic."""

    frame_ms: float = Field(ge=0, description="o: each crossing's fixed cost (transport less the links' delay)")
    round_overhead_ms: float = Field(ge=0, description="g: the gateway's own part of a round (a packed step's "
                                     "results to the step leaving)")  # fmt: skip
    alone_overhead_ms: float | None = Field(default=None, ge=0, description="g for a row that leaves alone (a "
                                            "generation's result to its next row)")  # fmt: skip
    transport_ms: float = Field(default=0.0, ge=0, description="a step's round trip less its stages' compute")
    tokens_per_round: float | None = Field(default=None, ge=1, description="speculation: tokens per row and round")
    drafted_per_round: float | None = Field(default=None, ge=0, description="speculation: drafted tokens per row "
                                            "and round (the stages compute them too)")  # fmt: skip
    draft_ms: float | None = Field(default=None, ge=0, description="speculation: drafting per round")
    prefill_per_round: float | None = Field(default=None, ge=0, description="q: prompt positions computed per "
                                            "row and round (sequences turning over)")  # fmt: skip
    prompt_positions: float | None = Field(default=None, gt=0, description="P: positions computed per prompt "
                                           "(short ones are packed with other rows, long ones go alone)")  # fmt: skip
    steps: int = Field(default=0, ge=0)
    measured_at: str | None = None


class ProfilesStatus(_Status):
    """``status.profiles``: measured costs the planner uses in place of the spec's hints."""

    nodes: list[NodeProfile] = Field(default_factory=list)
    hosts: list[HostProfile] = Field(default_factory=list)
    gateway: GatewayProfile | None = None
    measured_at: str | None = Field(default=None, description="when the parts were last asked (empty lists: "
                                    "they could not say then)")  # fmt: skip


class DistributedLLMStatus(_Status):
    phase: Phase | None = None
    observed_generation: int | None = None
    endpoint: str | None = None
    stages_ready: str | None = Field(default=None, description="ready stages / stages, e.g. 3/3")
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})  # fmt: skip
    links: list[LinkStatus] = Field(default_factory=list)
    profiles: ProfilesStatus | None = None
    plan: PlanStatus | None = None
    serving_plan: str | None = Field(default=None, description="the hash of the plan the gateway serves now "
                                     "(plan.planHash once a switch to it is done)")


def lenient_status(document: object) -> DistributedLLMStatus:
    """A status as this version reads it: every top-level field that validates, none that does not."""
    if not isinstance(document, dict):
        return DistributedLLMStatus()
    try:
        return DistributedLLMStatus.model_validate(document)
    except ValidationError:
        kept = {}
        for key, value in document.items():
            try:
                DistributedLLMStatus.model_validate({key: value})
            except ValidationError:
                continue
            kept[key] = value
        return DistributedLLMStatus.model_validate(kept)
