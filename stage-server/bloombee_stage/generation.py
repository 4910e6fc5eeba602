"""Turning a stream of token ids into text: incremental detokenisation, stop strings, finish reasons."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from bloombee_stage.pipeline import PipelineClient
from bloombee_stage.sampling import SamplingParams
from bloombee_stage.speculative import DraftLength, accept_greedy, prompt_lookup_draft


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


@dataclass
class Speculation:
    """The draft a generation uses, and how it fared (for the caller's metrics)."""

    kind: str = "none"  # "none" | "prompt-lookup"
    length: DraftLength = field(default_factory=DraftLength)
    rounds: int = 0


async def generate(
    pipeline: PipelineClient,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: SamplingParams,
    eos_ids: set[int],
    assembler: TextAssembler,
    result: Generated,
    speculation: Speculation | None = None,
) -> AsyncIterator[str]:
    """Yield text pieces while generating; ``result`` holds the tokens and finish reason at the end.

    Each round feeds the tokens not yet in the stages' caches plus a draft, and keeps what
    verification accepts (speculative.py); without a draft a round yields exactly one token.
    """
    speculation = speculation or Speculation()
    drafting = speculation.kind == "prompt-lookup" and sampling.greedy
    session = pipeline.new_session()
    limit = len(prompt_ids) + max_tokens
    context, start, pending = list(prompt_ids), 0, list(prompt_ids)
    try:
        while result.finish_reason is None:
            room = min(limit - start - len(pending), max_tokens - len(result.token_ids) - 1)
            draft = prompt_lookup_draft(context, min(speculation.length.current, room)) if drafting else []
            predicted = await pipeline.step(session, start, pending + draft, sampling, max_length=limit,
                                            keep=len(draft) + 1)  # fmt: skip
            accepted = accept_greedy(draft, predicted)
            speculation.rounds += 1
            if draft:
                speculation.length.update(len(draft), len(accepted) - 1)
            start += len(pending) + len(accepted) - 1  # the last accepted token is not in any cache yet
            pending = [accepted[-1]]
            for token in accepted:
                result.token_ids.append(token)
                context.append(token)
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
                if len(result.token_ids) >= max_tokens:
                    result.finish_reason = "length"
                    break
        tail = assembler.finish()
        if tail:
            result.text += tail
            yield tail
    finally:
        await pipeline.close(session)
