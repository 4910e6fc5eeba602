"""One generation: rounds of draft + step through the pipeline, turned into text with stop strings."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from bloombee_contract.errors import ErrorCode

from bloombee_stage.gateway.batching import MicroBatcher
from bloombee_stage.gateway.draft_tree import HeadDrafter, HeadState, TreeBudget
from bloombee_stage.gateway.drafting import Draft, DraftLength, DraftState, ModelDrafter, prompt_lookup_draft
from bloombee_stage.gateway.pipeline import PipelineError
from bloombee_stage.gateway.prefixes import Held, PrefixIndex
from bloombee_stage.wire.messages import (
    MAX_FEATURE_POSITIONS,
    RowMeta,
    RowResult,
    SamplingParams,
    TokenContext,
    TokenLogprobs,
)

MAX_REPLAYS = 4  # a generation starts over (on another path, or the same one once it is back) at most this often
LOOKUP_BRANCH_NODES = 4  # a head tree also carries up to this many nodes of prompt lookup's continuation
RECOVERY_WAIT_S = 60.0  # how long a generation waits for a lost stage to be back (restarted) before it fails
# Failures after which the generation replays its tokens so far on fresh sessions: a stage that is
# gone (or was restarted and lost its sessions) is not the request's fault.
# A step refused for its span or plan (a route that mixes two plans' stages, during a re-plan) replays too:
# once every stage of the path is one plan's, the same tokens come out.
REPLAYABLE = frozenset({ErrorCode.STAGE_UNREACHABLE, ErrorCode.UNKNOWN_SESSION, ErrorCode.WRONG_SPAN,
                        ErrorCode.WRONG_PLAN})


@dataclass
class TextAssembler:
    """Accumulates tokens; ``push`` returns the text that is safe to show so far.

    Text is held back while it could still be the start of a stop string, or while it ends in
    half of a multi-byte character (the tokenizer's replacement character). Decoding is
    incremental (as transformers' TextStreamer and vLLM do it): each token decodes a short window
    that starts a few tokens back, so the decoder sees the context a token's spacing depends on,
    and a long answer costs linear, not quadratic, time.
    """

    decode: Callable[[list[int]], str]
    stops: list[str]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (whole characters only)
    emitted: int = 0  # characters already returned
    stopped: bool = False
    _window_start: int = 0  # tokens before this are final in ``text``
    _window_read: int = 0  # tokens [start, read) decode to the end of ``text``

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        searched_from = len(self.text)
        if not self._advance(final=False):
            return ""
        for stop in self.stops:
            at = self.text.find(stop, max(0, searched_from - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._take(self.text[:at])
        safe = len(self.text)
        for stop in self.stops:  # hold back a tail that may grow into a stop string
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if self.text.endswith(stop[:size]):
                    safe -= size
                    break
        return self._take(self.text[:safe])

    def finish(self) -> str:
        """The held-back rest once generation ended without a stop string."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._take(self.text)

    def _advance(self, final: bool) -> bool:
        """Decode the tokens since the window's start into ``text``; False while a character is unfinished."""
        window = self.token_ids[self._window_start :]
        known = self.decode(self.token_ids[self._window_start : self._window_read])
        decoded = self.decode(window)
        if (decoded.endswith("\ufffd") and not final) or len(decoded) <= len(known):
            return False
        self.text += decoded[len(known) :]
        self._window_start, self._window_read = self._window_read, len(self.token_ids)
        return True

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
    cached_tokens: int = 0  # prompt positions copied from an earlier generation's caches, not computed
    replays: int = 0  # times it started over on fresh sessions because a stage was lost
    first_token_at: float | None = None  # time.monotonic() when its first token came back
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # the prompt's tokens after its first, when asked


@dataclass(frozen=True)
class Controls:
    """What a generation asks of the last stage besides its sampling parameters."""

    min_tokens: int = 0  # end-of-sequence (and stop tokens) are not chosen before this many tokens
    prompt_logprobs: int | None = None  # the prompt's logprobs with this many alternatives (echo)

    def context(self, sampling: SamplingParams, prompt: list[int], result: Generated,
                suppress: set[int]) -> TokenContext | None:  # fmt: skip
        """What the next row must tell the last stage's logits processors (None: nothing)."""
        left = max(0, self.min_tokens - len(result.token_ids))
        wants_prompt = self.prompt_logprobs is not None and result.prompt_logprobs is None
        wants_completion = sampling.penalized or sampling.grammar is not None
        if not (wants_completion or left or wants_prompt):
            return None
        return TokenContext(prompt=prompt if wants_prompt or sampling.repetition_penalty != 1.0 else [],
                            completion=list(result.token_ids) if wants_completion else [],
                            min_tokens_left=left, suppress=sorted(suppress) if left else [])  # fmt: skip


@dataclass
class Speculation:
    """How a generation drafts, and how it fared (for the caller's metrics).

    kind: "none", "prompt-lookup", a model draft ("early-exit", "model") run by ``drafter``, or
    the trained head ("head", ``head``: a tree ``width`` wide, a chain when 1, sized each round by
    ``budget``), on ``executor`` (the gateway's torch thread, off the event loop). ``load``: how
    many generations share the pipeline now (trees shrink as it fills).
    """

    kind: str = "none"
    length: DraftLength = field(default_factory=DraftLength)
    drafter: ModelDrafter | None = None
    executor: Executor | None = None
    rounds: int = 0
    draft_seconds: float = 0.0
    head: HeadDrafter | None = None
    width: int = 4
    budget: TreeBudget = field(default_factory=TreeBudget)
    load: Callable[[], int] = lambda: 1
    lookup_branch: int = LOOKUP_BRANCH_NODES  # most nodes of prompt lookup's continuation a head tree carries
    branch_nodes: int = 0  # prompt lookup's nodes added to head trees, and how many of them were accepted
    branch_accepted: int = 0

    def new_state(self) -> DraftState | HeadState | None:
        if self.head is not None:
            return self.head.new_state()
        return self.drafter.new_state() if self.drafter is not None else None

    @property
    def wants_features(self) -> bool:
        return self.head is not None

    async def propose(self, state: DraftState | HeadState | None, context: list[int], room: int,
                      sampling: SamplingParams, chain_only: bool = False,
                      positions: int | None = None) -> Draft:  # fmt: skip
        """A draft of at most ``room`` tokens deep; a tree has at most ``positions`` nodes (the
        session's room for positions; a chain's depth is its size)."""
        if self.kind == "none":
            return Draft()
        if self.head is not None:
            assert isinstance(state, HeadState)
            depth = min(self.length.maximum, room)
            if depth < 1:
                return Draft()
            loop = asyncio.get_running_loop()
            width = 1 if chain_only else self.width
            tree = await loop.run_in_executor(self.executor, self.head.tree, state, depth, width, self.budget.maximum,
                                              self.budget.level_gain())  # fmt: skip
            size = self.budget.size(tree.path_probs, self.load(), tree.seconds)
            most = room if positions is None else positions
            head_guessed = bool(tree.tokens)  # False before the head has seen a hidden state
            tree = tree.top(min(size, most))
            head_nodes = len(tree.tokens)
            # where the budget sends no node, lookup backs off too
            if width > 1 and self.lookup_branch and (head_nodes or not head_guessed):
                # Lookup finds what the answer copies from the text so far (names, code, the question's
                # words); on the bench's open chat its branch added 0.07 to 0.12 tokens a round to a
                # head tree for under one more node a round (bench/draft_acceptance.py).
                lookup = prompt_lookup_draft(context, depth)
                tree = tree.with_branch(lookup, min(self.lookup_branch, most - head_nodes))
            return Draft(tree.tokens, seconds=tree.seconds, tree=tree.parents if width > 1 and tree.tokens else None,
                         predicted=sum(tree.path_probs), calls=tree.calls, head_nodes=head_nodes)  # fmt: skip
        count = min(self.length.current, room)
        if count < 1:
            return Draft()
        if self.drafter is None:
            started = time.perf_counter()
            return Draft(prompt_lookup_draft(context, count), seconds=time.perf_counter() - started)
        loop = asyncio.get_running_loop()
        assert isinstance(state, DraftState)
        return await loop.run_in_executor(self.executor, self.drafter.propose, state, context, count, sampling)

    async def observe(self, state: DraftState | HeadState | None, sent: list[int], outcome: RowResult,
                      position: int) -> None:  # fmt: skip
        """Feed the head the hidden states the last stage returned (the first at ``position``),
        paired with the tokens after them."""
        if self.head is None or not outcome.features or outcome.hidden is None:
            return
        assert isinstance(state, HeadState)
        verified = [*sent, *outcome.tokens]  # the row's undrafted tokens, the accepted drafts, the new token
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.head.observe, state, outcome.hidden,
                                   verified[-outcome.features :], position)  # fmt: skip

    async def resume(self, held: object | None, shared: int,
                     prompt_length: int) -> tuple[int, DraftState | HeadState | None]:  # fmt: skip
        """Positions to fork of a held session sharing ``shared`` with the prompt, and the draft
        state to start with: the held generation's head state cut one position short, so the
        pipeline computes that position again and returns its hidden state, which pairs with
        this prompt's next token (the held one's may differ). Without one (or when the rest of
        the prompt is longer than a round returns hidden states for) the head starts empty and
        drafts from the prompt's last positions only."""
        if self.head is None or not isinstance(held, HeadState) or prompt_length - shared + 1 > MAX_FEATURE_POSITIONS:
            return shared, self.new_state()
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(self.executor, self.head.prefix, held, shared - 1)
        return (shared, self.new_state()) if state is None else (shared - 1, state)


async def generate(
    stepper: MicroBatcher,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: SamplingParams,
    eos_ids: set[int],
    assembler: TextAssembler,
    result: Generated,
    speculation: Speculation | None = None,
    prefixes: PrefixIndex | None = None,
    recovery_wait_s: float = RECOVERY_WAIT_S,
    deadline: float = math.inf,
    controls: Controls | None = None,
    move_over: Callable[[], tuple[MicroBatcher, PrefixIndex] | None] | None = None,
) -> AsyncIterator[str]:
    """Yield text pieces while generating; ``result`` holds the tokens and finish reason at the end.

    Each round sends the tokens not yet in the stages' caches plus a draft as one row, and keeps
    what the last stage's verification returns (speculative.py): without a draft a round yields
    exactly one token, with one up to the draft's length plus one.

    With ``prefixes``, a prompt that starts like a finished generation's context opens its
    session as a fork of that one (prefixes.py), and this generation's session is kept in turn.

    Past ``deadline`` (``time.monotonic()``) the generation fails with ``pipeline_timeout`` before
    its next round, and a wait for a lost stage ends there too. ``controls``: min_tokens and the
    prompt's logprobs (a prompt whose logprobs are asked is computed, never forked).
    ``move_over``: where a replay goes instead of ``stepper`` (the new plan's lane, when a plan
    switch retired this generation's), or None to stay.
    """
    speculation = speculation or Speculation()
    controls = controls or Controls()
    if controls.prompt_logprobs is not None:
        prefixes = None
    if speculation.wants_features and not sampling.greedy and sampling.seed is not None:
        # A seeded draw repeats only with the same drafts; the head drafts from the hidden states
        # of the positions this generation computes, which a fork would leave out.
        prefixes = None
    if not (sampling.greedy or sampling.seed is None):  # sizes from the tokens alone: see DraftLength
        speculation.length.timed = False
        speculation.budget = TreeBudget(maximum=speculation.budget.maximum, timed=False)  # not carried timings
    session = uuid.uuid4().hex
    path = stepper.open()
    state = speculation.new_state()
    tree_path: list[int] = []  # the last round's accepted tree nodes: the stages keep their KV
    limit = len(prompt_ids) + max_tokens
    context, start, pending = list(prompt_ids), 0, list(prompt_ids)
    fork = prefixes.find(prompt_ids, path) if prefixes is not None else None
    if fork is not None:
        assert prefixes is not None
        shared, state = await speculation.resume(prefixes.draft_state(fork[0]), fork[1], len(prompt_ids))
        fork = (fork[0], shared)
        start = shared
        pending = context[start:]
    reroutes = 0
    try:
        while result.finish_reason is None:
            if time.monotonic() > deadline:
                raise PipelineError(f"the request ran past its deadline after {len(result.token_ids)} tokens",
                                    ErrorCode.PIPELINE_TIMEOUT)  # fmt: skip
            room = min(limit - start - len(pending), max_tokens - len(result.token_ids) - 1)
            token_context = controls.context(sampling, prompt_ids, result, eos_ids)
            chain_only = token_context is not None or sampling.grammar is not None  # they judge a chain
            draft = await speculation.propose(state, context, room, sampling, chain_only,
                                              positions=limit - start - len(pending))  # fmt: skip
            asks_prompt = start == 0 and token_context is not None and result.prompt_logprobs is None
            features = min(len(pending), MAX_FEATURE_POSITIONS) if speculation.wants_features else 0
            row = RowMeta(session=session, start=start, length=len(pending) + len(draft.tokens), sampling=sampling,
                          max_length=limit, draft=draft.tokens, draft_probs=draft.probs, tree=draft.tree,
                          tree_path=tree_path, features=features, fork=fork[0] if fork else None,
                          context=token_context,
                          prompt_logprobs=controls.prompt_logprobs if asks_prompt else None)  # fmt: skip
            started = time.perf_counter()
            try:
                outcome = await stepper.step(row, pending + draft.tokens, path)
            except PipelineError as error:
                if fork is not None and error.code == ErrorCode.FORK_SOURCE_GONE:
                    # A stage let the source go (memory pressure, idle time-out): compute the prompt after all.
                    assert prefixes is not None
                    prefixes.drop(fork[0])
                    fork, start, pending = None, 0, list(context)
                    state, tree_path = speculation.new_state(), []
                    continue
                if not (error.unreachable or error.code in REPLAYABLE) or reroutes >= MAX_REPLAYS:
                    raise
                # A stage is gone (its KV cache with it): start over with the whole context so far on
                # fresh sessions, on another path or on this one once its stages answer again (a
                # restarted stage). Tokens already streamed stay valid: the replay computes the same.
                reroutes += 1
                result.replays += 1
                await stepper.close(session, path)
                moved = move_over() if move_over is not None else None
                if moved is not None:
                    stepper, prefixes = moved[0], (moved[1] if prefixes is not None else None)
                session, path, start, pending, fork = uuid.uuid4().hex, stepper.open(), 0, list(context), None
                state, tree_path = speculation.new_state(), []
                if not await stepper.wait_ready(path, min(recovery_wait_s, max(0.0, deadline - time.monotonic()))):
                    raise
                continue
            if fork is not None:
                result.cached_tokens, fork = fork[1], None  # the session now holds the prefix itself
            accepted = outcome.tokens
            if result.first_token_at is None:
                result.first_token_at = time.monotonic()
            if outcome.prompt_logprobs is not None and result.prompt_logprobs is None:
                result.prompt_logprobs = outcome.prompt_logprobs
            speculation.rounds += 1
            speculation.draft_seconds += draft.seconds
            round_s = time.perf_counter() - started
            speculation.length.update(len(draft.tokens), len(accepted) - 1, round_s, draft.seconds)
            head_accepted = draft.head_accepted(outcome.path, len(accepted) - 1)
            speculation.budget.update(draft.predicted, head_accepted, len(draft.tokens), round_s, draft.calls,
                                      draft.seconds)  # fmt: skip
            if draft.head_nodes is not None:
                speculation.branch_nodes += len(draft.tokens) - draft.head_nodes
                speculation.branch_accepted += len(accepted) - 1 - head_accepted
            await speculation.observe(state, pending, outcome, start + len(pending) - features)
            tree_path = list(outcome.path or []) if draft.tree is not None else []
            start += len(pending) + len(accepted) - 1  # the last accepted token is not in any cache yet
            pending = [accepted[-1]]
            for index, token in enumerate(accepted):
                result.token_ids.append(token)
                if outcome.logprobs is not None:
                    result.logprobs.append(outcome.logprobs[index])
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
        # The last tree's accepted nodes were never moved into place: only the positions before them are kept.
        # Only a head's state is kept with the session (a fork resumes it); a draft model's KV cache is not.
        kept_state = state if isinstance(state, HeadState) else None
        await _end_session(stepper, prefixes, Held(session, path, tuple(context[: start - len(tree_path)]), kept_state),
                           keep=result.finish_reason is not None)  # fmt: skip


async def _end_session(stepper: MicroBatcher, prefixes: PrefixIndex | None, held: Held, keep: bool) -> None:
    """Park a finished generation's session as a fork source, or close it; close those the index lets go."""
    released = prefixes.hold(held) if prefixes is not None and keep else [held]
    await stepper.close(held.session, held.path, park=all(other is not held for other in released))
    for other in released:
        if other is not held:
            await stepper.forget(other.session, other.path)
