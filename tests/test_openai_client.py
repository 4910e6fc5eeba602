"""The official `openai` Python client against the gateway: models, chat, completions, streaming, errors, keys.

The gateway here requires an API key, batches rows into steps and drafts with a separate small
model (the tiny model drafting for itself, so nearly every drafted token must be accepted).
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch
from pipelines import Pipeline, start_pipeline

KEY = "sk-bloombee-test"


@pytest.fixture(scope="module")
def keyed_pipeline(tmp_path_factory, tiny_dir) -> Iterator[Pipeline]:
    gateway_args = ["--api-key", KEY, "--draft", "model", "--draft-model", str(tiny_dir), "--micro-batch", "4"]
    pipeline = start_pipeline(tmp_path_factory.mktemp("keyed"), str(tiny_dir), "tiny", gateway_args=gateway_args)
    yield pipeline
    pipeline.backend.stop()


@pytest.fixture(scope="module")
def client(keyed_pipeline) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed_pipeline.endpoint, api_key=KEY, max_retries=0, timeout=120)


def test_models_and_chat(client):
    assert [model.id for model in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_streaming_gives_the_same_text_and_usage(client):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 12,
               "temperature": 0, "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens == 12
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"


def test_completions_with_a_model_draft_equal_generate(client, keyed_pipeline, tiny_dir):
    from transformers import AutoModelForCausalLM

    prompt = [1, 450, 3172, 282, 1345, 314, 253]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                      eos_token_id=None)[0, len(prompt) :].tolist()  # fmt: skip
    assert reply.choices[0].model_extra["token_ids"] == expected
    metrics = keyed_pipeline.gateway_metrics()
    proposed, accepted = (
        metrics["bloombee_gateway_draft_proposed_total"],
        metrics["bloombee_gateway_draft_accepted_total"],
    )
    assert proposed > 0 and accepted / proposed > 0.9  # the model drafting for itself is nearly always right


def test_sampling_with_a_seed_is_reproducible(client):
    request = {"model": "tiny", "prompt": "once upon", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 5,
               "extra_body": {"ignore_eos": True}}  # fmt: skip
    first, again = client.completions.create(**request), client.completions.create(**request)
    assert first.choices[0].text == again.choices[0].text
    assert first.usage.completion_tokens == 10


def test_errors_arrive_as_the_clients_exceptions(client, keyed_pipeline):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    stranger = openai.OpenAI(base_url=keyed_pipeline.endpoint, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.models.list()
    assert caught.value.code == "invalid_api_key"


def test_logprobs_under_speculation_are_the_target_models(client, tiny_dir):
    """Tokens accepted from drafts in a verification pass carry the logprobs the last stage computed
    from the target's logits at their positions, equal to transformers' log_softmax."""
    from test_openai_fields import check_completion_logprobs
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    check_completion_logprobs(client, reference, top=2)


def test_structured_output_under_speculation(client):
    """The draft model knows no grammar: the last stage masks what the grammar forbids at each
    drafted position, so a drafted token outside it is rejected and the answer still holds."""
    from test_openai_fields import check_structured_output

    check_structured_output(client)
