"""What the API accepts: every OpenAI (and vLLM) request, checked field by field.

Fields follow the order of OpenAI's reference, then vLLM's extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``return_token_ids``,
``guided_*``). Nothing is silently ignored: a field this server knows but does not implement is
refused with a 400 naming it when it asks for something, and a field nobody defines is refused
too (``extra="forbid"``). Fields that change nothing about the answer by definition (``user``,
``metadata``, ``store``, ...) are accepted. The answers are in ``responses.py``; the HTTP layer
(``app.py``) builds both; the engine (``engine.py``) never sees them.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from bloombee_stage.gateway.tools import call_grammar, call_text, with_tools
from bloombee_stage.wire.messages import MAX_GRAMMAR_CHARS, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, Grammar, SamplingParams

STRUCTURED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "response_format")
MAX_CHOICES = 16  # n: independent answers to one prompt
MAX_PROMPTS = 64  # prompts in one completions request


# JSON as json.dumps writes it, on one line: a model left free to add whitespace (llguidance's
# default) may add nothing else until max_tokens.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_grammar(schema: dict[str, Any] | str, field: str) -> Grammar:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise FieldError(field, f"{field}: not JSON: {error}") from None
    if not isinstance(schema, dict):
        raise FieldError(field, f"{field}: a JSON schema is an object")
    text = json.dumps({**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}})
    if len(text) > MAX_GRAMMAR_CHARS:
        raise FieldError(field, f"{field}: a schema of at most {MAX_GRAMMAR_CHARS} characters")
    return Grammar(kind="json_schema", text=text)


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


_FUNCTIONS = "the deprecated `functions` API is not implemented; use `tools`"
_ALWAYS_NULL: tuple[Any, ...] = (None,)


class FunctionCall(OpenAIBase):
    name: str
    arguments: str = ""


class ToolCall(OpenAIBase):
    index: int | None = None  # its place in a stream's deltas, when a client sends a streamed call back
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBase):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "name": (_ALWAYS_NULL, "participant names are not passed to the chat template"),
        "function_call": (_ALWAYS_NULL, _FUNCTIONS),
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
        parts = self.content if isinstance(self.content, list) else [{"text": self.content or ""}]
        text = "".join(part["text"] for part in parts)
        calls = [call_text(call.function.name, call.function.arguments) for call in self.tool_calls or []]
        return "\n".join(part for part in (text, *calls) if part)


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as a chat template takes them."""
    return [{"role": message.role, "content": message.text()} for message in messages]


class StreamOptions(OpenAIBase):
    include_usage: bool = False
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "continuous_usage_stats": ((False, None), "usage is reported once, in the last chunk")}


class ToolFunctionDefinition(OpenAIBase):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the schema when a call is required


class ToolDefinition(OpenAIBase):
    type: Literal["function"] = "function"
    function: ToolFunctionDefinition


class _NamedFunction(OpenAIBase):
    name: str


class NamedToolChoice(OpenAIBase):
    type: Literal["function"] = "function"
    function: _NamedFunction


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
    # Structured output (one at a time): OpenAI's response_format, or vLLM's guided decoding.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[str] | None = Field(default=None, min_length=1, max_length=256)
    guided_grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS)

    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "structured_outputs": (_ALWAYS_NULL, "use response_format or guided_json / guided_regex / guided_choice / "
                                             "guided_grammar"),
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

    def _structure_fields(self) -> list[str]:
        """The structured-output fields this request sets (``response_format: text`` sets none)."""
        asked = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if "response_format" in asked and self.response_format.get("type") == "text":  # type: ignore[union-attr]
            asked.remove("response_format")
        return asked

    def structure_field(self) -> str | None:
        """The field ``grammar()`` comes from, for an error that names it."""
        asked = self._structure_fields()
        return asked[0] if asked else None

    @model_validator(mode="after")
    def _one_structure(self) -> _GenerationRequest:
        asked = self._structure_fields()
        if len(asked) > 1:
            raise FieldError(asked[1], f"{asked[1]}: at most one structured-output constraint per request "
                                       f"(also given: {asked[0]})")  # fmt: skip
        if asked and self.ignore_eos:
            raise FieldError("ignore_eos", "ignore_eos: a structured answer ends where its grammar ends")
        self.grammar()  # a malformed response_format is refused here, naming it
        return self

    def grammar(self) -> Grammar | None:
        """The structure the answer must have, as the last stage enforces it (None: free text)."""
        if self.guided_json is not None:
            return _json_grammar(self.guided_json, "guided_json")
        if self.guided_regex is not None:
            return Grammar(kind="regex", text=self.guided_regex)
        if self.guided_choice is not None:
            choices = " | ".join(json.dumps(choice) for choice in self.guided_choice)  # Lark string literals
            return Grammar(kind="lark", text=f"start: {choices}")
        if self.guided_grammar is not None:
            return Grammar(kind="lark", text=self.guided_grammar)
        if self.response_format is None:
            return None
        kind = self.response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return _json_grammar({"type": "object"}, "response_format")
        if kind == "json_schema":
            spec = self.response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise FieldError("response_format", "response_format: json_schema needs {\"name\": ..., \"schema\": "
                                                    "{...}}")  # fmt: skip
            return _json_grammar(spec.get("schema", {}), "response_format")
        raise FieldError("response_format", f"response_format: type {str(kind)[:40]!r} is not one of text, "
                                            "json_object, json_schema")  # fmt: skip

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
            grammar=self.grammar(),
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
    parallel_tool_calls: bool | None = None  # accepted: an answer holds at most one call either way
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    unsupported: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **_GenerationRequest.unsupported,
        "functions": ((None, []), _FUNCTIONS),
        "function_call": ((None, "none"), _FUNCTIONS),
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
        forcing = self.tool_choice not in (None, "none", "auto")
        if forcing and not self.tools:
            raise FieldError("tool_choice", "tool_choice: a call is required but `tools` names none")
        if isinstance(self.tool_choice, NamedToolChoice) and not self.forced_tools():
            raise FieldError("tool_choice", f"tool_choice: no tool named {self.tool_choice.function.name!r}")
        if forcing and super().grammar() is not None:
            raise FieldError("tool_choice", "tool_choice: a required call already fixes the answer's structure; "
                                            "drop response_format / guided_*")  # fmt: skip
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs: needs `logprobs: true`")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def active_tools(self) -> list[dict[str, Any]]:
        """The tools the model is told about (none when ``tool_choice`` is ``none``)."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools]

    def forced_tools(self) -> list[dict[str, Any]]:
        """The tools the answer must call one of (``required``, or the one named); none: free."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [tool for tool in self.active_tools() if tool["name"] == self.tool_choice.function.name]
        return self.active_tools() if self.tool_choice == "required" else []

    def grammar(self) -> Grammar | None:
        forced = self.forced_tools()
        return call_grammar(forced, JSON_LAYOUT) if forced else super().grammar()

    def structure_field(self) -> str | None:
        return "tools" if self.forced_tools() else super().structure_field()

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        tools = self.active_tools()
        return with_tools(conversation(self.messages), tools) if tools else conversation(self.messages)


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


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int]
