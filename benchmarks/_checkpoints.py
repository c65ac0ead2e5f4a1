"""Benchmark checkpoints: Doge models with random non-trivial weights and same-shape Qwen3 models.

Doge: `tools.build_checkpoint` (make_config → model → `reinitialize`, which draws A, dt_proj, the residual
scales and every other parameter again with scales that make each feature matter → `write_checkpoint`).
`build_checkpoint` itself is not used because it insists that the tokenizer has exactly `vocab_size`
tokens, and the stand-in tokenizer trained on the standard library stops at ~26k merges for 32768;
a tokenizer smaller than the model's vocabulary is what Qwen ships too, and the benchmark feeds
token ids, so the model keeps the published vocab_size (32768) and the lm_head cost that goes with it.

Qwen3: `transformers.Qwen3ForCausalLM(Qwen3Config(...))` with the same dimensions (hidden, layers, heads,
kv heads, head_dim, intermediate, vocab, tying, RoPE, eps, max positions) and the same tokenizer files,
its weights drawn by the same `reinitialize` rules as Doge's (every Qwen3 parameter name has a rule:
projections of unit gain, norms near 1, the tied embedding's scale). transformers' default init
(std 0.02 everywhere) shrinks the residual stream layer after layer until activations reach fp32
subnormals, which x86 handles with microcode assists: measured here (eager, one thread), it made Qwen3's
GEMMs ~1.4x and its elementwise multiplies ~2x slower per call than with O(1) activations, which
flattered Doge's ratio.

Checkpoints are cached under $VLLM_DOGE_CACHE/bench (default ~/.cache/vllm-doge/bench), keyed by their
fields, and rebuilt only when those change.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import tempfile

# Bump when the way checkpoints are written changes.
BUILD_VERSION = 2
# The vocabulary asked of the stand-in tokenizer (it may come back smaller; see the module docstring).
TOKENIZER_VOCAB = 32768


def cache_dir() -> pathlib.Path:
    from tools.tokenizer import cache_root

    return cache_root() / "bench"


def _key(kind: str, fields: dict, seed: int) -> str:
    text = json.dumps({"kind": kind, "fields": fields, "seed": seed, "v": BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _build_atomically(target: pathlib.Path, write, marker: str = "config.json") -> pathlib.Path:
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        write(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def doge_checkpoint(name: str, fields: dict, seed: int = 0) -> pathlib.Path:
    """A Doge checkpoint with the given config fields, re-initialised with `tools.build_checkpoint.reinitialize`."""

    def write(out: pathlib.Path) -> None:
        import torch

        from tools.build_checkpoint import make_config, model_class, reinitialize, write_checkpoint
        from tools.tokenizer import get_tokenizer

        config = make_config("dense-gqa", **fields)
        tokenizer = get_tokenizer(TOKENIZER_VOCAB)
        model = model_class(config)(config).to(torch.float32)
        reinitialize(model, seed)
        write_checkpoint(model.eval(), tokenizer, out, dtype=torch.float32)

    return _build_atomically(cache_dir() / f"{name}-{_key('doge', fields, seed)}", write)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_adapter(doge_dir: pathlib.Path, rank: int = 8, seed: int = 0) -> pathlib.Path:
    """A LoRA adapter of a Doge checkpoint in PEFT's `save_pretrained` layout (adapter_config.json and
    adapter_model.safetensors) on every linear layer of attention and MLP, with random A and B."""
    config = json.loads((pathlib.Path(doge_dir) / "config.json").read_text())

    def write(out: pathlib.Path) -> None:
        import torch
        from safetensors.torch import save_file

        hidden, inter = config["hidden_size"], config["intermediate_size"]
        d = config.get("head_dim") or hidden // config["num_attention_heads"]
        q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
        shapes = {  # (in, out) of each target, and the block holding it
            "q_proj": (hidden, q, "self_attn"), "k_proj": (hidden, kv, "self_attn"),
            "v_proj": (hidden, kv, "self_attn"), "o_proj": (q, hidden, "self_attn"),
            "gate_proj": (hidden, inter, "mlp"), "up_proj": (hidden, inter, "mlp"), "down_proj": (inter, hidden, "mlp"),
        }  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target in LORA_TARGETS:
                n_in, n_out, block = shapes[target]
                name = f"base_model.model.model.layers.{layer}.{block}.{target}"
                tensors[f"{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) * n_in**-0.5
                tensors[f"{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * 0.1
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGETS),
                          "bias": "none", "base_model_name_or_path": str(doge_dir), "task_type": "CAUSAL_LM"}  # fmt: skip
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

    key = _key("lora", {"base": pathlib.Path(doge_dir).name, "rank": rank}, seed)
    return _build_atomically(cache_dir() / f"lora-{key}", write, marker="adapter_config.json")


def qwen3_fields(doge_dir: pathlib.Path) -> dict:
    """Qwen3Config fields with the dimensions of a written Doge checkpoint."""
    doge = json.loads((pathlib.Path(doge_dir) / "config.json").read_text())
    head_dim = doge.get("head_dim") or doge["hidden_size"] // doge["num_attention_heads"]
    return dict(
        vocab_size=doge["vocab_size"],
        hidden_size=doge["hidden_size"],
        intermediate_size=doge["intermediate_size"],
        num_hidden_layers=doge["num_hidden_layers"],
        num_attention_heads=doge["num_attention_heads"],
        num_key_value_heads=doge["num_key_value_heads"],
        head_dim=head_dim,
        max_position_embeddings=doge["max_position_embeddings"],
        rms_norm_eps=doge["rms_norm_eps"],
        hidden_act=doge["hidden_act"],
        attention_bias=doge.get("attention_bias", False),
        tie_word_embeddings=doge["tie_word_embeddings"],
        rope_parameters=doge.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=doge.get("bos_token_id"),
        eos_token_id=doge.get("eos_token_id"),
        pad_token_id=doge.get("pad_token_id"),
        use_sliding_window=False,
        sliding_window=None,
        dtype="float32",
        architectures=["Qwen3ForCausalLM"],
    )


def qwen3_checkpoint(name: str, doge_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    fields = qwen3_fields(doge_dir)

    def write(out: pathlib.Path) -> None:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from tools.build_checkpoint import generation_config
        from tools.tokenizer import get_tokenizer, save_tokenizer

        from tools.build_checkpoint import reinitialize

        torch.manual_seed(seed)
        config = Qwen3Config(**fields)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
        reinitialize(model, seed)
        model.save_pretrained(out)
        generation_config(config).save_pretrained(out)
        save_tokenizer(get_tokenizer(TOKENIZER_VOCAB), out)

    return _build_atomically(cache_dir() / f"{name}-{_key('qwen3', fields, seed)}", write)


def config_summary(model_dir: pathlib.Path) -> dict:
    keys = (
        "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
        "keep_window_size", "is_moe", "num_experts", "num_experts_per_tok",
    )  # fmt: skip
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    return {k: config[k] for k in keys if k in config}
