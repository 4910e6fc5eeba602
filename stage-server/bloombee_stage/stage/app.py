"""The stage server's HTTP routes over its service (``service.py``).

Endpoints: ``/healthz``, ``/readyz``, ``/info``, ``/metrics``, ``/probe`` (link measurement),
``POST /v1/step`` (a wire frame, see ``wire/messages.py``), ``POST /v1/sessions/{id}/rollback``,
``POST /v1/sessions/{id}/park`` (keep it only as a fork source, see sessions.py) and
``DELETE /v1/sessions/{id}``, ``POST /profile`` (a timed run of the span for the planner, the
operator only). Every refusal is OpenAI's error shape with its code's status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from bloombee_contract.errors import ErrorCode
from bloombee_contract.paths import (
    INFO_PATH,
    PARK_PATH,
    PROFILE_PATH,
    ROLLBACK_PATH,
    SESSION_PATH,
    STEP_PATH,
)
from bloombee_contract.tls import OPERATOR_IDENTITY, SIGNED_OPERATOR
from pydantic import ValidationError

from bloombee_stage.model.span import StageModel, truncate_cache
from bloombee_stage.serving.probe import add_probe_routes
from bloombee_stage.serving.process import add_common_routes, error_response
from bloombee_stage.stage.service import (
    MAX_PROFILE_ROWS,
    MAX_PROFILE_STEPS,
    Misrouted,
    StageService,
    StageSettings,
)
from bloombee_stage.stage.sessions import SessionError
from bloombee_stage.wire.frame import WireError, largest_frame_bytes

READ_TIMEOUT_S = 60.0  # a body that trickles in slower than this is a client to drop, not to wait for
MAX_READING = 4  # step bodies buffered at once; more wait their turn in the kernel's socket buffers

SERVICE = web.AppKey("service", StageService)
READING = web.AppKey("reading", asyncio.Semaphore)


def session_owner(request: web.Request, claimed: str | None = None) -> str | None:
    """Whose sessions a call may touch: the calling gateway (its certificate's name); for a step
    pushed on by the stage before, the gateway that stage was called by (``claimed``). None when
    the stage runs without TLS."""
    peer = request.get("peer")
    if peer is not None and peer.startswith("stage/"):
        return claimed
    return peer


async def handle_step(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    try:
        async with request.app[READING]:
            body = await asyncio.wait_for(request.read(), READ_TIMEOUT_S)
    except TimeoutError:
        return error_response(f"the frame did not arrive within {READ_TIMEOUT_S:.0f} s", ErrorCode.INVALID_FRAME)
    try:
        meta, inputs, sessions = service.accept(body, lambda claimed: session_owner(request, claimed))
    except WireError as error:
        service.metrics.inc("errors_total", "Failed steps", code="invalid_frame")
        return error_response(str(error), ErrorCode.INVALID_FRAME)
    except ValidationError as error:
        service.metrics.inc("errors_total", "Failed steps", code="invalid_meta")
        return error_response(f"frame metadata: {error}", ErrorCode.INVALID_META)
    except (SessionError, Misrouted) as error:
        service.metrics.inc("errors_total", "Failed steps", code=error.code.value)
        return error_response(str(error), error.code)
    service.metrics.inc("steps_total", "Accepted steps")
    if meta.reply_to is None:  # inline answer: the client relays (baseline mode)
        return web.Response(body=await service.answer(meta, inputs, sessions), content_type="application/octet-stream")
    task = asyncio.create_task(service.push(meta, inputs, sessions))
    service.tasks.add(task)
    task.add_done_callback(service.tasks.discard)
    return web.json_response({"accepted": True, "step": meta.step, "rows": len(meta.rows)}, status=202)


async def handle_rollback(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        payload = await request.json()
        length = int(payload["length"]) if "length" in payload else None
        drop = int(payload.get("n", 0))
    except Exception:
        expected = 'body must be JSON {"n": tokens_to_drop} or {"length": tokens_to_keep}'
        return error_response(expected, ErrorCode.INVALID_BODY)
    try:
        session = service.sessions.get(request.match_info["session"], session_owner(request))
    except SessionError as error:
        return error_response(str(error), error.code)
    target = length if length is not None else session.length - drop
    if not 0 <= target <= session.length:
        message = f"cannot roll session back to {target} tokens; it holds {session.length}"
        return error_response(message, ErrorCode.BAD_ROLLBACK)
    async with session.lock:
        truncate_cache(session.cache, target)
        session.length = target
    return web.json_response({"session": session.id, "length": target})


async def handle_park(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        session = service.sessions.park(request.match_info["session"], session_owner(request))
    except SessionError as error:
        return error_response(str(error), error.code)
    return web.json_response({"session": session.id, "parked": True, "length": session.length})


async def handle_close(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    closed = service.sessions.close(request.match_info["session"], session_owner(request))
    return web.json_response({"closed": closed}, status=200 if closed else 404)


async def handle_profile(request: web.Request) -> web.Response:
    """A profiling run (``StageService.profile_run``) for whoever plans: the operator, or anyone
    when the stage runs without TLS. Bounded: at most
    ``MAX_PROFILE_STEPS`` timed steps of at most ``MAX_PROFILE_ROWS`` rows."""
    service = request.app[SERVICE]
    if request.get("peer") not in (None, OPERATOR_IDENTITY, SIGNED_OPERATOR):
        return error_response(f"{PROFILE_PATH} is for the operator, not {request.get('peer')}", ErrorCode.FORBIDDEN)
    most = MAX_PROFILE_ROWS  # its caches hold at most MAX_PROFILE_POSITIONS positions in all: small
    try:
        payload = await request.json()
        rows = [int(count) for count in payload.get("rows", [1, 2, 4])]
        repeats = int(payload.get("repeats", 4))
    except Exception:
        return error_response('body must be JSON {"rows": [row counts], "repeats": N}', ErrorCode.INVALID_BODY)
    if not rows or any(not 1 <= count <= most for count in rows) or not 1 <= repeats <= MAX_PROFILE_STEPS:
        return error_response(f"rows must each be 1..{most} and repeats 1.."
                              f"{MAX_PROFILE_STEPS}; got rows {rows[:8]}, repeats {repeats}", ErrorCode.INVALID_BODY)
    if len(rows) * repeats > MAX_PROFILE_STEPS:
        return error_response(f"at most {MAX_PROFILE_STEPS} timed steps per run; asked {len(rows) * repeats}",
                              ErrorCode.INVALID_BODY)  # fmt: skip
    return web.json_response(await service.profile_run(rows, repeats))


def create_app(model: StageModel, settings: StageSettings) -> web.Application:
    service = StageService(model, settings)
    app = web.Application(client_max_size=largest_frame_bytes(service.max_step_bytes))
    app[SERVICE] = service
    app[READING] = asyncio.Semaphore(MAX_READING)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app.cleanup_ctx.append(lifecycle)

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response({"ready": not service.draining}, status=503 if service.draining else 200)

    async def info(_: web.Request) -> web.Response:
        return web.json_response(service.info())

    add_common_routes(app, service.metrics, readyz, settings.accept_codecs, heard_from=service.sessions.renew)
    app.router.add_get(INFO_PATH, info)
    add_probe_routes(app, settings.tls)
    app.router.add_post(STEP_PATH, handle_step)
    app.router.add_post(PROFILE_PATH, handle_profile)
    app.router.add_post(ROLLBACK_PATH, handle_rollback)
    app.router.add_post(PARK_PATH, handle_park)
    app.router.add_delete(SESSION_PATH, handle_close)
    return app
