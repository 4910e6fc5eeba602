"""Bad frames, bad requests and a dying stage get clear errors; the servers keep serving."""

from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import struct
import time
import urllib.error
import urllib.request

import pytest
import torch
from bloombee_contract.launch import StageLaunch
from bloombee_contract.paths import STEP_PATH
from bloombee_stage.wire.frame import encode_frame, frame_checksum
from bloombee_stage.wire.messages import RowMeta, StepMeta
from bloombee_stage.wire.tensors import tensor_frame
from pipelines import post_json, start_pipeline


def post_frame(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + STEP_PATH, data=body, headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()) if reply.status == 202 else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def step_frame(tensor: torch.Tensor, route: list[str] | None = None, session: str = "probe", layer: int = 0,
               plan: str | None = None, **row) -> bytes:  # fmt: skip
    """A one-row step frame for the stage whose span starts at ``layer``, routed for ``plan`` (None:
    any); ``row`` holds RowMeta fields beyond the session (start defaults to 0)."""
    row = RowMeta(session=session, length=tensor.shape[1], **{"start": 0, **row})
    meta = StepMeta(step=1, rows=[row], route=route or [], layer=layer, plan=plan)
    return encode_frame(tensor_frame(tensor, meta.model_dump(mode="json")))


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_dir):
    pipeline = start_pipeline(tmp_path_factory.mktemp("tiny-run"), str(tiny_dir), "tiny")
    yield pipeline
    pipeline.backend.stop()


def test_a_step_routed_for_another_plans_span_is_refused_before_it_is_computed(tiny_pipeline):
    """Every step says from which layer its receiving stage must compute (0 from the gateway, then
    each stage's span end): a step routed by an old plan (layers split at 1, not 2) meets a stage
    of the new plan, which refuses it with ``wrong_span`` and opens no session for it."""
    middle, last = tiny_pipeline.stage_url(1), tiny_pipeline.stage_url(2)  # spans [2, 4) and [4, 6) of 6
    hidden = torch.zeros(1, 3, 64)
    status, error = post_frame(middle, step_frame(hidden, route=[last], session="old-plan", layer=1))
    assert status == 503 and error["error"]["code"] == "wrong_span", error
    assert "from layer 1" in error["error"]["message"] and "[2, 4)" in error["error"]["message"]
    status, error = post_frame(middle, step_frame(hidden[:, :1], route=[last], session="old-plan", layer=2, start=3))
    assert status == 404 and error["error"]["code"] == "unknown_session"  # the refused step opened nothing
    # The same span, but another plan's step (its route was made for other stages): refused too.
    plan = tiny_pipeline.desired.plan_hash
    status, error = post_frame(middle, step_frame(hidden, route=[last], session="other-plan", layer=2, plan="0" * 10))
    assert status == 503 and error["error"]["code"] == "wrong_plan", error
    assert "for plan 0000000000" in error["error"]["message"] and f"serves plan {plan}" in error["error"]["message"]
    status, error = post_frame(middle, step_frame(hidden[:, :1], route=[last], session="other-plan", layer=2, start=3))
    assert status == 404 and error["error"]["code"] == "unknown_session"
    status, taken = post_frame(middle, step_frame(hidden, route=[last], session="this-plan", layer=2, plan=plan))
    assert status == 200, taken  # its own plan's step is computed (answered inline: the caller relays)
    status, before = tiny_chat(tiny_pipeline)
    assert status == 200, before  # the stage serves its own plan's steps as before


def tiny_chat(pipeline, **extra) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}  # fmt: skip
    return pipeline.post("/chat/completions", body)


def test_bad_frames_get_clear_errors_and_the_stage_keeps_serving(tiny_pipeline):
    status, before = tiny_chat(tiny_pipeline)
    assert status == 200, before
    first, middle = tiny_pipeline.stage_url(0), tiny_pipeline.stage_url(1)
    route = [middle, tiny_pipeline.stage_url(2)]
    good = step_frame(torch.tensor([[1, 2, 3]]), route=route)

    status, error = post_frame(first, good[:-5])
    assert status == 400 and "truncated" in error["error"]["message"] and error["error"]["code"] == "invalid_frame"

    corrupted = bytearray(good)
    corrupted[-1] ^= 0xFF
    status, error = post_frame(first, bytes(corrupted))
    assert status == 400 and "checksum" in error["error"]["message"]

    future_version = bytearray(good)
    future_version[4] = 9
    status, error = post_frame(first, bytes(future_version))
    assert status == 400 and "version 9" in error["error"]["message"]

    unknown_codec = bytearray(good)
    unknown_codec[6] = 77
    struct.pack_into("<I", unknown_codec, 20, frame_checksum(unknown_codec))  # intact, but a codec from the future
    status, error = post_frame(first, bytes(unknown_codec))
    assert status == 400 and "unknown codec id 77" in error["error"]["message"]

    status, error = post_frame(first, step_frame(torch.tensor([[1, 2]]), route=route, start=5, session="nobody"))
    assert status == 404 and "unknown session 'nobody'" in error["error"]["message"]

    rows = [RowMeta(session=f"s{i}", start=0, length=1) for i in range(9)]  # the plan's micro-batch is 8
    too_many = encode_frame(
        tensor_frame(torch.ones(9, 1, dtype=torch.long), StepMeta(step=2, rows=rows, route=route).model_dump())
    )
    status, error = post_frame(first, too_many)
    assert status == 400 and "9 rows in one step" in error["error"]["message"]
    assert "at most 8" in error["error"]["message"] and "frame(step=2" in error["error"]["message"]

    wrong_width = torch.zeros(1, 3, 65)
    status, error = post_frame(middle, step_frame(wrong_width, route=route[1:], session="shape", layer=2))
    assert status == 400 and "[batch, seq, 64]" in error["error"]["message"]
    assert "session=shape" in error["error"]["message"]  # the error names the frame

    status, error = post_frame(first, step_frame(torch.zeros(1, 3, 64), route=route))
    assert status == 400 and "token ids" in error["error"]["message"]

    status, error = post_frame(first, step_frame(torch.tensor([[1, 2]])))  # no route past layer 2
    assert status == 400 and "no stage holds the rest" in error["error"]["message"]

    status, after = tiny_chat(tiny_pipeline)
    assert status == 200 and after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]


def test_bad_http_requests_get_openai_errors(tiny_pipeline):
    status, error = tiny_pipeline.post("/chat/completions", b"{not json")
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"] == "request body is not valid JSON"

    status, error = tiny_pipeline.post("/chat/completions", {"model": "gpt-4", "messages": [{"role": "user"}]})
    assert status == 404 and error["error"]["code"] == "model_not_found"

    status, error = tiny_pipeline.post("/chat/completions", {"model": "tiny", "messages": []})
    assert status == 400 and error["error"]["param"] == "messages"

    status, error = tiny_pipeline.post("/completions", {"model": "tiny", "prompt": "hi", "temperature": 7})
    assert status == 400 and error["error"]["param"] == "temperature"

    status, error = tiny_chat(tiny_pipeline, max_tokens=10_000)  # the tiny model has 256 positions
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 256" in error["error"]["message"]


def test_sampling_is_reproducible_with_a_seed(tiny_pipeline):
    _, first = tiny_chat(tiny_pipeline, temperature=1.0, seed=7)
    _, again = tiny_chat(tiny_pipeline, temperature=1.0, seed=7)
    _, other = tiny_chat(tiny_pipeline, temperature=1.0, seed=8)
    assert first["choices"][0]["token_ids"] == again["choices"][0]["token_ids"]
    assert first["choices"][0]["token_ids"] != other["choices"][0]["token_ids"]


def test_rollback_endpoint_cuts_the_session(tiny_pipeline):
    first = tiny_pipeline.stage_url(0)
    route = [tiny_pipeline.stage_url(1), tiny_pipeline.stage_url(2)]
    # Inline mode (no reply_to) returns the stage's output, so the test can drive one stage on its own.
    request = urllib.request.Request(first + STEP_PATH, data=step_frame(torch.tensor([[5, 6, 7, 8]]), route=route,
                                                                        session="rb"))  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200

    def rollback(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{first}/v1/sessions/rb/rollback", data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    assert rollback({"n": 3}) == (200, {"session": "rb", "length": 1})
    status, error = rollback({"n": 2})
    assert status == 400 and "holds 1" in error["error"]["message"]
    status, _ = post_frame(first, step_frame(torch.tensor([[9]]), route=route, session="rb", start=2))
    assert status == 409  # a gap: position 1 was rolled back


def test_dying_stage_fails_the_request_cleanly(tmp_path, tiny_dir):
    """A stage that dies and is not brought back: the request fails cleanly (--recovery-wait 0: at once)."""
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "doomed", gateway_args=["--recovery-wait", "0"])
    try:
        status, _ = tiny_chat_named(pipeline)
        assert status == 200
        pipeline.backend.processes[pipeline.stage_name(1)].popen.send_signal(signal.SIGKILL)
        pipeline.backend.processes[pipeline.stage_name(1)].popen.wait()
        status, error = tiny_chat_named(pipeline)
        assert status == 503 and error["error"]["code"] == "stage_unreachable"  # and no other path to take
        assert error["error"]["type"] == "server_error"
        assert pipeline.stage_name(0) in error["error"]["message"]  # the stage that could not push names itself
        status, streamed = tiny_chat_named(pipeline, stream=True)  # streaming: the error arrives as a data line
        for message in (error["error"]["message"], streamed["error"]["message"]):
            assert not re.search(r"\b[0-9a-f]{32}\b", message), message  # no session id reaches a client
    finally:
        pipeline.backend.stop()


def tiny_chat_named(pipeline, stream: bool = False) -> tuple[int, dict]:
    body = {"model": pipeline.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "stream": stream}  # fmt: skip
    if not stream:
        return pipeline.post("/chat/completions", body)
    request = urllib.request.Request(pipeline.endpoint + "/chat/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=120) as reply:
        events = [e for e in reply.read().decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])
    assert error["error"]["type"] == "server_error"
    return reply.status, error


def test_relay_baseline_gives_the_same_tokens_as_push(tmp_path, tiny_pipeline):
    """The Petals-style client relay (the benchmarks' baseline) computes exactly what push mode does."""
    relayed = start_pipeline(tmp_path, tiny_pipeline.source, "tiny", gateway_args=["--relay"])
    try:
        assert (
            tiny_chat(relayed)[1]["choices"][0]["token_ids"] == tiny_chat(tiny_pipeline)[1]["choices"][0]["token_ids"]
        )
    finally:
        relayed.backend.stop()


def test_kv_budget_and_peers_are_enforced_over_http(tmp_path, tiny_dir):
    """A stage with a tiny KV budget refuses a session that would not fit, with the numbers, and stays
    up; a stage given its peers (--peers) refuses a frame that would reply anywhere else."""
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready.json"
    budget = 100 * 1536 / 2**30  # 100 tokens of 1536 bytes
    command = StageLaunch(model=str(tiny_dir), layers=(0, 6), kv_budget_gib=budget, ready_file=str(ready),
                          peers=("http://127.0.0.1:1",)).command(sys.executable)  # fmt: skip
    stage = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if ready.is_file():
                break
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]
        status, error = post_frame(url, step_frame(torch.tensor([[1, 2, 3]]), session="big", max_length=200))
        assert status == 503 and error["error"]["code"] == "kv_budget_exceeded"
        assert "needs 307200 more bytes, 0 of 153600" in error["error"]["message"]
        status, _ = post_frame(url, step_frame(torch.tensor([[1, 2, 3]]), session="small", max_length=50))
        assert status == 200  # inline (no reply_to): the last stage answers with the token
        meta = StepMeta(step=2, rows=[RowMeta(session="elsewhere", start=0, length=3)],
                        reply_to="http://127.0.0.1:9/internal/v1/results")  # fmt: skip
        status, error = post_frame(url, encode_frame(tensor_frame(torch.tensor([[1, 2, 3]]), meta.model_dump())))
        assert status == 400 and "is not one of this stage's peers" in error["error"]["message"], error
    finally:
        stage.terminate()
        stage.wait(timeout=30)


def test_hops_relayed_through_the_gateway_give_the_same_tokens(tmp_path, tiny_pipeline):
    """The planner may route a hop through the gateway; the gateway forwards the frame on."""
    relayed = start_pipeline(tmp_path, tiny_pipeline.source, "tiny",
                             gateway_args=["--relay-hops", "1,0", "--recovery-wait", "0"])  # fmt: skip
    try:
        assert (
            tiny_chat(relayed)[1]["choices"][0]["token_ids"] == tiny_chat(tiny_pipeline)[1]["choices"][0]["token_ids"]
        )
        with urllib.request.urlopen(relayed.endpoint.removesuffix("/v1") + "/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        assert "bloombee_gateway_forwarded_total 8.0" in metrics  # one forward per step: prefill + 7 decodes
        relayed.backend.processes[relayed.stage_name(1)].popen.kill()
        relayed.backend.processes[relayed.stage_name(1)].popen.wait()
        status, error = tiny_chat(relayed)
        assert status == 503 and "gateway could not forward to" in error["error"]["message"]
    finally:
        relayed.backend.stop()


# -- callers that are not parts of the deployment ---------------------------------------------


def _call(url: str, context: ssl.SSLContext, body: bytes | None = None) -> tuple[int, dict]:
    """GET (or POST ``body``) with ``context``: the status and the JSON answer (a frame: its size)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            answer = reply.read()
            if reply.headers.get_content_type() != "application/json":
                return reply.status, {"frame_bytes": len(answer)}
            return reply.status, json.loads(answer or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_a_stage_answers_only_callers_with_the_deployments_certificate(tiny_pipeline, tmp_path):
    """Mutual TLS on every stage: without a certificate only liveness and readiness answer; a
    certificate from another CA fails the handshake; plain HTTP gets nothing."""
    from bloombee_contract.tls import client_context
    from bloombee_operator.pki import DeploymentCA
    from pipelines import TEST_TLS

    stage = tiny_pipeline.stage_url(1)
    assert stage.startswith("https://")
    anonymous = client_context(TEST_TLS, identify=False)  # trusts the CA, shows no certificate
    assert _call(stage + "/readyz", anonymous)[0] == 200
    frame = step_frame(torch.zeros(1, 1, 64), route=[tiny_pipeline.stage_url(2)])
    for path, body in ((STEP_PATH, frame), ("/info", None), ("/metrics", None), ("/v1/sessions/x/park", b"{}"),
                       ("/probe/measure", b'{"targets": {"x": "http://127.0.0.1:9"}}')):  # fmt: skip
        status, answer = _call(stage + path, anonymous, body)
        assert status == 401 and answer["error"]["code"] == "unauthenticated", (path, status, answer)
    assert _call(stage + "/info", client_context(TEST_TLS))[0] == 200  # the same, as `operator`

    stranger = DeploymentCA(tmp_path / "other", "other").identity("operator", [])
    with pytest.raises(urllib.error.URLError) as refused:  # our CA does not know theirs: no handshake
        _call(stage + "/info", client_context(stranger))
    assert isinstance(refused.value.reason, ssl.SSLError)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(stage.replace("https://", "http://") + "/info", timeout=10)


def test_the_gateway_takes_results_only_from_the_deployment_and_only_on_its_internal_port(tiny_pipeline):
    """The OpenAI API stays plain HTTP; the path where stages deliver results is not served to
    anyone there, and on the internal port only to a caller with the deployment's certificate."""
    from bloombee_contract.paths import RESULT_PATH
    from bloombee_contract.tls import client_context
    from pipelines import TEST_TLS

    public = tiny_pipeline.endpoint.removesuffix("/v1")
    internal = json.loads(tiny_pipeline.backend.processes["tiny-gateway"].ready_file.read_text())["peer_url"]
    assert public.startswith("http://") and internal.startswith("https://") and internal != public
    status, answer = post_json(public + RESULT_PATH, b"forged")
    assert status == 401 and answer["error"]["code"] == "unauthenticated"
    status, answer = _call(internal + RESULT_PATH, client_context(TEST_TLS, identify=False), b"forged")
    assert status == 401 and answer["error"]["code"] == "unauthenticated"
    status, answer = _call(internal + RESULT_PATH, client_context(TEST_TLS), b"forged")
    assert status == 400 and answer["error"]["code"] == "invalid_frame"  # a part of the deployment: read, refused
    assert tiny_chat(tiny_pipeline)[0] == 200  # and the pipeline still answers
    with urllib.request.urlopen(public + "/readyz", timeout=30) as reply:  # anyone may ask; no internal URL leaks
        assert json.loads(reply.read()) == {"ready": True, "stages_ready": "3/3", "draining": [],
                                            "plan": tiny_pipeline.desired.plan_hash}  # fmt: skip


def test_profiling_runs_and_the_gateways_measurements_are_for_the_operator_only(tiny_pipeline):
    """``POST /profile`` times the span for whoever plans: the operator; another part of the
    deployment gets 403, a stranger 401, a run larger than its bounds 400. The gateway's ``/info``
    (what it measured of its rounds) is on its internal port only."""
    from bloombee_contract.tls import client_context
    from pipelines import TEST_CA, TEST_TLS

    stage = tiny_pipeline.stage_url(2)
    operator, gateway = client_context(TEST_TLS), client_context(TEST_CA.identity("gateway/other", []))
    run = json.dumps({"rows": [1, 2], "repeats": 2}).encode()
    assert _call(stage + "/profile", client_context(TEST_TLS, identify=False), run)[0] == 401
    status, answer = _call(stage + "/profile", gateway, run)
    assert status == 403 and answer["error"]["code"] == "forbidden" and "gateway/other" in answer["error"]["message"]
    for bad in ({"rows": [0]}, {"rows": [1], "repeats": 65}, {"rows": [1, 2, 4, 8], "repeats": 17}, {"rows": "x"}):
        status, answer = _call(stage + "/profile", operator, json.dumps(bad).encode())
        assert status == 400 and answer["error"]["code"] == "invalid_body", (bad, answer)
    status, answer = _call(stage + "/profile", operator, run)
    assert status == 200 and answer["last"] is True and answer["seconds"] > 0
    assert [size for size, _ in answer["profile"]["layerMsAt"]] == [1, 2] and answer["profile"]["samples"] == 4
    assert [size for size, _ in answer["profile"]["stepMsAt"]] == [1, 2]  # the last stage's head
    assert {"onward", "streamBps"} <= set(answer["served"])  # beside it, what its traffic measured (/info's)

    before_chat = time.monotonic()
    assert tiny_chat(tiny_pipeline)[0] == 200
    # and when each step it served ran, on the machine's clock (this process reads the same one)
    after_chat = _call(stage + "/profile", operator, run)[1]
    chat_steps = [step for step in after_chat["served"]["busy"] if step[0] >= before_chat]
    assert chat_steps and all(start + seconds <= time.monotonic() and seconds > 0 and tokens >= 1
                              for start, seconds, _, _, tokens in chat_steps)  # fmt: skip
    # and the run's caches held as many positions as its traffic's rows did (+1 per timed step: 2 untimed first)
    context = round(after_chat["served"]["meanContext"])
    assert context > 0 and after_chat["profile"]["meanContext"] == pytest.approx(context + 1 + 2.5)
    public = tiny_pipeline.endpoint.removesuffix("/v1")
    internal = json.loads(tiny_pipeline.backend.processes["tiny-gateway"].ready_file.read_text())["peer_url"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(public + "/info", timeout=30)
    assert refused.value.code == 401
    status, answer = _call(internal + "/info", operator)
    assert status == 200 and answer["profile"]["steps"] > 0 and answer["profile"]["crossings"] == 4
    assert answer["profile"]["transportMs"] > 0 and answer["profile"]["turnaroundMs"] >= 0


def test_a_gateways_sessions_are_its_own(tiny_pipeline):
    """A session belongs to the gateway whose certificate opened it: another part of the same
    deployment can neither continue, fork, roll back, park nor close it (to it, it does not exist)."""
    from bloombee_contract.tls import client_context
    from pipelines import TEST_CA

    alice, mallory = (client_context(TEST_CA.identity(f"gateway/{name}", [])) for name in ("alice", "mallory"))
    stage, route = tiny_pipeline.stage_url(0), [tiny_pipeline.stage_url(1), tiny_pipeline.stage_url(2)]
    tokens = torch.tensor([[5, 6, 7]])
    opened = _call(stage + STEP_PATH, alice, step_frame(tokens, route=route, session="alices"))
    assert opened[0] == 200, opened  # opened, and answered inline

    more = step_frame(torch.tensor([[8]]), route=route, session="alices", start=3)
    status, answer = _call(stage + STEP_PATH, mallory, more)
    assert status == 404 and answer["error"]["code"] == "unknown_session"
    fork = step_frame(tokens, route=route, session="mallorys", fork="alices", start=3)
    status, answer = _call(stage + STEP_PATH, mallory, fork)
    assert status == 404 and answer["error"]["code"] == "fork_source_gone"
    status, answer = _call(stage + STEP_PATH, mallory, step_frame(tokens, route=route, session="alices"))  # restart
    assert status == 404 and answer["error"]["code"] == "unknown_session"
    for path, body in (("/rollback", b'{"n": 1}'), ("/park", b"{}")):
        status, answer = _call(f"{stage}/v1/sessions/alices{path}", mallory, body)
        assert status == 404 and answer["error"]["code"] == "unknown_session", path
    closing = urllib.request.Request(f"{stage}/v1/sessions/alices", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(closing, timeout=30, context=mallory)
    assert refused.value.code == 404

    assert _call(stage + STEP_PATH, alice, more)[0] == 200  # untouched: alice goes on where she was
    assert _call(f"{stage}/v1/sessions/alices/rollback", alice, b'{"n": 1}') == (200, {"session": "alices",
                                                                                      "length": 3})  # fmt: skip
    with urllib.request.urlopen(closing, timeout=30, context=alice) as reply:
        assert json.loads(reply.read()) == {"closed": True}


def test_a_stage_sends_only_to_its_plans_peers(tiny_pipeline):
    """Routes, reply addresses and measurement targets are followed only over mutual TLS, so a
    frame cannot make a stage post hidden states or results to a listener outside the deployment;
    within it, only to the plan's next span and gateway; routes and measurements are bounded."""
    import socket

    from bloombee_contract.paths import MEASURE_PATH
    from bloombee_contract.tls import client_context
    from pipelines import TEST_TLS

    operator = client_context(TEST_TLS)
    stage, last = tiny_pipeline.stage_url(0), tiny_pipeline.stage_url(2)
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    outside.setblocking(False)
    listener = f"http://127.0.0.1:{outside.getsockname()[1]}"
    try:
        tokens = torch.tensor([[5, 6, 7]])
        for route, reply_to in (([listener], None), ([tiny_pipeline.stage_url(1), last], listener + "/steal")):
            meta = StepMeta(step=1, rows=[RowMeta(session="ssrf", start=0, length=3)], route=route, reply_to=reply_to)
            frame = encode_frame(tensor_frame(tokens, meta.model_dump(mode="json")))
            status, answer = _call(stage + STEP_PATH, operator, frame)
            assert status == 400 and "https://" in answer["error"]["message"], answer
        # A part of the deployment, over mutual TLS, but not the next span: `bloombee up` gave
        # each stage its plan's peers (--peers), so stage 0 cannot be made to skip stage 1.
        skip = StepMeta(step=1, rows=[RowMeta(session="skip", start=0, length=3)], route=[last])
        skipping = encode_frame(tensor_frame(tokens, skip.model_dump(mode="json")))
        status, answer = _call(stage + STEP_PATH, operator, skipping)
        assert status == 400 and "not one of this stage's peers" in answer["error"]["message"], answer
        looping = StepMeta(step=1, rows=[RowMeta(session="loop", start=0, length=3)]).model_dump(mode="json")
        looping["route"] = [last] * 65  # past MAX_HOPS (the model would refuse to build it)
        status, answer = _call(stage + STEP_PATH, operator, encode_frame(tensor_frame(tokens, looping)))
        assert status == 400 and answer["error"]["code"] == "invalid_meta"
        for body in ({"targets": {"x": listener}}, {"targets": {"x": last}, "bulkBytes": 256 << 20}):
            status, answer = _call(stage + MEASURE_PATH, operator, json.dumps(body).encode())
            assert status == 400, answer
        with pytest.raises(BlockingIOError):
            outside.accept()  # nothing ever connected to it
    finally:
        outside.close()


def test_crafted_and_fuzzed_frames_get_4xx_and_cost_no_memory(tiny_pipeline):
    """Every hostile frame of the issue's list (a zstd bomb, astronomic shapes, 100k-deep or
    oversized metadata, too many rows or hops, ...) gets a 4xx naming what is wrong, checked before
    anything is allocated; 3,000 random mutations of good frames get no 5xx and no dropped
    connection; the stage's memory does not grow and it still answers exactly. bench/fuzz.py sends
    10^5."""
    from bloombee_contract.tls import client_context
    from fuzzing import crafted_frames, good_frame, mutations, post_frames
    from pipelines import TEST_TLS, rss_mb

    context = client_context(TEST_TLS)
    status, before = tiny_chat(tiny_pipeline)
    assert status == 200, before
    middle = tiny_pipeline.stage_url(1)
    stage = tiny_pipeline.backend.processes[tiny_pipeline.stage_name(1)].popen.pid
    rss_before = rss_mb(stage)
    for name, (frame, says) in crafted_frames(64, [tiny_pipeline.stage_url(2)], layer=2).items():
        status, answer = _call(middle + STEP_PATH, context, frame)
        assert 400 <= status < 500 and says in answer["error"]["message"], (name, status, answer)
    hidden = good_frame(torch.randn(1, 3, 64), [tiny_pipeline.stage_url(2)], layer=2)
    tokens = good_frame(torch.tensor([[5, 6, 7]]), [middle, tiny_pipeline.stage_url(2)])
    statuses = post_frames(middle, context, mutations(hidden, 1500, seed=1))
    statuses += post_frames(tiny_pipeline.stage_url(0), context, mutations(tokens, 1500, seed=2))
    assert sum(statuses.values()) == 3000 and not [s for s in statuses if s == 0 or s >= 500], statuses
    assert rss_mb(stage) < 1.1 * rss_before + 16  # allocator noise aside, nothing was kept
    status, after = tiny_chat(tiny_pipeline)
    assert status == 200 and after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]


def test_a_renewed_certificate_is_served_without_a_restart_or_a_dropped_generation(tiny_pipeline):
    """New certificate files in a stage's TLS directory (as a renewed Secret's volume) are loaded
    within seconds: new connections see the new certificate, while a generation streaming through
    the stage goes on to the same tokens as before, and the pipeline keeps answering."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from bloombee_contract.tls import client_context
    from bloombee_operator.pki import issue, write_identity
    from cryptography import x509
    from pipelines import TEST_CA, TEST_TLS

    stage = urlsplit(tiny_pipeline.stage_url(1))

    def served_serial() -> int:
        raw = socket.create_connection((stage.hostname, stage.port), timeout=10)
        with client_context(TEST_TLS).wrap_socket(raw, server_hostname=stage.hostname) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number

    body = {"model": "tiny", "prompt": [21, 22, 23], "max_tokens": 120, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    status, expected = tiny_pipeline.post("/completions", body)
    assert status == 200
    before = served_serial()
    streamed: list[str] = []

    def stream() -> None:
        request = urllib.request.Request(tiny_pipeline.endpoint + "/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps({**body, "stream": True}).encode())  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as reply:
            streamed.extend(line.decode() for line in reply)

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    name = tiny_pipeline.stage_name(1)
    directory = TEST_CA.directory / f"stage-{name}"
    write_identity(directory, TEST_CA.ca, issue(TEST_CA.ca, f"stage/{name}", [stage.hostname, "localhost"]))
    deadline = time.monotonic() + 30
    while served_serial() == before:  # bounded: servers look every 5 s
        assert time.monotonic() < deadline, "the stage still serves the old certificate"
        time.sleep(0.5)
    streaming.join(timeout=120)
    chunks = [json.loads(line[len("data: ") :]) for line in streamed if line.startswith("data: {")]
    assert not [c for c in chunks if "error" in c]
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == expected["choices"][0]["token_ids"]
    status, again = tiny_pipeline.post("/completions", body)
    assert status == 200 and again["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]


def test_a_result_reaches_a_gateway_that_listens_only_after_the_step_was_sent(tiny_pipeline):
    """A gateway just Ready may not be routable yet from the stages (its Service has no endpoint
    for a moment), or a link blips: the last stage sends the result again on connection errors
    until the gateway takes it, instead of dropping it and leaving the gateway to time out. Here
    the gateway is stopped, and a listener takes its peer port (the only place the stages may
    reply to) 1.5 s after the step was sent; the gateway is restarted afterwards."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from bloombee_contract.paths import RESULT_PATH
    from bloombee_contract.tls import client_context, server_context
    from bloombee_stage.wire.frame import decode_frame
    from bloombee_stage.wire.messages import ResultMeta
    from pipelines import TEST_CA, TEST_TLS

    backend, gateway = tiny_pipeline.backend, tiny_pipeline.desired.gateway.name
    port = backend.ports[f"{gateway}-internal"]
    received: list[tuple[str, bytes]] = []

    class Results(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    backend.processes[gateway].popen.kill()
    backend.processes[gateway].popen.wait()
    server = HTTPServer(("127.0.0.1", port), Results, bind_and_activate=False)
    server.allow_reuse_address = True
    server.timeout = 45  # handle_request gives up by then: a result that never comes fails the test
    server.socket = server_context(TEST_CA.identity("late-gateway", ["127.0.0.1"])).wrap_socket(
        server.socket, server_side=True)  # fmt: skip

    def listen_late() -> None:
        time.sleep(1.5)  # the step is sent, computed and its result refused (nothing listens) meanwhile
        server.server_bind()
        server.server_activate()
        server.handle_request()

    late = threading.Thread(target=listen_late, daemon=True)
    late.start()
    try:
        route = [tiny_pipeline.stage_url(1), tiny_pipeline.stage_url(2)]
        meta = StepMeta(step=7, rows=[RowMeta(session="late", start=0, length=3)], route=route,
                        reply_to=f"https://127.0.0.1:{port}{RESULT_PATH}")  # fmt: skip
        frame = encode_frame(tensor_frame(torch.tensor([[5, 6, 7]]), meta.model_dump(mode="json")))
        assert _call(tiny_pipeline.stage_url(0) + STEP_PATH, client_context(TEST_TLS), frame)[0] == 202
        late.join(timeout=60)
        assert not late.is_alive() and [path for path, _ in received] == [RESULT_PATH]
        result = ResultMeta.model_validate(decode_frame(received[0][1]).meta)
        assert result.error is None and result.step == 7 and [row.session for row in result.rows] == ["late"]
    finally:
        server.server_close()
        backend.restore(tiny_pipeline.desired)
    assert tiny_chat(tiny_pipeline)[0] == 200  # the gateway is back where it was


def test_a_stage_being_replaced_a_deadline_and_a_client_that_left(tmp_path, tiny_dir):
    """While a stage misses its heartbeats new requests get 503 with Retry-After at once, and one
    caught in it ends by its deadline (--request-timeout) instead of waiting out the recovery;
    once the stage answers again requests are served. A non-streaming request whose client
    closed its connection stops generating (its seat and KV freed) instead of running on, and the
    sessions of a gateway that died close once its lease lapses."""
    import socket
    import threading
    from urllib.parse import urlsplit

    pipeline = start_pipeline(tmp_path, str(tiny_dir), "replaced", num_stages=2,
                              gateway_args=["--request-timeout", "4"])  # fmt: skip
    body = {"model": "replaced", "prompt": [11, 12, 13], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    try:
        assert pipeline.post("/completions", body)[0] == 200
        stage = pipeline.backend.processes[pipeline.stage_name(1)].popen
        stage.send_signal(signal.SIGSTOP)
        caught: list[tuple[int, dict, float]] = []

        def in_flight() -> None:
            started = time.monotonic()
            status, answer = pipeline.post("/completions", {**body, "max_tokens": 200}, timeout=120)
            caught.append((status, answer, time.monotonic() - started))

        thread = threading.Thread(target=in_flight, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # bounded: heartbeats notice within about 3 s
                request = urllib.request.Request(pipeline.endpoint + "/completions", data=json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                try:
                    urllib.request.urlopen(request, timeout=2).close()
                except urllib.error.HTTPError as error:
                    refused = (error.code, error.headers.get("Retry-After"), json.loads(error.read()))
                    break
                except TimeoutError:
                    pass  # admitted before the loss was noticed: it waits in the pipeline
                time.sleep(0.5)
            else:
                pytest.fail("no request was refused while a stage did not answer")
            assert refused[:2] == (503, "5") and refused[2]["error"]["code"] == "stage_unreachable", refused
            thread.join(timeout=60)
            assert caught and caught[0][0] in (503, 504) and caught[0][2] < 30, caught
        finally:
            stage.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while pipeline.post("/completions", body)[0] != 200:  # bounded: heartbeats see it back within 1 s
            assert time.monotonic() < deadline, "the pipeline did not serve again after the stage came back"
            time.sleep(0.5)

        gateway = urlsplit(pipeline.endpoint)
        with socket.create_connection((gateway.hostname, gateway.port), timeout=10) as client:
            long = json.dumps({**body, "max_tokens": 240}).encode()
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(long)}\r\n\r\n".encode() + long)  # fmt: skip
            time.sleep(0.3)  # under way, then the client leaves
        deadline = time.monotonic() + 15
        while pipeline.gateway_metrics().get("bloombee_gateway_requests_aborted_total", 0) < 1:
            assert time.monotonic() < deadline, "the generation of a client that left was not stopped"
            time.sleep(0.2)

        # The gateway dies: the sessions it kept on the stages (its prefix cache) close once its
        # lease lapses, instead of holding their KV until the idle time-out.
        assert pipeline.stage_metrics(1)["bloombee_stage_sessions"] > 0
        gateway_process = pipeline.backend.processes["replaced-gateway"].popen
        gateway_process.send_signal(signal.SIGKILL)
        gateway_process.wait()
        deadline = time.monotonic() + 30
        while pipeline.stage_metrics(1)["bloombee_stage_sessions"] > 0:  # bounded: the lease lapses after 10 s
            assert time.monotonic() < deadline, "the dead gateway's sessions still hold the stage's KV"
            time.sleep(0.5)
    finally:
        pipeline.backend.stop()


def test_a_stage_lost_mid_generation_costs_no_request(tmp_path, tiny_dir):
    """A stage SIGKILLed while a generation streams, then restarted as `bloombee up` does: the
    gateway replays the generation's tokens so far on the restarted stage and the client gets one
    complete answer, token for token the one a fault-free run gives."""
    pipeline = start_pipeline(tmp_path, str(tiny_dir), "phoenix", num_stages=2)
    try:
        body = {"model": "phoenix", "prompt": [11, 12, 13], "max_tokens": 96, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        status, fault_free = pipeline.post("/completions", body)
        assert status == 200
        request = urllib.request.Request(pipeline.endpoint + "/completions", data=json.dumps(
            {**body, "stream": True}).encode(), headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as reply:
            first = reply.readline()  # the first piece is out: the generation is under way
            assert first.startswith(b"data: ")
            stage = pipeline.backend.processes[pipeline.stage_name(1)].popen
            stage.send_signal(signal.SIGKILL)
            stage.wait()
            assert pipeline.backend.restore(pipeline.desired) == [pipeline.stage_name(1)]
            events = [first.decode(), *(line.decode() for line in reply)]
        chunks = [json.loads(line[len("data: "):]) for line in events if line.startswith("data: {")]
        assert not [c for c in chunks if "error" in c], chunks[-1]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"][0]["token_ids"] == fault_free["choices"][0]["token_ids"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == fault_free["choices"][0]["text"]
        assert pipeline.gateway_metrics()["bloombee_gateway_replays_total"] == 1  # it did start over once
    finally:
        pipeline.backend.stop()
