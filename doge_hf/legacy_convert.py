"""Convert a legacy SmallDoge checkpoint to the transformers format — exactly, or refuse and say why.

    python -m doge_hf.legacy_convert SRC DST          exit 2: refused (every reason on stderr), nothing written
    python -m doge_hf.legacy_convert SRC --check      only list the obstacles

What maps exactly (`convert_state_dict`):
    model.word_embed → model.embed_tokens, model.final_layernorm → model.norm, pre_/post_layernorm →
    input_/post_attention_layernorm, pre_/post_residual.weight → input_/post_attention_residual,
    feed_forward.* → mlp.*, hidden_bias → attention_bias and mlp_bias, tying made explicit;
    A [H] → [KV] and dt_proj [H, KV·d] → [KV, KV·d] by taking each group's first head, exact only when every
    head of a group has the same A, dt_proj row and bias (attention head h uses kv head h // G);
    RoPE: the legacy dynamic NTK and transformers' `dynamic` rope_parameters are the same function of
    (rope_theta, factor, max_position_embeddings) with the same growth/reset rule → {rope_type: dynamic, ...};
    keep window: the legacy code never top-k masks (ratio 0), so keep_window_size = the legacy value if the
    config has one (the legacy model refuses longer contexts) else 2^31 − 1 (never reached).
What does not (`conversion_obstacles`), each a refusal:
    * q/k norm: the transformers format always applies RMSNorm(head_dim, rms_norm_eps) to q and k. No weight
      makes it an identity (it divides by each head vector's RMS, which varies per token), and the legacy
      format has none. This holds for EVERY legacy checkpoint, so the converter always refuses; legacy
      checkpoints are served natively (doge_hf.legacy here, the vLLM model's legacy path there).
    * GQA heads of a group with different A / dt_proj rows (per-attention-head masks).
    * dynamic_mask_ratio ≠ 0 (a non-causal, call-dependent masking rule that the transformers format lacks).
    * feed_forward.router_gate.bias ≠ 0 (transformers' router has no bias).
"""

import argparse
import pathlib
import sys

import torch

from .legacy import (LegacyDogeConfig, LegacyDogeConfigError, checkpoint_keys, inspect_checkpoint,
                     is_legacy_checkpoint, legacy_head_dim, rope_kind)

NEVER = 2**31 - 1  # keep_window_size that no context reaches
QK_NORM_REASON = (
    "q/k norm: the transformers format normalises q and k per head (RMSNorm over head_dim with rms_norm_eps, "
    "the same eps as every other norm); the legacy format has no such normalisation and no q_norm/k_norm weight "
    "makes RMSNorm an identity (it divides each head vector by its own RMS). No legacy checkpoint converts "
    "exactly; load it natively (doge_hf.legacy.LegacyDogeForCausalLM, or vLLM's legacy Doge path)."
)


class ConversionRefused(RuntimeError):
    """The legacy checkpoint has no exact transformers-format equivalent; `reasons` lists every obstacle."""

    def __init__(self, src, reasons: list[str]):
        self.reasons = reasons
        lines = "\n".join(f"  - {r}" for r in reasons)
        super().__init__(f"refusing to convert {src}: no exact transformers-format equivalent\n{lines}")


def load_legacy(src) -> tuple[LegacyDogeConfig, dict[str, torch.Tensor]]:
    """The config (validated, router bias detected) and state dict of a local legacy checkpoint."""
    from safetensors.torch import load_file

    src = pathlib.Path(src)
    if not is_legacy_checkpoint(src):
        raise LegacyDogeConfigError(f"{src} is not a legacy Doge checkpoint")
    config = LegacyDogeConfig.from_pretrained(src)
    keys = checkpoint_keys(src)
    if keys is None:
        raise LegacyDogeConfigError(f"{src} has no safetensors weights")
    inspect_checkpoint(config, keys, src)
    state = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update(load_file(file))
    return config, state


def _group_mismatches(config, state) -> list[str]:
    groups = config.num_attention_heads // config.num_key_value_heads
    bad = []
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        for name in ("A", "dt_proj.weight", "dt_proj.bias"):
            if prefix + name not in state:
                continue
            rows = state[prefix + name].reshape(config.num_key_value_heads, groups, -1)
            if not torch.equal(rows, rows[:, :1].expand_as(rows)):
                bad.append(f"layer {i} {name}")
    return bad


def conversion_obstacles(config: LegacyDogeConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Every reason the checkpoint has no exact transformers-format equivalent (empty list: none)."""
    reasons = [QK_NORM_REASON]
    if config.num_attention_heads != config.num_key_value_heads:
        bad = _group_mismatches(config, state)
        if bad:
            reasons.append(
                "per-attention-head dynamic mask with GQA: the transformers format has one A / dt_proj row per kv "
                f"head, and the heads of a group differ ({', '.join(bad[:4])}{', …' if len(bad) > 4 else ''})"
            )
    if config.dynamic_mask_ratio:
        reasons.append(
            f"dynamic_mask_ratio = {config.dynamic_mask_ratio}: the legacy rule masks keys below a quantile of all "
            "keys in a forward call (future ones included); the transformers format has no such rule"
        )
    biases = [k for k in state if k.endswith("feed_forward.router_gate.bias")]
    if any(state[k].any() for k in biases):
        reasons.append("feed_forward.router_gate.bias is non-zero; transformers' CDMoE router has no bias")
    return reasons


def transformers_config(config: LegacyDogeConfig) -> dict:
    """config.json fields of the transformers-format equivalent."""
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if rope_kind(config) == "dynamic":
        rope = {"rope_type": "dynamic", "rope_theta": float(config.rope_theta),
                "factor": float(config.rope_scaling["factor"])}
        if "original_max_position_embeddings" in config.rope_scaling:
            rope["original_max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
    fields = dict(
        architectures=["DogeForCausalLM"], model_type="doge",
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=legacy_head_dim(config),
        hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, rope_parameters=rope,
        attention_bias=config.hidden_bias, mlp_bias=config.hidden_bias,
        keep_window_size=config.keep_window_size or NEVER, tie_word_embeddings=config.tie_word_embeddings,
        is_moe=config.is_moe, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if config.is_moe:
        fields.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                      norm_topk_prob=config.norm_topk_prob)
    return fields


def convert_state_dict(config: LegacyDogeConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers-format tensors of everything the two formats share (all but q_norm/k_norm).

    Raises ValueError if the heads of a GQA group have different mask rows (they cannot be merged)."""
    if config.num_attention_heads != config.num_key_value_heads and _group_mismatches(config, state):
        raise ValueError("the heads of a GQA group have different A / dt_proj rows")
    groups = config.num_attention_heads // config.num_key_value_heads
    renames = [
        ("model.word_embed.", "model.embed_tokens."), ("model.final_layernorm.", "model.norm."),
        (".pre_layernorm.", ".input_layernorm."), (".post_layernorm.", ".post_attention_layernorm."),
        (".pre_residual.weight", ".input_residual"), (".post_residual.weight", ".post_attention_residual"),
        (".feed_forward.", ".mlp."),
    ]
    out = {}
    for name, tensor in state.items():
        if name.endswith("router_gate.bias"):
            continue  # all zeros, or conversion_obstacles refused
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        new = name
        for old, rep in renames:
            new = new.replace(old, rep)
        if name.endswith((".self_attn.A", ".self_attn.dt_proj.weight", ".self_attn.dt_proj.bias")):
            tensor = tensor[::groups]  # one row per kv head: the first head of each group
        out[new] = tensor.contiguous()
    return out


def convert_checkpoint(src, dst) -> pathlib.Path:
    """Write the transformers-format equivalent of SRC to DST, or raise ConversionRefused (nothing written).

    Every legacy checkpoint has the q/k-norm obstacle, so today this always refuses; no writer exists for a
    checkpoint that would not be equivalent."""
    config, state = load_legacy(src)
    reasons = conversion_obstacles(config, state)
    if reasons:
        raise ConversionRefused(src, reasons)
    raise AssertionError("unreachable: the q/k-norm obstacle applies to every legacy checkpoint")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doge_hf.legacy_convert", description=__doc__.split("\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst", nargs="?")
    parser.add_argument("--check", action="store_true", help="only list the obstacles to an exact conversion")
    args = parser.parse_args(argv)
    if args.dst is None and not args.check:
        parser.error("DST is required unless --check is given")
    try:
        if args.check:
            reasons = conversion_obstacles(*load_legacy(args.src))
            for reason in reasons:
                print(f"- {reason}")
            return 2 if reasons else 0
        out = convert_checkpoint(args.src, args.dst)
    except (ConversionRefused, LegacyDogeConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


__all__ = ["ConversionRefused", "conversion_obstacles", "convert_checkpoint", "convert_state_dict",
           "load_legacy", "transformers_config"]

if __name__ == "__main__":
    sys.exit(main())
