"""The inference protocol's messages, shared by the stage server and the gateway.

One step = one frame POSTed to ``/v1/step`` of the first stage. Its metadata (StepMeta) travels
with the hidden states from stage to stage: each stage pops itself off ``route`` and pushes its
output straight to the next URL; the last stage POSTs a ResultMeta frame (token ids) to
``reply_to``. Without ``reply_to`` the stage answers inline in the HTTP response instead: that is
the client-relays-every-hop mode Petals uses, kept as the benchmarks' baseline.

Sessions are implicit: a step with ``start == 0`` opens (or resets) one; any step first cuts
the session's KV cache back to ``start`` tokens, so a rollback rides on the next step for free
(``/v1/sessions/{id}/rollback`` does it explicitly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from bloombee_stage.sampling import SamplingParams

if TYPE_CHECKING:
    from aiohttp import ClientResponse

STEP_PATH = "/v1/step"
RESULT_PATH = "/internal/v1/results"
CODECS_PATH = "/v1/codecs"  # GET: {"codecs": [names this process decodes]}; asked once per peer at session open


class StepMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0)
    start: int = Field(ge=0, description="tokens the session's cache must hold before this step")
    route: list[str] = Field(default_factory=list, description="base URLs of the stages after this one")
    reply_to: str | None = Field(default=None, description="where the last stage sends the result")
    keep: int = Field(default=1, ge=1, description="positions whose next token the last stage returns")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    max_length: int | None = Field(default=None, ge=1, description="tokens the session may reach")


class ResultMeta(BaseModel):
    """Metadata of a result frame: token ids [batch, keep] on success, an empty tensor and error otherwise."""

    session: str
    step: int
    error: str | None = None
    code: str | None = None
    stage: str | None = None


def error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict:
    """OpenAI's error shape, used by every HTTP endpoint in BloomBee."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def read_error(reply: ClientResponse, default_code: str) -> tuple[str, str]:
    """(message, code) of a peer's error reply: OpenAI's shape when it is that, else the start of the body."""
    try:
        error = (await reply.json())["error"]
        return error["message"], error.get("code") or default_code
    except Exception:
        return (await reply.text())[:500], default_code
