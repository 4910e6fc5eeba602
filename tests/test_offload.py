"""Offloading: same tokens at every offload fraction, and a stage's memory bounded while it streams."""

from __future__ import annotations

import gc

import pytest
import torch
from bloombee_stage.model import offload
from bloombee_stage.model.offload import available_memory, spread
from bloombee_stage.model.packed import should_pack
from pipelines import SMOLLM2, start_pipeline
from test_pipeline_smollm2 import completion_request, reference_tokens

PROMPT_IDS = [504, 3458, 282, 4649, 314, 253, 3104, 30, 378, 3458, 282]


@pytest.mark.parametrize(("count", "fraction", "expected"), [
    (30, 0.0, []), (30, 1.0, list(range(30))), (4, 0.5, [1, 3]), (10, 0.25, [2, 7]), (1, 0.5, []), (3, 1 / 3, [1]),
])  # fmt: skip
def test_offloaded_layers_are_spread_through_the_span(count, fraction, expected):
    assert spread(count, fraction) == expected


@pytest.mark.parametrize(("limit", "usage", "expected"),
                         [("max", "5", "host"), ("1000", "400", 600), ("100", "400", 0)])  # fmt: skip
def test_available_memory_is_the_containers_room_where_that_is_less(tmp_path, monkeypatch, limit, usage, expected):
    """A pod reads the host's MemAvailable; its cgroup's limit minus usage is what it may still
    take (packing and the streaming rate's cached-or-not are judged against it)."""
    (tmp_path / "max").write_text(limit + "\n")
    (tmp_path / "current").write_text(usage + "\n")
    monkeypatch.setattr(offload, "CGROUP_MEMORY_FILES", ((str(tmp_path / "missing"), str(tmp_path / "missing")),))
    host = available_memory()
    assert host > 0  # this machine has /proc/meminfo and no readable limit at these paths
    monkeypatch.setattr(offload, "CGROUP_MEMORY_FILES", ((str(tmp_path / "max"), str(tmp_path / "current")),))
    if expected == "host":  # "max": no limit, MemAvailable stands (it moves a little between reads)
        assert abs(available_memory() - host) < host // 10
    else:
        assert available_memory() == expected
        # a container at (or past) its limit has no room for a packed copy of any size
        assert should_pack(torch.device("cpu"), torch.float32, 100) is (expected > 200)


def test_a_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        spread(10, 1.5)


def greedy(model, prompt: list[int], new_tokens: int, rollback_at: int = 5) -> tuple[list[int], object]:
    """Decode greedily through a StageModel holding the whole model; once, roll the cache back a token and redo it."""
    from bloombee_stage.model.span import truncate_cache

    cache, tokens, rolled = model.new_cache(), [], False
    logits = model.forward(torch.tensor([prompt]), cache)
    while len(tokens) < new_tokens:
        tokens.append(int(logits[0, -1].argmax()))
        if len(tokens) == rollback_at and not rolled:
            rolled = True
            truncate_cache(cache, cache.get_seq_length() - 1)  # forget the last token fed ...
            logits = model.forward(torch.tensor([tokens[-2:-1]]), cache)  # ... feed it again ...
            tokens.pop()  # ... and predict the newest one a second time
            continue
        logits = model.forward(torch.tensor([tokens[-1:]]), cache)
    return tokens, cache


@pytest.mark.model
@pytest.mark.parametrize("weights", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kv", [0.0, 0.5, 1.0])
def test_greedy_tokens_do_not_depend_on_offload(smollm2_dir, smollm2_reference, weights, kv, tmp_path):
    from bloombee_stage.model.span import OffloadSettings, Span, StageModel

    torch.set_num_threads(1)
    model = StageModel(smollm2_dir, Span(0, 30, 30), offload=OffloadSettings(weights, kv, kv_dir=tmp_path))
    tokens, cache = greedy(model, PROMPT_IDS, 12)
    assert tokens == reference_tokens(smollm2_reference, PROMPT_IDS, 12)
    tiers = model.weight_tiers()
    layer_bytes = 14_155_776  # one SmolLM2 layer in float32
    assert tiers["disk"] == pytest.approx(round(30 * weights) * layer_bytes, rel=0.01)
    if weights:
        assert model.streamer.stats.loads > 0 and tiers["slots"] >= 2 * layer_bytes
    store = getattr(cache, "bloombee_kv_store", None)
    assert (store is not None) == bool(kv)  # KV went to disk exactly when asked, and came back
    if store is not None:
        assert store.bytes_written > 0 and store.bytes_read > 0 and list(tmp_path.glob("bloombee-kv-*/layer*"))
    del cache, store
    gc.collect()
    assert not list(tmp_path.glob("bloombee-kv-*"))  # a session's KV files go with it


@pytest.mark.model
def test_a_streaming_stage_stays_within_its_memory_while_serving_more_weights(tmp_path, smollm2_reference):
    """Stage 1 serves 29 layers (411 MB of weights) with weights and KV offloaded, next to stage 0 (1 layer)."""
    pipeline = start_pipeline(tmp_path, SMOLLM2, "smollm2", num_stages=2, stage_overrides={
        0: {"layers": (0, 1)}, 1: {"layers": (1, 30), "offload_weights": 1.0, "offload_kv": 1.0}})  # fmt: skip
    try:
        status, reply = pipeline.post("/completions", completion_request("The three most important inventions are"))
        assert status == 200, reply
        assert reply["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, reply["prompt_token_ids"])
        small, streaming = pipeline.stage_info(0), pipeline.stage_info(1)
        tiers = streaming["offload"]["weight_tiers"]
        head = streaming["memory"]["weight_bytes"]  # what stage 1 keeps resident: its final norm and LM head
        budget = small["memory"]["rss_bytes"] + head + tiers["slots"] + (64 << 20)
        assert tiers["disk"] > 400e6 and tiers["disk"] > budget - small["memory"]["rss_bytes"]  # it cannot all fit
        assert streaming["memory"]["rss_bytes"] < budget, (streaming["memory"], small["memory"], tiers)
        assert streaming["offload"]["tier_bandwidth"]["disk_read_bps"] > 0
        assert streaming["offload"]["stream"]["bytes_read"] >= 29 * 14_155_776  # every layer came in at least once
    finally:
        pipeline.backend.stop()


@pytest.mark.parametrize("kv", [0.5, 1.0])
def test_a_trees_accepted_path_moves_in_an_offloaded_kv_cache_as_in_a_resident_one(tiny_dir, tmp_path, kv):
    """The cause of wrong tokens with draft trees on offloaded KV: a step only appends to a layer's
    file, so the accepted path moved into place in memory never reached the file, and the next
    page-in read the tree's first nodes instead. ``rewind`` writes the moved positions back."""
    from bloombee_stage.model.span import OffloadSettings, Span, StageModel

    resident = StageModel(tiny_dir, Span(0, 6, 6), packed="off")
    offloaded = StageModel(tiny_dir, Span(0, 6, 6), packed="off", offload=OffloadSettings(kv=kv, kv_dir=tmp_path))
    prompt, tree_tokens, tree = [5, 9, 14, 3, 7], [11, 12, 13, 21, 22], [-1, -1, 0, 1, 1]
    outputs = []
    for model in (resident, offloaded):
        cache = model.new_cache()
        model.forward_rows(torch.tensor([prompt]), [cache], [len(prompt)], [1])
        model.forward_rows(torch.tensor([[42, *tree_tokens]]), [cache], [6], [6], [tree])  # a tree after token 42
        model.rewind(cache, len(prompt) + 3, [1, 4])  # kept: node 1, then its child node 4
        outputs.append(model.forward_rows(torch.tensor([[30, 31]]), [cache], [2], [2])[0])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    again = StageModel(tiny_dir, Span(0, 6, 6), packed="off")
    cache = again.new_cache()  # the same tokens as a chain: what the kept path must equal
    again.forward_rows(torch.tensor([[*prompt, 42, 12, 22]]), [cache], [8], [1])
    assert torch.allclose(again.forward_rows(torch.tensor([[30, 31]]), [cache], [2], [2])[0], outputs[0], atol=1e-4)
