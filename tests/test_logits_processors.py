"""The last stage's logits processors and warpers against transformers' own, on the same logits.

Presence and frequency penalties have no transformers processor; they are checked against
OpenAI's definition (logit - presence * [count > 0] - frequency * count over the completion).
"""

from __future__ import annotations

import pytest
import torch
from bloombee_stage.model.sampling import processed_logits, target_probs, token_logprobs
from bloombee_stage.wire.messages import RowMeta, SamplingParams, TokenContext
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 300
PROMPT = [5, 9, 9, 40, 7]
GENERATED = [11, 40, 11, 12]


def _logits(positions: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(positions, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _row(sampling: SamplingParams, context: TokenContext | None = None, draft: list[int] | None = None) -> RowMeta:
    draft = draft or []
    return RowMeta(session="s", start=len(PROMPT) + len(GENERATED) - 1, length=1 + len(draft), sampling=sampling,
                   draft=draft, context=context)  # fmt: skip


def test_repetition_penalty_equals_transformers_over_prompt_and_completion():
    logits = _logits()
    sampling = SamplingParams(repetition_penalty=1.7)
    context = TokenContext(prompt=PROMPT, completion=GENERATED)
    ours = processed_logits(logits, _row(sampling, context))
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([PROMPT + GENERATED]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_a_drafted_position_sees_the_draft_before_it():
    """Position i of a verification window is judged with the draft's first i tokens generated,
    exactly as sequential generation would judge it."""
    draft = [77, 77, 3]
    logits = _logits(len(draft) + 1)
    sampling = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    ours = processed_logits(logits, _row(sampling, TokenContext(prompt=PROMPT, completion=GENERATED), draft))
    for position in range(len(draft) + 1):
        seen = GENERATED + draft[:position]
        alone = processed_logits(logits[position : position + 1],
                                 _row(sampling, TokenContext(prompt=PROMPT, completion=seen)))  # fmt: skip
        torch.testing.assert_close(ours[position : position + 1], alone)


def test_presence_and_frequency_penalties_follow_openais_definition():
    logits = _logits()
    sampling = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4)
    ours = processed_logits(logits, _row(sampling, TokenContext(completion=GENERATED)))
    expected = logits.clone()
    for token in set(GENERATED):
        expected[0, token] -= 0.7 + (-0.4) * GENERATED.count(token)
    torch.testing.assert_close(ours, expected)
    untouched = [token for token in range(VOCAB) if token not in GENERATED and token not in PROMPT]
    assert torch.equal(ours[0, untouched], logits[0, untouched])  # the prompt is not penalised by these two


def test_logit_bias_equals_transformers_sequence_bias():
    logits = _logits()
    bias = [(3, 5.0), (17, -100.0), (250, 0.5)]
    ours = processed_logits(logits, _row(SamplingParams(logit_bias=bias)))
    theirs = SequenceBiasLogitsProcessor({(token,): value for token, value in bias})(torch.tensor([[1, 2]]),
                                                                                    logits.clone())  # fmt: skip
    torch.testing.assert_close(ours, theirs)


def test_min_tokens_equals_transformers_min_new_tokens():
    logits = _logits(3)
    eos = [0, 2]
    context = TokenContext(min_tokens_left=2, suppress=eos)
    ours = processed_logits(logits, _row(SamplingParams(), context, draft=[8, 9]))
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=2, eos_token_id=eos)
    for position in range(3):  # 0 and 1 generated tokens before: suppressed; 2: free
        sequence = torch.tensor([[1, 1, 1, *([4] * position)]])
        torch.testing.assert_close(ours[position : position + 1], processor(sequence, logits[position : position + 1]))


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (12, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1),
                                                 (40, 0.9, 0.05)])  # fmt: skip
def test_warpers_give_transformers_distribution(top_k, top_p, min_p):
    logits = _logits(2, seed=3)
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p)
    scores = TemperatureLogitsWarper(0.7)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    torch.testing.assert_close(target_probs(logits, params), torch.softmax(scores, dim=-1))


def test_logprobs_are_the_models_log_softmax_with_the_likeliest_alternatives():
    logits = _logits(3, seed=5)
    expected = torch.log_softmax(logits, dim=-1)
    entries = token_logprobs(logits, [4, 100, 299], top=5)
    for position, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[position, entry.token]), abs=1e-6)
        best = expected[position].topk(5)
        assert [token for token, _ in entry.top] == best.indices.tolist()
        assert [value for _, value in entry.top] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert [entry.top for entry in token_logprobs(logits, [1, 2, 3], top=0)] == [[], [], []]


def test_a_row_with_a_grammar_must_carry_its_completion():
    from bloombee_stage.wire.messages import Grammar
    from pydantic import ValidationError

    grammar = SamplingParams(grammar=Grammar(kind="regex", text="[a-z]+"))
    with pytest.raises(ValidationError, match=r"context\.completion"):
        RowMeta(session="s", start=0, length=1, sampling=grammar)
    RowMeta(session="s", start=0, length=1, sampling=grammar, context=TokenContext())
