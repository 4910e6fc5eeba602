"""Choosing next tokens from logits: the request's logits processors, then greedy or a seeded draw.

Processing follows vLLM's order, each step as transformers' own processor computes it:
``logit_bias`` (added), ``min_tokens`` (end-of-sequence and stop tokens forbidden while too few
tokens were generated), repetition penalty (transformers' ``RepetitionPenaltyLogitsProcessor``,
over the prompt and the completion), presence and frequency penalties (OpenAI's definition, over
the completion), then temperature, top-k, top-p and min-p (transformers' warpers, in that order).
A draft's position i sees the completion so far plus the draft's first i tokens, so verification
judges each drafted token exactly as sequential generation would have.

Logprobs are the model's own (``log_softmax`` of its logits, before any processing), as vLLM
reports them by default and as scoring a text needs.
"""

from __future__ import annotations

from collections import Counter

import torch

from bloombee_stage.wire.messages import RowMeta, SamplingParams, TokenLogprobs

# Independent random streams per position: the target's draws, and the draft's (speculative.py).
TARGET_STREAM, DRAFT_STREAM = 0, 1


def processed_logits(logits: torch.Tensor, row: RowMeta) -> torch.Tensor:
    """``logits`` [positions, vocab] (the row's last positions, a draft's among them) after the
    request's logits processors; the same tensor when it asks for none."""
    params, context = row.sampling, row.context
    if not params.logit_bias and context is None:
        return logits
    scores = logits.float().clone()
    for token, bias in params.logit_bias:
        scores[:, token] += bias
    if context is None:
        return scores
    generated = Counter(context.completion)
    prompt = torch.tensor(sorted(set(context.prompt)), dtype=torch.long)
    suppress = torch.tensor(context.suppress, dtype=torch.long)
    for position in range(scores.shape[0]):
        if position > 0:
            generated[row.draft[position - 1]] += 1
        if position < context.min_tokens_left and len(suppress):
            scores[position, suppress] = float("-inf")
        if params.repetition_penalty != 1.0:
            seen = torch.unique(torch.cat([prompt, torch.tensor(list(generated), dtype=torch.long)]))
            picked = scores[position, seen]
            scores[position, seen] = torch.where(picked < 0, picked * params.repetition_penalty,
                                                 picked / params.repetition_penalty)  # fmt: skip
        if generated and (params.presence_penalty or params.frequency_penalty):
            tokens = torch.tensor(list(generated), dtype=torch.long)
            counts = torch.tensor(list(generated.values()), dtype=scores.dtype)
            scores[position, tokens] -= params.presence_penalty + params.frequency_penalty * counts
    return scores


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(logits / T), cut to the top k, the
    top-p nucleus and the tokens at least min-p times as likely as the likeliest."""
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """The model's logprob of ``tokens[i]`` at position i, with the ``top`` likeliest there: only
    those travel back, never a vocabulary."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
    if top < 1:
        return [TokenLogprobs(token=token, logprob=value) for token, value in zip(tokens, chosen, strict=True)]
    best = logprobs[: len(tokens)].topk(top, dim=-1)
    return [TokenLogprobs(token=token, logprob=value, top=list(zip(ids, values, strict=True)))
            for token, value, ids, values
            in zip(tokens, chosen, best.indices.tolist(), best.values.tolist(), strict=True)]  # fmt: skip


def position_generator(params: SamplingParams, position: int, stream: int = TARGET_STREAM) -> torch.Generator:
    """A CPU generator for one position: a seeded request draws the same tokens when replayed or retried."""
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed((params.seed * 1_000_003 + position * 2 + stream) % (2**63))
    return generator


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a 1-d distribution (need not be normalised)."""
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def shared_length(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    for index in range(n):
        if a[index] != b[index]:
            return index
    return n
