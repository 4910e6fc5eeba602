"""Verification of drafted tokens on the last stage, in the same pass that computes them.

The last stage verifies a row's draft against the model's own distribution at each of the k + 1
positions and returns the accepted prefix plus one token of its own, so every round yields at
least one token. Rejected positions are rolled back for free: the next step's ``start`` cuts
every stage's KV cache back to the accepted length.

* Greedy requests keep the draft's longest prefix equal to the model's argmax: the output is
  the model's greedy output, token for token.
* Sampled requests use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
  drafted token x is kept with probability min(1, p(x) / q(x)); on the first rejection a token
  is drawn from max(0, p - q), renormalised. The output then follows the target distribution p
  exactly, whatever the draft's q. Deterministic drafts (prompt lookup) have a one-hot q.

The drafts themselves are made at the gateway (``bloombee_stage.gateway.drafting``).
"""

from __future__ import annotations

import torch

from bloombee_stage.model.grammar import GrammarError, GrammarMasks
from bloombee_stage.model.sampling import (
    draw,
    position_generator,
    processed_logits,
    shared_length,
    target_probs,
    token_logprobs,
)
from bloombee_stage.wire.messages import RowMeta, RowResult


def accept_greedy(draft: list[int], predicted: list[int]) -> list[int]:
    """The tokens a greedy verification keeps: ``predicted[i]`` is the model's token after draft[:i]."""
    if len(predicted) != len(draft) + 1:
        raise ValueError(f"{len(predicted)} predictions for a draft of {len(draft)}; expected one more")
    return predicted[: shared_length(draft, predicted) + 1]


def verify(logits: torch.Tensor, row: RowMeta) -> list[int]:
    """The tokens a row yields: logits [len(draft) + 1, vocab] are the row's last positions', processed."""
    draft, params = row.draft, row.sampling
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"{logits.shape[0]} positions of logits for a draft of {len(draft)}; expected one more")
    first = row.start + row.length - len(draft) - 1  # the position whose next token logits[0] decides
    if params.greedy:
        return accept_greedy(draft, logits.argmax(dim=-1).tolist())
    target = target_probs(logits, params)
    tokens: list[int] = []
    for index, token in enumerate(draft):
        generator = position_generator(params, first + index)
        p = target[index]
        q = torch.zeros_like(p)
        if row.draft_probs is None:
            q[token] = 1.0
        else:
            for drafted, prob in row.draft_probs[index]:
                q[drafted] = prob
        accept = min(1.0, float(p[token]) / float(q[token])) if q[token] > 0 else 0.0
        if float(torch.rand((), generator=generator)) < accept:
            tokens.append(token)
            continue
        residual = (p - q).clamp_min(0.0)
        tokens.append(draw(residual if residual.sum() > 0 else p, generator))
        return tokens
    tokens.append(draw(target[len(draft)], position_generator(params, first + len(draft))))
    return tokens


def decide(logits: torch.Tensor, row: RowMeta, grammars: GrammarMasks | None = None) -> RowResult:
    """What the last stage returns for a row: its tokens (``verify``), their logprobs if asked, and
    the prompt's if asked. ``logits`` hold the row's last ``len(draft) + 1`` positions, or all of
    them when the row asks for its prompt's logprobs. A row with a grammar has what it forbids
    masked first (``grammars``: the stage's matchers)."""
    window = logits[-(len(row.draft) + 1) :]
    chosen_from = window
    if row.sampling.grammar is not None:
        if grammars is None:
            raise GrammarError("a row with a grammar reached a stage that does not choose tokens")
        assert row.context is not None  # RowMeta requires it with a grammar
        chosen_from = grammars.mask(window, row.session, row.sampling.grammar, row.context.completion, row.draft)
    tokens = verify(processed_logits(chosen_from, row), row)
    result = RowResult(session=row.session, tokens=tokens)
    if row.sampling.logprobs is not None:
        result.logprobs = token_logprobs(window[: len(tokens)], tokens, row.sampling.logprobs)
    if row.prompt_logprobs is not None and row.context is not None:
        following = row.context.prompt[row.start + 1 : row.start + row.length - len(row.draft)]
        result.prompt_logprobs = token_logprobs(logits[: len(following)], following, row.prompt_logprobs)
    return result
