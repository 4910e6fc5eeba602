"""Per-session KV caches with an idle time-out and a memory budget shared by all sessions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


class SessionError(Exception):
    """A session request that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Session:
    id: str
    cache: Any  # transformers DynamicCache
    length: int = 0
    reserved: int = 0  # tokens counted against the budget
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionStore:
    """Holds sessions; admits a step only if every session's reserved tokens fit the KV budget."""

    def __init__(
        self, new_cache: Any, kv_bytes_per_token: int, kv_budget_bytes: int, timeout_s: float, max_length: int
    ) -> None:
        self._new_cache = new_cache
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_budget_bytes = kv_budget_bytes
        self.timeout_s = timeout_s
        self.max_length = max_length
        self.sessions: dict[str, Session] = {}

    def reserved_tokens(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    def reserved_bytes(self) -> int:
        return self.reserved_tokens() * self.kv_bytes_per_token

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(
                f"unknown session {session_id!r} (never opened, closed, or timed out)", 404, "unknown_session"
            )
        session.last_used = time.monotonic()
        return session

    def admit(self, session_id: str, start: int, new_tokens: int, max_length: int | None) -> Session:
        """Find or open the session for a step starting at ``start`` and reserve room for it."""
        if start == 0:
            session = self.sessions.get(session_id)
            if session is None:
                session = self.sessions[session_id] = Session(session_id, self._new_cache())
        else:
            session = self.get(session_id)
            if start > session.length:
                raise SessionError(
                    f"session {session_id!r} holds {session.length} tokens; a step cannot start at {start}",
                    409,
                    "position_gap",
                )
        end = start + new_tokens
        limit = min(self.max_length, max_length or self.max_length)
        if end > limit:
            raise SessionError(
                f"session {session_id!r} would reach {end} tokens, the limit is {limit}", 400, "context_length_exceeded"
            )
        wanted = max(session.reserved, max_length or end, end)
        extra = (wanted - session.reserved) * self.kv_bytes_per_token
        if self.reserved_bytes() + extra > self.kv_budget_bytes:
            if start == 0 and session.length == 0:
                del self.sessions[session_id]
            raise SessionError(
                f"KV budget exceeded: session {session_id!r} needs {extra} more bytes, "
                f"{self.reserved_bytes()} of {self.kv_budget_bytes} are reserved",
                507,
                "kv_budget_exceeded",
            )
        session.reserved = wanted
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self.sessions.items() if now - s.last_used > self.timeout_s and not s.lock.locked()]
        for sid in stale:
            del self.sessions[sid]
        return stale
