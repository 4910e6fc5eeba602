"""Shared fixtures: the real SmolLM2 model, a tiny random Llama, and a real pipeline of processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import control_planes, install_crd
from pipelines import SMOLLM2, Pipeline, make_tiny_llama, start_pipeline


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from bloombee_stage.model.loading import prepare_model

    return prepare_model(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir: Path):
    """The whole model in this process, with transformers, as the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_pipeline(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Pipeline]:
    pipeline = start_pipeline(tmp_path_factory.mktemp("smollm2-run"), SMOLLM2, "smollm2")
    yield pipeline
    pipeline.backend.stop()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[Path]:
    """A real control plane without a node (``scripts/cluster.sh up --nodes none``, about 10 s to
    start) for one module: its admin kubeconfig. Per module, so it does not idle beside the rest of
    the suite."""
    with control_planes(f"pytest{os.getpid()}") as (kubeconfig,):
        yield kubeconfig


@pytest.fixture(scope="module")
def real_api(real_cluster: Path):
    """An admin API client of ``real_cluster``, with the DistributedLLM CRD installed."""
    from kubernetes import config

    api = config.new_client_from_config(str(real_cluster))
    install_crd(api)
    return api


@pytest.fixture(scope="session")
def tiny_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from test_rejection_sampling import VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.5)  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-vocab")
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory
