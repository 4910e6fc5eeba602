"""Streaming text from tokens: pieces add up to the tokenizer's own decoding, cut at stop strings."""

from __future__ import annotations

import pytest
from bloombee_stage.gateway.generation import TextAssembler

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "Emoji 🎉🚀 and accents: café, naïve, Zürich; CJK: 東京タワー。",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(3))",
    "  leading spaces,\ttabs\tand   runs of   spaces  ",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def stream(tokenizer, token_ids: list[int], stops: list[str]) -> tuple[list[str], TextAssembler]:
    assembler = TextAssembler(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stops)
    pieces = []
    for token in token_ids:
        pieces.append(assembler.push(token))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return pieces, assembler


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decoding(tokenizer, text):
    token_ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # a special token decodes to nothing
    pieces, _ = stream(tokenizer, token_ids, [])
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)  # never half of a multi-byte character


@pytest.mark.parametrize(("text", "stop"), [
    (TEXTS[0], "Eiffel"),  # across tokens
    (TEXTS[1], "タワー"),  # multi-byte, inside a word
    (TEXTS[2], "\n\n"),
    (TEXTS[0], "London"),  # never appears
])  # fmt: skip
def test_text_stops_before_the_first_stop_string_and_never_shows_part_of_it(tokenizer, text, stop):
    token_ids = tokenizer(text)["input_ids"]
    pieces, assembler = stream(tokenizer, token_ids, ["zzz", stop])
    whole = tokenizer.decode(token_ids, skip_special_tokens=True)
    expected = whole[: whole.find(stop)] if stop in whole else whole
    assert "".join(pieces) == expected
    assert assembler.stopped is (stop in whole)
    shown = ""
    for piece in pieces:  # at no point did the stream end inside a stop string
        shown += piece
        assert stop not in shown


def test_a_long_answer_decodes_short_windows(tokenizer):
    calls: list[int] = []

    def decode(ids: list[int]) -> str:
        calls.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=True)

    token_ids = tokenizer(" ".join(["word"] * 2000))["input_ids"]
    assembler = TextAssembler(decode, [])
    text = "".join(assembler.push(token) for token in token_ids) + assembler.finish()
    assert text == tokenizer.decode(token_ids)
    assert max(calls) <= 4  # linear work: no decoding of the whole answer per token
