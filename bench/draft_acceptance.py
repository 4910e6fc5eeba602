"""How many tokens a round the shipped draft head yields, by tree size, with no pipeline and no clock.

The model answers the bench's prompts greedily (transformers, float32); then each answer is
replayed round by round as the gateway runs it (``replay_rounds`` in scripts/train_draft_head.py,
which measures held-back answers the same way): the head has seen the target's hidden states up
to the last accepted token, drafts a chain or a tree (``HeadDrafter``, the gateway's code), the
nodes on the answer's path are kept, and the next round starts after the model's own next token.
Tokens per round count the first round (the prompt's, which yields one token), like
bench/speculative.py, whose rounds also pay for drafting and verification on this machine; this
bench isolates what the head and the tree's size give.

It also reports the older figure, drafting from every second answer position whatever came
before, which is higher: a round starts right after a rejected draft, where the text is harder
to guess than at an average position.

    python bench/draft_acceptance.py [--prompt-sets open-chat] [--new-tokens 64]

Writes bench/results/draft_acceptance.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from prompt_sets import GROUNDED, OPEN_CHAT, OPEN_ENDED  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    depth: int
    width: int
    size: int
    lookup: int = 0  # nodes of prompt lookup's continuation added to the tree, as the gateway does


SHAPES = [Shape("chain of 8", 8, 1, 8), Shape("chain of 4", 4, 1, 4)] + [
    Shape(f"tree of {size}", 8, 4, size) for size in (4, 8, 12, 16, 32, 64)
] + [Shape(f"tree of {size} + lookup branch", 8, 4, size, 4) for size in (12, 16)]


def parse_shape(text: str) -> Shape:
    """DEPTH:WIDTH:SIZE[:LOOKUP], e.g. 8:3:16 (width 1 is a chain) or 8:4:12:4 (plus up to 4 lookup nodes)."""
    try:
        numbers = [int(part) for part in text.split(":")]
        depth, width, size = numbers[:3]
        lookup = numbers[3] if len(numbers) == 4 else 0
        if len(numbers) not in (3, 4):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DEPTH:WIDTH:SIZE[:LOOKUP], e.g. 8:3:16") from None
    if min(depth, width, size) < 1 or lookup < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: depth, width and size must be at least 1, lookup at least 0")
    name = f"chain of {depth}" if width == 1 else f"tree of {size}, width {width}, depth {depth}"
    return Shape(name + (f" + {lookup} lookup" if lookup else ""), depth, width, size, lookup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-sets", nargs="+", default=["open-chat"],
                        choices=["grounded", "open-ended", "open-chat"])  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=64, help="longest answer (as bench/speculative.py)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the head's")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES,
                        help="drafts as DEPTH:WIDTH:SIZE, the first the baseline (default: chains of 8 and 4, "
                        "width-4 trees of 4 to 64)")
    parser.add_argument("--head", type=Path, default=None,
                        help="a trained head's directory (train_draft_head.py --out; default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "draft_acceptance.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bloombee_stage.gateway.draft_tree import HeadDrafter
    from bloombee_stage.model.draft_head import CARD_FILE, WEIGHTS_DIR, load_head
    from bloombee_stage.model.loading import prepare_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("train_draft_head", ROOT / "scripts" / "train_draft_head.py")
    training = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(training)  # its answer and feature extraction, so both see the same data
    model_dir = prepare_model(training.SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head = load_head(model.config, model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach(),
                     *([args.head] if args.head else []))  # fmt: skip
    drafter = HeadDrafter(head.compute_in(getattr(torch, args.dtype)))

    every_set = {"grounded": GROUNDED, "open-ended": OPEN_ENDED, "open-chat": OPEN_CHAT}
    results = []
    for set_name in args.prompt_sets:
        texts = every_set[set_name]
        records = training.extract_features(model, training.generate_answers(model, tokenizer, texts, args.new_tokens,
                                                                             len(texts)), len(texts))  # fmt: skip
        training.mark_prompt_lengths(tokenizer, texts, records)
        for shape in args.shapes:
            started = time.perf_counter()
            rounds = produced = drafted = 0
            for record in records:
                one = training.replay_rounds(drafter, record, shape.depth, shape.width, shape.size, shape.lookup)
                rounds, produced, drafted = rounds + one[0], produced + one[1], drafted + one[2]
            anywhere = [count for record in records
                        for count in training.accepted_from_positions(drafter, record, shape.depth, shape.width,
                                                                      shape.size, stride=2)]  # fmt: skip
            results.append({"prompts": set_name, "draft": shape.name, "depth": shape.depth, "width": shape.width,
                            "size": shape.size, "lookup": shape.lookup, "answers": len(records), "tokens": produced,
                            "rounds": rounds,
                            "tokens_per_round": produced / rounds, "drafted_per_round": drafted / rounds,
                            "tokens_per_round_from_every_second_position": 1 + sum(anywhere) / len(anywhere),
                            "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
            print(f"  {set_name} {shape.name}: {produced / rounds:.2f} tokens a round", file=sys.stderr, flush=True)
    for row in results:  # the baseline: the first shape (by default the chain of 8, the gateway's longest), same run
        first = next(other for other in results if other["prompts"] == row["prompts"])
        row["vs_first"] = row["tokens_per_round"] / first["tokens_per_round"]

    card = (args.head or WEIGHTS_DIR) / CARD_FILE
    report = {"benchmark": "draft_acceptance", "model": training.SMOLLM2,
        "head": json.loads(card.read_text())["sha256"],
        "head_dtype": args.dtype, "new_tokens": args.new_tokens,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "results": results}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"| prompts | draft | tokens/round | drafted/round | vs {args.shapes[0].name} | from every 2nd position |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['prompts']} | {row['draft']} | {row['tokens_per_round']:.2f} | {row['drafted_per_round']:.1f} | "
              f"{row['vs_first']:.2f}x | {row['tokens_per_round_from_every_second_position']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
