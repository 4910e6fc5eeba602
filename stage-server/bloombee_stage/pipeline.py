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
import uuid

import aiohttp
import torch

from bloombee_stage.protocol import RESULT_PATH, STEP_PATH, ResultMeta, RowMeta, StepMeta, read_error
from bloombee_stage.tensors import tensor_frame
from bloombee_stage.wire import Frame, decode_frame, encode_frame

log = logging.getLogger("bloombee.pipeline")


class PipelineError(RuntimeError):
    """A step failed somewhere in the chain; ``status`` is the HTTP status the gateway should answer."""

    def __init__(self, message: str, status: int = 502, code: str = "pipeline_failed") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ResultRouter:
    """Matches result frames arriving from the last stage to the steps waiting for them."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[Frame]] = {}

    def expect(self, step: int) -> asyncio.Future[Frame]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[step] = future
        return future

    def forget(self, step: int) -> None:
        self._waiting.pop(step, None)

    def deliver(self, frame: Frame) -> bool:
        meta = ResultMeta.model_validate(frame.meta)
        future = self._waiting.pop(meta.step, None)
        if future is None or future.done():
            return False
        future.set_result(frame)
        return True


class PipelineClient:
    def __init__(
        self,
        stage_urls: list[str],
        reply_url: str,
        http: aiohttp.ClientSession,
        router: ResultRouter,
        step_timeout_s: float = 120.0,
        relay: bool = False,
        relay_hops: list[bool] | None = None,
    ) -> None:
        if not stage_urls:
            raise ValueError("a pipeline needs at least one stage URL")
        self.stage_urls = [url.rstrip("/") for url in stage_urls]
        self.reply_url = reply_url
        self.http = http
        self.router = router
        self.step_timeout_s = step_timeout_s
        self.relay = relay
        # Hops the planner sends through the gateway (a faster path than the direct link): the
        # gateway's own URL goes into the route before that stage, and it forwards the frame.
        flags = relay_hops or [False] * (len(self.stage_urls) - 1)
        if len(flags) != len(self.stage_urls) - 1:
            raise ValueError(f"{len(flags)} relay flags for {len(self.stage_urls)} stages")
        gateway_url = reply_url.removesuffix(RESULT_PATH)
        self.route = [hop for url, via in zip(self.stage_urls[1:], flags, strict=True)
                      for hop in ([gateway_url, url] if via else [url])]  # fmt: skip
        self._steps = 0

    @staticmethod
    def new_session() -> str:
        return uuid.uuid4().hex

    async def step(self, rows: list[RowMeta], inputs: list[list[int]]) -> tuple[list[list[int]], dict[str, float]]:
        """Send one micro-batch (row i appends ``inputs[i]`` to session ``rows[i].session``).

        Returns each row's tokens (the verified draft prefix plus the model's next token) and
        the forward milliseconds per stage.
        """
        self._steps += 1
        meta = StepMeta(step=self._steps, rows=rows, route=self.route, reply_to=None if self.relay else self.reply_url)
        padded = torch.zeros(len(rows), meta.width, dtype=torch.int64)
        for index, tokens in enumerate(inputs):
            padded[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        frame = tensor_frame(padded, meta.model_dump(mode="json"))
        if self.relay:
            result = await self._relay(encode_frame(frame))
        else:
            waiter = self.router.expect(meta.step)
            try:
                await self._send(self.stage_urls[0], encode_frame(frame), expect=202)
                result = await asyncio.wait_for(waiter, self.step_timeout_s)
            except asyncio.TimeoutError:
                raise PipelineError(
                    f"no result from the pipeline within {self.step_timeout_s:.0f} s (step {meta.step}, "
                    f"sessions {', '.join(row.session for row in rows)})",
                    504,
                    "pipeline_timeout",
                ) from None
            finally:
                self.router.forget(meta.step)
        outcome = ResultMeta.model_validate(result.meta)
        if outcome.error:
            status = 400 if outcome.code == "context_length_exceeded" else 502
            raise PipelineError(f"stage {outcome.stage}: {outcome.error}", status, outcome.code or "stage_failed")
        by_session = {row.session: row.tokens for row in outcome.rows}
        missing = [row.session for row in rows if row.session not in by_session]
        if missing:
            raise PipelineError(f"the result of step {meta.step} lacks sessions {missing}", 502, "bad_result")
        return [by_session[row.session] for row in rows], outcome.compute_ms

    async def _relay(self, body: bytes) -> Frame:
        """Baseline: every stage answers inline and the gateway forwards the output to the next one."""
        for url in self.stage_urls:
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
                message, code = await read_error(reply, "stage_refused")
        except aiohttp.ClientError as error:
            raise PipelineError(f"stage {url} unreachable: {error}", 503, "stage_unreachable") from None
        status = 400 if code == "context_length_exceeded" else 503 if code == "kv_budget_exceeded" else 502
        raise PipelineError(f"stage {url} refused the step: {message}", status, code)

    async def close(self, session: str) -> None:
        """Free the session on every stage; best effort (stages also time idle sessions out)."""

        async def close_one(url: str) -> None:
            try:
                async with self.http.delete(f"{url}/v1/sessions/{session}", timeout=aiohttp.ClientTimeout(total=5)):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                log.debug("closing session %s on %s failed: %s", session, url, error)

        await asyncio.gather(*(close_one(url) for url in self.stage_urls))
