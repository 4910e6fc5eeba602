"""Lossless codecs for tensor payloads on the wire.

Each codec maps raw little-endian tensor bytes to encoded bytes and back, bit-exactly. The
codec id is a byte in the frame header (see wire.py), so ids are part of the wire format and
never reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import zstandard


class CodecError(ValueError):
    """A payload that does not decode."""


@dataclass(frozen=True)
class Codec:
    name: str
    wire_id: int
    encode: Callable[[bytes, int], bytes]  # (raw, itemsize) -> encoded
    decode: Callable[[bytes, int, int], bytes]  # (encoded, itemsize, raw_length) -> raw


def _raw_decode(data: bytes, itemsize: int, raw_length: int) -> bytes:
    return data


def _zstd_encode(data: bytes, itemsize: int) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


def _zstd_decode(data: bytes, itemsize: int, raw_length: int) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_length)
    except zstandard.ZstdError as error:
        raise CodecError(f"zstd payload does not decode: {error}") from None


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec("raw", 0, lambda data, itemsize: data, _raw_decode),
        Codec("zstd", 1, _zstd_encode, _zstd_decode),
    )
}
CODECS_BY_ID: dict[int, Codec] = {codec.wire_id: codec for codec in CODECS.values()}
