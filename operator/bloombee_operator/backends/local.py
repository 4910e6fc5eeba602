"""The local backend: realises a DesiredState as processes on this machine (``bloombee up``).

Each stage and the gateway is a child process (``python -m bloombee_stage.server`` /
``...gateway``) bound to loopback on a free port, announced through a ready file. Logs go to
``<run dir>/<name>.log``; a process that dies while starting is reported with the end of its log.
"""

from __future__ import annotations

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

log = logging.getLogger("bloombee.local")


class LocalBackendError(RuntimeError):
    """A local process that failed to start or died."""


@dataclass
class LocalProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path
    url: str | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


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

    def inspect_model(self, source: str) -> ModelShape:
        """Convert the model if needed (one time) and read its shape."""
        return ModelShape.from_config(model_config(source, self.python))

    def _start(self, name: str, module: str, args: list[str]) -> LocalProcess:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ready_file = self._ready_file(name)
        ready_file.unlink(missing_ok=True)
        log_path = self.run_dir / f"{name}.log"
        command = [self.python, "-m", module, *args, "--host", self.host, "--ready-file", str(ready_file)]
        with open(log_path, "w") as log_file:
            # A session of its own: Ctrl-C in the terminal reaches `bloombee up`, which stops children in order.
            popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        process = LocalProcess(name, popen, log_path, ready_file)
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

    def apply(self, desired: DesiredState) -> str:
        """Start every stage, then the gateway; return the OpenAI endpoint once all are ready."""
        threads = self.stage_threads(desired)
        stages = [self._start_stage(desired, stage, threads) for stage in desired.stages]
        self._wait_ready(stages)
        gateway = desired.gateway
        stage_urls = [str(p.url) for p in stages]
        reply = []
        if self.link_delay_ms > 0:
            links = [self._start_link(f"{p.name}-link", ["--to", str(p.url)]) for p in stages]
            back = self._start_link(f"{gateway.name}-link", ["--to-ready-file", str(self._ready_file(gateway.name))])
            self._wait_ready([*links, back], ready_path=None)
            stage_urls, reply = [str(p.url) for p in links], ["--public-url", str(back.url)]
        args = [
            "--model", desired.model_source,
            "--stages", ",".join(stage_urls),
            *reply,
            *gateway.server_args(),
            "--port", str(self.gateway_port),
            *self.gateway_args,
        ]  # fmt: skip
        self._wait_ready([self._start(gateway.name, "bloombee_stage.gateway", args)], ready_path="/healthz")
        return f"{self.processes[gateway.name].url}/v1"

    def _start_link(self, name: str, args: list[str]) -> LocalProcess:
        delay = ["--delay-ms", f"{self.link_delay_ms:g}"]
        return self._start(name, "bloombee_operator.backends.link_delay", [*args, *delay])

    def _ready_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.ready.json"

    def _start_stage(self, desired: DesiredState, stage: StageSpec, threads: int) -> LocalProcess:
        args = [*stage.server_args(desired.model_source), "--threads", str(threads), "--port", "0",
                *self.stage_args.get(stage.name, [])]  # fmt: skip
        return self._start(stage.name, "bloombee_stage.server", args)

    def dead(self) -> list[LocalProcess]:
        return [p for p in self.processes.values() if p.popen.poll() is not None]

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
