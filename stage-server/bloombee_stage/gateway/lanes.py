"""One plan's way through the stages, as the gateway holds it while the plan serves.

A ``Lane`` owns what belongs to one plan's stages: the route (``bloombee_contract.route``), the
router over their replicas, the pipeline client and micro-batcher that carry its steps (each
naming the plan, so a stage of another plan refuses it), the heartbeats that tell a lost stage,
the seats (the plan's admitted sequences, which its stages' KV budgets were sized for) and the
sessions kept there as prefixes. The engine serves new generations on its lane in force; when the
route changes it warms a lane for the new plan beside it, switches once every new stage answers,
and retires the old lane, which closes after its last generation finishes (or moves over).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import aiohttp
from bloombee_contract.launch import GatewayLaunch
from bloombee_contract.paths import HEALTHZ_PATH, INFO_PATH, READYZ_PATH
from bloombee_contract.route import Route

from bloombee_stage.gateway.batching import MicroBatcher
from bloombee_stage.gateway.pipeline import PipelineClient, ResultRouter
from bloombee_stage.gateway.prefixes import PrefixIndex
from bloombee_stage.gateway.routing import Router
from bloombee_stage.serving.metrics import Metrics

log = logging.getLogger("bloombee.gateway")
HEARTBEAT_S = 1.0  # how often the gateway asks each stage whether it is alive
HEARTBEAT_TIMEOUT_S = 3.0  # a busy stage still answers /healthz within this (it is served off the torch thread)
HEARTBEAT_MISSES = 3  # in a row: the stage is lost
RECHECK_TIMEOUT_S = 1.0  # a lost stage asked again before a request is refused for it


def route_of(settings: GatewayLaunch) -> Route:
    """The route a gateway starts on: its route file's, or the one its flags give (started by hand)."""
    if settings.route_file:
        return with_flags(Route.read(settings.route_file), settings)
    if not settings.stages:
        raise ValueError("give the stages (--stages URL,URL) or a route to follow (--route-file PATH)")
    return with_flags(Route(plan="", stages=settings.stages), settings)


def with_flags(route: Route, settings: GatewayLaunch) -> Route:
    """``route`` with what the gateway's own flags set (--micro-batch, --max-sequences, --relay-hops)
    in place of the plan's: a gateway started by hand, or a test, decides those."""
    return replace(route, micro_batch=settings.micro_batch or route.micro_batch,
                   max_sequences=settings.max_sequences or route.max_sequences,
                   relay_hops=settings.relay_hops or route.relay_hops)  # fmt: skip


class Lane:
    def __init__(self, route: Route, settings: GatewayLaunch, http: aiohttp.ClientSession, results: ResultRouter,
                 reply_url: str, lease: str, metrics: Metrics) -> None:  # fmt: skip
        self.route = route
        self.routing = Router(route.stages, route.micro_batch)
        self.prefixes = PrefixIndex(settings.prefix_cache)
        self.pipeline = PipelineClient(len(route.stages), reply_url, http, results, settings.step_timeout,
                                       relay=settings.relay, relay_hops=list(route.relay_hops) or None, lease=lease,
                                       plan=route.plan or None)  # fmt: skip
        self.batcher = MicroBatcher(self.pipeline, self.routing, route.micro_batch, settings.max_in_flight)
        self.seats = asyncio.Semaphore(route.max_sequences) if route.max_sequences else None
        self.lost_urls: set[str] = set()  # stage replicas that missed their last heartbeats
        self.generations = 0  # generations on this lane now
        self.idle = asyncio.Event()
        self.idle.set()
        self.retired = False  # no new generation comes here; it closes once idle
        self.settings_known = False
        self._metrics = metrics
        self._heartbeats = asyncio.create_task(self._watch_stages())

    @property
    def plan(self) -> str:
        return self.route.plan

    @property
    def urls(self) -> list[str]:
        return self.route.urls

    # -- generations ----------------------------------------------------------------------------

    def join(self) -> None:
        self.generations += 1
        self.idle.clear()

    def leave(self) -> None:
        self.generations -= 1
        if self.generations == 0:
            self.idle.set()

    # -- the stages -----------------------------------------------------------------------------

    async def _watch_stages(self) -> None:
        """Every stage's heartbeat (``/healthz``); one that misses ``HEARTBEAT_MISSES`` in a row is
        lost: the steps that went through it fail at once (their generations replay), instead of
        waiting out the step timeout. Runs until ``close``."""
        misses = dict.fromkeys(self.urls, 0)
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            alive = await asyncio.gather(*(self.pipeline.answers(url, HEALTHZ_PATH, HEARTBEAT_TIMEOUT_S)
                                           for url in misses))  # fmt: skip
            for url, beat in zip(list(misses), alive, strict=True):
                misses[url] = 0 if beat else misses[url] + 1
                (self.lost_urls.add if misses[url] >= HEARTBEAT_MISSES else self.lost_urls.discard)(url)
                if misses[url] == HEARTBEAT_MISSES and not self.retired:
                    log.warning("stage %s missed %d heartbeats: taken as lost", url, HEARTBEAT_MISSES)
                if misses[url] >= HEARTBEAT_MISSES and self.pipeline.lost(url):
                    self._metrics.inc("lost_steps_total", "Steps failed early because a stage stopped answering")

    async def readiness(self) -> dict[str, bool]:
        """Whether each stage replica answers its readiness check now."""
        states = await asyncio.gather(*(self.pipeline.answers(url, READYZ_PATH) for url in self.urls))
        return dict(zip(self.urls, states, strict=True))

    def stages_gone(self) -> list[int]:
        """The stages none of whose replicas answered their last heartbeats."""
        return [index for index, replicas in enumerate(self.route.stages)
                if all(url in self.lost_urls for url in replicas)]  # fmt: skip

    async def recheck_lost_stages(self) -> None:
        """Ask the replicas of a stage taken as gone once more, briefly: a restarted stage answers
        before the next heartbeat would tell."""
        gone = [url for index in self.stages_gone() for url in self.route.stages[index]]
        if not gone:
            return
        answered = await asyncio.gather(*(self.pipeline.answers(url, HEALTHZ_PATH, RECHECK_TIMEOUT_S)
                                          for url in gone))  # fmt: skip
        self.lost_urls.difference_update(url for url, alive in zip(gone, answered, strict=True) if alive)

    async def adopt_stage_settings(self) -> None:
        """Fit what the gateway assumes to what its stages say in /info, once all of them answer.

        The micro-batch is capped at the smallest a stage was planned for: a stage refuses larger
        steps, and a gateway started by hand with a larger --micro-batch would have every full
        step refused and retried row by row. Kept sessions are offered as fork sources only while
        younger than the shortest idle time-out of the stages (which close them after it).
        """
        if self.settings_known:
            return
        http = self.pipeline.http

        async def info(url: str) -> dict:
            async with http.get(url + INFO_PATH, timeout=aiohttp.ClientTimeout(total=5)) as reply:
                return await reply.json() if reply.ok else {}

        try:
            infos = await asyncio.gather(*(info(url) for url in self.urls))
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return  # a stage is not up yet: ask again with the next request
        self.settings_known = True
        limits = [i["micro_batch"] for i in infos if i.get("micro_batch")]
        if limits and min(limits) < self.batcher.micro_batch:
            log.warning("--micro-batch %d is larger than a stage's planned %d; using %d", self.batcher.micro_batch,
                        min(limits), min(limits))  # fmt: skip
            self.batcher.micro_batch = self.routing.micro_batch = min(limits)
        timeouts = [i["session_timeout_s"] for i in infos if i.get("session_timeout_s")]
        if timeouts:
            self.prefixes.max_idle_s = 0.8 * min(timeouts)  # a margin for the stages' sweep and clock drift

    async def close(self) -> None:
        """Stop its heartbeats and micro-batcher (steps in flight fail rather than hang) and close
        the sessions it kept as prefixes."""
        self._heartbeats.cancel()
        await asyncio.gather(self._heartbeats, return_exceptions=True)
        await self.batcher.stop()
        for held in self.prefixes.clear():
            await self.batcher.forget(held.session, held.path)
