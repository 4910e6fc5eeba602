"""Drafting with the trained head (``bloombee_stage.model.draft_head``): chains and token trees.

The head keeps a KV cache per generation over pairs (f[t], x[t+1]): the target's final hidden
state at t, which the last stage returns for accepted positions, and the token after it. The
last pair's output predicts f[n-1] and so the token at n, the first draft.

A tree (EAGLE-2): from the root, the ``width`` most likely tokens; at every further depth the
``width`` nodes of the newest layer with the highest path probability (product of the head's
probabilities along the path) are expanded, each into its ``width`` most likely children, in one
head call per depth; at the end the ``size`` nodes of highest path probability over all depths
are kept (a node's path probability is at most its parent's, so kept nodes' ancestors are kept).
The result is topologically ordered: ``parents[i] < i``, -1 for a child of the last accepted
token. The pipeline verifies the whole tree in one pass (``bloombee_stage.stage.verify``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from bloombee_stage.model.draft_head import DraftHead
from bloombee_stage.model.span import copy_layer_prefix, truncate_cache


@dataclass
class HeadState:
    """One generation's head cache: ``length`` observed pairs, and the last pair's output."""

    cache: DynamicCache
    length: int = 0
    last_out: torch.Tensor | None = None  # [H]: predicted f for the position after the last observed pair
    start: int = 0  # the position of the first observed pair's hidden state


@dataclass
class TreeDraft:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index into tokens; -1: the last accepted token
    path_probs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    calls: int = 0  # head calls it took

    def top(self, size: int) -> TreeDraft:
        """The ``size`` nodes of highest path probability (and any ancestor a tie left out),
        ordered by depth then probability, parents re-indexed."""
        ranked = sorted(range(len(self.tokens)), key=lambda node: (-self.path_probs[node], node))[: max(0, size)]
        kept = set(ranked)
        for node in ranked:
            parent = self.parents[node]
            while parent >= 0 and parent not in kept:
                kept.add(parent)
                parent = self.parents[parent]
        depths = {node: self.depth(node) for node in kept}
        ordered = sorted(kept, key=lambda node: (depths[node], -self.path_probs[node], node))
        index = {node: new for new, node in enumerate(ordered)}
        return TreeDraft([self.tokens[node] for node in ordered],
                         [index[self.parents[node]] if self.parents[node] >= 0 else -1 for node in ordered],
                         [self.path_probs[node] for node in ordered], self.seconds, self.calls)  # fmt: skip

    def with_branch(self, chain: list[int], most: int) -> TreeDraft:
        """This tree with ``chain`` (another drafter's guess, e.g. prompt lookup) as a path from
        the root: nodes already on that path are shared, and at most ``most`` new ones are
        appended, after every node of this tree (so ``parents[i] < i`` holds and the head's nodes
        keep their indices). Appended nodes get path probability 0: the head did not predict them."""
        tokens, parents, probs = list(self.tokens), list(self.parents), list(self.path_probs)
        parent, added = -1, 0
        for token in chain:
            shared = next((node for node, up in enumerate(parents) if up == parent and tokens[node] == token), None)
            if shared is None:
                if added >= most:
                    break
                tokens.append(token)
                parents.append(parent)
                probs.append(0.0)
                shared, added = len(tokens) - 1, added + 1
            parent = shared
        return TreeDraft(tokens, parents, probs, self.seconds, self.calls)

    def depth(self, index: int) -> int:
        depth = 1
        while self.parents[index] >= 0:
            index = self.parents[index]
            depth += 1
        return depth


class HeadDrafter:
    """Draft chains and trees with the head; calls run on the gateway's torch thread."""

    def __init__(self, head: DraftHead) -> None:
        self.head = head

    def new_state(self) -> HeadState:
        return HeadState(self.head.new_cache())

    @torch.inference_mode()
    def observe(self, state: HeadState, features: torch.Tensor, tokens: list[int], position: int | None = None) -> None:
        """Append pairs (features[i], tokens[i]): the target's hidden state at a position and the
        token the model chose after it; ``position``: the first pair's position, which must follow
        the pairs already observed. Drafted positions from the last round are dropped first."""
        truncate_cache(state.cache, state.length)
        count = len(tokens)
        if count == 0:
            return
        if features.shape[0] != count:
            raise ValueError(f"{features.shape[0]} hidden states for {count} tokens")
        if position is not None:
            if state.length == 0:
                state.start = position
            elif position != state.start + state.length:
                raise ValueError(f"hidden states from position {position}; the head has seen "
                                 f"{state.start}..{state.start + state.length - 1}")  # fmt: skip
        positions = torch.arange(state.length + 1, state.length + 1 + count).unsqueeze(0)
        mask = torch.ones(count, state.length + count, dtype=torch.bool)
        mask[:, state.length :] = torch.ones(count, count, dtype=torch.bool).tril()
        out = self.head(features.unsqueeze(0), torch.tensor([tokens]), positions,
                        mask.view(1, 1, count, -1), state.cache)  # fmt: skip
        state.length += count
        state.last_out = out[0, -1]

    @torch.inference_mode()
    def prefix(self, state: HeadState, end: int) -> HeadState | None:
        """A copy of ``state`` holding only its pairs at positions before ``end``, for a generation
        that forks a finished one's first ``end`` positions (prefixes.py) and so never sees their
        hidden states; None if ``state`` did not observe all of them. The copy drafts once it has
        observed the fork's first computed position."""
        count = end - state.start
        if count < 1 or count > state.length:
            return None
        copy = HeadState(self.head.new_cache(), length=count, start=state.start)
        for held, layer in zip(state.cache.layers, copy.cache.layers, strict=True):
            copy_layer_prefix(held, layer, count)
        return copy

    def _log_probs(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head.draft_logits(outputs), dim=-1)

    @torch.inference_mode()
    def chain(self, state: HeadState, depth: int) -> list[int]:
        """The greedy chain of ``depth`` drafts (a tree of width 1)."""
        return self.tree(state, depth=depth, width=1, size=depth).tokens

    @torch.inference_mode()
    def tree(self, state: HeadState, depth: int, width: int, size: int, level_gain: float = 0.0) -> TreeDraft:
        """A tree of at most ``depth`` levels; a level is expanded only while the likeliest
        ``width`` nodes of the newest one together reach ``level_gain`` path probability (what one
        more head call must be worth, ``TreeBudget.level_gain``)."""
        started = time.perf_counter()
        if state.last_out is None or depth < 1 or size < 1:
            return TreeDraft()
        truncate_cache(state.cache, state.length)
        vocab = self.head.vocab_ids
        # Nodes processed by the head, in cache order after the observed pairs.
        node_tokens: list[int] = []
        node_parents: list[int] = []
        node_scores: list[float] = []
        node_depths: list[int] = []
        top = self._log_probs(state.last_out.unsqueeze(0))[0].topk(width)
        layer = []  # the newest depth's nodes
        for logp, slot in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            node_tokens.append(int(vocab[slot]))
            node_parents.append(-1)
            node_scores.append(logp)
            node_depths.append(1)
            layer.append(len(node_tokens) - 1)
        parent_out = {-1: state.last_out}
        processed: list[int] = []  # node indices in the order they entered the head's cache
        calls = 0
        for level in range(1, depth):
            expand = sorted(layer, key=lambda node: -node_scores[node])[:width]
            if not expand or sum(math.exp(node_scores[node]) for node in expand) < level_gain:
                break
            calls += 1
            outputs = self._run_nodes(state, expand, node_tokens, node_parents, node_depths, parent_out, processed)
            logps = self._log_probs(outputs)
            candidates = []
            for row, node in enumerate(expand):
                parent_out[node] = outputs[row]
                best = logps[row].topk(width)
                for logp, slot in zip(best.values.tolist(), best.indices.tolist(), strict=True):
                    candidates.append((node_scores[node] + logp, node, int(vocab[slot])))
            candidates.sort(key=lambda item: -item[0])
            layer = []
            for score, parent, token in candidates[: width * width]:
                node_tokens.append(token)
                node_parents.append(parent)
                node_scores.append(score)
                node_depths.append(level + 1)
                layer.append(len(node_tokens) - 1)
        everything = TreeDraft(node_tokens, node_parents, [math.exp(score) for score in node_scores])
        draft = everything.top(size)
        draft.seconds, draft.calls = time.perf_counter() - started, calls
        return draft

    def _run_nodes(self, state: HeadState, nodes: list[int], tokens: list[int], parents: list[int],
                   depths: list[int], parent_out: dict[int, torch.Tensor],
                   processed: list[int]) -> torch.Tensor:  # fmt: skip
        """Run the head on tree nodes (each sees the observed pairs and its processed ancestors)."""
        past = state.length + len(processed)
        count = len(nodes)
        mask = torch.zeros(count, past + count, dtype=torch.bool)
        mask[:, : state.length] = True
        slot = {node: state.length + index for index, node in enumerate(processed)}
        for row, node in enumerate(nodes):
            mask[row, past + row] = True
            ancestor = parents[node]
            while ancestor >= 0:
                mask[row, slot[ancestor]] = True
                ancestor = parents[ancestor]
        features = torch.stack([parent_out[parents[node]] for node in nodes]).unsqueeze(0)
        positions = torch.tensor([[state.length + depths[node] for node in nodes]])
        out = self.head(features, torch.tensor([[tokens[node] for node in nodes]]), positions,
                        mask.view(1, 1, count, -1), state.cache)  # fmt: skip
        processed.extend(nodes)
        return out[0]


CARRIED_PREDICTED = 8.0  # expected tokens of calibration history a new generation inherits


@dataclass
class TreeBudget:
    """How many of a tree's nodes to send, per round: the size of most expected tokens per second.

    The head's path probability of a node estimates the chance the pipeline accepts it (EAGLE-2);
    ``calibration`` (accepted tokens over the predicted sum, a running ratio) corrects the head's
    over- or under-confidence. A round of n nodes is expected to yield 1 + c x (sum of the n
    likeliest path probabilities) tokens and to cost ``round_s`` + n x ``node_s`` (+ the draft's
    own time), both fitted on the latest rounds (round time against nodes sent). A generation
    starts from the last finished one's estimates (``carried``): the pipeline and the head are
    the same, and a 64-token answer has too few rounds to fit them from priors alone. Under
    load a node costs every row in the step, so its cost counts once per generation running:
    speculation backs off as the pipeline fills. ``timed=False`` keeps the costs at their priors
    (a seeded sampled request must draw the same tokens when repeated; see ``DraftLength``).
    """

    maximum: int = 64
    timed: bool = True
    calibration: float = 0.8
    round_s: float = 0.1
    node_s: float = 0.002
    samples: list[tuple[int, float]] = field(default_factory=list)
    predicted: float = 0.0
    accepted: float = 0.0
    call_s: float = 0.005  # one head call (a tree level), measured
    tokens: float = 1.5  # per round, running

    def carried(self) -> TreeBudget:
        """A new generation's budget, starting from this one's measurements; its calibration keeps
        at most CARRIED_PREDICTED tokens' worth of history, so it still follows the new text."""
        scale = min(1.0, CARRIED_PREDICTED / self.predicted) if self.predicted > 0 else 1.0
        return replace(self, samples=list(self.samples), predicted=self.predicted * scale,
                       accepted=self.accepted * scale)  # fmt: skip

    def level_gain(self) -> float:
        """The path probability one more tree level must add to pay for its head call: a level
        adding g expected tokens for c seconds raises tokens per second while g / c beats the
        rate so far, tokens / round_s."""
        return self.call_s * self.tokens / (self.round_s * self.calibration)

    def size(self, path_probs: list[float], load: int = 1, draft_s: float = 0.0) -> int:
        ranked = sorted(path_probs, reverse=True)[: self.maximum]
        if not self.timed:  # the size may depend on the tokens only (a seeded draw must repeat)
            load, draft_s = 1, 0.0
        node_cost = self.node_s * max(1, load)
        best, best_rate, expected = 0, 1.0 / (self.round_s + draft_s), 1.0
        for count, prob in enumerate(ranked, start=1):
            expected += self.calibration * prob
            rate = expected / (self.round_s + draft_s + count * node_cost)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = count, rate
        return best

    def update(self, predicted: float, accepted: int, nodes: int, round_s: float | None, calls: int = 0,
               draft_s: float = 0.0) -> None:  # fmt: skip
        self.tokens = 0.8 * self.tokens + 0.2 * (accepted + 1)
        if calls and self.timed:
            self.call_s = 0.8 * self.call_s + 0.2 * draft_s / (calls + 1)
        if nodes:
            self.predicted += predicted
            self.accepted += accepted
            if self.predicted > 0.5:
                self.calibration = min(1.5, max(0.1, self.accepted / self.predicted))
        if round_s is None or not self.timed:
            return
        self.samples = [*self.samples[-31:], (nodes, round_s)]
        counts = [n for n, _ in self.samples]
        if len(set(counts)) < 2:
            self.round_s = 0.7 * self.round_s + 0.3 * (round_s - nodes * self.node_s)
            return
        mean_n = sum(counts) / len(counts)
        mean_t = sum(t for _, t in self.samples) / len(self.samples)
        spread = sum((n - mean_n) ** 2 for n in counts)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in self.samples) / spread
        self.node_s = max(0.0002, slope)
        self.round_s = max(0.001, mean_t - self.node_s * mean_n)
