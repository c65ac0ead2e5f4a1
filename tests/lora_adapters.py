"""PEFT adapters for the LoRA tests: built with peft on doge_hf models, saved as `save_pretrained` saves
them, with the PEFT-merged model written as a plain checkpoint (the reference)."""

from __future__ import annotations

import pathlib

import torch

# Every linear layer vLLM serves an adapter on (router_gate only exists in CDMoE checkpoints).
DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(base: str, out_dir, targets, seed: int, rank: int = 8, alpha: int = 16,
                  a_std: float = 0.3, b_std: float = 0.3) -> tuple[str, str]:
    """A random LoRA adapter of `base` on `targets`, saved by peft; returns (adapter dir, merged checkpoint).

    peft starts B at zero (a no-op adapter): A and B are drawn from N(0, std²) instead, so every target
    moves its output (with |h| ~ 1 per channel, delta ~ alpha/r · b_std · a_std · √(in·r) per output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from doge_hf import DogeForCausalLM
    from tools.build_checkpoint import write_checkpoint

    out = pathlib.Path(out_dir)
    model = DogeForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                std = a_std if "lora_A" in name else b_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    adapter = out / "adapter"
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload()
    reference = write_checkpoint(merged.eval(), AutoTokenizer.from_pretrained(base), out / "merged")
    return str(adapter), str(reference)
