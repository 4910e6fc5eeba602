"""Running an aiohttp app as a process: bind (port 0 allowed), announce the port, stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from bloombee_contract.errors import ErrorCode, error_body, error_type
from bloombee_contract.paths import (
    CODECS_PATH,
    HEALTHZ_PATH,
    LEASE_HEADER,
    MEASURE_PATH,
    METRICS_PATH,
    PROFILE_PATH,
    READYZ_PATH,
)
from bloombee_contract.tls import (
    OPEN_PATHS,
    SIGNATURE_HEADER,
    SIGNED_OPERATOR,
    TlsFiles,
    client_context,
    common_name,
    reload_changed,
    server_context,
    signature_ok,
)

from bloombee_stage.serving.metrics import Metrics
from bloombee_stage.wire.codecs import CODECS

if TYPE_CHECKING:
    from aiohttp import ClientResponse

log = logging.getLogger(__name__)
SIGNED_PATHS = frozenset({MEASURE_PATH, PROFILE_PATH})  # what the operator may call through a service proxy
TLS_RELOAD_S = 5.0  # how often a server looks whether its certificate files were renewed


# The request a log line belongs to (the gateway's X-Request-Id), for every line logged while serving it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request = f" [request {request_id}]" if request_id else ""
        return True


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s%(request)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RequestContext())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def write_ready_file(path: str | None, payload: dict) -> None:
    """Write the announcement atomically, so a watcher never reads half of it."""
    if not path:
        return
    target = Path(path)
    scratch = target.with_suffix(target.suffix + ".tmp")
    scratch.write_text(json.dumps(payload))
    os.replace(scratch, target)


def peer_session(timeout: aiohttp.ClientTimeout, tls: TlsFiles | None) -> aiohttp.ClientSession:
    """A client session for calling this deployment's parts: with ``tls``, it checks their
    certificates against the CA and presents ours."""
    connector = aiohttp.TCPConnector(ssl=client_context(tls)) if tls is not None else None
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


def require_peer(internal_paths: frozenset[str], measure_key: bytes | None = None) -> Callable:
    """Refuse, with 401, a caller without a certificate of this deployment's CA on every path of a
    TLS listener but the open ones (``/healthz``, ``/readyz``), and on ``internal_paths`` anywhere
    (a gateway's plain public listener never serves its peers' paths). A measurement or profiling
    request that came through an API server's service proxy may instead be signed with ``measure_key``
    (``bloombee_contract.tls.sign``). The caller's common name is ``request["peer"]``."""

    @web.middleware
    async def check(request: web.Request, handler: Callable) -> web.StreamResponse:
        transport = request.transport
        over_tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        if (over_tls and request.path not in OPEN_PATHS) or request.path in internal_paths:
            peer = common_name(transport.get_extra_info("peercert")) if transport is not None else None
            signature = request.headers.get(SIGNATURE_HEADER)
            signed = peer is None and measure_key and signature and request.path in SIGNED_PATHS
            if signed and signature_ok(measure_key, signature, await request.read(), time.time()):
                peer = SIGNED_OPERATOR
            if peer is None:
                return error_response(f"{request.path} answers only the parts of this deployment: present a "
                                      "certificate from its CA", ErrorCode.UNAUTHENTICATED)  # fmt: skip
            request["peer"] = peer
        return await handler(request)

    return check


@web.middleware
async def http_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, a body past the limit) in OpenAI's error
    shape like every other refusal, so a client reads one kind of error from every part."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        if error.status == 413:
            return error_response(f"{error.reason}: {error.text}", ErrorCode.BODY_TOO_LARGE)
        return error_response(error.reason, str(error.status), error.status)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    ready_file: str | None,
    role: str,
    on_bound: Callable[[str], Awaitable[None]] | None = None,
    tls: TlsFiles | None = None,
    internal_port: int | None = None,
    internal_paths: frozenset[str] = frozenset(),
) -> None:
    """Serve until SIGTERM/SIGINT. With ``tls`` the server speaks mutual TLS: on ``port``, or, given
    ``internal_port``, there while ``port`` stays plain HTTP for clients (a gateway's public API).
    ``on_bound`` learns the URL peers call (and may start what needs it) before the ready file
    announces ``{url, peer_url, port, pid}``."""
    app.middlewares.insert(0, http_errors)
    if tls is not None:
        app.middlewares.append(require_peer(internal_paths, tls.measure_key()))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    context = server_context(tls) if tls is not None else None
    main_context = context if internal_port is None else None
    site = web.TCPSite(runner, host, port, ssl_context=main_context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # port 0 -> the port the OS gave us
    url = f"{'https' if main_context else 'http'}://{host}:{bound}"
    peer_url = url
    if context is not None and internal_port is not None:
        internal = web.TCPSite(runner, host, internal_port, ssl_context=context)
        await internal.start()
        peer_url = f"https://{host}:{internal._server.sockets[0].getsockname()[1]}"
    if on_bound is not None:
        await on_bound(peer_url)
    log.info("%s listening on %s%s", role, url, f" (peers: {peer_url})" if peer_url != url else "")
    write_ready_file(ready_file, {"url": url, "peer_url": peer_url, "port": bound, "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    rotation = asyncio.create_task(_follow_tls_files()) if tls is not None else None
    await stop.wait()
    log.info("%s shutting down", role)
    if rotation is not None:
        rotation.cancel()
    await runner.cleanup()


async def _follow_tls_files() -> None:
    """Renewed certificates (a Secret volume the operator updated) go into this process's TLS
    contexts, the servers' and the clients', without a restart (``bloombee_contract.tls``)."""
    while True:
        await asyncio.sleep(TLS_RELOAD_S)
        await asyncio.to_thread(reload_changed)


def add_common_routes(
    app: web.Application, metrics: Metrics, readyz: Callable, accepted_codecs: Iterable[str] = tuple(CODECS),
    heard_from: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """``/healthz`` (the process answers), ``/readyz`` (it can serve), ``/metrics`` (Prometheus) and
    ``/v1/codecs`` (the codecs it decodes, which a peer asks before it sends compressed frames).
    A heartbeat that carries a lease (``LEASE_HEADER``) goes to ``heard_from``."""
    codecs = sorted(accepted_codecs)

    async def list_codecs(_: web.Request) -> web.Response:
        return web.json_response({"codecs": codecs})

    async def healthz(request: web.Request) -> web.Response:
        lease = request.headers.get(LEASE_HEADER)
        if heard_from is not None and lease and len(lease) <= 64:
            heard_from(lease)
        return web.json_response({"ok": True})

    async def render_metrics(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain")

    app.router.add_get(HEALTHZ_PATH, healthz)
    app.router.add_get(READYZ_PATH, readyz)
    app.router.add_get(METRICS_PATH, render_metrics)
    app.router.add_get(CODECS_PATH, list_codecs)


def error_response(message: str, code: ErrorCode | str | None, status: int | None = None,
                   param: str | None = None) -> web.Response:  # fmt: skip
    """OpenAI's error shape as an HTTP answer, with the code's own status unless ``status`` is given
    (a code a peer reported, or an HTTP error without a code of ours)."""
    if status is None:
        if not isinstance(code, ErrorCode):
            raise ValueError(f"error code {code!r} has no status of its own; pass one")
        status = code.status
    return web.json_response(error_body(message, code, param, error_type(status)), status=status)


async def read_error(reply: ClientResponse, default_code: ErrorCode) -> tuple[str, str]:
    """(message, code) of a peer's error reply: OpenAI's shape when it is that, else the start of the body."""
    try:
        error = (await reply.json())["error"]
        return str(error["message"]), str(error.get("code") or default_code)
    except Exception:
        return (await reply.text())[:500], str(default_code)
