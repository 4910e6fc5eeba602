"""What the API accepts and answers: every OpenAI request, response and stream chunk.

Fields follow the order of OpenAI's reference, then vLLM's sampling extensions (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``return_token_ids``). Nothing is silently ignored: a field this server does not implement
(tools, structured output, ...) is refused with a 400 naming it when it asks for something, and
a field nobody defines is refused too (``extra="forbid"``). Fields that change nothing about the
answer by definition (``user``, ``metadata``, ``store``, ...) are accepted.
The HTTP layer (``app.py``) builds these; the engine (``engine.py``) never sees them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from bloombee_stage.wire.messages import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams

MAX_CHOICES = 16  # n: independent answers to one prompt
MAX_PROMPTS = 64  # prompts in one completions request


class FieldError(ValueError):
    """A request whose ``field`` is wrong in a way only the whole request shows."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unsupported(FieldError):
    """A request field this server knows but does not implement, set to something that asks for it."""


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # field -> (the values that ask for nothing, why it is refused otherwise)
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, (harmless, why) in cls.unsupported.items():
                if name in data and data[name] not in harmless:
                    raise Unsupported(name, f"`{name}` is not supported by this server: {why}")
            data = {key: value for key, value in data.items() if key not in cls.unsupported}
        return data


_TOOLS = "tools and function calling are not implemented yet; describe the tool in the prompt instead"
_STRUCTURED = "structured output (JSON mode, schemas, grammars) is not implemented yet"
_ALWAYS_NULL: tuple[Any, ...] = (None,)


class ChatMessage(OpenAIBase):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "name": (_ALWAYS_NULL, "participant names are not passed to the chat template"),
        "tool_calls": ((None, []), _TOOLS),
        "tool_call_id": (_ALWAYS_NULL, _TOOLS),
        "function_call": (_ALWAYS_NULL, _TOOLS),
        "refusal": (_ALWAYS_NULL, "refusals are not passed to the chat template"),
        "audio": (_ALWAYS_NULL, "this model reads text only"),
    }

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[dict] | None) -> str | list[dict] | None:
        for index, part in enumerate(value if isinstance(value, list) else []):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {index} is of type {str(part.get('type'))[:40]!r}; this model reads text "
                                 "parts only ({'type': 'text', 'text': ...})")  # fmt: skip
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as a chat template takes them."""
    return [{"role": message.role, "content": message.text()} for message in messages]


class StreamOptions(OpenAIBase):
    include_usage: bool = False
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "continuous_usage_stats": ((False, None), "usage is reported once, in the last chunk")}


class _GenerationRequest(OpenAIBase):
    model: str
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Accepted, and by definition without effect on the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0: all tokens")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    ignore_eos: bool = False
    return_token_ids: bool = False

    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "guided_json": (_ALWAYS_NULL, _STRUCTURED),
        "guided_regex": (_ALWAYS_NULL, _STRUCTURED),
        "guided_choice": (_ALWAYS_NULL, _STRUCTURED),
        "guided_grammar": (_ALWAYS_NULL, _STRUCTURED),
        "structured_outputs": (_ALWAYS_NULL, _STRUCTURED),
        "use_beam_search": ((None, False), "beam search is not implemented"),
        "length_penalty": ((None, 1, 1.0), "length_penalty applies to beam search, which is not implemented"),
        "include_stop_str_in_output": ((None, False), "stop strings are always left out of the output"),
        "skip_special_tokens": ((None, True), "special tokens are always left out of the text"),
        "prompt_logprobs": (_ALWAYS_NULL, "use `echo` with `logprobs` on /v1/completions for the prompt's logprobs"),
        "truncate_prompt_tokens": (_ALWAYS_NULL, "prompts are never truncated; a long one gets a 400"),
    }

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value and any(not -100.0 <= bias <= 100.0 for bias in value.values()):
            raise ValueError("biases must lie in [-100, 100]")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per generated token whose logprobs the answer carries (None: no logprobs)."""
        raise NotImplementedError

    def sampling_params(self, choice: int = 0) -> SamplingParams:
        """The last stage's parameters for answer ``choice`` (with a seed, answer i draws with seed + i,
        so n answers differ and each is reproducible)."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, seed=None if self.seed is None else self.seed + choice,
            top_k=max(0, self.top_k or 0), min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=sorted((self.logit_bias or {}).items()), logprobs=self.top_logprobs_asked(),
        )


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(union_mode="left_to_right")
    best_of: int | None = Field(default=None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of", "`best_of` other than `n` is not supported by this server: every answer "
                                         "generated is returned (ask for n answers and rank them by their logprobs)")
        if self.suffix:
            raise Unsupported("suffix", "`suffix` is not supported by this server: the model has no fill-in-the-"
                                        "middle training")  # fmt: skip
        if isinstance(self.prompt, list) and not self.prompt:
            raise FieldError("prompt", "prompt: an empty list")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)) and len(self.prompt) > MAX_PROMPTS:
            raise FieldError("prompt", f"prompt: at most {MAX_PROMPTS} prompts in one request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string or token list, or several."""
        if isinstance(self.prompt, str) or not isinstance(self.prompt[0], (str, list)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    modalities: list[Literal["text"]] | None = None
    parallel_tool_calls: bool | None = None  # concerns tool calls, which are refused
    response_format: dict | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **_GenerationRequest.unsupported,
        "tools": ((None, []), _TOOLS),
        "tool_choice": ((None, "none"), _TOOLS),
        "functions": ((None, []), _TOOLS),
        "function_call": ((None, "none"), _TOOLS),
        "audio": (_ALWAYS_NULL, "this model answers in text only"),
        "prediction": (_ALWAYS_NULL, "predicted outputs are not implemented; speculation drafts on its own"),
        "reasoning_effort": (_ALWAYS_NULL, "this model does not reason in a separate channel"),
        "verbosity": (_ALWAYS_NULL, "this model has no verbosity setting"),
        "web_search_options": (_ALWAYS_NULL, "this server does not search the web"),
        "echo": ((None, False), "echo the prompt through /v1/completions"),
        "chat_template_kwargs": ((None, {}), "the model's chat template is used as it is"),
        "continue_final_message": ((None, False), "a reply always starts a new assistant message"),
        "add_generation_prompt": ((None, True), "a reply always starts a new assistant message"),
    }

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise Unsupported("response_format", f"`response_format` of type "
                                                 f"{str(self.response_format.get('type'))[:40]!r} is not supported "
                                                 f"by this server: {_STRUCTURED}")  # fmt: skip
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs: needs `logprobs: true`")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return conversation(self.messages)


class TokenizeRequest(OpenAIBase):
    """vLLM's ``/tokenize`` of a completion prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBase):
    """vLLM's ``/tokenize`` of a conversation, under the model's chat template."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def conversation(self) -> list[dict[str, str]]:
        return conversation(self.messages)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int]


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, ``None`` for a first prompt token (nothing predicts it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseBase):
    optional: ClassVar[frozenset[str]] = frozenset({"token_ids", "prompt_token_ids"})

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


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
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
