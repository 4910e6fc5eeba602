"""What mutual TLS on every link costs per token: a 3-stage SmolLM2 pipeline with and without it,
measured in one run, on loopback and over links that add a delay each way.

The delay comes from `bloombee up`'s delaying TCP proxy (`--link-delay-ms`): TLS records pass
through it unchanged, so it delays the handshake and every record as a WAN link would, but it is
not packet-level delay (`scripts/pod_wan.py` is, between network namespaces).

    python bench/tls_cost.py [--new-tokens 32] [--repeats 3] [--delays 0 20]

Per-token latency is (time for N tokens - time for 1) / (N - 1), the median over prompts x
repeats; both arms must give the same greedy tokens. Writes bench/results/tls_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_local import PROMPTS, ROOT, SMOLLM2, post, summarise, timed


def measure(tls: bool, delay_ms: float, prompts: list[str], new_tokens: int, repeats: int) -> tuple[dict, list]:
    from bloombee_operator.backends.local import LocalBackend
    from bloombee_operator.desired import desired_state

    sys.path.insert(0, str(ROOT / "tests"))
    from pipelines import resource_for

    with tempfile.TemporaryDirectory() as run_dir:
        backend = LocalBackend(Path(run_dir), threads_per_stage=1, link_delay_ms=delay_ms, tls=tls)
        try:
            endpoint = backend.start(desired_state(resource_for(SMOLLM2), backend.model_shape(SMOLLM2), num_stages=3))
            runs, outputs = [], []

            def ask(prompt: str, n: int) -> dict:
                return post(endpoint, {"model": "smollm2", "prompt": prompt, "max_tokens": n, "temperature": 0,
                                       "ignore_eos": True, "return_token_ids": True})  # fmt: skip

            for prompt in prompts:
                ask(prompt, 2)  # warm-up: connections (and TLS sessions) open
                outputs.append(ask(prompt, new_tokens)["choices"][0]["token_ids"])
                for _ in range(repeats):
                    runs.append((timed(lambda p=prompt: ask(p, new_tokens)), timed(lambda p=prompt: ask(p, 1))))
            name = f"{'mTLS' if tls else 'plain'}, {delay_ms:g} ms"
            return {**summarise(name, runs, new_tokens), "tls": tls, "delay_ms": delay_ms}, outputs
        finally:
            backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 20.0])
    args = parser.parse_args()
    rows = []
    for delay in args.delays:
        plain, plain_tokens = measure(False, delay, PROMPTS, args.new_tokens, args.repeats)
        secure, secure_tokens = measure(True, delay, PROMPTS, args.new_tokens, args.repeats)
        if plain_tokens != secure_tokens:
            raise SystemExit(f"delay {delay}: TLS changed the tokens")
        secure["vs_plain"] = secure["per_token_ms"] / plain["per_token_ms"]
        rows += [plain, secure]
    out = ROOT / "bench" / "results" / "tls_cost.json"
    out.write_text(json.dumps({"new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows}, indent=2))
    print(f"{'mode':<18} {'ms/token':>9} {'tokens/s':>9} {'vs plain':>9}")
    for row in rows:
        ratio = f"{row['vs_plain']:.3f}" if "vs_plain" in row else "1"
        print(f"{row['mode']:<18} {row['per_token_ms']:>9.2f} {row['tokens_per_s']:>9.2f} {ratio:>9}")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
