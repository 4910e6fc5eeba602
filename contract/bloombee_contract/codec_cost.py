"""When compression pays: ``compression: auto``, as one rule shared by stages and the planner.

Sending ``x`` raw bytes over a link of bandwidth ``bw`` with a codec of ratio ``r``, encode speed
``e``, decode speed ``d`` (bytes of raw tensor per second, one core) and fixed cost ``o`` per
frame (call overhead, section headers) takes

    o + x / e + x / (r * bw) + x / d        against        x / bw  raw,

so a codec wins on links slower than its crossover bandwidth ``(1 - 1/r) / (1/e + 1/d)`` (for
frames large enough that ``o`` is small). A stage picks, per frame, the fastest of raw and the
codecs its peer decodes (agreed when a session opens); the planner costs every hidden-state hop
with the same ``wire_seconds``. Profiles start from figures bench/codec.py measured on SmolLM2's
hidden states and are refined by a stage from its own frames (``bloombee_stage.wire.codec_stats``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CODEC_NAMES = ("raw", "zstd", "byteplane", "exponent")  # what a frame header may name; wire/codecs.py implements them
COMPRESSING = CODEC_NAMES[1:]


@dataclass(frozen=True)
class CodecProfile:
    ratio: float  # raw bytes / encoded bytes
    encode_bps: float  # raw bytes encoded per second on one core
    decode_bps: float  # raw bytes decoded per second on one core
    overhead_s: float = 0.0  # fixed cost per frame, encode + decode


RAW = CodecProfile(ratio=1.0, encode_bps=math.inf, decode_bps=math.inf)

# Measured by bench/codec.py (bench/results/codec.json) on 48-token frames of SmolLM2's hidden
# states, one core of this project's 2-core CI machine; overheads from its 1-token frames.
DEFAULT_PROFILES: dict[str, dict[str, CodecProfile]] = {
    "float32": {
        "zstd": CodecProfile(1.086, 0.82e9, 1.29e9, 6e-6),
        "byteplane": CodecProfile(1.195, 1.00e9, 1.93e9, 2.0e-5),
        "exponent": CodecProfile(1.184, 1.52e9, 2.13e9, 1.6e-5),
    },
    "float16": {
        "zstd": CodecProfile(1.072, 1.29e9, 1.54e9, 7e-6),
        "byteplane": CodecProfile(1.150, 1.05e9, 1.59e9, 1.5e-5),
        "exponent": CodecProfile(1.150, 1.37e9, 1.62e9, 1.3e-5),
    },
    "bfloat16": {
        "zstd": CodecProfile(1.255, 0.99e9, 1.14e9, 1.0e-5),
        "byteplane": CodecProfile(1.451, 0.82e9, 1.46e9, 1.4e-5),
        "exponent": CodecProfile(1.460, 0.91e9, 1.25e9, 2.0e-5),
    },
}


def codec_seconds(raw_bytes: float, profile: CodecProfile) -> float:
    """CPU time to encode and decode ``raw_bytes`` (zero for raw)."""
    if profile is RAW or raw_bytes <= 0:
        return 0.0
    return profile.overhead_s + raw_bytes / profile.encode_bps + raw_bytes / profile.decode_bps


def wire_seconds(raw_bytes: float, bandwidth: float, profile: CodecProfile = RAW) -> float:
    """Encode + transfer + decode time of ``raw_bytes`` over a link of ``bandwidth`` bytes/s."""
    return codec_seconds(raw_bytes, profile) + raw_bytes / profile.ratio / bandwidth


def crossover_bandwidth(profile: CodecProfile) -> float:
    """The bandwidth (bytes/s) below which the codec beats raw, for frames big enough to hide overhead."""
    if profile.ratio <= 1.0:
        return 0.0
    return (1.0 - 1.0 / profile.ratio) / (1.0 / profile.encode_bps + 1.0 / profile.decode_bps)


def choose_codec(
    raw_bytes: float, bandwidth: float | None, profiles: Mapping[str, CodecProfile], allowed: Iterable[str]
) -> str:
    """The fastest of raw and the ``allowed`` codecs with a profile; raw when the bandwidth is unknown."""
    if not bandwidth or bandwidth <= 0:
        return "raw"
    best, best_seconds = "raw", wire_seconds(raw_bytes, bandwidth)
    for name in allowed:
        profile = profiles.get(name)
        if profile is not None and name != "raw":
            seconds = wire_seconds(raw_bytes, bandwidth, profile)
            if seconds < best_seconds:
                best, best_seconds = name, seconds
    return best
