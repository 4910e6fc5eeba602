"""The DistributedLLM resource (bloombee.ai/v1alpha1) as pydantic models.

Field names are snake_case in Python and camelCase on the wire (``kubeconfigSecret``), as in
the YAML users write. The same file is read by ``bloombee up`` and applied with ``kubectl``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from bloombee_contract.launch import DEFAULT_DRAFT_TOKENS, DEFAULT_TREE_WIDTH
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from bloombee_operator.api.status import DistributedLLMStatus, lenient_status

API_VERSION = "bloombee.ai/v1alpha1"
KIND = "DistributedLLM"
MAX_CLUSTERS = 32
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DURATION = re.compile(r"^(\d+)(s|m|h)$")


class ResourceError(ValueError):
    """A DistributedLLM that cannot be used; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(f"{value!r} must be a DNS label: lower-case letters, digits and '-', at most 63")
    return value


class ModelSpec(_Model):
    source: str = Field(min_length=1, description="gguf://package/file.gguf, a .gguf/.safetensors file or HF dir")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class DraftSpec(_Model):
    kind: Literal["none", "early-exit", "prompt-lookup", "model", "head"] = "none"
    layers: int | None = Field(default=None, ge=1)
    max_tokens: int = Field(default=DEFAULT_DRAFT_TOKENS, ge=1, le=64)
    tree_width: int = Field(default=DEFAULT_TREE_WIDTH, ge=1, le=16, description="head: candidates per tree node "
                            "(1: a chain)")  # fmt: skip
    source: str | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> DraftSpec:
        if self.kind == "model" and not self.source:
            raise ValueError("draft.kind 'model' needs draft.source")
        if self.kind == "early-exit" and self.layers is None:
            raise ValueError("draft.kind 'early-exit' needs draft.layers")
        return self


class NodeHint(_Model):
    name: str = Field(max_length=63, json_schema_extra={"pattern": _DNS_LABEL.pattern})
    memory_gi_b: float | None = Field(default=None, gt=0, alias="memoryGiB")
    compute_tflops: float | None = Field(default=None, gt=0, alias="computeTFLOPS")
    # CPU cores the stage placed here requests (the scheduler reserves them; there is no CPU limit).
    cpu: float = Field(default=1.0, ge=0.01, le=1024)

    _name = field_validator("name")(_dns_label)


class ClusterSpec(_Model):
    name: str = Field(max_length=63, json_schema_extra={"pattern": _DNS_LABEL.pattern})
    # A Secret (key ``kubeconfig``) in the resource's namespace; absent: the operator's own cluster.
    kubeconfig_secret: str | None = None
    # How the other clusters reach this cluster's Services: ``<service>.<namespace>.<serviceDomain>``
    # (``svc.clusterset.local`` under the Multi-Cluster Services API; the operator then exports them).
    service_domain: str = Field(default="svc", max_length=200, json_schema_extra={"pattern": _DNS_NAME.pattern})
    node_selector: dict[str, str] = Field(default_factory=dict)
    nodes: list[NodeHint] = Field(default_factory=list)

    _name = field_validator("name")(_dns_label)

    @field_validator("service_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not _DNS_NAME.match(value):
            raise ValueError(f"{value!r} must be a DNS name such as svc or svc.clusterset.local")
        return value


class PlannerSpec(_Model):
    objective: Literal["throughput", "latency"] = "throughput"
    max_micro_batch: int = Field(default=8, ge=1, le=256)
    allow_offload: bool = True
    replan_every: str = Field(default="10m", json_schema_extra={"pattern": _DURATION.pattern})
    # Hysteresis: a new plan replaces the running one only when it predicts this much gain (0.1 = 10%).
    min_gain: float = Field(default=0.1, ge=0, le=10)
    # The load to plan for: sequences users keep generating at once (the plan admits up to this many, fewer
    # when more would not fit or not pay; the rest wait at the gateway), and the tokens of context each holds.
    concurrency: int = Field(default=8, ge=1, le=4096)
    context_tokens: int = Field(default=2048, ge=1, le=1 << 20)

    @field_validator("replan_every")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not _DURATION.match(value):
            raise ValueError(f"{value!r} is not a duration like 30s, 10m or 1h")
        return value

    @property
    def replan_every_s(self) -> float:
        amount, unit = _DURATION.match(self.replan_every).groups()
        return int(amount) * {"s": 1, "m": 60, "h": 3600}[unit]


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=8000, ge=1, le=65535)


class GatewaySpec(_Model):
    replicas: int = Field(default=1, ge=1, le=16)
    # CPU cores each gateway pod requests: it relays frames and samples, the stages compute.
    cpu: float = Field(default=0.25, ge=0.01, le=1024)
    service: ServiceSpec = Field(default_factory=ServiceSpec)


class DistributedLLMSpec(_Model):
    model: ModelSpec
    draft: DraftSpec = Field(default_factory=DraftSpec)
    # Bounded so the API server can cost the CEL rule that checks names are unique (n^2 comparisons).
    clusters: list[ClusterSpec] = Field(min_length=1, max_length=MAX_CLUSTERS)
    planner: PlannerSpec = Field(default_factory=PlannerSpec)
    # auto: each stage compresses a frame only when the codec's time is won back on its measured link.
    compression: Literal["auto", "off", "zstd", "byteplane", "exponent"] = "auto"
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    @property
    def node_count(self) -> int:
        """The nodes the planner may place stages on: each hint, and one for a cluster without hints."""
        return sum(max(1, len(cluster.nodes)) for cluster in self.clusters)

    @field_validator("clusters")
    @classmethod
    def _unique_clusters(cls, clusters: list[ClusterSpec]) -> list[ClusterSpec]:
        names = [c.name for c in clusters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"cluster names must be unique; repeated: {duplicates}")
        return clusters


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None

    _name = field_validator("name")(_dns_label)


class DistributedLLM(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["bloombee.ai/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DistributedLLM"]
    metadata: ObjectMeta
    spec: DistributedLLMSpec
    status: DistributedLLMStatus = Field(default_factory=DistributedLLMStatus)

    @field_validator("status", mode="before")
    @classmethod
    def _readable_status(cls, value: object) -> DistributedLLMStatus:
        return lenient_status(value)


def parse_resource(document: object, origin: str = "<input>") -> DistributedLLM:
    """Validate one YAML/JSON document; errors say which field is wrong and why."""
    if not isinstance(document, dict):
        raise ResourceError(f"{origin}: expected a DistributedLLM object, got {type(document).__name__}")
    try:
        return DistributedLLM.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '(top level)'}: {item['msg']}" for item in error.errors()
        )
        raise ResourceError(f"{origin}: {problems}") from None


def load_resource(path: str | Path) -> DistributedLLM:
    """Read the first DistributedLLM in a YAML file (other kinds in the file are skipped)."""
    path = Path(path)
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except OSError as error:
        raise ResourceError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ResourceError(f"{path}: not valid YAML: {error}") from None
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == KIND:
            return parse_resource(document, str(path))
    raise ResourceError(f"{path}: no document with kind: {KIND}")
