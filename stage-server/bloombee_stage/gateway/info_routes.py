"""The gateway's routes besides generation: its model's card, and vLLM's ``/tokenize``,
``/detokenize``, ``/health`` and ``/version``."""

from __future__ import annotations

from functools import partial
from importlib.metadata import version as package_version

from aiohttp import web

from bloombee_stage.gateway.engine import GenerationEngine
from bloombee_stage.gateway.http_base import ENGINE, json_object, parse_body
from bloombee_stage.gateway.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from bloombee_stage.gateway.responses import (
    ModelCard,
    ModelList,
    TokenizeResponse,
)


def _model_card(engine: GenerationEngine) -> ModelCard:
    return ModelCard(id=engine.settings.served_model_name, max_model_len=engine.max_model_len)


async def handle_models(request: web.Request) -> web.Response:
    return web.json_response(ModelList(data=[_model_card(request.app[ENGINE])]).model_dump())


async def handle_model(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.check_model(request.match_info["model"])
    return web.json_response(_model_card(engine).model_dump())


async def handle_health(_: web.Request) -> web.Response:
    """vLLM's liveness answer: 200, empty (``/readyz`` says whether the stages can serve)."""
    return web.Response(status=200)


async def handle_version(_: web.Request) -> web.Response:
    return web.json_response({"version": package_version("bloombee")})


async def handle_tokenize(request: web.Request) -> web.Response:
    """vLLM's ``/tokenize``: a prompt, or messages under the chat template."""
    engine = request.app[ENGINE]
    chat = "messages" in await json_object(request)
    body = await parse_body(request, TokenizeChatRequest if chat else TokenizeRequest)
    if body.model is not None:
        engine.check_model(body.model)
    if isinstance(body, TokenizeChatRequest):
        ids = await engine.tokenized(partial(engine.chat_prompt, add_generation_prompt=body.add_generation_prompt),
                                     body.conversation())  # fmt: skip
    else:
        ids = await engine.tokenized(partial(engine.text_prompt, add_special_tokens=body.add_special_tokens),
                                     body.prompt)  # fmt: skip
    strings = [engine.token_text(token) for token in ids] if body.return_token_strs else None
    reply = TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strings)
    return web.json_response(reply.model_dump(exclude_none=True))


async def handle_detokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await parse_body(request, DetokenizeRequest)
    if body.model is not None:
        engine.check_model(body.model)
    engine.check_token_ids(body.tokens, "tokens")
    return web.json_response({"prompt": await engine.tokenized(engine.decode, body.tokens)})


def add_info_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model}", handle_model)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/version", handle_version)
    app.router.add_post("/tokenize", handle_tokenize)
    app.router.add_post("/detokenize", handle_detokenize)
