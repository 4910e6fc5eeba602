"""Each server's Prometheus metrics, on ``prometheus_client`` (one registry per server).

A small facade keeps call sites short: ``inc`` (a counter; its name ends in ``_total``),
``observe`` (a histogram; values in seconds unless its buckets say otherwise), ``gauge`` (read
when scraped) and ``family`` (a labelled gauge read when scraped). A metric's label names are
those of its first use. Everything is in base units: seconds and bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no `_created` series beside every counter: nothing here reads them

# Latency buckets, seconds: from a token on one machine to a long generation over a WAN.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows per step, tokens per round


class _ReadWhenScraped(Collector):
    """A gauge with labels, or a counter kept elsewhere, whose samples are read when scraped."""

    def __init__(self, kind: type, name: str, text: str,
                 read: Callable[[], dict[tuple[tuple[str, str], ...], float]]) -> None:  # fmt: skip
        self.kind, self.name, self.text, self.read = kind, name, text, read

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        samples = self.read()
        labels = [label for label, _ in next(iter(samples), ())]  # in the order the samples give them
        family = self.kind(self.name, self.text, labels=labels)
        for key, value in samples.items():
            family.add_metric([dict(key).get(label, "") for label in labels], value)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # described when collected: the label names come with the samples


class Metrics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Counter | Histogram | Gauge] = {}

    def _get(self, kind: type, name: str, text: str, labels: Sequence[str], **options: object) -> Any:
        full = f"{self.prefix}_{name}"
        metric = self._metrics.get(full)
        if metric is None:
            metric = kind(full, text, labelnames=tuple(labels), registry=self.registry, **options)
            self._metrics[full] = metric
        return metric

    def inc(self, name: str, text: str, amount: float = 1.0, **labels: str) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: a counter's name ends in _total")
        counter = self._get(Counter, name.removesuffix("_total"), text, sorted(labels))
        (counter.labels(**labels) if labels else counter).inc(amount)

    def observe(self, name: str, text: str, value: float, buckets: Sequence[float] = SECONDS_BUCKETS,
                **labels: str) -> None:  # fmt: skip
        histogram = self._get(Histogram, name, text, sorted(labels), buckets=tuple(buckets))
        (histogram.labels(**labels) if labels else histogram).observe(value)

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        self._get(Gauge, name, text, ()).set_function(read)

    def family(self, name: str, text: str, read: Callable[[], dict[tuple[tuple[str, str], ...], float]]) -> None:
        """A gauge with labels, read when scraped: ``read`` returns {((label, value), ...): sample}."""
        self.registry.register(_ReadWhenScraped(GaugeMetricFamily, f"{self.prefix}_{name}", text, read))

    def counted(self, name: str, text: str, read: Callable[[], float]) -> None:
        """A counter that something else keeps (a total it only ever adds to), read when scraped."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: a counter's name ends in _total")
        self.registry.register(_ReadWhenScraped(CounterMetricFamily, f"{self.prefix}_{name.removesuffix('_total')}",
                                                text, lambda: {(): float(read())}))  # fmt: skip

    def render(self) -> str:
        return generate_latest(self.registry).decode()
