"""What the API accepts and answers: every OpenAI request, response and stream chunk.

Fields follow the order of OpenAI's reference. Extensions borrowed from vLLM: ``ignore_eos``
(keep going past end-of-sequence, for benchmarks) and ``return_token_ids`` (the prompt's and the
completion's token ids, for exactness checks); they appear in a response only when asked for.
The HTTP layer (``app.py``) builds these; the engine (``engine.py``) never sees them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from bloombee_stage.wire.messages import SamplingParams


class OpenAIBase(BaseModel):
    # Unknown fields are ignored rather than refused: clients send many optional ones.
    model_config = ConfigDict(extra="ignore")


class ChatMessage(OpenAIBase):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class StreamOptions(OpenAIBase):
    include_usage: bool = False


class _GenerationRequest(OpenAIBase):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them (text parts only)."""
        return [{"role": message.role, "content": message.text()} for message in self.messages]


class ResponseBase(BaseModel):
    """A response body: fields OpenAI defines are always present (``null`` included); the
    extensions in ``optional`` only when they hold something."""

    optional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unset_extensions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if key not in self.optional or value is not None}


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV was copied from an earlier generation, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "bloombee"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(ResponseBase):
    optional: ClassVar[frozenset[str]] = frozenset({"token_ids"})

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class CompletionResponse(ResponseBase):
    """A completion, or one chunk of a streamed one (OpenAI uses the same object for both)."""

    optional: ClassVar[frozenset[str]] = frozenset({"usage", "prompt_token_ids"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatCompletionChoice(ResponseBase):
    optional: ClassVar[frozenset[str]] = frozenset({"token_ids"})

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(ResponseBase):
    optional: ClassVar[frozenset[str]] = frozenset({"prompt_token_ids"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class DeltaMessage(ResponseBase):
    """What a stream chunk adds to the message: nothing in the last chunk."""

    optional: ClassVar[frozenset[str]] = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(ResponseBase):
    optional: ClassVar[frozenset[str]] = frozenset({"token_ids"})

    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(ResponseBase):
    optional: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None
