"""Tiny Doge checkpoints for tests: config.json + model.safetensors + generation_config.json + tokenizer.

    python -m tools.build_checkpoint OUT_DIR --preset moe [--seed 0] [--num-hidden-layers 3] [--set key=value]
    python -m tools.build_checkpoint OUT_DIR --legacy --preset dense-gqa     (the legacy SmallDoge format)
    build_checkpoint(out_dir, preset="dense-gqa", seed=0, **config_overrides) -> pathlib.Path
    build_legacy_checkpoint(out_dir, preset="dense-gqa", seed=0, **config_overrides) -> pathlib.Path

The default initialisation (A = 0, residual scales 1, std-0.02 projections) hides most of Doge: with
A = 0 the dynamic mask is a constant, unit residuals look like a plain transformer, and tiny expert
tables leave CDMoE's routed half invisible. `reinitialize` therefore draws every parameter again, from
one seeded generator, with scales chosen so that each feature changes greedy tokens (measured by
tests/test_build_checkpoint.py): key biases that vary by several units across keys, residual scales in
[0.5, 1.5], projections that keep activations O(1), expert tables comparable to the shared MLP, and a
sharpened lm_head so greedy argmax choices have clear margins rather than near-ties.
"""

import argparse
import json
import pathlib

import torch
from safetensors.torch import save_file

from doge_format import legacy_to_transformers_name

# Shared by every preset: a tiny fp32 model (head_dim = 64 / 4 = 16) on the 512-token tokenizer.
BASE_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    dtype="float32",
)

PRESETS = {
    "dense-gqa": {},
    "dense-mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "keep-window": dict(keep_window_size=16),
    "sliding": dict(sliding_window=24),
    "moe": dict(is_moe=True, num_experts=64, num_experts_per_tok=8),
    "moe-keep-window": dict(is_moe=True, num_experts=64, num_experts_per_tok=8, keep_window_size=16),
    "classifier": dict(architectures=["DogeForSequenceClassification"], num_labels=3),
}

# Init scales (see the module docstring), chosen by measuring how often an ablation flips the argmax.
A_RANGE = (0.4, 0.8)  # b = exp(A·softplus(dt)), dt ~ N(0, 1.2²): per key b ≈ 1.1 (10%) .. 2 (median) .. 8 (99%)
DT_STD = 1.2
QK_NORM_RANGE = (1.0, 1.5)  # content scores q·k/√d of a size comparable to the bias spread
NORM_RANGE = (0.8, 1.2)  # the other RMSNorm weights
RESIDUAL_RANGE = (0.5, 1.5)
EXPERT_DOWN_STD = 2.0  # act(down_embed[e]·h) with |h| ~ √hidden: pre-activations ~ N(0, 2²)
EXPERT_UP_STD = 1.0
LOGIT_STD = 10.0  # std of a logit (lm_head or classifier): near-ties between the top two are rare
# Tied: the embedding is also lm_head. Kept small (|E_t| ≈ 2) so the blocks, not the input token, dominate
# the residual stream (otherwise greedy decoding echoes its input); the final norm supplies the logit scale.
TIED_EMBED_NORM = 2.0


def make_config(preset: str = "dense-gqa", **overrides):
    """The DogeConfig of a preset, with any field overridden."""
    from doge_hf import DogeConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {**BASE_CONFIG, **PRESETS[preset], **overrides}
    fields.setdefault("architectures", ["DogeForCausalLM"])
    return DogeConfig(**fields)


def model_class(config):
    import doge_hf

    (name,) = config.architectures
    if name not in ("DogeForCausalLM", "DogeForSequenceClassification"):
        raise ValueError(f"unsupported architecture {name!r}")
    return getattr(doge_hf, name)


def _init_rule(name: str, param: torch.Tensor, tied: bool, hidden: int) -> tuple[str, float, float]:
    """(kind, a, b) for one parameter (transformers-format name): ("normal", 0, std) or ("uniform", low, high)."""
    *_, module, last = ("",) + tuple(name.split("."))
    if last == "A":
        return ("uniform", *A_RANGE)
    if last in ("input_residual", "post_attention_residual"):
        return ("uniform", *RESIDUAL_RANGE)
    if module in ("q_norm", "k_norm"):
        return ("uniform", *QK_NORM_RANGE)
    if name == "model.norm.weight" and tied:
        gain = LOGIT_STD / TIED_EMBED_NORM
        return ("uniform", NORM_RANGE[0] * gain, NORM_RANGE[1] * gain)
    if "norm" in module and last == "weight":  # the other RMSNorms: input/post-attention, final
        return ("uniform", *NORM_RANGE)
    if last == "bias":
        return ("normal", 0.0, 0.1)
    if module == "dt_proj":
        return ("normal", 0.0, DT_STD / param.shape[1] ** 0.5)
    if module == "down_embed":
        return ("normal", 0.0, EXPERT_DOWN_STD / hidden**0.5)
    if module == "up_embed":
        return ("normal", 0.0, EXPERT_UP_STD)
    if module == "embed_tokens":
        return ("normal", 0.0, TIED_EMBED_NORM / hidden**0.5 if tied else 1.0)
    if module in ("lm_head", "score"):
        return ("normal", 0.0, LOGIT_STD / hidden**0.5)
    if param.dim() == 2:  # any other projection: unit gain, so every block's output is O(1)
        return ("normal", 0.0, 1.0 / param.shape[1] ** 0.5)
    raise ValueError(f"no init rule for parameter {name} {tuple(param.shape)}")


@torch.no_grad()
def reinitialize(model, seed: int = 0):
    """Draw every parameter again from one generator, in sorted-name order (deterministic). Legacy
    models' names are mapped to the transformers format's for the rule: one table for both formats."""
    from doge_hf import spec_of

    spec = spec_of(model.config)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding and is listed once
    for name in sorted(params):
        param = params[name]
        rule_name = legacy_to_transformers_name(name) if spec.legacy else name
        kind, a, b = _init_rule(rule_name, param, spec.tie_word_embeddings, spec.hidden_size)
        if kind == "uniform":
            values = torch.rand(param.shape, generator=gen, dtype=torch.float32) * (b - a) + a
        else:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * b + a
        param.copy_(values.to(param.dtype))
    return model


@torch.no_grad()
def copy_group_masks(model):
    """Copy the A / dt_proj rows of each group's first head to the group's other heads, in a legacy model
    (per-attention-head masks): the only GQA case a per-kv-head mask can express."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    first = torch.arange(config.num_attention_heads) // groups * groups
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.A.copy_(attn.A[first])
        attn.dt_proj.weight.copy_(attn.dt_proj.weight[first])
        if attn.dt_proj.bias is not None:
            attn.dt_proj.bias.copy_(attn.dt_proj.bias[first])
    return model


def generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )


def write_checkpoint(model, tokenizer, out_dir, dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write a transformers-format checkpoint directory (the writer shared with train_demo).

    The state dict keeps transformers' Doge keys; a tied lm_head is not stored (the loader re-ties it).
    """
    from tools.tokenizer import save_tokenizer

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = dtype or model.dtype
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    tensors = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = tensor.detach().to(dtype).contiguous().clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
    config.save_pretrained(out)
    if not hasattr(model, "lm_head"):
        # transformers stores only id2label; `num_labels` spelled out is easier for readers and loaders
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_labels": config.num_labels}, indent=2) + "\n")
    generation_config(config).save_pretrained(out)  # vLLM reads its defaults (eos) from here
    save_tokenizer(tokenizer, out)
    return out


def build_checkpoint(out_dir, preset: str = "dense-gqa", seed: int = 0, **config_overrides) -> pathlib.Path:
    """Build, re-initialise and write a tiny Doge checkpoint; returns the directory."""
    from tools.tokenizer import get_tokenizer

    config = make_config(preset, **config_overrides)
    tokenizer = get_tokenizer(config.vocab_size)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, config.vocab_size is {config.vocab_size}")
    dtype = getattr(torch, str(config.dtype).removeprefix("torch."))
    model = model_class(config)(config).to(torch.float32)
    reinitialize(model, seed)
    return write_checkpoint(model.eval(), tokenizer, out_dir, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# The legacy SmallDoge format

# The same tiny shape (tying is that format's default, so it is left out of config.json).
LEGACY_BASE = dict(
    {k: v for k, v in BASE_CONFIG.items() if k not in ("tie_word_embeddings", "dtype")},
    hidden_bias=False,
    hidden_dropout=0.0,
    hidden_act="silu",
    initializer_range=0.02,
    use_cache=True,
    rope_theta=10000.0,
    rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 512},
    attention_dropout=0.0,
    dynamic_mask_ratio=0.0,
)
# Dense published configs still carry the (unused) expert fields of their config class.
_STALE_EXPERT_FIELDS = dict(num_cdmmoe_experts=2048, num_cdmmoe_heads=4, num_cdmmoe_experts_per_head=8,
                            expert_retrieval_size=64, is_moe=False)
LEGACY_PRESETS = {
    "dense-gqa": dict(_STALE_EXPERT_FIELDS),
    "dense-mha": dict(_STALE_EXPERT_FIELDS, num_key_value_heads=4),
    "moe": dict(is_moe=True, num_experts=64, num_experts_per_tok=8, keep_window_size=512),
}
# Remote code the published checkpoints name (never executed here).
LEGACY_AUTO_MAP = {"AutoConfig": "configuration_doge.DogeConfig", "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"}


def legacy_config_dict(preset: str = "dense-gqa", **overrides) -> dict:
    """The config.json content of a legacy preset (tie_word_embeddings omitted = tied)."""
    if preset not in LEGACY_PRESETS:
        raise ValueError(f"unknown legacy preset {preset!r}; choose from {sorted(LEGACY_PRESETS)}")
    fields = {**LEGACY_BASE, **LEGACY_PRESETS[preset], **overrides}
    return {"architectures": ["DogeForCausalLM"], "auto_map": dict(LEGACY_AUTO_MAP), "model_type": "doge",
            "torch_dtype": "float32", **fields}


def build_legacy_checkpoint(out_dir, preset: str = "dense-gqa", seed: int = 0, *, share_group_masks: bool = False,
                            router_bias: bool = False, **overrides) -> pathlib.Path:
    """Write a tiny legacy checkpoint: config.json in that layout, model.safetensors with the published
    names (no lm_head when tied), generation_config.json and the tokenizer. `overrides` are config.json
    fields; `router_bias` adds feed_forward.router_gate.bias; `share_group_masks`: see `copy_group_masks`."""
    from doge_hf.legacy import LegacyDogeConfig, LegacyDogeForCausalLM
    from tools.tokenizer import get_tokenizer, save_tokenizer

    fields = legacy_config_dict(preset, **overrides)
    config = LegacyDogeConfig(**{k: v for k, v in fields.items() if k != "torch_dtype"}, router_bias=router_bias)
    tokenizer = get_tokenizer(config.vocab_size)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, config.vocab_size is {config.vocab_size}")
    model = reinitialize(LegacyDogeForCausalLM(config).float(), seed)
    if share_group_masks:
        copy_group_masks(model)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    generation_config(config).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


def _parse_value(text: str):
    """CLI override values are JSON (numbers, true/false/null, lists); anything else is a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.build_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="dense-gqa", help=f"{sorted(PRESETS)}, or with --legacy {sorted(LEGACY_PRESETS)}")
    parser.add_argument("--legacy", action="store_true", help="write the legacy SmallDoge format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field (value parsed as JSON), e.g. --set num_hidden_layers=3",
    )
    args, extra = parser.parse_known_args(argv)
    # Overrides come as --set key=value, or as --key value / --key=value for any config field.
    items = list(args.overrides)
    while extra:
        flag = extra.pop(0)
        if not flag.startswith("--"):
            parser.error(f"unexpected argument {flag!r}")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if not extra:
                parser.error(f"{flag} needs a value")
            value = extra.pop(0)
        items.append(f"{key.replace('-', '_')}={value}")
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"overrides are KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    build = build_legacy_checkpoint if args.legacy else build_checkpoint
    out = build(args.out_dir, args.preset, args.seed, **overrides)
    print(f"wrote {'legacy ' if args.legacy else ''}{args.preset} checkpoint (seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
