"""The inference protocol's messages, shared by the stage server and the gateway.

One step = one frame POSTed to ``/v1/step`` (``bloombee_contract.paths.STEP_PATH``) of the first
stage. A step is a micro-batch: row i
of the frame's tensor ([rows, positions] token ids, or [rows, positions, hidden] hidden states)
belongs to session ``rows[i].session`` and holds ``rows[i].length`` real positions, right-padded
to the longest row. Its metadata (StepMeta) travels with the hidden states from stage to stage:
each stage pops itself off ``route`` and pushes its output straight to the next URL; the last
stage POSTs a ResultMeta frame (the chosen tokens per row) to ``reply_to``. Without
``reply_to`` the stage answers inline in the HTTP response instead: that is the
client-relays-every-hop mode Petals uses, kept as the benchmarks' baseline.

Sessions are implicit: a row with ``start == 0`` opens (or resets) one; any row first cuts
its session's KV cache back to ``start`` tokens, so a rollback rides on the next step for free
(``/v1/sessions/{id}/rollback`` does it explicitly). A row with ``fork`` opens its session as a
copy of the first ``start`` positions of the fork's session on each stage, so a prompt prefix
computed before is not computed again. A row's last ``len(draft)`` positions are
drafted tokens: the last stage verifies them (``bloombee_stage.stage.verify``) and returns the accepted ones
plus one token of its own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_ROWS = 256  # rows (sessions) in one step
MAX_HOPS = 64  # stages a step may still visit: a route cannot loop a frame through a stage without end
UNPLANNED_ROWS = 64  # the most rows a step may carry where the plan sets no micro-batch
MAX_URL = 2048
MAX_LAYER = 1 << 16  # a layer index a step may name (models have a few hundred)


MAX_TOP_LOGPROBS = 20  # alternatives per position a result may carry (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # biased tokens per request (OpenAI's limit)
MAX_CONTEXT_TOKENS = 1 << 17  # token ids in one row's TokenContext (a context is far shorter)
MAX_FEATURE_POSITIONS = 64  # undrafted positions per row whose final hidden state a result may carry
MAX_DRAFT_TOKENS = 256  # drafted tokens (chain or tree) in one row


MAX_GRAMMAR_CHARS = 1 << 16


class Grammar(BaseModel):
    """Structured output: what the text must match (``model/grammar.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_schema", "regex", "lark"]
    text: str = Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)


class SamplingParams(BaseModel):
    """How the last stage picks a token (``model/sampling.py``); temperature 0 means greedy."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    top_k: int = Field(default=0, ge=0, description="keep the k likeliest tokens (0: all)")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p x the "
                         "likeliest")  # fmt: skip
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: list[tuple[int, float]] = Field(default_factory=list, max_length=MAX_LOGIT_BIAS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="return each chosen token's "
                                 "logprob and this many likeliest alternatives")  # fmt: skip
    grammar: Grammar | None = Field(default=None, description="the text must match this (structured output)")

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: list[tuple[int, float]]) -> list[tuple[int, float]]:
        if any(not -100.0 <= bias <= 100.0 for _, bias in value):
            raise ValueError("logit biases must lie in [-100, 100]")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the completion so far changes the logits (the row then carries a TokenContext)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class TokenContext(BaseModel):
    """What the last stage's logits processors need of a row's text so far; sent only when a
    processor needs it, so a stage keeps no per-session history and a replay needs nothing."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[int] = Field(default_factory=list, max_length=MAX_CONTEXT_TOKENS,
                              description="the prompt's tokens, in order (repetition penalty, prompt logprobs)")
    completion: list[int] = Field(default_factory=list, max_length=MAX_CONTEXT_TOKENS,
                                  description="the completion so far, in order (penalties, grammar)")
    min_tokens_left: int = Field(default=0, ge=0, description="positions of this row's window, from its first, "
                                 "at which `suppress` may not be chosen (min_tokens)")  # fmt: skip
    suppress: list[int] = Field(default_factory=list, max_length=MAX_LOGIT_BIAS)

    def token_ids(self) -> list[int]:
        return [*self.prompt, *self.completion, *self.suppress]


class TokenLogprobs(BaseModel):
    """A token's logprob under the model at its position, and the likeliest tokens there."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list, max_length=MAX_TOP_LOGPROBS)


class RowMeta(BaseModel):
    """One session's part of a step."""

    model_config = ConfigDict(extra="forbid")

    session: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0, description="tokens the session's cache must hold before this step")
    length: int = Field(ge=1, description="real (unpadded) positions of this row")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    max_length: int | None = Field(default=None, ge=1, description="tokens the session may reach")
    draft: list[int] = Field(default_factory=list, max_length=MAX_DRAFT_TOKENS,
                             description="drafted tokens: the row's last len(draft) positions")
    tree: list[int] | None = Field(default=None, max_length=MAX_DRAFT_TOKENS,
                                   description="the draft as a tree: draft[i] follows draft[tree[i]] (-1: the row's "
                                               "last undrafted position); none: a chain")  # fmt: skip
    tree_path: list[int] = Field(default_factory=list, max_length=MAX_DRAFT_TOKENS,
                                 description="the previous step's accepted tree nodes (indices into its draft, in "
                                             "order): their KV moves to the positions just before `start`")  # fmt: skip
    features: int = Field(default=0, ge=0, le=MAX_FEATURE_POSITIONS,
                          description="return the final hidden state of this many of the row's last undrafted "
                                      "positions and of its accepted drafted ones (for the gateway's draft head)")
    fork: str | None = Field(default=None, min_length=1, max_length=128,
                             description="a session on every stage whose first `start` positions this session starts "
                                         "from when it holds fewer (a prompt prefix computed before)")  # fmt: skip
    draft_probs: list[list[tuple[int, float]]] | None = Field(
        default=None, description="the draft's (token, probability) pairs per drafted position; none: one-hot drafts"
    )
    context: TokenContext | None = Field(default=None, description="the text so far, for logits processors")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="also return the "
                                        "logprob of every prompt token this row computes (from `context.prompt`) "
                                        "with this many alternatives")  # fmt: skip

    @model_validator(mode="after")
    def _draft_fits(self) -> RowMeta:
        if self.fork is not None and self.start < 1:
            raise ValueError("a fork copies the first `start` positions of its source, so start must be at least 1")
        if len(self.draft) >= self.length:
            raise ValueError(f"a draft of {len(self.draft)} tokens needs at least one position before it")
        if self.tree is not None:
            if len(self.tree) != len(self.draft):
                raise ValueError(f"a tree of {len(self.tree)} parents for {len(self.draft)} drafted tokens")
            if any(not -1 <= parent < index for index, parent in enumerate(self.tree)):
                raise ValueError("tree parents must come before their children: -1 <= tree[i] < i")
            if self.draft_probs is not None:
                raise ValueError("a tree's drafts are verified as fixed candidates; draft_probs is for chains")
            if self.context is not None or self.sampling.grammar is not None:
                raise ValueError("a tree draft cannot carry a context or grammar (they judge a chain); draft a chain")
        if any(b <= a for a, b in zip(self.tree_path, self.tree_path[1:], strict=False)) or any(
                node < 0 for node in self.tree_path):  # fmt: skip
            raise ValueError("tree_path must name distinct tree nodes in increasing order")
        if len(self.tree_path) > self.start:
            raise ValueError(f"tree_path names {len(self.tree_path)} nodes before position {self.start}")
        if self.features > self.length - len(self.draft):
            raise ValueError(f"features: {self.features} undrafted positions asked of a row that has "
                             f"{self.length - len(self.draft)}")
        if self.draft_probs is not None and len(self.draft_probs) != len(self.draft):
            raise ValueError(f"{len(self.draft_probs)} draft distributions for {len(self.draft)} drafted tokens")
        if self.prompt_logprobs is not None and (self.context is None or not self.context.prompt):
            raise ValueError("prompt_logprobs needs the prompt's tokens in context.prompt")
        if self.sampling.grammar is not None and self.context is None:
            raise ValueError("a grammar needs the completion so far in context.completion")
        for pairs in self.draft_probs or []:
            if any(not 0.0 <= prob <= 1.0 for _, prob in pairs):
                raise ValueError("draft probabilities must lie in [0, 1]")
        return self


class StepMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    rows: list[RowMeta] = Field(min_length=1, max_length=MAX_ROWS)
    route: list[str] = Field(default_factory=list, max_length=MAX_HOPS, description="base URLs of the stages after "
                             "this one")  # fmt: skip
    reply_to: str | None = Field(default=None, max_length=MAX_URL, description="where the last stage sends the result")
    layer: int = Field(default=0, ge=0, le=MAX_LAYER, description="the first layer the receiving stage must compute: "
                       "0 from the gateway, then each stage's span end (a stage whose span starts elsewhere refuses)")
    plan: str | None = Field(default=None, max_length=64, description="the plan the route was made for (its hash): "
                             "a stage of another plan refuses the step (None: a gateway started by hand)")
    compute_ms: list[float] = Field(default_factory=list, description="forward ms of each stage so far, in order")
    owner: str | None = Field(default=None, max_length=256, description="the gateway whose sessions the rows are; "
                              "set by the stage a gateway called, from the gateway's certificate")  # fmt: skip
    lease: str | None = Field(default=None, max_length=64, description="the gateway process's lease: the sessions "
                              "it opens close once its heartbeats stop (a restarted gateway does not know them)")

    @model_validator(mode="after")
    def _sessions_distinct(self) -> StepMeta:
        sessions = [row.session for row in self.rows]
        if len(set(sessions)) != len(sessions):
            raise ValueError("a session appears in more than one row of the step")
        return self

    @property
    def next_url(self) -> str | None:
        """Where this step goes after the stage that holds it (None: the last stage answers ``reply_to``)."""
        return self.route[0] if self.route else None

    def onward(self, computed_to: int | None = None) -> StepMeta:
        """The metadata the next hop receives: its own URL taken off the route; a stage that
        computed layers up to ``computed_to`` (its span's end) tells the next where to go on."""
        update: dict[str, object] = {"route": self.route[1:]}
        if computed_to is not None:
            update["layer"] = computed_to
        return self.model_copy(update=update)

    def wire(self) -> dict:
        """The metadata as a frame carries it: what a reader would not assume (defaults) left out."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @property
    def width(self) -> int:
        """Positions per row in the frame's tensor."""
        return max(row.length for row in self.rows)


class RowResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    session: str
    tokens: list[int]
    path: list[int] | None = None  # a tree row's accepted nodes (indices into its draft), in order
    features: int = 0  # rows of the result frame's tensor that are this row's hidden states, in row order
    hidden: Any = Field(default=None, exclude=True)  # those rows, attached by the gateway once read
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the row's sampling asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt positions 1.., when the row asked


class ResultMeta(BaseModel):
    """Metadata of a result frame (its tensor is empty): tokens per row, or the error that stopped the step."""

    step: int
    rows: list[RowResult] = Field(default_factory=list)
    error: str | None = None
    code: str | None = None
    stage: str | None = None
    unreachable: str | None = None  # the URL a stage could not reach, so the gateway can route around it
    compute_ms: list[float] = Field(default_factory=list)
