"""Running an aiohttp app as a process: bind (port 0 allowed), announce the port, stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from bloombee_contract.errors import ErrorCode, error_body, error_type
from bloombee_contract.paths import CODECS_PATH, HEALTHZ_PATH, METRICS_PATH, READYZ_PATH

from bloombee_stage.serving.metrics import Metrics
from bloombee_stage.wire.codecs import CODECS

if TYPE_CHECKING:
    from aiohttp import ClientResponse

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def write_ready_file(path: str | None, payload: dict) -> None:
    """Write the announcement atomically, so a watcher never reads half of it."""
    if not path:
        return
    target = Path(path)
    scratch = target.with_suffix(target.suffix + ".tmp")
    scratch.write_text(json.dumps(payload))
    os.replace(scratch, target)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    ready_file: str | None,
    role: str,
    on_bound: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; ``on_bound`` learns the URL (and may start what needs it) before
    the ready file announces the server."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # port 0 -> the port the OS gave us
    url = f"http://{host}:{bound}"
    if on_bound is not None:
        await on_bound(url)
    log.info("%s listening on %s", role, url)
    write_ready_file(ready_file, {"url": url, "port": bound, "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("%s shutting down", role)
    await runner.cleanup()


def add_common_routes(
    app: web.Application, metrics: Metrics, readyz: Callable, accepted_codecs: Iterable[str] = tuple(CODECS)
) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (it can serve), ``/metrics`` (Prometheus) and
    ``/v1/codecs`` (the codecs it decodes, which a peer asks before it sends compressed frames)."""
    codecs = sorted(accepted_codecs)

    async def list_codecs(_: web.Request) -> web.Response:
        return web.json_response({"codecs": codecs})

    async def healthz(_: web.Request) -> web.Response:
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
