"""Choosing next tokens from logits: greedy, or temperature + top-p with a reproducible seed."""

from __future__ import annotations

import torch

from bloombee_stage.wire.messages import SamplingParams

# Independent random streams per position: the target's draws, and the draft's (speculative.py).
TARGET_STREAM, DRAFT_STREAM = 0, 1


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(logits / T), cut to the top-p nucleus."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


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
