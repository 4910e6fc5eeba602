"""Speculative decoding over the pipeline: drafts, greedy verification, and an adaptive draft length.

One pipeline round trip costs tens of milliseconds over a WAN, so the gateway drafts k cheap
tokens, sends them through the pipeline in one step with the last accepted token in front, and
the last stage returns the model's own next token at each of the k + 1 positions (StepMeta.keep).
Greedy verification keeps the draft's longest prefix the model agrees with, plus the model's
token right after it, so every round yields at least one token and the output is the model's
greedy output. Rejected positions are rolled back for free: the next step's ``start`` cuts every
stage's KV cache back to the accepted length.

Drafts here: prompt lookup (the continuation of the latest earlier match of the context's last
n-gram, as in vLLM's n-gram proposer). Early-exit and small-model drafts, and rejection sampling
for temperature > 0, are still to come; sampled requests run without a draft meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def accept_greedy(draft: list[int], predicted: list[int]) -> list[int]:
    """The tokens a greedy verification keeps: ``predicted[i]`` is the model's token after draft[:i]."""
    if len(predicted) != len(draft) + 1:
        raise ValueError(f"{len(predicted)} predictions for a draft of {len(draft)}; expected one more")
    agreed = 0
    while agreed < len(draft) and draft[agreed] == predicted[agreed]:
        agreed += 1
    return predicted[: agreed + 1]


@dataclass
class DraftLength:
    """How many tokens to draft: grows while drafts are accepted in full, shrinks when they are not.

    A round trip costs about the same for 1 or 8 extra positions on a WAN, so a longer draft is
    cheap while it keeps being accepted; a rejected tail costs only compute.
    """

    current: int = 4
    maximum: int = 8
    minimum: int = 1
    proposed: int = 0
    accepted: int = 0

    def update(self, drafted: int, accepted: int) -> None:
        self.proposed += drafted
        self.accepted += accepted
        if drafted and accepted == drafted:
            self.current = min(self.maximum, self.current + 1)
        elif drafted and accepted < drafted // 2:
            self.current = max(self.minimum, self.current // 2)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0
