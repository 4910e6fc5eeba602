"""Turning a stream of token ids into text: incremental detokenisation, stop strings, finish reasons."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from bloombee_stage.pipeline import PipelineClient
from bloombee_stage.sampling import SamplingParams


@dataclass
class TextAssembler:
    """Accumulates tokens; ``push`` returns the text that is safe to show so far.

    Text is held back while it could still be the start of a stop string, or while it ends in
    half of a multi-byte character (the tokenizer's replacement character).
    """

    decode: Callable[[list[int]], str]
    stops: list[str]
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters already returned
    stopped: bool = False

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.decode(self.token_ids)
        for stop in self.stops:
            at = text.find(stop)
            if at != -1:
                self.stopped = True
                return self._take(text[:at])
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for stop in self.stops:  # hold back a tail that may grow into a stop string
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:size]):
                    safe -= size
                    break
        return self._take(text[:safe])

    def finish(self) -> str:
        """The held-back rest once generation ended without a stop string."""
        if self.stopped:
            return ""
        return self._take(self.decode(self.token_ids))

    def _take(self, text: str) -> str:
        if len(text) <= self.emitted:
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


@dataclass
class Generated:
    """What one generation produced, filled in as it runs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


async def generate(
    pipeline: PipelineClient,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: SamplingParams,
    eos_ids: set[int],
    assembler: TextAssembler,
    result: Generated,
) -> AsyncIterator[str]:
    """Yield text pieces while generating; ``result`` holds the tokens and finish reason at the end."""
    session = pipeline.new_session()
    start, feed = 0, list(prompt_ids)
    try:
        for _ in range(max_tokens):
            (token,) = await pipeline.step(session, start, feed, sampling, max_length=len(prompt_ids) + max_tokens)
            start += len(feed)
            feed = [token]
            result.token_ids.append(token)
            if token in eos_ids:
                result.finish_reason = "stop"
                break
            piece = assembler.push(token)
            if piece:
                result.text += piece
                yield piece
            if assembler.stopped:
                result.finish_reason = "stop"
                break
        else:
            result.finish_reason = "length"
        tail = assembler.finish()
        if tail:
            result.text += tail
            yield tail
    finally:
        await pipeline.close(session)
