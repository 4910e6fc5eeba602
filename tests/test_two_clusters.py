"""Two real clusters, each with a real node (containerd, the kubelet, kube-proxy, CoreDNS, the
scheduler), whose pod networks are joined through a router with real packet delay
(``scripts/cluster.sh up --clusters 2 --delay-ms --nodes real``): the two-cluster example end to end.

The operator runs from its image as a pod in ``eu`` (``helm install`` with both images from the
machine's registry, by digest) and reaches ``us`` through the kubeconfig Secret; the probe pods
measure the link through the API servers' service proxy and across the router; the plan is the
planner's optimum for those measurements; stages run as pods of the stage image in both clusters
and find each other by their ``svc.clusterset.local`` names, which each node's CoreDNS serves; a
chat answers with transformers' greedy tokens; deleting the resource removes the children in both
clusters.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import clusters as k8s
import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.model, pytest.mark.timeout(1200)]
DELAY_MS = 20  # one way, between the clusters
NAMESPACE = "llm"
NAME = "smollm2-geo"  # as the example names it


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, Path]]:
    k8s.needs_root()
    with k8s.control_planes(f"duo{os.getpid()}", 2, delay_ms=DELAY_MS, nodes="real") as (eu, us):
        yield {"eu": eu, "us": us}


def example() -> dict:
    """The two-cluster example, with eu's nodes too small for the model alone: the plan must use us.
    Each cluster's one real node has this machine's two cores: a stage asks for half of one."""
    (body,) = [d for d in yaml.safe_load_all((k8s.ROOT / "examples" / "smollm2-two-clusters.yaml").read_text()) if d]
    for node in body["spec"]["clusters"][0]["nodes"]:
        node["memoryGiB"] = {"gpu-a": 0.1, "cpu-b": 0.2}[node["name"]]
    for cluster in body["spec"]["clusters"]:
        for node in cluster["nodes"]:
            node["cpu"] = 0.5
    body["metadata"]["namespace"] = NAMESPACE
    return body


def test_the_two_cluster_example_across_a_delayed_link(clusters, smollm2_reference):
    from bloombee_operator.api.resource import parse_resource
    from bloombee_operator.model_shape import model_shape
    from bloombee_operator.planner import plan
    from bloombee_operator.planning import plan_status, planner_inputs
    from kubernetes import client, config
    from test_pipeline_smollm2 import chat_request, reference_tokens

    eu, us = (config.new_client_from_config(str(clusters[name])) for name in ("eu", "us"))
    k8s.install_crd(eu)
    for api in (eu, us):
        k8s.create_namespace(api, NAMESPACE)
    body = example()
    secret = body["spec"]["clusters"][1]["kubeconfigSecret"]
    client.CoreV1Api(eu).create_namespaced_secret(NAMESPACE, {"metadata": {"name": secret}, "data": {
        "kubeconfig": base64.b64encode(clusters["us"].read_bytes()).decode()}})  # fmt: skip
    images = k8s.registry_images(clusters["eu"])
    installed = k8s.helm(clusters["eu"], "install", "bloombee", "charts/bloombee", "--namespace", "bloombee-system",
                         "--create-namespace", *k8s.image_values(images))  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    objects = client.CustomObjectsApi(eu)
    objects.create_namespaced_custom_object(k8s.GROUP, k8s.VERSION, NAMESPACE, k8s.PLURAL, body)

    def ready() -> dict | None:
        status = (k8s.get_resource(eu, NAMESPACE, NAME) or {}).get("status", {})
        return status if status.get("phase") == "Ready" else None

    status = k8s.wait_for("the two-cluster resource to be Ready", ready, timeout_s=900, interval_s=2)

    # The link was measured for real, across the router: at least its two delays.
    link = next(e for e in status["links"] if (e["from"], e["to"]) == ("eu", "us"))
    assert 2 * DELAY_MS <= link["rttMs"] < 2 * DELAY_MS + 40 and link["mbps"] > 0, link
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["LinksMeasured"]["status"] == "True" and conditions["LinksMeasured"]["reason"] == "Measured"
    # ... and the plan is the planner's optimum for those measurements.
    stored = parse_resource(k8s.get_resource(eu, NAMESPACE, NAME))
    inputs = planner_inputs(stored, model_shape(stored.spec.model.source), stored.status.links)
    best = plan_status(plan(inputs.profile, inputs.nodes, inputs.links, inputs.workload, inputs.options), inputs,
                       "now")  # fmt: skip
    chosen = stored.status.plan
    assert [(s.cluster, s.node, s.layers) for s in chosen.stages] == [
        (s.cluster, s.node, s.layers) for s in best.stages]  # fmt: skip
    assert chosen.micro_batch == best.micro_batch
    print(f"link eu->us {link}; plan {[(s.cluster, s.node, s.layers) for s in chosen.stages]}, "
          f"micro-batch {chosen.micro_batch}, predicted {chosen.predicted_tokens_per_second:.1f} tokens/s")
    placed = {s.cluster for s in stored.status.plan.stages}
    assert placed == {"eu", "us"}, stored.status.plan

    # Children where the plan put them; none in us carries an owner reference (they do not cross).
    remote = client.AppsV1Api(us).list_namespaced_deployment(NAMESPACE).items
    plan = stored.status.plan.plan_hash[:6]  # a stage's name carries its plan's hash
    assert {d.metadata.name for d in remote} >= {f"smollm2-geo-stage-{i}-{plan}" for i, s in
                                                 enumerate(stored.status.plan.stages) if s.cluster == "us"}  # fmt: skip
    assert all(not d.metadata.owner_references for d in remote)
    # ... and every pod of them, in both clusters, runs the stage image the chart named.
    for api in (eu, us):
        pods = client.CoreV1Api(api).list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/instance="
                                                         + NAME).items  # fmt: skip
        assert pods and {c.image for p in pods for c in p.spec.containers} == {images["stage"]}

    # Ready counts the stages; the gateway's own readiness probe (every stage answering it) may trail it.
    gateway = k8s.wait_for("the gateway pod to be Ready",
                           lambda: k8s.ready_pod_ip(eu, NAMESPACE, "app.kubernetes.io/component=gateway"),
                           timeout_s=300, interval_s=1)  # fmt: skip
    question = chat_request("What is the capital of France?", model=NAME)
    request = urllib.request.Request(f"http://{gateway}:8000/v1/chat/completions", data=json.dumps(question).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=300) as reply:
        answer = json.loads(reply.read())
    assert answer["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, answer["prompt_token_ids"])

    objects.delete_namespaced_custom_object(k8s.GROUP, k8s.VERSION, NAMESPACE, k8s.PLURAL, NAME)
    k8s.wait_for("the resource to go (finalizer released)", lambda: k8s.get_resource(eu, NAMESPACE, NAME) is None,
                 timeout_s=180)  # fmt: skip
    for api in (eu, us):
        k8s.wait_for("the children in both clusters to go", lambda a=api: not (
            client.AppsV1Api(a).list_namespaced_deployment(NAMESPACE).items
            or client.CoreV1Api(a).list_namespaced_pod(NAMESPACE).items), timeout_s=180)  # fmt: skip
    assert k8s.helm(clusters["eu"], "uninstall", "bloombee", "--namespace", "bloombee-system").returncode == 0
