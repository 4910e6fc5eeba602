"""Choosing a path through stage replicas: the least predicted time, queueing included.

When a span is served by several replicas, each new generation is pinned to one path (one
replica per stage; its KV cache lives there) chosen as in Sun et al.'s waiting-aware routing:
the predicted time of a step on a path is, per replica, the steps already waiting there plus
its own, times the replica's measured forward time per step, plus the path's measured link
time (round trip minus compute). A replica not yet measured counts at half its stage's mean
(zero before any is measured), so it gets tried; fewest pinned generations breaks ties. A
replica that could not be reached is left out of new paths for a while. No I/O here: the
gateway feeds measurements in and asks for choices.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Path = tuple[int, ...]  # a replica index per stage
MAX_PATHS = 4096  # beyond this, each stage's replica is chosen on its own (links then count equal)
SMOOTHING = 0.3
DOWN_S = 30.0  # a replica that could not be reached is left out of new paths this long


@dataclass
class Replica:
    url: str
    load: int = 0  # generations pinned to it now
    service_ms: float | None = None  # forward ms per step, running mean
    down_until: float = 0.0  # monotonic time until which it is left out (unreachable)

    def up(self, now: float) -> bool:
        return now >= self.down_until


class Router:
    def __init__(self, stages: Sequence[Sequence[str]], micro_batch: int = 1) -> None:
        self.replicas = [[Replica(url) for url in urls] for urls in stages]
        self.micro_batch = max(1, micro_batch)
        self.link_ms: dict[Path, float] = {}
        self.chosen: Counter[Path] = Counter()
        self.last_prediction_ms: dict[Path, float] = {}

    @property
    def replicated(self) -> bool:
        return any(len(replicas) > 1 for replicas in self.replicas)

    def urls(self, path: Path) -> list[str]:
        return [self.replicas[stage][index].url for stage, index in enumerate(path)]

    def _service_ms(self, stage: int, replica: Replica) -> float:
        if replica.service_ms is not None:
            return replica.service_ms
        measured = [r.service_ms for r in self.replicas[stage] if r.service_ms is not None]
        return 0.5 * sum(measured) / len(measured) if measured else 0.0  # optimistic: worth a try

    def replica_ms(self, stage: int, replica: Replica) -> float:
        """A new row's time at a replica: the steps queued ahead of it and its own."""
        ahead = math.ceil(replica.load / self.micro_batch)
        return (ahead + 1) * self._service_ms(stage, replica)

    def predict_ms(self, path: Path) -> float:
        link = self.link_ms.get(path, min(self.link_ms.values(), default=0.0))
        return link + sum(self.replica_ms(stage, self.replicas[stage][index]) for stage, index in enumerate(path))

    def choose(self) -> Path:
        """The path of least predicted time (fewest pinned generations breaks ties); pins nothing."""
        now = time.monotonic()
        # Replicas that are up, per stage (all of them where none is: better a clear failure than none).
        usable = [[i for i, r in enumerate(replicas) if r.up(now)] or list(range(len(replicas)))
                  for replicas in self.replicas]  # fmt: skip
        if math.prod(len(indexes) for indexes in usable) > MAX_PATHS:
            return tuple(min(indexes, key=lambda i, s=stage: (self.replica_ms(s, self.replicas[s][i]),
                                                             self.replicas[s][i].load))
                         for stage, indexes in enumerate(usable))  # fmt: skip
        paths = self.paths(usable)
        scored = [(self.predict_ms(path), self._load(path), path) for path in paths]
        best = min(scored)
        self.last_prediction_ms[best[2]] = best[0]
        return best[2]

    def paths(self, usable: list[list[int]] | None = None) -> Iterator[Path]:
        """Every path through the replicas (or through the ``usable`` replica indexes per stage)."""
        return itertools.product(*(usable or [range(len(replicas)) for replicas in self.replicas]))

    def _load(self, path: Path) -> int:
        return sum(self.replicas[stage][index].load for stage, index in enumerate(path))

    def steps_to_fill(self, path: Path) -> int | None:
        """Steps in flight that keep the path's slowest stage busy: a round trip over its step time.

        Over a WAN the round trip is mostly link latency, so a stage would idle between the
        steps of only one micro-batch per stage. None until the path is measured.
        """
        services = [self.replicas[stage][index].service_ms for stage, index in enumerate(path)]
        if path not in self.link_ms or any(service is None for service in services):
            return None
        slowest = max(services)  # type: ignore[type-var]
        return math.ceil((self.link_ms[path] + sum(services)) / slowest) if slowest else None  # type: ignore[arg-type]

    def fail(self, url: str) -> bool:
        """Leave a replica that could not be reached out of new paths for a while; whether ``url`` was one."""
        for replicas in self.replicas:
            for replica in replicas:
                if replica.url == url.rstrip("/"):
                    replica.down_until = time.monotonic() + DOWN_S
                    return True
        return False

    def acquire(self, path: Path) -> None:
        self.chosen[path] += 1
        for stage, index in enumerate(path):
            self.replicas[stage][index].load += 1

    def release(self, path: Path) -> None:
        for stage, index in enumerate(path):
            replica = self.replicas[stage][index]
            replica.load = max(0, replica.load - 1)

    def observe(self, path: Path, round_trip_ms: float, compute_ms: list[float]) -> None:
        """A step on ``path`` took ``round_trip_ms``; ``compute_ms`` is each stage's forward time, in order."""
        spent = 0.0
        for stage, (index, measured) in enumerate(zip(path, compute_ms, strict=False)):
            replica = self.replicas[stage][index]
            spent += measured
            previous = replica.service_ms
            replica.service_ms = measured if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * measured
        link = max(0.0, round_trip_ms - spent)
        previous_link = self.link_ms.get(path)
        self.link_ms[path] = link if previous_link is None else (1 - SMOOTHING) * previous_link + SMOOTHING * link
