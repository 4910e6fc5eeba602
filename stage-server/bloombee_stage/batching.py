"""Micro-batching at the gateway: the next rows of concurrent generations travel as one step.

Continuous batching in decode: a generation queues one row per round (its new tokens plus its
draft) and waits for that row's tokens; the batcher packs queued rows into steps of at most
``micro_batch`` rows and keeps up to ``max_in_flight`` steps in the pipeline at once, so the
stages work on different micro-batches back to back. Generations join and leave between steps
simply by queueing rows or not. With ``micro_batch == 1`` every row is its own step, sent at
once (the no-batching baseline).

Rows are packed only when padding them to a common width wastes little: short rows (decode
steps and verification of drafts) go together, a long prefill goes with rows of its own width.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from bloombee_stage.pipeline import PipelineClient, PipelineError
from bloombee_stage.protocol import RowMeta

log = logging.getLogger("bloombee.batching")

SHORT_ROW = 16  # rows up to this many positions are packed together whatever their widths
NOT_RETRIED = ("pipeline_timeout", "stage_unreachable")  # failures a row alone would meet again


@dataclass
class _Queued:
    row: RowMeta
    inputs: list[int]
    future: asyncio.Future[tuple[list[int], dict[str, float]]]


def fits(width: int, length: int) -> bool:
    """Whether a row of ``length`` positions may join a micro-batch now ``width`` positions wide."""
    return max(width, length) <= SHORT_ROW or width == length


class MicroBatcher:
    def __init__(self, pipeline: PipelineClient, micro_batch: int = 1, max_in_flight: int | None = None) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        self.pipeline = pipeline
        self.micro_batch = micro_batch
        self.max_in_flight = max_in_flight or len(pipeline.stage_urls)
        self.in_flight = 0
        self.steps = 0
        self.rows = 0
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def step(self, row: RowMeta, inputs: list[int]) -> tuple[list[int], dict[str, float]]:
        """The row's tokens and the step's forward ms per stage, once the step that carried it returns."""
        if self.micro_batch == 1:
            self.steps, self.rows = self.steps + 1, self.rows + 1
            tokens, timing = await self.pipeline.step([row], [inputs])
            return tokens[0], timing
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        queued = _Queued(row, inputs, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._wake.set()
        return await queued.future

    async def close(self, session: str) -> None:
        await self.pipeline.close(session)

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
            while self._queue and self.in_flight < self.max_in_flight:
                batch = self._take()
                self.in_flight += 1
                task = asyncio.create_task(self._send(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Queued]:
        batch = [self._queue.popleft()]
        width = batch[0].row.length
        passed: list[_Queued] = []
        while self._queue and len(batch) < self.micro_batch:
            queued = self._queue.popleft()
            if queued.future.done():  # its generation was cancelled
                continue
            if fits(width, queued.row.length):
                batch.append(queued)
                width = max(width, queued.row.length)
            else:
                passed.append(queued)
        self._queue.extendleft(reversed(passed))  # rows passed over keep their place in line
        return batch

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            await self._deliver(batch)
        finally:
            self.in_flight -= 1
            self._wake.set()

    async def _deliver(self, batch: list[_Queued]) -> None:
        self.steps, self.rows = self.steps + 1, self.rows + len(batch)
        try:
            tokens, timing = await self.pipeline.step([q.row for q in batch], [q.inputs for q in batch])
        except PipelineError as error:
            if len(batch) > 1 and error.code not in NOT_RETRIED:
                # One bad row must not fail its neighbours: each row alone meets its own fate.
                log.info("step of %d rows failed (%s); retrying each row alone", len(batch), error)
                await asyncio.gather(*(self._deliver([queued]) for queued in batch))
                return
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(error)
            return
        for queued, row_tokens in zip(batch, tokens, strict=True):
            if not queued.future.done():
                queued.future.set_result((row_tokens, timing))
