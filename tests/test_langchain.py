"""LangChain's ChatOpenAI against the gateway: invoke, stream, bind_tools and with_structured_output
(LangChain's default for it: response_format json_schema, which the last stage enforces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pytest
from pipelines import Pipeline, start_pipeline
from pydantic import BaseModel, Field


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_dir) -> Iterator[object]:
    from langchain_openai import ChatOpenAI

    pipeline: Pipeline = start_pipeline(tmp_path_factory.mktemp("langchain"), str(tiny_dir), "tiny", num_stages=2)
    yield ChatOpenAI(model="tiny", base_url=pipeline.endpoint, api_key="none", temperature=0, max_tokens=40,
                     max_retries=0, timeout=120)  # fmt: skip
    pipeline.backend.stop()


class Verdict(BaseModel):
    """A yes-or-no answer with a confidence."""

    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=10)


def get_weather(city: Literal["Paris", "Rome"], days: Literal[1, 2, 3]) -> str:
    """The weather forecast for a city over a number of days. (Bounded arguments: the test model is
    random, and a free integer may run to max_tokens.)"""
    return "sunny"


def test_invoke_and_stream_give_the_same_text(chat_model):
    whole = chat_model.invoke("Say something.")
    pieces = list(chat_model.stream("Say something."))
    assert whole.content and "".join(piece.content for piece in pieces) == whole.content


def test_bind_tools_returns_a_tool_call(chat_model):
    message = chat_model.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"], (message, message.invalid_tool_calls)
    assert message.tool_calls[0]["args"]["city"] in ("Paris", "Rome")


def test_with_structured_output_returns_the_pydantic_object(chat_model):
    verdict = chat_model.with_structured_output(Verdict).invoke("Is the sky blue?")
    assert isinstance(verdict, Verdict)
