"""Planner benchmark: planning time at scale, and simulated DP vs baselines over scenario families.

    python bench/planner.py [--seeds 50]

(a) Wall time of one `plan()` call for 10, 12, 100 and 1000 nodes x 32 and 80 layers (median of 3;
    up to 12 nodes the node order is exact, beyond it the heuristic runs).
(b) For each family (homogeneous; heterogeneous nodes; heterogeneous links with slow WAN links)
    and each seed: plan with the DP and the three baselines (as they run, relaying every hop
    through the client, and their placement alone under push execution), then run every plan in the
    discrete-event simulator, three ways:
    - 8 sequences: users keep 8 sequences in flight (objective throughput);
    - saturation: users ask for more than fits (64 sequences of 2048 tokens). The DP admits the
      number its model says pays (``Plan.batch``); each baseline runs at its best number on the
      same grid, picked by simulating every one (an oracle the DP does not get);
    - latency: per-token latency of a single conversation (objective latency).
    Ratios DP / baseline per seed.

Writes bench/results/planner.json and bench/results/planner.png, and prints tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from bloombee_operator.planner import Link, Links, ModelProfile, Node, Options, PlanningError, Workload, plan
from bloombee_operator.planner.baselines import BASELINES, uncompressed
from bloombee_operator.planner.cost import GATEWAY
from bloombee_operator.planner.dp import batch_sizes
from bloombee_operator.planner.profile import codec_candidates
from bloombee_operator.planner.simulator import simulate

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
# A Llama-2-7B-like model in float16: 32 layers of 202M parameters. BloomBee runs it with
# `compression: auto` (its default): each hop takes the fastest of raw and the codecs, with the
# float16 figures bench/codec.py measured. The baselines send raw hidden states.
LLAMA_7B = ModelProfile(num_layers=32, weight_bytes_per_layer=404e6, kv_bytes_per_token_per_layer=16384,
                        hidden_bytes_per_token=8192, codecs=codec_candidates("float16", "auto"))  # fmt: skip
FAMILIES = ("homogeneous", "heterogeneous-nodes", "heterogeneous-links")
CONTEXT = 2048
SATURATION_DEMAND = 64  # sequences asked for: more than any plan here holds


def gpu(rng: random.Random, name: str, cluster: str, heterogeneous: bool) -> Node:
    if not heterogeneous:
        return Node(name, cluster, 8 * GIB, 0.6e-3, 0.02e-3, 8e9)  # a consumer GPU: 3+ are needed
    kind = rng.choice([(24, 0.35e-3, 16e9), (16, 0.6e-3, 12e9), (8, 1.2e-3, 8e9), (6, 4e-3, 2e9)])
    return Node(name, cluster, kind[0] * GIB, kind[1], kind[1] / 25, kind[2])


def scenario(family: str, seed: int, nodes_count: int = 8, clusters_count: int = 4, model: ModelProfile = LLAMA_7B):
    rng = random.Random(f"{family}-{seed}")
    clusters = [f"c{i}" for i in range(clusters_count)]
    nodes = [
        gpu(rng, f"n{i}", clusters[i % clusters_count], family == "heterogeneous-nodes") for i in range(nodes_count)
    ]
    rng.shuffle(nodes)  # the order servers join in (Petals) or are listed in (equal split)
    links = Links()
    for a, b in itertools.combinations([GATEWAY, *clusters], 2):
        if a == GATEWAY and b == clusters[0]:
            links.between[(a, b)] = Link(0.001, 1.25e9)  # the gateway lives in cluster c0
        elif family == "heterogeneous-links" and rng.random() < 0.5:
            links.between[(a, b)] = Link(rng.uniform(0.08, 0.2), rng.uniform(1.25e6, 12.5e6))  # slow WAN
        else:
            links.between[(a, b)] = Link(rng.uniform(0.005, 0.03), rng.uniform(62.5e6, 125e6))
    return model, nodes, links


def timing(nodes_count: int, layers: int) -> float:
    model = ModelProfile(layers, LLAMA_7B.weight_bytes_per_layer, LLAMA_7B.kv_bytes_per_token_per_layer,
                         LLAMA_7B.hidden_bytes_per_token)  # fmt: skip
    _, nodes, links = scenario("heterogeneous-links", 0, nodes_count, max(2, nodes_count // 10), model)
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        plan(model, nodes, links, Workload(batch=8, context=CONTEXT), Options())
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def exact_at_twelve(seeds: int = 2) -> list[dict]:
    """Exact node order for 12 nodes in 12 clusters (no two alike, so no symmetry to exploit):
    planning time, and what the heuristic beyond the exact limit would have given."""
    rows = []
    for family in FAMILIES:
        for seed in range(seeds):
            model, nodes, links = scenario(family, seed, 12, 12)
            workload = Workload(batch=8, context=CONTEXT)
            started = time.perf_counter()
            exact = plan(model, nodes, links, workload, Options(exact_node_limit=12))
            seconds = time.perf_counter() - started
            heuristic = plan(model, nodes, links, workload, Options(exact_node_limit=8))
            rows.append({"family": family, "seed": seed, "exact_seconds": seconds,
                         "heuristic_over_exact": heuristic.tokens_per_second / exact.tokens_per_second})  # fmt: skip
    return rows


def run_plan(planner, model, nodes, links, workload, options):
    try:
        return planner(model, nodes, links, workload, options)
    except PlanningError:
        return None


def simulated(result, model, nodes, links, workload, saturate: bool) -> tuple[float, float]:
    if result is None:
        return 0.0, math.inf
    outcome = simulate(result, model, {n.name: n for n in nodes}, links, workload.context,
                       arrival_rate=1e6 if saturate else 0.01, requests=4 * result.batch if saturate else 4,
                       tokens_per_request=32)  # fmt: skip
    return outcome.tokens_per_second, outcome.mean_token_latency_s


def saturated(name: str, planner, model, nodes, links) -> dict:
    """Tokens/s when users ask for more sequences than fit, and how many the plan runs at once."""
    demands = [SATURATION_DEMAND] if name.startswith("dp") else batch_sizes(SATURATION_DEMAND)
    best = {"tokens_per_s": 0.0, "sequences": 0}
    for demand in demands:
        workload = Workload(batch=demand, context=CONTEXT)
        result = run_plan(planner, model, nodes, links, workload, Options())
        throughput, _ = simulated(result, model, nodes, links, workload, saturate=True)
        if throughput > best["tokens_per_s"]:
            best = {"tokens_per_s": throughput, "sequences": result.batch}
    return best


def _pushed(baseline):
    return lambda *args: baseline(*args, relay=False)


# "dp (raw)": the DP with compression off, so the gain of compression shows on its own.
COMPARED = [*BASELINES, *(f"{name} (push)" for name in BASELINES), "dp (raw)"]


def compare(family: str, seeds: int) -> dict:
    planners = {"dp": plan, **BASELINES, **{f"{name} (push)": _pushed(fn) for name, fn in BASELINES.items()},
                "dp (raw)": plan}  # fmt: skip
    rows = []
    for seed in range(seeds):
        compressed, nodes, links = scenario(family, seed)
        row = {"seed": seed}
        for name, planner in planners.items():
            model = compressed if name == "dp" else uncompressed(compressed)
            workload = Workload(batch=8, context=CONTEXT)
            throughput, _ = simulated(run_plan(planner, model, nodes, links, workload, Options()), model, nodes,
                                      links, workload, saturate=True)  # fmt: skip
            single = Workload(batch=1, context=CONTEXT)
            _, latency = simulated(run_plan(planner, model, nodes, links, single, Options(objective="latency")),
                                   model, nodes, links, single, saturate=False)  # fmt: skip
            full = saturated(name, planner, model, nodes, links)
            row[name] = {"tokens_per_s": throughput, "latency_ms": latency * 1000,
                         "saturated_tokens_per_s": full["tokens_per_s"],
                         "saturated_sequences": full["sequences"]}  # fmt: skip
        rows.append(row)
    summary = {}
    for name in COMPARED:
        ratios = [r["dp"]["tokens_per_s"] / r[name]["tokens_per_s"] for r in rows if r[name]["tokens_per_s"] > 0]
        full = [r["dp"]["saturated_tokens_per_s"] / r[name]["saturated_tokens_per_s"] for r in rows
                if r[name]["saturated_tokens_per_s"] > 0]  # fmt: skip
        speedups = [r[name]["latency_ms"] / r["dp"]["latency_ms"] for r in rows if math.isfinite(r[name]["latency_ms"])]
        summary[name] = {
            "throughput_ratio_median": statistics.median(ratios) if ratios else None,
            "throughput_ratio_min": min(ratios) if ratios else None,
            "saturated_ratio_median": statistics.median(full) if full else None,
            "saturated_ratio_min": min(full) if full else None,
            "latency_speedup_median": statistics.median(speedups) if speedups else None,
            "latency_speedup_min": min(speedups) if speedups else None,
            "baseline_infeasible": sum(r[name]["tokens_per_s"] == 0 for r in rows),
        }
    return {"rows": rows, "summary": summary}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (eight, full, timing) = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.25
    panels = ((eight, "throughput_ratio_median", "8 sequences in flight"),
              (full, "saturated_ratio_median", f"saturation ({SATURATION_DEMAND} asked for)"))  # fmt: skip
    for axis, key, title in panels:
        for index, name in enumerate(BASELINES):  # the baselines as they run (client relay)
            values = [report["families"][f]["summary"][name][key] or 0 for f in FAMILIES]
            axis.bar([i + index * width for i in range(len(FAMILIES))], values, width, label=f"DP / {name}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.axhline(1.5, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xticks([i + width for i in range(len(FAMILIES))], FAMILIES)
        axis.set_yscale("log")
        axis.set_ylabel("simulated throughput ratio (median of seeds)")
        axis.set_title(f"DP vs baselines, {title}")
        axis.legend()
    for layers in (32, 80):
        points = [(row["nodes"], row["seconds"]) for row in report["timing"] if row["layers"] == layers]
        timing.plot(*zip(*points, strict=True), marker="o", label=f"{layers} layers")
    timing.set_xscale("log")
    timing.set_xlabel("nodes")
    timing.set_ylabel("planning time (s)")
    timing.set_title("planning time")
    timing.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    args = parser.parse_args()

    report: dict = {"benchmark": "planner", "timing": [], "families": {}}
    for nodes_count, layers in itertools.product((10, 12, 100, 1000), (32, 80)):
        seconds = timing(nodes_count, layers)
        report["timing"].append({"nodes": nodes_count, "layers": layers, "seconds": seconds})
        print(f"planning {nodes_count:>5} nodes x {layers} layers: {seconds:.3f} s", file=sys.stderr, flush=True)
    report["exact_12_nodes_12_clusters"] = exact_at_twelve()
    for row in report["exact_12_nodes_12_clusters"]:
        print(f"exact order, 12 nodes in 12 clusters, {row['family']} seed {row['seed']}: "
              f"{row['exact_seconds']:.2f} s (heuristic reaches {row['heuristic_over_exact']:.3f})",
              file=sys.stderr, flush=True)  # fmt: skip
    for family in FAMILIES:
        print(f"simulating {family} x {args.seeds} seeds ...", file=sys.stderr, flush=True)
        report["families"][family] = compare(family, args.seeds)

    never_below = all(
        r["dp"][measure] >= r[name][measure] * (1 - 1e-9)
        for f in FAMILIES for r in report["families"][f]["rows"] for name in COMPARED if name != "dp (raw)"
        for measure in ("tokens_per_s", "saturated_tokens_per_s")
    )  # fmt: skip
    petals_links = report["families"]["heterogeneous-links"]["summary"]["petals"]
    slowest = max(row["seconds"] for row in report["timing"])
    biggest = next(r["seconds"] for r in report["timing"] if r["nodes"] == 1000 and r["layers"] == 80)
    report["targets"] = {
        "dp_never_below_a_baseline_in_simulated_throughput": never_below,
        "dp_over_petals_heterogeneous_links_saturated_median": petals_links["saturated_ratio_median"],
        "dp_over_petals_heterogeneous_links_8_sequences_median": petals_links["throughput_ratio_median"],
        "dp_over_petals_at_least_1.5x_at_saturation": (petals_links["saturated_ratio_median"] or 0) >= 1.5,
        "slowest_planning_s": slowest,
        "slowest_exact_12_nodes_12_clusters_s": max(r["exact_seconds"] for r in report["exact_12_nodes_12_clusters"]),
        "1000_nodes_80_layers_under_1s": biggest < 1.0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))

    print(f"\n{'nodes':>6} {'layers':>6} {'plan s':>8}")
    for row in report["timing"]:
        print(f"{row['nodes']:>6} {row['layers']:>6} {row['seconds']:>8.3f}")
    print(f"\n{'family':<22} {'baseline':<19} {'8 seq x med':>11} {'8 seq x min':>11} {'sat x med':>9} "
          f"{'sat x min':>9} {'lat x med':>9} {'infeasible':>10}")  # fmt: skip
    for family in FAMILIES:
        for name, s in report["families"][family]["summary"].items():

            def fmt(v, width=9):
                return f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}"

            print(f"{family:<22} {name:<19} {fmt(s['throughput_ratio_median'], 11)} "
                  f"{fmt(s['throughput_ratio_min'], 11)} {fmt(s['saturated_ratio_median'])} "
                  f"{fmt(s['saturated_ratio_min'])} {fmt(s['latency_speedup_median'])} "
                  f"{s['baseline_infeasible']:>10}")  # fmt: skip
    print(f"\ntargets: {json.dumps(report['targets'])}\nwritten to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
