"""Pre-packed linear weights for the steps that verify drafts on a CPU.

A step of a few positions (a draft tree, a chain, a micro-batch of decoding rows) is where
speculation pays or loses: on a CPU, torch's ``linear`` for 2 to 64 rows (the BLAS's general
matrix product, which lays the weight out afresh on every call) is far slower than for one
row, so a tree of 8 nodes through a 10-layer span of SmolLM2
costs 1.63x one position and through the last span (with its 49152-token LM head) 1.62x
(``bench/verify_cost.py``, one thread). oneDNN packs each weight once, at load, into its
blocked layout; then the same trees cost 1.09x and 0.93x one plain position. The span says
which steps may use the packed copy (``StageModel.forward_rows``), PackedLinear which rows do.

One session's steps without a draft (a prompt, a plain decode step) keep transformers' own
``linear``, so they stay bit-for-bit what ``generate`` computes; packed steps differ from it by
float rounding only (about 1e-4 on SmolLM2's logits), as any batched kernel does. The packed
copy costs memory once more the size of the packed weights, so it is made only when the host
has room for it twice over (``PACK_HEADROOM``), and never where the plan streams weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bloombee_stage.model.offload import available_memory

PACK_ROWS_HINT = 16  # the row count oneDNN chooses its layout for; any count from 1 runs on it
MAX_PACKED_ROWS = 64  # above this a step is a prompt, where the plain kernel is as fast
PACK_HEADROOM = 2  # pack only when available memory exceeds this many times the packed bytes
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packs for CPUs; CUDA's kernels need no help with few rows."""
    return device.type == "cpu" and dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available()


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` that keeps its own weight (same parameter name, same state dict) and a
    oneDNN-packed copy, used while ``switch.on`` for inputs of 2 to MAX_PACKED_ROWS rows."""

    def __init__(self, linear: torch.nn.Linear, switch: PackedSwitch) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.switch = switch
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.numel() // self.in_features
        if self.switch.on and 1 < rows <= MAX_PACKED_ROWS:
            return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), self.packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(inputs, self.weight, self.bias)


class PackedSwitch:
    """Whether the step now running may use the packed weights (set by the span per step)."""

    def __init__(self) -> None:
        self.on = False
        self.packed_bytes = 0

    @contextmanager
    def turned(self, on: bool) -> Iterator[None]:
        before, self.on = self.on, on
        try:
            yield
        finally:
            self.on = before


def pack_linears(model: torch.nn.Module) -> PackedSwitch:
    """Replace every ``nn.Linear`` of ``model`` by a PackedLinear; return their switch."""
    switch = PackedSwitch()
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        packed = PackedLinear(linear, switch)
        switch.packed_bytes += linear.weight.numel() * linear.weight.element_size()
        setattr(parent, child, packed)
    return switch


def should_pack(device: torch.device, dtype: torch.dtype, weight_bytes: int, setting: str = "auto") -> bool:
    """``setting``: "on", "off" or "auto" (on where packing exists and memory has room for it)."""
    if setting == "off" or not packing_available(device, dtype):
        return False
    if setting == "on":
        return True
    free = available_memory()
    return free is None or free > PACK_HEADROOM * weight_bytes
