"""Drafts for speculative decoding, made at the gateway, and an adaptive draft length.

One pipeline round trip costs tens of milliseconds over a WAN, so the gateway drafts k cheap
tokens and sends them through the pipeline in one step behind the last accepted token; the last
stage verifies them (``bloombee_stage.stage.verify``).

Drafts: prompt lookup (the continuation of the latest earlier match of the context's last
n-gram, as in vLLM's n-gram proposer) and ``ModelDrafter``: a small causal LM at the gateway,
either the target's first layers with its final norm and head (early exit) or a separate small
model that shares the tokenizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from bloombee_contract.launch import DEFAULT_DRAFT_TOKENS

from bloombee_stage.model.sampling import DRAFT_STREAM, draw, position_generator, target_probs
from bloombee_stage.model.span import StageModel, truncate_cache
from bloombee_stage.wire.messages import SamplingParams

DRAFT_TOP = 16  # a sampled draft's distribution travels as its top tokens (the draft samples from exactly that)


def prompt_lookup_draft(context: list[int], max_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the context's last n-gram.

    Longer n-grams are tried first (they predict better); no match gives an empty draft.
    """
    if max_tokens < 1:
        return []
    for size in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = context[-size:]
        for start in range(len(context) - size - 1, -1, -1):  # latest match first, never the tail itself
            if context[start : start + size] == tail:
                follow = context[start + size : start + size + max_tokens]
                if follow:
                    return follow
    return []


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: list[list[tuple[int, float]]] | None = None  # per token: the (token, prob) pairs it was drawn from
    seconds: float = 0.0
    tree: list[int] | None = None  # parents, when the draft is a tree (RowMeta.tree)
    predicted: float = 0.0  # the draft head's expected accepted tokens (sum of path probabilities)
    calls: int = 0  # the draft head's calls for its tree's levels
    head_nodes: int | None = None  # a head tree's own nodes come first; later ones are another drafter's branch

    def head_accepted(self, path: list[int] | None, accepted: int) -> int:
        """How many of the ``accepted`` drafts were the head's own nodes (``path``: the accepted
        tree nodes), the ones its path probabilities predicted."""
        if self.head_nodes is None or path is None:
            return accepted
        return sum(1 for node in path if node < self.head_nodes)


@dataclass
class DraftState:
    """A generation's draft cache: the tokens the draft model has processed, and their KV cache."""

    cache: object
    tokens: list[int] = field(default_factory=list)


class ModelDrafter:
    """Drafts with a small causal LM held at the gateway (the target's first layers + head, or a small model).

    Calls run on the gateway's torch thread; each generation owns a DraftState.
    """

    def __init__(self, model: StageModel, kind: str) -> None:
        self.model = model
        self.kind = kind

    def new_state(self) -> DraftState:
        return DraftState(self.model.new_cache())

    def _next_logits(self, state: DraftState, feed: list[int]) -> torch.Tensor:
        inputs = torch.tensor([feed], dtype=torch.int64)
        logits = self.model.forward_rows(inputs, [state.cache], [len(feed)], keep=[1])[0]
        state.tokens.extend(feed)
        return logits[-1]

    def propose(self, state: DraftState, context: list[int], count: int, sampling: SamplingParams) -> Draft:
        started = time.perf_counter()
        common = 0
        limit = min(len(state.tokens), len(context) - 1)  # at least one token to feed
        while common < limit and state.tokens[common] == context[common]:
            common += 1
        truncate_cache(state.cache, common)
        del state.tokens[common:]
        logits = self._next_logits(state, context[common:])
        draft = Draft(probs=None if sampling.greedy else [])
        for index in range(count):
            position = len(context) - 1 + index
            if sampling.greedy:
                token = int(logits.argmax())
            else:
                probs = target_probs(logits, sampling)
                top_probs, top_tokens = probs.topk(min(DRAFT_TOP, probs.shape[-1]))
                top_probs = top_probs / top_probs.sum()
                pairs = list(zip(top_tokens.tolist(), top_probs.tolist(), strict=True))
                token = pairs[draw(top_probs, position_generator(sampling, position, DRAFT_STREAM))][0]
                assert draft.probs is not None
                draft.probs.append(pairs)
            draft.tokens.append(token)
            if index + 1 < count:
                logits = self._next_logits(state, [token])
        draft.seconds = time.perf_counter() - started
        return draft


@dataclass
class DraftLength:
    """How many tokens to draft: the k that maximises expected tokens per second of a round.

    With per-token acceptance a, a draft of k yields (1 - a^(k+1)) / (1 - a) tokens and costs
    one round trip plus k draft steps; a WAN round trip is long, so k grows while drafts are
    accepted and shrinks when they are not or when drafting is slow against the round trip. When
    no draft pays (k = 0), one token is still drafted every ``probe_every`` rounds, so a change in
    acceptance is noticed. Acceptance and costs are running averages over this generation.

    ``timed=False`` keeps the costs at their priors: a seeded sampled request must draw the same
    tokens when repeated, and its draws depend on what was drafted, so its draft lengths may
    follow acceptance (a function of the tokens) but not wall-clock times.
    """

    maximum: int = DEFAULT_DRAFT_TOKENS
    timed: bool = True
    accept_rate: float = 0.6  # prior until measured
    round_trip_s: float = 0.05
    draft_token_s: float = 0.0
    probe_every: int = 8
    proposed: int = 0
    accepted: int = 0
    rounds_without_draft: int = 0

    def best(self) -> int:
        """The draft length of most expected tokens per second (0: drafting does not pay)."""
        rates = [expected_tokens(self.accept_rate, k) / (self.round_trip_s + k * self.draft_token_s)
                 for k in range(self.maximum + 1)]  # fmt: skip
        return max(range(len(rates)), key=lambda k: (rates[k] * (1 - 1e-9 * k), -k))

    @property
    def current(self) -> int:
        best = self.best()
        if best == 0 and self.rounds_without_draft + 1 >= self.probe_every:
            return 1
        return best

    def update(self, drafted: int, accepted: int, round_trip_s: float | None = None,
               draft_seconds: float | None = None) -> None:  # fmt: skip
        self.proposed += drafted
        self.accepted += accepted
        self.rounds_without_draft = 0 if drafted else self.rounds_without_draft + 1
        if drafted:
            # A geometric run: `accepted` successes, then a failure unless the whole draft was kept.
            failures = 0 if accepted == drafted else 1
            observed = accepted / (accepted + failures) if accepted + failures else self.accept_rate
            self.accept_rate = 0.7 * self.accept_rate + 0.3 * observed
            if draft_seconds is not None and self.timed:
                self.draft_token_s = 0.7 * self.draft_token_s + 0.3 * draft_seconds / drafted
        if round_trip_s is not None and self.timed:
            self.round_trip_s = 0.7 * self.round_trip_s + 0.3 * round_trip_s

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def expected_tokens(accept_rate: float, k: int) -> float:
    """Tokens a round yields on average with a draft of k and per-token acceptance ``accept_rate``."""
    if accept_rate >= 1.0:
        return k + 1.0
    return (1 - math.pow(accept_rate, k + 1)) / (1 - accept_rate)
