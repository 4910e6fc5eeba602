"""The gateway's generation engine: prompts in, text out, through the chain of stages. No HTTP.

The engine owns every long-lived resource of the gateway in one place: the HTTP client session
to the stages, the pipeline client and micro-batcher built on it, the draft model's thread, the
seats, the prefix index and the metrics. ``start`` creates what needs the event loop and the
gateway's own address; ``stop`` closes all of it. The OpenAI layer (``app.py``) turns requests
into ``GenerationRequest``s and engine errors into HTTP answers; it never reaches inside.

Each generation runs ``generation.generate``: rounds of draft (``drafting.py``) and step, the
steps packed with other generations' rows into micro-batches (``batching.py``) along a path over
the stage replicas chosen at its start (``routing.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from bloombee_contract.errors import ErrorCode
from bloombee_contract.launch import GatewayLaunch
from bloombee_contract.paths import HEALTHZ_PATH, INFO_PATH, READYZ_PATH, RESULT_PATH, STEP_PATH
from bloombee_contract.tls import TlsFiles

from bloombee_stage.gateway.batching import MicroBatcher
from bloombee_stage.gateway.draft_tree import HeadDrafter, TreeBudget
from bloombee_stage.gateway.drafting import DraftLength, ModelDrafter
from bloombee_stage.gateway.generation import Controls, Generated, Speculation, TextAssembler, generate
from bloombee_stage.gateway.pipeline import PipelineClient, PipelineError, ResultRouter
from bloombee_stage.gateway.prefixes import PrefixIndex
from bloombee_stage.gateway.routing import Router
from bloombee_stage.serving.metrics import Metrics
from bloombee_stage.serving.process import peer_session
from bloombee_stage.wire.frame import decode_frame, encode_frame, largest_step_bytes
from bloombee_stage.wire.messages import (
    MAX_DRAFT_TOKENS,
    MAX_FEATURE_POSITIONS,
    UNPLANNED_ROWS,
    SamplingParams,
    StepMeta,
)

log = logging.getLogger("bloombee.gateway")
HEARTBEAT_S = 1.0  # how often the gateway asks each stage whether it is alive
HEARTBEAT_TIMEOUT_S = 3.0  # a busy stage still answers /healthz within this (it is served off the torch thread)
HEARTBEAT_MISSES = 3  # in a row: the stage is lost
T = TypeVar("T")
RETRY_WHILE_REPLACED_S = 5  # Retry-After while a stage is replaced: `bloombee up` restarts one in seconds
RECHECK_TIMEOUT_S = 1.0  # a lost stage asked again before a request is refused for it
MAX_RESULT_DATA_BYTES = 1 << 16  # a result carries its tokens in the metadata; its tensor is empty
LOGPROB_JSON_BYTES = 32  # one (token, logprob) pair in a result's metadata, at most
MAX_PROMPT_LOGPROBS_BYTES = 3 << 20  # of a result's metadata (wire.frame.MAX_META_BYTES: 4 MiB)


class RequestError(Exception):
    """A request the engine cannot serve as asked: ``code`` knows the HTTP status, ``param`` names the field,
    ``retry_after_s`` when trying again later can help."""

    def __init__(self, message: str, code: ErrorCode, param: str | None = None,
                 retry_after_s: int | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.code, self.param, self.retry_after_s = code, param, retry_after_s


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation needs, whichever API it came through."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()  # end the generation like end-of-sequence
    controls: Controls = field(default_factory=Controls)


@dataclass(frozen=True)
class Forwarded:
    """A stage's answer to a frame the gateway relayed: passed back as it came."""

    status: int
    body: bytes
    content_type: str


class GenerationEngine:
    def __init__(self, tokenizer: Any, model_config: dict, settings: GatewayLaunch,
                 drafter: ModelDrafter | None = None, head: HeadDrafter | None = None) -> None:  # fmt: skip
        if settings.draft in ("early-exit", "model") and drafter is None:
            raise ValueError(f"draft {settings.draft!r} needs a draft model")
        if settings.draft == "head" and head is None:
            raise ValueError("draft 'head' needs the trained draft head")
        self.tokenizer = tokenizer
        self.settings = settings
        self.drafter = drafter
        self.head = head
        self.tree_budget = TreeBudget()  # the latest finished generation's tree costs and calibration
        self.max_model_len = int(model_config.get("max_position_embeddings", 2048))
        # Frames from the stages are read only up to what they can legally hold (before decoding).
        if "hidden_size" not in model_config:
            raise ValueError("the model's config.json has no hidden_size: relayed frames could not be bounded")
        hidden = int(model_config["hidden_size"])
        self.max_forward_bytes = largest_step_bytes(settings.micro_batch or UNPLANNED_ROWS, self.max_model_len, hidden)
        # A result carries its tokens in the metadata and, for a draft head, float16 hidden states.
        rows = settings.micro_batch or UNPLANNED_ROWS
        self.max_result_bytes = MAX_RESULT_DATA_BYTES + (
            rows * (MAX_FEATURE_POSITIONS + MAX_DRAFT_TOKENS) * hidden * 2 if head is not None else 0)
        eos = model_config.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.results = ResultRouter()
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.lost_urls: set[str] = set()  # stage replicas that missed their last heartbeats
        self.routing = Router(settings.stages, settings.micro_batch)
        self.prefixes = PrefixIndex(settings.prefix_cache)
        self._stage_settings_known = False
        # Seats for generations: the stages' KV budgets were sized for the plan's admitted sequences,
        # so a request beyond them waits here for a seat instead of failing at a stage.
        self.seats = asyncio.Semaphore(settings.max_sequences) if settings.max_sequences else None
        self.waiting = 0
        self.running = 0
        # A bounded queue: beyond it a request is refused at once (429), not kept waiting for minutes.
        default_waiting = 4 * settings.max_sequences if settings.max_sequences else None
        self.max_waiting = settings.max_waiting or default_waiting
        self.generation_s = 10.0  # recent wall time per generation (a moving average): for Retry-After
        self.totals = dict(rounds=0, tokens=0, drafted=0, draft_s=0.0, prefilled=0, prompts=0)  # for profile()
        self.metrics = Metrics("bloombee_gateway")
        self._resources: _Running | None = None
        self._register_metrics()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, own_url: str) -> None:
        """Create what lives as long as the server: called once it listens at ``own_url``."""
        if self._resources is not None:
            raise RuntimeError("the engine is already started")
        tls = TlsFiles.at(self.settings.tls_dir) if self.settings.tls_dir else None
        http = peer_session(aiohttp.ClientTimeout(total=self.settings.step_timeout), tls)
        reply = (self.settings.public_url or own_url).rstrip("/") + RESULT_PATH
        pipeline = PipelineClient(len(self.settings.stages), reply, http, self.results, self.settings.step_timeout,
                                  relay=self.settings.relay, relay_hops=self.settings.relay_hops,
                                  lease=uuid.uuid4().hex)  # fmt: skip
        batcher = MicroBatcher(pipeline, self.routing, self.settings.micro_batch, self.settings.max_in_flight)
        drafts = self.drafter is not None or self.head is not None
        draft_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft") if drafts else None
        heartbeats = asyncio.create_task(self._watch_stages(pipeline))
        self._resources = _Running(http, batcher, draft_thread, heartbeats)

    async def stop(self) -> None:
        """Close everything ``start`` made; steps in flight fail rather than hang."""
        running, self._resources = self._resources, None
        if running is None:
            return
        running.heartbeats.cancel()
        await asyncio.gather(running.heartbeats, return_exceptions=True)
        await running.batcher.stop()
        await running.http.close()
        if running.draft_thread is not None:
            running.draft_thread.shutdown(wait=False, cancel_futures=True)

    async def _watch_stages(self, pipeline: PipelineClient) -> None:
        """Every stage's heartbeat (``/healthz``); one that misses ``HEARTBEAT_MISSES`` in a row is
        lost: the steps that went through it fail at once (their generations replay), instead of
        waiting out the step timeout. Runs until ``stop``."""
        misses = dict.fromkeys(self.stage_urls, 0)
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            alive = await asyncio.gather(*(pipeline.answers(url, HEALTHZ_PATH, HEARTBEAT_TIMEOUT_S) for url in misses))
            for url, beat in zip(list(misses), alive, strict=True):
                misses[url] = 0 if beat else misses[url] + 1
                (self.lost_urls.add if misses[url] >= HEARTBEAT_MISSES else self.lost_urls.discard)(url)
                if misses[url] == HEARTBEAT_MISSES:
                    log.warning("stage %s missed %d heartbeats: taken as lost", url, HEARTBEAT_MISSES)
                if misses[url] >= HEARTBEAT_MISSES and pipeline.lost(url):
                    self.metrics.inc("lost_steps_total", "Steps failed early because a stage stopped answering")

    @property
    def _running(self) -> _Running:
        if self._resources is None:
            raise RuntimeError("the engine is not started (start() runs once the server listens)")
        return self._resources

    # -- requests -----------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.settings.served_model_name:
            raise RequestError(f"The model `{name}` does not exist. This gateway serves "
                               f"`{self.settings.served_model_name}`.", ErrorCode.MODEL_NOT_FOUND, "model")  # fmt: skip

    async def tokenized(self, prompt_ids: Callable[[T], list[int]], prompt: T) -> list[int]:
        """``prompt_ids(prompt)`` on the tokenizer's own thread: a long prompt must not stall the event
        loop, and one thread keeps the tokenizer's (not thread-safe) settings out of races."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, prompt_ids, prompt)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a conversation under the model's chat template, ready for its reply."""
        if not self.tokenizer.chat_template:
            raise RequestError("this model has no chat template; use /v1/completions", ErrorCode.INVALID_REQUEST,
                               "messages")  # fmt: skip
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=True)  # fmt: skip
        return list(encoded["input_ids"])

    def text_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """The token ids of a completion prompt: text to tokenise, or token ids to check."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        vocab = len(self.tokenizer)
        if any(not 0 <= token < vocab for token in prompt):
            raise RequestError(f"prompt token ids must lie in 0..{vocab - 1}", ErrorCode.INVALID_REQUEST, "prompt")
        return list(prompt)

    def token_budget(self, prompt: list[int], asked: int | None) -> int:
        """The tokens a generation may add: ``asked``, or ``--default-max-tokens`` within the room the
        context has left (every stage reserves KV for it up front: the whole context for every
        request would let a few requests hold a stage's budget)."""
        if not prompt:
            raise RequestError("the prompt is empty", ErrorCode.INVALID_REQUEST, "prompt")
        room = self.max_model_len - len(prompt)
        if room < 1 or (asked is not None and asked > room):
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(prompt) + (asked or 0)} tokens ({len(prompt)} in the prompt, "
                f"{asked or 0} for the completion).",
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                "max_tokens",
            )
        return asked if asked is not None else min(room, self.settings.default_max_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (how logprobs name tokens)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [token for token in token_ids if not 0 <= token < vocab]
        if bad:
            raise RequestError(f"{param}: token id {bad[0]} is not in this model's vocabulary (0..{vocab - 1})",
                               ErrorCode.INVALID_REQUEST, param)  # fmt: skip

    def check_prompt_logprobs(self, prompt: list[int], top: int) -> None:
        """A prompt's logprobs travel back in one result's metadata: refuse what would not fit."""
        size = len(prompt) * (top + 1) * LOGPROB_JSON_BYTES
        if size > MAX_PROMPT_LOGPROBS_BYTES:
            most = max(0, MAX_PROMPT_LOGPROBS_BYTES // (len(prompt) * LOGPROB_JSON_BYTES) - 1)
            raise RequestError(f"logprobs: echoing the logprobs of a {len(prompt)}-token prompt with {top} "
                               f"alternatives each is too much for one answer; ask for at most {most}",
                               ErrorCode.INVALID_REQUEST, "logprobs")  # fmt: skip

    async def generate(self, request: GenerationRequest, result: Generated) -> AsyncIterator[str]:
        """The generation's text as it becomes safe to show; ``result`` fills in as it runs.

        Raises ``PipelineError`` when the stages fail it (before or during the text)."""
        running = self._running
        arrived = time.monotonic()
        deadline = arrived + self.settings.request_timeout
        try:
            async with self._seat(deadline):
                self.running += 1
                try:
                    await self._adopt_stage_settings()
                    self.metrics.observe("request_queue_time_seconds", "Time a request waited for a seat",
                                         time.monotonic() - arrived)  # fmt: skip
                    assembler = TextAssembler(self.decode, request.stop)
                    eos = (set() if request.ignore_eos else self.eos_ids) | request.stop_token_ids
                    speculation = Speculation(self.settings.draft, DraftLength(self.settings.draft_max),
                                              self.drafter, running.draft_thread, head=self.head,
                                              width=self.settings.draft_width, budget=self.tree_budget.carried(),
                                              load=lambda: self.running)  # fmt: skip
                    async for piece in generate(running.batcher, request.prompt, request.max_tokens, request.sampling,
                                                eos, assembler, result, speculation, self.prefixes,
                                                self.settings.recovery_wait, deadline, request.controls):  # fmt: skip
                        yield piece
                    if speculation.budget.timed:  # the next generation starts from what this one measured
                        self.tree_budget = speculation.budget
                finally:
                    self.running -= 1
        except PipelineError as error:
            self.metrics.inc("requests_failed_total", "Generations the pipeline failed", code=str(error.code))
            raise
        self._count(len(request.prompt), speculation, result, arrived)

    # -- the stages' side ---------------------------------------------------------------------

    def deliver(self, body: bytes) -> bool:
        """A result frame from the last stage, to the step waiting for it (raises WireError, ValidationError)."""
        return self.results.deliver(decode_frame(body, self.max_result_bytes))

    async def forward(self, body: bytes) -> Forwarded:
        """A hop the planner routes through the gateway: pass the frame on to the next URL of its route.

        Raises WireError or ValidationError for a frame that cannot be read, ValueError for one
        with nowhere to go, and RequestError when the next stage cannot be reached."""
        frame = decode_frame(body, self.max_forward_bytes)
        meta = StepMeta.model_validate(frame.meta)
        url = meta.next_url
        if url is None:
            raise ValueError("forwarded frame has no next hop")
        if url not in self.stage_urls:  # relay only to this gateway's own stages
            raise ValueError(f"forwarded frame's next hop {url[:200]!r} is not a stage of this gateway")
        frame.meta = meta.onward().wire()
        self.metrics.inc("forwarded_total", "Frames relayed through the gateway between stages")
        try:
            async with self._running.http.post(url + STEP_PATH, data=encode_frame(frame, frame.codec)) as reply:
                return Forwarded(reply.status, await reply.read(), reply.content_type)
        except aiohttp.ClientError as error:  # the stage that sent the frame reports this reason to the gateway
            raise RequestError(f"gateway could not forward to {url}: {error}", ErrorCode.STAGE_UNREACHABLE) from None

    @property
    def stage_urls(self) -> list[str]:
        """Every stage replica's URL, in layer order."""
        return [url for replicas in self.settings.stages for url in replicas]

    async def stage_readiness(self) -> dict[str, bool]:
        """Whether each stage replica answers its readiness check now."""
        pipeline = self._running.batcher.pipeline
        states = await asyncio.gather(*(pipeline.answers(url, READYZ_PATH) for url in self.stage_urls))
        return dict(zip(self.stage_urls, states, strict=True))

    async def _adopt_stage_settings(self) -> None:
        """Fit what the gateway assumes to what its stages say in /info, once all of them answer.

        The micro-batch is capped at the smallest a stage was planned for: a stage refuses larger
        steps, and a gateway started by hand with a larger --micro-batch would have every full
        step refused and retried row by row. Kept sessions are offered as fork sources only while
        younger than the shortest idle time-out of the stages (which close them after it).
        """
        if self._stage_settings_known:
            return
        running = self._running

        async def info(url: str) -> dict:
            async with running.http.get(url + INFO_PATH, timeout=aiohttp.ClientTimeout(total=5)) as reply:
                return await reply.json() if reply.ok else {}

        try:
            infos = await asyncio.gather(*(info(url) for url in self.stage_urls))
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return  # a stage is not up yet: ask again with the next request
        self._stage_settings_known = True
        limits = [i["micro_batch"] for i in infos if i.get("micro_batch")]
        if limits and min(limits) < running.batcher.micro_batch:
            log.warning("--micro-batch %d is larger than a stage's planned %d; using %d", running.batcher.micro_batch,
                        min(limits), min(limits))  # fmt: skip
            running.batcher.micro_batch = self.routing.micro_batch = min(limits)
        timeouts = [i["session_timeout_s"] for i in infos if i.get("session_timeout_s")]
        if timeouts:
            self.prefixes.max_idle_s = 0.8 * min(timeouts)  # a margin for the stages' sweep and clock drift

    def _stages_gone(self) -> list[int]:
        """The stages none of whose replicas answered their last heartbeats."""
        return [index for index, replicas in enumerate(self.settings.stages)
                if all(url in self.lost_urls for url in replicas)]  # fmt: skip

    async def recheck_lost_stages(self) -> None:
        """Ask the replicas of a stage taken as gone once more, briefly, before a request is refused
        for it: a restarted stage answers before the next heartbeat would tell."""
        gone = [url for index in self._stages_gone() for url in self.settings.stages[index]]
        if not gone:
            return
        pipeline = self._running.batcher.pipeline
        answered = await asyncio.gather(*(pipeline.answers(url, HEALTHZ_PATH, RECHECK_TIMEOUT_S) for url in gone))
        self.lost_urls.difference_update(url for url, alive in zip(gone, answered, strict=True) if alive)

    def admit(self) -> None:
        """Refuse a new request at once, with when to try again, while the queue for seats is full
        (429) or while a stage has no replica that answers (503: it is being replaced)."""
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            seats = max(1, self.settings.max_sequences or 1)
            retry = max(1, math.ceil(self.generation_s * (self.waiting + 1) / seats))
            self.metrics.inc("requests_refused_total", "Requests refused at once", reason="queue_full")
            raise RequestError(f"the gateway is at capacity ({self.waiting} requests wait for one of {seats} seats); "
                               f"try again in {retry} s", ErrorCode.OVERLOADED, retry_after_s=retry)  # fmt: skip
        gone = self._stages_gone()
        if gone:
            self.metrics.inc("requests_refused_total", "Requests refused at once", reason="stage_lost")
            raise RequestError(f"stage {gone[0]} of the pipeline does not answer and is being replaced; try again in "
                               f"{RETRY_WHILE_REPLACED_S} s", ErrorCode.STAGE_UNREACHABLE,
                               retry_after_s=RETRY_WHILE_REPLACED_S)  # fmt: skip

    @contextlib.asynccontextmanager
    async def _seat(self, deadline: float) -> AsyncIterator[None]:
        """Holds one of ``max_sequences`` seats for a generation, waiting for one (until ``deadline``) first."""
        if self.seats is None:
            yield
            return
        self.admit()  # the queue may have filled since the request was admitted
        self.waiting += 1
        try:
            # asyncio.timeout, not wait_for: a free seat is taken without yielding to the loop, so the
            # queue's length (``waiting``) that admit() reads is never inflated by a request that
            # was about to take one.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.seats.acquire()
        except TimeoutError:
            raise PipelineError(f"no seat became free within the request's {self.settings.request_timeout:.0f} s",
                                ErrorCode.PIPELINE_TIMEOUT) from None  # fmt: skip
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.seats.release()

    def profile(self) -> dict[str, Any]:
        """What a round costs beside the stages' compute, measured on traffic (the gateway's ``/info``):
        ``transportMs``, the median of recent steps' round trips less their stages' compute (links, each crossing's
        HTTP, TLS and (de)serialisation), over ``crossings`` crossings; ``turnaroundMs``, the
        mean of the gateway's own part of a round (a step's rows' results to the step leaving:
        tokens, streaming, drafting, gathering; a mean, as it adds to every round);
        ``rowTurnaroundMs``, the mean of a generation's own part (its row's result to its next row
        queued: what a row that leaves alone waits); ``prefillPerRound``, the prompt positions the
        stages computed per round of the generations (how fast sequences turn over), and
        ``promptPositions`` per prompt (whether prompts are packed with other rows or go alone);
        with drafting, its tokens, drafts and time per round."""
        batcher = self._resources.batcher if self._resources is not None else None
        if batcher is None or not batcher.transport_ms:
            return {}
        turnaround, alone = list(batcher.turnaround_ms), list(batcher.row_turnaround_ms)
        rounds = self.totals["rounds"]
        per_round = {} if not rounds or self.settings.draft == "none" else {
            "tokensPerRound": round(max(1.0, self.totals["tokens"] / rounds), 4),
            "draftedPerRound": round(self.totals["drafted"] / rounds, 4),
            "draftMsPerRound": round(self.totals["draft_s"] * 1000 / rounds, 4),
        }  # fmt: skip
        if rounds:  # prompts as the stages computed them (prefix-cache hits excluded), per round
            per_round["prefillPerRound"] = round(self.totals["prefilled"] / rounds, 4)
        if self.totals["prompts"]:
            per_round["promptPositions"] = round(self.totals["prefilled"] / self.totals["prompts"], 4)
        return {
            **per_round,
            "transportMs": round(statistics.median(batcher.transport_ms), 4),
            "crossings": len(self.settings.stages) + 1,
            "turnaroundMs": round(statistics.fmean(turnaround), 4) if turnaround else 0.0,
            "rowTurnaroundMs": round(statistics.fmean(alone), 4) if alone else 0.0,
            "steps": batcher.steps,
            "measuredAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # -- metrics ------------------------------------------------------------------------------

    def _register_metrics(self) -> None:
        def batcher(read: Callable[[MicroBatcher], float]) -> Callable[[], float]:
            return lambda: read(self._resources.batcher) if self._resources else 0

        self.metrics.counted("steps_sent_total", "Steps (micro-batches) sent into the pipeline",
                             batcher(lambda b: b.steps))  # fmt: skip
        self.metrics.counted("rows_sent_total", "Rows (one per generation and round) carried by those steps",
                             batcher(lambda b: b.rows))  # fmt: skip
        self.metrics.gauge("steps_in_flight", "Steps in the pipeline now", batcher(lambda b: b.steps_in_flight))
        self.metrics.gauge("requests_waiting", "Requests waiting for a seat (--max-sequences)", lambda: self.waiting)
        self.metrics.gauge("requests_running", "Generations holding a seat", lambda: self.running)
        self.metrics.family("replica_load", "Generations pinned to each stage replica", self._replica_samples("load"))
        self.metrics.family("replica_service_seconds", "Measured forward seconds per step of each stage replica",
                            self._replica_samples("service_ms", 1e-3))  # fmt: skip
        self.metrics.family("route_predicted_seconds", "Predicted seconds of a step on each path, queueing included",
                            self._path_samples)  # fmt: skip
        self.metrics.family("route_chosen", "Generations pinned to each path so far", self._chosen_samples)

    def _replica_samples(self, field: str, scale: float = 1.0) -> Callable[[], dict]:
        def read() -> dict:
            samples = {}
            for stage, replicas in enumerate(self.routing.replicas):
                for index, replica in enumerate(replicas):
                    labels = (("stage", str(stage)), ("replica", str(index)), ("url", replica.url))
                    samples[labels] = float(getattr(replica, field) or 0) * scale
            return samples

        return read

    def _chosen_samples(self) -> dict:
        return {(("path", _path_label(path)),): float(n) for path, n in self.routing.chosen.items()}

    def _path_samples(self) -> dict:
        paths = itertools.islice(self.routing.paths(), 64)
        return {(("path", _path_label(path)),): self.routing.predict_ms(path) / 1000 for path in paths}

    def _count(self, prompt_tokens: int, speculation: Speculation, result: Generated, arrived: float) -> None:
        """A finished generation's counts and latencies (vLLM's metrics, under this gateway's prefix)."""
        length, now = speculation.length, time.monotonic()
        self.metrics.inc("rounds_total", "Pipeline round trips of generations", speculation.rounds)
        prefilled = max(0, prompt_tokens - result.cached_tokens)
        for key, value in (("rounds", speculation.rounds), ("tokens", len(result.token_ids)),
                           ("drafted", length.proposed), ("draft_s", speculation.draft_seconds),
                           ("prefilled", prefilled), ("prompts", 1 if prefilled else 0)):  # fmt: skip
            self.totals[key] += value
        self.metrics.inc("draft_proposed_total", "Drafted tokens sent for verification", length.proposed)
        self.metrics.inc("draft_accepted_total", "Drafted tokens the model agreed with", length.accepted)
        self.metrics.inc("draft_seconds_total", "Time spent drafting at the gateway", speculation.draft_seconds)
        self.metrics.inc("draft_lookup_branch_proposed_total", "Prompt lookup's tokens added to draft-head trees",
                         speculation.branch_nodes)  # fmt: skip
        self.metrics.inc("draft_lookup_branch_accepted_total", "Of those, tokens the model agreed with",
                         speculation.branch_accepted)  # fmt: skip
        self.metrics.inc("requests_total", "Finished generations", finish_reason=result.finish_reason or "none")
        self.metrics.inc("prompt_tokens_total", "Prompt tokens of finished generations", prompt_tokens)
        self.metrics.inc("generation_tokens_total", "Tokens generated", len(result.token_ids))
        self.metrics.inc("cached_prompt_tokens_total", "Prompt tokens copied from kept sessions, not computed",
                         result.cached_tokens)  # fmt: skip
        self.metrics.inc("replays_total", "Generations started over on fresh sessions after a stage was lost",
                         result.replays)  # fmt: skip
        self.metrics.observe("e2e_request_latency_seconds", "Time from arrival to the last token", now - arrived)
        if result.first_token_at is not None:
            self.metrics.observe("time_to_first_token_seconds", "Time from arrival to the first token",
                                 result.first_token_at - arrived)  # fmt: skip
            if len(result.token_ids) > 1:
                self.metrics.observe("inter_token_latency_seconds", "Mean time between a generation's tokens after "
                                     "its first", (now - result.first_token_at) / (len(result.token_ids) - 1))
        self.generation_s = 0.8 * self.generation_s + 0.2 * (now - arrived)


@dataclass
class _Running:
    """What the engine holds between ``start`` and ``stop``."""

    http: aiohttp.ClientSession
    batcher: MicroBatcher
    draft_thread: ThreadPoolExecutor | None
    heartbeats: asyncio.Task


def _path_label(path: tuple[int, ...]) -> str:
    """A path as the replica index per stage, e.g. ``0.1.0``."""
    return ".".join(map(str, path))
