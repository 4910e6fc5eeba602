"""What every route of the gateway shares: where its engine is, and how a body becomes a request
model or a 400 that names the field at fault."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from bloombee_contract.errors import ErrorCode
from pydantic import BaseModel, ValidationError

from bloombee_stage.gateway.engine import GenerationEngine, RequestError
from bloombee_stage.gateway.protocol import (
    FieldError,
)

ENGINE = web.AppKey("engine", GenerationEngine)
_Body = TypeVar("_Body", bound=BaseModel)


async def json_object(request: web.Request) -> dict:
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("request body is not valid JSON", ErrorCode.INVALID_REQUEST) from None
    if not isinstance(payload, dict):
        raise RequestError("request body must be a JSON object", ErrorCode.INVALID_REQUEST)
    return payload


async def parse_body(request: web.Request, model: type[_Body]) -> _Body:
    payload = await json_object(request)
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise request_error(error) from None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list"})


def request_error(error: ValidationError) -> RequestError:
    """A 400 whose ``param`` names the field at fault (``messages.0.content``), not pydantic's
    union tags (``prompt.list[int]``), and whose message says what to change."""
    first = error.errors()[0]
    field: list[str] = []
    for part in first["loc"]:
        if not isinstance(part, int) and (not part.isidentifier() or part in _TYPE_TAGS):
            break
        field.append(str(part))
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        field.append(cause.field)
    where = ".".join(field)
    if isinstance(cause, ValueError):
        message = str(cause)
    elif first["type"] == "extra_forbidden":
        message = "unknown field (neither OpenAI's nor one of vLLM's extensions this server implements)"
    elif len(field) < len(first["loc"]):
        message = f"not one of the accepted forms ({first['msg']})"
    else:
        message = first["msg"]
    prefix = f"{where}: " if where and not isinstance(cause, FieldError) else ""
    return RequestError(prefix + message, ErrorCode.INVALID_REQUEST, where or None)
