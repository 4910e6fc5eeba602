"""What mutual TLS on every link costs per token: a 3-stage SmolLM2 pipeline with and without it,
measured in one run, on loopback and over links that add a delay each way.

The delay comes from `bloombee up`'s delaying TCP proxy (`--link-delay-ms`): TLS records pass
through it unchanged, so it delays the handshake and every record as a WAN link would, but it is
not packet-level delay. With `--wan` it is: every part runs in a network namespace of its own
(gateway in h0, stage i in h(i+1)) joined by ../shared/tools/wan/tundelay_n.py, which holds every
packet (handshakes and ACKs included) for the one-way delay (root only).

    python bench/tls_cost.py [--new-tokens 32] [--repeats 3] [--delays 0 20] [--wan]

Per-token latency is (time for N tokens - time for 1) / (N - 1), the median over prompts x
repeats; both arms must give the same greedy tokens. Writes bench/results/tls_cost.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_local import PROMPTS, ROOT, SMOLLM2, post, summarise, timed

TUNDELAY = ROOT.parent / "shared" / "tools" / "wan" / "tundelay_n.py"
STAGES = 3


@contextmanager
def packet_delay(delay_ms: float, namespaces: int = STAGES + 1) -> Iterator[None]:
    """Namespaces h0..h(n-1) joined with ``delay_ms`` one way between every pair, for the block's length."""
    last = namespaces - 1
    router = subprocess.Popen([sys.executable, str(TUNDELAY), "up", str(last), f"{delay_ms:g}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while f"h{last}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
            if router.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("tundelay_n.py did not bring the namespaces up (root is needed)")
            time.sleep(0.2)
        time.sleep(1.0)  # its delay loop opens the TUN device after the namespaces
        yield
    finally:
        router.terminate()
        router.wait()
        subprocess.run([sys.executable, str(TUNDELAY), "down"], capture_output=True)


def measure(tls: bool, delay_ms: float, prompts: list[str], new_tokens: int, repeats: int,
            wan: bool = False) -> tuple[dict, list]:  # fmt: skip
    """With ``wan`` this process runs in h0 (see main), as does the gateway; stage i runs in h(i+1)."""
    from bloombee_operator.backends.local import LocalBackend
    from bloombee_operator.desired import desired_state

    sys.path.insert(0, str(ROOT / "tests"))
    from pipelines import resource_for

    with tempfile.TemporaryDirectory() as run_dir:
        placed = {"host": "10.77.0.2", "namespaces": {f"smollm2-stage-{i}": (f"h{i + 1}", f"10.77.{i + 1}.2")
                                                      for i in range(STAGES)}} if wan else {}  # fmt: skip
        backend = LocalBackend(Path(run_dir), threads_per_stage=1, link_delay_ms=0.0 if wan else delay_ms, tls=tls,
                               **placed)  # fmt: skip
        try:
            endpoint = backend.start(desired_state(resource_for(SMOLLM2), backend.model_shape(SMOLLM2),
                                                   num_stages=STAGES))  # fmt: skip
            runs, outputs = [], []

            def ask(prompt: str, n: int) -> dict:
                return post(endpoint, {"model": "smollm2", "prompt": prompt, "max_tokens": n, "temperature": 0,
                                       "ignore_eos": True, "return_token_ids": True})  # fmt: skip

            for prompt in prompts:
                ask(prompt, 2)  # warm-up: connections (and TLS sessions) open
                outputs.append(ask(prompt, new_tokens)["choices"][0]["token_ids"])
                for _ in range(repeats):
                    runs.append((timed(lambda p=prompt: ask(p, new_tokens)), timed(lambda p=prompt: ask(p, 1))))
            name = f"{'mTLS' if tls else 'plain'}, {delay_ms:g} ms{' (packets)' if wan else ''}"
            return {**summarise(name, runs, new_tokens), "tls": tls, "delay_ms": delay_ms, "packet_delay": wan}, outputs
        finally:
            backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--wan", action="store_true", help="real packet delay between namespaces, not the proxy")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)  # --wan's own re-run in h0
    args = parser.parse_args()
    if args.wan and not args.in_namespace:
        for delay in args.delays:  # one namespace set per delay, this script run again inside h0
            with packet_delay(delay):
                subprocess.run(["ip", "netns", "exec", "h0", sys.executable, __file__, "--wan", "--in-namespace",
                                "--delays", f"{delay:g}", "--new-tokens", str(args.new_tokens),
                                "--repeats", str(args.repeats)], check=True)  # fmt: skip
        return
    rows = []
    for delay in args.delays:
        plain, plain_tokens = measure(False, delay, PROMPTS, args.new_tokens, args.repeats, args.wan)
        secure, secure_tokens = measure(True, delay, PROMPTS, args.new_tokens, args.repeats, args.wan)
        if plain_tokens != secure_tokens:
            raise SystemExit(f"delay {delay}: TLS changed the tokens")
        secure["vs_plain"] = secure["per_token_ms"] / plain["per_token_ms"]
        rows += [plain, secure]
    out = ROOT / "bench" / "results" / (f"tls_cost_wan_{args.delays[0]:g}ms.json" if args.wan else "tls_cost.json")
    out.write_text(json.dumps({"new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows}, indent=2))
    print(f"{'mode':<28} {'ms/token':>9} {'tokens/s':>9} {'vs plain':>9}")
    for row in rows:
        ratio = f"{row['vs_plain']:.3f}" if "vs_plain" in row else "1"
        print(f"{row['mode']:<28} {row['per_token_ms']:>9.2f} {row['tokens_per_s']:>9.2f} {ratio:>9}")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
