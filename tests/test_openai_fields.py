"""Every request field through a real pipeline with the official `openai` client: logprobs equal
to transformers' log_softmax of the same model, prompt lists and n, sampling controls equal to
transformers' generate with the same processors, and a 400 naming each field this server refuses.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch
from pipelines import Pipeline, post_json, start_pipeline

PROMPT = [1, 450, 3172, 282, 1345, 314, 253, 9, 10]


@pytest.fixture(scope="module")
def fields_pipeline(tmp_path_factory, tiny_dir) -> Iterator[Pipeline]:
    pipeline = start_pipeline(tmp_path_factory.mktemp("fields"), str(tiny_dir), "tiny", num_stages=2,
                              gateway_args=["--micro-batch", "4"])  # fmt: skip
    yield pipeline
    pipeline.backend.stop()


@pytest.fixture(scope="module")
def client(fields_pipeline) -> openai.OpenAI:
    return openai.OpenAI(base_url=fields_pipeline.endpoint, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def model_logprobs(reference, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits: row p is the distribution of the token after position p."""
    with torch.inference_mode():
        return torch.log_softmax(reference(torch.tensor([tokens])).logits[0].float(), dim=-1)


def check_completion_logprobs(client: openai.OpenAI, reference, top: int, **extra) -> None:
    """Echoed prompt and answer: every token's logprob and its top alternatives equal transformers'."""
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                      logprobs=top, extra_body={"ignore_eos": True, "return_token_ids": True},
                                      **extra)  # fmt: skip
    choice = reply.choices[0]
    answer = choice.model_extra["token_ids"]
    tokens = PROMPT + answer
    expected = model_logprobs(reference, tokens)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(tokens) and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    for position in range(1, len(tokens)):
        assert logprobs.token_logprobs[position] == pytest.approx(float(expected[position - 1, tokens[position]]),
                                                                  abs=1e-4)  # fmt: skip
        alternatives = logprobs.top_logprobs[position]
        best = expected[position - 1].topk(top)
        assert len(alternatives) <= top  # tokens with the same text share a key
        assert max(alternatives.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert answer == expected.argmax(dim=-1)[len(PROMPT) - 1 : -1].tolist()  # greedy: the argmax each time


def test_completion_logprobs_with_echo_equal_transformers(client, reference):
    check_completion_logprobs(client, reference, top=3)


def test_chat_logprobs_streamed_and_whole_equal_transformers(client, reference, fields_pipeline):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5,
               "temperature": 0, "logprobs": True, "top_logprobs": 4,
               "extra_body": {"ignore_eos": True, "return_token_ids": True}}  # fmt: skip
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    tokens = reply.model_extra["prompt_token_ids"] + choice.model_extra["token_ids"]
    expected = model_logprobs(reference, tokens)
    first = len(reply.model_extra["prompt_token_ids"])
    assert len(choice.logprobs.content) == 5
    for index, entry in enumerate(choice.logprobs.content):
        position = first + index - 1
        assert entry.logprob == pytest.approx(float(expected[position, tokens[position + 1]]), abs=1e-4)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(expected[position].topk(4).values.tolist(),
                                                                            abs=1e-4)  # fmt: skip
        assert entry.bytes == list(entry.token.encode())
    streamed = [entry for chunk in client.chat.completions.create(**request, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]  # fmt: skip
    assert [entry.logprob for entry in streamed] == pytest.approx([e.logprob for e in choice.logprobs.content],
                                                                  abs=1e-6)  # fmt: skip


def test_prompt_lists_and_n_give_every_choice_in_order(client):
    reply = client.completions.create(model="tiny", prompt=["one two", "three"], n=3, max_tokens=4, temperature=1.0,
                                      seed=11, extra_body={"ignore_eos": True})  # fmt: skip
    assert [choice.index for choice in reply.choices] == list(range(6))
    again = client.completions.create(model="tiny", prompt=["one two", "three"], n=3, max_tokens=4, temperature=1.0,
                                      seed=11, extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # reproducible with a seed
    assert len({c.text for c in reply.choices[:3]}) > 1  # independent samples, not one repeated
    assert reply.usage.completion_tokens == 24
    by_ids = client.completions.create(model="tiny", prompt=[PROMPT, PROMPT[:4]], max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    alone = client.completions.create(model="tiny", prompt=PROMPT[:4], max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert by_ids.choices[1].model_extra["token_ids"] == alone.choices[0].model_extra["token_ids"]
    assert by_ids.choices[1].model_extra["prompt_token_ids"] == PROMPT[:4]
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2,
                                                 max_tokens=3, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))  # fmt: skip
    finished = sorted(c.index for chunk in chunks for c in chunk.choices if c.finish_reason == "length")
    assert finished == [0, 1]


def test_sampling_controls_equal_transformers_generate(client, reference):
    """Greedy with repetition penalty, logit bias, min_tokens and stop token ids: the tokens of
    transformers' generate with its own processors for the same settings."""
    eos = 7
    banned = int(model_logprobs(reference, PROMPT)[-1].argmax())  # the token greedy would pick first
    reply = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logit_bias={str(banned): -100},
        extra_body={"repetition_penalty": 1.5, "min_tokens": 4, "stop_token_ids": [eos], "return_token_ids": True,
                    "ignore_eos": True})  # fmt: skip
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        generated = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                       repetition_penalty=1.5, min_new_tokens=4, eos_token_id=[eos],
                                       sequence_bias={(banned,): -100.0}, pad_token_id=0)[0, len(PROMPT) :].tolist()
    if eos in generated:
        generated = generated[: generated.index(eos) + 1]
    assert reply.choices[0].model_extra["token_ids"] == generated
    assert banned not in generated


def test_presence_and_frequency_penalties_change_greedy_output_as_defined(client, reference):
    """Greedy with penalties: each step's token is the argmax of the logits less the penalties
    over the completion so far (computed here from the model directly)."""
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, presence_penalty=1.5,
                                      frequency_penalty=0.5, extra_body={"ignore_eos": True, "return_token_ids": True})
    tokens, completion = list(PROMPT), []
    for _ in range(8):
        with torch.no_grad():
            scores = reference(torch.tensor([tokens])).logits[0, -1].float()
        for token in set(completion):
            scores[token] -= 1.5 + 0.5 * completion.count(token)
        completion.append(int(scores.argmax()))
        tokens.append(completion[-1])
    assert reply.choices[0].model_extra["token_ids"] == completion


@pytest.mark.parametrize("field, value", [
    ("tool_choice", "required"),  # with no tools to call
    ("functions", [{"name": "f"}]),
    ("response_format", {"type": "xml"}),
    ("guided_regex", "[unclosed"),
    ("guided_json", {"type": 5}),
    ("best_of", 3),
    ("use_beam_search", True),
    ("no_such_field", 1),
])  # fmt: skip
def test_a_field_this_server_does_not_implement_is_refused_by_name(fields_pipeline, field, value):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], field: value}
    path = "/chat/completions"
    if field == "best_of":
        body, path = {"model": "tiny", "prompt": "x", field: value}, "/completions"
    status, reply = fields_pipeline.post(path, body)
    assert status == 400 and reply["error"]["param"] == field, reply
    assert field in reply["error"]["message"]


def test_harmless_and_default_valued_fields_are_accepted(fields_pipeline):
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "max_tokens": 2, "user": "u", "metadata": {"k": "v"}, "store": False, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "parallel_tool_calls": True, "top_k": -1, "logprobs": False}
    status, reply = fields_pipeline.post("/chat/completions", body)
    assert status == 200, reply
    image = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    status, reply = fields_pipeline.post("/chat/completions", image)
    assert status == 400 and reply["error"]["param"] == "messages.0.content", reply


def test_vllm_endpoints_and_request_ids(fields_pipeline, client):
    import json
    import urllib.request

    base = fields_pipeline.endpoint.removesuffix("/v1")
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with urllib.request.urlopen(base + "/health", timeout=30) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(base + "/version", timeout=30) as reply:
        assert json.loads(reply.read())["version"]
    status, tokenized = post_json(base + "/tokenize", {"model": "tiny", "prompt": "hello world",
                                                       "return_token_strs": True})  # fmt: skip
    assert status == 200 and tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
    status, back = post_json(base + "/detokenize", {"tokens": tokenized["tokens"]})
    assert status == 200 and back["prompt"] == "hello world"
    status, chat = post_json(base + "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                           extra_body={"return_token_ids": True})  # fmt: skip
    assert status == 200 and chat["tokens"] == reply.model_extra["prompt_token_ids"]
    status, refused = post_json(base + "/detokenize", {"tokens": [10**9]})
    assert status == 400 and refused["error"]["param"] == "tokens"
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=2, extra_headers={"X-Request-Id": "abc-1"})
    assert raw.headers["X-Request-Id"] == "abc-1"
    generated = client.completions.with_raw_response.create(model="tiny", prompt="x", max_tokens=1, stream=True)
    assert generated.headers["X-Request-Id"].startswith("req-")
    log = (fields_pipeline.backend.run_dir / "tiny-gateway.log").read_text()
    line = next(line for line in log.splitlines() if "[request abc-1]" in line)
    assert "POST /v1/chat/completions 200" in line and "completion_tokens=2" in line and "ttft=" in line


def test_metrics_a_vllm_operator_recognises(fields_pipeline, client):
    import urllib.request

    client.completions.create(model="tiny", prompt="one two", max_tokens=3, extra_body={"ignore_eos": True})
    with urllib.request.urlopen(fields_pipeline.endpoint.removesuffix("/v1") + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        assert types[f"bloombee_gateway_{histogram}"] == "histogram"
    for counter in ("prompt_tokens", "generation_tokens", "requests", "steps_sent", "rows_sent", "rounds"):
        assert types[f"bloombee_gateway_{counter}_total"] == "counter"
    assert types["bloombee_gateway_requests_running"] == types["bloombee_gateway_requests_waiting"] == "gauge"
    metrics = fields_pipeline.gateway_metrics()
    assert metrics["bloombee_gateway_time_to_first_token_seconds_count"] >= 1
    assert metrics["bloombee_gateway_generation_tokens_total"] >= 3
    assert not [line for line in text.splitlines() if "_ms" in line.split(" ")[0]]  # seconds everywhere
    stage = fields_pipeline.stage_metrics(0)
    assert stage["bloombee_stage_forward_seconds_count"] >= 1 and "bloombee_stage_layer_seconds" in stage


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "count"], "additionalProperties": False}


def check_structured_output(client: openai.OpenAI, **extra) -> None:
    """Each kind of constraint holds on a random model's answer (which, free, would be noise)."""
    import json
    import re

    import jsonschema

    def ask(**fields) -> str:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "answer"}],
                                               max_tokens=60, **fields, **extra)  # fmt: skip
        assert reply.choices[0].finish_reason == "stop", repr(reply.choices[0].message.content)
        return reply.choices[0].message.content

    schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    for temperature in (0.0, 1.0):
        jsonschema.validate(json.loads(ask(response_format=schema, temperature=temperature, seed=3)), SCHEMA)
    assert isinstance(json.loads(ask(response_format={"type": "json_object"}, temperature=0)), dict)
    assert ask(extra_body={"guided_choice": ["red", "green", "blue"]}, temperature=1.0) in ("red", "green", "blue")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", ask(extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}, temperature=0))


def test_structured_output_follows_the_schema_regex_and_choices(client):
    check_structured_output(client)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Rome"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_tools_required_and_named_calls_parse_and_follow_the_schema(client):
    import json

    import jsonschema

    messages = [{"role": "user", "content": "weather in Paris for 3 days?"}]
    for choice, expected in (("required", {"get_weather", "get_time"}),
                             ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})):
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                               tool_choice=choice, max_tokens=60, temperature=0)  # fmt: skip
        answer = reply.choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None, answer
        call = answer.message.tool_calls[0]
        assert call.function.name in expected and call.id.startswith("call_")
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER],
                                                   tool_choice="required", max_tokens=60, temperature=0,
                                                   stream=True))  # fmt: skip
    calls = [c for chunk in streamed for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation, rendered as the model saw them
    follow_up = [*messages, {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                 {"role": "tool", "tool_call_id": calls[0].id, "content": '{"sky": "clear"}'}]
    reply = client.chat.completions.create(model="tiny", messages=follow_up, tools=[WEATHER], max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"})  # fmt: skip
    assert refused.value.param == "tool_choice"
    broken = {"type": "function", "function": {"name": "broken", "parameters": {"type": 5}}}
    with pytest.raises(openai.BadRequestError) as refused:  # a tool schema that does not compile names `tools`
        client.chat.completions.create(model="tiny", messages=messages, tools=[broken], tool_choice="required")
    assert refused.value.param == "tools" and "does not compile" in refused.value.message
