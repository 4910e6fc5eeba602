"""The DistributedLLM CustomResourceDefinition, generated from the pydantic models of the API.

One source of truth: the CRD's structural schema is derived from the JSON schemas of
``DistributedLLMSpec`` (resource.py) and ``DistributedLLMStatus`` (status.py): references
inlined, optional fields as plain properties, JSON Schema's numeric ``exclusiveMinimum`` as
OpenAPI's ``minimum`` + ``exclusiveMinimum: true``, tuples as fixed-length arrays. What a schema
cannot say is added as CEL rules (``x-kubernetes-validations``), mirroring the models'
validators. ``crds/distributedllm.yaml`` and the Helm chart's copy are this module's output:

    python -m bloombee_operator.api.crd > crds/distributedllm.yaml

and a test fails when they drift apart.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from bloombee_operator.api.resource import API_VERSION, KIND, DistributedLLMSpec
from bloombee_operator.api.status import DistributedLLMStatus

GROUP, VERSION = API_VERSION.split("/")
PLURAL, SINGULAR, SHORT_NAMES = "distributedllms", "distributedllm", ["dllm"]
# What the operator keeps on every resource until it has removed its children (kopf's finalizer);
# `bloombee delete` drops it itself where no operator does.
FINALIZER = "bloombee.ai/cleanup"
# Child objects are named <name>-stage-<i>-<plan> (six characters of the plan's hash; i < 100) and
# <name>-gateway, and Services need DNS-1035 labels (63 characters).
MAX_NAME = 47
_KEEP = (
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "format",
)

# Rules that the models' validators enforce and a schema cannot express.
SPEC_RULES = [
    {
        "rule": "self.clusters.all(c, self.clusters.exists_one(d, d.name == c.name))",
        "message": "cluster names must be unique",
        "fieldPath": ".clusters",
    },
    {
        "rule": "self.draft.kind != 'model' || has(self.draft.source)",
        "message": "draft.kind 'model' needs draft.source",
        "fieldPath": ".draft.source",
    },
    {
        "rule": "self.draft.kind != 'early-exit' || has(self.draft.layers)",
        "message": "draft.kind 'early-exit' needs draft.layers",
        "fieldPath": ".draft.layers",
    },
]
ROOT_RULES = [
    {
        "rule": f"self.metadata.name.size() <= {MAX_NAME} && "
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": f"metadata.name must be a DNS-1035 label of at most {MAX_NAME} characters (children are named "
        "<name>-stage-<i>-<plan> and <name>-gateway)",
    },
]


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema node as a Kubernetes structural-schema node."""
    if "$ref" in node:
        resolved = _structural(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        kept = {k: v for k, v in node.items() if k in ("default", "description") and v is not None}
        return {**resolved, **kept}
    if "anyOf" in node:  # Optional[X]: X itself; absence is the "null"
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express {node['anyOf']} in a structural schema")
        merged = {**options[0], **{k: v for k, v in node.items() if k in ("description", "default")}}
        return _structural(merged, defs)
    out = {key: node[key] for key in _KEEP if key in node and not (key == "default" and node[key] is None)}
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "const" in node:
        out["enum"] = [node["const"]]
    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {name: _structural(child, defs) for name, child in node["properties"].items()}
            for name, child in out["properties"].items():
                # A nested object left out gets its fields' defaults, as pydantic's default_factory does;
                # only where an empty object is valid (the API server refuses a default that is not).
                optional = name not in node.get("required", [])
                if child.get("type") == "object" and "properties" in child and optional and not child.get("required"):
                    child.setdefault("default", {})
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if node.get("type") == "array":
        if "prefixItems" in node:  # a tuple: a structural schema has one item schema, so they must agree
            items = [_structural(item, defs) for item in node["prefixItems"]]
            if any(item != items[0] for item in items):
                raise ValueError(f"cannot express the tuple {node['prefixItems']} in a structural schema")
            out["items"] = items[0]
        else:
            out["items"] = _structural(node["items"], defs)
    out.update({key: value for key, value in node.items() if key.startswith("x-kubernetes-")})
    return out


def spec_schema() -> dict[str, Any]:
    schema = DistributedLLMSpec.model_json_schema(by_alias=True, mode="validation")
    structural = _structural(schema, schema.get("$defs", {}))
    structural["x-kubernetes-validations"] = SPEC_RULES
    return structural


def status_schema() -> dict[str, Any]:
    schema = DistributedLLMStatus.model_json_schema(by_alias=True, mode="validation")
    structural = _structural(schema, schema.get("$defs", {}))
    # kopf keeps a little state of its own under status (its "touch" to wake a delayed handler);
    # pruning it would leave delayed handlers asleep.
    structural["x-kubernetes-preserve-unknown-fields"] = True
    return structural


def crd_manifest() -> dict[str, Any]:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Stages", "type": "string", "jsonPath": ".status.stagesReady"},
        {"name": "Tokens/s", "type": "number", "jsonPath": ".status.plan.predictedTokensPerSecond"},
        {"name": "Plan", "type": "string", "jsonPath": ".status.servingPlan"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                # A bound on the name lets the API server cost the ROOT_RULES regex.
                                "metadata": {"type": "object",
                                             "properties": {"name": {"type": "string", "maxLength": 253}}},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": ROOT_RULES,
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m bloombee_operator.api.crd` from api/; do not edit by hand.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
