"""Pre-packed weights for steps of a few positions (model/packed.py), on the real CPU kernels."""

from __future__ import annotations

import pytest
import torch
from bloombee_stage.model.packed import MAX_PACKED_ROWS, PackedLinear, PackedSwitch
from bloombee_stage.model.span import OffloadSettings, Span, SpanError, StageModel


def test_a_packed_linear_matches_linear_and_is_exact_where_it_stays_off():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 320, bias=True)
    switch = PackedSwitch()
    packed = PackedLinear(linear, switch)
    assert packed.weight is linear.weight  # same parameter: the state dict does not change
    with torch.inference_mode():
        for rows in (1, 2, 5, 16, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1):
            inputs = torch.randn(1, rows, 96)
            expected = linear(inputs)
            assert torch.equal(packed(inputs), expected)  # switch off: transformers' own kernel
            with switch.turned(True):
                got = packed(inputs)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            if rows == 1 or rows > MAX_PACKED_ROWS:  # one row, or a prompt: the plain kernel even when on
                assert torch.equal(got, expected)
    assert not switch.on


def test_a_stage_packs_on_cpu_unless_told_not_to_or_it_streams_weights(tiny_dir, tmp_path):
    packed = StageModel(tiny_dir, Span(3, 6, 6))
    assert packed.packed is not None
    linears = [module for module in packed.model.modules() if isinstance(module, PackedLinear)]
    assert len(linears) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    assert packed.weight_tiers()["packed"] == sum(m.weight.numel() * 4 for m in linears)
    assert StageModel(tiny_dir, Span(3, 6, 6), packed="off").packed is None
    with pytest.raises(SpanError, match="packed 'yes' not one of"):
        StageModel(tiny_dir, Span(3, 6, 6), packed="yes")
    streaming = StageModel(tiny_dir, Span(3, 6, 6), offload=OffloadSettings(weights=0.5, kv_dir=tmp_path))
    assert streaming.packed is None  # memory is short where the plan streams weights


@pytest.mark.parametrize("verifying", [False, True])
def test_drafts_and_micro_batches_run_packed_and_a_plain_step_does_not(tiny_dir, verifying):
    stage = StageModel(tiny_dir, Span(0, 6, 6))
    seen: list[bool] = []
    stage.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(module.switch.on))
    caches = [stage.new_cache(), stage.new_cache()]
    with torch.inference_mode():
        stage.forward_rows(torch.tensor([[5, 17, 300, 2]]), caches[:1], [4])  # a prompt
        stage.forward_rows(torch.tensor([[41, 9, 3]]), caches[:1], [3], keep=[3], verifying=verifying)  # a chain
        stage.forward_rows(torch.tensor([[8, 9, 10]]), caches[:1], [3], keep=[3], trees=[[-1, -1]])  # a tree
        stage.forward_rows(torch.tensor([[7], [7]]), [caches[0], stage.new_cache()], [1, 1])  # a micro-batch
    assert seen == [False, verifying, True, True]
