"""Lossless codecs on SmolLM2's real hidden states: ratio against the order-0 bound, speed, crossover.

Data: bench/data/smollm2_hidden.npz (bench/capture_hidden.py), the residual stream entering each
of the 30 layers for 4 prompts x 12 tokens, float32; float16 and bfloat16 are cast from it.
Frames: one layer boundary each, of 48 tokens (all prompts: a batch prefill), 12 tokens (one
prompt) and 1 token (a decode step).

Bound: per layer boundary, the order-0 entropy of each byte plane (and, split by IEEE field, of
the exponent and of the sign/mantissa bytes), measured over all 48 tokens at that boundary; a
frame's bound is its values times that boundary's bits per value. "bound" in the table is the
tighter of the two.

Codecs: ours (raw, zstd, byteplane, exponent from bloombee_stage.codec) beside the libraries
numcodecs' Blosc (shuffle + zstd), blosc2 (shuffle + zstd), zstd with a dictionary (trained,
per prompt, on the other three prompts' tokens, so it never saw the frame it codes) and rANS on
the exponent field (constriction; sign/mantissa raw). Speed is on one core: each codec codes all
frames of a size, best of --repeats runs, MB of raw tensor per second.

    python bench/codec.py [--repeats 5]

Writes bench/results/codec.json and bench/results/codec.png (speed-up of sending a frame over a
link of a given bandwidth, per codec: the crossover is where a curve crosses 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from bloombee_contract.codec_cost import COMPRESSING, CodecProfile, crossover_bandwidth, wire_seconds
from bloombee_stage.wire.codecs import CODECS

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "smollm2_hidden.npz"
DTYPES = ("float32", "float16", "bfloat16")
FRAME_TOKENS = (48, 12, 1)
Coder = tuple[Callable[[bytes], object], Callable[[object], bytes], Callable[[object], int]]


def load_bits(dtype: str) -> np.ndarray:
    """[prompt, boundary, token, hidden] as the dtype's bit patterns (unsigned ints)."""
    capture = np.load(DATA)
    values = torch.from_numpy(np.stack([capture[name] for name in sorted(capture.files)]))
    if dtype == "float32":
        return values.numpy().view(np.uint32)
    return values.to(getattr(torch, dtype)).view(torch.int16).numpy().view(np.uint16)


def entropy(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def field_bytes(bits: np.ndarray, dtype: str) -> list[np.ndarray]:
    """Exponent field, then sign/mantissa as bytes (bf16: 1, f32: 3, f16: sign+2 bits and 8 bits)."""
    if dtype == "bfloat16":
        return [(bits >> 7) & 0xFF, ((bits >> 8) & 0x80) | (bits & 0x7F)]
    if dtype == "float16":
        return [(bits >> 10) & 0x1F, ((bits >> 13) & 0x4) | ((bits >> 8) & 0x3), bits & 0xFF]
    rest = (bits & 0x7FFFFF) | ((bits >> 8) & 0x800000)
    return [(bits >> 23) & 0xFF, rest >> 16, (rest >> 8) & 0xFF, rest & 0xFF]


def bits_per_value(bits: np.ndarray, dtype: str) -> dict[str, float]:
    """Order-0 bits per value of one boundary's values, by byte plane and by IEEE field."""
    planes = bits.view(np.uint8).reshape(-1, bits.dtype.itemsize)
    plane_bits = [entropy(planes[:, i]) for i in range(planes.shape[1])]
    fields = [entropy(part.astype(np.uint8)) for part in field_bytes(bits.ravel().astype(np.int64), dtype)]
    return {"byteplane": sum(plane_bits), "field": sum(fields), "planes": plane_bits, "exponent": fields[0]}


def frames_of(bits: np.ndarray, tokens: int) -> list[tuple[int, int, bytes]]:
    """(prompt or -1, boundary, raw bytes) for every frame of ``tokens`` tokens at one boundary."""
    prompts, boundaries, per_prompt, _ = bits.shape
    if tokens == prompts * per_prompt:
        return [(-1, b, bits[:, b].tobytes()) for b in range(boundaries)]
    return [(p, b, bits[p, b, t : t + tokens].tobytes())
            for p in range(prompts) for b in range(boundaries) for t in range(0, per_prompt, tokens)]  # fmt: skip


# -- the codecs measured ------------------------------------------------------------------------


def ours(name: str, dtype: str) -> Coder:
    codec = CODECS[name]
    return (lambda raw: codec.encode(raw, dtype), None, len)  # decode needs the raw length: see measure()


def library_coders(dtype: str, bits: np.ndarray) -> dict[str, Coder]:
    size = bits.dtype.itemsize
    coders: dict[str, Coder] = {}
    try:
        import numcodecs
        from numcodecs import Blosc

        numcodecs.blosc.set_nthreads(1)
        blosc = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)
        coders["numcodecs Blosc shuffle+zstd"] = (blosc.encode, lambda data: bytes(blosc.decode(data)), len)
    except ImportError:
        pass
    try:
        import blosc2

        params = {"codec": blosc2.Codec.ZSTD, "clevel": 1, "filters": [blosc2.Filter.SHUFFLE], "typesize": size,
                  "nthreads": 1}  # fmt: skip
        coders["blosc2 shuffle+zstd"] = (lambda raw: blosc2.compress2(raw, **params), blosc2.decompress2, len)
    except ImportError:
        pass
    try:
        import constriction

        coders["rANS exponent (constriction)"] = rans_exponent(constriction, dtype)
    except ImportError:
        pass
    return coders


def rans_exponent(constriction, dtype: str) -> Coder:
    """Exponent field with an adaptive-per-frame categorical model and rANS; the rest raw."""
    uint = np.uint32 if dtype == "float32" else np.uint16

    def encode(raw: bytes) -> tuple:
        bits = np.frombuffer(raw, uint).astype(np.int64)
        # float16: code the whole high byte (sign, exponent, 2 mantissa bits), as the exponent codec does
        parts = [bits >> 8, bits & 0xFF] if dtype == "float16" else field_bytes(bits, dtype)
        exponent = parts[0].astype(np.int32)
        counts = np.bincount(exponent, minlength=256).astype(np.float64)
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(exponent, model)
        rest = [part.astype(np.uint8).tobytes() for part in parts[1:]]
        return coder.get_compressed(), counts, rest, len(exponent)

    def decode(encoded: tuple) -> bytes:
        compressed, counts, rest, count = encoded
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
        exponent = constriction.stream.stack.AnsCoder(compressed).decode(model, count).astype(np.int64)
        others = [np.frombuffer(part, np.uint8).astype(np.int64) for part in rest]
        if dtype == "bfloat16":
            bits = (exponent << 7) | ((others[0] & 0x80) << 8) | (others[0] & 0x7F)
        elif dtype == "float16":
            bits = (exponent << 8) | others[0]
        else:
            rest_bits = (others[0] << 16) | (others[1] << 8) | others[2]
            bits = (exponent << 23) | ((rest_bits & 0x800000) << 8) | (rest_bits & 0x7FFFFF)
        return bits.astype(uint).tobytes()

    def size(encoded: tuple) -> int:  # the model travels too: its non-zero counts, 3 bytes each
        compressed, counts, rest, _ = encoded
        return compressed.nbytes + 3 * int(np.count_nonzero(counts)) + sum(len(part) for part in rest)

    return encode, decode, size


def dictionary_coder(bits: np.ndarray, prompt: int) -> Coder:
    """zstd level 1 with a dictionary trained on the tokens of every other prompt."""
    samples = [bits[p, b, t].tobytes() for p in range(bits.shape[0]) if p != prompt
               for b in range(bits.shape[1]) for t in range(bits.shape[2])]  # fmt: skip
    dictionary = zstandard.train_dictionary(16384, samples)
    compressor = zstandard.ZstdCompressor(level=1, dict_data=dictionary)
    decompressor = zstandard.ZstdDecompressor(dict_data=dictionary)
    return compressor.compress, decompressor.decompress, len


# -- measuring ----------------------------------------------------------------------------------


def measure(coder: Coder, frames: list[bytes], repeats: int, raw_decode: Callable | None = None) -> dict:
    encode, decode, size = coder
    encode_best = decode_best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        encoded = [encode(raw) for raw in frames]
        encode_best = min(encode_best, time.perf_counter() - started)
        started = time.perf_counter()
        if decode is None:
            decoded = [raw_decode(data, len(raw)) for data, raw in zip(encoded, frames, strict=True)]
        else:
            decoded = [decode(data) for data in encoded]
        decode_best = min(decode_best, time.perf_counter() - started)
        if decoded != frames:
            raise AssertionError("a codec did not round-trip exactly")
    raw_bytes = sum(len(raw) for raw in frames)
    return {"raw_bytes": raw_bytes, "encoded_bytes": sum(size(data) for data in encoded),
            "encode_s": encode_best, "decode_s": decode_best, "frames": len(frames)}  # fmt: skip


def run_dtype(dtype: str, repeats: int) -> dict:
    bits = load_bits(dtype)
    per_boundary = [bits_per_value(bits[:, b], dtype) for b in range(bits.shape[1])]
    values_per_token = bits.shape[3]
    results = {"bound_bits_per_value": {
        "byteplane": float(np.mean([row["byteplane"] for row in per_boundary])),
        "field": float(np.mean([row["field"] for row in per_boundary])),
        "exponent": float(np.mean([row["exponent"] for row in per_boundary])),
        "planes": np.mean([row["planes"] for row in per_boundary], axis=0).round(3).tolist(),
    }, "sizes": {}}  # fmt: skip
    libraries = library_coders(dtype, bits)
    for tokens in FRAME_TOKENS:
        frames = frames_of(bits, tokens)
        raws = [raw for _, _, raw in frames]
        bound_bits = sum(min(per_boundary[b]["byteplane"], per_boundary[b]["field"]) * tokens * values_per_token
                         for _, b, _ in frames)  # fmt: skip
        bound_ratio = sum(map(len, raws)) * 8 / bound_bits
        rows = {}
        for name, codec in CODECS.items():
            rows[name] = measure(ours(name, dtype), raws, repeats, lambda data, n, c=codec: c.decode(data, dtype, n))
        for name, coder in libraries.items():
            rows[name] = measure(coder, raws, repeats)
        if tokens < bits.shape[0] * bits.shape[2]:
            per_prompt = [measure(dictionary_coder(bits, p), [raw for q, _, raw in frames if q == p], repeats)
                          for p in range(bits.shape[0])]  # fmt: skip
            rows["zstd + dictionary"] = merge(per_prompt)
        for row in rows.values():
            row["ratio"] = row["raw_bytes"] / row["encoded_bytes"]
            row["ratio_over_bound"] = row["ratio"] / bound_ratio
            row["encode_MBps"] = row["raw_bytes"] / row["encode_s"] / 1e6
            row["decode_MBps"] = row["raw_bytes"] / row["decode_s"] / 1e6
        results["sizes"][str(tokens)] = {"bound_ratio": bound_ratio, "frame_bytes": len(raws[0]), "codecs": rows}
    return results


def merge(parts: list[dict]) -> dict:
    return {key: sum(part[key] for part in parts) for key in parts[0]}


def profile(results: dict, name: str) -> CodecProfile:
    """A codec's policy profile: speeds and ratio on the largest frames, per-frame overhead from 1-token frames."""
    big, small = results["sizes"][str(FRAME_TOKENS[0])]["codecs"][name], results["sizes"]["1"]["codecs"][name]
    encode_bps, decode_bps = big["raw_bytes"] / big["encode_s"], big["raw_bytes"] / big["decode_s"]
    per_frame = (small["encode_s"] + small["decode_s"]) / small["frames"]
    frame_bytes = small["raw_bytes"] / small["frames"]
    overhead = max(0.0, per_frame - frame_bytes / encode_bps - frame_bytes / decode_bps)
    return CodecProfile(big["ratio"], encode_bps, decode_bps, overhead)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bandwidths = np.logspace(0, 4.5, 200)  # Mbit/s
    figure, axes = plt.subplots(1, len(DTYPES), figsize=(15, 4.5), sharey=True)
    for axis, dtype in zip(axes, DTYPES, strict=True):
        results = report["dtypes"][dtype]
        frame = results["sizes"][str(FRAME_TOKENS[0])]["frame_bytes"]
        for name in COMPRESSING:
            codec = profile(results, name)
            speedup = [wire_seconds(frame, rate) / wire_seconds(frame, rate, codec) for rate in bandwidths * 1e6 / 8]
            crossover = crossover_bandwidth(codec) * 8 / 1e6
            axis.plot(bandwidths, speedup, label=f"{name} (r={codec.ratio:.3f}, crossover {crossover:,.0f} Mbit/s)")
            axis.axvline(crossover, linestyle=":", linewidth=0.8, color=axis.lines[-1].get_color())
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(f"{dtype}: {FRAME_TOKENS[0]}-token frame ({frame / 1e3:.0f} kB raw)")
        axis.set_xlabel("link bandwidth (Mbit/s)")
        axis.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("time raw / time compressed (encode + send + decode)")
    figure.suptitle("When compression pays: above 1, compressed frames arrive sooner (measured ratios and speeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(report: dict) -> None:
    for dtype in DTYPES:
        results = report["dtypes"][dtype]
        bound = results["bound_bits_per_value"]
        print(f"\n{dtype}: order-0 bits/value byte planes {bound['byteplane']:.3f} {bound['planes']}, "
              f"fields {bound['field']:.3f} (exponent {bound['exponent']:.3f})")  # fmt: skip
        for tokens in FRAME_TOKENS:
            size = results["sizes"][str(tokens)]
            print(f"  {tokens}-token frames ({size['frame_bytes']} B), bound ratio {size['bound_ratio']:.4f}")
            print(f"    {'codec':<32}{'ratio':>8}{'/bound':>8}{'enc MB/s':>10}{'dec MB/s':>10}")
            for name, row in size["codecs"].items():
                print(f"    {name:<32}{row['ratio']:>8.4f}{row['ratio_over_bound']:>8.3f}"
                      f"{row['encode_MBps']:>10.0f}{row['decode_MBps']:>10.0f}")  # fmt: skip
    print("\nbest codec per dtype on the largest frames, and its crossover bandwidth:")
    for dtype, best in report["best"].items():
        print(f"  {dtype:<9} {best['codec']:<10} ratio/bound {best['ratio_over_bound']:.3f} "
              f"enc {best['encode_MBps']:.0f} MB/s dec {best['decode_MBps']:.0f} MB/s "
              f"crossover {best['crossover_Mbps']:,.0f} Mbit/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine()},
              "frame_tokens": FRAME_TOKENS, "dtypes": {}, "best": {}}  # fmt: skip
    for dtype in DTYPES:
        print(f"measuring {dtype} ...", flush=True)
        report["dtypes"][dtype] = results = run_dtype(dtype, args.repeats)
        largest = results["sizes"][str(FRAME_TOKENS[0])]["codecs"]
        results["profiles"] = {name: profile(results, name).__dict__ for name in COMPRESSING}
        best = max(COMPRESSING, key=lambda name: largest[name]["ratio"])
        keys = ("ratio", "ratio_over_bound", "encode_MBps", "decode_MBps")
        report["best"][dtype] = {"codec": best, **{key: largest[best][key] for key in keys},
                                 "crossover_Mbps": crossover_bandwidth(profile(results, best)) * 8 / 1e6}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "codec.png")
    print_table(report)
    print(f"\nwrote {args.out / 'codec.json'} and {args.out / 'codec.png'}")


if __name__ == "__main__":
    main()
