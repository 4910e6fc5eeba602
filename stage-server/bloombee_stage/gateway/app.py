"""The OpenAI HTTP layer of the gateway: routes, request parsing, responses, streaming, errors.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` gives
SSE), ``/healthz``, ``/readyz`` (every stage ready), ``/metrics``, the internal
``/internal/v1/results`` where the last stage delivers tokens, and ``/v1/step`` for hops the plan
relays through the gateway. Every error is OpenAI's JSON error shape, its HTTP status the one its
code has (``bloombee_contract.errors``).

What the API accepts and answers is in ``protocol.py``; generating is the engine's
(``engine.py``). A handler parses, asks the engine, and shapes the answer.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from bloombee_contract.errors import ErrorCode, error_body
from bloombee_contract.paths import RESULT_PATH, STEP_PATH
from pydantic import BaseModel, ValidationError

from bloombee_stage.gateway.engine import GenerationEngine, GenerationRequest, RequestError
from bloombee_stage.gateway.generation import Generated
from bloombee_stage.gateway.pipeline import PipelineError
from bloombee_stage.gateway.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
    new_id,
)
from bloombee_stage.serving.process import add_common_routes, error_response
from bloombee_stage.wire.frame import WireError

log = logging.getLogger("bloombee.gateway")

ENGINE = web.AppKey("engine", GenerationEngine)
_Body = TypeVar("_Body", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _parse(request: web.Request, model: type[_Body]) -> _Body:
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("request body is not valid JSON", ErrorCode.INVALID_REQUEST) from None
    if not isinstance(payload, dict):
        raise RequestError("request body must be a JSON object", ErrorCode.INVALID_REQUEST)
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RequestError(f"{where}: {first['msg']}", ErrorCode.INVALID_REQUEST, where or None) from None


def _usage(prompt: list[int], result: Generated) -> Usage:
    n = len(result.token_ids)
    cached = PromptTokensDetails(cached_tokens=result.cached_tokens)
    return Usage(prompt_tokens=len(prompt), completion_tokens=n, total_tokens=len(prompt) + n,
                 prompt_tokens_details=cached)  # fmt: skip


async def _generation(engine: GenerationEngine, body: ChatCompletionRequest | CompletionRequest,
                      prompt: list[int], asked: int | None) -> GenerationRequest:  # fmt: skip
    await engine.recheck_lost_stages()  # a stage back within the last heartbeat is not refused
    engine.admit()  # before any answer starts: a full queue is a 429, even for a stream
    return GenerationRequest(prompt=prompt, max_tokens=engine.token_budget(prompt, asked),
                             sampling=body.sampling_params(), stop=body.stop_strings(),
                             ignore_eos=body.ignore_eos)  # fmt: skip


class ClientGone(Exception):
    """The client closed its connection before its (non-streaming) answer was ready."""


async def _run_to_end(request: web.Request, generation: GenerationRequest, result: Generated) -> None:
    """Generate the whole answer; stop, freeing the seat and the sessions' KV, as soon as the
    client has gone (nobody would read the answer)."""
    engine = request.app[ENGINE]
    async with contextlib.aclosing(engine.generate(generation, result)) as pieces:
        async for _ in pieces:
            if request.transport is None or request.transport.is_closing():
                engine.metrics.inc("abandoned_total", "Generations stopped because their client had gone")
                raise ClientGone


class _EventStream:
    """Server-sent events: ``data: {json}`` lines, always ended by ``data: [DONE]``."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request) -> _EventStream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return cls(response)

    async def send(self, payload: BaseModel | dict) -> None:
        data = payload.model_dump() if isinstance(payload, BaseModel) else payload
        await self.response.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

    async def close(self) -> web.StreamResponse:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


async def _stream(request: web.Request, pieces: AsyncIterator[BaseModel]) -> web.StreamResponse:
    """Send chunks as they come; a failure midway goes out as an error data line before [DONE]."""
    events = await _EventStream.open(request)
    try:
        async with contextlib.aclosing(pieces):  # a client that leaves mid-stream ends its generation now
            async for chunk in pieces:
                await events.send(chunk)
    except PipelineError as error:
        await events.send(error_body(error.public_message, error.code, type_="server_error"))
    return await events.close()


async def handle_chat(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await _parse(request, ChatCompletionRequest)
    engine.check_model(body.model)
    prompt = await engine.tokenized(engine.chat_prompt, body.conversation())
    generation = await _generation(engine, body, prompt, body.token_limit())
    request_id, result = new_id("chatcmpl"), Generated()
    token_ids = (lambda: result.token_ids) if body.return_token_ids else (lambda: None)
    if not body.stream:
        await _run_to_end(request, generation, result)
        choice = ChatCompletionChoice(message=AssistantMessage(content=result.text),
                                      finish_reason=result.finish_reason, token_ids=token_ids())  # fmt: skip
        reply = ChatCompletionResponse(id=request_id, model=body.model, choices=[choice], usage=_usage(prompt, result),
                                       prompt_token_ids=prompt if body.return_token_ids else None)  # fmt: skip
        return web.json_response(reply.model_dump())

    def chunk(delta: DeltaMessage, finish: str | None = None, ids: list[int] | None = None) -> ChatCompletionChunk:
        choice = ChatCompletionStreamChoice(delta=delta, finish_reason=finish, token_ids=ids)
        return ChatCompletionChunk(id=request_id, model=body.model, choices=[choice])

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        yield chunk(DeltaMessage(role="assistant", content=""))
        async with contextlib.aclosing(engine.generate(generation, result)) as pieces:
            async for piece in pieces:
                yield chunk(DeltaMessage(role="assistant", content=piece))
        yield chunk(DeltaMessage(), result.finish_reason, token_ids())
        if body.stream_options and body.stream_options.include_usage:
            yield ChatCompletionChunk(id=request_id, model=body.model, choices=[], usage=_usage(prompt, result))

    return await _stream(request, chunks())


async def handle_completion(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await _parse(request, CompletionRequest)
    engine.check_model(body.model)
    prompt = await engine.tokenized(engine.text_prompt, body.prompt)
    generation = await _generation(engine, body, prompt, body.max_tokens)
    request_id, result = new_id("cmpl"), Generated()
    token_ids = (lambda: result.token_ids) if body.return_token_ids else (lambda: None)
    if not body.stream:
        await _run_to_end(request, generation, result)
        echoed = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        choice = CompletionChoice(text=echoed + result.text, finish_reason=result.finish_reason,
                                  token_ids=token_ids())  # fmt: skip
        reply = CompletionResponse(id=request_id, model=body.model, choices=[choice], usage=_usage(prompt, result),
                                   prompt_token_ids=prompt if body.return_token_ids else None)  # fmt: skip
        return web.json_response(reply.model_dump())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=request_id, model=body.model, choices=choices, usage=usage)

    async def chunks() -> AsyncIterator[CompletionResponse]:
        async with contextlib.aclosing(engine.generate(generation, result)) as pieces:
            async for piece in pieces:
                yield chunk([CompletionChoice(text=piece)])
        yield chunk([CompletionChoice(text="", finish_reason=result.finish_reason, token_ids=token_ids())])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], _usage(prompt, result))

    return await _stream(request, chunks())


async def handle_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    card = ModelCard(id=engine.settings.served_model_name, max_model_len=engine.max_model_len)
    return web.json_response(ModelList(data=[card]).model_dump())


async def handle_forward(request: web.Request) -> web.Response:
    """A hop the planner routes through the gateway: the engine passes the frame on."""
    try:
        forwarded = await request.app[ENGINE].forward(await request.read())
    except (WireError, ValidationError, ValueError) as error:
        return error_response(f"forwarded frame: {error}", ErrorCode.INVALID_FRAME)
    return web.Response(status=forwarded.status, body=forwarded.body, content_type=forwarded.content_type)


async def handle_result(request: web.Request) -> web.Response:
    try:
        delivered = request.app[ENGINE].deliver(await request.read())
    except (WireError, ValidationError) as error:
        return error_response(f"result frame: {error}", ErrorCode.INVALID_FRAME)
    return web.json_response({"delivered": delivered})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every stage is. Anyone may ask (a kubelet, a load balancer), so the answer counts
    the stages instead of naming their internal URLs (the gateway's logs name them)."""
    stages = await request.app[ENGINE].stage_readiness()
    ready = all(stages.values())
    return web.json_response({"ready": ready, "stages_ready": f"{sum(stages.values())}/{len(stages)}"},
                             status=200 if ready else 503)  # fmt: skip


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as error:
        response = error_response(str(error), error.code, param=error.param)
        if error.retry_after_s is not None:
            response.headers["Retry-After"] = str(error.retry_after_s)
        return response
    except PipelineError as error:
        return error_response(error.public_message, error.code, error.status)
    except web.HTTPException:
        raise  # serving.process.http_errors gives it OpenAI's shape
    except ClientGone:
        return error_response("the client closed the connection", "client_closed_request", 499)
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return error_response("internal error in the gateway", ErrorCode.INTERNAL_ERROR, 500)


def _auth_middleware(api_key: str | None) -> Callable:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if api_key and request.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
            raise RequestError("Incorrect API key provided.", ErrorCode.INVALID_API_KEY)
        return await handler(request)

    return check_key


def create_app(engine: GenerationEngine) -> web.Application:
    """The gateway's routes over ``engine``; the engine is started once the server listens and
    stopped when the app shuts down."""
    app = web.Application(middlewares=[errors_middleware, _auth_middleware(engine.settings.api_key)],
                          client_max_size=64 << 20)  # fmt: skip
    app[ENGINE] = engine

    async def stop_engine(_: web.Application) -> None:
        await engine.stop()

    app.on_cleanup.append(stop_engine)
    add_common_routes(app, engine.metrics, readyz)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/completions", handle_completion)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post(RESULT_PATH, handle_result)
    app.router.add_post(STEP_PATH, handle_forward)
    return app
