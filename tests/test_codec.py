"""Codecs: every bit pattern round-trips exactly; damaged payloads fail loudly, never silently."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from bloombee_contract.codec_cost import (
    COMPRESSING,
    DEFAULT_PROFILES,
    RAW,
    choose_codec,
    crossover_bandwidth,
    wire_seconds,
)
from bloombee_operator.planner.cost import Link, hop
from bloombee_operator.planner.profile import codec_candidates
from bloombee_stage.wire.codec_stats import CodecStats
from bloombee_stage.wire.codecs import CODECS, ITEMSIZE, CodecError
from bloombee_stage.wire.frame import Frame, WireError, decode_frame, encode_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DTYPES = list(ITEMSIZE)
CAPTURE = Path(__file__).resolve().parent.parent / "bench" / "data" / "smollm2_hidden.npz"
SPECIALS = {  # bit patterns: NaNs with payloads (quiet, signalling, negative), +-inf, -0.0, subnormals, extremes
    "float32": [0x7FC00000, 0x7FC12345, 0x7F800001, 0xFFC00001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001,
                0x807FFFFF, 0x7F7FFFFF, 0x00800000],
    "float16": [0x7E00, 0x7E01, 0x7C01, 0xFE00, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0x0400],
    "bfloat16": [0x7FC0, 0x7FC1, 0x7F81, 0xFFC0, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7F7F, 0x0080],
}  # fmt: skip
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _float_bits(value: float, dtype: str) -> int:
    if dtype == "float16":
        return int(np.float16(value).view(np.uint16))
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return bits >> 16 if dtype == "bfloat16" else bits


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, bytes]:
    """(dtype, raw bytes) of any shape: activation-like values, special values and arbitrary bits mixed."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4).filter(lambda s: math.prod(s) <= 2048))
    count, size = math.prod(shape), ITEMSIZE[dtype]
    element = st.integers(0, (1 << (8 * size)) - 1)
    if dtype in SPECIALS:
        activation = st.floats(-60000.0, 60000.0, width=32).map(lambda value: _float_bits(value, dtype))
        element = st.one_of(activation, st.sampled_from(SPECIALS[dtype]), element)
    values = draw(st.lists(element, min_size=count, max_size=count))
    return dtype, np.array(values, dtype=_UINT[size]).astype(f"<u{size}").tobytes()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors(), st.sampled_from(sorted(CODECS)))
def test_any_tensor_round_trips_bit_exactly(tensor, codec_name):
    dtype, raw = tensor
    codec = CODECS[codec_name]
    assert codec.decode(codec.encode(raw, dtype), dtype, len(raw)) == raw


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_activations_shrink_and_every_special_value_survives(dtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4096) * np.exp(rng.standard_normal(4096))).astype(np.float32)
    bits = np.array([_float_bits(float(v), dtype) for v in values], dtype=_UINT[ITEMSIZE[dtype]])
    bits[: len(SPECIALS[dtype])] = SPECIALS[dtype]
    raw = bits.tobytes()
    for name in ("byteplane", "exponent"):
        encoded = CODECS[name].encode(raw, dtype)
        assert len(encoded) < 0.95 * len(raw), f"{name} does not shrink {dtype} activations"
        assert CODECS[name].decode(encoded, dtype, len(raw)) == raw


@settings(max_examples=300, deadline=None)
@given(tensors(), st.sampled_from(["zstd", "byteplane", "exponent"]), st.data())
def test_a_damaged_payload_never_crashes_the_codec(tensor, codec_name, data):
    """Flipped or cut bytes give CodecError or bytes of the right length (the frame CRC catches those)."""
    dtype, raw = tensor
    codec = CODECS[codec_name]
    encoded = bytearray(codec.encode(raw, dtype))
    if data.draw(st.booleans(), "truncate") or not encoded:
        damaged = bytes(encoded[: data.draw(st.integers(0, max(len(encoded) - 1, 0)), "cut")])
    else:
        at = data.draw(st.integers(0, len(encoded) - 1), "at")
        encoded[at] ^= data.draw(st.integers(1, 255), "flip")
        damaged = bytes(encoded)
    try:
        decoded = codec.decode(damaged, dtype, len(raw))
    except CodecError:
        return
    assert len(decoded) == len(raw) or codec_name == "zstd"  # wire.py rejects a zstd payload of the wrong size


@settings(max_examples=300, deadline=None)
@given(tensors(), st.sampled_from(sorted(CODECS)), st.data())
def test_a_damaged_frame_is_always_rejected(tensor, codec_name, data):
    """Any flipped byte or cut anywhere in a frame gives WireError: never a crash, never wrong data."""
    dtype, raw = tensor
    size = len(raw) // ITEMSIZE[dtype]
    frame = bytearray(encode_frame(Frame(meta={"session": "s", "step": 1}, dtype=dtype, shape=(size,), data=raw),
                                   codec_name))  # fmt: skip
    if data.draw(st.booleans(), "truncate"):
        damaged = bytes(frame[: data.draw(st.integers(0, len(frame) - 1), "cut")])
    else:
        at = data.draw(st.integers(0, len(frame) - 1), "at")
        frame[at] ^= data.draw(st.integers(1, 255), "flip")
        damaged = bytes(frame)
    with pytest.raises(WireError):
        decode_frame(damaged)


def test_section_errors_name_the_section():
    raw = np.arange(64, dtype=np.float32).tobytes()
    encoded = CODECS["byteplane"].encode(raw, "float32")
    with pytest.raises(CodecError, match="expected 4"):
        CODECS["byteplane"].decode(b"\x02" + encoded[1:], "float32", len(raw))
    with pytest.raises(CodecError, match="section 3 claims"):
        CODECS["byteplane"].decode(encoded[:-1], "float32", len(raw))
    with pytest.raises(CodecError, match="after its last section"):
        CODECS["byteplane"].decode(encoded + b"\x00", "float32", len(raw))
    bad_mode = bytearray(encoded)
    bad_mode[1] = 7
    with pytest.raises(CodecError, match="section 0 has unknown mode 7"):
        CODECS["byteplane"].decode(bytes(bad_mode), "float32", len(raw))
    with pytest.raises(CodecError, match="not a whole number"):
        CODECS["exponent"].decode(encoded, "float32", len(raw) - 1)


# -- the compression policy shared by stages and planner ------------------------------------------


@pytest.mark.parametrize("dtype", sorted(DEFAULT_PROFILES))
def test_compression_is_chosen_exactly_below_the_crossover(dtype):
    big = 64 << 20  # per-frame overhead is negligible at this size
    for name, profile in DEFAULT_PROFILES[dtype].items():
        crossover = crossover_bandwidth(profile)
        assert choose_codec(big, 0.95 * crossover, DEFAULT_PROFILES[dtype], [name]) == name
        assert choose_codec(big, 1.05 * crossover, DEFAULT_PROFILES[dtype], [name]) == "raw"
    assert choose_codec(big, None, DEFAULT_PROFILES[dtype], COMPRESSING) == "raw"  # unknown link: never guess


def test_planner_hops_cost_what_the_stage_rule_picks():
    candidates = codec_candidates("bfloat16", "auto")
    for bandwidth in (1e6, 12.5e6, 125e6, 1.25e9):
        for payload in (1152, 8 * 1152, 64 * 1152):
            link = Link(rtt_s=0.05, bandwidth=bandwidth)
            latency, busy = hop(link, payload, candidates)
            picked = choose_codec(payload, bandwidth, DEFAULT_PROFILES["bfloat16"], COMPRESSING)
            profile = DEFAULT_PROFILES["bfloat16"].get(picked, RAW)
            assert latency == pytest.approx(0.025 + wire_seconds(payload, bandwidth, profile))
            assert busy == pytest.approx(payload / profile.ratio / bandwidth)
    assert hop(Link(0.05, 1e6), 64 * 1152, candidates)[0] < hop(Link(0.05, 1e6), 64 * 1152)[0]


def test_a_stage_learns_its_codecs_from_its_own_frames():
    bits = np.load(CAPTURE)["prompt0"][5].astype(np.float32)  # one boundary, 12 tokens
    raw = bits.tobytes()
    stats = CodecStats("float32", sample_every=2)
    for _ in range(8):
        stats.maybe_sample(raw)
    assert stats.sampled == 6  # the first four frames, then one in two
    for name in COMPRESSING:
        actual = len(raw) / len(CODECS[name].encode(raw, "float32"))
        assert stats.profiles[name].ratio == pytest.approx(actual, rel=0.02)
        assert stats.profiles[name].encode_bps > 0 and stats.profiles[name].decode_bps > 0


def test_a_damaged_size_header_cannot_make_the_decoder_allocate_it():
    """Found by hypothesis: a flipped byte in zstd's frame header declared 72 PB and the decoder tried."""
    encoded = bytearray(CODECS["zstd"].encode(bytes(16), "int64"))
    encoded[4] ^= 208
    with pytest.raises(CodecError, match="declares 72057662757422352 bytes, expected 16"):
        CODECS["zstd"].decode(bytes(encoded), "int64", 16)
