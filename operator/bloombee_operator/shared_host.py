"""What sharing a machine costs its stages, read from the steps they served (pure).

Stages that run on one machine (``bloombee up``, or pods scheduled onto one node) share its cores,
its caches and its memory bandwidth. A profiling run of all of them at once says how much work
they do together with nothing else running, but traffic is not a profiling run: the gateway, the
links' ends and each stage's event loop run beside the compute, and steps of unlike sizes meet.
Each stage therefore reports when its recent steps ran (``/profile``'s ``served.busy``, on the
machine's monotonic clock) and this module splits them into steps that ran alone and steps that
ran while another stage of the machine computed, and compares like with like (steps of one size):

- the steps that ran alone give the stage's level under traffic (its ``traffic_scale``), so a
  pipeline that rarely overlaps is not costed as if it always did;
- the ratio of a size's overlapped steps to its lone ones is the slowdown of sharing, from which
  the machine's parallelism follows (how many stages' worth of work it does at once).
"""

from __future__ import annotations

import bisect
import statistics
from typing import Any

ALONE_BELOW = 0.1  # a step that overlapped others for less than this share of it ran alone
BESIDE_ABOVE = 0.9  # and one that overlapped them for more than this ran beside them
MIN_STEPS = 8  # steps of one size, alone and beside, before their medians are compared


def overlap_counts(busy: list[list[list[float]]]) -> list[list[float]]:
    """For each stage's steps (``[started, seconds, ...]``), how many other stages of the machine
    were computing during it on average (the summed overlap over the step's length)."""
    spans = [sorted((step[0], step[0] + step[1]) for step in steps) for steps in busy]
    starts = [[start for start, _ in ordered] for ordered in spans]
    counts = []
    for index, steps in enumerate(busy):
        mine = []
        for step in steps:
            begin, length = step[0], step[1]
            end, covered = begin + length, 0.0
            for other, (ordered, opened) in enumerate(zip(spans, starts, strict=True)):
                if other == index:
                    continue
                # a stage runs one step at a time: only steps that start before this one ends, back
                # to the first that ended after it began, can overlap it
                last = bisect.bisect_left(opened, end)
                for other_begin, other_end in reversed(ordered[:last]):
                    if other_end <= begin:
                        break
                    covered += min(end, other_end) - max(begin, other_begin)
            mine.append(covered / length if length > 0 else 0.0)
        counts.append(mine)
    return counts


Sizes = dict[float, tuple[float, int]]  # step size (tokens) -> (median ms, steps)


def _medians(steps: list[list[float]], keep: list[bool], column: int) -> Sizes:
    """(median of ``column`` in ms, count) per step size (tokens, the last column) among the kept steps."""
    by_size: dict[float, list[float]] = {}
    for step, kept in zip(steps, keep, strict=True):
        if kept:
            by_size.setdefault(float(step[-1]), []).append(step[column] * 1000)
    return {size: (statistics.median(values), len(values)) for size, values in by_size.items()}


def split_served(run: dict[str, Any], overlaps: list[float]) -> tuple[dict[str, Any], Sizes, Sizes]:
    """A stage's ``/profile`` answer with its served steps cut down to those that ran alone (what
    ``NodeProfile.from_run`` scales its profiling run by; unchanged where the stage did not say
    when its steps ran), and per size the per-layer ms of its steps alone and beside others."""
    served = run.get("served") or {}
    busy = served.get("busy") or []
    if not busy:
        return run, {}, {}
    alone = [x < ALONE_BELOW for x in overlaps]
    layers, other = _medians(busy, alone, 2), _medians(busy, alone, 3)
    alone_served = {**served, "layerMsAt": [[size, ms] for size, (ms, _) in sorted(layers.items())],
                    "stepMsAt": [[size, ms] for size, (ms, _) in sorted(other.items())],
                    "stepsAt": [[size, count] for size, (_, count) in sorted(layers.items())]}  # fmt: skip
    return {**run, "served": alone_served}, layers, _medians(busy, [x > BESIDE_ABOVE for x in overlaps], 2)


def traffic_parallelism(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float | None, int]:
    """The stages' runs with their served steps cut to those that ran alone, the parallelism of
    their machine as traffic found it (None when traffic never ran a size both alone and beside
    another stage often enough to compare), and the number of overlapped steps compared.

    Sharing slows a step by ``1 + beta * x`` with ``x`` other stages computing during it; ``beta``
    comes from the overlapped steps (median over each size, against the same size alone, weighted
    by counts). With all ``k`` stages computing the machine does ``k / (1 + beta * (k - 1))`` stages'
    worth of work at once, the figure the planner's host bound and the simulator take."""
    counts = overlap_counts([(run.get("served") or {}).get("busy") or [] for run in runs])
    alone_runs, weighted, total = [], 0.0, 0
    for run, overlaps in zip(runs, counts, strict=True):
        alone_run, alone, beside = split_served(run, overlaps)
        alone_runs.append(alone_run)
        busy = (run.get("served") or {}).get("busy") or []
        for size, (ms, count) in beside.items():
            lone_ms, lone_count = alone.get(size, (0.0, 0))
            if count < MIN_STEPS or lone_count < MIN_STEPS or lone_ms <= 0:
                continue
            others = statistics.mean(x for x, step in zip(overlaps, busy, strict=True)
                                     if x > BESIDE_ABOVE and float(step[-1]) == size)  # fmt: skip
            weighted += count * (ms / lone_ms - 1) / others
            total += count
    if not total:
        return alone_runs, None, 0
    beta = max(0.0, weighted / total)
    stages = len(runs)
    return alone_runs, stages / (1 + beta * (stages - 1)), total
