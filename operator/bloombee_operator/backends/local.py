"""The local backend: realises a DesiredState as processes on this machine (``bloombee up``).

Each stage and the gateway is a child process (``python -m bloombee_stage.server`` /
``...gateway``) bound to loopback on a free port, announced through a ready file. Logs go to
``<run dir>/<name>.log``; a process that dies while starting is reported with the end of its log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bloombee_operator.reconcile import DesiredState, ModelShape, StageSpec
from bloombee_operator.resource import DistributedLLM

log = logging.getLogger("bloombee.local")


class LocalBackendError(RuntimeError):
    """A local process that failed to start or died."""


@dataclass
class LocalProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path
    module: str
    args: list[str]  # without --host and --ready-file, which _start adds; servers' end with --port N
    url: str | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def same_port_args(self) -> list[str]:
        """Its arguments with ``--port`` pinned to the port it had, so a restart keeps its address."""
        if self.url and self.args[-2:-1] == ["--port"]:
            return [*self.args[:-1], self.url.rsplit(":", 1)[1]]
        return list(self.args)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def model_config(source: str, python: str = sys.executable) -> dict:
    """The model's config.json, read in a child process that converts the model first if needed.

    A child process, because converting needs torch and the control plane never imports it.
    """
    command = [python, "-m", "bloombee_stage.model", source]
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
        stage_args: Mapping[str, list[str]] | None = None,
        link_delay_ms: float = 0.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.host = host
        self.gateway_port = gateway_port
        self.threads_per_stage = threads_per_stage
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.gateway_args = list(gateway_args or [])
        self.stage_args = dict(stage_args or {})  # extra flags by stage name (e.g. --accept-codecs, --log-level)
        # > 0: every link (gateway -> stage 0 -> ... -> last stage -> gateway) goes through a
        # delaying proxy (link_delay.py), so one machine behaves like far-apart clusters.
        self.link_delay_ms = link_delay_ms
        self.processes: dict[str, LocalProcess] = {}

    def model_shape(self, source: str) -> ModelShape:
        """Convert the model if needed (one time) and read its shape."""
        return ModelShape.from_config(model_config(source, self.python))

    def _start(self, name: str, module: str, args: list[str]) -> LocalProcess:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ready_file = self._ready_file(name)
        ready_file.unlink(missing_ok=True)
        log_path = self.run_dir / f"{name}.log"
        command = [self.python, "-m", module, *args, "--host", self.host, "--ready-file", str(ready_file)]
        with open(log_path, "a") as log_file:
            # A session of its own: Ctrl-C in the terminal reaches `bloombee up`, which stops children in order.
            popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        process = LocalProcess(name, popen, log_path, ready_file, module, list(args))
        self.processes[name] = process
        log.info("started %s (pid %d), log: %s", name, popen.pid, log_path)
        return process

    def _wait_ready(self, processes: list[LocalProcess], ready_path: str | None = "/readyz") -> None:
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
                if process.url and (ready_path is None or _http_ok(process.url + ready_path)):
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
        """Start what is missing, restart what changed, stop what is no longer desired; return what
        was started. A stage keeps its port across restarts, so its link proxy and the gateway still
        reach it; the gateway restarts when the stage list or its own arguments change."""
        threads = self.stage_threads(desired)
        wanted = {stage.name: self._stage_args(desired, stage, threads) for stage in desired.stages}
        changed = []
        for name in [n for n in self.processes if self._owned_stage(desired, n) and n.split("-link")[0] not in wanted]:
            self._stop_one(name)
        for name, args in wanted.items():
            current = self.processes.get(name)
            if current is not None and current.alive and current.args[:-2] == args:
                continue
            port = self._port_of(current, 0)
            if current is not None:
                self._stop_one(name)
            self._start(name, "bloombee_stage.server", [*args, "--port", str(port)])
            changed.append(name)
        stages = [self.processes[stage.name] for stage in desired.stages]
        self._wait_ready(stages)
        stage_urls, reply = [str(p.url) for p in stages], []
        if self.link_delay_ms > 0:
            links = [self._ensure_link(f"{p.name}-link", ["--to", str(p.url)]) for p in stages]
            back = self._ensure_link(f"{desired.gateway.name}-link",
                                     ["--to-ready-file", str(self._ready_file(desired.gateway.name))])  # fmt: skip
            self._wait_ready([*links, back], ready_path=None)
            stage_urls, reply = [str(p.url) for p in links], ["--public-url", str(back.url)]
        gateway = desired.gateway
        current = self.processes.get(gateway.name)
        args = ["--model", desired.model_source, "--stages", ",".join(stage_urls), *reply, *gateway.server_args(),
                *self.gateway_args]  # fmt: skip
        if current is None or not current.alive or current.args[:-2] != args:
            port = self._port_of(current, self.gateway_port)  # clients keep the address they know
            if current is not None:
                self._stop_one(gateway.name)
            self._start(gateway.name, "bloombee_stage.gateway", [*args, "--port", str(port)])
            changed.append(gateway.name)
        self._wait_ready([self.processes[gateway.name]], ready_path="/healthz")
        return changed

    def restore(self, desired: DesiredState) -> list[str]:
        """Restart, on their old ports, the processes of ``desired`` that died."""
        dead = [p for p in self.processes.values() if not p.alive and p.name.startswith(desired.name + "-")]
        for process in dead:
            log.warning("%s had died (exit code %s); restarting it on %s", process.name, process.popen.returncode,
                        process.url)  # fmt: skip
        restarted = [self._start(p.name, p.module, p.same_port_args()) for p in dead]
        self._wait_ready([p for p in restarted if p.module == "bloombee_stage.server"])
        self._wait_ready([p for p in restarted if p.module != "bloombee_stage.server"], ready_path=None)
        return [p.name for p in restarted]

    def ready_stages(self, desired: DesiredState) -> int:
        processes = [self.processes.get(stage.name) for stage in desired.stages]
        return sum(1 for p in processes if p is not None and p.alive and p.url and _http_ok(p.url + "/readyz"))

    def endpoint(self, desired: DesiredState) -> str:
        gateway = self.processes.get(desired.gateway.name)
        url = gateway.url if gateway and gateway.url else f"http://{self.host}:{self.gateway_port}"
        return f"{url}/v1"

    def remove(self, resource: object) -> int:
        """Stop every process of the resource (all of them: one resource per backend)."""
        count = len(self.processes)
        self.stop()
        return count

    def measure_links(self, resource: DistributedLLM) -> list[dict]:
        """Every cluster is this machine: one probe process per cluster after the first (behind a
        link delay when emulating far-apart clusters), measured from here for real."""
        from bloombee_stage.probe import measure

        clusters = [cluster.name for cluster in resource.spec.clusters]
        probes = {name: self._start(f"{resource.metadata.name}-probe-{name}", "bloombee_stage.probe",
                                    ["serve", "--port", "0"]) for name in clusters[1:]}  # fmt: skip
        try:
            self._wait_ready(list(probes.values()), ready_path="/healthz")
            targets = {name: str(p.url) for name, p in probes.items()}
            if self.link_delay_ms > 0:
                delayed = {name: self._start_link(f"{p.name}-link", ["--to", str(p.url)]) for name, p in probes.items()}
                self._wait_ready(list(delayed.values()), ready_path=None)
                targets = {name: str(p.url) for name, p in delayed.items()}
            # from the first cluster (the gateway's) to each other one; measure() takes them one by one
            return asyncio.run(measure(clusters[0], targets, bulk_bytes=1 << 20))
        finally:
            for name in [n for n in self.processes if "-probe-" in n]:
                self._stop_one(name)

    def _owned_stage(self, desired: DesiredState, name: str) -> bool:
        return name.startswith(f"{desired.name}-stage-")

    def _ensure_link(self, name: str, args: list[str]) -> LocalProcess:
        current = self.processes.get(name)
        if current is not None and current.alive and current.args[: len(args)] == args:
            return current
        if current is not None:
            self._stop_one(name)
        return self._start_link(name, args)

    def _start_link(self, name: str, args: list[str]) -> LocalProcess:
        delay = ["--delay-ms", f"{self.link_delay_ms:g}"]
        return self._start(name, "bloombee_operator.backends.link_delay", [*args, *delay, "--port", "0"])

    def _ready_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.ready.json"

    def _stage_args(self, desired: DesiredState, stage: StageSpec, threads: int) -> list[str]:
        """A stage's arguments but its port (always last, so a restart can keep the old one)."""
        return [*stage.server_args(desired.model_source), "--threads", str(threads),
                *self.stage_args.get(stage.name, [])]  # fmt: skip

    @staticmethod
    def _port_of(process: LocalProcess | None, default: int) -> int:
        return int(process.url.rsplit(":", 1)[1]) if process is not None and process.url else default

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
