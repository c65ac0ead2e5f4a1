"""DogeConfig: transformers' Doge fields, validated with errors that name the field.

It accepts every field of transformers' built-in `DogeConfig` (same config.json), the RoPE settings as
`rope_parameters` or in the older `rope_theta` / `rope_scaling` spelling, and an optional `head_dim`.
`validate_doge_config` is shared with the vLLM model, which receives transformers' own config class.
"""

import math

from transformers import DogeConfig as _TransformersDogeConfig

# RoPE types transformers implements for Doge (ROPE_INIT_FUNCTIONS plus the default).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


class DogeConfigError(ValueError):
    """A config.json field holds a value Doge cannot run with."""


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def validate_doge_config(config) -> None:
    """Raise DogeConfigError naming the first field that is out of range."""

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise DogeConfigError(f"Doge config: `{field}` = {getattr(config, field, None)!r}; expected {expected}")

    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(config, field, None)
        need(isinstance(value, int) and value >= 1, field, "a positive integer")
    kv_heads = config.num_key_value_heads
    need(isinstance(kv_heads, int) and kv_heads >= 1, "num_key_value_heads", "a positive integer")
    need(
        config.num_attention_heads % kv_heads == 0,
        "num_key_value_heads",
        f"a divisor of num_attention_heads ({config.num_attention_heads})",
    )
    if getattr(config, "head_dim", None) is None:
        need(
            config.hidden_size % config.num_attention_heads == 0,
            "hidden_size",
            f"a multiple of num_attention_heads ({config.num_attention_heads}), or an explicit `head_dim`",
        )
    else:
        need(isinstance(config.head_dim, int) and config.head_dim >= 2, "head_dim", "an integer >= 2")
    need(head_dim_of(config) % 2 == 0, "head_dim", "an even head size (RoPE rotates pairs)")
    keep = config.keep_window_size
    need(isinstance(keep, int) and keep >= 1, "keep_window_size", "an integer >= 1")
    window = getattr(config, "sliding_window", None)
    need(window is None or (isinstance(window, int) and window >= 1), "sliding_window", "null or an integer >= 1")
    need(config.hidden_act in ("silu", "gelu", "relu", "gelu_pytorch_tanh"), "hidden_act", "silu, gelu or relu")
    if config.is_moe:
        experts = config.num_experts
        need(isinstance(experts, int) and experts >= 1, "num_experts", "a positive integer")
        need(math.isqrt(experts) ** 2 == experts, "num_experts", "a perfect square (product keys: √E × √E)")
        top_k = config.num_experts_per_tok
        need(
            isinstance(top_k, int) and 1 <= top_k <= experts,
            "num_experts_per_tok",
            f"an integer in [1, num_experts={experts}]",
        )
        need(
            top_k <= math.isqrt(experts) ** 2,
            "num_experts_per_tok",
            "at most num_experts (candidates are the √E × √E product-key grid)",
        )
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in SUPPORTED_ROPE_TYPES, "rope_parameters", f"rope_type in {SUPPORTED_ROPE_TYPES}, got {rope_type!r}")


class DogeConfig(_TransformersDogeConfig):
    """transformers' Doge configuration plus validation at construction."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        validate_doge_config(self)
