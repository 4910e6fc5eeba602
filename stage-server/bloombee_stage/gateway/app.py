"""OpenAI-compatible gateway: tokenises, drives the stage chain, streams text back.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` gives
SSE), ``/healthz``, ``/readyz`` (every stage ready), ``/metrics``, and the internal
``/internal/v1/results`` where the last stage delivers tokens. Every error is OpenAI's JSON
error shape with a fitting HTTP status.

Each request runs ``generation.generate``: rounds of draft (speculative.py) and step, the steps
packed with other requests' rows into micro-batches (batching.py) along a path over the stage
replicas chosen at its start (routing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bloombee_contract.errors import ErrorCode, error_body, error_type
from bloombee_contract.launch import GatewayLaunch
from bloombee_contract.model_source import ModelSourceError
from bloombee_contract.paths import RESULT_PATH, STEP_PATH
from pydantic import BaseModel, ValidationError

from bloombee_stage.gateway.batching import MicroBatcher
from bloombee_stage.gateway.drafting import DraftLength, ModelDrafter
from bloombee_stage.gateway.generation import Generated, Speculation, TextAssembler, generate
from bloombee_stage.gateway.pipeline import PipelineClient, PipelineError, ResultRouter
from bloombee_stage.gateway.prefixes import PrefixIndex
from bloombee_stage.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    PromptTokensDetails,
    Usage,
    new_id,
    now,
)
from bloombee_stage.gateway.routing import Router
from bloombee_stage.model.loading import prepare_model, read_config
from bloombee_stage.model.span import Span, SpanError, StageModel
from bloombee_stage.serving.metrics import Metrics
from bloombee_stage.serving.process import add_common_routes, serve, setup_logging
from bloombee_stage.wire.frame import WireError, decode_frame, encode_frame
from bloombee_stage.wire.messages import StepMeta

log = logging.getLogger("bloombee.gateway")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def response(self) -> web.Response:
        return web.json_response(error_body(str(self), self.code, self.param, self.type), status=self.status)


class Gateway:
    def __init__(self, tokenizer: Any, model_config: dict, settings: GatewayLaunch,
                 drafter: ModelDrafter | None = None) -> None:  # fmt: skip
        if settings.draft in ("early-exit", "model") and drafter is None:
            raise ValueError(f"draft {settings.draft!r} needs a draft model")
        self.tokenizer = tokenizer
        self.settings = settings
        self.drafter = drafter
        self.draft_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft") if drafter else None
        self.max_model_len = int(model_config.get("max_position_embeddings", 2048))
        eos = model_config.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.results = ResultRouter()
        self.routing = Router(settings.stages, settings.micro_batch)
        self.prefixes = PrefixIndex(settings.prefix_cache)
        self._stage_settings_known = False
        # Seats for generations: the stages' KV budgets were sized for the plan's admitted sequences,
        # so a request beyond them waits here for a seat instead of failing at a stage.
        self.seats = asyncio.Semaphore(settings.max_sequences) if settings.max_sequences else None
        self.waiting = 0
        self.http: aiohttp.ClientSession | None = None
        self.pipeline: PipelineClient | None = None
        self.batcher: MicroBatcher | None = None
        self.metrics = Metrics("bloombee_gateway")
        self.metrics.gauge("steps_sent", "Steps (micro-batches) sent into the pipeline",
                           lambda: self.batcher.steps if self.batcher else 0)  # fmt: skip
        self.metrics.gauge("rows_sent", "Rows (one per generation and round) carried by those steps",
                           lambda: self.batcher.rows if self.batcher else 0)  # fmt: skip
        self.metrics.gauge("steps_in_flight", "Steps in the pipeline now",
                           lambda: self.batcher.steps_in_flight if self.batcher else 0)  # fmt: skip
        self.metrics.gauge("generations_waiting", "Requests waiting for a seat (--max-sequences)",
                           lambda: self.waiting)  # fmt: skip
        self.metrics.family("replica_load", "Generations pinned to each stage replica", self._replica_samples("load"))
        self.metrics.family("replica_service_ms", "Measured forward ms per step of each stage replica",
                            self._replica_samples("service_ms"))  # fmt: skip
        self.metrics.family("route_predicted_ms", "Predicted ms of a step on each path, queueing included",
                            self._path_samples)  # fmt: skip
        self.metrics.family(
            "route_chosen",
            "Generations pinned to each path so far",
            lambda: {(("path", _path_label(p)),): float(n) for p, n in self.routing.chosen.items()},
        )

    def _replica_samples(self, field: str) -> Any:
        def read() -> dict:
            samples = {}
            for stage, replicas in enumerate(self.routing.replicas):
                for index, replica in enumerate(replicas):
                    labels = (("stage", str(stage)), ("replica", str(index)), ("url", replica.url))
                    samples[labels] = float(getattr(replica, field) or 0)
            return samples

        return read

    def _path_samples(self) -> dict:
        paths = itertools.islice(self.routing.paths(), 64)
        return {(("path", _path_label(path)),): self.routing.predict_ms(path) for path in paths}

    def bind(self, own_url: str) -> None:
        """Called once the server listens: results come back to ``public_url`` or our own address."""
        assert self.http is not None
        reply = (self.settings.public_url or own_url).rstrip("/") + RESULT_PATH
        self.pipeline = PipelineClient(
            len(self.settings.stages),
            reply,
            self.http,
            self.results,
            self.settings.step_timeout,
            relay=self.settings.relay,
            relay_hops=self.settings.relay_hops,
        )
        self.batcher = MicroBatcher(self.pipeline, self.routing, self.settings.micro_batch, self.settings.max_in_flight)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def prompt_ids(self, request: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(request, ChatCompletionRequest):
            if not self.tokenizer.chat_template:
                raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(encoded["input_ids"])
        if isinstance(request.prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in request.prompt):
                raise ApiError(400, f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
            return list(request.prompt)
        return list(self.tokenizer(request.prompt)["input_ids"])

    def check_model(self, name: str) -> None:
        if name != self.settings.served_model_name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist. This gateway serves `{self.settings.served_model_name}`.",
                code="model_not_found",
                param="model",
            )

    def budget(self, prompt: list[int], asked: int | None) -> int:
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = self.max_model_len - len(prompt)
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(prompt) + (asked or 0)} tokens ({len(prompt)} in the prompt, "
                f"{asked or 0} for the completion).",
                code="context_length_exceeded",
                param="max_tokens",
            )
        return asked if asked is not None else room

    @property
    def stage_urls(self) -> list[str]:
        """Every stage replica's URL, in layer order."""
        return [url for replicas in self.settings.stages for url in replicas]

    async def adopt_stage_settings(self) -> None:
        """Fit what the gateway assumes to what its stages say in /info, once all of them answer.

        The micro-batch is capped at the smallest a stage was planned for: a stage refuses larger
        steps, and a gateway started by hand with a larger --micro-batch would have every full
        step refused and retried row by row. Kept sessions are offered as fork sources only while
        younger than the shortest idle time-out of the stages (which close them after it).
        """
        assert self.http is not None and self.batcher is not None
        if self._stage_settings_known:
            return

        async def info(url: str) -> dict:
            async with self.http.get(f"{url}/info", timeout=aiohttp.ClientTimeout(total=5)) as reply:
                return await reply.json() if reply.ok else {}

        try:
            infos = await asyncio.gather(*(info(url) for url in self.stage_urls))
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return  # a stage is not up yet: ask again with the next request
        self._stage_settings_known = True
        limits = [i["micro_batch"] for i in infos if i.get("micro_batch")]
        if limits and min(limits) < self.batcher.micro_batch:
            log.warning("--micro-batch %d is larger than a stage's planned %d; using %d", self.batcher.micro_batch,
                        min(limits), min(limits))  # fmt: skip
            self.batcher.micro_batch = self.routing.micro_batch = min(limits)
        timeouts = [i["session_timeout_s"] for i in infos if i.get("session_timeout_s")]
        if timeouts:
            self.prefixes.max_idle_s = 0.8 * min(timeouts)  # a margin for the stages' sweep and clock drift

    @contextlib.asynccontextmanager
    async def _seat(self) -> AsyncIterator[None]:
        """Holds one of ``max_sequences`` seats for a generation, waiting for one first."""
        if self.seats is None:
            yield
            return
        self.waiting += 1
        try:
            await self.seats.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.seats.release()

    async def run(
        self, request: CompletionRequest | ChatCompletionRequest, prompt: list[int], max_tokens: int, result: Generated
    ) -> AsyncIterator[str]:
        assert self.batcher is not None
        async with self._seat():
            await self.adopt_stage_settings()
            assembler = TextAssembler(self.decode, request.stop_strings())
            eos = set() if request.ignore_eos else self.eos_ids
            started = time.perf_counter()
            speculation = Speculation(self.settings.draft, DraftLength(self.settings.draft_max), self.drafter,
                                      self.draft_executor)  # fmt: skip
            sampling = request.sampling_params()
            async for piece in generate(
                self.batcher, prompt, max_tokens, sampling, eos, assembler, result, speculation, self.prefixes
            ):
                yield piece
            self._count(speculation, result, time.perf_counter() - started)

    def _count(self, speculation: Speculation, result: Generated, seconds: float) -> None:
        length = speculation.length
        self.metrics.inc("rounds_total", "Pipeline round trips of generations", speculation.rounds)
        self.metrics.inc("draft_proposed_total", "Drafted tokens sent for verification", length.proposed)
        self.metrics.inc("draft_accepted_total", "Drafted tokens the model agreed with", length.accepted)
        self.metrics.inc("requests_total", "Finished generations", finish_reason=result.finish_reason or "none")
        self.metrics.inc("generated_tokens_total", "Tokens generated", len(result.token_ids))
        self.metrics.inc("cached_prompt_tokens_total", "Prompt tokens copied from kept sessions, not computed",
                         result.cached_tokens)  # fmt: skip
        self.metrics.observe("generation_seconds", "Wall time per generation", seconds)


GATEWAY = web.AppKey("gateway", Gateway)


def _path_label(path: tuple[int, ...]) -> str:
    """A path as the replica index per stage, e.g. ``0.1.0``."""
    return ".".join(map(str, path))


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None


def _usage(prompt: list[int], result: Generated) -> dict:
    n = len(result.token_ids)
    cached = PromptTokensDetails(cached_tokens=result.cached_tokens)
    return Usage(prompt_tokens=len(prompt), completion_tokens=n, total_tokens=len(prompt) + n,
                 prompt_tokens_details=cached).model_dump()  # fmt: skip


async def _sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _send_event(response: web.StreamResponse, payload: dict | str) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())


async def handle_generation(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    chat = request.path.endswith("/chat/completions")
    body = await _parse(request, ChatCompletionRequest if chat else CompletionRequest)
    gateway.check_model(body.model)
    prompt = gateway.prompt_ids(body)
    max_tokens = gateway.budget(prompt, body.token_limit() if chat else body.max_tokens)
    request_id = new_id("chatcmpl" if chat else "cmpl")
    created = now()
    result = Generated()
    kind = "chat.completion" if chat else "text_completion"

    def choice(text: str | None, finish: str | None, delta: bool) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        message = {"role": "assistant", "content": text} if (text is not None or not delta) else {}
        return {"index": 0, key: message, "logprobs": None, "finish_reason": finish}

    def envelope(choices: list[dict], chunk: bool) -> dict:
        object_name = f"{kind}.chunk" if chat and chunk else kind
        return {"id": request_id, "object": object_name, "created": created, "model": body.model, "choices": choices}

    if not body.stream:
        try:
            async for _ in gateway.run(body, prompt, max_tokens, result):
                pass
        except PipelineError as error:
            raise ApiError(
                error.status, str(error), error_type(error.status), error.code
            ) from None
        text = (body.prompt if not chat and body.echo and isinstance(body.prompt, str) else "") + result.text
        reply = envelope([choice(text, result.finish_reason, delta=False)], chunk=False)
        reply["usage"] = _usage(prompt, result)
        if body.return_token_ids:
            reply["prompt_token_ids"] = prompt
            reply["choices"][0]["token_ids"] = result.token_ids
        return web.json_response(reply)

    response = await _sse(request)
    try:
        if chat:
            await _send_event(
                response,
                envelope(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    chunk=True,
                ),
            )
        async for piece in gateway.run(body, prompt, max_tokens, result):
            await _send_event(response, envelope([choice(piece, None, delta=True)], chunk=True))
        final = envelope([choice(None if chat else "", result.finish_reason, delta=True)], chunk=True)
        if body.return_token_ids:
            final["choices"][0]["token_ids"] = result.token_ids
        await _send_event(response, final)
        if body.stream_options and body.stream_options.include_usage:
            usage = envelope([], chunk=True)
            usage["usage"] = _usage(prompt, result)
            await _send_event(response, usage)
    except PipelineError as error:  # mid-stream: the error goes out as a data line before [DONE]
        await _send_event(response, error_body(str(error), error.code, type_="server_error"))
    await _send_event(response, "[DONE]")
    await response.write_eof()
    return response


async def handle_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    card = ModelCard(id=gateway.settings.served_model_name, max_model_len=gateway.max_model_len)
    return web.json_response({"object": "list", "data": [card.model_dump()]})


async def handle_forward(request: web.Request) -> web.Response:
    """A hop the planner routes through the gateway: pass the frame on to the next URL of its route."""
    gateway = request.app[GATEWAY]
    assert gateway.http is not None
    try:
        frame = decode_frame(await request.read())
        meta = StepMeta.model_validate(frame.meta)
    except (WireError, ValidationError) as error:
        return web.json_response(error_body(f"forwarded frame: {error}", ErrorCode.INVALID_FRAME), status=400)
    url = meta.next_url
    if url is None:
        code = ErrorCode.INVALID_FRAME
        return web.json_response(error_body("forwarded frame has no next hop", code), status=code.status)
    frame.meta = meta.onward().model_dump(mode="json")
    gateway.metrics.inc("forwarded_total", "Frames relayed through the gateway between stages")
    try:
        async with gateway.http.post(url + STEP_PATH, data=encode_frame(frame, frame.codec)) as reply:
            return web.Response(status=reply.status, body=await reply.read(), content_type=reply.content_type)
    except aiohttp.ClientError as error:  # the stage that sent the frame reports this reason to the gateway
        code = ErrorCode.STAGE_UNREACHABLE
        return web.json_response(error_body(f"gateway could not forward to {url}: {error}", code), status=code.status)


async def handle_result(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    try:
        frame = decode_frame(await request.read())
        delivered = gateway.results.deliver(frame)
    except (WireError, ValidationError) as error:
        return web.json_response(error_body(f"result frame: {error}", ErrorCode.INVALID_FRAME), status=400)
    return web.json_response({"delivered": delivered})


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return web.json_response(
            error_body(error.reason, str(error.status), type_=error_type(error.status)), status=error.status
        )
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return web.json_response(error_body("internal error in the gateway", ErrorCode.INTERNAL_ERROR), status=500)


def _auth_middleware(api_key: str | None) -> Any:
    @web.middleware
    async def check_key(request: web.Request, handler: Any) -> web.StreamResponse:
        authorised = request.headers.get("Authorization", "") == f"Bearer {api_key}"
        if api_key and request.path.startswith("/v1/") and not authorised:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return await handler(request)

    return check_key


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, _auth_middleware(gateway.settings.api_key)], client_max_size=64 << 20
    )
    app[GATEWAY] = gateway

    async def lifecycle(app: web.Application):
        gateway.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=gateway.settings.step_timeout))
        yield
        if gateway.batcher is not None:
            await gateway.batcher.stop()
        await gateway.http.close()

    app.cleanup_ctx.append(lifecycle)

    async def readyz(_: web.Request) -> web.Response:
        assert gateway.http is not None

        async def ready(url: str) -> bool:
            try:
                async with gateway.http.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=3)) as reply:
                    return reply.status == 200
            except (TimeoutError, aiohttp.ClientError):
                return False

        states = await asyncio.gather(*(ready(url) for url in gateway.stage_urls))
        body = {"ready": all(states), "stages": dict(zip(gateway.stage_urls, states, strict=True))}
        return web.json_response(body, status=200 if all(states) else 503)

    add_common_routes(app, gateway.metrics, readyz)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/completions", handle_generation)
    app.router.add_post("/v1/chat/completions", handle_generation)
    app.router.add_post(RESULT_PATH, handle_result)
    app.router.add_post(STEP_PATH, handle_forward)
    return app


def load_drafter(kind: str, model_dir: Path, layers: int | None, source: str | None,
                 vocab: int) -> ModelDrafter | None:  # fmt: skip
    """The draft model a kind needs: the target's first ``layers`` layers plus its head, or a small model."""
    if kind == "early-exit":
        total = int(read_config(model_dir)["num_hidden_layers"])
        if layers is None or not 1 <= layers < total:
            raise ValueError(f"--draft early-exit needs --draft-layers between 1 and {total - 1}")
        model = StageModel(model_dir, Span(0, layers, total), head=True)
    elif kind == "model":
        if not source:
            raise ValueError("--draft model needs --draft-model SOURCE")
        draft_dir = prepare_model(source)
        total = int(read_config(draft_dir)["num_hidden_layers"])
        model = StageModel(draft_dir, Span(0, total, total))
        if int(model.config.vocab_size) < vocab:
            raise ValueError(f"draft model {source!r} has {model.config.vocab_size} tokens; the model has {vocab}: "
                             "a draft model must share the tokenizer")  # fmt: skip
    else:
        return None
    log.info("draft %s: %d layers loaded in %.1f s", kind, model.span.length, model.load_seconds)
    return ModelDrafter(model, kind)


def main(argv: list[str] | None = None) -> None:
    launch = GatewayLaunch.parse(argv)
    setup_logging(launch.log_level)
    from transformers import AutoTokenizer

    try:
        model_dir = prepare_model(launch.model)
    except ModelSourceError as error:
        raise SystemExit(f"error: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        drafter = load_drafter(launch.draft, model_dir, launch.draft_layers, launch.draft_model, len(tokenizer))
    except (ModelSourceError, SpanError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    gateway = Gateway(tokenizer, read_config(model_dir), launch, drafter)
    asyncio.run(serve(create_app(gateway), launch.host, launch.port, launch.ready_file, "gateway", gateway.bind))
