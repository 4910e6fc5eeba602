"""A pipeline of real stage services in this process, for exactness tests over many configurations.

Each step goes through the stages' own code, as a relayed step does over HTTP
(``StageService.accept`` then ``answer``: the frame decoded and checked, sessions admitted and
forked, the last tree's path kept and the cache cut, the span's layers with offloaded weights and
KV, the onward codec, the last stage's verification and hidden states, the result frame), and the
gateway's own ``generation.generate`` drives it. Only the sockets are left out: starting processes
for every cell of a matrix would take minutes, and real pipelines are tested elsewhere.

Several generations run at once share steps: a step leaves when every open generation has queued
its row (a barrier), so "several rows per step" is what every step holds, not what timing allows.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from bloombee_stage.gateway.pipeline import attach_hidden
from bloombee_stage.model.span import OffloadSettings, Span, StageModel, path_moves
from bloombee_stage.stage.service import StageService, StageSettings
from bloombee_stage.wire.frame import decode_frame, encode_frame
from bloombee_stage.wire.messages import ResultMeta, RowMeta, RowResult, StepMeta
from bloombee_stage.wire.tensors import tensor_frame

GATEWAY = "https://gateway.test"  # names only: nothing is sent to them


def stage_urls(count: int) -> list[str]:
    return [f"https://stage-{index}.test" for index in range(count)]


def build_services(model_dir: Path, bounds: Sequence[int], offload: OffloadSettings, packed: str,
                   codec: str = "raw", dtype: str = "float32") -> list[StageService]:  # fmt: skip
    """One stage service per span [bounds[i], bounds[i+1]) of the model, each with these settings."""
    total = bounds[-1]
    services = []
    for start, end in itertools.pairwise(bounds):
        model = StageModel(model_dir, Span(start, end, total), dtype=dtype, offload=offload, packed=packed)
        services.append(StageService(model, StageSettings(name=f"stage-{start}", codec=codec)))
    return services


class InProcessPipeline:
    """What ``generation.generate`` needs of a ``MicroBatcher``, over stage services in this process."""

    def __init__(self, services: list[StageService]) -> None:
        self.services = services
        self.open_generations = 0
        self.steps = 0
        self.rows_per_step: list[int] = []
        self.moved_paths = 0  # rows whose last tree kept nodes other than its first ones (their KV moves)
        self.forks = 0
        self.trees = 0  # rows that carried a draft tree
        self._queue: list[tuple[RowMeta, list[int], asyncio.Future[RowResult]]] = []

    def open(self) -> tuple[int, ...]:
        self.open_generations += 1
        return (0,) * len(self.services)

    async def wait_ready(self, path: tuple[int, ...], timeout_s: float) -> bool:
        return True

    async def step(self, row: RowMeta, inputs: list[int], path: tuple[int, ...]) -> RowResult:
        future: asyncio.Future[RowResult] = asyncio.get_running_loop().create_future()
        self._queue.append((row, inputs, future))
        await self._maybe_send()
        return await future

    async def close(self, session: str, path: tuple[int, ...], park: bool = False) -> None:
        self.open_generations -= 1
        for service in self.services:
            if park:
                service.sessions.park(session)
            else:
                service.sessions.close(session)
        await self._maybe_send()

    async def forget(self, session: str, path: tuple[int, ...]) -> None:
        for service in self.services:
            service.sessions.close(session)

    async def _maybe_send(self) -> None:
        if not self._queue or len(self._queue) < self.open_generations:
            return
        queued, self._queue = self._queue, []
        try:
            results = await self._send([row for row, _, _ in queued], [inputs for _, inputs, _ in queued])
        except Exception as error:  # every waiting generation sees the step's failure
            for _, _, future in queued:
                future.set_exception(error)
            return
        for (_, _, future), result in zip(queued, results, strict=True):
            future.set_result(result)

    async def _send(self, rows: list[RowMeta], inputs: list[list[int]]) -> list[RowResult]:
        """One step through every stage, frames encoded and decoded as on the wire."""
        self.steps += 1
        self.rows_per_step.append(len(rows))
        self.moved_paths += sum(1 for row in rows if path_moves(row.tree_path))
        self.forks += sum(1 for row in rows if row.fork is not None)
        self.trees += sum(1 for row in rows if row.tree is not None)
        meta = StepMeta(step=self.steps, rows=rows, route=stage_urls(len(self.services))[1:])
        padded = torch.zeros(len(rows), meta.width, dtype=torch.int64)
        for index, tokens in enumerate(inputs):
            padded[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        body = encode_frame(tensor_frame(padded, meta.wire()))
        for service in self.services:
            meta, hidden, sessions = service.accept(body)
            body = await service.answer(meta, hidden, sessions)
        result = decode_frame(body)
        outcome = ResultMeta.model_validate(result.meta)
        attach_hidden(outcome.rows, result, outcome.step)
        by_session = {row.session: row for row in outcome.rows}
        return [by_session[row.session] for row in rows]
