"""lm-evaluation-harness against the gateway: its `local-completions` model (OpenAI completions with
echo and logprobs, prompts as token ids) on a multiple-choice task and a generate_until task built
from a small dataset in the repository, beside its `hf` backend on the same model in-process.

lm-eval runs in its own environment (`.venv-lmeval`, made by `scripts/install.sh --test`, which
sees the main one's packages): it pins python-dateutil below 3, which the Kubernetes client of
the main environment refuses. The per-item loglikelihoods must agree within 1e-3, the accuracy
must be identical, and the greedy generations equal.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipelines import Pipeline, start_pipeline

ROOT = Path(__file__).parents[1]
LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"
DATASET = ROOT / "tests" / "data" / "multiple_choice.jsonl"

TASKS = {
    "bloombee_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    },
    "bloombee_gen": {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices[answer]}}",
        # The test model is random: it would often stop at once on a newline, so it stops on the next question.
        "generation_kwargs": {"until": ["Question:"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match"}],
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir) -> Iterator[Pipeline]:
    pipeline = start_pipeline(tmp_path_factory.mktemp("lmeval"), str(tiny_dir), "tiny", num_stages=2,
                              gateway_args=["--micro-batch", "4"])  # fmt: skip
    yield pipeline
    pipeline.backend.stop()


def write_tasks(directory: Path) -> None:
    import yaml

    for name, task in TASKS.items():
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATASET)}},
                "test_split": "test", **task}  # fmt: skip
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def run_lm_eval(model: str, model_args: str, tasks: Path, output: Path) -> dict[str, list[dict]]:
    """Run the harness; its logged samples per task."""
    command = [str(LM_EVAL), "--model", model, "--model_args", model_args, "--tasks", ",".join(TASKS),
               "--include_path", str(tasks), "--output_path", str(output), "--log_samples", "--batch_size", "1",
               "--device", "cpu"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    samples = {}
    for name in TASKS:
        path = next(output.rglob(f"samples_{name}_*.jsonl"))
        samples[name] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                               key=lambda sample: sample["doc_id"])  # fmt: skip
    return samples


def test_lm_eval_through_the_gateway_equals_its_hf_backend(served, tiny_dir, tmp_path):
    assert LM_EVAL.exists(), "lm-eval is missing: `bash scripts/install.sh --test` makes .venv-lmeval"
    write_tasks(tmp_path)
    ours = run_lm_eval("local-completions", f"model=tiny,base_url={served.endpoint}/completions,tokenizer={tiny_dir},"
                       "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=2048", tmp_path,
                       tmp_path / "ours")  # fmt: skip
    reference = run_lm_eval("hf", f"pretrained={tiny_dir},dtype=float32", tmp_path, tmp_path / "hf")
    ours_mc, reference_mc = ours["bloombee_mc"], reference["bloombee_mc"]
    assert len(ours_mc) == len(reference_mc) == len(DATASET.read_text().splitlines())
    for mine, theirs in zip(ours_mc, reference_mc, strict=True):
        mine_ll = [float(resp[0][0]) for resp in mine["resps"]]
        their_ll = [float(resp[0][0]) for resp in theirs["resps"]]
        assert mine_ll == pytest.approx(their_ll, abs=1e-3), (mine["doc_id"], mine_ll, their_ll)
        assert mine["acc"] == theirs["acc"]
    for mine, theirs in zip(ours["bloombee_gen"], reference["bloombee_gen"], strict=True):
        assert mine["resps"] == theirs["resps"], mine["doc_id"]
    assert all(sample["resps"][0][0] for sample in ours["bloombee_gen"])  # real generations, not empty ones
