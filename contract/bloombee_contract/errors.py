"""Error codes with their HTTP status, in one table, and OpenAI's error shape.

A stage answers a peer with the status of its code; the gateway answers a client with the status
of the code a stage reported, so a client sees the same status for the same cause wherever it
arose. ``type`` follows OpenAI: ``invalid_request_error`` for 4xx, ``server_error`` for 5xx.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # The request itself (4xx): retrying the same request cannot help.
    INVALID_REQUEST = "invalid_request"
    INVALID_BODY = "invalid_body"
    INVALID_FRAME = "invalid_frame"
    INVALID_META = "invalid_meta"
    INVALID_API_KEY = "invalid_api_key"
    UNAUTHENTICATED = "unauthenticated"  # a peer path called without this deployment's certificate
    FORBIDDEN = "forbidden"  # a part of the deployment calling a path that is not for it
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNKNOWN_SESSION = "unknown_session"
    FORK_SOURCE_GONE = "fork_source_gone"
    POSITION_GAP = "position_gap"
    BAD_ROLLBACK = "bad_rollback"
    BODY_TOO_LARGE = "body_too_large"
    OVERLOADED = "overloaded"  # the gateway's queue is full: try again after Retry-After seconds
    # The pipeline (5xx): another try, or another path, may succeed.
    KV_BUDGET_EXCEEDED = "kv_budget_exceeded"
    STAGE_UNREACHABLE = "stage_unreachable"
    STAGE_FAILED = "stage_failed"
    STAGE_REFUSED = "stage_refused"
    WRONG_SPAN = "wrong_span"  # a step reached a stage whose layers do not start where the route left off (a new plan)
    WRONG_PLAN = "wrong_plan"  # a step routed for one plan reached a stage of another (a plan switch)
    BAD_RESULT = "bad_result"
    PIPELINE_FAILED = "pipeline_failed"
    PIPELINE_TIMEOUT = "pipeline_timeout"
    GATEWAY_ERROR = "gateway_error"
    INTERNAL_ERROR = "internal_error"

    @property
    def status(self) -> int:
        return HTTP_STATUS[self]

    @property
    def type(self) -> str:
        return error_type(self.status)


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_BODY: 400,
    ErrorCode.INVALID_FRAME: 400,
    ErrorCode.INVALID_META: 400,
    ErrorCode.INVALID_API_KEY: 401,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.FORK_SOURCE_GONE: 404,
    ErrorCode.POSITION_GAP: 409,
    ErrorCode.BAD_ROLLBACK: 400,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    # Full KV budgets heal when other sessions finish: "try again later", not "the server broke".
    ErrorCode.KV_BUDGET_EXCEEDED: 503,
    ErrorCode.STAGE_UNREACHABLE: 503,
    ErrorCode.STAGE_FAILED: 502,
    ErrorCode.STAGE_REFUSED: 502,
    # The deployment is changing plans: the route the step took mixes the old plan's stages with the new one's.
    ErrorCode.WRONG_SPAN: 503,
    ErrorCode.WRONG_PLAN: 503,
    ErrorCode.BAD_RESULT: 502,
    ErrorCode.PIPELINE_FAILED: 502,
    ErrorCode.PIPELINE_TIMEOUT: 504,
    ErrorCode.GATEWAY_ERROR: 500,
    ErrorCode.INTERNAL_ERROR: 500,
}


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def status_of(code: str | None, default: int = 502) -> int:
    """The HTTP status of a code a peer reported; ``default`` for a code this version does not know."""
    try:
        return ErrorCode(code).status
    except ValueError:
        return default


def error_body(message: str, code: ErrorCode | str | None = None, param: str | None = None,
               type_: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error shape, used by every HTTP endpoint in BloomBee; ``type`` follows the code's status."""
    name = code.value if isinstance(code, ErrorCode) else code
    if type_ is None:
        type_ = error_type(status_of(name, 400)) if name is not None else "invalid_request_error"
    return {"error": {"message": message, "type": type_, "param": param, "code": name}}
