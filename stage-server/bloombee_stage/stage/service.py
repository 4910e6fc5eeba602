"""The stage service: one layer span, its sessions and KV caches, its worker thread, and the
push of each step's output to the next stage (or of the chosen tokens to the gateway). No HTTP
routes here: ``app.py`` serves this over HTTP.

A step is validated before it is accepted (frame, metadata, shape, session, budget); once
accepted the torch work runs on the stage's single worker thread and the output goes to the next
stage or, from the last stage, to the gateway. A failure after acceptance is reported to the
gateway as an error result, so the gateway never waits in vain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch
from bloombee_contract.codec_cost import choose_codec
from bloombee_contract.errors import ErrorCode
from bloombee_contract.paths import CODECS_PATH, LEASE_TIMEOUT_S, RESULT_PATH, STEP_PATH
from bloombee_contract.tls import TlsFiles

from bloombee_stage.model.grammar import GrammarError, GrammarMasks
from bloombee_stage.model.grammar import check as check_grammar
from bloombee_stage.model.offload import stream_bandwidth
from bloombee_stage.model.span import StageModel
from bloombee_stage.serving.costs import CostRecorder, LinkRecorder, StepCost, Stopwatch
from bloombee_stage.serving.metrics import COUNT_BUCKETS, Metrics
from bloombee_stage.serving.process import peer_session, read_error
from bloombee_stage.stage.sessions import Session, SessionError, SessionStore
from bloombee_stage.stage.verify import decide
from bloombee_stage.wire.codec_stats import CodecStats
from bloombee_stage.wire.codecs import CODECS
from bloombee_stage.wire.frame import Frame, WireError, decode_frame, encode_frame, largest_step_bytes
from bloombee_stage.wire.messages import UNPLANNED_ROWS, ResultMeta, RowMeta, RowResult, StepMeta
from bloombee_stage.wire.tensors import frame_tensor, tensor_frame

PROFILE_CONTEXT = 16  # positions in each cache before a profiling run's timed steps, until traffic says
MAX_PROFILE_POSITIONS = 8192  # positions a profiling run's caches may hold, all rows together
PROFILE_WARMUP = 2  # untimed steps of each size first
MAX_PROFILE_STEPS = 64  # rows sizes x repeats a profiling run may ask for
MAX_PROFILE_ROWS = 256  # rows of one timed step (planner.maxMicroBatch's limit)

log = logging.getLogger("bloombee.stage")

# The gateway can be briefly out of reach although it sent the step: its Service may not route to it
# yet (just Ready), or a link blips. A result is small and the gateway drops duplicates, so it is
# sent again for this long before the step is given up (well inside the gateway's step timeout).
DELIVERY_RETRY_S = 20.0
MAX_PEERS = 64  # peers whose codecs are remembered; a deployment has far fewer


@dataclass
class StageSettings:
    name: str = "stage"
    codec: str = "raw"  # for frames sent onward: a codec name, or "auto" (codec_policy decides per frame)
    link_bandwidth: float | None = None  # bytes/s of the link to the next stage, when measured
    accept_codecs: tuple[str, ...] = tuple(CODECS)  # codecs this stage takes from its peers
    tier_bandwidth: dict[str, float] = field(default_factory=dict)  # bytes/s measured at start-up
    kv_budget_bytes: int = 2 << 30
    kv_owner_share: float = 1.0  # of the budget, the most one owner's (gateway's) sessions may reserve
    peers: frozenset[str] | None = None  # the only base URLs a step may go on to or reply to (None: any)
    micro_batch: int | None = None  # the plan's micro-batch: the most rows a step may carry (None: any)
    plan: str | None = None  # the plan this stage serves (its hash): steps routed for another are refused
    session_timeout_s: float = 300.0
    push_timeout_s: float = 60.0
    tls: TlsFiles | None = None  # mutual TLS towards the next stage and the gateway


class Refused(RuntimeError):
    """The next hop answered a step with an error; ``code`` is its reason (e.g. fork_source_gone)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Misrouted(RuntimeError):
    """A step routed for another plan (``wrong_plan``) or to compute from another layer than this
    stage's span starts at (``wrong_span``: its route mixes two plans' stages). Refused before
    anything is computed."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class StageService:
    """Owns the model, the sessions, the worker thread and the outgoing HTTP session."""

    def __init__(self, model: StageModel, settings: StageSettings) -> None:
        self.model = model
        self.settings = settings
        # Structured output is enforced where the token is chosen: on the last stage, per session.
        self.grammars = GrammarMasks(model.model_dir) if model.span.is_last else None
        config = model.full_config
        self.sessions = SessionStore(
            new_cache=model.new_cache,
            kv_bytes_per_token=model.kv_bytes_per_token(),
            kv_budget_bytes=settings.kv_budget_bytes,
            owner_budget_bytes=int(settings.kv_owner_share * settings.kv_budget_bytes),
            timeout_s=settings.session_timeout_s,
            max_length=int(getattr(config, "max_position_embeddings", 1 << 20)),
        )
        # The largest tensor a step may carry: the planned rows, each at most as long as the context
        # or the KV budget allows. Frames are checked against it before their payload is decoded.
        longest = min(self.sessions.max_length, settings.kv_budget_bytes // max(1, model.kv_bytes_per_token()))
        self.max_step_bytes = largest_step_bytes(settings.micro_batch or UNPLANNED_ROWS, max(1, longest),
                                                 model.hidden_size)  # fmt: skip
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.costs = CostRecorder(model.span.length)
        self.onward = LinkRecorder()  # frames pushed to the next stage: the onward link from traffic
        self._http: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.Task | None = None
        self.codec_stats = CodecStats(model.dtype_name)
        self.peer_codecs: dict[str, frozenset[str]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.draining = False
        self.metrics = Metrics("bloombee_stage")
        self.metrics.gauge("sessions", "Open sessions", lambda: len(self.sessions.sessions))
        self.metrics.gauge("kv_reserved_bytes", "KV cache bytes reserved by sessions", self.sessions.reserved_bytes)
        self.metrics.gauge("kv_budget_bytes", "KV cache budget", lambda: settings.kv_budget_bytes)
        self.metrics.gauge("weight_bytes", "Bytes of weights held resident", model.weight_bytes)
        for tier in ("device", "slots", "host", "disk", "packed"):
            self.metrics.gauge(f"weight_{tier}_bytes", f"Weight bytes in the {tier} tier",
                               lambda tier=tier: model.weight_tiers()[tier])  # fmt: skip
        self.metrics.gauge(
            "kv_offloaded_bytes",
            "KV cache bytes reserved on disk",
            lambda: self.sessions.reserved_tokens() * model.kv_bytes_per_token(resident=False),
        )
        if model.streamer is not None:
            stats = model.streamer.stats
            self.metrics.counted("offload_read_bytes_total", "Weight bytes streamed in", lambda: stats.bytes_read)
            self.metrics.counted("offload_stall_seconds_total", "Compute time spent waiting for streamed weights",
                                 lambda: stats.stall_seconds)  # fmt: skip

        self.metrics.gauge("layer_seconds", "Measured seconds per layer per forward (moving average)",
                           lambda: model.layer_ms / 1000)  # fmt: skip
        for name, term, help_text in (
            ("fitted_layer_seconds", "msPerLayer", "Fitted seconds per layer and step, on the steps served"),
            ("fitted_layer_token_seconds", "msPerLayerToken", "Fitted seconds per layer and token of a step"),
        ):
            self.metrics.gauge(name, help_text, lambda term=term: (self.costs.fit().get(term) or 0.0) / 1000)
        self.metrics.gauge("onward_rtt_seconds", "Onward link's round trip as frames sent onward find it",
                           lambda: (self.onward.fit().get("rttMs") or 0.0) / 1000)  # fmt: skip

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Create what needs the event loop (the session to the next stage, the idle-session sweeper)
        and warm up before the server listens: a prefill and decode steps of one row and of the
        plan's micro-batch, so the first real steps (those right after a plan switch moves traffic
        here) do not pay first-call allocations and kernel choices."""
        self._http = peer_session(aiohttp.ClientTimeout(total=self.settings.push_timeout_s), self.settings.tls)
        self._sweeper = asyncio.create_task(self._expire_sessions())
        started, rows = time.perf_counter(), sorted({1, self.settings.micro_batch or 1})
        await asyncio.get_running_loop().run_in_executor(self.executor, self._profile_steps, rows, 1)
        log.info("warmed up with steps of %s rows in %.2f s", rows, time.perf_counter() - started)

    async def stop(self) -> None:
        """Refuse new work, cancel what runs, close what ``start`` made and the torch thread."""
        self.draining = True
        pending = [task for task in (self._sweeper, *self.tasks) if task is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the stage service is not started")
        return self._http

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(self.settings.session_timeout_s / 4, LEASE_TIMEOUT_S / 4)))
            for session_id in self.sessions.expire():
                log.info("session %s closed: idle for %.0f s, or its gateway's lease lapsed", session_id,
                         self.settings.session_timeout_s)  # fmt: skip

    # -- validation -------------------------------------------------------------------------

    def check_inputs(self, meta: StepMeta, inputs: torch.Tensor, frame: Frame) -> None:
        span = self.model.span
        where = frame.describe()
        if self.settings.tls is not None:
            # Onward only over mutual TLS: whatever the route names must prove it is part of this deployment.
            plain = [url for url in (*meta.route, meta.reply_to) if url is not None and not url.startswith("https://")]
            if plain:
                raise WireError(f"{where}: route and reply_to must be https:// URLs of this deployment's parts "
                                f"(it speaks mutual TLS), not {plain[0][:200]!r}")  # fmt: skip
        peers = self.settings.peers
        if peers is not None:
            # The plan's peers only: neither a route nor a reply address can make this stage call
            # another part of the deployment than the next span and its gateway.
            elsewhere = [url for url in (meta.next_url, meta.reply_to and meta.reply_to.removesuffix(RESULT_PATH))
                         if url is not None and url not in peers]  # fmt: skip
            if elsewhere:
                raise WireError(f"{where}: {elsewhere[0][:200]!r} is not one of this stage's peers "
                                f"({', '.join(sorted(peers))})")  # fmt: skip
        planned = self.settings.micro_batch
        if planned and len(meta.rows) > planned:
            raise WireError(f"{where}: {len(meta.rows)} rows in one step; this stage was planned for micro-batches "
                            f"of at most {planned} (its KV and activation budgets assume that)")  # fmt: skip
        if span.is_first:
            if frame.dtype not in ("int64", "int32") or inputs.dim() != 2:
                raise WireError(
                    f"{where}: the first stage takes token ids [batch, seq] int64, got "
                    f"{list(frame.shape)} {frame.dtype}"
                )
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.model.config.vocab_size):
                raise WireError(f"{where}: token id outside 0..{self.model.config.vocab_size - 1}")
        elif (
            frame.dtype not in ("float32", "float16", "bfloat16")
            or inputs.dim() != 3
            or inputs.shape[-1] != self.model.hidden_size
        ):
            raise WireError(
                f"{where}: expected hidden states [batch, seq, {self.model.hidden_size}] float, got "
                f"{list(frame.shape)} {frame.dtype}"
            )
        if inputs.shape[0] != len(meta.rows) or inputs.shape[1] != meta.width:
            raise WireError(f"{where}: {len(meta.rows)} rows of up to {meta.width} positions need a tensor "
                            f"[{len(meta.rows)}, {meta.width}, ...], got {list(frame.shape)}")  # fmt: skip
        vocab = int(self.model.full_config.vocab_size)
        for index, row in enumerate(meta.rows):
            drafted = row.draft + [token for pairs in row.draft_probs or [] for token, _ in pairs]
            if any(not 0 <= token < vocab for token in drafted):
                raise WireError(f"{where}: row {index} ({row.session}) drafts a token outside 0..{vocab - 1}")
            if row.sampling.grammar is not None and span.is_last:  # the stage that chooses tokens applies it
                try:
                    check_grammar(row.sampling.grammar)
                except GrammarError as error:
                    raise WireError(f"{where}: row {index} ({row.session}): {error}") from None
            named = [token for token, _ in row.sampling.logit_bias] + (row.context.token_ids() if row.context else [])
            if any(not 0 <= token < vocab for token in named):
                raise WireError(f"{where}: row {index} ({row.session}) names a token outside 0..{vocab - 1} in its "
                                "sampling parameters or context")  # fmt: skip
        if span.is_last and meta.route:
            raise WireError(f"{where}: route continues to {meta.route[0]} past the model's last layer")
        if not span.is_last and not meta.route:
            raise WireError(f"{where}: route ends at layer {span.end} of {span.total}; no stage holds the rest")

    def admit(self, meta: StepMeta) -> list[Session]:
        """Open or find every row's session (``meta.owner``'s) and reserve its room; all rows or none."""
        admitted: list[Session] = []
        try:
            for row in meta.rows:
                session = self.sessions.admit(row.session, row.start, row.length, row.max_length, row.fork,
                                              meta.owner, meta.lease)  # fmt: skip
                admitted.append(session)
                if row.tree_path and row.start - len(row.tree_path) + row.tree_path[-1] >= session.length:
                    raise SessionError(f"session {row.session!r} holds {session.length} positions; its tree_path "
                                       f"names node {row.tree_path[-1]} of a tree past them", ErrorCode.POSITION_GAP)
        except SessionError:
            for session in admitted:  # a session this step opened and never used is not left behind
                if session.length == 0:
                    self.sessions.close(session.id)
            raise
        return admitted

    def accept(self, body: bytes, owner: Callable[[str | None], str | None] = lambda claimed: claimed,
               ) -> tuple[StepMeta, torch.Tensor, list[Session]]:  # fmt: skip
        """A step frame decoded, checked (``check_inputs``, the codec) and its sessions admitted.

        ``owner``: whose sessions the step may touch, given the owner the frame claims (the caller's
        certificate decides; app.session_owner). Raises WireError, ValidationError, Misrouted or
        SessionError."""
        frame = decode_frame(body, self.max_step_bytes)
        meta = StepMeta.model_validate(frame.meta)
        meta = meta.model_copy(update={"owner": owner(meta.owner)})
        inputs = frame_tensor(frame)
        self.check_inputs(meta, inputs, frame)
        span, plan = self.model.span, self.settings.plan
        if meta.plan is not None and plan is not None and meta.plan != plan:
            raise Misrouted(f"step {meta.step} was routed for plan {meta.plan}, but this stage serves plan {plan}: "
                            "the gateway's route is another plan's (a plan switch); nothing was computed",
                            ErrorCode.WRONG_PLAN)  # fmt: skip
        if meta.layer != span.start:
            raise Misrouted(f"step {meta.step} was routed to compute from layer {meta.layer}, but this stage serves "
                            f"layers [{span.start}, {span.end}) of {span.total}: the route mixes the stages of two "
                            "plans (a re-plan is rolling out); nothing was computed", ErrorCode.WRONG_SPAN)  # fmt: skip
        if frame.codec not in self.settings.accept_codecs:
            accepted = ", ".join(sorted(self.settings.accept_codecs))
            raise WireError(f"{frame.describe()}: codec {frame.codec!r} is not accepted here (accepts {accepted}); "
                            f"peers must ask {CODECS_PATH} when a session opens")  # fmt: skip
        return meta, inputs, self.admit(meta)

    # -- work -------------------------------------------------------------------------------

    def _compute(self, sessions: list[Session], meta: StepMeta, inputs: torch.Tensor) -> torch.Tensor | list[RowResult]:
        """Runs on the worker thread: hidden states onward, or on the last stage each row's result."""
        watch = Stopwatch()
        for session, row in zip(sessions, meta.rows, strict=True):
            if session.fork_source is not None:
                self.model.copy_prefix(session.fork_source.cache, session.cache, session.fork_length)
                session.length, session.fork_source = session.fork_length, None
                self.metrics.inc("forked_tokens_total", "Prompt positions copied from a fork source, not computed",
                                 session.length)  # fmt: skip
            self.model.rewind(session.cache, row.start, row.tree_path)  # the last tree's accepted nodes kept
        lengths = [row.length for row in meta.rows]
        keep = [row.length if row.prompt_logprobs is not None else len(row.draft) + 1 for row in meta.rows]
        trees = [row.tree for row in meta.rows]
        features = [row.features + len(row.draft) if row.features else 0 for row in meta.rows]
        asks = self.model.has_head and any(features)
        output = self.model.forward_rows(inputs, [session.cache for session in sessions], lengths, keep, trees,
                                         features if asks else None, any(row.draft for row in meta.rows))  # fmt: skip
        for session, row in zip(sessions, meta.rows, strict=True):
            session.length = row.start + row.length
        if asks:
            output, hidden = output
        if isinstance(output, list):
            output = [decide(logits, row, self.grammars) for logits, row in zip(output, meta.rows, strict=True)]
            if asks:
                for result, row, states in zip(output, meta.rows, hidden, strict=True):
                    attach_features(result, row, states)
        wall, cpu = watch.lap()
        layers_wall, layers_cpu = self.model.last_layers_s
        context = sum(session.length for session in sessions) / len(sessions)
        self.costs.record(StepCost(sum(lengths), len(lengths), layers_wall, layers_cpu, max(0.0, wall - layers_wall),
                                   max(0.0, cpu - layers_cpu), watch.started, context))  # fmt: skip
        return output

    async def profile_run(self, rows: list[int], repeats: int) -> dict[str, Any]:
        """Time decode steps of ``rows`` rows on this span, on the compute thread between traffic's
        steps: the planner's terms for this stage with nothing of ours competing (``/profile``)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        fitted = await loop.run_in_executor(self.executor, self._profile_steps, rows, repeats)
        return {"profile": fitted, "seconds": round(time.perf_counter() - started, 4), "last": self.model.span.is_last,
                "served": {**self.served_profile(), "busy": self.costs.busy()}}  # fmt: skip

    def _profile_steps(self, rows: list[int], repeats: int) -> dict[str, object]:
        recorder = CostRecorder(self.model.span.length)
        # a context first, so the timed steps attend over what decode steps attend over: as long as
        # traffic's rows held (gathering rows' caches for a step costs with their length), within a
        # bound on the positions a run holds
        served = round(self.costs.mean_context()) or PROFILE_CONTEXT
        for count in rows:
            context = max(1, min(served, MAX_PROFILE_POSITIONS // count))
            caches = [self.model.new_cache() for _ in range(count)]
            self.model.forward_rows(self._dummy_inputs(count, context), caches, [context] * count)
            for timed in range(PROFILE_WARMUP + repeats):
                watch = Stopwatch()
                output = self.model.forward_rows(self._dummy_inputs(count, 1), caches, [1] * count)
                if isinstance(output, list):  # the last stage also picks a token per row
                    [int(logits[-1].argmax()) for logits in output]
                wall, cpu = watch.lap()
                layers_wall, layers_cpu = self.model.last_layers_s
                if timed < PROFILE_WARMUP:  # the first steps of a size allocate what later ones reuse
                    continue
                recorder.record(StepCost(count, count, layers_wall, layers_cpu, max(0.0, wall - layers_wall),
                                         max(0.0, cpu - layers_cpu), context=context + 1 + timed))  # fmt: skip
        return recorder.fit()

    def _dummy_inputs(self, rows: int, positions: int) -> torch.Tensor:
        if self.model.span.is_first:
            return torch.zeros(rows, positions, dtype=torch.int64)
        generator = torch.Generator().manual_seed(rows * 1000 + positions)
        return torch.randn(rows, positions, self.model.hidden_size, generator=generator)

    async def run_step(self, sessions: list[Session], meta: StepMeta,
                       inputs: torch.Tensor) -> tuple[torch.Tensor | list[RowResult], StepMeta]:  # fmt: skip
        """Compute a step; the metadata that goes on carries this stage's forward time."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        async with contextlib.AsyncExitStack() as held:
            for session in sorted(sessions, key=lambda s: s.id):  # one order everywhere: no deadlock
                await held.enter_async_context(session.lock)
            output = await loop.run_in_executor(self.executor, self._compute, sessions, meta, inputs)
        seconds = time.perf_counter() - started
        self.metrics.observe("forward_seconds", "Time in the span's forward pass", seconds)
        self.metrics.observe("micro_batch_rows", "Rows (sessions) per step", len(meta.rows), COUNT_BUCKETS)
        self.metrics.inc("tokens_total", "Positions processed", sum(row.length for row in meta.rows))
        timed = meta.model_copy(update={"compute_ms": [*meta.compute_ms, seconds * 1000]})
        return output, timed

    def result_frame(self, meta: StepMeta, rows: list[RowResult]) -> Frame:
        """The rows' tokens in the metadata; their hidden states, where asked, as the tensor (float16
        [sum of rows' features, hidden], in row order)."""
        result = ResultMeta(step=meta.step, rows=rows, compute_ms=meta.compute_ms)
        states = [row.hidden for row in rows if row.features]
        tensor = torch.cat(states).to(torch.float16) if states else torch.empty(0, dtype=torch.int64)
        return tensor_frame(tensor, result.model_dump(exclude_none=True, exclude_defaults=True))

    async def answer(self, meta: StepMeta, inputs: torch.Tensor, sessions: list[Session]) -> bytes:
        """Compute an accepted step and answer inline (the caller relays, Petals' way): the result
        frame from the last stage, else the hidden states as the next stage takes them."""
        output, meta = await self.run_step(sessions, meta, inputs)
        if isinstance(output, list):
            return encode_frame(self.result_frame(meta, output))
        return self.encode_onward(self.onward_frame(meta, output), frozenset(CODECS))

    def onward_frame(self, meta: StepMeta, hidden: torch.Tensor) -> Frame:
        """This stage's hidden states as the next stage takes them: the route less this hop, and the
        layer to go on from (this span's end)."""
        return tensor_frame(hidden, meta.onward(self.model.span.end).wire())

    async def push(self, meta: StepMeta, inputs: torch.Tensor, sessions: list[Session]) -> None:
        """Background part of an accepted step: compute, then push onward or answer the gateway."""
        try:
            output, meta = await self.run_step(sessions, meta, inputs)
            if isinstance(output, list):
                await self.deliver(meta.reply_to, encode_frame(self.result_frame(meta, output)))
                return
            url = meta.next_url
            assert url is not None  # check_inputs refused hidden states with nowhere to go
            accepted = await self.peer_accepts(url)
            body = self.encode_onward(self.onward_frame(meta, output), accepted)
            try:
                sent = time.perf_counter()
                await self._post(url + STEP_PATH, body, expect=202)
                self.onward.record(len(body), time.perf_counter() - sent)
            except aiohttp.ClientConnectionError as error:  # the next stage is gone: the gateway may route around it
                self.metrics.inc("errors_total", "Failed steps", code="next_unreachable")
                message = f"cannot reach the next stage {url}: {error}"
                await self.report(meta, message, ErrorCode.STAGE_UNREACHABLE, unreachable=url)
        except asyncio.CancelledError:
            raise
        except Refused as error:  # the next stage refused the step: its reason goes to the gateway as it is
            log.warning("step %s (%d rows) refused downstream: %s", meta.step, len(meta.rows), error)
            self.metrics.inc("errors_total", "Failed steps", code="downstream")
            await self.report(meta, str(error), error.code)
        except Exception as error:  # anything that goes wrong after the 202 is reported, never swallowed
            log.warning("step %s (%d rows) failed: %s", meta.step, len(meta.rows), error)
            self.metrics.inc("errors_total", "Failed steps", code="downstream")
            await self.report(meta, str(error), ErrorCode.STAGE_FAILED)

    async def peer_accepts(self, url: str) -> frozenset[str]:
        """The codecs a peer decodes (asked once per peer; raw alone when it cannot say)."""
        if url not in self.peer_codecs:
            try:
                async with self.http.get(url + CODECS_PATH, timeout=aiohttp.ClientTimeout(total=10)) as reply:
                    accepted = frozenset((await reply.json())["codecs"]) & set(CODECS) if reply.ok else set()
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as error:
                log.warning("could not ask %s for its codecs (%s); sending raw frames", url, error)
                return frozenset({"raw"})
            if len(self.peer_codecs) >= MAX_PEERS:  # bounded: forget the peer asked first
                self.peer_codecs.pop(next(iter(self.peer_codecs)))
            self.peer_codecs[url] = frozenset(accepted | {"raw"})
            log.info("peer %s decodes %s", url, sorted(self.peer_codecs[url]))
        return self.peer_codecs[url]

    def encode_onward(self, frame: Frame, accepted: frozenset[str]) -> bytes:
        """Encode a hidden-state frame with the configured codec, or the one ``auto`` finds fastest for the link."""
        setting = self.settings.codec
        if setting == "auto":
            if self.settings.link_bandwidth:
                self.codec_stats.maybe_sample(frame.data)
            codec = choose_codec(len(frame.data), self.settings.link_bandwidth, self.codec_stats.profiles, accepted)
        else:
            codec = setting if setting in accepted else "raw"
        body = encode_frame(frame, codec)
        self.metrics.inc("bytes_sent_total", "Frame bytes sent onward", len(body), codec=codec)
        self.metrics.inc("raw_bytes_sent_total", "Tensor bytes sent onward before compression", len(frame.data))
        return body

    async def _post(self, url: str, body: bytes, expect: int) -> None:
        async with self.http.post(url, data=body, headers={"Content-Type": "application/octet-stream"}) as reply:
            if reply.status != expect:
                message, code = await read_error(reply, ErrorCode.STAGE_FAILED)
                raise Refused(f"{url} answered {reply.status}: {message}", code)

    async def deliver(self, reply_to: str, body: bytes) -> None:
        """POST a result frame to the gateway, again on connection errors for ``DELIVERY_RETRY_S``."""
        deadline, pause = time.monotonic() + DELIVERY_RETRY_S, 0.25
        while True:  # bounded by the deadline
            try:
                await self._post(reply_to, body, expect=200)
                return
            except aiohttp.ClientConnectionError as error:
                if time.monotonic() + pause > deadline:
                    raise
                self.metrics.inc("delivery_retries_total", "Result frames sent again after a connection error")
                log.warning("result not delivered to %s (%s); again in %.2f s", reply_to, error, pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, 4.0)

    async def report(self, meta: StepMeta, message: str, code: str, unreachable: str | None = None) -> None:
        if not meta.reply_to:
            return
        result = ResultMeta(step=meta.step, error=message, code=code, stage=self.settings.name, unreachable=unreachable)
        body = encode_frame(tensor_frame(torch.empty(0, dtype=torch.int64), result.model_dump()))
        try:
            await self.deliver(meta.reply_to, body)
        except Exception as error:
            log.error("could not report failure of step %s to %s: %s", meta.step, meta.reply_to, error)

    def stream_bps(self) -> float | None:
        """The rate this stage streams offloaded weights and KV at (measured at start-up, for the
        tier it streams from, or would), the planner's host bandwidth; None where unmeasured."""
        bandwidth = self.settings.tier_bandwidth
        if not bandwidth:
            return None
        model = self.model
        tier = model.streamer.tier if model.streamer else ("host" if model.device.type == "cuda" else "disk")
        offloaded = model.streamer.offloaded_bytes() if model.streamer else model.weight_bytes()
        return round(stream_bandwidth(bandwidth, tier, offloaded))

    def served_profile(self) -> dict[str, Any]:
        """What this stage measured of the traffic it served: its steps' costs, its onward link, the
        rate it streams offloaded bytes at (``/info``'s profile, and beside each ``/profile`` run)."""
        return {**self.costs.fit(), "onward": self.onward.fit(), "streamBps": self.stream_bps()}

    def info(self) -> dict[str, Any]:
        model = self.model
        return {
            "name": self.settings.name,
            "span": [model.span.start, model.span.end],
            "total_layers": model.span.total,
            "hidden_size": model.hidden_size,
            "dtype": model.dtype_name,
            "device": str(model.device),
            "codec": self.settings.codec,
            "micro_batch": self.settings.micro_batch,
            "session_timeout_s": self.settings.session_timeout_s,
            "accepts_codecs": sorted(self.settings.accept_codecs),
            "link_bandwidth": self.settings.link_bandwidth,
            "codec_profiles": self.codec_stats.describe(),
            "offload": {
                "weights": model.offload.weights,
                "kv": model.offload.kv,
                "prefetch": model.offload.prefetch,
                "tier": model.streamer.tier if model.streamer else None,
                "weight_tiers": model.weight_tiers(),
                "kv_bytes_per_token": {
                    "device": model.kv_bytes_per_token(),
                    "disk": model.kv_bytes_per_token(resident=False),
                },
                "tier_bandwidth": self.settings.tier_bandwidth,
                "stream": model.streamer.describe() if model.streamer else None,
            },
            "memory": {
                "weight_bytes": model.weight_bytes(),
                "kv_budget_bytes": self.settings.kv_budget_bytes,
                "kv_reserved_bytes": self.sessions.reserved_bytes(),
                "kv_bytes_per_token": self.sessions.kv_bytes_per_token,
                "rss_bytes": _rss_bytes(),
            },
            "sessions": len(self.sessions.sessions),
            "ms_per_layer": model.layer_ms,
            "profile": self.served_profile(),
            "load_seconds": model.load_seconds,
            "torch_threads": torch.get_num_threads(),
        }


def attach_features(result: RowResult, row: RowMeta, states: torch.Tensor) -> None:
    """The hidden states a draft head needs from a verified row: its last ``row.features``
    undrafted positions, then its accepted drafted ones (``states``: the row's last
    ``features + len(draft)`` positions)."""
    undrafted = states[: row.features]
    accepted = result.path if result.path is not None else list(range(len(result.tokens) - 1))
    drafted = states[row.features :][accepted] if accepted else states[:0]
    result.hidden = torch.cat([undrafted, drafted]).cpu()
    result.features = int(result.hidden.shape[0])


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
