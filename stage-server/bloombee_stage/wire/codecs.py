"""Lossless codecs for tensor payloads on the wire.

Each codec maps a tensor's raw little-endian bytes to encoded bytes and back, bit-exactly, for
any bit pattern (NaN payloads, infinities, -0.0 and subnormals included). The codec id is a byte
in the frame header (see wire.py), so ids are part of the wire format and never reused.

    raw        0  the bytes as they are
    zstd       1  zstd level 1 over the whole buffer
    byteplane  2  split into byte planes (every value's first byte, then every second byte, ...);
                  each plane is entropy-coded, or kept raw where coding does not shrink it
    exponent   3  only the bits that carry the exponent are entropy-coded; the mantissa, close
                  to uniform, goes raw (DFloat11's idea, arXiv 2504.11651). bfloat16's exponent
                  straddles its two bytes, so it is split by field: an 8-bit exponent plane
                  (coded) and a sign|7-bit mantissa plane (raw). float32 and float16 keep the
                  byte planes and code those holding exponent bits (f32: the top two, f16: the
                  high one); pulling f32's exponent out by field measured no smaller and half
                  as fast. Other dtypes fall back to byteplane.

Why this shape: activations' exponents carry about 3.3 bits in 8 and their mantissa bits are
nearly uniform, so all the gain is in coding the exponent's symbol frequencies (order-0). zstd's
Huffman stage does that within ~1% of the order-0 entropy once its match finder is kept out of
the way (matches only cost bytes on such data), at over 1 GB/s; bench/codec.py measures it
against Blosc/blosc2's shuffle + zstd, zstd with a dictionary and an rANS coder (constriction).

Layout of a byteplane/exponent payload (little-endian)::

    u8 section count, then per section: u8 mode (0 raw, 1 entropy-coded) + u32 encoded length
    the sections' bytes, in order

A payload that does not decode raises CodecError naming the section. Corruption inside a raw
section cannot be seen here; the frame's CRC-32 (wire.py) catches it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SECTION = struct.Struct("<BI")
_RAW, _ENTROPY = 0, 1


class CodecError(ValueError):
    """A payload that does not decode."""


@dataclass(frozen=True)
class Codec:
    name: str
    wire_id: int
    encode: Callable[[bytes, str], bytes]  # (raw, dtype) -> encoded
    decode: Callable[[bytes, str, int], bytes]  # (encoded, dtype, raw_length) -> raw


# zstd objects are not thread-safe; each thread (event loop, worker, benchmark) gets its own.
_local = threading.local()


def _coders() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    coders = getattr(_local, "coders", None)
    if coders is None:
        entropy_only = zstandard.ZstdCompressionParameters(
            compression_level=1, strategy=zstandard.STRATEGY_FAST, min_match=7, search_log=1, hash_log=6,
            write_content_size=False, write_checksum=False, write_dict_id=False,
        )  # fmt: skip
        coders = (zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(compression_params=entropy_only),
                  zstandard.ZstdDecompressor())  # fmt: skip
        _local.coders = coders
    return coders


def _zstd_encode(data: bytes, dtype: str) -> bytes:
    return _coders()[0].compress(data)


def _decompress(data: bytes | memoryview, expected: int, what: str) -> bytes:
    """zstd-decode at most ``expected`` bytes; a damaged header never makes us allocate what it claims."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared > expected:  # -1: not declared, then max_output_size bounds the output
            raise CodecError(f"{what} declares {declared} bytes, expected {expected}")
        return _coders()[2].decompress(data, max_output_size=expected)
    except zstandard.ZstdError as error:
        raise CodecError(f"{what} does not decode: {error}") from None


def _zstd_decode(data: bytes, dtype: str, raw_length: int) -> bytes:
    return _decompress(data, raw_length, "zstd payload")


# -- sections ---------------------------------------------------------------------------------


def _pack(planes: list[bytes], coded: list[bool]) -> bytes:
    """Entropy-code the planes marked ``coded`` (kept raw when that does not shrink them)."""
    header, bodies = [struct.pack("<B", len(planes))], []
    for plane, try_coding in zip(planes, coded, strict=True):
        body, mode = plane, _RAW
        if try_coding and plane:
            encoded = _coders()[1].compress(plane)
            if len(encoded) < len(plane):
                body, mode = encoded, _ENTROPY
        header.append(_SECTION.pack(mode, len(body)))
        bodies.append(body)
    return b"".join(header + bodies)


def _unpack(data: bytes, lengths: list[int]) -> list[bytes]:
    """The planes of a payload, each checked against its expected decoded length."""
    view = memoryview(data)
    if len(view) < 1 or view[0] != len(lengths):
        count = view[0] if len(view) else "no"
        raise CodecError(f"payload has {count} sections, expected {len(lengths)}")
    offset = 1 + _SECTION.size * len(lengths)
    if len(view) < offset:
        raise CodecError(f"payload of {len(view)} bytes is too short for its {len(lengths)} section headers")
    planes = []
    for index, expected in enumerate(lengths):
        mode, size = _SECTION.unpack_from(view, 1 + _SECTION.size * index)
        body = view[offset : offset + size]
        offset += size
        if len(body) != size:
            raise CodecError(f"section {index} claims {size} bytes, only {len(body)} remain")
        if mode == _RAW:
            plane = bytes(body)
        elif mode == _ENTROPY:
            plane = _decompress(body, expected, f"section {index}")
        else:
            raise CodecError(f"section {index} has unknown mode {mode}")
        if len(plane) != expected:
            raise CodecError(f"section {index} decodes to {len(plane)} bytes, expected {expected}")
        planes.append(plane)
    if offset != len(view):
        raise CodecError(f"payload has {len(view) - offset} bytes after its last section")
    return planes


def _count(raw_length: int, dtype: str) -> int:
    if raw_length % ITEMSIZE[dtype]:
        raise CodecError(f"{raw_length} bytes is not a whole number of {dtype} values")
    return raw_length // ITEMSIZE[dtype]


# -- byteplane --------------------------------------------------------------------------------


_EXPONENT_PLANES = {"float32": (2, 3), "float16": (1,)}  # little-endian byte planes holding exponent bits


def _byteplane_encode(data: bytes, dtype: str, coded: tuple[int, ...] | None = None) -> bytes:
    size = ITEMSIZE[dtype]
    table = np.frombuffer(data, np.uint8).reshape(-1, size)
    tried = [coded is None or index in coded for index in range(size)]
    return _pack([table[:, index].tobytes() for index in range(size)], tried)


def _byteplane_decode(data: bytes, dtype: str, raw_length: int) -> bytes:
    size, count = ITEMSIZE[dtype], _count(raw_length, dtype)
    table = np.empty((count, size), np.uint8)
    for index, plane in enumerate(_unpack(data, [count] * size)):
        table[:, index] = np.frombuffer(plane, np.uint8)
    return table.tobytes()


# -- exponent ---------------------------------------------------------------------------------


def _exponent_encode(data: bytes, dtype: str) -> bytes:
    if dtype == "bfloat16":
        bits = np.frombuffer(data, np.uint16)
        exponent = (bits >> 7).astype(np.uint8)  # the cast drops the sign bit
        rest = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
        return _pack([exponent.tobytes(), rest.tobytes()], [True, False])
    return _byteplane_encode(data, dtype, _EXPONENT_PLANES.get(dtype))


def _exponent_decode(data: bytes, dtype: str, raw_length: int) -> bytes:
    count = _count(raw_length, dtype)
    if dtype == "bfloat16":
        exponent, rest = (np.frombuffer(p, np.uint8).astype(np.uint16) for p in _unpack(data, [count, count]))
        return ((exponent << 7) | ((rest & 0x80) << 8) | (rest & 0x7F)).astype(np.uint16).tobytes()
    return _byteplane_decode(data, dtype, raw_length)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec("raw", 0, lambda data, dtype: data, lambda data, dtype, raw_length: data),
        Codec("zstd", 1, _zstd_encode, _zstd_decode),
        Codec("byteplane", 2, _byteplane_encode, _byteplane_decode),
        Codec("exponent", 3, _exponent_encode, _exponent_decode),
    )
}
CODECS_BY_ID: dict[int, Codec] = {codec.wire_id: codec for codec in CODECS.values()}
