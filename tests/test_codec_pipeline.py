"""Compression on real hops: codecs agreed per session, chosen per link, and the same greedy tokens."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from bloombee_contract.paths import CODECS_PATH
from bloombee_stage.wire.frame import encode_frame
from bloombee_stage.wire.messages import RowMeta, StepMeta
from bloombee_stage.wire.tensors import tensor_frame
from pipelines import SMOLLM2, start_pipeline
from test_bad_input import post_frame, tiny_chat
from test_pipeline_smollm2 import chat_request, completion_request, reference_tokens


def sent_by_codec(metrics: dict[str, float]) -> dict[str, float]:
    prefix = 'bloombee_stage_bytes_sent_total{codec="'
    return {key[len(prefix) : -2]: value for key, value in metrics.items() if key.startswith(prefix)}


@pytest.mark.model
def test_compressed_hops_give_the_tokens_of_generate(tmp_path, smollm2_reference):
    """Stage 0 sends with the exponent codec; stage 1 runs `auto` against a 50 Mbit/s link."""
    pipeline = start_pipeline(
        tmp_path,
        SMOLLM2,
        "smollm2",
        stage_overrides={0: {"codec": "exponent"}, 1: {"codec": "auto", "link_mbps": 50.0}},
    )
    try:
        for request in (chat_request("Write a short poem about the sea."),
                        completion_request("The three most important inventions in history are")):  # fmt: skip
            status, reply = pipeline.post("/chat/completions" if "messages" in request else "/completions", request)
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, reply["prompt_token_ids"])
        first, second = pipeline.stage_metrics(0), pipeline.stage_metrics(1)
        assert set(sent_by_codec(first)) == {"exponent"}
        assert set(sent_by_codec(second)) - {"raw"}, "auto never compressed over a 50 Mbit/s link"
        for metrics in (first, second):  # the codecs did shrink what went on the wire
            assert sum(sent_by_codec(metrics).values()) < metrics["bloombee_stage_raw_bytes_sent_total"]
        info = pipeline.stage_info(1)
        assert info["codec"] == "auto" and info["link_bandwidth"] == 50e6 / 8
        assert info["codec_profiles"]["byteplane"]["ratio"] > 1.05  # refined from the stage's own frames
    finally:
        pipeline.backend.stop()


def test_peers_agree_on_codecs_when_a_session_opens(tmp_path, tiny_dir):
    """Stage 1 takes only raw and zstd: stage 0, set to byteplane, sends raw; stage 1 still sends exponent on."""
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "tiny",
                              stage_overrides={0: {"codec": "byteplane"}, 1: {"codec": "exponent"}},
                              stage_args={1: ["--accept-codecs", "raw,zstd"]})  # fmt: skip
    try:
        status, before = tiny_chat(pipeline)
        assert status == 200, before
        with urllib.request.urlopen(pipeline.stage_url(1) + CODECS_PATH, timeout=30) as answer:
            assert json.loads(answer.read()) == {"codecs": ["raw", "zstd"]}
        assert set(sent_by_codec(pipeline.stage_metrics(0))) == {"raw"}
        assert set(sent_by_codec(pipeline.stage_metrics(1))) == {"exponent"}

        hidden = torch.randn(1, 3, 64)
        row = RowMeta(session="probe", start=0, length=3)
        layer = pipeline.desired.stages[1].layers[0]  # where stage 1's span starts
        meta = StepMeta(step=1, rows=[row], route=[pipeline.stage_url(2)], layer=layer).model_dump(mode="json")
        body = encode_frame(tensor_frame(hidden, meta), "byteplane")
        status, error = post_frame(pipeline.stage_url(1), body)
        assert status == 400
        assert "codec 'byteplane' is not accepted here (accepts raw, zstd)" in error["error"]["message"]
        status, after = tiny_chat(pipeline)  # refused, and nothing else changed
        assert status == 200 and after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
    finally:
        pipeline.backend.stop()
