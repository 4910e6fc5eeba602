"""The gateway's middleware: a request's id and access-log line, the API key, errors in OpenAI's shape."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from bloombee_contract.errors import ErrorCode

from bloombee_stage.gateway.choices import usage
from bloombee_stage.gateway.engine import RequestError
from bloombee_stage.gateway.pipeline import PipelineError
from bloombee_stage.gateway.responses import (
    new_id,
)
from bloombee_stage.serving.process import REQUEST_ID, error_response

log = logging.getLogger("bloombee.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_KEY, ANSWER_KEY = "bloombee.request_id", "bloombee.answer"  # a request's id; its prompts and choices
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
API_PATHS = ("/v1/", "/tokenize", "/detokenize")  # the model's API: what --api-key guards and the access log records


class ClientGone(Exception):
    """The client closed its connection before its (non-streaming) answer was ready."""


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


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request has an id (the client's ``X-Request-Id`` when it sends a sane one): echoed in the
    response, on every log line logged while serving it, and on its one access-log line."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if 0 < len(given) <= MAX_REQUEST_ID and given.isprintable() else new_id("req")
    request[REQUEST_KEY] = request_id
    reset = REQUEST_ID.set(request_id)
    started, status = time.monotonic(), 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        _access_log(request, status, started)
        REQUEST_ID.reset(reset)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_KEY in request:  # set before the headers go out, streams included
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_KEY]


def _access_log(request: web.Request, status: int, started: float) -> None:
    """One line per API request: status, tokens in and out, time to first token, duration, finish reasons."""
    if not request.path.startswith(API_PATHS):
        return
    seconds = time.monotonic() - started
    answer = request.get(ANSWER_KEY)
    if answer is None:
        log.info("%s %s %d in %.3f s", request.method, request.path, status, seconds)
        return
    prompts, choices = answer
    counted = usage(prompts, choices)
    firsts = [c.result.first_token_at for c in choices if c.result.first_token_at is not None]
    ttft = f"{min(firsts) - started:.3f} s" if firsts else "-"
    finish = ",".join(sorted({str(c.result.finish_reason) for c in choices}))
    log.info("%s %s %d prompt_tokens=%d completion_tokens=%d ttft=%s in %.3f s finish=%s", request.method,
             request.path, status, counted.prompt_tokens, counted.completion_tokens, ttft, seconds, finish)  # fmt: skip


def auth_middleware(api_key: str | None) -> Callable:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if api_key and request.path.startswith(API_PATHS) and not hmac.compare_digest(given, expected):
            raise RequestError("Incorrect API key provided.", ErrorCode.INVALID_API_KEY)
        return await handler(request)

    return check_key
