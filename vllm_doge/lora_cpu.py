"""Base-model requests batched with LoRA requests on vLLM 0.32's CPU backend.

vLLM gives a token without an adapter the LoRA slot index -1. The GPU kernels skip such tokens, but the
CPU wrapper's torch ops index the stacked adapter weights with it, and `weights[-1]` is the LAST slot:
a base-model request batched with adapter requests gets that slot's adapter whenever it is occupied.

`exact_base_rows(manager)` fixes this for one Doge model's LoRA manager (called when vLLM attaches the
manager to the model, see DogeForCausalLM.lora_manager): after each shrink (x @ A, the first half of
every LoRA product) the rows of tokens with index -1 are set to zero, so the expand (@ B) adds exactly 0
to them. This is the only place the plugin touches vLLM's LoRA internals (the CPU wrapper's class and
its token_lora_indices), so it is applied only to the vLLM versions it was tested with.
"""

from __future__ import annotations

from typing import Any

import torch


def _exact_base_class():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    class ExactBasePunicaWrapperCPU(PunicaWrapperCPU):
        """PunicaWrapperCPU whose tokens without an adapter (index -1) get no LoRA contribution."""

        def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs: Any) -> None:
            super().add_shrink(y, x, lora_a_stacked, scale, **kwargs)
            base = self.token_lora_indices < 0
            for buffer in y:
                buffer.view(-1, buffer.shape[-1])[: base.shape[0]][base] = 0

    return PunicaWrapperCPU, ExactBasePunicaWrapperCPU


def exact_base_rows(manager) -> None:
    """Make index -1 contribute nothing in every CPU punica wrapper of this LoRA manager."""
    import vllm

    from . import TESTED_VLLM

    wrappers = getattr(manager, "punica_wrapper_mapping", {})
    cpu_class, exact_class = _exact_base_class()
    cpu_wrappers = [w for w in wrappers.values() if type(w) is cpu_class]
    if not cpu_wrappers:
        return  # GPU kernels skip index -1 themselves
    if not vllm.__version__.startswith(TESTED_VLLM):
        from vllm.logger import init_logger

        init_logger(__name__).warning(
            "Doge: vLLM %s is untested: base-model requests batched with LoRA requests on CPU may pick up "
            "an adapter (vLLM 0.32's CPU LoRA ops index slot -1); the fix for 0.32 is not applied.",
            vllm.__version__,
        )
        return
    for wrapper in cpu_wrappers:
        wrapper.__class__ = exact_class  # same state, one overridden method
