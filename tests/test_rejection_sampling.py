"""Speculative rejection sampling keeps the target distribution: chi-square tests over many seeds.

A tiny random Llama with an 8-token vocabulary is the target; its first layer plus its head is
the early-exit draft. Generations run through the gateway's own ``generate`` loop, draft and
verification code, in-process (a pipeline of processes per seed would take minutes), and the
empirical distribution of the three generated tokens is compared with the exact one computed
from the target model. A control run whose verifier keeps every drafted token must fail the
same test, so the test can tell a wrong sampler from a right one.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
import torch
from bloombee_stage.gateway.drafting import DraftLength, ModelDrafter
from bloombee_stage.gateway.generation import Generated, Speculation, TextAssembler, generate
from bloombee_stage.model.sampling import target_probs
from bloombee_stage.model.span import Span, StageModel, truncate_cache
from bloombee_stage.stage.verify import verify
from bloombee_stage.wire.messages import RowMeta, RowResult, SamplingParams

PROMPT = [1, 2, 3]
NEW_TOKENS = 3
VOCAB = 8


class InProcessStepper:
    """The stage server's step for one row, in this process: the whole model, then ``verify``."""

    def __init__(self, model: StageModel, verifier=verify) -> None:
        self.model = model
        self.verifier = verifier
        self.caches: dict[str, object] = {}

    def open(self) -> tuple[int, ...]:
        return (0,)

    async def step(self, row: RowMeta, inputs: list[int], path: tuple[int, ...]) -> RowResult:
        cache = self.caches.setdefault(row.session, self.model.new_cache())
        truncate_cache(cache, row.start)
        logits = self.model.forward_rows(torch.tensor([inputs]), [cache], [row.length], [len(row.draft) + 1])[0]
        return RowResult(session=row.session, tokens=self.verifier(logits, row))

    async def close(self, session: str, path: tuple[int, ...], park: bool = False) -> None:
        self.caches.pop(session, None)  # no prefix index here: generate() never asks to park


def exact_distribution(model: StageModel, params: SamplingParams, prompt: list[int] = PROMPT,
                       tokens: int = NEW_TOKENS) -> dict[tuple[int, ...], float]:  # fmt: skip
    """P(t1, ..., t_tokens) of the target after ``prompt`` with temperature and top-p, by
    enumerating every prefix of nonzero probability."""

    def next_probs(context: list[int]) -> torch.Tensor:
        return target_probs(model.forward(torch.tensor([context]), model.new_cache())[0, -1], params)

    exact: dict[tuple[int, ...], float] = {}

    def extend(drawn: tuple[int, ...], probability: float) -> None:
        if len(drawn) == tokens:
            exact[drawn] = probability
            return
        probs = next_probs([*prompt, *drawn])
        for token in range(VOCAB):
            if probs[token] > 0:
                extend((*drawn, token), probability * float(probs[token]))

    extend((), 1.0)
    return exact


def chi_square_p_value(observed: Counter, expected: dict[tuple[int, ...], float], total: int) -> float:
    """Pearson's test; cells expecting fewer than 5 draws are pooled into one."""
    statistic, cells, pooled_observed, pooled_expected = 0.0, 0, 0, 0.0
    for cell, probability in expected.items():
        count = probability * total
        if count < 5:
            pooled_observed += observed.get(cell, 0)
            pooled_expected += count
            continue
        statistic += (observed.get(cell, 0) - count) ** 2 / count
        cells += 1
    impossible = sum(n for cell, n in observed.items() if expected.get(cell, 0.0) == 0.0)
    if impossible:
        return 0.0  # a sequence the target can never produce
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    freedom = cells - 1
    return float(torch.special.gammaincc(torch.tensor(freedom / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))  # fmt: skip


def sample_many(target: StageModel, drafter: ModelDrafter, params: dict, seeds: range, verifier=verify) -> Counter:
    stepper = InProcessStepper(target, verifier)

    async def run_all() -> Counter:
        counts: Counter = Counter()
        for seed in seeds:
            result = Generated()
            speculation = Speculation("early-exit", DraftLength(maximum=4), drafter, executor=None)
            sampling = SamplingParams(seed=seed, **params)
            async for _ in generate(stepper, PROMPT, NEW_TOKENS, sampling, set(), TextAssembler(str, []), result,
                                    speculation):  # fmt: skip
                pass
            counts[tuple(result.token_ids)] += 1
        return counts

    return asyncio.run(run_all())


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}])
def test_speculative_sampling_follows_the_target_distribution(tiny_vocab_dir, params):
    target = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    drafter = ModelDrafter(StageModel(tiny_vocab_dir, Span(0, 1, 2), head=True), "early-exit")
    exact = exact_distribution(target, SamplingParams(**params))
    draws = 3000
    counts = sample_many(target, drafter, params, range(draws))
    assert sum(counts.values()) == draws and all(len(cell) == NEW_TOKENS for cell in counts)
    assert chi_square_p_value(counts, exact, draws) > 1e-3

    def keep_every_draft(logits: torch.Tensor, row: RowMeta) -> list[int]:
        kept = verify(logits, row)  # the bonus/correction token, but drafts are never refused
        return [*row.draft, kept[-1]] if len(kept) <= len(row.draft) else kept

    control = 1000
    biased = sample_many(target, drafter, params, range(control), keep_every_draft)
    assert chi_square_p_value(biased, exact, control) < 1e-6


def test_drafts_are_verified_in_rounds_of_several_tokens(tiny_vocab_dir):
    """The statistical test above is not vacuous: drafts were proposed, some kept and some refused."""
    target = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    drafter = ModelDrafter(StageModel(tiny_vocab_dir, Span(0, 1, 2), head=True), "early-exit")
    seen = Counter()

    def counting_verify(logits: torch.Tensor, row: RowMeta) -> list[int]:
        kept = verify(logits, row)
        seen["drafted"] += len(row.draft)
        seen["kept"] += len(kept) - 1
        return kept

    sample_many(target, drafter, {"temperature": 1.0}, range(200), counting_verify)
    assert seen["drafted"] > 200 and 0 < seen["kept"] < seen["drafted"]


def test_one_hot_drafts_follow_the_target_distribution_too():
    """Prompt lookup drafts one token with certainty: the first token must still follow p."""
    torch.manual_seed(3)
    logits = torch.randn(2, VOCAB) * 2
    params = SamplingParams(temperature=1.0, seed=0)
    p = target_probs(logits[0], params)
    counts: Counter = Counter()
    draws = 6000
    for seed in range(draws):
        row = RowMeta(session="s", start=0, length=2, sampling=params.model_copy(update={"seed": seed}), draft=[5])
        counts[(verify(logits, row)[0],)] += 1
    exact = {(token,): float(p[token]) for token in range(VOCAB)}
    assert chi_square_p_value(counts, exact, draws) > 1e-3
    assert not math.isclose(float(p[5]), 1.0)
