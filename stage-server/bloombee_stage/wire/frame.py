"""Binary frames: one tensor plus JSON metadata, with a header that lets a reader reject bad input.

Layout (little-endian)::

    offset size field
    0      4    magic b"BBWF"
    4      1    version (1)
    5      1    dtype id (DTYPE_IDS)
    6      1    codec id (codec.CODECS)
    7      1    ndim (0..8)
    8      4    meta length in bytes
    12     8    payload length in bytes (encoded)
    20     4    CRC-32 of every other byte of the frame (header, shape, meta, payload)
    24     8*n  shape, one uint64 per dimension
    ...         meta: UTF-8 JSON object (session, step, route, ...)
    ...         payload: the tensor's bytes, C order, encoded by the codec

A truncated frame, a bad checksum, an unknown version/dtype/codec or a payload whose decoded
size disagrees with the shape raises WireError with a message naming the frame. Sizes are checked
before anything is allocated: the metadata against ``MAX_META_BYTES``, the shape against the
reader's ``max_data_bytes`` (what its plan allows, ``largest_step_bytes``), so neither a claimed
shape nor a compressed payload can make a reader allocate more than a legal frame needs.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from bloombee_stage.wire.codecs import CODECS, CODECS_BY_ID, ITEMSIZE, CodecError

MAGIC = b"BBWF"
VERSION = 1
MAX_NDIM = 8
MAX_META_BYTES = 4 << 20  # routes, rows with drafts and contexts, a result with its prompt logprobs
_HEADER = struct.Struct("<4sBBBBIQI")
_CHECKSUM_AT = 20
DTYPE_IDS = {"float32": 1, "float16": 2, "bfloat16": 3, "int64": 4, "int32": 5, "uint8": 6}
DTYPE_NAMES = {value: key for key, value in DTYPE_IDS.items()}


class WireError(ValueError):
    """A frame that cannot be read; the message says which frame and what is wrong."""


@dataclass
class Frame:
    """A decoded frame: raw tensor bytes (C order) with dtype and shape, plus metadata."""

    meta: dict[str, Any]
    dtype: str = "uint8"
    shape: tuple[int, ...] = (0,)
    data: bytes = b""
    codec: str = field(default="raw", compare=False)

    def describe(self) -> str:
        """How errors name the frame: its step and the sessions of its rows, when the metadata says."""
        parts = [f"step={self.meta['step']}"] if "step" in self.meta else []
        rows = self.meta.get("rows")
        if isinstance(rows, list):
            sessions = [str(row.get("session")) for row in rows[:4] if isinstance(row, dict)]
            more = f"+{len(rows) - 4}" if len(rows) > 4 else ""
            parts.append(f"session={','.join(sessions)}{more}")
        return f"frame({' '.join(parts)})" if parts else "frame"


def encode_frame(frame: Frame, codec: str = "raw") -> bytes:
    if frame.dtype not in DTYPE_IDS:
        raise WireError(f"{frame.describe()}: dtype {frame.dtype!r} has no wire id")
    if len(frame.shape) > MAX_NDIM:
        raise WireError(f"{frame.describe()}: {len(frame.shape)} dimensions, at most {MAX_NDIM}")
    expected = math.prod(frame.shape) * ITEMSIZE[frame.dtype]
    if len(frame.data) != expected:
        raise WireError(f"{frame.describe()}: {len(frame.data)} data bytes for shape {frame.shape} {frame.dtype}")
    chosen = CODECS[codec]
    payload = chosen.encode(frame.data, frame.dtype)
    meta = json.dumps(frame.meta, separators=(",", ":")).encode()
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_IDS[frame.dtype], chosen.wire_id, len(frame.shape), len(meta),
                          len(payload), 0)  # fmt: skip
    buffer = bytearray(b"".join((header, struct.pack(f"<{len(frame.shape)}Q", *frame.shape), meta, payload)))
    struct.pack_into("<I", buffer, _CHECKSUM_AT, frame_checksum(buffer))
    return bytes(buffer)


def frame_checksum(buffer: bytes | bytearray | memoryview) -> int:
    """CRC-32 over the whole frame except the checksum field itself."""
    view = memoryview(buffer)
    return zlib.crc32(view[_CHECKSUM_AT + 4 :], zlib.crc32(view[:_CHECKSUM_AT]))


def largest_step_bytes(rows: int, positions: int, hidden_size: int) -> int:
    """The tensor bytes of the largest legal step: ``rows`` of ``positions`` hidden states in
    float32 (or token ids in int64, whichever is larger)."""
    return rows * positions * max(4 * hidden_size, 8)


def largest_frame_bytes(max_data_bytes: int) -> int:
    """The body limit for frames of at most ``max_data_bytes`` of tensor: header, shape, metadata,
    and the payload with what a codec may add to incompressible data (zstd adds under 1/128)."""
    return _HEADER.size + 8 * MAX_NDIM + MAX_META_BYTES + max_data_bytes + max_data_bytes // 64 + 4096


def decode_frame(buffer: bytes, max_data_bytes: int | None = None) -> Frame:
    """Parse and verify a frame; raises WireError naming the frame and the fault. A frame whose
    tensor would exceed ``max_data_bytes`` is refused before its payload is decoded."""
    view = memoryview(buffer)
    if len(view) < _HEADER.size:
        raise WireError(f"frame truncated: {len(view)} bytes, the header alone is {_HEADER.size}")
    magic, version, dtype_id, codec_id, ndim, meta_len, payload_len, checksum = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"not a BloomBee frame: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(f"frame version {version} is not supported (this server speaks version {VERSION})")
    if ndim > MAX_NDIM:
        raise WireError(f"frame has {ndim} dimensions, at most {MAX_NDIM}")
    if meta_len > MAX_META_BYTES:
        raise WireError(f"frame metadata of {meta_len} bytes, at most {MAX_META_BYTES}")
    shape_end = _HEADER.size + 8 * ndim
    total = shape_end + meta_len + payload_len
    if len(view) != total:
        kind = "truncated" if len(view) < total else "has trailing bytes"
        raise WireError(f"frame {kind}: header says {total} bytes, got {len(view)}")
    meta_bytes = bytes(view[shape_end : shape_end + meta_len])
    payload = bytes(view[shape_end + meta_len :])
    if frame_checksum(view) != checksum:
        raise WireError(f"frame of {total} bytes has a bad checksum (corrupted in transit)")
    try:
        meta = json.loads(meta_bytes)
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: JSONDecodeError, or an int too long to read
        raise WireError(f"frame metadata is not JSON: {str(error)[:200]}") from None
    except RecursionError:
        raise WireError("frame metadata is nested too deeply") from None
    if not isinstance(meta, dict):
        raise WireError("frame metadata must be a JSON object")
    frame = Frame(meta=meta, shape=tuple(struct.unpack_from(f"<{ndim}Q", view, _HEADER.size)))
    if dtype_id not in DTYPE_NAMES:
        raise WireError(f"{frame.describe()}: unknown dtype id {dtype_id}")
    if codec_id not in CODECS_BY_ID:
        raise WireError(f"{frame.describe()}: unknown codec id {codec_id} (known: {sorted(CODECS)})")
    frame.dtype = DTYPE_NAMES[dtype_id]
    codec = CODECS_BY_ID[codec_id]
    frame.codec = codec.name
    expected = math.prod(frame.shape) * ITEMSIZE[frame.dtype]
    if max_data_bytes is not None and expected > max_data_bytes:
        raise WireError(f"{frame.describe()}: shape {list(frame.shape)} {frame.dtype} is {expected} bytes; "
                        f"the largest step this server takes is {max_data_bytes}")  # fmt: skip
    try:
        frame.data = codec.decode(payload, frame.dtype, expected)
    except CodecError as error:
        raise WireError(f"{frame.describe()}: {error}") from None
    if len(frame.data) != expected:
        raise WireError(
            f"{frame.describe()}: payload decodes to {len(frame.data)} bytes, shape {list(frame.shape)} "
            f"{frame.dtype} needs {expected}"
        )
    return frame
