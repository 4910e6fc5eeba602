"""Exactness is a property of every configuration: one matrix over what the planner and the flags
can choose, each cell's greedy tokens against transformers' ``generate`` on the whole model.

Axes (a new one is a line in ``AXES``, a field of ``Cell`` and the branch where a cell is built):

* draft: none, prompt lookup, early exit, the head's chains, its trees, its trees with prompt
  lookup's branch;
* kv: the fraction of each span's layers whose KV cache is offloaded (0, part, all);
* weights: resident, or half of each span's layers streamed, read ahead or not;
* packed: weights packed for steps of a few positions (off, on; streamed weights never pack);
* stages: the model in one span or in three uneven ones;
* rows: one generation at a time, several sharing every step, or several that fork a finished
  generation's prefix (the prefix cache) while sharing steps.

The stages are real ``StageService``s in this process (``inprocess.py``: frames, sessions, forks,
offload, verification as a relayed step runs them; only sockets are left out), driven by the
gateway's own ``generate``; the model is a tiny random Llama with a vocabulary of 8, so drafts
are often right (trees keep nodes other than their first, whose KV then moves) and logits are far
from ties. The real model, through real processes, is in the cells at the end.

Sampled requests are promised the target distribution (speculative rejection sampling): a
seeded request's tokens depend on the draft method, so with a seed each method must give the same
tokens on every configuration as on the plainest one, and the distribution test runs where the
KV cache is offloaded and trees are drafted, on three stages.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from bloombee_stage.gateway.draft_tree import HeadDrafter, TreeBudget
from bloombee_stage.gateway.drafting import DraftLength, ModelDrafter
from bloombee_stage.gateway.generation import Generated, Speculation, TextAssembler, generate
from bloombee_stage.gateway.prefixes import PrefixIndex
from bloombee_stage.model.draft_head import DraftHead
from bloombee_stage.model.span import OffloadSettings, Span, SpanError, StageModel
from bloombee_stage.wire.messages import SamplingParams
from inprocess import InProcessPipeline, build_services

VOCAB = 8
LAYERS = 7
SPANS = {1: (0, LAYERS), 3: (0, 3, 5, LAYERS)}  # uneven spans: every stage a different length
EARLY_EXIT_LAYERS = 3
NEW_TOKENS = 12
PROMPTS = ([1, 2, 3, 4, 5, 1, 2, 3], [6, 0, 7, 6, 0, 7, 6], [3, 3, 5, 2, 1, 4, 6, 0, 2])
FORK_FIRST = [5, 4, 3, 2, 1, 0, 7, 6]  # a finished generation whose prefix the next ones share

AXES: dict[str, tuple] = {
    "draft": ("none", "prompt-lookup", "early-exit", "head-chain", "head-tree", "head-tree+lookup"),
    "kv": (0.0, 0.5, 1.0),
    "weights": ("resident", "streamed", "streamed-no-prefetch"),
    "packed": ("off", "on"),
    "stages": (1, 3),
    "rows": ("one", "several", "fork"),
}


@dataclass(frozen=True)
class Cell:
    draft: str
    kv: float
    weights: str
    packed: str
    stages: int
    rows: str

    @property
    def offload(self) -> OffloadSettings:
        streamed = self.weights != "resident"
        return OffloadSettings(weights=0.5 if streamed else 0.0, kv=self.kv,
                               prefetch=self.weights != "streamed-no-prefetch")  # fmt: skip

    def stage_key(self) -> tuple:
        return self.stages, self.kv, self.weights, self.packed

    @property
    def refused(self) -> str | None:
        """Why a stage refuses this configuration (then no cell of it is served), or None."""
        if self.packed == "on" and self.weights != "resident":
            return "packed weights 'on' needs the span's weights resident"
        return None


CELLS = [Cell(*values) for values in itertools.product(*AXES.values())]


def cell_id(cell: Cell) -> str:
    return "-".join(f"{name}:{getattr(cell, name)}" for name in AXES)


@pytest.fixture(scope="module")
def matrix_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=0.5, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)  # fmt: skip
    directory = tmp_path_factory.mktemp("matrix-model")
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(matrix_model: Path) -> Callable[[list[int]], list[int]]:
    """transformers' greedy ``generate`` on the whole model, per prompt."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(matrix_model, dtype=torch.float32).eval()
    known: dict[tuple[int, ...], list[int]] = {}

    def tokens(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in known:
            ids = torch.tensor([prompt])  # with its mask: token 0 is no padding here
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
            known[tuple(prompt)] = out[0, len(prompt) :].tolist()
        return known[tuple(prompt)]

    return tokens


class Drafts:
    """A new ``Speculation`` per generation, as the gateway's engine makes one, for each draft kind."""

    def __init__(self, model_dir: Path) -> None:
        self.whole = whole = StageModel(model_dir, Span(0, LAYERS, LAYERS), packed="off")
        torch.manual_seed(5)
        self.head = DraftHead(whole.full_config, whole.model.model.embed_tokens.weight.detach(),
                              whole.model.lm_head.weight.detach(), torch.arange(VOCAB)).eval()  # fmt: skip
        self.early_exit = ModelDrafter(StageModel(model_dir, Span(0, EARLY_EXIT_LAYERS, LAYERS), head=True,
                                                  packed="off"), "early-exit")  # fmt: skip

    def speculation(self, kind: str) -> Speculation:
        # Sizes from the tokens alone, not from timings: every run of a cell drafts the same.
        length = DraftLength(maximum=4, timed=False)
        head = HeadDrafter(self.head)
        budget = TreeBudget(maximum=10, timed=False)
        return {
            "none": lambda: Speculation("none"),
            "prompt-lookup": lambda: Speculation("prompt-lookup", length),
            "early-exit": lambda: Speculation("early-exit", length, drafter=self.early_exit),
            "head-chain": lambda: Speculation("head", length, head=head, width=1, budget=budget),
            "head-tree": lambda: Speculation("head", length, head=head, width=3, budget=budget, lookup_branch=0),
            "head-tree+lookup": lambda: Speculation("head", length, head=head, width=3, budget=budget),
        }[kind]()


@pytest.fixture(scope="module")
def drafts(matrix_model: Path) -> Drafts:
    return Drafts(matrix_model)


@pytest.fixture(scope="module")
def stages(matrix_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Stage services per (stages, kv, weights, packed), built once and reused by every draft and rows axis."""
    built: dict[tuple, list] = {}
    kv_dir = tmp_path_factory.mktemp("kv")

    def services(cell: Cell) -> list:
        key = cell.stage_key()
        if key not in built:
            built[key] = build_services(matrix_model, SPANS[cell.stages], replace(cell.offload, kv_dir=kv_dir),
                                        cell.packed)  # fmt: skip
        for service in built[key]:
            service.sessions.sessions.clear()  # nothing of the last cell's (parked forks) is left behind
        return built[key]

    yield services
    for services_ in built.values():
        for service in services_:
            service.executor.shutdown(wait=False)


async def _generate(pipeline: InProcessPipeline, prompt: list[int], speculation: Speculation,
                    sampling: SamplingParams, prefixes: PrefixIndex | None = None,
                    new_tokens: int = NEW_TOKENS) -> Generated:  # fmt: skip
    result = Generated()
    async for _ in generate(pipeline, prompt, new_tokens, sampling, set(), TextAssembler(str, []), result,
                            speculation, prefixes):  # fmt: skip
        pass
    return result


def fork_prompts(first_answer: list[int]) -> list[list[int]]:
    """Prompts that share a finished generation's context: its prompt and part of its answer, then
    something else; and its prompt's first part only."""
    return [[*FORK_FIRST, *first_answer[:3], 1, 2], [*FORK_FIRST[:6], 0, 0, 1]]


async def run_cell(cell: Cell, pipeline: InProcessPipeline, drafts: Drafts,
                   sampling: SamplingParams) -> dict[tuple[int, ...], list[int]]:  # fmt: skip
    """Every prompt the cell's rows axis runs, with the tokens it got."""
    answers: dict[tuple[int, ...], list[int]] = {}

    async def together(prompts: list[list[int]], prefixes: PrefixIndex | None = None) -> None:
        results = await asyncio.gather(*(_generate(pipeline, prompt, drafts.speculation(cell.draft), sampling,
                                                   prefixes) for prompt in prompts))  # fmt: skip
        answers.update({tuple(prompt): result.token_ids for prompt, result in zip(prompts, results, strict=True)})

    if cell.rows == "one":
        for prompt in PROMPTS[:2]:
            await together([prompt])
    elif cell.rows == "several":
        await together(list(PROMPTS))
    else:
        prefixes = PrefixIndex(8, min_shared=4)
        await together([FORK_FIRST], prefixes)
        await together(fork_prompts(answers[tuple(FORK_FIRST)]), prefixes)
    return answers


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_greedy_tokens_are_generates_in_every_configuration(cell: Cell, stages, drafts, reference):
    if cell.refused is not None:
        with pytest.raises(SpanError, match=cell.refused):
            stages(cell)
        return
    pipeline = InProcessPipeline(stages(cell))
    answers = asyncio.run(run_cell(cell, pipeline, drafts, SamplingParams(temperature=0.0)))
    for prompt, tokens in answers.items():
        assert tokens == reference(list(prompt)), f"prompt {list(prompt)}"
    if cell.rows != "one":
        assert max(pipeline.rows_per_step) > 1  # rows did share steps
    if cell.rows == "fork":
        assert pipeline.forks == 2  # both later prompts copied the finished generation's prefix
    if cell.draft.startswith("head-tree"):
        assert pipeline.moved_paths > 0  # trees kept nodes other than their first: their KV moved


# Seeded sampling: a smaller grid (each cell against the plainest configuration with its draft kind).
SAMPLED_AXES = {**AXES, "kv": (0.0, 1.0), "weights": ("resident", "streamed"), "rows": ("several",)}
SAMPLED_CELLS = [cell for cell in (Cell(*values) for values in itertools.product(*SAMPLED_AXES.values()))
                 if cell.refused is None]  # fmt: skip
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def plainest_samples(stages, drafts) -> Callable[[str], dict[tuple[int, ...], list[int]]]:
    known: dict[str, dict[tuple[int, ...], list[int]]] = {}

    def samples(draft: str) -> dict[tuple[int, ...], list[int]]:
        if draft not in known:
            cell = Cell(draft, 0.0, "resident", "off", 1, "one")
            known[draft] = asyncio.run(run_cell(cell, InProcessPipeline(stages(cell)), drafts, SEEDED))
        return known[draft]

    return samples


@pytest.mark.parametrize("cell", SAMPLED_CELLS, ids=cell_id)
def test_a_seeded_sample_is_the_same_in_every_configuration(cell: Cell, stages, drafts, plainest_samples):
    """With a seed a draft method draws the same tokens whatever the plan: offload, packing,
    stages and shared steps change nothing; each cell against the plainest configuration (one
    stage, nothing offloaded or packed, one generation at a time) with its draft kind. (Which tokens
    depends on the method: rejection sampling promises the distribution, not no-draft's tokens;
    the next test checks the distribution.)"""
    got = asyncio.run(run_cell(cell, InProcessPipeline(stages(cell)), drafts, SEEDED))
    expected = plainest_samples(cell.draft)
    assert {prompt: got[prompt] for prompt in expected} == expected


def test_trees_on_offloaded_kv_through_three_stages_keep_the_target_distribution(stages, drafts):
    """Head trees with prompt lookup's branch, half the layers' KV cache offloaded, three stages,
    twenty generations sharing every step: the three tokens follow the model's distribution. (That
    the accepted path's KV is kept right under sampling is the seeded test's: a wrong KV changes a
    seeded draw; here too few draws would see it.)"""
    from test_rejection_sampling import chi_square_p_value, exact_distribution

    prompt = [1, 2, 3, 1, 2]  # it repeats itself: the first round drafts already (lookup's branch)
    params = {"temperature": 1.0}
    cell = Cell("head-tree+lookup", 0.5, "resident", "off", 3, "several")
    pipeline = InProcessPipeline(stages(cell))
    draws, together, new_tokens = 1000, 20, 3

    async def sample() -> Counter:
        counts: Counter = Counter()
        for first in range(0, draws, together):
            results = await asyncio.gather(*(
                _generate(pipeline, prompt, drafts.speculation(cell.draft), SamplingParams(seed=seed, **params),
                          new_tokens=new_tokens)
                for seed in range(first, first + together)))  # fmt: skip
            counts.update(tuple(result.token_ids) for result in results)
        return counts

    counts = asyncio.run(sample())
    exact = exact_distribution(drafts.whole, SamplingParams(**params), prompt, new_tokens)
    assert chi_square_p_value(counts, exact, draws) > 1e-3
    assert pipeline.trees > draws / 2 and max(pipeline.rows_per_step) == together


@pytest.mark.model
def test_the_real_model_on_offloaded_kv_with_head_trees_gives_generates_tokens(tmp_path, smollm2_reference):
    """The issue's configuration on the real model and real processes: three stages, a part and
    all of their KV caches offloaded, one stage streaming half its weights without read-ahead, the
    shipped head's trees with prompt lookup's branch; alone, batched, and forking a prefix."""
    from pipelines import SMOLLM2, start_pipeline
    from test_pipeline_smollm2 import chat_request, reference_tokens
    from test_speculative import assert_batched_greedy

    offload = {0: {"offload_kv": 0.5}, 1: {"offload_kv": 1.0, "offload_weights": 0.5}, 2: {"offload_kv": 0.25}}
    gateway = ["--draft", "head", "--micro-batch", "4", "--max-in-flight", "1"]
    pipeline = start_pipeline(tmp_path, SMOLLM2, "smollm2", stage_overrides=offload,
                              stage_args={1: ["--no-prefetch"]}, gateway_args=gateway)  # fmt: skip
    try:
        for prompt in ("What is 17 * 23?", "Write a haiku about autumn leaves."):
            status, reply = pipeline.post("/chat/completions", chat_request(prompt, max_tokens=40))
            assert status == 200, reply
            expected = reference_tokens(smollm2_reference, reply["prompt_token_ids"], 40)
            assert reply["choices"][0]["token_ids"] == expected
        prompts = ["Give me three tips for sleeping well.", "Describe a sunset.", "What is the capital of France?"]
        assert_batched_greedy(pipeline, smollm2_reference, prompts, max_tokens=32)
        metrics = pipeline.gateway_metrics()
        assert metrics["bloombee_gateway_draft_accepted_total"] > 0
        assert metrics["bloombee_gateway_rounds_total"] < metrics["bloombee_gateway_generation_tokens_total"] / 1.5
        assert pipeline.stage_metrics(1)["bloombee_stage_forked_tokens_total"] > 0  # later prompts forked the template
        assert all(pipeline.stage_info(index)["offload"]["kv"] > 0 for index in range(3))
    finally:
        pipeline.backend.stop()
