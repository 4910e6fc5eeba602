"""Wire frames: exact round trips and a clear error for every kind of damage."""

from __future__ import annotations

import struct

import pytest
import torch
from bloombee_stage.wire.codecs import CODECS
from bloombee_stage.wire.frame import Frame, WireError, decode_frame, encode_frame, frame_checksum
from bloombee_stage.wire.tensors import frame_tensor, tensor_frame


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_is_bit_exact(codec, dtype):
    tensor = (torch.randn(2, 5, 7) * 100).to(dtype)
    if dtype.is_floating_point:
        tensor.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    frame = decode_frame(encode_frame(tensor_frame(tensor, {"session": "s", "step": 3}), codec))
    back = frame_tensor(frame)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))  # bits, so NaN and -0.0 count
    assert frame.meta == {"session": "s", "step": 3} and frame.codec == codec


def test_empty_and_scalar_tensors():
    for tensor in (torch.empty(0, dtype=torch.int64), torch.tensor(3.5)):
        assert torch.equal(frame_tensor(decode_frame(encode_frame(tensor_frame(tensor, {})))), tensor)


@pytest.fixture
def good() -> bytes:
    return encode_frame(
        Frame(meta={"step": 9, "rows": [{"session": "abc"}]}, dtype="float32", shape=(2, 3), data=bytes(24))
    )


def test_every_truncation_is_reported(good):
    for cut in range(len(good)):
        with pytest.raises(WireError, match="truncated"):
            decode_frame(good[:cut])


def test_trailing_bytes_are_reported(good):
    with pytest.raises(WireError, match="trailing bytes"):
        decode_frame(good + b"\x00")


def test_every_single_bit_flip_is_caught(good):
    for index in range(len(good)):
        for bit in (0, 7):
            damaged = bytearray(good)
            damaged[index] ^= 1 << bit
            with pytest.raises(WireError):
                decode_frame(bytes(damaged))


def _reseal(buffer: bytearray) -> bytes:
    struct.pack_into("<I", buffer, 20, frame_checksum(buffer))
    return bytes(buffer)


def test_unknown_dtype_and_codec_name_the_frame(good):
    for offset, value, message in ((5, 99, "unknown dtype id 99"), (6, 99, "unknown codec id 99")):
        damaged = bytearray(good)
        damaged[offset] = value
        with pytest.raises(WireError, match=message) as caught:
            decode_frame(_reseal(damaged))
        assert "step=9 session=abc" in str(caught.value)


def test_wrong_payload_size_for_shape(good):
    damaged = bytearray(good)
    struct.pack_into("<Q", damaged, 24, 3)  # shape (3, 3) needs 36 bytes, the payload has 24
    with pytest.raises(WireError, match=r"needs 36"):
        decode_frame(_reseal(damaged))


def test_encoder_refuses_inconsistent_frames():
    with pytest.raises(WireError, match="data bytes for shape"):
        encode_frame(Frame(meta={}, dtype="float32", shape=(2,), data=bytes(4)))
