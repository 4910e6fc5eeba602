"""Several answers to one request: ``n`` samples of each prompt, run as concurrent generations,
their streams merged as pieces come, their logprobs put in OpenAI's two shapes.

Choice ``i`` of a request with prompts P0..Pk and ``n`` answers each answers prompt ``i // n``
(OpenAI's order); with a seed, answer ``j`` of a prompt draws with ``seed + j``
(``protocol._GenerationRequest.sampling_params``), so answers differ and each is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bloombee_stage.gateway.engine import GenerationRequest
from bloombee_stage.gateway.generation import Generated
from bloombee_stage.gateway.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from bloombee_stage.wire.messages import TokenLogprobs

T = TypeVar("T")


@dataclass
class Choice:
    index: int
    prompt: list[int]
    generation: GenerationRequest
    result: Generated = field(default_factory=Generated)
    logprobs_sent: int = 0  # of result.logprobs, how many a stream has sent so far

    def new_logprobs(self) -> list[TokenLogprobs]:
        """The logprobs a stream has not sent yet (those of the tokens behind its latest piece)."""
        fresh = self.result.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.result.logprobs)
        return fresh


async def run_all(runs: list[Awaitable[None]]) -> None:
    """Run every answer's generation at once; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_DONE = object()


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several streams as each comes; a stream's failure ends all of them and is raised."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((item, None))
        except Exception as error:
            await queue.put((None, error))
        finally:
            await queue.put((_DONE, None))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                running -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(prompts: list[list[int]], choices: list[Choice]) -> Usage:
    """Tokens of every prompt (once each, whatever ``n``) and of every answer."""
    prompt = sum(len(ids) for ids in prompts)
    completion = sum(len(choice.result.token_ids) for choice in choices)
    cached = PromptTokensDetails(cached_tokens=sum(choice.result.cached_tokens for choice in choices))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=cached)  # fmt: skip


def chat_logprobs(entries: list[TokenLogprobs], text_of: Callable[[int], str]) -> ChatLogprobs:
    """Chat's shape: per token its text, logprob, UTF-8 bytes and the likeliest alternatives."""

    def top(token: int, logprob: float) -> TopLogprob:
        text = text_of(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = [ChatTokenLogprob(**top(entry.token, entry.logprob).model_dump(),
                                top_logprobs=[top(token, logprob) for token, logprob in entry.top])
               for entry in entries]  # fmt: skip
    return ChatLogprobs(content=content)


@dataclass
class CompletionLogprobsWriter:
    """The completions shape (parallel lists), written in parts, its text offsets running on from part
    to part: an echoed prompt, then the answer's tokens (all at once, or chunk by chunk)."""

    text_of: Callable[[int], str]
    offset: int = 0

    def prompt(self, first_token: int, entries: list[TokenLogprobs]) -> CompletionLogprobs:
        """An echoed prompt: its first token (nothing predicts it: logprob ``None``), then the rest."""
        shaped = CompletionLogprobs()
        self._append(shaped, self.text_of(first_token), None, None)
        return self._write(shaped, entries)

    def tokens(self, entries: list[TokenLogprobs]) -> CompletionLogprobs:
        return self._write(CompletionLogprobs(), entries)

    def _write(self, shaped: CompletionLogprobs, entries: list[TokenLogprobs]) -> CompletionLogprobs:
        for entry in entries:
            alternatives = {self.text_of(token): logprob for token, logprob in entry.top}
            self._append(shaped, self.text_of(entry.token), entry.logprob, alternatives)
        return shaped

    def _append(self, shaped: CompletionLogprobs, text: str, logprob: float | None,
                top: dict[str, float] | None) -> None:  # fmt: skip
        shaped.tokens.append(text)
        shaped.token_logprobs.append(logprob)
        shaped.top_logprobs.append(top)
        shaped.text_offset.append(self.offset)
        self.offset += len(text)


def joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[t for part in parts for t in part.tokens],
                              token_logprobs=[lp for part in parts for lp in part.token_logprobs],
                              top_logprobs=[top for part in parts for top in part.top_logprobs],
                              text_offset=[at for part in parts for at in part.text_offset])  # fmt: skip
