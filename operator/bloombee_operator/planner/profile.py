"""A model's planner profile: bytes per layer and per token, and the codecs a hop may use (pure)."""

from __future__ import annotations

from bloombee_contract.codec_cost import DEFAULT_PROFILES, RAW, CodecProfile

from bloombee_operator.planner.cost import ModelProfile

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def codec_candidates(dtype: str, compression: str = "off") -> tuple[CodecProfile, ...]:
    """What a hop may use under the resource's ``compression``: auto weighs raw and every codec."""
    measured = DEFAULT_PROFILES.get(dtype, {})
    if compression == "auto":
        return (RAW, *measured.values())
    if compression in measured:
        return (measured[compression],)
    return (RAW,)


def profile_from_config(config: dict, dtype: str = "float32", compression: str = "off") -> ModelProfile:
    """Bytes per layer and per token of a Llama-family model, from its config.json."""
    size = DTYPE_BYTES[dtype]
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * config["intermediate_size"]
    return ModelProfile(
        num_layers=config["num_hidden_layers"],
        weight_bytes_per_layer=(attention + mlp + 2 * hidden) * size,
        kv_bytes_per_token_per_layer=2 * kv_heads * head_dim * size,
        hidden_bytes_per_token=hidden * size,
        codecs=codec_candidates(dtype, compression),
    )
