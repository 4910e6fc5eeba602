"""Measured costs in the planner (issue: plans that match what runs): the stages' fit of their
costs, the cost model's measured terms, the DP on them against brute force, and how status.profiles
and link delays reach the planner's inputs. Pure functions; the pipeline's own measurements are in
test_local_control.py."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
from bloombee_operator.api.resource import parse_resource
from bloombee_operator.api.status import GatewayProfile, HostProfile, LinkStatus, NodeProfile, ProfilesStatus
from bloombee_operator.planner import Link, Links, ModelProfile, Node, Options, Workload, evaluate, plan
from bloombee_operator.planner.cost import GATEWAY, host_bound, interpolate, shared_slowdown
from bloombee_operator.planning import PlannerInputs, at_load, gateway_profile, plan_status, profile_request
from bloombee_operator.planning_inputs import links_from_entries, with_profiles
from bloombee_operator.shared_host import overlap_counts, traffic_parallelism
from bloombee_stage.serving.costs import CostRecorder, LinkRecorder, StepCost, fit_line
from test_planner import brute_force


def test_a_line_is_recovered_and_a_pause_does_not_move_it():
    line = fit_line([(1, 3.0), (2, 5.0), (4, 9.0)])
    assert (line.fixed, line.per_token) == pytest.approx((1.0, 2.0))
    assert fit_line([(2, 4.0), (2, 6.0)]).per_token == 0 and fit_line([(2, 4.0)]).fixed == 4.0  # one size: all fixed
    # a fit through a negative fixed cost is taken through the origin instead
    through_origin = fit_line([(1, 0.5), (2, 3.0)])
    assert through_origin.fixed == 0 and through_origin.per_token == pytest.approx((0.5 + 6) / 5)
    recorder = CostRecorder(layers=2)
    for tokens, seconds in [(1, 0.002), (1, 0.002), (1, 0.5), (2, 0.004), (2, 0.004), (2, 0.004)]:
        recorder.record(StepCost(tokens, tokens, seconds, seconds, 0.001, 0.001))
    fitted = recorder.fit()
    # medians per step size: the one 0.5 s pause among the one-token steps is not in the fit
    assert fitted["layerMsAt"] == [[1, 1.0], [2, 2.0]] and fitted["msPerLayerToken"] == pytest.approx(1.0)
    assert fitted["stepMs"] == pytest.approx(1.0) and fitted["samples"] == 6
    # the fit is kept until the next step (a metrics scrape reads it once per term)
    fitted["samples"] = -1
    assert recorder.fit()["samples"] == 6
    recorder.record(StepCost(4, 4, 0.008, 0.008, 0.001, 0.001))
    assert recorder.fit()["samples"] == 7 and recorder.fit()["layerMsAt"][-1] == [4, 4.0]


def test_the_onward_link_is_fitted_from_the_frames_sent():
    link = LinkRecorder()
    for size, seconds in [(1000, 0.011), (1000, 0.011), (1000, 0.9), (2000, 0.012), (3000, 0.013)]:
        link.record(size, seconds)
    fitted = link.fit()  # 10 ms round trip, 1 MB/s: 8 Mbit/s; the 0.9 s outlier is not the median
    assert fitted["rttMs"] == pytest.approx(10.0) and fitted["mbps"] == pytest.approx(8.0) and fitted["samples"] == 5
    assert LinkRecorder().fit() == {}


def test_interpolation_between_and_past_the_measured_sizes():
    points = ((1.0, 2.0), (2.0, 3.0), (4.0, 3.5))
    assert [interpolate(points, x) for x in (1, 1.5, 2, 3, 4, 8)] == pytest.approx([2, 2.5, 3, 3.25, 3.5, 4.5])
    assert interpolate(((1.0, 2.0),), 5) == 2.0
    node = Node("n", "c", 1e9, 0.001, 0.0005, layer_points=points, head_points=((1.0, 10.0), (2.0, 12.0)))
    assert node.layer(3) == pytest.approx(3.25) and node.head(2) == 12.0
    assert Node("n", "c", 1e9, 0.001, 0.0005).layer(3) == pytest.approx(0.0025)


MODEL = ModelProfile(num_layers=6, weight_bytes_per_layer=1e6, kv_bytes_per_token_per_layer=1e3,
                     hidden_bytes_per_token=2e3)  # fmt: skip


def test_measured_terms_add_where_the_model_says():
    node = Node("a", "c", 1e9, 0.002, 0.001)
    measured = dataclasses.replace(node, step_seconds=0.003, head_seconds=0.010, head_seconds_per_token=0.001)
    links = Links(between={(GATEWAY, "c"): Link(0.001, 1e12)}, local=Link(0.001, 1e12))
    base = evaluate(MODEL, {"a": node}, links, ["a"], [6], 2, 4, 64)
    options = Options(round_overhead_s=0.004)
    framed = dataclasses.replace(links, frame_s=0.0005)
    full = evaluate(MODEL, {"a": measured}, framed, ["a"], [6], 2, 4, 64, options=options)
    # one stage: step + head(2) on it, two crossings (in and out) with their frame cost, the gateway once
    assert full.cycle_s - base.cycle_s == pytest.approx(0.003 + 0.012 + 2 * 0.0005 + 0.004)
    assert full.stages[0].seconds - base.stages[0].seconds == pytest.approx(0.015)


def test_a_shared_host_bounds_the_round():
    nodes = {name: Node(name, "c", 1e9, 0.002, 0.0, host="box") for name in "ab"}
    links = Links(between={(GATEWAY, "c"): Link(0.0, 1e12)}, local=Link(0.0, 1e12))
    free = evaluate(MODEL, nodes, links, ["a", "b"], [3, 3], 1, 4, 64)
    shared = evaluate(MODEL, nodes, links, ["a", "b"], [3, 3], 1, 4, 64, options=Options(host_parallelism={"box": 1.0}))
    # four micro-batches each through both stages of 6 ms, on a host that does one at a time
    assert free.round_s == pytest.approx(4 * 0.006) and shared.round_s == pytest.approx(4 * 0.012)
    assert host_bound(["box", None], [0.006, 0.006], 4, Options(host_parallelism={"box": 2.0})) == pytest.approx(0.012)


def test_micro_batches_in_flight_on_a_shared_host_slow_each_others_trip():
    """With two micro-batches in flight both stages of the host compute at once, each at 2 / 1.6 of
    its time alone (the round is then that trip, above the host bound); one micro-batch runs alone."""
    nodes = {name: Node(name, "c", 1e9, 0.002, 0.0, host="box") for name in "ab"}
    links = Links(between={(GATEWAY, "c"): Link(0.0, 1e12)}, local=Link(0.0, 1e12))
    options = Options(host_parallelism={"box": 1.6})
    alone = evaluate(MODEL, nodes, links, ["a", "b"], [3, 3], 4, 4, 64, options=options)
    beside = evaluate(MODEL, nodes, links, ["a", "b"], [3, 3], 2, 4, 64, options=options)
    free = evaluate(MODEL, nodes, links, ["a", "b"], [3, 3], 2, 4, 64)
    assert alone.cycle_s == pytest.approx(2 * 0.006)
    assert beside.cycle_s == pytest.approx(free.cycle_s * 2 / 1.6) and beside.round_s == pytest.approx(beside.cycle_s)
    assert shared_slowdown(["box", "box", "box", None], 2, options) == {"box": pytest.approx(2 / 1.6)}
    assert shared_slowdown(["box", None], 4, options) == {}  # one stage there: nothing beside it


def measured_instance(rng: random.Random):
    """Alike measured nodes on one host (what ``bloombee up`` plans), with random measured terms."""
    count = rng.randint(1, 3)
    points = tuple(sorted((float(m), rng.uniform(0.001, 0.004) * (1 + 0.2 * m)) for m in rng.sample([1, 2, 4], 2)))
    head = ((1.0, rng.uniform(0.0, 0.02)), (4.0, rng.uniform(0.02, 0.05)))
    node = Node("n", "c", rng.choice([2e7, 6e7, 1e9]), points[0][1], 0.0, step_seconds=rng.uniform(0, 0.003),
                host="box", layer_points=points, head_points=head)  # fmt: skip
    nodes = [dataclasses.replace(node, name=f"n{i}") for i in range(count)]
    rtt = rng.choice([0.0002, 0.05])
    links = Links(between={(GATEWAY, "c"): Link(rtt, 1e9)}, local=Link(rtt, 1e9), frame_s=rng.uniform(0, 0.003))
    options = Options(max_micro_batch=4, allow_offload=False, relay_hops=False, round_overhead_s=rng.uniform(0, 0.002),
                      host_parallelism={"box": rng.uniform(0.8, 2.0)})  # fmt: skip
    return MODEL, nodes, links, Workload(batch=rng.choice([1, 4, 8]), context=256), options


@pytest.mark.parametrize("seed", range(40))
def test_the_dp_on_measured_costs_on_a_shared_host_equals_brute_force(seed):
    model, nodes, links, workload, options = measured_instance(random.Random(f"measured-{seed}"))
    expected = brute_force(model, nodes, links, workload, options)
    result = plan(model, nodes, links, workload, options)
    assert result.tokens_per_second == pytest.approx(expected, rel=1e-9)


def resource(delay_nodes: int = 3) -> object:
    return parse_resource({
        "apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM", "metadata": {"name": "m"},
        "spec": {"model": {"source": "/m"},
                 "clusters": [{"name": "home", "nodes": [{"name": n, "memoryGiB": 1} for n in "abc"[:delay_nodes]]}]},
    }, "m")  # fmt: skip


def test_profiles_of_one_host_are_pooled_and_cover_its_unmeasured_nodes():
    nodes = [Node(f"home-{n}", "home", 1e9, 0.0003, 0.0001) for n in "abc"]
    profiles = ProfilesStatus(
        nodes=[NodeProfile(node="home-a", host="box", ms_per_layer=2.0, ms_per_layer_token=0.4, step_ms=0.2,
                           layer_ms_at=[(1, 2.0), (2, 3.0)], samples=10),
               NodeProfile(node="home-b", host="box", ms_per_layer=4.0, ms_per_layer_token=0.2, head_ms=10.0,
                           head_ms_per_token=2.0, layer_ms_at=[(1, 4.0), (4, 5.0)], head_ms_at=[(1, 11.0)],
                           samples=30)],
        hosts=[HostProfile(name="box", parallelism=1.5, stages=2, all_nodes=True)],
        gateway=GatewayProfile(frame_ms=1.5, round_overhead_ms=0.5),
    )  # fmt: skip
    updated, links, options = with_profiles(nodes, Links(), Options(), profiles)
    a, b, c = updated
    assert a == dataclasses.replace(b, name=a.name) == dataclasses.replace(c, name=a.name)  # c too: one host
    assert a.host == "box" and a.seconds_per_layer == pytest.approx((2.0 * 10 + 4.0 * 30) / 40 / 1000)
    assert [x for point in a.layer_points for x in point] == pytest.approx([1, 0.003, 2, 0.003, 4, 0.005])
    assert a.head_points[0] == pytest.approx((1, 0.011)) and a.step_seconds == pytest.approx(0.0002)
    assert links.frame_s == pytest.approx(0.0015) and options.round_overhead_s == pytest.approx(0.0005)
    assert options.host_parallelism == {"box": 1.5}
    assert with_profiles(nodes, Links(), Options(), None)[0] == nodes


def test_a_link_delay_is_planned_as_the_links_of_that_delay():
    entries = [LinkStatus.model_validate({"from": "home", "to": "home", "rttMs": 50.2, "mbps": 10000})]
    links = links_from_entries(entries, ["home"])
    assert links.get("home", "home").rtt_s == pytest.approx(0.0502)
    assert links.get(GATEWAY, "home").rtt_s == pytest.approx(0.0502)  # the gateway's links are the cluster's
    node = Node("a", "home", 1e9, 0.001, 0.0)
    planned = evaluate(MODEL, {"a": node}, links, ["a"], [6], 1, 1, 64)
    assert planned.latency_s >= 0.0502  # in and out: half a round trip each


def test_at_load_splits_rows_as_the_gateway_does():
    nodes = [Node(f"home-{n}", "home", 1e9, 0.002, 0.0005) for n in "ab"]
    local = Link(0.0002, 1e9)
    inputs = PlannerInputs(MODEL, nodes, Links(between={(GATEWAY, "home"): local}, local=local), Workload(8, 64),
                           Options(max_micro_batch=4))  # fmt: skip
    planned = plan_status(evaluate(MODEL, {n.name: n for n in nodes}, inputs.links, ["home-a", "home-b"], [3, 3],
                                   4, 8, 64), inputs)  # fmt: skip
    one = at_load(planned, inputs, 1)
    assert (one.batch, one.micro_batch) == (1, 1)
    # two stages fill with two steps in flight: up to two generations go as steps of their own
    assert (at_load(planned, inputs, 2).micro_batch, at_load(planned, inputs, 2).batch) == (1, 2)
    six = at_load(planned, inputs, 6)
    assert six.micro_batch == pytest.approx(3) and math.ceil(6 / six.micro_batch) == 2
    assert at_load(planned, inputs, 64).batch == 8  # no more than the plan admits


def test_a_profiling_run_times_every_size_the_planner_may_choose():
    assert profile_request(8) == {"rows": [1, 2, 4, 8], "repeats": 6}
    assert profile_request(6)["rows"] == [1, 2, 4, 6] and profile_request(1) == {"rows": [1], "repeats": 24}
    assert all(len(profile_request(m)["rows"]) * profile_request(m)["repeats"] <= 64 for m in range(1, 257))
    assert list(itertools.chain(profile_request(256)["rows"])) == [1 << k for k in range(9)]


def test_the_profiling_run_is_scaled_to_the_level_its_traffic_measured():
    """The run gives the cost's shape at every size; traffic's medians, at the sizes it ran often
    enough inside the run's range, give its level (the run times a stage alone; traffic shares the
    cores) and stand in for the run's own points there. The head is scaled by its own traffic, and
    a stage without such traffic keeps its run."""
    profiled = [[1, 2.0], [2, 3.0], [4, 4.0], [8, 6.0]]
    heads = [[1, 10.0], [4, 16.0], [8, 24.0]]
    served = {"layerMsAt": [[1, 2.6], [3, 9.9], [4, 4.8], [20, 30.0]], "stepMsAt": [[1, 15.0], [4, 24.0], [20, 1.0]],
              "stepsAt": [[1, 10], [3, 4], [4, 30], [20, 50]], "onward": {"rttMs": 3.0, "mbps": 90.0},
              "streamBps": 2e9}  # fmt: skip
    run = {"profile": {"msPerLayer": 1.5, "msPerLayerToken": 0.5, "stepMs": 9.0, "stepMsPerToken": 2.0,
                       "layerMsAt": profiled, "stepMsAt": heads, "samples": 12},
           "last": True, "served": served}  # fmt: skip
    entry = NodeProfile.from_run("home-a", "box", run)
    # size 3 ran 4 times (too few) and 20 lies past the run's sizes: only sizes 1 (x1.3, 10 steps)
    # and 4 (x1.2, 30 steps) count; where they ran, their own medians are the cost
    scale = (10 * 1.3 + 30 * 1.2) / 40
    assert entry.traffic_scale == pytest.approx(scale) and entry.head_traffic_scale == pytest.approx(1.5)
    assert (entry.ms_per_layer, entry.ms_per_layer_token) == (pytest.approx(1.5 * scale), pytest.approx(0.5 * scale))
    assert entry.layer_ms_at == [(1, pytest.approx(2.6)), (2, pytest.approx(3.0 * scale)), (4, pytest.approx(4.8)),
                                 (8, pytest.approx(6.0 * scale))]  # fmt: skip
    assert entry.head_ms_at == [(1, pytest.approx(15.0)), (4, pytest.approx(24.0)), (8, pytest.approx(36.0))]
    assert (entry.head_ms, entry.head_ms_per_token) == (pytest.approx(13.5), pytest.approx(3.0))
    assert (entry.onward_rtt_ms, entry.host_gbps) == (3.0, 2.0)
    quiet = NodeProfile.from_run("home-a", "box", {**run, "served": {"stepsAt": [[4, 3]], "layerMsAt": [[4, 99.0]]}})
    assert quiet.traffic_scale == 1.0 and quiet.ms_per_layer == 1.5 and quiet.layer_ms_at[2] == (4, 4.0)


def test_the_gateways_measurements_become_the_models_terms():
    """Transport less the links' own flight, shared over the crossings, is each crossing's cost o;
    the turnaround less its drafting (costed on its own) is the round's overhead g."""
    nodes = [Node(f"home-{n}", "home", 1e9, 0.002, 0.0005) for n in "ab"]
    link = Link(0.010, 1e12)  # 5 ms each way, bytes for free
    inputs = PlannerInputs(MODEL, nodes, Links(between={(GATEWAY, "home"): link}, local=link), Workload(8, 64),
                           Options(max_micro_batch=4))  # fmt: skip
    planned = plan_status(evaluate(MODEL, {n.name: n for n in nodes}, inputs.links, ["home-a", "home-b"], [3, 3],
                                   4, 8, 64), inputs)  # fmt: skip
    measured = {"transportMs": 21.0, "turnaroundMs": 6.5, "draftMsPerRound": 2.5, "tokensPerRound": 1.8,
                "prefillPerRound": 0.2, "steps": 40}  # fmt: skip
    gateway = gateway_profile(measured, inputs, planned)
    assert gateway.frame_ms == pytest.approx((21.0 - 3 * 5.0) / 3)  # three crossings of 5 ms flight each
    assert gateway.round_overhead_ms == pytest.approx(4.0) and gateway.draft_ms == 2.5
    assert gateway_profile({"turnaroundMs": 1.0, "draftMsPerRound": 3.0}, inputs, planned).round_overhead_ms == 0.0


def test_overlap_counts_how_many_other_stages_computed_during_each_step():
    # [started, seconds, per layer, outside the layers, tokens]; a: two steps, b: one across both
    a = [[0.0, 1.0, 0.1, 0.0, 1], [2.0, 1.0, 0.1, 0.0, 1]]
    b = [[0.5, 2.0, 0.1, 0.0, 1]]
    c = [[2.25, 0.5, 0.1, 0.0, 1], [5.0, 1.0, 0.1, 0.0, 1]]
    counts = overlap_counts([a, b, c])
    assert counts[0] == pytest.approx([0.5, 0.5 + 0.5])  # b half of each; c half of the second
    assert counts[1] == pytest.approx([(0.5 + 0.5 + 0.25) / 2])  # a for 1 s of its 2, c for 0.25 s
    assert counts[2] == pytest.approx([1.0 + 0.5, 0.0])
    assert overlap_counts([a, []]) == [[0.0, 0.0], []]


def served_steps(start: float, sizes_ms: list[tuple[int, float]], gap: float) -> list[list[float]]:
    """Back-to-back steps of the given (tokens, ms per layer), one layer each, ``gap`` s apart."""
    steps, now = [], start
    for tokens, ms in sizes_ms:
        steps.append([now, ms / 1000, ms / 1000, 0.0, tokens])
        now += ms / 1000 + gap
    return steps


def test_the_hosts_parallelism_comes_from_steps_beside_each_other_against_the_same_size_alone():
    """Two stages of one machine: their 4-token steps cost 3 ms alone and 3.6 ms while the other
    computes (x1.2: 2 / 1.2 stages' worth of work at once); their level alone scales the run."""
    alone_a = served_steps(0.0, [(4, 3.0)] * 10, 0.01)  # b idle meanwhile
    alone_b = served_steps(1.0, [(4, 3.0)] * 10, 0.01)  # and a
    together_a = served_steps(2.0, [(4, 3.6)] * 10, 0.0)  # both, at once
    together_b = served_steps(2.0, [(4, 3.6)] * 10, 0.0)
    runs = [{"profile": {"msPerLayer": 2.0, "msPerLayerToken": 0.25, "stepMs": 0.0, "stepMsPerToken": 0.0,
                         "layerMsAt": [[1, 2.25], [4, 2.5]], "stepMsAt": [[1, 0.0], [4, 0.0]], "samples": 12},
             "served": {"busy": alone + together, "layerMsAt": [[4, 3.3]], "stepsAt": [[4, 20]]}}
            for alone, together in ((alone_a, together_a), (alone_b, together_b))]  # fmt: skip
    cut, parallelism, compared = traffic_parallelism(runs)
    assert parallelism == pytest.approx(2 / 1.2) and compared == 20
    assert cut[0]["served"]["layerMsAt"] == [[4.0, pytest.approx(3.0)]] and cut[0]["served"]["stepsAt"] == [[4.0, 10]]
    assert NodeProfile.from_run("a", "box", cut[0]).traffic_scale == pytest.approx(3.0 / 2.5)
    # a size never seen alone is not compared: no parallelism from traffic, and the runs keep what they ran alone
    only_together = [{**run, "served": {"busy": together}}
                     for run, together in zip(runs, (together_a, together_b), strict=True)]  # fmt: skip
    assert traffic_parallelism(only_together)[1:] == (None, 0)
    # a stage that does not say when its steps ran keeps every served step
    assert traffic_parallelism([{"served": {"stepsAt": [[4, 9]]}}])[0] == [{"served": {"stepsAt": [[4, 9]]}}]
