"""The benchmarks' chat prompts, in one place: bench/speculative.py measures drafts on them and
scripts/train_draft_head.py keeps its training data away from them (``near_any``)."""

from __future__ import annotations

import itertools
import re

# Chat prompts of two kinds: answers grounded in the prompt's text (rewrite, fix, extract), where
# the answer repeats the prompt, and open-ended ones, where it does not.
GROUNDED = [
    "Rewrite this paragraph with British spelling, changing nothing else: The color of the theater's curtain "
    "was gray, and the organization's catalog listed it as a favorite of the neighborhood.",
    "Correct the spelling mistakes in this sentence: The quick brwon fox jumpd over the lazy dgo while the "
    "farmer wachted from the barn.",
    "Extract every sentence that mentions water from this text and list them: The river flows north. Bread is "
    "baked at dawn. Water from the river feeds the mill. The miller sleeps late. Rain fills the water tank.",
]
OPEN_ENDED = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
]
# Open-ended chat that the draft head never saw: written apart from its templated training prompts
# (none of these topics or forms), and scripts/train_draft_head.py drops every training prompt
# near any prompt here (``near_any``), including those the model wrote itself.
OPEN_CHAT = [
    "What should I pack for a weekend camping trip?",
    "How can I get better at public speaking?",
    "Write a thank-you note to a neighbour who watered my plants while I was away.",
    "What are some good habits for working from home?",
    "Suggest a simple vegetarian dinner and explain how to cook it.",
    "Why do cats purr?",
]

STOPWORDS = frozenset((
    "a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "at", "for", "with", "from", "by", "about",
    "into", "as", "is", "are", "was", "were", "be", "been", "am", "do", "does", "did", "i", "me", "my",
    "you", "your", "we", "our", "it", "its", "this", "that", "these", "those", "what", "which", "who", "how",
    "why", "when", "where", "can", "could", "should", "would", "will", "some", "any", "all", "more", "most",
    "very", "so", "just", "not", "no", "please", "tell", "give",
    # the request's form, not its topic: "write a short story about X" may be learnt, X may not
    "write", "short", "explain", "describe", "suggest", "list", "get", "make",
))


def content_words(text: str) -> list[str]:
    return [word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in STOPWORDS]


def near_any(text: str, prompts: list[str]) -> bool:
    """Whether ``text`` shares two consecutive content words (stopwords skipped) with any of
    ``prompts``: "tips to improve my public speaking" is near "How can I get better at public
    speaking?". Short prompts have too few words for the usual long n-gram overlap rules."""
    words = content_words(text)
    pairs = set(itertools.pairwise(words))
    for prompt in prompts:
        theirs = content_words(prompt)
        if pairs & set(itertools.pairwise(theirs)):
            return True
    return False


BENCHMARK_PROMPTS = GROUNDED + OPEN_ENDED + OPEN_CHAT
