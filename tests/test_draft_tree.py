"""Token trees: one pass verifies a whole draft tree on every stage, the accepted path's KV is
kept, and the output is the model's own (greedy: token for token; sampled: the same distribution)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from bloombee_stage.gateway.draft_tree import CARRIED_PREDICTED, HeadDrafter, TreeBudget, TreeDraft
from bloombee_stage.gateway.drafting import Draft, DraftLength, ModelDrafter
from bloombee_stage.gateway.generation import Generated, Speculation, TextAssembler, generate
from bloombee_stage.gateway.prefixes import PrefixIndex
from bloombee_stage.model.draft_head import DraftHead, DraftHeadError, load_head, save_head
from bloombee_stage.model.span import Span, StageModel, keep_path, tree_layout, truncate_cache
from bloombee_stage.stage.service import attach_features
from bloombee_stage.stage.verify import decide, verify_tree
from bloombee_stage.wire.messages import RowMeta, RowResult, SamplingParams
from test_rejection_sampling import NEW_TOKENS, PROMPT, VOCAB, chi_square_p_value, exact_distribution

# A tree after the row's last undrafted position: two candidates there, the first with one child,
# the second with two.
TREE = [-1, -1, 0, 1, 1]


def test_tree_layout_gives_depths_and_ancestors():
    offsets, allowed = tree_layout(7, TREE)  # positions 0, 1 undrafted, then the five nodes
    assert offsets.tolist() == [0, 1, 2, 2, 3, 3, 3]
    node = {index: 2 + index for index in range(5)}
    # node 3 (child of node 1) sees the undrafted positions, node 1 and itself, not node 0 or 2
    assert allowed[node[3]].nonzero().flatten().tolist() == [0, 1, node[1], node[3]]
    assert allowed[node[2]].nonzero().flatten().tolist() == [0, 1, node[0], node[2]]


def test_messages_refuse_bad_trees():
    with pytest.raises(ValueError, match="come before"):
        RowMeta(session="s", start=0, length=4, draft=[1, 2], tree=[-1, 1])
    with pytest.raises(ValueError, match="parents for"):
        RowMeta(session="s", start=0, length=4, draft=[1, 2], tree=[-1])
    with pytest.raises(ValueError, match="increasing"):
        RowMeta(session="s", start=5, length=1, tree_path=[2, 1])
    with pytest.raises(ValueError, match="undrafted"):
        RowMeta(session="s", start=0, length=3, draft=[1, 2], features=2)


@pytest.fixture(scope="module")
def whole(smollm2_dir: Path) -> StageModel:
    return StageModel(smollm2_dir, Span(0, 30, 30))


def _chain_logits(model: StageModel, tokens: list[int]) -> torch.Tensor:
    return model.forward(torch.tensor([tokens]), model.new_cache())[0, -1]


@pytest.mark.model
def test_a_tree_step_gives_every_path_the_logits_of_its_chain(whole):
    prompt = [1, 504, 3458, 314, 260, 1466, 30, 198]
    draft = [314, 253, 1111, 2088, 28]
    caches = [whole.new_cache(), whole.new_cache()]
    other = [1, 9519, 28, 2]
    # two rows in one step (the padded path), one a tree and one plain, then the tree alone
    inputs = torch.zeros(2, len(prompt) + len(draft), dtype=torch.int64)
    inputs[0] = torch.tensor(prompt + draft)
    inputs[1, : len(other)] = torch.tensor(other)
    batched = whole.forward_rows(inputs, caches, [len(prompt) + len(draft), len(other)], [len(draft) + 1, 1],
                                 [TREE, None])  # fmt: skip
    alone = whole.forward_rows(torch.tensor([prompt + draft]), [whole.new_cache()], [len(prompt) + len(draft)],
                               [len(draft) + 1], [TREE])[0]  # fmt: skip
    for logits in (batched[0], alone):
        for node in range(-1, len(draft)):
            path, at = [], node
            while at >= 0:
                path.insert(0, draft[at])
                at = TREE[at]
            expected = _chain_logits(whole, prompt + path)
            torch.testing.assert_close(logits[node + 1], expected, atol=2e-3, rtol=1e-4)
            assert int(logits[node + 1].argmax()) == int(expected.argmax())
    torch.testing.assert_close(batched[1][0], _chain_logits(whole, other), atol=2e-3, rtol=1e-4)


@pytest.mark.model
def test_the_accepted_paths_kv_continues_like_the_chain(whole):
    prompt = [1, 504, 3458, 314, 260, 1466, 30, 198]
    draft = [314, 253, 1111, 2088, 28]
    cache = whole.new_cache()
    whole.forward_rows(torch.tensor([prompt + draft]), [cache], [len(prompt) + len(draft)], [len(draft) + 1], [TREE])
    path = [1, 4]  # draft[1] then its second child
    base = len(prompt)
    keep_path(cache, base, path)
    truncate_cache(cache, base + len(path))
    following = 42
    continued = whole.forward(torch.tensor([[following]]), cache)[0, -1]
    expected = _chain_logits(whole, [*prompt, draft[1], draft[4], following])
    torch.testing.assert_close(continued, expected, atol=2e-3, rtol=1e-4)


def test_greedy_tree_verification_follows_the_models_choices():
    logits = torch.full((6, 10), -5.0)
    draft = [3, 4, 7, 8, 9]
    logits[0, 4] = 1  # after the root the model picks 4: node 1
    logits[2, 9] = 1  # after node 1 it picks 9: node 4
    logits[5, 6] = 1  # after node 4 it picks 6, its own
    row = RowMeta(session="s", start=0, length=7, draft=draft, tree=TREE)
    assert verify_tree(logits, row) == ([4, 9, 6], [1, 4])
    result = decide(logits, row)
    assert result.tokens == [4, 9, 6] and result.path == [1, 4]
    states = torch.arange(7 * 2, dtype=torch.float32).view(7, 2)  # 2 undrafted + 5 nodes
    attach_features(result, row.model_copy(update={"features": 2}), states)
    assert result.features == 4 and result.hidden[:, 0].tolist() == [0, 2, 6, 12]  # undrafted, node 1, node 4


def test_tree_budget_sends_nodes_while_they_pay_and_fewer_under_load():
    budget = TreeBudget(calibration=1.0, round_s=0.1, node_s=0.005)
    probs = [0.9, 0.8, 0.6, 0.3, 0.05, 0.01]
    alone = budget.size(probs)
    assert alone == 4  # 0.05 more tokens are not worth 5 ms of a 100 ms round
    assert budget.size(probs, load=16) < alone
    assert budget.size([0.001]) == 0
    for nodes, seconds in [(0, 0.1), (10, 0.15), (20, 0.2), (5, 0.125)]:
        budget.update(predicted=1.0, accepted=1, nodes=nodes, round_s=seconds)
    assert budget.node_s == pytest.approx(0.005) and budget.round_s == pytest.approx(0.1)


def test_a_new_generation_starts_from_the_last_ones_costs_with_a_short_calibration_memory():
    finished = TreeBudget()
    for nodes, seconds in [(4, 0.19), (12, 0.21), (8, 0.2), (16, 0.22)]:  # a 180 ms round, 2.5 ms a node
        finished.update(predicted=3.0, accepted=1, nodes=nodes, round_s=seconds)
    assert finished.calibration == pytest.approx(1 / 3)
    carried = finished.carried()
    assert (carried.round_s, carried.node_s) == (finished.round_s, finished.node_s)
    assert carried.round_s == pytest.approx(0.18) and carried.node_s == pytest.approx(0.0025)
    assert carried.samples == finished.samples and carried.samples is not finished.samples
    assert carried.predicted == pytest.approx(CARRIED_PREDICTED)  # 12 predicted tokens' history cut to 8
    carried.update(predicted=2.0, accepted=2, nodes=8, round_s=0.2)  # the new text is easier to guess
    assert carried.calibration == pytest.approx((8 / 3 + 2) / (8 + 2))  # (6 / 14 had it kept it all)
    assert finished.calibration == pytest.approx(1 / 3) and len(finished.samples) == 4  # the old one untouched


def test_a_tree_keeps_the_likeliest_nodes_and_their_ancestors():
    tree = TreeDraft(tokens=[5, 6, 7, 8], parents=[-1, -1, 0, 2], path_probs=[0.5, 0.4, 0.45, 0.45], seconds=0.01,
                     calls=2)  # fmt: skip
    top = tree.top(2)
    assert top.tokens == [5, 7] and top.parents == [-1, 0]
    # what drafting cost travels with the pruned tree, so TreeBudget learns the head-call time
    assert (top.seconds, top.calls) == (0.01, 2)
    top3 = tree.top(3)
    assert top3.tokens == [5, 7, 8] and top3.parents == [-1, 0, 1]


def test_a_lookup_branch_shares_the_trees_nodes_and_is_appended_after_them():
    tree = TreeDraft(tokens=[5, 6, 7, 8], parents=[-1, -1, 0, 2], path_probs=[0.5, 0.4, 0.45, 0.3], calls=2)
    merged = tree.with_branch([5, 7, 9, 4, 3], most=2)
    # 5 and 7 are the tree's nodes 0 and 2; 9 and 4 are new under node 2; 3 is past the limit
    assert merged.tokens == [5, 6, 7, 8, 9, 4] and merged.parents == [-1, -1, 0, 2, 2, 4]
    assert merged.path_probs[4:] == [0.0, 0.0] and merged.calls == 2
    assert tree.with_branch([6, 1], most=0).tokens == tree.tokens  # shared only: nothing to add
    assert tree.with_branch([], most=4).parents == tree.parents
    new_root = tree.with_branch([2, 5], most=4)  # a different first token: a branch from the root
    assert new_root.tokens[4:] == [2, 5] and new_root.parents[4:] == [-1, 4]
    # the head's calibration counts only its own accepted nodes
    draft = Draft(tokens=merged.tokens, tree=merged.parents, head_nodes=4)
    assert draft.head_accepted([0, 2, 4, 5], 4) == 2 and draft.head_accepted([1], 1) == 1
    assert Draft(tokens=[1, 2]).head_accepted(None, 2) == 2


def _random_head(model: StageModel, vocab_ids: list[int], seed: int = 0) -> DraftHead:
    torch.manual_seed(seed)
    embedding = model.model.model.embed_tokens.weight.detach()
    return DraftHead(model.full_config, embedding, model.model.lm_head.weight.detach(),
                     torch.tensor(vocab_ids)).eval()  # fmt: skip


class TreeStepper:
    """The stage's step for one row, in this process: the whole model with trees, features and
    the accepted path's KV, then the last stage's ``decide`` and ``attach_features``."""

    def __init__(self, model: StageModel, decider=decide) -> None:
        self.model = model
        self.decider = decider
        self.caches: dict[str, object] = {}
        self.trees = 0
        self.drafted = 0
        self.kept = 0
        self.rows: list[RowMeta] = []

    def open(self) -> tuple[int, ...]:
        return (0,)

    async def step(self, row: RowMeta, inputs: list[int], path: tuple[int, ...]) -> RowResult:
        self.rows.append(row)
        if row.fork is not None and row.session not in self.caches:  # a parked session's first positions
            self.caches[row.session] = self.model.new_cache()
            self.model.copy_prefix(self.caches[row.fork], self.caches[row.session], row.start)
        cache = self.caches.setdefault(row.session, self.model.new_cache())
        self.model.rewind(cache, row.start, row.tree_path)  # as the stage does
        self.trees += row.tree is not None
        features = [row.features + len(row.draft)] if row.features else None
        output = self.model.forward_rows(torch.tensor([inputs]), [cache], [row.length], [len(row.draft) + 1],
                                         [row.tree], features)  # fmt: skip
        logits, states = (output[0][0], output[1][0]) if features else (output[0], None)
        result = self.decider(logits, row)
        self.drafted += len(row.draft)
        self.kept += len(result.tokens) - 1
        if states is not None:
            attach_features(result, row, states)
        return result

    async def close(self, session: str, path: tuple[int, ...], park: bool = False) -> None:
        if not park:
            self.caches.pop(session, None)

    async def forget(self, session: str, path: tuple[int, ...]) -> None:
        self.caches.pop(session, None)


async def _drain(pieces) -> None:
    async for _ in pieces:
        pass


def _run(stepper, head: DraftHead, prompt: list[int], tokens: int, sampling: SamplingParams,
         prefixes: PrefixIndex | None = None, speculations: list[Speculation] | None = None) -> Generated:  # fmt: skip
    async def one() -> Generated:
        result = Generated()
        speculation = Speculation("head", DraftLength(maximum=4), head=HeadDrafter(head), width=3,
                                  budget=TreeBudget(maximum=12))  # fmt: skip
        if speculations is not None:
            speculations.append(speculation)
        async for _ in generate(stepper, prompt, tokens, sampling, set(), TextAssembler(str, []), result,
                                speculation, prefixes):  # fmt: skip
            pass
        return result

    return asyncio.run(one())


def test_a_forked_head_state_drafts_like_one_that_saw_every_position(tiny_vocab_dir):
    """A generation forking a finished one's prefix takes the head's pairs before the fork from
    the finished generation's state (prefixes.py): drafting after it matches a head that observed
    every position itself, in float32 and bfloat16 alike."""
    model = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    for dtype in (torch.float32, torch.bfloat16):
        drafter = HeadDrafter(_random_head(model, list(range(0, VOCAB, 2)), seed=3).compute_in(dtype))
        torch.manual_seed(4)
        features = torch.randn(20, model.hidden_size)
        tokens = torch.randint(0, VOCAB, (20,)).tolist()
        whole = drafter.new_state()
        drafter.observe(whole, features[:12], tokens[:12], position=5)  # a prompt's last 12 positions, from 5
        drafter.observe(whole, features[12:], tokens[12:], position=17)
        with pytest.raises(ValueError, match=r"from position 30; the head has seen 5\.\.24"):
            drafter.observe(drafter.prefix(whole, 25), features[:1], tokens[:1], position=30)
        assert drafter.prefix(whole, 5) is None and drafter.prefix(whole, 26) is None  # pairs it never saw

        forked = drafter.prefix(whole, 14)
        assert (forked.start, forked.length, forked.last_out) == (5, 9, None)
        assert drafter.tree(forked, depth=3, width=2, size=6).tokens == []  # nothing to draft from yet
        drafter.observe(forked, features[9:], tokens[9:], position=14)
        expected, got = (drafter.tree(state, depth=3, width=2, size=6) for state in (whole, forked))
        assert got.tokens == expected.tokens and got.parents == expected.parents
        assert got.path_probs == pytest.approx(expected.path_probs, rel=1e-3 if dtype == torch.float32 else 0.05)
        assert whole.length == 20  # forking copied the held state's cache, it did not cut it


def test_a_fork_of_a_finished_generation_hands_the_head_its_prefix(tiny_vocab_dir):
    """A prompt that starts like a finished generation's forks its session (prefixes.py), one
    position short of what they share, and its head starts from the finished one's pairs: the
    head state it leaves behind covers the prompt from position 0, although the stages computed
    only the positions after the fork. The tokens are the model's own either way."""
    model = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    head = _random_head(model, list(range(VOCAB)), seed=7)
    greedy = SamplingParams(temperature=0.0)
    first, second = [*PROMPT, 3, 6, 7], [*PROMPT, 3, 6, 5, 5]
    alone = _run(TreeStepper(model), head, second, 10, greedy)
    stepper, prefixes = TreeStepper(model), PrefixIndex(4, min_shared=4)
    _run(stepper, head, first, 10, greedy, prefixes)
    forked = _run(stepper, head, second, 10, greedy, prefixes)
    assert forked.token_ids == alone.token_ids
    fork = next(row for row in stepper.rows if row.fork is not None)
    assert fork.start == len(PROMPT) + 2 - 1  # they share PROMPT + [3, 6]; the last shared position is computed
    state = prefixes.draft_state(fork.session)
    assert state is not None and state.start == 0 and state.length >= len(second)

    # a draft model's own KV cache is not kept with a parked session: only a head's state is resumed
    drafter = ModelDrafter(StageModel(tiny_vocab_dir, Span(0, 1, 2), head=True), "early-exit")
    speculation = Speculation("early-exit", DraftLength(maximum=2), drafter=drafter)
    stepper.rows.clear()
    asyncio.run(_drain(generate(stepper, [*first, 1], 4, greedy, set(), TextAssembler(str, []), Generated(),
                                speculation, prefixes)))  # fmt: skip
    assert prefixes.draft_state(stepper.rows[0].session) is None


def test_sampling_through_trees_follows_the_target_distribution(tiny_vocab_dir):
    """Head trees, with prompt lookup's branch in them (the prompt repeats itself, so lookup
    proposes), keep the target distribution; a verifier that ignores candidates' order does not."""
    target = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    head = _random_head(target, list(range(VOCAB)))
    params = {"temperature": 1.0}
    prompt = [*PROMPT, *PROMPT[:2]]
    exact = exact_distribution(target, SamplingParams(**params), prompt)

    speculations: list[Speculation] = []

    def sample(stepper: TreeStepper, draws: int) -> Counter:
        counts: Counter = Counter()
        for seed in range(draws):
            generated = _run(stepper, head, prompt, NEW_TOKENS, SamplingParams(seed=seed, **params),
                             speculations=speculations)  # fmt: skip
            counts[tuple(generated.token_ids)] += 1
        return counts

    stepper = TreeStepper(target)
    draws = 1200
    assert chi_square_p_value(sample(stepper, draws), exact, draws) > 1e-3
    # trees were drafted, and verification kept some of their nodes and refused others
    assert stepper.trees >= draws and 0 < stepper.kept < stepper.drafted
    # prompt lookup's branches were in those trees, and some of their nodes were kept
    assert 0 < sum(one.branch_accepted for one in speculations) < sum(one.branch_nodes for one in speculations)

    def first_candidates(logits: torch.Tensor, row: RowMeta) -> RowResult:
        """A wrong verifier: it follows every node's first child, then takes the model's likeliest token."""
        children = {parent: node for node, parent in reversed(list(enumerate(row.tree or [])))}
        path, node = [], -1
        while node in children:
            node = children[node]
            path.append(node)
        return RowResult(session=row.session, tokens=[*(row.draft[n] for n in path), int(logits[node + 1].argmax())],
                         path=path)  # fmt: skip

    control = 400
    assert chi_square_p_value(sample(TreeStepper(target, first_candidates), control), exact, control) < 1e-6


@pytest.mark.model
def test_greedy_through_trees_gives_the_tokens_of_generate(whole, smollm2_reference):
    model, tokenizer = smollm2_reference
    chat = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    vocab = sorted(set(range(2000)) | set(expected))  # a draft vocabulary that holds some right answers
    stepper = TreeStepper(whole)
    result = _run(stepper, _random_head(whole, vocab), prompt, 24, SamplingParams())
    assert result.token_ids == expected
    assert stepper.trees > 0


def test_a_head_with_a_wrong_checksum_or_model_is_refused(tmp_path, tiny_vocab_dir):
    target = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    head = _random_head(target, list(range(VOCAB)))
    embedding = target.model.model.embed_tokens.weight.detach()
    from bloombee_stage.model.draft_head import embedding_fingerprint

    save_head(head, tmp_path, {"model_fingerprint": embedding_fingerprint(embedding), "recipe": {}, "heldout": {}})
    lm_head = target.model.lm_head.weight.detach()
    loaded = load_head(target.full_config, embedding, lm_head, tmp_path)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
    with pytest.raises(DraftHeadError, match="another model"):
        load_head(target.full_config, embedding + 1, lm_head, tmp_path)
    weights = tmp_path / "draft-head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(DraftHeadError, match="checksum"):
        load_head(target.full_config, embedding, lm_head, tmp_path)


def _training_script():
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("train_draft_head", root / "scripts" / "train_draft_head.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_training_leaves_out_prompts_near_the_benchs():
    """The bench's open chat is drafted by a head that never saw those requests: the training
    script drops every prompt near one (its own self-written ones included), and its templated
    prompts share no topic with them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from prompt_sets import BENCHMARK_PROMPTS, near_any

    assert all(near_any(prompt, [prompt]) for prompt in BENCHMARK_PROMPTS)
    assert near_any("Can you provide some tips on how to improve my public speaking skills?", BENCHMARK_PROMPTS)
    assert near_any("I'm planning a weekend camping trip to the beach.", BENCHMARK_PROMPTS)
    assert not near_any("Write a short story that involves whales.", BENCHMARK_PROMPTS)  # a form, not a topic
    train, held = _training_script().prompts(640)
    assert len(train) + len(held) == 640 and not any(near_any(prompt, BENCHMARK_PROMPTS) for prompt in train + held)


def test_replayed_rounds_count_what_the_gateway_would_keep(tiny_vocab_dir):
    """The acceptance measure of training and of bench/draft_acceptance.py: a tree keeps the
    answer's path from its root; a replayed answer yields every one of its tokens, one round per
    rejection, and the prompt's round counts."""
    script = _training_script()
    assert script.accepted_along([5, 6, 7, 8], [-1, -1, 1, 2], [6, 7, 8, 1]) == 3
    assert script.accepted_along([5, 6, 7], [-1, 0, -1], [7, 9]) == 1
    assert script.accepted_along([5, 6], [-1, 0], [6, 5]) == 0
    model = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    drafter = HeadDrafter(_random_head(model, list(range(VOCAB)), seed=5))
    torch.manual_seed(6)
    record = {"tokens": torch.randint(0, VOCAB, (30,)), "features": torch.randn(30, model.hidden_size),
              "prompt_length": 10}  # fmt: skip
    rounds, produced, drafted = script.replay_rounds(drafter, record, depth=3, width=2, size=5)
    assert produced == 20 and 1 < rounds <= 20 and drafted <= 5 * (rounds - 1)
    # a draft that is the answer itself: every round keeps its whole chain of 3, and 1 more
    answer = record["tokens"].tolist()

    class Oracle(HeadDrafter):
        def tree(self, state, depth, width, size, level_gain=0.0):
            return TreeDraft(answer[state.start + state.length + 1 :][:depth], list(range(-1, depth - 1)))

    rounds, produced, drafted = script.replay_rounds(Oracle(drafter.head), record, depth=3)
    assert (rounds, produced) == (1 + 5, 20)  # 19 tokens after the prompt's: 4 rounds of 4, one of 3


def test_training_runs_each_unrolled_block_once_for_the_loss_of_a_full_pass(tiny_vocab_dir):
    """The training loss runs block s (the head's own s-th unrolled prediction) on its rows only,
    attending to earlier blocks through the cache; loss and gradients are those of running every
    block so far in one pass with the unrolled mask."""
    script = _training_script()
    model = StageModel(tiny_vocab_dir, Span(0, 2, 2))
    head = _random_head(model, list(range(0, VOCAB, 2)), seed=3).train()
    torch.manual_seed(4)
    length, depth, weights = 12, 3, [1.0, 0.8, 0.6]
    record = {"tokens": torch.randint(0, VOCAB, (length + 1,)), "features": torch.randn(length + 1, model.hidden_size),
              "choice": torch.randint(0, VOCAB, (length + 1,))}  # fmt: skip
    vocab_index = torch.full((VOCAB,), -1, dtype=torch.int64)
    vocab_index[head.vocab_ids] = torch.arange(head.vocab_ids.numel())

    def full_passes() -> torch.Tensor:
        tokens, features = record["tokens"], record["features"]
        mask = script.unrolled_mask(length, depth).view(1, 1, depth * length, depth * length)
        inputs_f, inputs_x, positions = [features[:length]], [tokens[1:]], [torch.arange(1, length + 1)]
        total = torch.zeros(())
        for block in range(depth):
            width = (block + 1) * length
            out = head(torch.cat(inputs_f).unsqueeze(0), torch.cat(inputs_x).unsqueeze(0),
                       torch.cat(positions).unsqueeze(0), mask[:, :, :width, :width])[0, block * length :]  # fmt: skip
            valid = length - block
            target_x = vocab_index[record["choice"][block + 1 : block + 1 + valid]]
            known = target_x >= 0
            logits = head.draft_logits(out[:valid])
            total = total + weights[block] * (
                torch.nn.functional.smooth_l1_loss(out[:valid], features[block + 1 : block + 1 + valid])
                + 0.1 * torch.nn.functional.cross_entropy(logits[known], target_x[known]))  # fmt: skip
            shift = out[: length - block - 1]
            inputs_f.append(torch.cat([shift, shift.new_zeros(block + 1, shift.shape[1])]))
            inputs_x.append(torch.cat([tokens[block + 2 :], tokens.new_zeros(block + 1)]))
            positions.append(torch.arange(2 + block, length + 2 + block))
        return total

    reference = full_passes()
    reference.backward()
    expected_grad = head.fc.weight.grad.clone()
    head.zero_grad()
    loss, scores = script.sequence_loss(head, record, vocab_index, depth, 0.0, weights)
    loss.backward()
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(head.fc.weight.grad, expected_grad, atol=1e-5)
    assert [counted for _, counted in scores] == [length, length - 1, length - 2]


@pytest.mark.model
def test_the_shipped_head_drafts_trees_through_real_stages(tmp_path, smollm2_reference):
    """Three stage servers and the gateway with the trained head: trees verified on every stage,
    hidden states back from the last one, greedy tokens exactly generate's, alone and batched."""
    from pipelines import SMOLLM2, start_pipeline
    from test_pipeline_smollm2 import chat_request, reference_tokens
    from test_speculative import assert_batched_greedy

    gateway_args = ["--draft", "head", "--micro-batch", "4", "--max-in-flight", "1"]
    pipeline = start_pipeline(tmp_path, SMOLLM2, "smollm2", gateway_args=gateway_args)
    try:
        status, reply = pipeline.post("/chat/completions", chat_request("Explain how a bicycle works.", max_tokens=40))
        assert status == 200, reply
        assert reply["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, reply["prompt_token_ids"], 40)
        metrics = pipeline.gateway_metrics()
        generated = metrics["bloombee_gateway_generation_tokens_total"]
        assert metrics["bloombee_gateway_draft_accepted_total"] > 0
        assert metrics["bloombee_gateway_rounds_total"] < generated / 1.5  # trees gave several tokens a round

        prompts = ["Write a short poem about the sea.", "What is the capital of France?",
                   "Give me three tips for sleeping well.", "Describe a sunset."]  # fmt: skip
        assert_batched_greedy(pipeline, smollm2_reference, prompts)

        sampled = chat_request("Tell me a story about a dragon.", temperature=0.8, top_p=0.95, seed=11, max_tokens=20)
        first, again = pipeline.post("/chat/completions", sampled), pipeline.post("/chat/completions", sampled)
        assert first[0] == 200 and first[1]["choices"][0]["token_ids"] == again[1]["choices"][0]["token_ids"]
        # a penalised request drafts a chain (its logits processors judge one), still exactly generate's
        penalised = chat_request("List the planets.", max_tokens=16, presence_penalty=0.5)
        status, reply = pipeline.post("/chat/completions", penalised)
        assert status == 200 and len(reply["choices"][0]["token_ids"]) > 0
    finally:
        pipeline.backend.stop()
