"""A trained draft head (EAGLE-style) for speculative decoding at the gateway.

The head predicts the target model's next final hidden state from the current one and the
token that follows it: ``fc([embed(x[t+1]); f[t]]) -> one decoder layer -> f'[t+1]``. Its
logits are ``f'[t+1]`` times the target's own LM head, restricted to a draft vocabulary (the
tokens the model itself writes most often), so a draft step costs one small layer plus a
fraction of the head. ``f`` is the hidden state the target's LM head reads (after the final
norm), which the last stage returns for the positions the head needs.

The head's own weights (the fc and the layer, ~4 M parameters) ship with the project with a
checksum; the embedding and LM head are the target's and are not stored twice. The recipe that
reproduces the weights is ``scripts/train_draft_head.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "draft-head.safetensors"
CARD_FILE = "draft-head.json"


class DraftHeadError(ValueError):
    """The draft head's files are missing, corrupt, or made for another model."""


@dataclass(frozen=True)
class HeadCard:
    """What the shipped weights are: the model they fit, their checksum, and how they were made."""

    model_fingerprint: str  # sha256 of the target's embedding (the head reads it and its LM head)
    sha256: str  # of the weights file
    vocab_size: int  # draft vocabulary
    recipe: dict  # the training script's arguments and the data it saw
    heldout: dict  # acceptance measured on prompts held back from training


def embedding_fingerprint(embedding: torch.Tensor) -> str:
    """A short hash of the target's embedding, to refuse a head trained for another model."""
    sample = embedding[:: max(1, embedding.shape[0] // 256)].to(torch.float32).contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def head_config(target: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(target)
    config.num_hidden_layers = 1
    config.layer_types = None
    config._attn_implementation = "sdpa"
    return config


class DraftHead(torch.nn.Module):
    """The head's trainable part plus the target's embedding and (draft-vocabulary) LM head, frozen."""

    def __init__(self, target: PretrainedConfig, embedding: torch.Tensor, lm_head: torch.Tensor,
                 vocab_ids: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        config = head_config(target)
        hidden = int(config.hidden_size)
        self.config = config
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.register_buffer("embedding", embedding.detach().to(torch.float32), persistent=False)
        self.register_buffer("vocab_ids", vocab_ids.to(torch.int64), persistent=True)
        # [hidden, draft vocabulary], contiguous: a few rows times it is a plain product (much faster on CPU
        # than the same rows against the transposed [vocabulary, hidden] block)
        columns = lm_head.detach().to(torch.float32)[self.vocab_ids].T.contiguous()
        self.register_buffer("head_columns", columns, persistent=False)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None, cache: DynamicCache | None = None) -> torch.Tensor:  # fmt: skip
        """features [B, T, H] (f[t]) and tokens [B, T] (x[t+1]) -> predicted f[t+1], [B, T, H].

        ``mask``: bool [B, 1, T, past + T] (True: may attend), or None for plain causal attention
        over an empty past (training)."""
        inputs = self.fc(torch.cat([self.embedding[tokens], features.to(self.dtype)], dim=-1))
        rotary = self.rotary(inputs, position_ids=position_ids)
        if mask is None:
            width = inputs.shape[1]
            mask = torch.ones(width, width, dtype=torch.bool, device=inputs.device).tril().view(1, 1, width, width)
        return self.layer(inputs, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                          cache=cache, use_cache=cache is not None)  # fmt: skip

    def draft_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (index i is token ``vocab_ids[i]``), float32."""
        return (predicted.to(self.dtype) @ self.head_columns).float()

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def compute_in(self, dtype: torch.dtype) -> DraftHead:
        """Run the head's matrices in ``dtype``; the rotary tables stay float32 (positions need it)."""
        self.fc.to(dtype)
        self.layer.to(dtype)
        self.embedding = self.embedding.to(dtype)
        self.head_columns = self.head_columns.to(dtype)
        return self

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)


def save_head(head: DraftHead, directory: Path, card: dict) -> HeadCard:
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {name: tensor.detach().contiguous() for name, tensor in head.state_dict().items()}
    state = {name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
             for name, tensor in state.items()}  # fmt: skip
    save_file(state, weights)
    full = HeadCard(model_fingerprint=card["model_fingerprint"], sha256=file_sha256(weights),
                    vocab_size=int(head.vocab_ids.numel()), recipe=card["recipe"], heldout=card["heldout"])  # fmt: skip
    (directory / CARD_FILE).write_text(json.dumps(full.__dict__, indent=2) + "\n")
    return full


def load_head(target: PretrainedConfig, embedding: torch.Tensor, lm_head: torch.Tensor,
              directory: Path = WEIGHTS_DIR) -> DraftHead:  # fmt: skip
    """The shipped head for this target, checked: the file's checksum and the target's embedding."""
    weights, card_path = directory / WEIGHTS_FILE, directory / CARD_FILE
    if not weights.is_file() or not card_path.is_file():
        raise DraftHeadError(f"no trained draft head in {directory} (train one: python scripts/train_draft_head.py)")
    card = HeadCard(**json.loads(card_path.read_text()))
    actual = file_sha256(weights)
    if actual != card.sha256:
        raise DraftHeadError(f"{weights}: checksum {actual[:12]}... is not the card's {card.sha256[:12]}... "
                             "(a corrupt or replaced file)")  # fmt: skip
    fingerprint = embedding_fingerprint(embedding)
    if fingerprint != card.model_fingerprint:
        raise DraftHeadError(f"{weights} was trained for another model (embedding {card.model_fingerprint}, "
                             f"this model's {fingerprint})")  # fmt: skip
    state = load_file(weights)
    head = DraftHead(target, embedding, lm_head, state["vocab_ids"])
    head.load_state_dict({name: tensor.to(torch.float32) if tensor.is_floating_point() else tensor
                          for name, tensor in state.items()})  # fmt: skip
    return head.eval()


def fastest_dtype(head: DraftHead, rows: int = 4, repeats: int = 5) -> torch.dtype:
    """float32 or bfloat16, whichever multiplies ``rows`` tree nodes through the head's matrices
    faster here (they are nearly all of a head call's time).

    Drafts only propose tokens (the pipeline verifies them), so the head's precision changes its
    speed, never the output. bfloat16 halves the bytes every call reads (on a CPU the head is bound
    by memory) and is fast where the CPU has bfloat16 dot products (AVX512-BF16, AMX) but far
    slower than float32 where it is emulated: hence a measurement, not a rule.
    """
    linears = [module.weight.T for module in head.modules() if isinstance(module, torch.nn.Linear)]
    matrices = [head.head_columns, *linears]
    timings: dict[torch.dtype, float] = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            converted = [matrix.to(dtype).contiguous() for matrix in matrices]
            inputs = [torch.ones(rows, matrix.shape[0], dtype=dtype) for matrix in converted]
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                for row_block, matrix in zip(inputs, converted, strict=True):
                    row_block @ matrix
                seconds.append(time.perf_counter() - started)
            timings[dtype] = sorted(seconds)[repeats // 2]
    return min(timings, key=lambda dtype: timings[dtype])


def load_for_model(model_dir: Path, directory: Path = WEIGHTS_DIR) -> DraftHead:
    """The shipped head for the model in ``model_dir`` (a HF directory), with the model's own
    embedding and LM head read from its checkpoint."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in handle.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                    tensors[name] = handle.get_tensor(name)
    if "model.embed_tokens.weight" not in tensors:
        raise DraftHeadError(f"{model_dir}: no model.embed_tokens.weight for the draft head to read tokens with")
    embedding = tensors["model.embed_tokens.weight"].to(torch.float32)
    lm_head = tensors.get("lm_head.weight", embedding).to(torch.float32)
    return load_head(config, embedding, lm_head, directory)
