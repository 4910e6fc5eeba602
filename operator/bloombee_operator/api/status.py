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
    relay_hops: list[bool] = Field(default_factory=list, description="per hop between stages: through the gateway")
    stages: list[PlanStage] = Field(min_length=1)
    planned_at: str | None = None
    checked_at: str | None = None
    plan_hash: str | None = None


class DistributedLLMStatus(_Status):
    phase: Phase | None = None
    observed_generation: int | None = None
    endpoint: str | None = None
    stages_ready: str | None = Field(default=None, description="ready stages / stages, e.g. 3/3")
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})  # fmt: skip
    links: list[LinkStatus] = Field(default_factory=list)
    plan: PlanStatus | None = None


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
