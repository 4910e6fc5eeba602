"""Hostile step frames for a running stage: hand-crafted attacks and random mutations of good frames,
sent over one kept-alive mutual-TLS connection. Shared by tests/test_bad_input.py and bench/fuzz.py."""

from __future__ import annotations

import http.client
import json
import random
import ssl
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import torch
import zstandard
from bloombee_contract.paths import STEP_PATH
from bloombee_stage.wire.frame import DTYPE_IDS, MAGIC, VERSION, encode_frame, frame_checksum
from bloombee_stage.wire.messages import RowMeta, StepMeta
from bloombee_stage.wire.tensors import tensor_frame

_HEADER = struct.Struct("<4sBBBBIQI")  # the layout wire/frame.py documents, written independently here


def good_frame(tensor: torch.Tensor, route: list[str], session: str = "fuzz", layer: int = 0) -> bytes:
    """A legal inline step (no reply_to: the stage answers in the response) of one row, for the
    stage whose span starts at ``layer``."""
    meta = StepMeta(step=1, rows=[RowMeta(session=session, start=0, length=tensor.shape[1])], route=route,
                    layer=layer)  # fmt: skip
    return encode_frame(tensor_frame(tensor, meta.model_dump(mode="json")))


def raw_frame(shape: Iterable[int], meta: bytes, payload: bytes, dtype: str = "float32", codec_id: int = 0,
              ndim: int | None = None) -> bytes:  # fmt: skip
    """A frame built byte by byte (so it can lie), with a correct checksum so the lie is what is read."""
    shape = list(shape)
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_IDS[dtype], codec_id, len(shape) if ndim is None else ndim,
                          len(meta), len(payload), 0)  # fmt: skip
    buffer = bytearray(header + struct.pack(f"<{len(shape)}Q", *shape) + meta + payload)
    struct.pack_into("<I", buffer, 20, frame_checksum(buffer))
    return bytes(buffer)


def _zstd_of_zeros(size: int) -> bytes:
    """A zstd stream of ``size`` zero bytes that does not declare its size (a decompression bomb)."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join([*parts, compressor.flush()])


def crafted_frames(hidden_size: int, route: list[str], layer: int) -> dict[str, tuple[bytes, str]]:
    """Named attacks on a middle stage (hidden states in; its span starts at ``layer``), each with
    what its refusal must say: each must get a 4xx and cost nothing."""
    meta = json.dumps(StepMeta(step=1, rows=[RowMeta(session="crafted", start=0, length=1)], route=route,
                               layer=layer).model_dump(mode="json"), separators=(",", ":")).encode()  # fmt: skip
    one = bytes(4 * hidden_size)  # one position of float32 hidden states
    positions = (1 << 28) // (4 * hidden_size)  # 256 MiB of float32 zeros behind a few KiB
    deep = b'{"step": 1, "rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    many_rows = json.dumps({"step": 1, "rows": [{"session": f"r{i}", "start": 0, "length": 1}
                                                for i in range(100_000)]}).encode()  # fmt: skip
    long_route = json.dumps({**json.loads(meta), "route": [route[0]] * 1000}).encode()
    plain_reply = json.dumps({**json.loads(meta), "reply_to": "http://127.0.0.1:9/steal"}).encode()
    lying_length = bytearray(raw_frame((1, 1, hidden_size), meta, b""))
    struct.pack_into("<Q", lying_length, 12, 1 << 62)
    return {
        "zstd bomb (256 MiB of zeros)": (raw_frame((1, positions, hidden_size), meta, _zstd_of_zeros(1 << 28),
                                                    codec_id=1), "the largest step"),
        "shape of 2^120 elements": (raw_frame((1 << 40, 1 << 40, 1 << 40), meta, b""), "the largest step"),
        "nine dimensions": (raw_frame((1,) * 9, meta, b"\0" * 4), "9 dimensions"),
        "metadata nested 100k deep": (raw_frame((1, 1, hidden_size), deep, one), "nested too deeply"),
        "metadata with a 10k-digit number": (raw_frame((1, 1, hidden_size), b'{"step": ' + b"9" * 10_000 + b"}",
                                                       one), "not JSON"),
        "5 MiB of metadata": (raw_frame((1, 1, hidden_size), b'{"pad": "' + b"x" * (5 << 20) + b'"}', one),
                              "body size"),
        "metadata a list": (raw_frame((1, 1, hidden_size), b"[1, 2]", one), "JSON object"),
        "payload length 2^62": (bytes(lying_length), "truncated"),
        "100k rows": (raw_frame((100_000, 1, hidden_size), many_rows, b""), "body size"),
        "a route of 1000 hops": (raw_frame((1, 1, hidden_size), long_route, one), "route"),
        "token ids to a middle stage": (raw_frame((1, 1), meta, bytes(8), dtype="int64"), "expected hidden states"),
        "hidden states one wider": (raw_frame((1, 1, hidden_size + 1), meta, bytes(4 * (hidden_size + 1))),
                                    "expected hidden states"),
        "negative start": (raw_frame((1, 1, hidden_size), meta.replace(b'"start":0', b'"start":-5'), one), "start"),
        "reply to a plain URL": (raw_frame((1, 1, hidden_size), plain_reply, one), "https://"),
    }


def mutations(good: bytes, count: int, seed: int = 0) -> Iterator[bytes]:
    """``count`` random variants of ``good``: bit flips, overwritten, inserted and deleted bytes,
    truncations, header fields set to extremes; half with the checksum made right again, so the
    damage reaches the parsers behind it."""
    rng = random.Random(seed)
    for _ in range(count):
        frame = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(6)
            at = rng.randrange(len(frame)) if frame else 0
            if kind == 0 and frame:
                frame[at] ^= 1 << rng.randrange(8)
            elif kind == 1 and frame:
                frame[at] = rng.choice((0, 0xFF, 0x7F, 0x80, ord("["), ord("{"), ord('"')))
            elif kind == 2:
                frame[at:at] = rng.randbytes(rng.randint(1, 16))
            elif kind == 3 and frame:
                del frame[at : at + rng.randint(1, 16)]
            elif kind == 4:
                del frame[rng.randrange(len(frame) + 1) :]
            elif kind == 5 and len(frame) >= 20:
                field_at, size = rng.choice(((5, 1), (6, 1), (7, 1), (8, 4), (12, 8)))
                frame[field_at : field_at + size] = rng.choice((b"\0", b"\xff")) * size
        if len(frame) >= 24 and rng.random() < 0.5:
            struct.pack_into("<I", frame, 20, frame_checksum(frame))
        yield bytes(frame)


def post_frames(url: str, context: ssl.SSLContext, frames: Iterable[bytes], timeout_s: float = 60.0) -> Counter:
    """POST each frame to ``url``'s step path over one kept-alive connection (opened again when the
    server closes it, as it may after refusing a body): how many got each status. A connection the
    server dropped without an answer counts as status 0."""
    parts = urlsplit(url)
    statuses: Counter = Counter()
    connection: http.client.HTTPSConnection | None = None
    for frame in frames:
        if connection is None:
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s, context=context)
        try:
            connection.request("POST", STEP_PATH, body=frame, headers={"Content-Type": "application/octet-stream"})
            reply = connection.getresponse()
            reply.read()
            statuses[reply.status] += 1
            if reply.will_close:
                connection.close()
                connection = None
        except (http.client.HTTPException, OSError):
            statuses[0] += 1
            connection.close()
            connection = None
    if connection is not None:
        connection.close()
    return statuses
