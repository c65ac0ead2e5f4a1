"""What a Doge checkpoint's config.json means: one frozen description, one validation, for both formats.

    describe(fields, tensor_names=None) -> DogeSpec

Two formats exist (design.md §5):
- the transformers format (`model_type: doge`, transformers' built-in DogeConfig): one mask row (A,
  dt_proj) per kv head, q/k norm, a top-k keep window past `keep_window_size` keys;
- the legacy SmallDoge format (checkpoints published with their own remote code): one mask row per
  attention head, no q/k norm, `hidden_bias`, dynamic-NTK RoPE in `rope_scaling`, `tie_word_embeddings`
  absent meaning tied, and no keep-window top-k (`keep_window_size` bounds the context instead).

The reference model (doge_hf) and the vLLM model (vllm_doge) both build from a DogeSpec; this module
imports no model code (transformers only for its DogeConfig, the transformers format's defaults).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass


class DogeConfigError(ValueError):
    """A config.json field (or the checkpoint's tensor names) that Doge cannot be run exactly with."""


# Activations both implementations compute exactly (transformers' names).
ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")
# RoPE types transformers implements for Doge (its ROPE_INIT_FUNCTIONS plus the default).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# The legacy code's RoPE: plain, or its dynamic NTK (the only types the published checkpoints use).
LEGACY_ROPE_TYPES = ("default", "dynamic")
# The legacy code gathers expert ids a·K + b; a config naming another variant is refused, not guessed.
LEGACY_EXPERT_INDEX = ("gather",)
# config.json fields only the legacy format has.
LEGACY_ONLY_FIELDS = (
    "dynamic_mask_ratio",
    "hidden_bias",
    "num_cdmmoe_experts",
    "num_cdmmoe_heads",
    "num_cdmmoe_experts_per_head",
    "num_cdmoe_experts",
    "expert_retrieval_size",
)
# The legacy code's defaults for fields its config.json may leave out.
LEGACY_DEFAULTS = dict(
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=2048,
    num_hidden_layers=32,
    hidden_bias=False,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rope_scaling=None,
    num_attention_heads=8,
    num_key_value_heads=None,
    head_dim=None,
    dynamic_mask_ratio=0.0,
    keep_window_size=None,
    is_moe=False,
    num_experts=2048,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    expert_index="gather",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


@dataclass(frozen=True)
class Experts:
    """CDMoE's product-key memory: `count` experts on a `keys` × `keys` grid, `top_k` per token."""

    count: int
    keys: int
    top_k: int
    norm_topk_prob: bool
    router_bias: bool


@dataclass(frozen=True)
class DogeSpec:
    """Everything about a Doge model that its config.json (and, for the legacy format, its tensor names)
    decides. Dimensions are the whole model's (unsharded)."""

    legacy: bool
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    masks_per_kv_head: int  # 1, or G = heads / kv heads when the mask is per attention head (legacy)
    qk_norm: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    rms_norm_eps: float
    keep_window: int | None  # past this many keys a query keeps its top keys by bias (None: never)
    context_limit: int | None  # no attention is defined beyond this many keys (legacy keep_window_size)
    sliding_window: int | None
    rope: Mapping  # rope_type, rope_theta and the type's parameters (transformers' rope_parameters)
    max_position_embeddings: int
    tie_word_embeddings: bool
    experts: Experts | None
    dynamic_mask_ratio: float = 0.0

    @classmethod
    def from_dict(cls, fields: Mapping) -> DogeSpec:
        """The inverse of `dataclasses.asdict` (a spec travels as plain data, e.g. inside an HF config)."""
        experts = fields.get("experts")
        return cls(**{**fields, "experts": Experts(**experts) if experts else None})

    @property
    def mask_rows(self) -> int:
        """Rows of A and dt_proj: one per kv head, or one per attention head (legacy)."""
        return self.num_kv_heads * self.masks_per_kv_head

    @property
    def rope_type(self) -> str:
        return self.rope.get("rope_type", "default")


def is_legacy(fields: Mapping, tensor_names: set[str] | None = None) -> bool:
    """True for the legacy SmallDoge format. Tensor names decide when there are any (`model.word_embed`,
    `pre_residual` vs `model.embed_tokens`); else config.json's fields (a legacy-only field, or remote
    code for DogeForCausalLM, which exists only for the legacy format: transformers' Doge is built in)."""
    if tensor_names:
        if "model.word_embed.weight" in tensor_names or any(k.endswith(".pre_residual.weight") for k in tensor_names):
            return True
        if "model.embed_tokens.weight" in tensor_names:
            return False
    if fields.get("model_type") not in (None, "doge"):
        return False
    if any(field in fields for field in LEGACY_ONLY_FIELDS):
        return True
    auto_map = fields.get("auto_map") or {}
    if any("DogeForCausalLM" in str(target) for target in auto_map.values()):
        return "q_norm" not in json.dumps(dict(fields)) and "attention_bias" not in fields
    return False


def describe(fields: Mapping, tensor_names: set[str] | None = None, *, legacy: bool | None = None) -> DogeSpec:
    """The DogeSpec of a config (config.json's fields, or a config object's `to_dict()`), validated.

    `tensor_names` (the checkpoint's) tell the format apart and, for the legacy format, whether routers
    have a bias. `legacy` forces the format. Raises DogeConfigError naming the first field out of range."""
    if legacy is None:
        legacy = is_legacy(fields, tensor_names)
    return _legacy_spec(fields, tensor_names) if legacy else _transformers_spec(fields)


class _Fields:
    """Field access with errors that name the field and what was expected."""

    def __init__(self, fields: Mapping, what: str):
        self.fields, self.what = fields, what

    def __getitem__(self, name: str):
        return self.fields.get(name)

    def need(self, ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise DogeConfigError(f"{self.what}: `{field}` = {self.fields.get(field)!r}; expected {expected}")

    def positive(self, field: str) -> int:
        value = self.fields.get(field)
        self.need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "a positive integer")
        return value

    def optional_positive(self, field: str) -> int | None:
        value = self.fields.get(field)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        self.need(ok, field, "null or a positive integer")
        return value


def _shape(f: _Fields) -> dict:
    """The DogeSpec fields both formats spell alike, checked."""
    shape = dict(
        vocab_size=f.positive("vocab_size"),
        hidden_size=f.positive("hidden_size"),
        intermediate_size=f.positive("intermediate_size"),
        num_layers=f.positive("num_hidden_layers"),
        num_heads=f.positive("num_attention_heads"),
        num_kv_heads=f.positive("num_key_value_heads"),
        max_position_embeddings=f.positive("max_position_embeddings"),
    )
    heads = shape["num_heads"]
    f.need(heads % shape["num_kv_heads"] == 0, "num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    if f["head_dim"] is None:
        f.need(shape["hidden_size"] % heads == 0, "hidden_size",
               f"a multiple of num_attention_heads ({heads}), or an explicit `head_dim`")
        head_dim = shape["hidden_size"] // heads
    else:
        head_dim = f.positive("head_dim")
    f.need(head_dim % 2 == 0, "head_dim", "an even head size (RoPE rotates pairs)")
    f.need(f["hidden_act"] in ACTIVATIONS, "hidden_act", f"one of {ACTIVATIONS}")
    return dict(shape, head_dim=head_dim, hidden_act=f["hidden_act"], rms_norm_eps=float(f["rms_norm_eps"]),
                tie_word_embeddings=bool(f["tie_word_embeddings"]))


def _experts(f: _Fields, router_bias: bool) -> Experts | None:
    if not f["is_moe"]:
        return None
    count = f.positive("num_experts")
    f.need(math.isqrt(count) ** 2 == count, "num_experts", "a perfect square (product keys: √E × √E)")
    top_k = f["num_experts_per_tok"]
    f.need(isinstance(top_k, int) and 1 <= top_k <= count, "num_experts_per_tok", f"an integer in [1, num_experts={count}]")
    return Experts(count, math.isqrt(count), top_k, bool(f["norm_topk_prob"]), router_bias)


def _transformers_spec(fields: Mapping) -> DogeSpec:
    from transformers import DogeConfig

    # transformers' DogeConfig (the format's owner) fills absent fields and normalises the RoPE spellings
    # (`rope_theta` / `rope_scaling` into `rope_parameters`).
    f = _Fields(DogeConfig(**{k: v for k, v in fields.items() if k != "model_type"}).to_dict(), "Doge config")
    shape = _shape(f)
    keep = f.positive("keep_window_size")
    window = f.optional_positive("sliding_window")
    rope = dict(f["rope_parameters"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    f.need(rope_type in ROPE_TYPES, "rope_parameters", f"rope_type in {ROPE_TYPES}, got {rope_type!r}")
    return DogeSpec(
        **shape,
        legacy=False,
        masks_per_kv_head=1,
        qk_norm=True,
        attention_bias=bool(f["attention_bias"]),
        mlp_bias=bool(f["mlp_bias"]),
        keep_window=keep,
        context_limit=None,
        sliding_window=window,
        rope={**rope, "rope_type": rope_type},
        experts=_experts(f, router_bias=False),
    )


def _legacy_spec(fields: Mapping, tensor_names: set[str] | None) -> DogeSpec:
    merged = {**LEGACY_DEFAULTS, **fields}
    if merged["num_key_value_heads"] is None:
        merged["num_key_value_heads"] = merged["num_attention_heads"]  # that code's default: MHA
    f = _Fields(merged, "legacy Doge config")
    shape = _shape(f)
    scaling = f["rope_scaling"]
    f.need(scaling is None or isinstance(scaling, dict), "rope_scaling", "null or a dict")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    f.need(rope_type in LEGACY_ROPE_TYPES, "rope_scaling",
           "rope_type 'dynamic' or none (the only types the published checkpoints use)")
    rope = {"rope_type": rope_type, "rope_theta": float(f["rope_theta"])}
    if rope_type == "dynamic":
        factor = scaling.get("factor")
        f.need(isinstance(factor, (int, float)) and factor >= 1, "rope_scaling", "a `factor` >= 1 for dynamic RoPE")
        rope["factor"] = float(factor)
    ratio = f["dynamic_mask_ratio"]
    f.need(isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0, "dynamic_mask_ratio",
           "a number in [0, 1) (code versions differ at 1.0)")
    keep = f.optional_positive("keep_window_size")
    f.need(ratio == 0.0 or keep is None, "dynamic_mask_ratio",
           "0.0 when `keep_window_size` is set (the code versions with a keep window count the masked keys "
           "differently, and the config does not say which one wrote it)")
    f.need(f["expert_index"] in LEGACY_EXPERT_INDEX, "expert_index", f"one of {LEGACY_EXPERT_INDEX}")
    architectures = f["architectures"] or ["DogeForCausalLM"]
    f.need(list(architectures) == ["DogeForCausalLM"], "architectures", '["DogeForCausalLM"]')
    router_bias = bool(f["router_bias"])
    if tensor_names is not None:
        router_bias = _check_legacy_names(merged, tensor_names)
    return DogeSpec(
        **shape,
        legacy=True,
        masks_per_kv_head=shape["num_heads"] // shape["num_kv_heads"],
        qk_norm=False,
        attention_bias=bool(f["hidden_bias"]),
        mlp_bias=bool(f["hidden_bias"]),
        keep_window=None,
        context_limit=keep,
        sliding_window=None,
        rope=rope,
        experts=_experts(f, router_bias),
        dynamic_mask_ratio=float(ratio),
    )


def _check_legacy_names(fields: Mapping, names: set[str]) -> bool:
    """Check a legacy checkpoint's tensor names against its config; return whether routers have a bias
    (only the names tell: some published MoE checkpoints have one, others not)."""
    if "model.word_embed.weight" not in names:
        hint = " (it looks like the transformers format)" if "model.embed_tokens.weight" in names else ""
        raise DogeConfigError(f"not a legacy Doge checkpoint: no `model.word_embed.weight`{hint}")
    other = sorted(k for k in names if ".feed_forward.queries" in k or k.endswith(".feed_forward.keys"))
    if other:
        raise DogeConfigError(
            f"legacy Doge checkpoint with the older query/key expert retrieval ({other[0]}, …); only the "
            "`feed_forward.router_gate` variant of the published MoE checkpoints is supported"
        )
    router_bias = False
    if fields["is_moe"]:
        gates = [k for k in names if k.endswith(".feed_forward.router_gate.weight")]
        biases = [k for k in names if k.endswith(".feed_forward.router_gate.bias")]
        layers = fields["num_hidden_layers"]
        if len(gates) != layers:
            raise DogeConfigError(
                f"legacy Doge config: `is_moe` = true but {len(gates)} of {layers} layers have feed_forward.router_gate.weight"
            )
        if biases and len(biases) != len(gates):
            raise DogeConfigError("legacy Doge checkpoint: only some layers have feed_forward.router_gate.bias")
        router_bias = bool(biases)
    if not fields["tie_word_embeddings"] and "lm_head.weight" not in names:
        raise DogeConfigError("legacy Doge config: `tie_word_embeddings` = false but the checkpoint has no lm_head.weight")
    return router_bias
