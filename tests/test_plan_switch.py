"""Plan switches under load, end to end on the local backend: 8 streaming greedy clients while the
resource's nodes change so the planner moves from 3 stages to 2 and back to 3. Nothing fails, every
answer is transformers' `generate`, the gateway keeps its process and address, and the old plan's
stages go once their generations end. The same driver as `bench/replan.py` (which reports the
latencies); here only outcomes are asserted, never timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from replan import run, transformers_reference

PROMPTS = [[1, 504, 3458, 314, 253, 1045 + n, 28, 2] for n in range(8)]
# Tiny Llama layers are ~150 KB of weights; 8 sequences of 64 positions ~128 KB of KV a layer: nodes
# of 0.0006 GiB hold 2 layers (3 stages for 6), nodes of 0.001 GiB 3 (2 stages), each admitting all 8.
THREE_NODES = [{"name": n, "memoryGiB": 0.0006} for n in ("a", "b", "c")]
TWO_NODES = [{"name": n, "memoryGiB": 0.001} for n in ("a", "b")]


@pytest.mark.model
def test_switching_plans_under_load_drops_nothing_and_changes_no_token(tmp_path, tiny_dir):
    said: list[str] = []
    result = run(str(tiny_dir), "tiny", [THREE_NODES, TWO_NODES, THREE_NODES], clients=8, phase_s=4.0,
                 max_tokens=24, prompts=PROMPTS, reference=transformers_reference(tiny_dir), run_dir=tmp_path / "run",
                 context_tokens=64, progress=said.append)  # fmt: skip
    assert [(s["from_stages"], s["to_stages"]) for s in result["switches"]] == [(3, 2), (2, 3)], said
    assert [s["admitted"] for s in result["switches"]] == [8, 8], said
    assert not result["gateway_restarted"] and result["endpoint_kept"]
    phases = result["phases"]
    assert {"before", "switch 1", "after 1", "switch 2", "after 2"} <= set(phases), phases
    for label, summary in phases.items():
        assert summary["failed"] == summary["refused"] == summary["wrong"] == 0, (label, summary)
        assert summary["completed"] >= 1, (label, summary)  # requests really ran in every phase
