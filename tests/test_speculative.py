"""Speculative decoding: drafts, greedy verification, and the same tokens as generate through real stages."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from bloombee_stage.gateway.drafting import DraftLength, expected_tokens, prompt_lookup_draft
from bloombee_stage.stage.verify import accept_greedy
from pipelines import SMOLLM2, start_pipeline
from test_pipeline_smollm2 import chat_request, completion_request, reference_tokens


@pytest.mark.parametrize(("context", "k", "expected"), [
    ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),  # the trigram is new, the bigram [1, 2] was seen: continue it
    ([5, 1, 2, 9, 1, 2, 7, 1, 2], 2, [7, 1]),  # the latest earlier match wins
    ([1, 2, 3], 4, []),  # nothing repeats
    ([7, 7], 3, [7]),  # a match right before the tail
    ([1, 2, 3, 1, 2], 0, []),
])  # fmt: skip
def test_prompt_lookup_continues_the_latest_earlier_match(context, k, expected):
    assert prompt_lookup_draft(context, k) == expected


def test_verification_keeps_the_agreed_prefix_and_the_models_next_token():
    assert accept_greedy([], [9]) == [9]
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted + a bonus token
    assert accept_greedy([4, 5, 6], [4, 8, 6, 7]) == [4, 8]  # the model's token replaces the first miss
    assert accept_greedy([4, 5, 6], [3, 5, 6, 7]) == [3]
    with pytest.raises(ValueError, match="expected one more"):
        accept_greedy([1, 2], [1, 2])


def test_draft_length_follows_acceptance_and_round_trip():
    length = DraftLength(maximum=8, round_trip_s=0.2, draft_token_s=0.001)
    for _ in range(10):
        length.update(8, 8, round_trip_s=0.2, draft_seconds=0.008)
    assert length.current == 8  # always accepted, cheap drafts: the longest draft
    for _ in range(10):
        length.update(8, 0, round_trip_s=0.2, draft_seconds=0.16)
    assert length.current == 0  # never accepted and not free: drafting does not pay ...
    for _ in range(length.probe_every - 1):
        length.update(0, 0, round_trip_s=0.2)
    assert length.current == 1  # ... but once in a while one token probes whether that changed
    assert length.acceptance == pytest.approx(80 / 160)
    slow_draft = DraftLength(maximum=8, accept_rate=0.7, round_trip_s=0.01, draft_token_s=0.01)
    fast_draft = DraftLength(maximum=8, accept_rate=0.7, round_trip_s=0.2, draft_token_s=0.001)
    assert slow_draft.current < fast_draft.current  # drafting that costs as much as a round trip pays less


def test_expected_tokens_per_round():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.model
def test_prompt_lookup_gives_the_tokens_of_generate_in_fewer_rounds(tmp_path, smollm2_reference):
    pipeline = start_pipeline(tmp_path, SMOLLM2, "smollm2", gateway_args=["--draft", "prompt-lookup"])
    try:
        requests = [
            ("/completions", completion_request("def fibonacci(n):\n")),
            ("/chat/completions", chat_request("Repeat this sentence three times: the cat sat on the mat.")),
            ("/chat/completions", chat_request("Write a short poem about the sea.")),
        ]
        for path, body in requests:
            status, reply = pipeline.post(path, body)
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, reply["prompt_token_ids"])
        metrics = pipeline.gateway_metrics()
        generated = metrics["bloombee_gateway_generation_tokens_total"]
        assert metrics["bloombee_gateway_draft_accepted_total"] > 0
        assert metrics["bloombee_gateway_rounds_total"] < generated  # some rounds gave several tokens
    finally:
        pipeline.backend.stop()


@pytest.mark.model
def test_early_exit_drafts_in_micro_batches_give_the_tokens_of_generate(tmp_path, smollm2_reference):
    """Concurrent requests, batched into shared steps, each drafting with the model's first 12 layers."""
    # One step in flight at a time: rows queue behind it and leave together (at load, that is the common case).
    gateway_args = ["--draft", "early-exit", "--draft-layers", "12", "--micro-batch", "4", "--max-in-flight", "1"]
    pipeline = start_pipeline(tmp_path, SMOLLM2, "smollm2", gateway_args=gateway_args)
    try:
        prompts = ["Write a short poem about the sea.", "List three colours of the rainbow.",
                   "What is the capital of France?", "Repeat after me: red, green, blue, red, green."]  # fmt: skip
        metrics = assert_batched_greedy(pipeline, smollm2_reference, prompts)
        assert metrics["bloombee_gateway_draft_accepted_total"] > 0
        assert metrics["bloombee_gateway_rounds_total"] < metrics["bloombee_gateway_generation_tokens_total"]

        sampled = chat_request("Tell me a story about a dragon.", temperature=0.8, top_p=0.95, seed=11, max_tokens=20)
        first, again = pipeline.post("/chat/completions", sampled), pipeline.post("/chat/completions", sampled)
        assert first[0] == 200 and first[1]["choices"][0]["token_ids"] == again[1]["choices"][0]["token_ids"]
        assert len(first[1]["choices"][0]["token_ids"]) == 20
    finally:
        pipeline.backend.stop()


def assert_batched_greedy(pipeline, reference, prompts: list[str], max_tokens: int = 24) -> dict[str, float]:
    """The prompts at once (their rows share steps): each answer is generate's, token for token.
    Returns the gateway's metrics after them."""
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        replies = list(pool.map(lambda p: pipeline.post("/chat/completions", chat_request(p, max_tokens=max_tokens)),
                                prompts))  # fmt: skip
    for status, reply in replies:
        assert status == 200, reply
        assert reply["choices"][0]["token_ids"] == reference_tokens(reference, reply["prompt_token_ids"], max_tokens)
    metrics = pipeline.gateway_metrics()
    assert metrics["bloombee_gateway_rows_sent_total"] > metrics["bloombee_gateway_steps_sent_total"]  # shared steps
    return metrics

