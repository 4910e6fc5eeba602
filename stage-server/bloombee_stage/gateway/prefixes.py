"""Prompt prefixes already in the stages' KV caches, so a new generation need not compute them again.

A finished generation's session is kept (parked on its stages, see sessions.py) together with
the tokens its caches hold. A new generation whose prompt starts with enough of those tokens
opens its session as a fork of that one: each stage copies the shared positions instead of
computing them, and only the rest of the prompt crosses the pipeline. That is the system prompt
of every chat, and the whole history of a conversation's next turn: over a WAN pipeline the
prefill of those is most of the time to the first token.

Only sessions on the generation's own path qualify (the copy is local to each stage). The
index keeps the ``capacity`` most recently used sessions; the ones it lets go are returned so
the caller closes them on the stages. Sessions idle longer than ``max_idle_s`` (set below the stages' idle time-out,
which closes parked sessions too) are not offered. Stages may also drop parked sessions under
memory pressure: a fork of one fails with ``fork_source_gone`` and the generation computes its
prompt after all. No I/O here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from bloombee_stage.gateway.routing import Path
from bloombee_stage.model.sampling import shared_length

MIN_SHARED = 16  # fewer shared positions are not worth a fork (the copy and its failure modes)


@dataclass
class Held:
    session: str
    path: Path
    tokens: tuple[int, ...]  # the positions the session's caches hold
    draft: object | None = field(default=None, compare=False)  # the draft head's state (HeadState) at the end
    used: float = field(default=0.0, compare=False)  # when it was last held or forked from (the index's clock)


class PrefixIndex:
    def __init__(self, capacity: int, min_shared: int = MIN_SHARED, max_idle_s: float = float("inf"),
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if capacity < 0:
            raise ValueError(f"prefix cache capacity must be at least 0, got {capacity}")
        self.capacity = capacity
        self.min_shared = min_shared
        self.max_idle_s = max_idle_s
        self.clock = clock
        self._held: OrderedDict[str, Held] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._held)

    def find(self, prompt: list[int], path: Path) -> tuple[str, int] | None:
        """(session, positions to copy) of the held session sharing the longest prefix, if long enough.

        At least the prompt's last position is left to compute: its logits give the first token.
        """
        now = self.clock()
        for stale in [h.session for h in self._held.values() if now - h.used > self.max_idle_s]:
            del self._held[stale]  # the stages have closed it by now
        best: tuple[int, str] | None = None
        for held in self._held.values():
            if held.path == path:
                shared = min(shared_length(held.tokens, prompt), len(prompt) - 1)
                if shared >= self.min_shared and (best is None or shared > best[0]):
                    best = (shared, held.session)
        if best is None:
            return None
        self._held.move_to_end(best[1])
        self._held[best[1]].used = now
        return best[1], best[0]

    def hold(self, held: Held) -> list[Held]:
        """Keep ``held``; returns the sessions let go to stay within capacity (to close on the stages)."""
        if self.capacity == 0 or len(held.tokens) < self.min_shared:
            return [held]
        held.used = self.clock()
        self._held[held.session] = held
        self._held.move_to_end(held.session)
        released = []
        while len(self._held) > self.capacity:
            released.append(self._held.popitem(last=False)[1])
        return released

    def draft_state(self, session: str) -> object | None:
        """The held session's draft head state, if it is held and kept one."""
        held = self._held.get(session)
        return held.draft if held is not None else None

    def clear(self) -> list[Held]:
        """Let every held session go (its plan's stages are retired); returns them, to close on the stages."""
        held, self._held = list(self._held.values()), OrderedDict()
        return held

    def drop(self, session: str) -> None:
        """Forget a session the stages no longer hold."""
        self._held.pop(session, None)
