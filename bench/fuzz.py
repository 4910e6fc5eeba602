"""Fuzz: 10^5 hostile frames against the stages of a running 3-stage SmolLM2 pipeline.

The pipeline runs as `bloombee up` runs it (LocalBackend, mutual TLS). The frames come from
tests/fuzzing.py: random mutations of good frames (bit flips, overwritten, inserted and deleted
bytes, truncations, extreme header fields; half with the checksum made right again so the damage
reaches the parsers behind it), half to the first stage (token ids) and half to the middle one
(hidden states), plus every hand-crafted attack (zstd bomb, astronomic shapes, deep or oversized
metadata, ...) repeated. Sent as the deployment's operator would be (a valid certificate): what is
tested is what an authenticated but broken or hostile peer can do.

    python bench/fuzz.py [--frames 100000] [--crafted-repeats 50]

Counts per stage: frames sent, answers by status, dropped connections, 5xx; RSS of every process
before and after; a greedy chat before and after must give the same tokens. Writes
bench/results/fuzz.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import crafted_frames, good_frame, mutations, post_frames  # noqa: E402
from pipelines import SMOLLM2, rss_mb  # noqa: E402

CHUNK = 10_000  # frames per progress line


def chat_tokens(endpoint: str) -> list[int]:
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(endpoint + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())["choices"][0]["token_ids"]


def run(frames: int, crafted_repeats: int) -> dict:
    from bloombee_contract.tls import client_context
    from bloombee_operator.backends.local import LocalBackend
    from bloombee_operator.desired import desired_state
    from pipelines import TEST_CA, TEST_TLS, resource_for

    context = client_context(TEST_TLS)
    with tempfile.TemporaryDirectory() as run_dir:
        backend = LocalBackend(Path(run_dir), threads_per_stage=1, ca=TEST_CA)
        desired = desired_state(resource_for(SMOLLM2), backend.model_shape(SMOLLM2), num_stages=3)
        try:
            endpoint = backend.start(desired)
            urls = [str(backend.processes[stage.name].url) for stage in desired.stages]
            hidden_size = backend.model_shape(SMOLLM2).hidden_size
            before = chat_tokens(endpoint)
            rss_start = {name: rss_mb(p.popen.pid) for name, p in backend.processes.items()}
            targets = {
                "first (token ids)": (urls[0], good_frame(torch.tensor([[1, 504, 3458]]), urls[1:])),
                "middle (hidden states)": (urls[1], good_frame(torch.randn(1, 3, hidden_size), urls[2:])),
            }
            results: dict[str, dict] = {}
            started = time.monotonic()
            for seed, (where, (url, good)) in enumerate(targets.items()):
                statuses, sent = post_frames(url, context, []), 0
                while sent < frames // 2:  # in chunks, for progress lines
                    count = min(CHUNK, frames // 2 - sent)
                    statuses += post_frames(url, context, mutations(good, count, seed=seed * 1_000_003 + sent))
                    sent += count
                    print(f"  {where}: {sent}/{frames // 2} mutated frames, {time.monotonic() - started:.0f} s, "
                          f"statuses {dict(statuses)}", flush=True)  # fmt: skip
                results[where] = {"mutated": sent, "statuses": dict(statuses)}
            crafted = crafted_frames(hidden_size, urls[2:])
            attack_statuses = post_frames(urls[1], context, [frame for frame, _ in crafted.values()] * crafted_repeats)
            results["middle (crafted)"] = {"crafted": len(crafted) * crafted_repeats, "statuses": dict(attack_statuses)}
            elapsed = time.monotonic() - started
            rss_end = {name: rss_mb(p.popen.pid) for name, p in backend.processes.items()}
            after = chat_tokens(endpoint)
            return {"frames": frames + len(crafted) * crafted_repeats, "seconds": elapsed, "targets": results,
                    "crafted_kinds": sorted(crafted), "rss_mb_start": rss_start, "rss_mb_end": rss_end,
                    "same_answer_after": before == after, "alive_after": all(
                        p.popen.poll() is None for p in backend.processes.values())}  # fmt: skip
        finally:
            backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000, help="mutated frames, split over two stages")
    parser.add_argument("--crafted-repeats", type=int, default=50, help="times each crafted attack is sent")
    args = parser.parse_args()
    result = run(args.frames, args.crafted_repeats)
    out = ROOT / "bench" / "results" / "fuzz.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'target':<24} {'frames':>7} {'2xx':>6} {'4xx':>6} {'5xx':>4} {'dropped':>7}")
    for where, counts in result["targets"].items():
        statuses = {int(k): v for k, v in counts["statuses"].items()}
        print(f"{where:<24} {sum(statuses.values()):>7} {sum(v for k, v in statuses.items() if 200 <= k < 300):>6} "
              f"{sum(v for k, v in statuses.items() if 400 <= k < 500):>6} "
              f"{sum(v for k, v in statuses.items() if k >= 500):>4} {statuses.get(0, 0):>7}")  # fmt: skip
    print(f"\n{'process':<20} {'RSS MB start':>12} {'end':>8} {'growth':>7}")
    for name, start in result["rss_mb_start"].items():
        end = result["rss_mb_end"][name]
        print(f"{name:<20} {start:>12.0f} {end:>8.0f} {100 * (end / start - 1):>6.1f}%")
    print(f"\n{result['frames']} frames in {result['seconds']:.0f} s; same greedy answer after: "
          f"{result['same_answer_after']}; every process alive: {result['alive_after']}")  # fmt: skip
    print(f"written {out}")


if __name__ == "__main__":
    main()
