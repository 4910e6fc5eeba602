"""What steps cost here, measured on real traffic and fitted to the planner's terms (pure).

The planner costs a stage serving l layers at ``l * (a + b * m)`` seconds for a micro-batch of m
tokens, plus what a step costs outside its layers (decoding the frame, the LM head and the
token choice on the last stage). A server records every step it runs (``record``) and
``fit`` gives those terms by least squares over the median cost of each step size among the
most recent ``window`` steps, both as wall
time (what the pipeline waits for) and as CPU time of the thread that ran it (what the step
costs with nothing else competing for the cores; wall above CPU means the cores were shared).

With only one size of step seen (a pipeline that has served one request at a time) the
per-token term cannot be told apart from the fixed one: ``fit`` then reports the whole cost as
fixed and says so with ``spread == 0``, and whoever plans keeps its own per-token estimate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    tokens: int  # positions computed in the step, over all its rows
    rows: int
    layers_wall_s: float  # the decoder layers, all of them
    layers_cpu_s: float
    other_wall_s: float  # the rest of the step on the compute thread (head, token choice)
    other_cpu_s: float
    started: float = 0.0  # time.monotonic() as it began: one clock for every process of a machine
    context: float = 0.0  # positions each row's cache held after it, on average (what attention read)


@dataclass(frozen=True)
class Line:
    """y = fixed + per_token * tokens, fitted; ``spread`` is the standard deviation of the tokens seen."""

    fixed: float
    per_token: float
    samples: int
    spread: float

    def at(self, tokens: float) -> float:
        return self.fixed + self.per_token * tokens


def fit_line(points: list[tuple[float, float]]) -> Line:
    """Least squares over (tokens, seconds); a negative slope or intercept is clipped to 0, since
    neither a step's fixed cost nor its cost per token can be negative."""
    count = len(points)
    if count == 0:
        return Line(0.0, 0.0, 0, 0.0)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    var_x = sum((x - mean_x) ** 2 for x, _ in points) / count
    if var_x == 0:
        return Line(mean_y, 0.0, count, 0.0)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / count / var_x
    slope = max(0.0, slope)
    fixed = mean_y - slope * mean_x
    if fixed < 0:  # all of it per token: the line through the origin
        slope, fixed = sum(x * y for x, y in points) / sum(x * x for x, _ in points), 0.0
    return Line(fixed, slope, count, math.sqrt(var_x))


class CostRecorder:
    """The last ``window`` steps' costs of one server, and when they were measured."""

    def __init__(self, layers: int, window: int = 512) -> None:
        self.layers = max(1, layers)
        self.steps: deque[StepCost] = deque(maxlen=window)
        self.measured_at: float | None = None
        self.recorded = 0
        self.fitted: tuple[int, dict[str, object]] = (0, {})  # every metrics scrape reads it, per term

    def record(self, cost: StepCost) -> None:
        self.steps.append(cost)
        self.measured_at = time.time()
        self.recorded += 1

    def fit(self) -> dict[str, object]:
        """The planner's terms in milliseconds (the ``profile`` of ``/info``); empty before any step."""
        if self.fitted[0] != self.recorded:
            self.fitted = (self.recorded, self.fit_now())
        return dict(self.fitted[1])

    def fit_now(self) -> dict[str, object]:
        if not self.steps:
            return {}
        steps = list(self.steps)
        by_tokens: dict[int, list[StepCost]] = {}
        for step in steps:
            by_tokens.setdefault(step.tokens, []).append(step)

        def line(value) -> Line:
            # through the median of each step size: a pause of the process (a collection, another
            # process on the core) moves one step's time, not the fitted cost
            return fit_line([(tokens, statistics.median(value(s) for s in group))
                             for tokens, group in by_tokens.items()])  # fmt: skip

        def points(value) -> list[list[float]]:
            return [[tokens, round(statistics.median(value(s) for s in group) * 1000, 4)]
                    for tokens, group in sorted(by_tokens.items())]  # fmt: skip

        layer_wall = line(lambda s: s.layers_wall_s / self.layers)
        layer_cpu = line(lambda s: s.layers_cpu_s / self.layers)
        other_wall = line(lambda s: s.other_wall_s)
        wall = sum(s.layers_wall_s + s.other_wall_s for s in steps)
        cpu = sum(s.layers_cpu_s + s.other_cpu_s for s in steps)
        return {
            "msPerLayer": round(layer_wall.fixed * 1000, 4),
            "msPerLayerToken": round(layer_wall.per_token * 1000, 5),
            "cpuMsPerLayer": round(layer_cpu.fixed * 1000, 4),
            "cpuMsPerLayerToken": round(layer_cpu.per_token * 1000, 5),
            "layerMsAt": points(lambda s: s.layers_wall_s / self.layers),  # [tokens, median ms per layer]
            "stepMsAt": points(lambda s: s.other_wall_s),
            "stepsAt": [[tokens, len(group)] for tokens, group in sorted(by_tokens.items())],  # how many of each
            "stepMs": round(other_wall.fixed * 1000, 4),
            "stepMsPerToken": round(other_wall.per_token * 1000, 5),
            "wallPerCpu": round(wall / cpu, 3) if cpu > 0 else None,
            "samples": len(steps),
            "tokensSpread": round(layer_wall.spread, 3),
            "meanTokens": round(sum(s.tokens for s in steps) / len(steps), 3),
            "meanContext": round(self.mean_context(), 1),
            "measuredAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_at or time.time())),
        }

    def mean_context(self) -> float:
        """Positions a row's cache held in the recent steps, on average (0 before any step)."""
        return sum(s.context for s in self.steps) / len(self.steps) if self.steps else 0.0

    def busy(self) -> list[list[float]]:
        """When each recent step ran and what it cost, ``[started, seconds, seconds per layer, seconds
        outside the layers, tokens]``: with every stage of a machine answering, whoever plans can
        tell the steps that ran beside another stage's from those that ran alone."""
        return [[round(s.started, 6), round(s.layers_wall_s + s.other_wall_s, 6),
                 round(s.layers_wall_s / self.layers, 7), round(s.other_wall_s, 6), s.tokens]
                for s in self.steps]  # fmt: skip


class LinkRecorder:
    """What sending a frame onward took (POST until the next part acknowledged it), fitted as
    seconds = round trip + bytes / bandwidth: the onward link as the traffic finds it, with the
    HTTP, TLS and frame decoding at both ends included in the round trip."""

    def __init__(self, window: int = 512) -> None:
        self.sends: deque[tuple[int, float]] = deque(maxlen=window)

    def record(self, frame_bytes: int, seconds: float) -> None:
        self.sends.append((frame_bytes, seconds))

    def fit(self) -> dict[str, object]:
        if not self.sends:
            return {}
        by_size: dict[int, list[float]] = {}
        for size, seconds in self.sends:
            by_size.setdefault(size, []).append(seconds)
        line = fit_line([(size, statistics.median(times)) for size, times in by_size.items()])
        mbps = 8 / line.per_token / 1e6 if line.per_token > 0 else None  # per byte here: bytes/s -> Mbit/s
        return {"rttMs": round(line.fixed * 1000, 4), "mbps": round(mbps, 1) if mbps else None,
                "samples": len(self.sends), "meanBytes": round(sum(s for s, _ in self.sends) / len(self.sends))}


class Stopwatch:
    """Wall and thread-CPU seconds since the last ``lap`` (or since it was made, at ``started``)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        elapsed = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return elapsed
