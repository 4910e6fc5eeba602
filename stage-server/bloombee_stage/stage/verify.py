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

* A draft tree (``RowMeta.tree``) is walked from its root: at each node the model's own token
  (greedy) is looked for among the node's children; sampled rows check the children in order as
  fixed candidates, each accepted with its probability under what is left of p (rejected ones
  are removed and p renormalised), which draws exactly from p (SpecInfer's multi-candidate
  rejection with one-hot drafts). The accepted nodes go back in ``RowResult.path``.

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


def verify_tree(logits: torch.Tensor, row: RowMeta) -> tuple[list[int], list[int]]:
    """(tokens, accepted nodes) of a tree row: logits [1 + len(draft), vocab], row 0 the position
    before the tree, row 1 + i node i's."""
    draft, params, tree = row.draft, row.sampling, row.tree
    assert tree is not None
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"{logits.shape[0]} positions of logits for a tree of {len(draft)}; expected one more")
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(tree):
        children.setdefault(parent, []).append(node)
    first = row.start + row.length - len(draft) - 1
    tokens: list[int] = []
    path: list[int] = []
    node = -1
    while True:
        scores = logits[node + 1]
        candidates = children.get(node, [])
        if params.greedy:
            choice = int(scores.argmax())
            follow = next((child for child in candidates if draft[child] == choice), None)
            tokens.append(choice)
            if follow is None:
                return tokens, path
            path.append(follow)
            node = follow
            continue
        generator = position_generator(params, first + len(path))
        p = target_probs(scores.unsqueeze(0), params)[0].clone()
        follow = None
        for child in candidates:
            token = draft[child]
            if float(torch.rand((), generator=generator)) < float(p[token]) / float(p.sum()):
                follow = child
                break
            p[token] = 0.0
        if follow is None:
            tokens.append(draw(p, generator))
            return tokens, path
        tokens.append(draft[follow])
        path.append(follow)
        node = follow


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
    if row.tree is not None:  # no context or grammar (RowMeta refuses them with a tree)
        tokens, path = verify_tree(processed_logits(window, row), row)
        result = RowResult(session=row.session, tokens=tokens, path=path)
        along = window[[0, *(1 + node for node in path)]]
    else:
        tokens = verify(processed_logits(chosen_from, row), row)
        result = RowResult(session=row.session, tokens=tokens)
        along = window[: len(tokens)]
    if row.sampling.logprobs is not None:
        result.logprobs = token_logprobs(along, tokens, row.sampling.logprobs)
    if row.prompt_logprobs is not None and row.context is not None:
        following = row.context.prompt[row.start + 1 : row.start + row.length - len(row.draft)]
        result.prompt_logprobs = token_logprobs(logits[: len(following)], following, row.prompt_logprobs)
    return result
