"""Does the planner predict what runs? Predicted against measured per-token latency and tokens/s.

For each deployment of SmolLM2 on this machine, run as `bloombee up` runs it (the reconcile steps
driving local processes, mutual TLS):

    local             three nodes of one cluster (examples/smollm2-local.yaml)
    local-25ms        the same behind `--link-delay-ms 25` (a delaying proxy on every link)
    two-clusters      eu (gateway, one node) and us (two nodes) in network namespaces joined by
                      ../shared/tools/wan/tundelay_n.py: 25 ms one way of real packet delay

and at 1, 4 and 16 concurrent generations (greedy, ``ignore_eos``, N new tokens each, every client
asking again as soon as it is answered), this measures per-token latency (the median over
requests of (last token - first token) / (N - 1), from the stream) and tokens/s (tokens streamed
/ wall time), and sets beside them what the planner's model predicts for the running plan at that
load (``planning.at_load``):

    hints     from the resource's hints alone, as a fresh deployment is planned
    feedback  from ``status.profiles`` after feedback: each stage's profiling run, scaled to its
              steps that ran alone in warm-up traffic of the same shape (one row, one
              micro-batch in flight, then all), with traffic's own cost at the sizes it ran
              often; the host's parallelism from that traffic's steps beside each other; and
              the gateway's transport, turnaround and prompt turnover
    simulated the discrete-event simulator on the same measured inputs

    python bench/calibration.py [--deployments local local-25ms two-clusters] [--new-tokens 48]

Writes bench/results/calibration.json, bench/results/calibration.png (with matplotlib) and a table.
Root is needed for the two-cluster deployment (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tls_cost import packet_delay

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16)
DELAY_MS = 25.0
TWO_CLUSTERS = ROOT / "bench" / "data" / "calibration-two-clusters.yaml"
PROMPT = "Tell me about the history of the bicycle, from its invention to today."


def stream_tokens(endpoint: str, model: str, new_tokens: int, index: int) -> tuple[int, float, float]:
    """One streamed completion: (tokens, first token's time, last token's time)."""
    body = json.dumps({"model": model, "prompt": f"{PROMPT} ({index})", "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()  # fmt: skip
    request = urllib.request.Request(f"{endpoint}/completions", data=body, headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(request, timeout=600) as reply:
        for line in reply:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    return len(times), times[0], times[-1]


def load(endpoint: str, model: str, clients: int, new_tokens: int, rounds: int) -> dict:
    """``clients`` clients each asking ``rounds`` times in a row; per-token latency and tokens/s."""
    gaps: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def client(number: int) -> None:
        nonlocal tokens
        for turn in range(rounds):
            count, first, last = stream_tokens(endpoint, model, new_tokens, number * 100 + turn)
            with lock:
                tokens += count
                gaps.append((last - first) / max(1, count - 1))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"per_token_ms": statistics.median(gaps) * 1000, "tokens_per_s": tokens / wall, "requests": len(gaps)}


def gateway_counts(endpoint: str) -> tuple[float, float]:
    """(steps, rows) the gateway has sent so far, from its metrics."""
    with urllib.request.urlopen(endpoint.removesuffix("/v1") + "/metrics", timeout=10) as reply:
        values = dict(line.rsplit(" ", 1) for line in reply.read().decode().splitlines()
                      if line and not line.startswith("#"))  # fmt: skip
    return tuple(float(values.get(f"bloombee_gateway_{name}_sent_total", 0)) for name in ("steps", "rows"))


def traffic(run) -> list[dict]:
    """What each stage measured of the steps it served (``/info``'s profile, from traffic)."""
    from bloombee_contract.paths import INFO_PATH

    found = []
    for stage in run.resource.status.plan.stages:
        process = next(p for p in run.backend.processes.values() if p.launch is not None and p.url and
                       getattr(p.launch, "layers", None) == tuple(stage.layers))  # fmt: skip
        with urllib.request.urlopen(process.url + INFO_PATH, timeout=10, context=run.backend.tls) as reply:
            profile = json.loads(reply.read())["profile"]
        found.append({key: profile.get(key) for key in ("layerMsAt", "stepMsAt", "wallPerCpu", "meanTokens")})
    return found


def predictions(run, concurrency: int, new_tokens: int) -> dict:
    """What the model says of the running plan at ``concurrency``: from hints, and from the profiles."""
    from bloombee_operator.planner.simulator import simulate
    from bloombee_operator.planning import at_load, planner_inputs

    resource = run.resource
    shape = run.backend.model_shape(resource.spec.model.source)
    status = resource.status
    out = {}
    for name, profiles in (("hints", None), ("feedback", status.profiles)):
        inputs = planner_inputs(resource, shape, status.links, profiles)
        costed = at_load(status.plan, inputs, concurrency)
        out[name] = {"per_token_ms": costed.latency_s * 1000, "tokens_per_s": costed.tokens_per_second}
        if name == "feedback":
            nodes = {node.name: node for node in inputs.nodes}
            simulated = simulate(costed, inputs.profile, nodes, inputs.links, inputs.workload.context,
                                 arrival_rate=1e6, requests=concurrency * 4, tokens_per_request=new_tokens,
                                 options=inputs.options)  # fmt: skip
            out["simulated"] = {"per_token_ms": simulated.mean_token_latency_s * 1000,
                                "tokens_per_s": simulated.tokens_per_second}  # fmt: skip
    return out


def threads(resource) -> int:
    """As `bloombee up` gives them: the cores shared out over the resource's nodes."""
    return max(1, (os.cpu_count() or 1) // resource.spec.node_count)


def deployment(name: str, run_dir: Path):
    """(LocalRun, its resource body) for ``name``, not started."""
    from bloombee_operator.api.resource import load_resource
    from bloombee_operator.backends.local import LocalBackend
    from bloombee_operator.cli import LocalRun

    if name == "two-clusters":
        resource = load_resource(TWO_CLUSTERS)
        eu, us = (c.name for c in resource.spec.clusters)
        # eu's parts (the gateway, its stages and probe) and this bench in h0, us's in h1
        where = {eu: ("h0", "10.77.0.2"), us: ("h1", "10.77.1.2")}
        backend = LocalBackend(run_dir, host="10.77.0.2", cluster_namespaces=where, threads_per_stage=threads(resource))
    else:
        resource = load_resource(ROOT / "examples" / "smollm2-local.yaml")
        backend = LocalBackend(run_dir, link_delay_ms=DELAY_MS if name == "local-25ms" else 0.0,
                               threads_per_stage=threads(resource))  # fmt: skip
    body = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    return LocalRun(body, backend, run_dir)


def measure(name: str, new_tokens: int, rounds: int) -> list[dict]:
    from bloombee_operator import reconcile

    with tempfile.TemporaryDirectory(prefix=f"bloombee-calibration-{name}-") as scratch:
        run = deployment(name, Path(scratch))
        try:
            print(f"[{name}] deploying (planned on hints), then profiling", flush=True)
            run.deploy()
            run.keep()
            run.keep()  # first calibration: profiling runs, re-plan under hysteresis
            endpoint, model = run.resource.status.endpoint, run.resource.metadata.name
            plan = run.resource.status.plan
            print(f"[{name}] warm-up traffic, then the gateway's measurements", flush=True)
            # requests of the measured shape (prompts turn over alike): one row, then one micro-batch in
            # flight (steps alone on each stage), then every micro-batch (the same sizes beside each other)
            for clients in sorted({1, plan.micro_batch, plan.batch}):
                load(endpoint, model, clients, new_tokens, 2)
            run.step(reconcile.deploy(run.resource, run.backend, reprofile=True))
            rows = []
            for clients in CONCURRENCY:
                before = gateway_counts(endpoint)
                measured = load(endpoint, model, clients, new_tokens, rounds)
                after = gateway_counts(endpoint)
                steps = after[0] - before[0]
                measured["rows_per_step"] = (after[1] - before[1]) / steps if steps else None
                measured["stages"] = traffic(run)
                predicted = predictions(run, clients, new_tokens)
                row = {"deployment": name, "concurrency": clients, "measured": measured, **predicted}
                for kind in ("hints", "feedback", "simulated"):
                    for metric in ("per_token_ms", "tokens_per_s"):
                        row[kind][f"{metric}_ratio"] = row[kind][metric] / measured[metric]
                print(_line(row), flush=True)
                rows.append(row)
            plan = run.resource.status.plan
            for row in rows:
                row["plan"] = {"stages": [[s.node, list(s.layers)] for s in plan.stages],
                               "micro_batch": plan.micro_batch, "batch": plan.batch}  # fmt: skip
                row["profiles"] = run.resource.status.profiles.dump() if run.resource.status.profiles else None
            return rows
        finally:
            run.backend.stop()


def _line(row: dict) -> str:
    measured = row["measured"]
    ratios = " | ".join(f"{kind} x{row[kind]['per_token_ms_ratio']:.2f} x{row[kind]['tokens_per_s_ratio']:.2f}"
                        for kind in ("hints", "feedback", "simulated") if kind in row)  # fmt: skip
    return (f"{row['deployment']:<14} {row['concurrency']:>3}  measured {measured['per_token_ms']:7.1f} ms/token "
            f"{measured['tokens_per_s']:6.1f} tokens/s | predicted/measured: {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployments", nargs="+", default=["local", "local-25ms", "two-clusters"])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.json"))
    args = parser.parse_args()
    rows = []
    for name in args.deployments:
        if name == "two-clusters" and not args.in_namespace:
            part = Path(tempfile.mkdtemp()) / "two-clusters.json"
            with packet_delay(DELAY_MS, namespaces=2):
                subprocess.run(["ip", "netns", "exec", "h0", sys.executable, __file__, "--in-namespace",
                                "--deployments", name, "--new-tokens", str(args.new_tokens), "--rounds",
                                str(args.rounds), "--out", str(part)], check=True)  # fmt: skip
            rows += json.loads(part.read_text())["results"]
            continue
        rows += measure(name, args.new_tokens, args.rounds)
    Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "rounds": args.rounds, "results": rows},
                                         indent=2))  # fmt: skip
    print()
    for row in rows:
        print(_line(row))
    print(f"\nwritten {args.out}")
    if not args.in_namespace:
        _plot(rows, Path(args.out).with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: pip install -e '.[bench]' for the plot)")
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['deployment']}\nc={r['concurrency']}" for r in rows]
    for axis, metric, title in ((axes[0], "per_token_ms", "per-token latency"), (axes[1], "tokens_per_s", "tokens/s")):
        for kind, marker in (("hints", "x"), ("feedback", "o"), ("simulated", "s")):
            axis.plot(labels, [r[kind][f"{metric}_ratio"] for r in rows], marker, label=kind)
        axis.axhspan(0.8, 1.25, color="green", alpha=0.1)
        axis.axhline(1.0, color="grey", linewidth=0.5)
        axis.set_yscale("log")
        axis.set_title(f"{title}: predicted / measured")
        axis.tick_params(axis="x", labelsize=7)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"written {path}")


if __name__ == "__main__":
    main()
