"""Choosing next tokens from logits: greedy, or temperature + top-p with a reproducible seed."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field


class SamplingParams(BaseModel):
    """How the last stage picks a token; temperature 0 means greedy."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def pick_tokens(logits: torch.Tensor, params: SamplingParams, position: int) -> torch.Tensor:
    """logits [batch, k, vocab] -> token ids [batch, k].

    A sampled token depends only on (seed, position, logits), so a replayed or retried step
    draws the same token.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed((params.seed * 1_000_003 + position) % (2**63))
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    picked = torch.multinomial(flat, 1, generator=generator)
    return picked.reshape(probs.shape[:-1]).to(logits.device)
