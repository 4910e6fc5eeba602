"""Micro-batching at the gateway: the next rows of concurrent generations travel as one step.

Continuous batching in decode: a generation queues one row per round (its new tokens plus its
draft) and waits for that row's tokens; the batcher packs queued rows into steps of at most
``micro_batch`` rows and keeps up to ``max_in_flight`` steps in the pipeline at once, spreading
waiting rows evenly over the free slots, so the stages work on different micro-batches back to
back. Under load that is the plan's n = ceil(generations / micro_batch) full micro-batches; but
while there are no more generations than steps that keep the slowest stage busy over a round
trip (Router.steps_to_fill: over a WAN, several per stage), every row leaves at once, since
nothing is gained by making it wait.
Generations join and leave between steps simply by queueing rows or not. With
``micro_batch == 1`` every row is its own step, sent at once (the no-batching baseline).

Only short rows (decode steps and verification of drafts, up to SHORT_ROW positions) are
packed: a step's cost is mostly reading the weights, which a row of one position barely uses.
A longer row (a prefill) already uses them fully, so it leaves at once as its own step, never
waiting for a slot nor dragging short rows through its width; prefills of many generations then
flow through the stages back to back, as they would without batching.
Rows share a step only when they share a path: where spans have replicas, each generation is
pinned at its start to the path routing.Router predicts fastest, queueing included.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from bloombee_contract.batching import SHORT_ROW
from bloombee_contract.errors import ErrorCode

from bloombee_stage.gateway.pipeline import PipelineClient, PipelineError
from bloombee_stage.gateway.routing import Path, Router
from bloombee_stage.wire.messages import RowMeta, RowResult

log = logging.getLogger("bloombee.batching")

MAX_TRACKED = 65536  # sessions whose last result time is kept (bounded; one entry per open generation)
GATHER_S = 0.003  # how long a packed step waits for its generations' stragglers
GATHER_POLL_S = 0.0005
NOT_RETRIED = (ErrorCode.PIPELINE_TIMEOUT, ErrorCode.STAGE_UNREACHABLE)  # failures a row alone would meet again


@dataclass
class _Queued:
    row: RowMeta
    inputs: list[int]
    path: Path
    future: asyncio.Future[RowResult]
    returned: float | None = None  # when the generation's previous row came back (None: its first)


class MicroBatcher:
    def __init__(self, pipeline: PipelineClient, router: Router, micro_batch: int = 1,
                 max_in_flight: int | None = None) -> None:  # fmt: skip
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        self.pipeline = pipeline
        self.router = router
        self.micro_batch = micro_batch
        self.fixed_in_flight = max_in_flight
        self.in_flight = 0  # micro-batches of short rows in the pipeline
        self.long_in_flight = 0  # rows that went alone (prefills)
        self.rows_in_flight = 0  # rows of all the steps in the pipeline
        self.active = 0  # generations between open and close
        self.steps = 0
        self.rows = 0
        self._queue: deque[_Queued] = deque()
        self._returned: dict[str, float] = {}  # session -> when its last result came back
        self.turnaround_ms: deque[float] = deque(maxlen=512)  # from a step's rows' results to the step leaving
        self.row_turnaround_ms: deque[float] = deque(maxlen=512)  # from a row's result to its next row, queued
        self.transport_ms: deque[float] = deque(maxlen=512)  # a step's round trip less its stages' compute
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def steps_in_flight(self) -> int:
        return self.in_flight + self.long_in_flight

    def max_in_flight(self, path: Path) -> int:
        if self.fixed_in_flight:
            return self.fixed_in_flight
        fill = self.router.steps_to_fill(path) or 0
        if self.active <= fill:
            return fill
        # Under load: the plan's micro-batches, n = ceil(generations / m) full steps chasing each
        # other round the cycle, as the planner costs them (fewer, fuller steps: a step's cost is
        # mostly reading the weights, whatever its rows).
        return math.ceil(self.active / self.micro_batch)

    def open(self) -> Path:
        """Pin a new generation to the path predicted fastest now."""
        path = self.router.choose()
        self.router.acquire(path)
        self.active += 1
        return path

    async def step(self, row: RowMeta, inputs: list[int], path: Path) -> RowResult:
        """The row's result (its tokens), once the step that carried it returns."""
        returned = self._returned.pop(row.session, None)
        if returned is not None:  # the generation's own work between its rounds (streaming, drafting)
            self.row_turnaround_ms.append((time.perf_counter() - returned) * 1000)
        result = await self._step(row, inputs, path, returned)
        if len(self._returned) < MAX_TRACKED:
            self._returned[row.session] = time.perf_counter()
        return result

    async def _step(self, row: RowMeta, inputs: list[int], path: Path, returned: float | None) -> RowResult:
        if self.micro_batch == 1:
            self._note_turnaround([returned])
            return (await self._carry([row], [inputs], path))[0]
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        queued = _Queued(row, inputs, path, asyncio.get_running_loop().create_future(), returned)
        if row.length > SHORT_ROW:
            self._dispatch([queued], long=True)
        else:
            self._queue.append(queued)
            self._wake.set()
        return await queued.future

    async def close(self, session: str, path: Path, park: bool = False) -> None:
        """A generation ended: free its place; its session is parked on the stages (a fork source) or closed."""
        self.router.release(path)
        self.active -= 1
        self._returned.pop(session, None)
        urls = self.router.urls(path)
        await (self.pipeline.park(session, urls) if park else self.pipeline.close(session, urls))

    async def wait_ready(self, path: Path, timeout_s: float) -> bool:
        """Whether every stage of ``path`` is ready (again) within ``timeout_s``."""
        return await self.pipeline.wait_ready(self.router.urls(path), timeout_s)

    async def forget(self, session: str, path: Path) -> None:
        """Close a parked session on its stages."""
        await self.pipeline.close(session, self.router.urls(path))

    async def _carry(self, rows: list[RowMeta], inputs: list[list[int]], path: Path) -> list[RowResult]:
        """One step along ``path``; its round trip and compute times feed the router."""
        self.steps, self.rows = self.steps + 1, self.rows + len(rows)
        started = time.perf_counter()
        try:
            results, compute_ms = await self.pipeline.step(rows, inputs, self.router.urls(path))
        except PipelineError as error:
            if error.unreachable and self.router.fail(error.unreachable):
                log.warning("stage replica %s unreachable; new generations avoid it for a while", error.unreachable)
            raise
        round_ms = (time.perf_counter() - started) * 1000
        self.router.observe(path, round_ms, compute_ms)
        self.transport_ms.append(max(0.0, round_ms - sum(compute_ms)))
        return results

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Generations whose step just returned queue their next rows in the next loop turns:
            # let them, so those rows leave together instead of one by one.
            for _ in range(3):
                await asyncio.sleep(0)
            await self._gather_stragglers()
            while self._queue and self._queue[0].future.done():  # its generation was cancelled
                self._queue.popleft()
            while self._queue and self.in_flight < (limit := self.max_in_flight(self._queue[0].path)):
                # Spread the waiting rows over the free slots: a few rows pipeline better as
                # several small steps (each stage busy with one) than as one step.
                share = math.ceil(len(self._queue) / (limit - self.in_flight))
                self._dispatch(self._take(min(self.micro_batch, share)))

    async def _gather_stragglers(self) -> None:
        """Where rows are packed (more generations than steps in flight), wait briefly for the
        generations still between their result and their next row (streaming a token, a draft), so
        the step leaves full instead of as a full step and a straggler's step: a step's cost is
        mostly reading the weights, so the straggler's alone costs nearly a whole round."""
        if not self._queue or self.in_flight >= (limit := self.max_in_flight(self._queue[0].path)):
            return
        if limit >= self.active:
            return  # every row leaves at once anyway
        deadline = time.monotonic() + GATHER_S
        while self.active - self.rows_in_flight - len(self._queue) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(GATHER_POLL_S)

    def _take(self, size: int) -> list[_Queued]:
        """Up to ``size`` queued rows on the first row's path, in order of arrival."""
        batch = [self._queue.popleft()]
        passed: list[_Queued] = []
        while self._queue and len(batch) < size:
            queued = self._queue.popleft()
            if queued.future.done():  # its generation was cancelled
                continue
            (batch if queued.path == batch[0].path else passed).append(queued)
        self._queue.extendleft(reversed(passed))  # rows passed over keep their place in line
        return batch

    def _note_turnaround(self, returned: list[float | None]) -> None:
        """The gateway's own part of a round, as the step leaving now lived it: from the first of its
        rows' previous results (tokens streamed, drafts made, rows gathered) to now."""
        known = [when for when in returned if when is not None]
        if known:
            self.turnaround_ms.append((time.perf_counter() - min(known)) * 1000)

    def _dispatch(self, batch: list[_Queued], long: bool = False) -> None:
        self._note_turnaround([queued.returned for queued in batch])
        self.rows_in_flight += len(batch)
        if long:
            self.long_in_flight += 1
        else:
            self.in_flight += 1
        task = asyncio.create_task(self._send(batch, long))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Queued], long: bool) -> None:
        try:
            await self._deliver(batch)
        finally:
            self.rows_in_flight -= len(batch)
            if long:
                self.long_in_flight -= 1
            else:
                self.in_flight -= 1
                self._wake.set()

    @staticmethod
    def _fail(batch: list[_Queued], error: PipelineError) -> None:
        for queued in batch:
            if not queued.future.done():
                queued.future.set_exception(error)

    async def _deliver(self, batch: list[_Queued]) -> None:
        try:
            results = await self._carry([q.row for q in batch], [q.inputs for q in batch], batch[0].path)
        except PipelineError as error:
            if len(batch) > 1 and error.code not in NOT_RETRIED:
                # One bad row must not fail its neighbours: each row alone meets its own fate.
                log.info("step of %d rows failed (%s); retrying each row alone", len(batch), error)
                await asyncio.gather(*(self._deliver([queued]) for queued in batch))
                return
            self._fail(batch, error)
            return
        except Exception as error:  # a bug here must fail the requests, never leave them waiting
            log.exception("step of %d rows failed unexpectedly", len(batch))
            self._fail(batch, PipelineError(f"gateway error while sending a step: {error}", ErrorCode.GATEWAY_ERROR))
            return
        for queued, result in zip(batch, results, strict=True):
            if not queued.future.done():
                queued.future.set_result(result)
