"""The gateway's side of the inference protocol: send a step into the chain, await its result.

The first stage gets the step; the result arrives later as a POST from the last stage to the
gateway's ``/internal/v1/results`` (ResultRouter.deliver), so every link is crossed once per
token. With ``relay=True`` the gateway instead sends each hop's output on itself (Petals' way,
two crossings per hop), which the benchmarks measure as the baseline. A step that gets no
result within ``step_timeout_s`` fails with PipelineError instead of hanging; so does a stage
that refuses the step or reports a failure.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
import torch
from bloombee_contract.errors import ErrorCode, status_of
from bloombee_contract.paths import (
    LEASE_HEADER,
    PARK_PATH,
    READYZ_PATH,
    RESULT_PATH,
    SESSION_PATH,
    STEP_PATH,
    session_path,
)

from bloombee_stage.serving.process import read_error
from bloombee_stage.wire.frame import Frame, decode_frame, encode_frame
from bloombee_stage.wire.messages import ResultMeta, RowMeta, RowResult, StepMeta
from bloombee_stage.wire.tensors import frame_tensor, tensor_frame

log = logging.getLogger("bloombee.pipeline")


SESSION_ID = re.compile(r"\b[0-9a-f]{32}\b")  # how the gateway names sessions (uuid4 hex)


class PipelineError(RuntimeError):
    """A step failed somewhere in the chain; ``code`` is why, and its status what the gateway answers."""

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.PIPELINE_FAILED,
                 unreachable: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.code = code.value if isinstance(code, ErrorCode) else code
        self.status = status_of(self.code)
        self.unreachable = unreachable  # a stage URL that could not be reached, when that was the failure

    @property
    def public_message(self) -> str:
        """The message for clients, without session ids: those name sessions on the stages."""
        return SESSION_ID.sub("<session>", str(self))


class ResultRouter:
    """Matches result frames arriving from the last stage to the steps waiting for them."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self._steps = 0

    def new_step(self) -> int:
        """A step id no other step of this gateway has (results of every plan's stages arrive here)."""
        self._steps += 1
        return self._steps

    def expect(self, step: int) -> asyncio.Future[Frame]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[step] = future
        return future

    def forget(self, step: int) -> None:
        self._waiting.pop(step, None)

    def fail(self, step: int, error: Exception) -> None:
        """End the wait for ``step`` with ``error`` (its result will not come)."""
        future = self._waiting.pop(step, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def deliver(self, frame: Frame) -> bool:
        meta = ResultMeta.model_validate(frame.meta)
        future = self._waiting.pop(meta.step, None)
        if future is None or future.done():
            return False
        future.set_result(frame)
        return True


class PipelineClient:
    """Sends steps along a path of stage URLs (one replica per stage) and awaits their results."""

    def __init__(
        self,
        num_stages: int,
        reply_url: str,
        http: aiohttp.ClientSession,
        results: ResultRouter,
        step_timeout_s: float = 120.0,
        relay: bool = False,
        relay_hops: list[bool] | None = None,
        lease: str | None = None,
        plan: str | None = None,
    ) -> None:
        if num_stages < 1:
            raise ValueError("a pipeline needs at least one stage")
        self.num_stages = num_stages
        self.reply_url = reply_url
        self.http = http
        self.results = results
        self.step_timeout_s = step_timeout_s
        self.relay = relay
        self.relay_hops = relay_hops or [False] * (num_stages - 1)
        self.lease = lease  # this gateway process's: its sessions close once its heartbeats stop
        if len(self.relay_hops) != num_stages - 1:
            raise ValueError(f"{len(self.relay_hops)} relay flags for {num_stages} stages")
        self.plan = plan  # the plan the stages serve: every step names it, a stage of another plan refuses it
        self._pending: dict[int, list[str]] = {}  # steps awaiting their result -> the stages they went through

    def lost(self, url: str) -> int:
        """Fail at once every step that went through ``url`` (it stopped answering its heartbeat), so
        their generations replay elsewhere or later instead of waiting out the step timeout."""
        failed = [step for step, urls in self._pending.items() if url in urls]
        for step in failed:
            self.results.fail(step, PipelineError(f"stage {url} stopped answering", ErrorCode.STAGE_UNREACHABLE, url))
        return len(failed)

    async def wait_ready(self, urls: list[str], timeout_s: float) -> bool:
        """Whether every stage of ``urls`` answers its readiness check within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = await asyncio.gather(*(self.answers(url, READYZ_PATH) for url in urls))
            if all(ready):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5)

    async def answers(self, url: str, path: str, timeout_s: float = 3.0) -> bool:
        """Whether the stage at ``url`` answers 200 on ``path`` (``/readyz``, ``/healthz``) in ``timeout_s``;
        the question renews this gateway's lease there."""
        headers = {LEASE_HEADER: self.lease} if self.lease else None
        try:
            async with self.http.get(url + path, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     headers=headers) as reply:  # fmt: skip
                return reply.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    def route(self, urls: list[str]) -> list[str]:
        """Where a step goes after the first stage. Hops the planner sends through the gateway (a
        faster path than the direct link) get the gateway's own URL before that stage; it forwards."""
        gateway_url = self.reply_url.removesuffix(RESULT_PATH)
        return [hop for url, via in zip(urls[1:], self.relay_hops, strict=True)
                for hop in ([gateway_url, url] if via else [url])]  # fmt: skip

    async def step(self, rows: list[RowMeta], inputs: list[list[int]],
                   urls: list[str]) -> tuple[list[RowResult], list[float]]:  # fmt: skip
        """Send one micro-batch along ``urls`` (row i appends ``inputs[i]`` to session ``rows[i].session``).

        Returns each row's result (its tokens: the verified draft prefix plus the model's next
        token; logprobs where asked) and each stage's forward milliseconds.
        """
        if len(urls) != self.num_stages:
            raise ValueError(f"a path of {len(urls)} URLs through {self.num_stages} stages")
        reply_to = None if self.relay else self.reply_url
        meta = StepMeta(step=self.results.new_step(), rows=rows, route=self.route(urls), reply_to=reply_to,
                        lease=self.lease, plan=self.plan)  # fmt: skip
        padded = torch.zeros(len(rows), meta.width, dtype=torch.int64)
        for index, tokens in enumerate(inputs):
            padded[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        frame = tensor_frame(padded, meta.wire())
        if self.relay:
            result = await self._relay(encode_frame(frame), urls)
        else:
            waiter = self.results.expect(meta.step)
            self._pending[meta.step] = urls
            try:
                await self._send(urls[0], encode_frame(frame), expect=202)
                result = await asyncio.wait_for(waiter, self.step_timeout_s)
            except TimeoutError:
                raise PipelineError(
                    f"no result from the pipeline within {self.step_timeout_s:.0f} s (step {meta.step}, "
                    f"sessions {', '.join(row.session for row in rows)})",
                    ErrorCode.PIPELINE_TIMEOUT,
                ) from None
            finally:
                self.results.forget(meta.step)
                self._pending.pop(meta.step, None)
        outcome = ResultMeta.model_validate(result.meta)
        if outcome.error:
            raise PipelineError(f"stage {outcome.stage}: {outcome.error}", outcome.code or ErrorCode.STAGE_FAILED,
                                outcome.unreachable)  # fmt: skip
        attach_hidden(outcome.rows, result, meta.step)
        by_session = {row.session: row for row in outcome.rows}
        missing = [row.session for row in rows if row.session not in by_session]
        if missing:
            raise PipelineError(f"the result of step {meta.step} lacks sessions {missing}", ErrorCode.BAD_RESULT)
        return [by_session[row.session] for row in rows], outcome.compute_ms

    async def _relay(self, body: bytes, urls: list[str]) -> Frame:
        """Baseline: every stage answers inline and the gateway forwards the output to the next one."""
        for url in urls:
            body = await self._send(url, body, expect=200)
        return decode_frame(body)

    async def _send(self, url: str, body: bytes, expect: int) -> bytes:
        """POST a frame to a stage; return the reply body, or raise PipelineError with the stage's reason."""
        try:
            async with self.http.post(
                url + STEP_PATH, data=body, headers={"Content-Type": "application/octet-stream"}
            ) as reply:
                if reply.status == expect:
                    return await reply.read()
                message, code = await read_error(reply, ErrorCode.STAGE_REFUSED)
        except aiohttp.ClientError as error:
            raise PipelineError(f"stage {url} unreachable: {error}", ErrorCode.STAGE_UNREACHABLE, url) from None
        raise PipelineError(f"stage {url} refused the step: {message}", code)

    async def close(self, session: str, urls: list[str]) -> None:
        """Free the session on every stage of its path; best effort (stages also time idle sessions out)."""
        await self._on_every_stage("DELETE", session_path(SESSION_PATH, session), urls)

    async def park(self, session: str, urls: list[str]) -> None:
        """Keep the session on every stage only as a fork source (sessions.py); best effort."""
        await self._on_every_stage("POST", session_path(PARK_PATH, session), urls)

    async def _on_every_stage(self, method: str, path: str, urls: list[str]) -> None:
        async def one(url: str) -> None:
            try:
                async with self.http.request(method, url + path, timeout=aiohttp.ClientTimeout(total=5)):
                    pass
            except (TimeoutError, aiohttp.ClientError) as error:
                log.debug("%s %s on %s failed: %s", method, path, url, error)

        await asyncio.gather(*(one(url) for url in urls))


def attach_hidden(rows: list[RowResult], frame: Frame, step: int) -> None:
    """Give each row its hidden states from the result frame's tensor (``RowResult.features`` rows
    each, in row order), checking that the tensor holds exactly those."""
    wanted = sum(row.features for row in rows)
    if not wanted:
        return
    if frame.dtype != "float16" or len(frame.shape) != 2 or frame.shape[0] != wanted:
        raise PipelineError(f"the result of step {step} should carry {wanted} hidden states as float16 "
                            f"[{wanted}, hidden], not {frame.dtype} {list(frame.shape)}",
                            ErrorCode.BAD_RESULT)  # fmt: skip
    states = frame_tensor(frame).split([row.features for row in rows])
    for row, part in zip(rows, states, strict=True):
        row.hidden = part
