"""A model's shape (layers, widths) without torch: read from config.json or from GGUF metadata.

The operator plans spans before any stage runs and its image has no torch, so it reads only
metadata: a Hugging Face directory's ``config.json``, or the header fields of a GGUF file
(``<arch>.block_count``, ``<arch>.embedding_length``) with the ``gguf`` reader.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass

from bloombee_contract.model_source import ModelSourceError, resolve_source


@dataclass(frozen=True)
class ModelShape:
    """What the control plane must know of a model (read from its config.json or GGUF header).

    The attention and MLP sizes give the planner bytes per layer; without them (0) the planner
    assumes a standard Llama layer of ``hidden_size``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0  # 0: unknown

    @classmethod
    def from_config(cls, config: Mapping) -> ModelShape:
        heads = int(config.get("num_attention_heads", 0))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        return cls(int(config["num_hidden_layers"]), int(config["hidden_size"]), heads, kv_heads,
                   int(config.get("intermediate_size", 0)), int(config.get("vocab_size") or 0))  # fmt: skip

    def config(self) -> dict[str, int]:
        """The config.json fields the planner's model profile reads."""
        heads = self.num_attention_heads or max(1, self.hidden_size // 64)
        return {"num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size, "num_attention_heads": heads,
                "num_key_value_heads": self.num_key_value_heads or heads,
                "intermediate_size": self.intermediate_size or 4 * self.hidden_size}  # fmt: skip



class ModelShapeError(ValueError):
    """The model cannot be found or read where the operator runs."""


@functools.lru_cache(maxsize=64)
def model_shape(source: str) -> ModelShape:
    """Read once per source and process: the operator's timer asks again every few seconds, and
    a GGUF header walk takes seconds."""
    try:
        found = resolve_source(source)
    except ModelSourceError as error:
        raise ModelShapeError(str(error)) from None
    if found.kind != "gguf":
        config = json.loads((found.hf_dir / "config.json").read_text())
        return ModelShape.from_config(config)
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelShapeError(f"model source {source!r}: reading GGUF metadata needs the `gguf` package") from None
    reader = GGUFReader(found.path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    fields = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
              "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
              "intermediate_size": "feed_forward_length"}  # fmt: skip
    try:
        config = {key: int(reader.fields[f"{architecture}.{name}"].parts[-1][0]) for key, name in fields.items()}
    except KeyError as missing:
        raise ModelShapeError(f"model source {source!r}: GGUF metadata lacks {missing}") from None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config["vocab_size"] = len(tokens.data) if tokens is not None else 0
    return ModelShape.from_config(config)
