"""Equal split: the layer placement Petals-style systems start from, and our baseline."""

from __future__ import annotations


def equal_split(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous spans [start, end) covering ``num_layers``; sizes differ by at most one, larger first.

    >>> equal_split(30, 4)
    [(0, 8), (8, 16), (16, 23), (23, 30)]
    """
    if num_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {num_layers}")
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages (need 1..{num_layers})")
    base, extra = divmod(num_layers, num_stages)
    spans, start = [], 0
    for index in range(num_stages):
        end = start + base + (1 if index < extra else 0)
        spans.append((start, end))
        start = end
    return spans
