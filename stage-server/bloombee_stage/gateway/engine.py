"""The gateway's generation engine: prompts in, text out, through the chain of stages. No HTTP.

The engine owns every long-lived resource of the gateway in one place: the HTTP client session
to the stages, the lane of the plan in force (``lanes.py``: its pipeline client, micro-batcher,
seats and kept prefixes) and those of a plan switch, the draft model's thread and the metrics.
``start`` creates what needs the event loop and the gateway's own address; ``stop`` closes all of
it. The OpenAI layer (``app.py``) turns requests into ``GenerationRequest``s and engine errors
into HTTP answers; it never reaches inside.

Each generation runs ``generation.generate``: rounds of draft (``drafting.py``) and step, the
steps packed with other generations' rows into micro-batches (``batching.py``) along a path over
the stage replicas chosen at its start (``routing.py``).

With ``--route-file`` the engine follows its route: when the file names a new plan, a lane for it
starts beside the one in force; once every new stage answers, new generations go there, those in
flight finish on the old lane (or move over when they replay), and the old lane closes when its
last generation ends. ``/info`` tells the operator which plan serves and which still drains.
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
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from bloombee_contract.errors import ErrorCode
from bloombee_contract.launch import GatewayLaunch
from bloombee_contract.paths import RESULT_PATH, STEP_PATH
from bloombee_contract.route import Route, RouteError
from bloombee_contract.tls import TlsFiles

from bloombee_stage.gateway.batching import MicroBatcher
from bloombee_stage.gateway.draft_tree import HeadDrafter, TreeBudget
from bloombee_stage.gateway.drafting import DraftLength, ModelDrafter
from bloombee_stage.gateway.generation import Controls, Generated, Speculation, TextAssembler, generate
from bloombee_stage.gateway.lanes import Lane, route_of, with_flags
from bloombee_stage.gateway.pipeline import PipelineError, ResultRouter
from bloombee_stage.gateway.prefixes import PrefixIndex
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
T = TypeVar("T")
RETRY_WHILE_REPLACED_S = 5  # Retry-After while a stage is replaced: `bloombee up` restarts one in seconds
ROUTE_POLL_S = 1.0  # how often the route file is read again
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
        self.hidden_size = int(model_config["hidden_size"])
        eos = model_config.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.results = ResultRouter()
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.route = route_of(settings)  # the route it starts on (raises RouteError or ValueError)
        self.waiting = 0
        self.running = 0
        self.generation_s = 10.0  # recent wall time per generation (a moving average): for Retry-After
        self.totals = dict(rounds=0, tokens=0, drafted=0, draft_s=0.0, prefilled=0, prompts=0)  # for profile()
        self.metrics = Metrics("bloombee_gateway")
        self._resources: _Running | None = None
        self.retired_counts = dict(steps=0, rows=0)  # of lanes closed since: counters never go back
        self._register_metrics()

    @property
    def max_waiting(self) -> int | None:
        """A bounded queue: beyond it a request is refused at once (429), not kept waiting for minutes."""
        seats = self.lane.route.max_sequences if self._resources is not None else self.route.max_sequences
        return self.settings.max_waiting or (4 * seats if seats else None)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, own_url: str) -> None:
        """Create what lives as long as the server: called once it listens at ``own_url``."""
        if self._resources is not None:
            raise RuntimeError("the engine is already started")
        tls = TlsFiles.at(self.settings.tls_dir) if self.settings.tls_dir else None
        http = peer_session(aiohttp.ClientTimeout(total=self.settings.step_timeout), tls)
        reply = (self.settings.public_url or own_url).rstrip("/") + RESULT_PATH
        drafts = self.drafter is not None or self.head is not None
        draft_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft") if drafts else None
        self._resources = _Running(http, reply, uuid.uuid4().hex, draft_thread)
        self._resources.lane = self._lane(self.route)
        if self.settings.route_file:
            self._resources.follower = asyncio.create_task(self._follow_route(self.settings.route_file))

    def _lane(self, route: Route) -> Lane:
        running = self._running
        return Lane(route, self.settings, running.http, self.results, running.reply_url, running.lease, self.metrics)

    async def stop(self) -> None:
        """Close everything ``start`` made; steps in flight fail rather than hang."""
        running, self._resources = self._resources, None
        if running is None:
            return
        tasks = [task for task in (running.follower, *running.retiring.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in {id(lane): lane for lane in (running.lane, running.warming, *running.retiring)
                     if lane is not None}.values():  # fmt: skip
            await lane.close()
        await running.http.close()
        if running.draft_thread is not None:
            running.draft_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def lane(self) -> Lane:
        """The lane new generations take: the plan in force."""
        lane = self._running.lane
        assert lane is not None
        return lane

    def _lanes(self) -> list[Lane]:
        """Every lane whose stages may carry this gateway's steps now: in force, retiring, warming."""
        running = self._running
        return [lane for lane in (running.lane, *running.retiring, running.warming) if lane is not None]

    async def _follow_route(self, path: str) -> None:
        """Read the route file every ``ROUTE_POLL_S``; a new plan's lane warms up beside the one in
        force and takes over once every one of its stages answers ``/readyz``. Runs until ``stop``."""
        running = self._running
        last_text, refused = "", ""
        while True:
            await asyncio.sleep(ROUTE_POLL_S)
            try:
                text = await asyncio.to_thread(Path(path).read_text)
                if text != last_text:
                    last_text = text
                    route = with_flags(Route.loads(text, f"route file {path}"), self.settings)
                    await self._route_changed(route)
            except (OSError, RouteError) as error:
                if str(error) != refused:  # said once, not every second
                    log.error("%s; serving on plan %s", error, self.lane.plan or "(unnamed)")
                    refused = str(error)
                continue
            warming = running.warming
            if warming is not None and all((await warming.readiness()).values()):
                self._switch(warming)

    async def _route_changed(self, route: Route) -> None:
        running = self._running
        if running.warming is not None and running.warming.route == route:
            return
        if running.warming is not None:  # superseded before it took over
            log.info("plan %s superseded by %s before it served", running.warming.plan, route.plan)
            await running.warming.close()
            running.warming = None
        if route == self.lane.route:
            return
        log.info("route file names plan %s (%d stages); warming it beside plan %s", route.plan, len(route.stages),
                 self.lane.plan)  # fmt: skip
        running.warming = self._lane(route)

    def _switch(self, lane: Lane) -> None:
        """New generations go to ``lane`` from now; the old lane closes once its generations end."""
        running = self._running
        old, running.lane, running.warming = self.lane, lane, None
        self.route = lane.route
        old.retired = True
        log.info("plan switch: now serving plan %s; %d generations finish on plan %s", lane.plan, old.generations,
                 old.plan)  # fmt: skip
        self.metrics.inc("plan_switches_total", "Times the gateway moved to a new plan's stages")
        running.retiring[old] = asyncio.create_task(self._retire(old))

    async def _retire(self, lane: Lane) -> None:
        """Close a retired lane once its last generation ended (or the longest a request may take)."""
        try:
            async with asyncio.timeout(self.settings.request_timeout + ROUTE_POLL_S):
                await lane.idle.wait()
        except TimeoutError:
            log.warning("plan %s: %d generations still running after %.0f s; closing it", lane.plan,
                        lane.generations, self.settings.request_timeout)  # fmt: skip
        for key in ("steps", "rows"):
            self.retired_counts[key] += getattr(lane.batcher, key)
        await lane.close()
        self._running.retiring.pop(lane, None)
        log.info("plan %s drained and closed", lane.plan)

    def plan_state(self) -> dict[str, Any]:
        """Which plan serves, which warm up and which drain (for the operator's ``/info``)."""
        running = self._running
        return {"plan": self.lane.plan, "warming": running.warming.plan if running.warming else None,
                "retiring": [{"plan": lane.plan, "generations": lane.generations} for lane in running.retiring]}

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
        on = [self.lane]  # the lane the generation runs on (it moves over when a replay finds it retired)
        on[0].join()

        def move_over() -> tuple[MicroBatcher, PrefixIndex] | None:
            current = self.lane
            if current is on[0] or not on[0].retired:
                return None
            log.info("a generation replays on plan %s (its plan %s is retiring)", current.plan, on[0].plan)
            on[0].leave()
            current.join()
            on[0] = current
            return current.batcher, current.prefixes

        try:
            async with self._seat(on[0], deadline):
                self.running += 1
                try:
                    await on[0].adopt_stage_settings()
                    self.metrics.observe("request_queue_time_seconds", "Time a request waited for a seat",
                                         time.monotonic() - arrived)  # fmt: skip
                    assembler = TextAssembler(self.decode, request.stop)
                    eos = (set() if request.ignore_eos else self.eos_ids) | request.stop_token_ids
                    speculation = Speculation(self.settings.draft, DraftLength(self.settings.draft_max),
                                              self.drafter, running.draft_thread, head=self.head,
                                              width=self.settings.draft_width, budget=self.tree_budget.carried(),
                                              load=lambda: self.running)  # fmt: skip
                    async for piece in generate(on[0].batcher, request.prompt, request.max_tokens, request.sampling,
                                                eos, assembler, result, speculation, on[0].prefixes,
                                                self.settings.recovery_wait, deadline, request.controls,
                                                move_over):  # fmt: skip
                        yield piece
                    if speculation.budget.timed:  # the next generation starts from what this one measured
                        self.tree_budget = speculation.budget
                finally:
                    self.running -= 1
        except PipelineError as error:
            self.metrics.inc("requests_failed_total", "Generations the pipeline failed", code=str(error.code))
            raise
        finally:
            on[0].leave()
        self._count(len(request.prompt), speculation, result, arrived)

    # -- the stages' side ---------------------------------------------------------------------

    def deliver(self, body: bytes) -> bool:
        """A result frame from the last stage, to the step waiting for it (raises WireError, ValidationError)."""
        # A result carries its tokens in the metadata and, for a draft head, float16 hidden states.
        rows = max(lane.route.micro_batch for lane in self._lanes())
        features = rows * (MAX_FEATURE_POSITIONS + MAX_DRAFT_TOKENS) * self.hidden_size * 2 if self.head else 0
        return self.results.deliver(decode_frame(body, MAX_RESULT_DATA_BYTES + features))

    async def forward(self, body: bytes) -> Forwarded:
        """A hop the planner routes through the gateway: pass the frame on to the next URL of its route.

        Raises WireError or ValidationError for a frame that cannot be read, ValueError for one
        with nowhere to go, and RequestError when the next stage cannot be reached."""
        rows = max(lane.route.micro_batch for lane in self._lanes())
        frame = decode_frame(body, largest_step_bytes(rows or UNPLANNED_ROWS, self.max_model_len, self.hidden_size))
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
        """Every stage replica's URL of the lanes that may carry steps now (a plan switch has two)."""
        return [url for lane in self._lanes() for url in lane.urls]

    async def stage_readiness(self) -> dict[str, bool]:
        """Whether each stage replica of the plan in force answers its readiness check now."""
        return await self.lane.readiness()

    async def recheck_lost_stages(self) -> None:
        """Ask the replicas of a stage taken as gone once more, briefly, before a request is refused
        for it: a restarted stage answers before the next heartbeat would tell."""
        await self.lane.recheck_lost_stages()

    def admit(self) -> None:
        """Refuse a new request at once, with when to try again, while the queue for seats is full
        (429) or while a stage has no replica that answers (503: it is being replaced)."""
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            seats = max(1, self.lane.route.max_sequences or 1)
            retry = max(1, math.ceil(self.generation_s * (self.waiting + 1) / seats))
            self.metrics.inc("requests_refused_total", "Requests refused at once", reason="queue_full")
            raise RequestError(f"the gateway is at capacity ({self.waiting} requests wait for one of {seats} seats); "
                               f"try again in {retry} s", ErrorCode.OVERLOADED, retry_after_s=retry)  # fmt: skip
        gone = self.lane.stages_gone()
        if gone:
            self.metrics.inc("requests_refused_total", "Requests refused at once", reason="stage_lost")
            raise RequestError(f"stage {gone[0]} of the pipeline does not answer and is being replaced; try again in "
                               f"{RETRY_WHILE_REPLACED_S} s", ErrorCode.STAGE_UNREACHABLE,
                               retry_after_s=RETRY_WHILE_REPLACED_S)  # fmt: skip

    @contextlib.asynccontextmanager
    async def _seat(self, lane: Lane, deadline: float) -> AsyncIterator[None]:
        """Holds one of the lane's seats (its plan's admitted sequences) for a generation, waiting
        for one (until ``deadline``) first."""
        if lane.seats is None:
            yield
            return
        self.admit()  # the queue may have filled since the request was admitted
        self.waiting += 1
        try:
            # asyncio.timeout, not wait_for: a free seat is taken without yielding to the loop, so the
            # queue's length (``waiting``) that admit() reads is never inflated by a request that
            # was about to take one.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await lane.seats.acquire()
        except TimeoutError:
            raise PipelineError(f"no seat became free within the request's {self.settings.request_timeout:.0f} s",
                                ErrorCode.PIPELINE_TIMEOUT) from None  # fmt: skip
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            lane.seats.release()

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
        batcher = self.lane.batcher if self._resources is not None else None
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
            "crossings": len(self.lane.route.stages) + 1,
            "turnaroundMs": round(statistics.fmean(turnaround), 4) if turnaround else 0.0,
            "rowTurnaroundMs": round(statistics.fmean(alone), 4) if alone else 0.0,
            "steps": batcher.steps,
            "measuredAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # -- metrics ------------------------------------------------------------------------------

    def _register_metrics(self) -> None:
        def lanes(read: Callable[[MicroBatcher], float]) -> Callable[[], float]:
            return lambda: sum(read(lane.batcher) for lane in self._lanes()) if self._resources else 0

        def counted(key: str) -> Callable[[], float]:
            return lambda: self.retired_counts[key] + lanes(lambda b: getattr(b, key))()

        self.metrics.counted("steps_sent_total", "Steps (micro-batches) sent into the pipeline", counted("steps"))
        self.metrics.counted("rows_sent_total", "Rows (one per generation and round) carried by those steps",
                             counted("rows"))  # fmt: skip
        self.metrics.gauge("steps_in_flight", "Steps in the pipeline now", lanes(lambda b: b.steps_in_flight))
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
            if self._resources is None:
                return samples
            for stage, replicas in enumerate(self.lane.routing.replicas):
                for index, replica in enumerate(replicas):
                    labels = (("stage", str(stage)), ("replica", str(index)), ("url", replica.url))
                    samples[labels] = float(getattr(replica, field) or 0) * scale
            return samples

        return read

    def _chosen_samples(self) -> dict:
        if self._resources is None:
            return {}
        return {(("path", _path_label(path)),): float(n) for path, n in self.lane.routing.chosen.items()}

    def _path_samples(self) -> dict:
        if self._resources is None:
            return {}
        routing = self.lane.routing
        return {(("path", _path_label(path)),): routing.predict_ms(path) / 1000
                for path in itertools.islice(routing.paths(), 64)}  # fmt: skip

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
    reply_url: str  # where the last stage delivers results
    lease: str  # this gateway process's: stages close its sessions once its heartbeats stop
    draft_thread: ThreadPoolExecutor | None
    lane: Lane | None = None  # the plan in force
    warming: Lane | None = None  # a new plan's, until all its stages answer
    retiring: dict[Lane, asyncio.Task] = field(default_factory=dict)  # old plans' lanes until their generations end
    follower: asyncio.Task | None = None  # reads the route file


def _path_label(path: tuple[int, ...]) -> str:
    """A path as the replica index per stage, e.g. ``0.1.0``."""
    return ".".join(map(str, path))
