"""The pods' faults in the resource's words (bloombee_operator.faults): pure, on pod statuses shaped as
a kubelet and the scheduler write them (the real-node tests in test_real_nodes.py meet the real ones)."""

from __future__ import annotations

from bloombee_contract.status import Reason
from bloombee_operator.faults import pod_faults

IMAGE = "10.199.255.1:5000/bloombee/stage@sha256:" + "0" * 64


def pod(child: str, *, conditions=(), statuses=(), limit: str = "2304Mi") -> dict:
    return {"metadata": {"name": f"{child}-5d8f-abcde", "labels": {"bloombee.ai/name": child}},
            "spec": {"containers": [{"name": "stage", "image": IMAGE,
                                     "resources": {"limits": {"memory": limit}}}]},
            "status": {"conditions": list(conditions), "containerStatuses": list(statuses)}}  # fmt: skip


def test_an_image_that_cannot_be_pulled_is_named_with_the_kubelets_reason():
    waiting = {"name": "stage", "image": IMAGE, "restartCount": 0, "state": {"waiting": {
        "reason": "ErrImagePull", "message": "failed to resolve reference: not found"}}}  # fmt: skip
    (fault,) = pod_faults([pod("llm-stage-0", statuses=[waiting])], {"llm-stage-0": 1.1})
    assert fault.reason == Reason.IMAGE_PULL_FAILED and fault.child == "llm-stage-0"
    assert IMAGE in fault.message and "ErrImagePull" in fault.message and "not found" in fault.message


def test_an_oom_kill_names_the_container_its_limit_and_the_plans_budget():
    restarted = {"name": "stage", "restartCount": 2, "state": {"running": {}},
                 "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}  # fmt: skip
    (fault,) = pod_faults([pod("llm-stage-1", statuses=[restarted], limit="200Mi")], {"llm-stage-1": 1.12})
    assert fault.reason == Reason.OOM_KILLED
    assert "container stage" in fault.message and "200Mi" in fault.message and "1.12 GiB" in fault.message


def test_a_pod_no_node_can_run_carries_the_schedulers_message():
    message = "0/1 nodes are available: 1 Insufficient cpu."
    pending = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    (fault,) = pod_faults([pod("llm-gateway", conditions=[pending])], {})
    assert fault.reason == Reason.UNSCHEDULABLE and message in fault.message


def test_running_pods_and_the_ordinary_waits_are_no_fault():
    creating = {"name": "stage", "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}
    running = {"name": "stage", "restartCount": 0, "state": {"running": {}}}
    scheduled = {"type": "PodScheduled", "status": "True"}
    pods = [pod("a", conditions=[scheduled], statuses=[creating]), pod("b", conditions=[scheduled], statuses=[running]),
            pod("c")]  # fmt: skip
    assert pod_faults(pods, {}) == []


def test_two_replicas_with_one_fault_say_it_once():
    waiting = {"name": "stage", "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                          "message": "Back-off pulling image"}}}
    faults = pod_faults([pod("llm-gateway", statuses=[waiting]), pod("llm-gateway", statuses=[waiting])], {})
    assert len(faults) == 1
