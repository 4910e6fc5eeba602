"""Structured output where the token is chosen: a row's grammar masks the last stage's logits.

A grammar (a JSON schema, a regular expression, or a Lark grammar, which choices become) is
compiled by llguidance. Measured on this model's 49k-token vocabulary (``bench/grammar.py``):
llguidance compiles a request's JSON schema in ~13 ms where xgrammar takes ~1 s and outlines-core
~2 s (and outlines-core drops integer bounds), while all three mask a token in well under a
millisecond (outlines-core fastest, 0.02 ms; llguidance 0.1-0.3 ms), next to ~60 ms per token for
the pipeline. Schemas differ per request, so compile time decides; llguidance also has no
dependencies (xgrammar pins torch and triton).

The gateway checks a grammar before a request starts (``check``); the last stage keeps one
matcher per session, brought up to the row's completion so far (rolled back where that differs,
e.g. after a rejected draft), and masks each position of a verification window with the draft's
earlier tokens consumed: a drafted token the grammar forbids has
probability 0, so verification rejects it and speculation never leaves the grammar.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from bloombee_stage.wire.messages import Grammar

MAX_MATCHERS = 256  # sessions whose matcher a last stage keeps (least recently used dropped first)


class GrammarError(ValueError):
    """A grammar that does not compile, or a completion it does not allow."""


@functools.lru_cache(maxsize=64)
def compiled(grammar: Grammar) -> str:
    """llguidance's grammar for a row's grammar, or GrammarError saying what is wrong with it."""
    import llguidance

    build = {"json_schema": llguidance.LLMatcher.grammar_from_json_schema,
             "regex": llguidance.LLMatcher.grammar_from_regex,
             "lark": llguidance.LLMatcher.grammar_from_lark}[grammar.kind]  # fmt: skip
    try:
        text = build(grammar.text)
    except (ValueError, TypeError) as error:
        raise GrammarError(f"the {grammar.kind} does not compile: {error}") from None
    problem = llguidance.LLMatcher.validate_grammar(text)
    if problem:
        raise GrammarError(f"the {grammar.kind} does not compile: {problem.strip()[:500]}")
    return text


def check(grammar: Grammar) -> None:
    """Raise GrammarError for a grammar that would not compile on the last stage."""
    compiled(grammar)


class GrammarMasks:
    """The last stage's matchers, one per session with a grammar; used from its torch thread."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None
        self._matchers: OrderedDict[str, tuple[Grammar, Any, list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:  # built on first use: a second, and only last stages with grammars pay it
            import llguidance.hf
            from transformers import AutoTokenizer

            self._tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(self.tokenizer_dir))
        return self._tokenizer

    def forget(self, session: str) -> None:
        with self._lock:
            self._matchers.pop(session, None)

    def mask(self, logits: torch.Tensor, session: str, grammar: Grammar, completion: list[int],
             draft: list[int]) -> torch.Tensor:  # fmt: skip
        """``logits`` [len(draft) + 1, vocab] with every token the grammar forbids at its position set to -inf."""
        import llguidance
        import llguidance.torch

        with self._lock:
            matcher = self._matcher(session, grammar, completion)
            positions = logits.shape[0]
            bits = llguidance.torch.allocate_token_bitmask(positions, self._llg_tokenizer().vocab_size)
            bits.fill_(-1)  # positions after a forbidden draft token allow everything: verification stops before
            consumed = 0
            for position in range(positions):
                llguidance.torch.fill_next_token_bitmask(matcher, bits, position)
                if position == len(draft) or not _allows(bits[position], draft[position]):
                    break  # a forbidden draft token is not consumed: the matcher stays usable
                matcher.consume_token(draft[position])
                consumed += 1
            matcher.rollback(consumed)
        allowed = _unpacked(bits, logits.shape[-1])
        return logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))

    def _matcher(self, session: str, grammar: Grammar, completion: list[int]) -> Any:
        """The session's matcher, having consumed exactly ``completion``."""
        import llguidance

        held = self._matchers.pop(session, None)
        if held is None or held[0] != grammar:
            held = (grammar, llguidance.LLMatcher(self._llg_tokenizer(), compiled(grammar)), [])
        _, matcher, consumed = held
        common = 0
        while common < min(len(consumed), len(completion)) and consumed[common] == completion[common]:
            common += 1
        if common < len(consumed) and not matcher.rollback(len(consumed) - common):
            raise GrammarError("the completion could not be rolled back in its grammar")
        for token in completion[common:]:
            if not matcher.consume_token(token):
                raise GrammarError(f"the completion so far leaves its grammar at token {token}: "
                                   f"{matcher.get_error() or 'not allowed'}")  # fmt: skip
        self._matchers[session] = (grammar, matcher, list(completion))
        while len(self._matchers) > MAX_MATCHERS:
            self._matchers.popitem(last=False)
        return matcher


def _allows(row: torch.Tensor, token: int) -> bool:
    return token // 32 < row.shape[0] and bool((int(row[token // 32]) >> (token % 32)) & 1)


def _unpacked(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """llguidance's packed int32 bitmask [positions, words] as booleans [positions, vocab]."""
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:  # the model's head is wider than its tokenizer: padding ids are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed[:, :vocab]
