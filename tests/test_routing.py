"""Waiting-aware routing over stage replicas: pure decisions, then real replicas behind a real gateway."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from bloombee_contract.launch import GatewayLaunch, StageLaunch, parse_stage_urls
from bloombee_operator.backends.local import LocalBackend
from bloombee_stage.gateway.batching import SHORT_ROW, MicroBatcher
from bloombee_stage.gateway.routing import Router
from bloombee_stage.wire.messages import RowMeta
from pipelines import TEST_CA, post_json, read_metrics, start_pipeline


def test_stages_parse_with_replicas():
    assert parse_stage_urls("http://a,http://b1|http://b2/,http://c") == (("http://a",), ("http://b1", "http://b2"),
                                                                         ("http://c",))  # fmt: skip
    with pytest.raises(ValueError, match="at least one URL"):
        parse_stage_urls("http://a,,http://c")


def test_unmeasured_replicas_are_tried_then_the_faster_one_wins():
    router = Router([["a"], ["b1", "b2"]], micro_batch=1)
    first = router.choose()
    router.acquire(first)
    router.observe(first, round_trip_ms=60.0, compute_ms=[10.0, 40.0])  # b1 measured slow
    router.release(first)
    assert router.choose() == (0, 1)  # b2 unmeasured: counted at the stage's mean, and idle
    router.observe((0, 1), round_trip_ms=30.0, compute_ms=[10.0, 10.0])
    assert router.choose() == (0, 1)  # measured faster


def test_queueing_sends_new_generations_to_the_slower_idle_replica():
    router = Router([["b1", "b2"]], micro_batch=1)
    router.observe((0,), 10.0, [10.0])
    router.observe((1,), 25.0, [25.0])
    for _ in range(2):  # b1: 10 ms a step; with 2 waiting a new row waits 2 steps
        router.acquire((0,))
    assert router.predict_ms((0,)) == pytest.approx(30.0)
    assert router.predict_ms((1,)) == pytest.approx(25.0)
    assert router.choose() == (1,)  # the idle, slower replica now finishes sooner
    batched = Router([["b1", "b2"]], micro_batch=4)  # with micro-batches, waiting rows share a step
    batched.observe((0,), 10.0, [10.0])
    batched.observe((1,), 25.0, [25.0])
    for _ in range(2):
        batched.acquire((0,))
    assert batched.choose() == (0,)


def test_load_is_released_and_counted():
    router = Router([["a1", "a2"], ["b"]])
    path = router.choose()
    router.acquire(path)
    assert sum(r.load for r in router.replicas[0]) == 1 and router.replicas[1][0].load == 1
    router.release(path)
    assert all(r.load == 0 for replicas in router.replicas for r in replicas)
    assert router.chosen[path] == 1


def _chat(pipeline_url: str, content: str) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    return post_json(pipeline_url + "/v1/chat/completions", body, timeout=120)


def test_replicas_share_generations_and_a_lost_replica_is_routed_around(tmp_path, tiny_dir):
    backend = LocalBackend(tmp_path, threads_per_stage=1, startup_timeout_s=300, ca=TEST_CA)
    model = str(tiny_dir)

    def stage(name: str, layers: tuple[int, int]) -> object:
        return backend._launch(name, StageLaunch(model=model, layers=layers, name=name, threads=1))

    try:
        first, replica_a, replica_b = stage("s0", (0, 3)), stage("s1a", (3, 6)), stage("s1b", (3, 6))
        backend._wait_ready([first, replica_a, replica_b])
        stages = ((first.url,), (replica_a.url, replica_b.url))
        gateway_launch = GatewayLaunch(model=model, stages=stages, served_model_name="tiny", micro_batch=4)
        gateway = backend._launch("gw", gateway_launch)
        backend._wait_ready([gateway], ready_path="/healthz")
        prompts = [f"say {word}" for word in ("one", "two", "three", "four", "five", "six")]
        alone = [_chat(gateway.url, p) for p in prompts]
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(lambda p: _chat(gateway.url, p), prompts))
        for (status_a, a), (status_b, b) in zip(alone, together, strict=True):
            assert status_a == status_b == 200
            assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
        metrics = read_metrics(gateway.url)
        assert metrics['bloombee_gateway_route_chosen{path="0.0"}'] > 0
        assert metrics['bloombee_gateway_route_chosen{path="0.1"}'] > 0  # both replicas served generations
        assert metrics['bloombee_gateway_route_predicted_seconds{path="0.1"}'] > 0
        assert all(metrics[f'bloombee_gateway_replica_service_seconds{{replica="{i}",stage="1",url="{url}"}}'] > 0
                   for i, url in enumerate((replica_a.url, replica_b.url)))  # fmt: skip

        replica_b.popen.send_signal(signal.SIGKILL)
        replica_b.popen.wait()
        with ThreadPoolExecutor(max_workers=6) as pool:
            after = list(pool.map(lambda p: _chat(gateway.url, p), prompts))
        for (_, before), (status, reply) in zip(alone, after, strict=True):
            assert status == 200, reply  # generations on the lost replica moved to the other path
            assert reply["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
        metrics = read_metrics(gateway.url)
        assert metrics['bloombee_gateway_route_chosen{path="0.0"}'] >= 6
    finally:
        backend.stop()


def test_steps_to_fill_cover_a_round_trip_of_the_slowest_stage():
    router = Router([["a"], ["b"], ["c"]])
    assert router.steps_to_fill((0, 0, 0)) is None  # nothing measured yet
    router.observe((0, 0, 0), round_trip_ms=160.0, compute_ms=[10.0, 10.0, 20.0])
    assert router.steps_to_fill((0, 0, 0)) == 8  # 120 ms of links + 40 of compute, over 20 ms


class _HeldSteps:
    """The batcher's pipeline, holding every step until released: which rows travelled together."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []  # the row lengths of each step sent
        self.release = asyncio.Event()

    async def step(self, rows: list[RowMeta], inputs: list[list[int]], urls: list[str]) -> tuple[list, list]:
        self.steps.append([row.length for row in rows])
        await self.release.wait()
        return [[7] for _ in rows], [1.0]


def test_short_rows_share_micro_batches_and_prefills_never_wait():
    async def scenario() -> list[list[int]]:
        held = _HeldSteps()
        batcher = MicroBatcher(held, Router([["a"]]), micro_batch=4, max_in_flight=1)  # type: ignore[arg-type]
        rows = [RowMeta(session=f"s{i}", start=0, length=length)
                for i, length in enumerate([1, 1, 40, 1, 1, 1, 80, 1])]  # fmt: skip
        paths = [batcher.open() for _ in rows]
        waiting = [asyncio.create_task(batcher.step(row, [1] * row.length, path))
                   for row, path in zip(rows, paths, strict=True)]  # fmt: skip
        for _ in range(20):  # let the batcher send what it may while the first step is held
            await asyncio.sleep(0)
        sent_while_held = list(held.steps)
        held.release.set()
        assert await asyncio.gather(*waiting) == [[7]] * len(rows)
        await batcher.stop()
        return sent_while_held, held.steps

    while_held, every = asyncio.run(scenario())
    # One micro-batch slot, taken by the first short rows; both prefills left at once, alone.
    assert sorted(while_held, key=len) == [[40], [80], [1, 1, 1, 1]]
    assert sorted(every, key=len) == [[40], [80], [1, 1], [1, 1, 1, 1]]
    assert all(len(step) == 1 for step in every if max(step) > SHORT_ROW)


def test_the_gateways_part_of_a_round_is_timed_per_step_from_its_rows_results():
    """The round's own overhead g, as a packed step lives it: from the first of its rows' results
    to the step leaving (streaming, drafting, gathering), once per step, not once per row."""

    async def scenario() -> tuple[list[float], list[list[int]]]:
        held = _HeldSteps()
        held.release.set()
        batcher = MicroBatcher(held, Router([["a"]]), micro_batch=2, max_in_flight=1)  # type: ignore[arg-type]

        async def generation(name: str, pause_s: float) -> None:
            path = batcher.open()
            for _ in range(2):
                await batcher.step(RowMeta(session=name, start=0, length=1), [1], path)
                await asyncio.sleep(pause_s)  # this generation's own work before its next row

        await asyncio.gather(generation("one", 0.05), generation("two", 0.05))
        await batcher.stop()
        return list(batcher.turnaround_ms), held.steps

    turnaround, steps = asyncio.run(scenario())
    assert steps == [[1, 1], [1, 1]]  # both rounds' rows left together
    assert len(turnaround) == 1 and 45.0 <= turnaround[0] < 1000.0  # the second step, 50 ms after the first


def test_a_gateway_started_with_a_larger_micro_batch_than_its_stages_uses_theirs(tmp_path, tiny_dir):
    planned = {"micro_batch": 2}
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "tiny", num_stages=2, gateway_args=["--micro-batch", "4"],
                              stage_overrides={0: planned, 1: planned})  # fmt: skip
    try:
        requests = [{"model": "tiny", "prompt": [500 + n, 7, 8], "max_tokens": 12, "temperature": 0,
                     "ignore_eos": True} for n in range(6)]  # fmt: skip
        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = list(pool.map(lambda body: pipeline.post("/completions", body), requests))
        assert all(status == 200 for status, _ in replies), replies
        gateway = pipeline.gateway_metrics()
        # rows shared steps
        assert gateway["bloombee_gateway_rows_sent_total"] > gateway["bloombee_gateway_steps_sent_total"]
        for index in range(2):
            stage = pipeline.stage_metrics(index)
            assert stage.get('bloombee_stage_errors_total{code="invalid_frame"}', 0) == 0  # no step was too big
    finally:
        pipeline.backend.stop()


def test_requests_beyond_the_gateway_seats_wait_for_one(tmp_path, tiny_dir):
    """--max-sequences 1 (what a plan admitting one sequence sets): while a stage is paused, a second
    request waits at the gateway for the first one's seat, then both answer as they do alone. The
    queue is bounded (--max-waiting 1): a third request, streamed or not, is refused at once with
    429 and Retry-After instead of waiting."""
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "tiny", num_stages=2,
                              gateway_args=["--max-sequences", "1", "--max-waiting", "1"])  # fmt: skip
    try:
        bodies = [{"model": "tiny", "prompt": [600 + n, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                   "return_token_ids": True} for n in range(2)]  # fmt: skip
        alone = [pipeline.post("/completions", body) for body in bodies]
        assert all(status == 200 for status, _ in alone), alone
        stage = pipeline.backend.processes[pipeline.stage_name(0)].popen
        stage.send_signal(signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                pending = [pool.submit(pipeline.post, "/completions", body) for body in bodies]
                waiting = 0.0
                for _ in range(300):  # up to 30 s for both requests to reach the gateway
                    waiting = pipeline.gateway_metrics()["bloombee_gateway_requests_waiting"]
                    if waiting == 1:
                        break
                    time.sleep(0.1)
                assert waiting == 1  # one holds the seat (stuck at the paused stage), one waits for it
                assert not any(future.done() for future in pending)
                for stream in (False, True):
                    third = urllib.request.Request(pipeline.endpoint + "/completions", data=json.dumps(
                        {**bodies[0], "stream": stream}).encode(), headers={"Content-Type": "application/json"})
                    with pytest.raises(urllib.error.HTTPError) as refused:
                        urllib.request.urlopen(third, timeout=30)
                    assert refused.value.code == 429 and int(refused.value.headers["Retry-After"]) >= 1
                    assert json.loads(refused.value.read())["error"]["code"] == "overloaded"
                stage.send_signal(signal.SIGCONT)
                together = [future.result(timeout=120) for future in pending]
        finally:
            stage.send_signal(signal.SIGCONT)
        for (_, before), (status, reply) in zip(alone, together, strict=True):
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
        assert pipeline.gateway_metrics()["bloombee_gateway_requests_waiting"] == 0
    finally:
        pipeline.backend.stop()
