"""What a transformers-format Doge checkpoint must hold, checked as its tensors stream in.

vLLM's own loaders fail deep inside a weight loader (an assert on sizes) or at the end with a list of
uninitialised parameters; these checks name the tensor, its shape and the expected one instead.
"""

import json
import math
import pathlib
from collections.abc import Iterable, Iterator

import torch
from vllm.model_executor.models.utils import WeightsMapper


class DogeCheckpointError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape."""


# The legacy SmallDoge format's names, mapped to the transformers format's.
LEGACY_NAMES = WeightsMapper(
    orig_to_new_substr={
        "model.word_embed.": "model.embed_tokens.",
        "model.final_layernorm.": "model.norm.",
        ".pre_layernorm.": ".input_layernorm.",
        ".post_layernorm.": ".post_attention_layernorm.",
        ".pre_residual.weight": ".input_residual",
        ".post_residual.weight": ".post_attention_residual",
        ".feed_forward.": ".mlp.",
    }
)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key (weights and biases, transformers-format names) with its full, unsharded shape.

    Legacy checkpoints (`config.doge_legacy`) have one mask row per attention head and no q/k norm."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or hidden // heads
    legacy = getattr(config, "doge_legacy", False)
    mask_rows = heads if legacy else kv_heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        linears = {
            "self_attn.q_proj": (heads * d, hidden, config.attention_bias),
            "self_attn.k_proj": (kv_heads * d, hidden, config.attention_bias),
            "self_attn.v_proj": (kv_heads * d, hidden, config.attention_bias),
            "self_attn.o_proj": (hidden, heads * d, config.attention_bias),
            "self_attn.dt_proj": (mask_rows, kv_heads * d, config.attention_bias),
            "mlp.gate_proj": (inter, hidden, config.mlp_bias),
            "mlp.up_proj": (inter, hidden, config.mlp_bias),
            "mlp.down_proj": (hidden, inter, config.mlp_bias),
        }
        if config.is_moe:
            linears["mlp.router_gate"] = (2 * math.isqrt(config.num_experts), hidden, False)
            shapes[p + "mlp.down_embed.weight"] = (config.num_experts, hidden)
            shapes[p + "mlp.up_embed.weight"] = (config.num_experts, hidden)
        for name, (rows, cols, bias) in linears.items():
            shapes[f"{p}{name}.weight"] = (rows, cols)
            if bias:
                shapes[f"{p}{name}.bias"] = (rows,)
        shapes[p + "self_attn.A"] = (mask_rows,)
        if legacy:
            if config.is_moe:  # some published MoE checkpoints have a router bias, others not
                shapes[p + "mlp.router_gate.bias"] = (2 * math.isqrt(config.num_experts),)
        else:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "input_residual", "post_attention_residual"):
            shapes[p + name] = (hidden,)
    return shapes


def checked(
    weights: Iterable[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]], optional: Iterable[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the checkpoint's tensors, raising on a wrong shape; at the end, on a missing tensor.

    Keys the model does not know pass through (vLLM's loader reports them); `optional` keys (for
    instance a tied lm_head that some exports still store) may be absent.
    """
    seen = set()
    for name, tensor in weights:
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise DogeCheckpointError(
                f"Doge checkpoint: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want} from config.json"
            )
        seen.add(name)
        yield name, tensor
    missing = sorted(set(expected) - seen - set(optional))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DogeCheckpointError(f"Doge checkpoint: tensor {missing[0]!r}{more} is missing from the safetensors files")


def check_safetensors_files(root: pathlib.Path) -> None:
    """A local checkpoint must hold safetensors weights (pickled .bin files can run code when loaded), each
    file as long as its header says: a truncated download otherwise fails deep in the loader."""
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in root.glob("*.bin"))) or "no weights at all"
        raise DogeCheckpointError(
            f"Doge checkpoint {root}: no *.safetensors file ({found}); only safetensors weights are loaded"
        )
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = f.read(header_len) if 8 + header_len <= size else b""
        try:
            tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
            described = 8 + header_len + max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise DogeCheckpointError(f"Doge checkpoint: {file.name} ({size} bytes) has no valid safetensors header") from None
        if described != size:
            raise DogeCheckpointError(
                f"Doge checkpoint: {file.name} is {size} bytes, its header describes {described} bytes "
                "(truncated or corrupt)"
            )
