"""The OpenAI HTTP layer of the gateway: routes, request parsing, responses, streaming, errors.

Routes: ``/v1/models`` (and ``/v1/models/{id}``), ``/v1/completions``, ``/v1/chat/completions``
(``stream: true`` gives SSE; ``n`` answers, several prompts, logprobs: ``choices.py``), vLLM's
``/tokenize``, ``/detokenize``, ``/health`` and ``/version``, ``/healthz``, ``/readyz`` (every
stage ready), ``/metrics``, the internal ``/internal/v1/results`` where the last stage delivers
tokens, ``/v1/step`` for hops the plan relays through the gateway, and ``/info`` (internal: what
the gateway measured of its rounds, for the planner). Every error is OpenAI's
JSON error shape, its HTTP status the one its code has (``bloombee_contract.errors``). Every
request has an id (``X-Request-Id``, echoed), on each of its log lines and its access-log line.

What the API accepts and answers is in ``protocol.py``; generating is the engine's
(``engine.py``). A handler parses, asks the engine, and shapes the answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from bloombee_contract.errors import ErrorCode, error_body
from bloombee_contract.paths import INFO_PATH, RESULT_PATH, STEP_PATH
from pydantic import BaseModel, ValidationError

from bloombee_stage.gateway.choices import (
    Choice,
    CompletionLogprobsWriter,
    chat_logprobs,
    joined,
    merged,
    run_all,
    usage,
)
from bloombee_stage.gateway.engine import GenerationEngine, GenerationRequest, RequestError
from bloombee_stage.gateway.generation import Controls
from bloombee_stage.gateway.http_base import ENGINE, parse_body
from bloombee_stage.gateway.info_routes import add_info_routes
from bloombee_stage.gateway.middleware import (
    ANSWER_KEY,
    ClientGone,
    auth_middleware,
    echo_request_id,
    errors_middleware,
    request_context,
)
from bloombee_stage.gateway.pipeline import PipelineError
from bloombee_stage.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from bloombee_stage.gateway.responses import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Usage,
    new_id,
)
from bloombee_stage.gateway.tools import parse_call
from bloombee_stage.model.grammar import GrammarError
from bloombee_stage.model.grammar import check as check_grammar
from bloombee_stage.serving.process import add_common_routes, error_response
from bloombee_stage.wire.frame import WireError
from bloombee_stage.wire.messages import TokenLogprobs

log = logging.getLogger("bloombee.gateway")


async def _choices(engine: GenerationEngine, body: ChatCompletionRequest | CompletionRequest,
                   prompts: list[list[int]], asked: int | None, prompt_logprobs: int | None = None) -> list[Choice]:
    """``n`` answers to each prompt, checked and admitted before any of them starts."""
    engine.check_token_ids([token for token, _ in body.sampling_params().logit_bias], "logit_bias")
    engine.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
    grammar = body.grammar()
    if grammar is not None:
        try:
            check_grammar(grammar)
        except GrammarError as error:
            field = body.structure_field()
            raise RequestError(f"{field}: {error}", ErrorCode.INVALID_REQUEST, field) from None
    if asked is not None and body.min_tokens > asked:
        raise RequestError(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({asked})", ErrorCode.INVALID_REQUEST,
                           "min_tokens")  # fmt: skip
    await engine.recheck_lost_stages()  # a stage back within the last heartbeat is not refused
    engine.admit()  # before any answer starts: a full queue is a 429, even for a stream
    controls = Controls(min_tokens=body.min_tokens, prompt_logprobs=prompt_logprobs)
    choices: list[Choice] = []
    for prompt in prompts:
        budget = engine.token_budget(prompt, asked)
        if prompt_logprobs is not None:
            engine.check_prompt_logprobs(prompt, prompt_logprobs)
        for answer in range(body.n):
            generation = GenerationRequest(prompt=prompt, max_tokens=budget, sampling=body.sampling_params(answer),
                                           stop=body.stop_strings(), ignore_eos=body.ignore_eos,
                                           stop_token_ids=frozenset(body.stop_token_ids or []), controls=controls)
            choices.append(Choice(len(choices), prompt, generation))
    return choices


async def _run_to_end(request: web.Request, choices: list[Choice]) -> None:
    """Generate every answer whole; stop all of them, freeing their seats and the sessions' KV, as
    soon as the client has gone (nobody would read the answers)."""
    engine = request.app[ENGINE]

    async def one(choice: Choice) -> None:
        async with contextlib.aclosing(engine.generate(choice.generation, choice.result)) as pieces:
            async for _ in pieces:
                if request.transport is None or request.transport.is_closing():
                    engine.metrics.inc("requests_aborted_total", "Generations stopped because their client had gone")
                    raise ClientGone

    await run_all([one(choice) for choice in choices])


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
    body = await parse_body(request, ChatCompletionRequest)
    engine.check_model(body.model)
    prompt = await engine.tokenized(engine.chat_prompt, body.conversation())
    choices = await _choices(engine, body, [prompt], body.token_limit())
    request[ANSWER_KEY] = ([prompt], choices)
    request_id = new_id("chatcmpl")
    token_ids = (lambda ids: ids) if body.return_token_ids else (lambda ids: None)
    logprobs = body.top_logprobs_asked() is not None

    tools = body.active_tools()

    def shaped(entries: list[TokenLogprobs]) -> ChatLogprobs | None:
        return chat_logprobs(entries, engine.token_text) if logprobs else None

    def tool_call(choice: Choice) -> dict | None:
        """The call a finished answer makes, when tools are on and it is one (tools.py)."""
        return parse_call(choice.result.text, tools) if tools else None

    def finish(choice: Choice, call: dict | None) -> str | None:
        return "tool_calls" if call else choice.result.finish_reason

    if not body.stream:
        await _run_to_end(request, choices)
        answers = []
        for c in choices:
            call = tool_call(c)
            message = AssistantMessage(content=None if call else c.result.text, tool_calls=[call] if call else None)
            answers.append(ChatCompletionChoice(index=c.index, message=message, logprobs=shaped(c.result.logprobs),
                                                finish_reason=finish(c, call), token_ids=token_ids(c.result.token_ids)))
        reply = ChatCompletionResponse(id=request_id, model=body.model, choices=answers,
                                       usage=usage([prompt], choices), prompt_token_ids=token_ids(prompt))  # fmt: skip
        return web.json_response(reply.model_dump())

    def chunk(choice: Choice, delta: DeltaMessage, finish: str | None = None,
              ids: list[int] | None = None) -> ChatCompletionChunk:  # fmt: skip
        entries = choice.new_logprobs()
        answer = ChatCompletionStreamChoice(index=choice.index, delta=delta, finish_reason=finish, token_ids=ids,
                                            logprobs=shaped(entries) if entries else None)  # fmt: skip
        return ChatCompletionChunk(id=request_id, model=body.model, choices=[answer])

    async def answer(choice: Choice) -> AsyncIterator[ChatCompletionChunk]:
        yield chunk(choice, DeltaMessage(role="assistant", content=""))
        async with contextlib.aclosing(engine.generate(choice.generation, choice.result)) as pieces:
            async for piece in pieces:
                if not tools:  # with tools, whether the answer is a call is known at its end
                    yield chunk(choice, DeltaMessage(role="assistant", content=piece))
        call = tool_call(choice)
        if call:
            yield chunk(choice, DeltaMessage(role="assistant", tool_calls=[{"index": 0, **call}]))
        elif tools:
            yield chunk(choice, DeltaMessage(role="assistant", content=choice.result.text))
        yield chunk(choice, DeltaMessage(), finish(choice, call), token_ids(choice.result.token_ids))

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        async with contextlib.aclosing(merged([answer(choice) for choice in choices])) as pieces:
            async for piece in pieces:
                yield piece
        if body.stream_options and body.stream_options.include_usage:
            yield ChatCompletionChunk(id=request_id, model=body.model, choices=[], usage=usage([prompt], choices))

    return await _stream(request, chunks())


async def handle_completion(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await parse_body(request, CompletionRequest)
    engine.check_model(body.model)
    prompts = [await engine.tokenized(engine.text_prompt, prompt) for prompt in body.prompts()]
    prompt_logprobs = body.logprobs if body.echo else None
    choices = await _choices(engine, body, prompts, body.max_tokens, prompt_logprobs)
    request[ANSWER_KEY] = (prompts, choices)
    texts = [prompt if isinstance(prompt, str) else engine.decode(prompt) for prompt in body.prompts()]
    request_id = new_id("cmpl")
    token_ids = (lambda ids: ids) if body.return_token_ids else (lambda ids: None)

    def echoed(choice: Choice) -> str:
        return texts[choice.index // body.n] if body.echo else ""

    def logprobs(choice: Choice, writer: CompletionLogprobsWriter, first: bool) -> CompletionLogprobs | None:
        """The logprobs of the tokens not sent yet, after the echoed prompt's in an answer's first part."""
        if body.logprobs is None:
            return None
        parts = [writer.prompt(choice.prompt[0], choice.result.prompt_logprobs or [])] if first and body.echo else []
        return joined([*parts, writer.tokens(choice.new_logprobs())])

    if not body.stream:
        await _run_to_end(request, choices)
        answers = [CompletionChoice(index=c.index, text=echoed(c) + c.result.text,
                                    logprobs=logprobs(c, CompletionLogprobsWriter(engine.token_text), first=True),
                                    finish_reason=c.result.finish_reason, token_ids=token_ids(c.result.token_ids),
                                    prompt_token_ids=token_ids(c.prompt))
                   for c in choices]  # fmt: skip
        reply = CompletionResponse(id=request_id, model=body.model, choices=answers, usage=usage(prompts, choices),
                                   prompt_token_ids=token_ids(prompts[0]) if len(prompts) == 1 else None)  # fmt: skip
        return web.json_response(reply.model_dump())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=request_id, model=body.model, choices=choices, usage=usage)

    async def answer(choice: Choice) -> AsyncIterator[CompletionResponse]:
        writer, first = CompletionLogprobsWriter(engine.token_text), True
        async with contextlib.aclosing(engine.generate(choice.generation, choice.result)) as pieces:
            async for piece in pieces:  # the echoed prompt goes first, in the answer's first chunk
                text = (echoed(choice) if first else "") + piece
                yield chunk([CompletionChoice(index=choice.index, text=text, logprobs=logprobs(choice, writer, first))])
                first = False
        last = CompletionChoice(index=choice.index, text=echoed(choice) if first else "",
                                logprobs=logprobs(choice, writer, first), finish_reason=choice.result.finish_reason,
                                token_ids=token_ids(choice.result.token_ids))  # fmt: skip
        yield chunk([last])

    async def chunks() -> AsyncIterator[CompletionResponse]:
        async with contextlib.aclosing(merged([answer(choice) for choice in choices])) as pieces:
            async for piece in pieces:
                yield piece
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage(prompts, choices))

    return await _stream(request, chunks())


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
    """Ready when every stage of the plan in force is. Anyone may ask (a kubelet, a load balancer,
    the operator through the API server's proxy), so the answer counts the stages instead of
    naming their internal URLs (the gateway's logs name them), and names the plan that serves and
    those still draining (a plan switch), without their generations."""
    engine = request.app[ENGINE]
    stages = await engine.stage_readiness()
    ready = all(stages.values())
    plans = engine.plan_state()
    return web.json_response({"ready": ready, "stages_ready": f"{sum(stages.values())}/{len(stages)}",
                              "plan": plans["plan"], "draining": [lane["plan"] for lane in plans["retiring"]]},
                             status=200 if ready else 503)  # fmt: skip


async def handle_info(request: web.Request) -> web.Response:
    """For the operator, on the internal listener only: what this gateway measured (``engine.profile``)
    and which plan it serves, warms up and drains (``engine.plan_state``)."""
    engine = request.app[ENGINE]
    return web.json_response({"profile": engine.profile(), **engine.plan_state()})


def create_app(engine: GenerationEngine) -> web.Application:
    """The gateway's routes over ``engine``; the engine is started once the server listens and
    stopped when the app shuts down."""
    app = web.Application(middlewares=[request_context, errors_middleware, auth_middleware(engine.settings.api_key)],
                          client_max_size=64 << 20)  # fmt: skip
    app[ENGINE] = engine
    app.on_response_prepare.append(echo_request_id)

    async def stop_engine(_: web.Application) -> None:
        await engine.stop()

    app.on_cleanup.append(stop_engine)
    add_common_routes(app, engine.metrics, readyz)
    add_info_routes(app)
    app.router.add_post("/v1/completions", handle_completion)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post(RESULT_PATH, handle_result)
    app.router.add_post(STEP_PATH, handle_forward)
    app.router.add_get(INFO_PATH, handle_info)
    return app
