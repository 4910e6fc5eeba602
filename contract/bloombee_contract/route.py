"""A gateway's route: the plan whose stages it sends generations through.

The operator (a ConfigMap mounted into the gateway's pod) or ``bloombee up`` (a file beside its
logs) writes it; the gateway reads it at start and again whenever its text changes. A new plan's
stages therefore start beside the running ones and the gateway moves over once they answer,
without a restart: its address and the generations in flight survive a plan switch.

    {"plan": "3f2a9c0d1e", "stages": [["https://s0:8000"], ["https://s1a:8000", "https://s1b:8000"]],
     "microBatch": 4, "relayHops": [false], "maxSequences": 16}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bloombee_contract.launch import FlagValueError, parse_stage_urls, show_stage_urls

ROUTE_FILE = "route.json"  # its name in the gateway's route directory (the ConfigMap's key)
MAX_ROUTE_BYTES = 1 << 20
MAX_PLAN_CHARS = 64


class RouteError(ValueError):
    """A route that cannot be followed; the message says what and where."""


@dataclass(frozen=True)
class Route:
    plan: str  # the plan's hash ("" for a gateway started by hand: its steps name no plan)
    stages: tuple[tuple[str, ...], ...]  # base URLs in layer order; a span's replicas together
    micro_batch: int = 1  # rows per step (the plan's)
    relay_hops: tuple[bool, ...] = ()  # per hop between stages: the gateway forwards it (empty: none)
    max_sequences: int | None = None  # generations at once (the plan's admitted sequences; None: no cap)

    def __post_init__(self) -> None:
        if len(self.plan) > MAX_PLAN_CHARS or (self.plan and not self.plan.replace("-", "").isalnum()):
            raise RouteError(f"plan {self.plan[:80]!r}: at most {MAX_PLAN_CHARS} letters, digits or dashes")
        if not self.stages or any(not replicas for replicas in self.stages):
            raise RouteError("stages: every stage needs at least one URL")
        if self.micro_batch < 1:
            raise RouteError(f"microBatch {self.micro_batch}: must be at least 1")
        if self.relay_hops and len(self.relay_hops) != len(self.stages) - 1:
            raise RouteError(f"relayHops: {len(self.relay_hops)} flags for {len(self.stages) - 1} hops")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise RouteError(f"maxSequences {self.max_sequences}: must be at least 1")

    @property
    def urls(self) -> list[str]:
        """Every stage replica's URL, in layer order."""
        return [url for replicas in self.stages for url in replicas]

    def dumps(self) -> str:
        body = {"plan": self.plan, "stages": [list(replicas) for replicas in self.stages],
                "microBatch": self.micro_batch, "relayHops": list(self.relay_hops),
                "maxSequences": self.max_sequences}  # fmt: skip
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def loads(cls, text: str, where: str = "route") -> Route:
        """A route from its JSON text; RouteError names ``where`` and the field otherwise."""
        if len(text) > MAX_ROUTE_BYTES:
            raise RouteError(f"{where}: {len(text)} bytes, more than a route's {MAX_ROUTE_BYTES}")
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise RouteError(f"{where}: not JSON ({error})") from None
        if not isinstance(body, dict):
            raise RouteError(f"{where}: a JSON object is expected")
        unknown = sorted(set(body) - {"plan", "stages", "microBatch", "relayHops", "maxSequences"})
        if unknown:
            raise RouteError(f"{where}: unknown fields {unknown}")
        try:
            stages = body.get("stages")
            if not isinstance(stages, list) or not all(isinstance(s, list) for s in stages):
                raise RouteError("stages: a list of lists of URLs is expected")
            hops = body.get("relayHops") or []
            if not isinstance(hops, list) or not all(isinstance(hop, bool) for hop in hops):
                raise RouteError("relayHops: a list of booleans is expected")
            plan, micro_batch, most = body.get("plan", ""), body.get("microBatch", 1), body.get("maxSequences")
            if not isinstance(plan, str):
                raise RouteError("plan: a string is expected")
            if not isinstance(micro_batch, int) or (most is not None and not isinstance(most, int)):
                raise RouteError("microBatch and maxSequences: integers are expected")
            urls = parse_stage_urls(show_stage_urls(stages)) if stages else ()
            return cls(plan=plan, stages=urls, micro_batch=micro_batch, relay_hops=tuple(hops), max_sequences=most)
        except (RouteError, FlagValueError, TypeError) as error:
            raise RouteError(f"{where}: {error}") from None

    @classmethod
    def read(cls, path: str | Path) -> Route:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise RouteError(f"route file {path}: {error.strerror or error}") from None
        return cls.loads(text, f"route file {path}")

    def write(self, path: str | Path) -> None:
        """Replace the file at ``path`` in one step (a reader sees the old route or the new, never half)."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(self.dumps())
        partial.replace(path)
