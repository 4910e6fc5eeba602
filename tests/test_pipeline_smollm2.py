"""The real model through 3 real stage processes and a real gateway, compared with transformers."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.model

CHAT_PROMPTS = [
    "What is the capital of France? Answer in two sentences.",
    "Write a short poem about the sea.",
    "Explain what a CPU does to a ten year old.",
]
PLAIN_PROMPTS = [
    "The three most important inventions in history are",
    "def fibonacci(n):\n",
]
NEW_TOKENS = 40


def reference_tokens(reference, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers `generate` on the whole model, greedy, running past end-of-sequence."""
    model, _ = reference
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
        )
    return out[0, ids.shape[1] :].tolist()


def chat_request(content: str, **extra) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, **extra}  # fmt: skip


def completion_request(prompt: str, **extra) -> dict:
    return {"model": "smollm2", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}  # fmt: skip


@pytest.mark.parametrize("content", CHAT_PROMPTS)
def test_chat_greedy_matches_transformers_generate(smollm2_pipeline, smollm2_reference, content):
    status, reply = smollm2_pipeline.post("/chat/completions", chat_request(content))
    assert status == 200, reply
    _, tokenizer = smollm2_reference
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert reply["prompt_token_ids"] == list(expected_prompt)
    tokens = reply["choices"][0]["token_ids"]
    assert len(tokens) == NEW_TOKENS
    assert tokens == reference_tokens(smollm2_reference, reply["prompt_token_ids"])
    assert reply["choices"][0]["finish_reason"] == "length"
    usage = reply["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        len(expected_prompt), NEW_TOKENS, len(expected_prompt) + NEW_TOKENS)  # fmt: skip
    # Earlier chats share the system prompt: it may be copied (prefixes.py), never the whole prompt.
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < len(expected_prompt)


@pytest.mark.parametrize("prompt", PLAIN_PROMPTS)
def test_completion_greedy_matches_transformers_generate(smollm2_pipeline, smollm2_reference, prompt):
    status, reply = smollm2_pipeline.post("/completions", completion_request(prompt))
    assert status == 200, reply
    tokens = reply["choices"][0]["token_ids"]
    assert tokens == reference_tokens(smollm2_reference, reply["prompt_token_ids"])
    _, tokenizer = smollm2_reference
    assert reply["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_stops_at_end_of_sequence_like_generate(smollm2_pipeline, smollm2_reference):
    request = chat_request("What is the capital of France?", ignore_eos=False, max_tokens=64)
    status, reply = smollm2_pipeline.post("/chat/completions", request)
    assert status == 200, reply
    model, _ = smollm2_reference
    ids = torch.tensor([reply["prompt_token_ids"]])
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    assert reply["choices"][0]["token_ids"] == expected[0, ids.shape[1] :].tolist()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_eight_concurrent_requests_equal_sequential(smollm2_pipeline):
    prompts = [f"Count from {n} to {n + 10}, separated by commas." for n in range(8)]
    requests = [chat_request(p, max_tokens=24) for p in prompts]
    sequential = [smollm2_pipeline.post("/chat/completions", r) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda r: smollm2_pipeline.post("/chat/completions", r), requests))
    for (s_status, s_reply), (c_status, c_reply) in zip(sequential, concurrent, strict=True):
        assert s_status == c_status == 200
        assert c_reply["choices"][0]["token_ids"] == s_reply["choices"][0]["token_ids"]
    # different prompts really gave different answers (the comparison is not vacuous)
    assert len({tuple(r["choices"][0]["token_ids"]) for _, r in sequential}) > 1


def test_streaming_gives_the_same_text_as_non_streaming(smollm2_pipeline):
    request = completion_request("Once upon a time", max_tokens=24)
    _, whole = smollm2_pipeline.post("/completions", request)
    stream_request = urllib.request.Request(
        smollm2_pipeline.endpoint + "/completions",
        data=json.dumps({**request, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(stream_request, timeout=300) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len(b"data: ") :].decode() for line in reply.read().split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 24


def test_stop_string_ends_the_completion(smollm2_pipeline):
    _, free = smollm2_pipeline.post("/completions", completion_request("1, 2, 3, 4,", max_tokens=16))
    text = free["choices"][0]["text"]
    assert " 7" in text  # the model counts on; the stop below cuts it there
    _, stopped = smollm2_pipeline.post("/completions", completion_request("1, 2, 3, 4,", max_tokens=16, stop=[" 7"]))
    assert stopped["choices"][0]["text"] == text[: text.index(" 7")]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_stage_info_and_metrics(smollm2_pipeline):
    status, _ = smollm2_pipeline.post("/completions", completion_request("Hi", max_tokens=2))
    assert status == 200
    info = smollm2_pipeline.stage_info(1)
    assert info["span"] == [10, 20] and info["total_layers"] == 30
    assert info["memory"]["weight_bytes"] > 0 and info["memory"]["rss_bytes"] > 0
    assert info["ms_per_layer"] > 0  # measured on the request above
    with urllib.request.urlopen(smollm2_pipeline.stage_url(1) + "/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert "bloombee_stage_steps_total" in metrics and "bloombee_stage_forward_seconds_sum" in metrics
