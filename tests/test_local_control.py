"""The operator's reconcile steps (reconcile.py) run end to end with the local backend: real stage
processes and a real gateway on loopback, the planner's spans, a scale-out, a crash, a delete."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest
from bloombee_contract.route import Route
from bloombee_operator import reconcile
from bloombee_operator.backends.local import LocalBackend
from pipelines import TEST_CA

# Tiny Llama layers are ~150 KB of weights and 64 KB of KV (1 sequence x 256 tokens): a node of
# 0.0008 GiB holds at most 4 layers, one of 0.0005 GiB at most 2, so the plan must use them all.
TWO_NODES = [{"name": "a", "memoryGiB": 0.0008}, {"name": "b", "memoryGiB": 0.0008}]
THREE_NODES = [{"name": n, "memoryGiB": 0.0005} for n in ("a", "b", "c")]


def body(source: str, nodes: list[dict]) -> dict:
    return {"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM",
            "metadata": {"name": "tiny", "namespace": "default", "generation": 1},
            "spec": {"model": {"source": source}, "clusters": [{"name": "home", "nodes": nodes}],
                     "planner": {"allowOffload": False, "concurrency": 1, "contextTokens": 256},
                     "compression": "off"}}  # fmt: skip


def apply_outcome(resource: dict, outcome: reconcile.Outcome) -> None:
    resource["status"] = outcome.applied_to(reconcile.read(resource).status)


def chat(endpoint: str) -> dict:
    data = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                       "temperature": 0, "ignore_eos": True}).encode()  # fmt: skip
    request = urllib.request.Request(f"{endpoint}/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def stage(resource: dict, index: int) -> str:
    """Stage ``index``'s name under the resource's plan (``<name>-stage-<i>-<plan>``)."""
    return f"{resource['metadata']['name']}-stage-{index}-{resource['status']['plan']['planHash'][:6]}"


def conditions(resource: dict) -> dict[str, dict]:
    return {c["type"]: c for c in resource["status"]["conditions"]}


def spans(backend: LocalBackend) -> dict[str, str]:
    """Stage name -> the --layers its live process was started with."""
    return {p.name: p.command[p.command.index("--layers") + 1] for p in backend.processes.values()
            if "-stage-" in p.name and p.alive}  # fmt: skip


@pytest.mark.model
def test_create_scale_crash_and_delete(tmp_path, tiny_dir):
    backend = LocalBackend(tmp_path / "run", threads_per_stage=1, ca=TEST_CA, hung_after_s=2.0)
    resource = body(str(tiny_dir), TWO_NODES)
    try:
        assert reconcile.readiness(reconcile.read(resource), backend) == reconcile.Outcome()  # deploy's to say
        created = reconcile.deploy(reconcile.read(resource), backend)
        apply_outcome(resource, created)
        plan = resource["status"]["plan"]
        assert [s["layers"] for s in plan["stages"]] == [[0, 2], [2, 6]]
        assert spans(backend) == {stage(resource, 0): "0:2", stage(resource, 1): "2:6"}
        assert {e.reason for e in created.events} == {"Planned", "Deployed"}
        endpoint = resource["status"]["endpoint"]
        assert chat(endpoint)["usage"]["completion_tokens"] == 4

        apply_outcome(resource, reconcile.keep(reconcile.read(resource), backend))
        assert resource["status"]["phase"] == "Ready" and resource["status"]["stagesReady"] == "2/2"

        # planner.replanEvery (10m) later the timer plans again; nothing changed, so the plan is
        # kept (hysteresis) and no process restarts.
        pids = {name: p.popen.pid for name, p in backend.processes.items()}
        later = reconcile.keep(reconcile.read(resource), backend, clock=lambda: time.time() + 601)
        apply_outcome(resource, later)
        planned = {c["type"]: c for c in resource["status"]["conditions"]}["Planned"]
        assert planned["reason"] == "Kept" and "< 10%" in planned["message"]
        assert not later.events and {name: p.popen.pid for name, p in backend.processes.items()} == pids

        # Scale out: three smaller nodes; the running plan cannot hold, so a new one is adopted.
        # Make-before-break: the new plan's three stages start beside the old two, the gateway (the
        # same process, at the same address) moves over, and the next timer step removes the old.
        old_plan, old_stages = resource["status"]["plan"]["planHash"], dict(spans(backend))
        gateway_pid = backend.processes["tiny-gateway"].popen.pid
        resource["spec"]["clusters"][0]["nodes"] = THREE_NODES
        scaled = reconcile.deploy(reconcile.read(resource), backend)
        apply_outcome(resource, scaled)
        new_stages = {stage(resource, i): layers for i, layers in enumerate(["0:2", "2:4", "4:6"])}
        assert spans(backend) == {**old_stages, **new_stages}  # both plans run side by side
        assert {"Planned", "Deployed", "Switching"} <= {e.reason for e in scaled.events}
        switching = conditions(resource)["PlanSwitching"]
        assert switching["status"] == "True" and old_plan in switching["message"], switching
        assert resource["status"]["phase"] == "Ready"  # the old plan served while the new one started
        assert resource["status"]["endpoint"] == endpoint  # the gateway kept its address and its process
        assert backend.processes["tiny-gateway"].popen.pid == gateway_pid
        assert chat(endpoint)["usage"]["completion_tokens"] == 4
        switched = reconcile.keep(reconcile.read(resource), backend)
        apply_outcome(resource, switched)
        assert spans(backend) == new_stages
        done = conditions(resource)["PlanSwitching"]
        assert done["status"] == "False" and done["reason"] == "Switched", done
        assert [e.reason for e in switched.events] == ["Switched"]
        assert resource["status"]["servingPlan"] == resource["status"]["plan"]["planHash"] != old_plan
        assert chat(endpoint)["usage"]["completion_tokens"] == 4

        # A stage crashes: the timer step restarts it on its port, and the pipeline answers again.
        crashed = backend.processes[stage(resource, 1)]
        os.kill(crashed.popen.pid, signal.SIGKILL)
        crashed.popen.wait()
        # Readiness alone (what the operator runs as soon as a child's readiness changes) says so
        # and restores nothing: that is the timer's.
        alone = reconcile.readiness(reconcile.read(resource), backend)
        assert (alone.status["phase"], alone.status["stagesReady"], alone.events) == ("Deploying", "2/3", [])
        assert crashed.popen.poll() is not None and backend.processes[stage(resource, 1)] is crashed
        kept = reconcile.keep(reconcile.read(resource), backend)
        apply_outcome(resource, kept)
        assert [e.reason for e in kept.events] == ["Restored"] and stage(resource, 1) in kept.events[0].message
        degraded = {c["type"]: c for c in resource["status"]["conditions"]}["Degraded"]
        assert degraded["status"] == "True" and stage(resource, 1) in degraded["message"]
        assert backend.processes[stage(resource, 1)].url == crashed.url
        assert chat(endpoint)["usage"]["completion_tokens"] == 4
        apply_outcome(resource, reconcile.readiness(reconcile.read(resource), backend))
        ready = {c["type"]: c for c in resource["status"]["conditions"]}
        assert resource["status"]["phase"] == "Ready" and ready["Degraded"]["status"] == "False"
        apply_outcome(resource, reconcile.keep(reconcile.read(resource), backend))
        assert resource["status"]["phase"] == "Ready"

        # A stage hangs (SIGSTOP): it is alive but answers nothing; once it has been silent for
        # hung_after_s, the timer kills and restarts it.
        hung = backend.processes[stage(resource, 2)]
        os.kill(hung.popen.pid, signal.SIGSTOP)
        assert not reconcile.keep(reconcile.read(resource), backend).events  # silent, not yet for long
        time.sleep(2.5)
        kept = reconcile.keep(reconcile.read(resource), backend)
        assert [e.reason for e in kept.events] == ["Restored"] and stage(resource, 2) in kept.events[0].message
        assert hung.popen.poll() is not None and backend.processes[stage(resource, 2)].popen.pid != hung.popen.pid
        assert chat(endpoint)["usage"]["completion_tokens"] == 4

        processes = list(backend.processes.values())
        assert reconcile.cleanup(reconcile.read(resource), backend) == len(processes) == 4
        assert not backend.processes and all(p.popen.poll() is not None for p in processes)
    finally:
        backend.stop()


@pytest.mark.model
def test_the_parts_measure_themselves_and_the_plan_is_costed_on_it(tmp_path, tiny_dir):
    """Planned on hints first; once every stage is ready, their profiling runs (alone, then all at
    once) fill status.profiles and the plan's predictions become the model's on them; after
    traffic, the next due re-plan adds what the gateway measured of its rounds."""
    from bloombee_operator.planner import evaluate
    from bloombee_operator.planning import plan_from_status, planner_inputs

    backend = LocalBackend(tmp_path / "run", threads_per_stage=1, ca=TEST_CA)
    resource = body(str(tiny_dir), TWO_NODES)
    try:
        apply_outcome(resource, reconcile.deploy(reconcile.read(resource), backend))
        hinted = resource["status"]["plan"]["predictedLatencyMs"]
        apply_outcome(resource, reconcile.keep(reconcile.read(resource), backend))
        assert resource["status"]["phase"] == "Ready" and "profiles" not in resource["status"]
        calibrated = reconcile.keep(reconcile.read(resource), backend)  # the first calibration
        apply_outcome(resource, calibrated)
        profiles = resource["status"]["profiles"]
        nodes = [stage["node"] for stage in resource["status"]["plan"]["stages"]]
        assert [entry["node"] for entry in profiles["nodes"]] == nodes
        for entry in profiles["nodes"]:
            assert [size for size, ms in entry["layerMsAt"] if ms > 0] == [1, 2, 4, 8]  # maxMicroBatch 8
        assert "headMsAt" in profiles["nodes"][-1] and "headMs" not in profiles["nodes"][0]
        assert all(entry["hostGBps"] > 0 for entry in profiles["nodes"])  # each stage's streaming rate
        (host,) = profiles["hosts"]
        assert host["allNodes"] and host["stages"] == 2 and host["parallelism"] > 0
        assert "gateway" not in profiles  # nothing has been asked yet

        # status.plan is what the model predicts of the running plan on those measurements
        current = reconcile.read(resource)
        inputs = planner_inputs(current, backend.model_shape(str(tiny_dir)), current.status.links,
                                current.status.profiles)  # fmt: skip
        running = plan_from_status(current.status.plan)
        again = evaluate(inputs.profile, {n.name: n for n in inputs.nodes}, inputs.links,
                         [s.node for s in running.stages], [s.layers[1] - s.layers[0] for s in running.stages],
                         running.micro_batch, running.batch, inputs.workload.context, options=inputs.options,
                         relay=running.relay_hops, resident=current.status.plan.max_sequences)  # fmt: skip
        assert current.status.plan.predicted_latency_ms == pytest.approx(again.latency_s * 1000, abs=1e-3)
        assert current.status.plan.predicted_latency_ms != hinted

        endpoint = resource["status"]["endpoint"]
        usages = [chat(endpoint)["usage"] for _ in range(2)]
        assert [usage["completion_tokens"] for usage in usages] == [4, 4]
        later = reconcile.keep(reconcile.read(resource), backend, clock=lambda: time.time() + 601)
        apply_outcome(resource, later)
        gateway = resource["status"]["profiles"]["gateway"]
        assert gateway["steps"] > 0 and gateway["transportMs"] > 0 and gateway["frameMs"] >= 0
        assert gateway["roundOverheadMs"] >= 0
        # the prompts the stages computed (a prefix-cache hit is not computed), over 8 rounds (no drafting)
        computed = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        assert computed > 0 and gateway["prefillPerRound"] == pytest.approx(computed / 8, abs=1e-4)
        prompts = sum(1 for u in usages if u["prompt_tokens"] > u["prompt_tokens_details"]["cached_tokens"])
        assert gateway["promptPositions"] == pytest.approx(computed / prompts, abs=1e-4)
        # one generation at a time: each row after a chat's first left alone, its own part timed
        assert gateway["aloneOverheadMs"] > 0
        first = resource["status"]["profiles"]["nodes"][0]  # it pushed frames onward: its link as they found it
        assert first["onwardRttMs"] > 0 and "onwardRttMs" not in resource["status"]["profiles"]["nodes"][-1]
    finally:
        backend.stop()


def test_a_bad_resource_fails_permanently_with_the_field_named(tmp_path):
    backend = LocalBackend(tmp_path / "run", ca=TEST_CA)
    resource = body("/nowhere", TWO_NODES)
    resource["spec"]["planner"]["maxMicroBatch"] = 0
    with pytest.raises(reconcile.Permanent) as failed:
        reconcile.read(resource)
    outcome = failed.value.outcome
    assert outcome.status["phase"] == "Failed"
    assert "spec.planner.maxMicroBatch" in outcome.conditions[0].message
    assert outcome.events[0].type == "Warning" and outcome.events[0].reason == "InvalidSpec"
    assert not backend.processes


@pytest.mark.model
def test_a_demand_larger_than_the_nodes_hold_is_planned_for_what_fits(tmp_path, tiny_dir):
    backend = LocalBackend(tmp_path / "run", threads_per_stage=1, ca=TEST_CA)
    resource = body(str(tiny_dir), TWO_NODES)
    resource["spec"]["planner"]["concurrency"] = 16
    try:
        apply_outcome(resource, reconcile.deploy(reconcile.read(resource), backend))
        plan = resource["status"]["plan"]
        admitted = plan["maxSequences"]
        assert 1 <= admitted == plan["batch"] < 16
        planned = {c["type"]: c for c in resource["status"]["conditions"]}["Planned"]
        assert planned["status"] == "True" and f"admits {admitted} of the 16 sequences" in planned["message"]
        gateway = next(p for name, p in backend.processes.items() if name.endswith("-gateway"))
        route = Route.read(gateway.command[gateway.command.index("--route-file") + 1])
        assert route.max_sequences == admitted and route.plan == plan["planHash"]
        assert chat(resource["status"]["endpoint"])["usage"]["completion_tokens"] == 4
    finally:
        backend.stop()
