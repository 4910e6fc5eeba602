"""Per-session KV caches with an idle time-out and a memory budget shared by all sessions.

A session may start as a fork: a copy of the first positions of another session's cache (a
prompt prefix the gateway saw computed before), so a shared prefix is computed once. Sessions
the gateway keeps only as fork sources are parked: they reserve no more than they hold, and
they are the first to go (least recently used first) when a new step would exceed the budget.
A session opened by a gateway carries that gateway process's lease: once the gateway has not been
heard of (a step or a heartbeat) for ``LEASE_TIMEOUT_S`` its sessions close, so a gateway that
died or restarted does not leave KV held by sessions nobody will continue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from bloombee_contract.errors import ErrorCode
from bloombee_contract.paths import LEASE_TIMEOUT_S

MAX_LEASES = 256  # gateway processes remembered; a deployment has a handful


class SessionError(Exception):
    """A session request that cannot be served; its code knows the HTTP status to answer with."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> int:
        return self.code.status


@dataclass
class Session:
    id: str
    cache: Any  # transformers DynamicCache
    length: int = 0
    reserved: int = 0  # tokens counted against the budget
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    parked: bool = False  # kept only as a fork source: evicted first under budget pressure
    fork_source: Session | None = None  # copy the first ``fork_length`` positions of this one before computing
    fork_length: int = 0
    owner: str | None = None  # the gateway whose session it is (from its certificate); None without TLS
    lease: str | None = None  # the gateway process that opened it; None: only the idle time-out closes it


class SessionStore:
    """Holds sessions; admits a step only if every session's reserved tokens fit the KV budget."""

    def __init__(
        self, new_cache: Any, kv_bytes_per_token: int, kv_budget_bytes: int, timeout_s: float, max_length: int,
        owner_budget_bytes: int | None = None,
    ) -> None:  # fmt: skip
        self._new_cache = new_cache
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_budget_bytes = kv_budget_bytes
        self.owner_budget_bytes = owner_budget_bytes or kv_budget_bytes  # one owner's quota
        self.leases: dict[str, float] = {}  # lease -> when its gateway was last heard of (monotonic)
        self.timeout_s = timeout_s
        self.max_length = max_length
        self.sessions: dict[str, Session] = {}

    def reserved_tokens(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    def reserved_bytes(self) -> int:
        return self.reserved_tokens() * self.kv_bytes_per_token

    def _find(self, session_id: str, owner: str | None) -> Session | None:
        """The session, unless another gateway owns it: to a caller, another's session does not exist."""
        session = self.sessions.get(session_id)
        return session if session is not None and (owner is None or session.owner == owner) else None

    def get(self, session_id: str, owner: str | None = None) -> Session:
        session = self._find(session_id, owner)
        if session is None:
            raise SessionError(
                f"unknown session {session_id!r} (never opened, closed, or timed out)", ErrorCode.UNKNOWN_SESSION
            )
        session.last_used = time.monotonic()
        return session

    def renew(self, lease: str, now: float | None = None) -> None:
        """The gateway process holding ``lease`` is alive (a step or a heartbeat came from it)."""
        if lease not in self.leases and len(self.leases) >= MAX_LEASES:  # bounded: forget the oldest
            self.leases.pop(min(self.leases, key=self.leases.__getitem__))
        self.leases[lease] = time.monotonic() if now is None else now

    def admit(self, session_id: str, start: int, new_tokens: int, max_length: int | None,
              fork: str | None = None, owner: str | None = None, lease: str | None = None) -> Session:  # fmt: skip
        """Find or open the session for a step starting at ``start`` and reserve room for it.

        With ``fork``, a session that holds fewer than ``start`` positions starts as a copy of
        the first ``start`` positions of session ``fork`` (the compute thread copies them).
        ``owner``: the calling gateway; a session or fork source of another is refused as unknown.
        """
        if fork is None and start > 0:
            session = self.get(session_id, owner)
            if start > session.length:
                raise SessionError(
                    f"session {session_id!r} holds {session.length} tokens; a step cannot start at {start}",
                    ErrorCode.POSITION_GAP,
                )
        else:  # a session that starts from nothing or from a fork: opened if new
            source = self._fork_source(fork, start, owner) if fork is not None else None
            session = self.sessions.get(session_id)
            if session is not None and owner is not None and session.owner != owner:
                raise SessionError(f"unknown session {session_id!r}", ErrorCode.UNKNOWN_SESSION)  # another's id
            if session is None:
                session = self.sessions[session_id] = Session(session_id, self._new_cache(), owner=owner, lease=lease)
            if source is None:
                session.fork_source = None  # a restart from nothing: a fork that never ran is off
            elif session.length < start:
                session.fork_source, session.fork_length = source, start
        session.parked = False
        end = start + new_tokens
        limit = min(self.max_length, max_length or self.max_length)
        if end > limit:
            raise SessionError(
                f"session {session_id!r} would reach {end} tokens, the limit is {limit}",
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            )
        wanted = max(session.reserved, max_length or end, end)
        extra = (wanted - session.reserved) * self.kv_bytes_per_token
        self._evict_parked(extra, keep={session.id, fork or ""})
        if self.reserved_bytes() + extra > self.kv_budget_bytes:
            if session.length == 0:
                del self.sessions[session_id]
            raise SessionError(
                f"KV budget exceeded: session {session_id!r} needs {extra} more bytes, "
                f"{self.reserved_bytes()} of {self.kv_budget_bytes} are reserved", ErrorCode.KV_BUDGET_EXCEEDED,
            )
        held = sum(s.reserved for s in self.sessions.values() if s.owner == session.owner) * self.kv_bytes_per_token
        if session.owner is not None and held + extra > self.owner_budget_bytes:
            if session.length == 0:
                del self.sessions[session_id]
            raise SessionError(
                f"KV quota exceeded: the sessions of {session.owner} would reserve {held + extra} bytes, each caller "
                f"may reserve {self.owner_budget_bytes} of the {self.kv_budget_bytes} this stage holds",
                ErrorCode.KV_BUDGET_EXCEEDED,
            )
        session.reserved = wanted
        session.last_used = time.monotonic()
        if session.lease is not None:
            self.renew(session.lease, session.last_used)
        return session

    def _fork_source(self, fork: str, start: int, owner: str | None) -> Session:
        source = self._find(fork, owner)
        if source is None or source.length < start:
            held = "is gone" if source is None else f"holds only {source.length} tokens"
            raise SessionError(f"fork source session {fork!r} {held}; cannot copy its first {start} positions",
                               ErrorCode.FORK_SOURCE_GONE)  # fmt: skip
        source.last_used = time.monotonic()
        return source

    def park(self, session_id: str, owner: str | None = None) -> Session:
        """Keep a session only as a fork source: it reserves what it holds and may be evicted."""
        session = self.get(session_id, owner)
        session.parked, session.reserved = True, session.length
        return session

    def _evict_parked(self, needed: int, keep: set[str]) -> None:
        """Close parked sessions, least recently used first, until ``needed`` more bytes fit (none if they can't)."""
        parked = sorted((s for s in self.sessions.values() if s.parked and s.id not in keep and not s.lock.locked()),
                        key=lambda s: s.last_used)  # fmt: skip
        freeable = sum(session.reserved for session in parked) * self.kv_bytes_per_token
        if self.reserved_bytes() + needed - freeable > self.kv_budget_bytes:
            return
        for session in parked:
            if self.reserved_bytes() + needed <= self.kv_budget_bytes:
                return
            del self.sessions[session.id]

    def close(self, session_id: str, owner: str | None = None) -> bool:
        if self._find(session_id, owner) is None:
            return False
        del self.sessions[session_id]
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Close the sessions idle past the time-out, and those whose gateway's lease lapsed."""
        now = time.monotonic() if now is None else now

        def stale(session: Session) -> bool:
            lapsed = session.lease is not None and now - self.leases.get(session.lease, 0.0) > LEASE_TIMEOUT_S
            return (now - session.last_used > self.timeout_s or lapsed) and not session.lock.locked()

        closed = [sid for sid, session in self.sessions.items() if stale(session)]
        for sid in closed:
            del self.sessions[sid]
        held = {session.lease for session in self.sessions.values()}
        forgotten = [lease for lease, seen in self.leases.items() if lease not in held and now - seen > LEASE_TIMEOUT_S]
        for lease in forgotten:
            del self.leases[lease]
        return closed
