"""A small Prometheus text-format registry (counters, gauges, summaries' sum/count), no dependency."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class Metrics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}
        self._families: dict[str, Callable[[], dict[tuple[tuple[str, str], ...], float]]] = {}

    def _declare(self, name: str, kind: str, text: str) -> str:
        full = f"{self.prefix}_{name}"
        self._help.setdefault(full, (kind, text))
        return full

    def inc(self, name: str, text: str, amount: float = 1.0, **labels: str) -> None:
        full = self._declare(name, "counter", text)
        key = tuple(sorted(labels.items()))
        self._values[full][key] = self._values[full].get(key, 0.0) + amount

    def observe(self, name: str, text: str, seconds: float) -> None:
        """Record a duration as a summary (sum and count)."""
        full = self._declare(name, "summary", text)
        series = self._values[full]
        series[(("__suffix", "_sum"),)] = series.get((("__suffix", "_sum"),), 0.0) + seconds
        series[(("__suffix", "_count"),)] = series.get((("__suffix", "_count"),), 0.0) + 1

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        full = self._declare(name, "gauge", text)
        self._gauges[full] = read

    def family(self, name: str, text: str, read: Callable[[], dict[tuple[tuple[str, str], ...], float]]) -> None:
        """A gauge with labels, read when scraped: ``read`` returns {((label, value), ...): sample}."""
        full = self._declare(name, "gauge", text)
        self._families[full] = read

    def render(self) -> str:
        lines: list[str] = []
        for full, (kind, text) in self._help.items():
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            if full in self._gauges:
                lines.append(f"{full} {float(self._gauges[full]())}")
                continue
            samples = self._families[full]() if full in self._families else self._values[full]
            for key, value in samples.items():
                labels = dict(key)
                suffix = labels.pop("__suffix", "")
                label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{full}{suffix}{{{label_text}}} {value}" if label_text else f"{full}{suffix} {value}")
        return "\n".join(lines) + "\n"
