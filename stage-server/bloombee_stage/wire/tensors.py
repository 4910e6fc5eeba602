"""Conversions between torch tensors and wire frames (raw little-endian bytes, C order)."""

from __future__ import annotations

from typing import Any

import torch

from bloombee_stage.wire.frame import Frame

_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_NAMES = {value: key for key, value in _TORCH.items()}


def tensor_frame(tensor: torch.Tensor, meta: dict[str, Any]) -> Frame:
    if tensor.dtype not in _NAMES:
        raise ValueError(f"tensor dtype {tensor.dtype} cannot go on the wire")
    flat = tensor.detach().contiguous().cpu().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return Frame(meta=meta, dtype=_NAMES[tensor.dtype], shape=tuple(tensor.shape), data=raw)


def frame_tensor(frame: Frame) -> torch.Tensor:
    dtype = _TORCH[frame.dtype]
    if not frame.data:
        return torch.empty(frame.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(frame.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(frame.shape)
