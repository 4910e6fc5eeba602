"""Shared prompt prefixes: the gateway's index, the stages' forks and parking, and real pipelines
whose later requests copy an earlier request's positions instead of computing them."""

from __future__ import annotations

import time

import pytest
from bloombee_stage.gateway.prefixes import Held, PrefixIndex
from bloombee_stage.model.sampling import shared_length
from bloombee_stage.stage.sessions import SessionError, SessionStore
from bloombee_stage.wire.messages import RowMeta
from pipelines import start_pipeline
from test_pipeline_smollm2 import chat_request, reference_tokens


def test_index_finds_the_longest_shared_prefix_on_the_same_path_and_leaves_one_position():
    index = PrefixIndex(capacity=3, min_shared=4)
    system = list(range(100, 120))
    assert index.hold(Held("a", (0,), (*system, 1, 2, 3))) == []
    assert index.hold(Held("b", (0,), (*system, 1, 2, 9, 9))) == []
    assert index.hold(Held("c", (1,), (*system, 1, 2, 3, 4, 5))) == []  # another path
    assert index.find([*system, 1, 2, 3, 4], (0,)) == ("a", 23)
    assert index.find([*system, 1, 2, 9], (0,)) == ("b", 22)  # the prompt's last position is computed
    assert index.find([7, 7, 7, 7, 7], (0,)) is None
    assert index.find([*system[:3], 5, 5], (0,)) is None  # shares fewer than min_shared
    assert shared_length([1, 2, 3], (1, 2)) == 2


def test_index_lets_the_least_recently_used_go_and_drops_lost_sessions():
    index = PrefixIndex(capacity=2, min_shared=2)
    a, b, c = (Held(name, (0,), (1, 2, 3, n)) for name, n in (("a", 4), ("b", 5), ("c", 6)))
    index.hold(a)
    index.hold(b)
    assert index.find([1, 2, 3, 4, 0], (0,)) == ("a", 4)  # a is now the most recently used
    assert index.hold(c) == [b]
    index.drop("a")
    assert index.find([1, 2, 3, 4, 0], (0,)) == ("c", 3)
    assert PrefixIndex(capacity=0).hold(a) == [a]  # off: nothing is kept
    assert PrefixIndex(capacity=4, min_shared=8).hold(a) == [a]  # too short to be worth keeping
    with pytest.raises(ValueError):
        PrefixIndex(capacity=-1)


def _store(budget_tokens: int) -> SessionStore:
    return SessionStore(new_cache=dict, kv_bytes_per_token=1, kv_budget_bytes=budget_tokens, timeout_s=60,
                        max_length=1000)  # fmt: skip


def test_a_fork_copies_from_its_source_and_a_lost_or_short_source_is_named():
    store = _store(1000)
    source = store.admit("src", 0, 30, max_length=40)
    source.length = 30
    fork = store.admit("new", 20, 5, max_length=40, fork="src")
    assert fork.fork_source is source and fork.fork_length == 20 and fork.length == 0
    for missing, start in (("gone", 5), ("src", 31)):
        with pytest.raises(SessionError) as error:
            store.admit("other", start, 1, max_length=40, fork=missing)
        assert error.value.status == 404 and error.value.code == "fork_source_gone"
        assert missing in str(error.value)
    restarted = store.admit("new", 0, 25, max_length=40)  # a restart from nothing cancels the fork
    assert restarted.fork_source is None
    with pytest.raises(ValueError, match="start must be at least 1"):  # a frame's metadata says so
        RowMeta(session="s", start=0, length=3, fork="src")


def test_parked_sessions_reserve_what_they_hold_and_make_room_least_recently_used_first():
    store = _store(100)
    for name in ("old", "newer"):
        session = store.admit(name, 0, 30, max_length=40)
        session.length = 30
        store.park(name)
        time.sleep(0.01)
    assert store.reserved_tokens() == 60  # parked: 30 each, no longer the 40 they were opened for
    store.admit("live", 0, 50, max_length=50)  # 110 > 100: the least recently used parked one goes
    assert set(store.sessions) == {"newer", "live"}
    fork = store.admit("fork", 10, 5, max_length=15, fork="newer")
    assert fork.fork_source is store.sessions["newer"]
    with pytest.raises(SessionError) as error:  # 95 reserved: evicting "newer" would not make room for 60
        store.admit("big", 0, 60, max_length=60)
    assert error.value.code == "kv_budget_exceeded" and "big" not in store.sessions
    assert "newer" in store.sessions  # nothing evicted in vain


@pytest.mark.model
def test_a_conversations_next_turn_copies_the_earlier_turn_and_gives_the_tokens_of_generate(
    smollm2_pipeline, smollm2_reference
):
    first = chat_request("Name three rivers in Europe.", max_tokens=16)
    status, reply = smollm2_pipeline.post("/chat/completions", first)
    assert status == 200, reply
    answer = reply["choices"][0]["message"]["content"]
    before = [smollm2_pipeline.stage_metrics(i).get("bloombee_stage_forked_tokens_total", 0.0) for i in range(3)]
    follow_up = {**first, "messages": [*first["messages"], {"role": "assistant", "content": answer},
                                       {"role": "user", "content": "Which of them is the longest?"}]}  # fmt: skip
    status, again = smollm2_pipeline.post("/chat/completions", follow_up)
    assert status == 200, again
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert len(reply["prompt_token_ids"]) <= cached < len(again["prompt_token_ids"])
    assert again["prompt_token_ids"][:cached] == (reply["prompt_token_ids"] + reply["choices"][0]["token_ids"])[:cached]
    assert again["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, again["prompt_token_ids"], 16)
    after = [smollm2_pipeline.stage_metrics(i)["bloombee_stage_forked_tokens_total"] for i in range(3)]
    assert all(a - b >= cached for a, b in zip(after, before, strict=True))  # every stage copied the prefix


def test_kept_sessions_older_than_the_stages_idle_time_out_are_not_offered():
    now = [0.0]
    index = PrefixIndex(capacity=4, min_shared=2, max_idle_s=10.0, clock=lambda: now[0])
    index.hold(Held("a", (0,), (1, 2, 3, 4)))
    now[0] = 8.0
    assert index.find([1, 2, 3, 9], (0,)) == ("a", 3)  # forking from it counts as use
    now[0] = 17.0
    assert index.find([1, 2, 3, 9], (0,)) == ("a", 3)
    now[0] = 27.5
    assert index.find([1, 2, 3, 9], (0,)) is None and len(index) == 0


KV_PER_TOKEN = 768  # the tiny model's second stage: 3 layers x (keys + values) x 2 heads x 16 x 4 bytes


def test_a_fork_whose_source_a_stage_let_go_computes_the_prompt_after_all(tmp_path, tiny_dir):
    # Stage 1 has room for about 100 tokens of KV: a big request there evicts the parked sessions.
    budget = ["--kv-budget-gib", repr(100 * KV_PER_TOKEN / (1 << 30))]
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "tiny", num_stages=2, stage_args={1: budget})
    try:
        assert pipeline.stage_info(1)["offload"]["kv_bytes_per_token"]["device"] == KV_PER_TOKEN
        request = {"model": "tiny", "prompt": list(range(300, 340)), "max_tokens": 8, "temperature": 0,
                   "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        status, first = pipeline.post("/completions", request)
        assert status == 200, first
        status, second = pipeline.post("/completions", request)  # forks from the first
        assert status == 200, second
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 39
        big = {**request, "prompt": list(range(1000, 1010)), "max_tokens": 60}  # 70 tokens: both parked ones go
        assert pipeline.post("/completions", big)[0] == 200
        status, third = pipeline.post("/completions", request)  # its fork source is gone from stage 1
        assert status == 200, third
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == third["choices"][0]["token_ids"]
        assert pipeline.stage_metrics(1)['bloombee_stage_errors_total{code="fork_source_gone"}'] >= 1
    finally:
        pipeline.backend.stop()


def test_the_gateway_stops_offering_sessions_the_stages_have_timed_out(tmp_path, tiny_dir):
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "tiny", num_stages=2, stage_args={1: ["--session-timeout", "2"]})
    try:
        request = {"model": "tiny", "prompt": list(range(300, 340)), "max_tokens": 4, "temperature": 0,
                   "ignore_eos": True}  # fmt: skip
        assert pipeline.post("/completions", request)[0] == 200
        time.sleep(3)
        status, again = pipeline.post("/completions", request)
        assert status == 200, again
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert 'bloombee_stage_errors_total{code="fork_source_gone"}' not in pipeline.stage_metrics(1)  # not tried
    finally:
        pipeline.backend.stop()
