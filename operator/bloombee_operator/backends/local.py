"""The local backend: realises a DesiredState as processes on this machine (``bloombee up``).

Each stage and the gateway is a child process started from its launch spec
(``bloombee_contract.launch``) bound to loopback on a free port, announced through a ready file. Logs go to
``<run dir>/<name>.log``; a process that dies while starting is reported with the end of its log.
Every link between them is mutual TLS under a CA minted for the run (``<run dir>/tls/``); the
gateway's OpenAI API stays plain HTTP on its own port.

A new plan is make-before-break: its stages (named with the plan's hash) start beside the
running ones, the gateway's route file (``<run dir>/<gateway>.route.json``) names them once all
are ready, the gateway moves over without a restart, and ``retire`` stops the old plan's stages
once the gateway reports no generation left on them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bloombee_contract.launch import PREPARE_MODEL_MODULE, GatewayLaunch, LaunchSpec, ProbeLaunch, StageLaunch
from bloombee_contract.paths import HEALTHZ_PATH, INFO_PATH, MEASURE_PATH, PROFILE_PATH, READYZ_PATH
from bloombee_contract.route import ROUTE_FILE
from bloombee_contract.tls import client_context

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import NodeProfile
from bloombee_operator.desired import PLAN_NAME_CHARS, DesiredState, StageSpec, stage_plan
from bloombee_operator.faults import Fault
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.pki import DeploymentCA
from bloombee_operator.planning import profile_request
from bloombee_operator.planning_inputs import LOCAL_LINK
from bloombee_operator.reconcile import Switch
from bloombee_operator.shared_host import traffic_parallelism

log = logging.getLogger("bloombee.local")
SWITCH_WAIT_S = 60.0  # a running gateway takes on a new plan's route within this (it reads the file every second)


class LocalBackendError(RuntimeError):
    """A local process that failed to start or died."""


@dataclass
class LocalProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path
    launch: LaunchSpec | None  # a server of the data plane; None for the backend's own link proxies
    command: list[str]
    url: str | None = None
    unhealthy_since: float | None = None  # when it last stopped answering /healthz while alive

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0


def _http_ok(url: str, context: ssl.SSLContext | None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ask_probe(url: str, source: str, targets: Mapping[str, str], context: ssl.SSLContext | None,
               timeout_s: float = 120.0) -> list[dict]:  # fmt: skip
    """Have the probe at ``url`` measure its links to ``targets``: ``status.links`` entries."""
    body = json.dumps({"source": source, "targets": dict(targets), "bulkBytes": 1 << 20}).encode()
    request = urllib.request.Request(url + MEASURE_PATH, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as reply:
            return list(json.loads(reply.read())["links"])
    except urllib.error.HTTPError as error:
        reason = error.read().decode(errors="replace")[:500]
        raise LocalBackendError(f"measuring links from {source}: {reason}") from None
    except (urllib.error.URLError, OSError, KeyError, ValueError) as error:
        raise LocalBackendError(f"measuring links from {source} through {url}: {error}") from None


LOOPBACK_RTT_MS = LOCAL_LINK.rtt_s * 1000  # the planner's own local link, which the delay adds to
LOOPBACK_MBPS = 10000.0


def _post_json(url: str, body: dict, context: ssl.SSLContext | None, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
        return json.loads(reply.read())


def _same_but_address(running: LaunchSpec | None, wanted: LaunchSpec) -> bool:
    """Whether a running server was started as ``wanted`` asks, wherever it listens."""
    if running is None or type(running) is not type(wanted):
        return False
    where = {"host": "", "port": 0, "ready_file": None, "tls_dir": None}
    return replace(running, **where) == replace(wanted, **where)


def model_config(source: str, python: str = sys.executable) -> dict:
    """The model's config.json, read in a child process that converts the model first if needed.

    A child process, because converting needs torch and the control plane never imports it.
    """
    command = [python, "-m", PREPARE_MODEL_MODULE, source]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LocalBackendError(f"preparing model {source!r} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class LocalBackend:
    def __init__(
        self,
        run_dir: Path,
        host: str = "127.0.0.1",
        gateway_port: int = 0,
        threads_per_stage: int | None = None,
        python: str = sys.executable,
        startup_timeout_s: float = 600.0,
        gateway_args: list[str] | None = None,
        stage_args: Mapping[int, list[str]] | None = None,
        link_delay_ms: float = 0.0,
        ca: DeploymentCA | None = None,
        tls: bool = True,
        hung_after_s: float = 30.0,
        namespaces: Mapping[str, tuple[str, str]] | None = None,
        cluster_namespaces: Mapping[str, tuple[str, str]] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.host = host
        self.gateway_port = gateway_port
        self.threads_per_stage = threads_per_stage
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.gateway_args = list(gateway_args or [])
        self.stage_args = dict(stage_args or {})  # extra flags by stage index (e.g. --accept-codecs, --log-level)
        # > 0: every link (gateway -> stage 0 -> ... -> last stage -> gateway) goes through a
        # delaying proxy (link_delay.py), so one machine behaves like far-apart clusters.
        self.link_delay_ms = link_delay_ms
        self.processes: dict[str, LocalProcess] = {}
        # Ports are chosen before anything starts and kept for the run, so every stage can be told
        # its peers' addresses up front (--peers) and a restarted process is found where it was.
        self.ports: dict[str, int] = {}
        self.hung_after_s = hung_after_s
        self.api_key = api_key  # the gateway's --api-key, handed over in its environment
        # process name -> (network namespace, its address): that process runs in the namespace
        # (`ip netns exec`, root only), listening there, e.g. behind real packet delay between
        # namespaces (../shared/tools/wan/). Whoever calls it must reach that address.
        self.namespaces = dict(namespaces or {})
        # cluster -> (network namespace, address): where the stages and probe of each cluster run;
        # the gateway runs in the first cluster's (far-apart clusters on one machine).
        self.cluster_namespaces = dict(cluster_namespaces or {})
        # Every link is mutual TLS under a CA of this run's own (or ``ca``); the backend calls as
        # `operator`. tls=False: plain HTTP (a benchmark's baseline, or debugging with curl).
        self.ca = (ca if ca is not None else DeploymentCA(self.run_dir / "tls", self.run_dir.name)) if tls else None
        self.tls = client_context(self.ca.identity("operator", [])) if self.ca is not None else None

    def model_shape(self, source: str) -> ModelShape:
        """Convert the model if needed (one time) and read its shape."""
        return ModelShape.from_config(model_config(source, self.python))

    def _place(self, process: str, cluster: str | None) -> None:
        """Run ``process`` in its cluster's namespace, where clusters have namespaces."""
        if cluster is not None and cluster in self.cluster_namespaces:
            self.namespaces[process] = self.cluster_namespaces[cluster]

    @property
    def first_cluster(self) -> str | None:
        return next(iter(self.cluster_namespaces), None)

    def _port(self, name: str) -> int:
        """The port ``name`` listens on for this run: one the OS had free when first asked."""
        if name not in self.ports:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))  # a namespace's own port space is emptier still
                self.ports[name] = probe.getsockname()[1]
        return self.ports[name]

    def _url(self, name: str, scheme: str, host_of: str | None = None) -> str:
        """Where ``name`` listens (on the host of process ``host_of``, by default its own)."""
        return f"{scheme}://{self.namespaces.get(host_of or name, (None, self.host))[1]}:{self._port(name)}"

    def _hops(self, desired: DesiredState) -> tuple[list[str], str]:
        """What the parts dial: each stage's URL (its link proxy's, with a link delay) in layer order,
        and the URL stages deliver results to (the gateway's mutual-TLS port, or its link proxy)."""
        scheme = "https" if self.ca is not None else "http"
        gateway = desired.gateway.name
        if self.link_delay_ms > 0:
            return [self._url(f"{s.name}-link", scheme) for s in desired.stages], self._url(f"{gateway}-link", scheme)
        reply = self._url(f"{gateway}-internal", scheme, gateway) if self.ca is not None else self._url(gateway, scheme)
        return [self._url(s.name, scheme) for s in desired.stages], reply

    def _launch(self, name: str, launch: LaunchSpec, port: int = 0) -> LocalProcess:
        """Start a data-plane server from its launch spec, on this backend's host and ``port``."""
        ready_file = self._ready_file(name)
        role = {StageLaunch: "stage", GatewayLaunch: "gateway", ProbeLaunch: "probe"}[type(launch)]
        namespace, host = self.namespaces.get(name, (None, self.host))
        tls = self.ca.identity(f"{role}/{name}", [host, "localhost"]) if self.ca is not None else None
        launch = replace(launch, host=host, port=port, ready_file=str(ready_file),  # type: ignore[type-var]
                         tls_dir=str(tls.directory) if tls is not None else None)  # fmt: skip
        command = launch.command(self.python)
        if namespace is not None:
            command = ["ip", "netns", "exec", namespace, *command]
        return self._spawn(name, command, ready_file, launch)

    def _spawn(self, name: str, command: list[str], ready_file: Path, launch: LaunchSpec | None = None) -> LocalProcess:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ready_file.unlink(missing_ok=True)
        log_path = self.run_dir / f"{name}.log"
        with open(log_path, "a") as log_file:
            # A session of its own: Ctrl-C in the terminal reaches `bloombee up`, which stops children in order.
            environment = {**os.environ, **(launch.environment() if launch is not None else {})}
            popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=environment)  # fmt: skip
        process = LocalProcess(name, popen, log_path, ready_file, launch, command)
        self.processes[name] = process
        log.info("started %s (pid %d), log: %s", name, popen.pid, log_path)
        return process

    def _restart(self, process: LocalProcess) -> LocalProcess:
        """Start a dead process again on the port it had, so whoever knew its address still reaches it."""
        if process.launch is not None:
            return self._launch(process.name, process.launch, process.port)
        command = [*process.command[:-1], str(process.port)]  # a link proxy: its command ends with --port N
        return self._spawn(process.name, command, process.ready_file)

    def _wait_ready(self, processes: list[LocalProcess], ready_path: str | None = READYZ_PATH) -> None:
        """Wait for each process's ready file and, unless ``ready_path`` is None, a 200 from that path."""
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(processes)
        while pending:
            for process in list(pending):
                if process.popen.poll() is not None:
                    raise LocalBackendError(
                        f"{process.name} exited with code {process.popen.returncode} while starting; "
                        f"last lines of {process.log_path}:\n{process.log_tail()}"
                    )
                if process.url is None and process.ready_file.is_file():
                    process.url = json.loads(process.ready_file.read_text())["url"]
                if process.url and (ready_path is None or _http_ok(process.url + ready_path, self.tls)):
                    log.info("%s ready at %s", process.name, process.url)
                    pending.remove(process)
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise LocalBackendError(f"not ready after {self.startup_timeout_s:.0f} s: {names}")
            if pending:
                time.sleep(0.2)

    def stage_threads(self, desired: DesiredState) -> int:
        """Torch threads per stage: the cores shared out, so co-located stages do not fight over them."""
        if self.threads_per_stage:
            return self.threads_per_stage
        return max(1, (os.cpu_count() or 1) // len(desired.stages))

    def start(self, desired: DesiredState) -> str:
        """Start (or bring up to date) every stage and the gateway; return the OpenAI endpoint."""
        self.apply(desired)
        return self.endpoint(desired)

    def apply(self, desired: DesiredState) -> list[str]:
        """Start what is missing, restart what changed, and route the gateway to ``desired``'s stages
        once all are ready; return what was started. A stage keeps its port across restarts, so its
        link proxy and the gateway still reach it. Another plan's stages keep serving until
        ``retire``; the gateway restarts only when its own arguments change (never for a plan)."""
        threads = self.stage_threads(desired)
        self._place(desired.gateway.name, self.first_cluster)
        for stage in desired.stages:
            self._place(stage.name, stage.cluster)
        if self.gateway_port:
            self.ports.setdefault(desired.gateway.name, self.gateway_port)
        hops, reply = self._hops(desired)
        wanted = {stage.name: replace(self._stage_launch(desired, stage, threads), peers=(*hops[i + 1 : i + 2], reply))
                  for i, stage in enumerate(desired.stages)}  # fmt: skip
        changed = []
        for name, launch in wanted.items():
            current = self.processes.get(name)
            if current is not None and current.alive and _same_but_address(current.launch, launch):
                continue
            if current is not None:
                self._stop_one(name)
            self._launch(name, launch, self._port(name))
            changed.append(name)
        stages = [self.processes[stage.name] for stage in desired.stages]
        self._wait_ready(stages)
        if self.link_delay_ms > 0:
            links = [self._ensure_link(f"{p.name}-link", ["--to", str(p.url)]) for p in stages]
            back = self._ensure_link(f"{desired.gateway.name}-link",
                                     ["--to-ready-file", str(self._ready_file(desired.gateway.name)),
                                      "--scheme", "https" if self.tls else "http"])  # fmt: skip
            self._wait_ready([*links, back], ready_path=None)
        gateway = desired.gateway
        route_file = self.run_dir / f"{gateway.name}.{ROUTE_FILE}"
        desired.route(tuple((url,) for url in hops)).write(route_file)
        current = self.processes.get(gateway.name)
        # Behind a link delay the stages reply through the gateway's proxy, whose URL it must tell them.
        launch = gateway.launch(desired.model_source, str(route_file), reply if self.link_delay_ms > 0 else None)
        if self.ca is not None:
            launch = replace(launch, internal_port=self._port(f"{gateway.name}-internal"))
        if self.api_key:
            launch = replace(launch, api_key=self.api_key)
        launch = launch.with_flags(self.gateway_args)
        if current is None or not current.alive or not _same_but_address(current.launch, launch):
            if current is not None:
                self._stop_one(gateway.name)
            self._launch(gateway.name, launch, self._port(gateway.name))  # clients keep it
            changed.append(gateway.name)
        self._wait_ready([self.processes[gateway.name]], ready_path=HEALTHZ_PATH)
        self._wait_switched(desired)
        return changed

    def _wait_switched(self, desired: DesiredState) -> None:
        """Wait until the gateway serves ``desired``'s plan (it warms the new stages, then moves over),
        so what ``apply`` reports is what serves."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while (state := self.gateway_plans(desired)) is None or state.get("plan") != desired.plan_hash:
            if time.monotonic() > deadline:
                log.warning("the gateway has not taken on plan %s after %.0f s (it reports %s)", desired.plan_hash,
                            SWITCH_WAIT_S, state)  # fmt: skip
                return
            time.sleep(0.2)

    def gateway_plans(self, desired: DesiredState) -> dict | None:
        """The gateway's ``/info``: which plan it serves, warms up and drains (None: it does not answer)."""
        gateway = self.processes.get(desired.gateway.name)
        if gateway is None or not gateway.alive or not gateway.url:
            return None
        internal = self._url(f"{desired.gateway.name}-internal", "https") if self.ca is not None else gateway.url
        try:
            with urllib.request.urlopen(internal + INFO_PATH, timeout=10, context=self.tls) as reply:
                return json.loads(reply.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            log.warning("could not ask the gateway what it serves (%s)", error)
            return None

    def retire(self, desired: DesiredState) -> Switch:
        """Stop older plans' stages (and their link proxies) once the gateway serves ``desired``'s
        plan and has no generation left on theirs."""
        current = desired.plan_hash[:PLAN_NAME_CHARS]
        old_names = [name for name in self.processes
                     if stage_plan(desired.name, name.removesuffix("-link")) not in (None, current)]  # fmt: skip
        old = tuple(sorted({str(stage_plan(desired.name, name.removesuffix("-link"))) for name in old_names}))
        if not old:
            return Switch()
        state = self.gateway_plans(desired)
        if state is None:
            return Switch(old, "the gateway to answer")
        serving = state.get("plan")
        if serving != desired.plan_hash:
            return Switch(old, f"the gateway to take on plan {desired.plan_hash} (it serves {serving})",
                          serving=serving)  # fmt: skip
        draining = [lane for lane in state.get("retiring", []) if lane.get("generations")]
        if draining:
            counts = ", ".join(f"{lane['generations']} on plan {lane['plan']}" for lane in draining)
            return Switch(old, f"generations in flight to finish ({counts})", serving=serving)
        for name in old_names:
            self._stop_one(name)
        return Switch(old, "", tuple(old_names), serving)

    def _kill_hung(self, desired: DesiredState) -> None:
        """A server that has not answered ``/healthz`` for ``hung_after_s`` (stopped, deadlocked) is
        killed, so it is restarted like one that died."""
        now = time.monotonic()
        for process in self.processes.values():
            if process.launch is None or not process.alive or not process.url:
                continue
            if not process.name.startswith(desired.name + "-") or _http_ok(process.url + HEALTHZ_PATH, self.tls, 5.0):
                process.unhealthy_since = None
                continue
            process.unhealthy_since = process.unhealthy_since or now
            if now - process.unhealthy_since >= self.hung_after_s:
                log.warning("%s has not answered for %.0f s; killing it to restart it", process.name,
                            now - process.unhealthy_since)  # fmt: skip
                process.popen.kill()
                process.popen.wait()

    def restore(self, desired: DesiredState) -> list[str]:
        """Restart, on their old ports, the processes of ``desired`` that died or hung."""
        self._kill_hung(desired)
        dead = [p for p in self.processes.values() if not p.alive and p.name.startswith(desired.name + "-")]
        for process in dead:
            log.warning("%s had died (exit code %s); restarting it on %s", process.name, process.popen.returncode,
                        process.url)  # fmt: skip
        restarted = [self._restart(p) for p in dead]
        self._wait_ready([p for p in restarted if isinstance(p.launch, StageLaunch)])
        self._wait_ready([p for p in restarted if not isinstance(p.launch, StageLaunch)], ready_path=None)
        return [p.name for p in restarted]

    def ready_stages(self, desired: DesiredState) -> int:
        processes = [self.processes.get(stage.name) for stage in desired.stages]
        return sum(1 for p in processes
                   if p is not None and p.alive and p.url and _http_ok(p.url + READYZ_PATH, self.tls))  # fmt: skip

    def faults(self, desired: DesiredState) -> list[Fault]:
        return []  # a process that dies is restarted and its log shown (restore); there are no pods

    def gateway_ready(self, desired: DesiredState) -> bool:
        gateway = self.processes.get(desired.gateway.name)
        return gateway is not None and gateway.alive and bool(gateway.url) and _http_ok(gateway.url + READYZ_PATH,
                                                                                        self.tls)  # fmt: skip

    def endpoint(self, desired: DesiredState) -> str:
        gateway = self.processes.get(desired.gateway.name)
        url = gateway.url if gateway and gateway.url else f"http://{self.host}:{self.gateway_port}"
        return f"{url}/v1"

    def remove(self, resource: object) -> int:
        """Stop every process of the resource (all of them: one resource per backend)."""
        count = len(self.processes)
        self.stop()
        return count

    def local_links(self, resource: DistributedLLM) -> list[dict]:
        """Behind a link delay every link of a cluster is as slow as one between clusters: each
        cluster with itself at twice the delay (plus loopback's own) round trip."""
        if self.link_delay_ms <= 0:
            return []
        rtt_ms = 2 * self.link_delay_ms + LOOPBACK_RTT_MS
        return [{"from": c.name, "to": c.name, "rttMs": rtt_ms, "mbps": LOOPBACK_MBPS} for c in resource.spec.clusters]

    def measure_links(self, resource: DistributedLLM) -> list[dict]:
        """Every cluster is this machine: one probe process per cluster after the first (behind a
        link delay when emulating far-apart clusters), measured from here for real."""
        clusters = [cluster.name for cluster in resource.spec.clusters]
        for name in clusters:
            self._place(f"{resource.metadata.name}-probe-{name}", name)
        probes = {name: self._launch(f"{resource.metadata.name}-probe-{name}", ProbeLaunch())
                  for name in clusters}  # fmt: skip
        try:
            self._wait_ready(list(probes.values()), ready_path=HEALTHZ_PATH)
            targets = {name: str(p.url) for name, p in probes.items() if name != clusters[0]}
            if self.link_delay_ms > 0:
                delayed = {name: self._start_link(f"{probes[name].name}-link", ["--to", url])
                           for name, url in targets.items()}  # fmt: skip
                self._wait_ready(list(delayed.values()), ready_path=None)
                targets = {name: str(p.url) for name, p in delayed.items()}
            # from the first cluster (the gateway's) to each other one, as a probe pod there would
            return _ask_probe(str(probes[clusters[0]].url), clusters[0], targets, self.tls) + self.local_links(resource)
        finally:
            for name in [n for n in self.processes if "-probe-" in n]:
                self._stop_one(name)

    def measure_profiles(self, desired: DesiredState) -> dict | None:
        """``status.profiles`` for the running stages (None until every one answers): each stage's
        profiling run alone, then all at once (they share this machine: how much of their work it
        does at once is its ``parallelism``, from their traffic where it ran steps both alone and
        beside each other, see ``shared_host``), and what the gateway measured of its rounds."""
        stages = [self.processes.get(stage.name) for stage in desired.stages]
        if any(p is None or not p.alive or not p.url for p in stages):
            return None
        urls = [str(p.url) for p in stages if p is not None]
        body = profile_request(desired.max_micro_batch)
        try:
            alone = [_post_json(url + PROFILE_PATH, body, self.tls) for url in urls]
            with ThreadPoolExecutor(len(urls)) as pool:
                together = list(pool.map(lambda url: _post_json(url + PROFILE_PATH, body, self.tls), urls))
        except (urllib.error.URLError, OSError, ValueError) as error:
            log.warning("could not profile the stages (%s); planning on what was known", error)
            return None
        host = socket.gethostname()
        parallelism = sum(run["seconds"] for run in alone) / max(run["seconds"] for run in together)
        runs, on_traffic, overlapped = traffic_parallelism(alone)
        profiles = {
            "nodes": [NodeProfile.from_run(stage.node, host, run).dump()
                      for stage, run in zip(desired.stages, runs, strict=True)],
            "hosts": [{"name": host, "parallelism": round(max(on_traffic or parallelism, 1e-3), 3),
                       "stages": len(urls), "allNodes": True, "profiled": round(parallelism, 3),
                       "overlappedSteps": overlapped}],
        }
        measured = (self.gateway_plans(desired) or {}).get("profile") or {}
        if measured.get("steps"):
            profiles["gateway"] = measured
        return profiles

    def _ensure_link(self, name: str, args: list[str]) -> LocalProcess:
        current = self.processes.get(name)
        if current is not None and current.alive and current.command[3 : 3 + len(args)] == args:
            return current
        if current is not None:
            self._stop_one(name)
        return self._start_link(name, args, self._port(name))

    def _start_link(self, name: str, args: list[str], port: int = 0) -> LocalProcess:
        """A delaying proxy on ``port`` (0: any; a deployment's links keep theirs, see ``_port``)."""
        ready_file = self._ready_file(name)
        command = [self.python, "-m", "bloombee_operator.backends.link_delay", *args, "--host", self.host,
                   "--ready-file", str(ready_file), "--delay-ms", f"{self.link_delay_ms:g}",
                   "--port", str(port)]  # fmt: skip
        return self._spawn(name, command, ready_file)

    def _ready_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.ready.json"

    def _stage_launch(self, desired: DesiredState, stage: StageSpec, threads: int) -> StageLaunch:
        launch = replace(stage.launch(desired.model_source), threads=threads)
        return launch.with_flags(self.stage_args.get(stage.index, []))

    def dead(self) -> list[LocalProcess]:
        return [p for p in self.processes.values() if not p.alive]

    def _stop_one(self, name: str, grace_s: float = 10.0) -> None:
        process = self.processes.pop(name)
        if process.alive:
            process.popen.send_signal(signal.SIGTERM)
            try:
                process.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        log.info("stopped %s", name)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child (gateway first), then SIGKILL whatever is still there after ``grace_s``."""
        for process in reversed(list(self.processes.values())):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", process.name, grace_s)
                process.popen.kill()
                process.popen.wait()
        self.processes.clear()
