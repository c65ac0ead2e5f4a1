"""LoRA: the two places where vLLM's own handling is not exact for Doge adapters.

1. Base-model requests batched with LoRA requests on the CPU backend. vLLM gives a token without an
   adapter the slot index -1. The GPU kernels skip such tokens, but vLLM 0.32's CPU wrapper's torch ops
   index the stacked adapter weights with it, and `weights[-1]` is the LAST slot: a base-model request
   batched with adapter requests gets that slot's adapter whenever it is occupied. After each shrink
   (x @ A, the first half of every LoRA product) the rows of tokens with index -1 are set to zero, so the
   expand (@ B) adds exactly 0 to them. vLLM 0.33 masks those rows itself; whether the installed vLLM does
   is probed once on a one-token batch (`cpu_ops_skip_unset_slot`), and the fix is applied only where
   it does not.
2. Adapter shapes. vLLM zero-pads LoRA tensors narrower than their layer and takes a rank from
   adapter_config.json that the tensors need not have: an adapter PEFT itself could not load is served as
   something else. Each adapter is checked against the checkpoint's tensor shapes when it is added.

Both are applied by `attach(manager, spec)`, which DogeForCausalLM calls when vLLM attaches its LoRA
manager to the model (the one moment a model sees it). They touch vLLM's LoRA internals (the CPU wrapper's
class and token_lora_indices, the manager's `_add_adapter` and LoRAModel's weights), listed in surface.py
and checked there before they are used.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from doge_format import DogeSpec, expected_shapes


class DogeAdapterError(ValueError):
    """A LoRA adapter whose tensors do not fit the model."""


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


def check_adapter(spec: DogeSpec, lora_model) -> None:
    """Every adapted module must be a layer of the checkpoint, with lora_A [rank, inputs] and lora_B
    [outputs, rank] for its weight [outputs, inputs] and the rank of adapter_config.json."""
    shapes = expected_shapes(spec)
    for name, weights in lora_model.loras.items():
        weight = shapes.get(f"{name}.weight")
        if weight is None or len(weight) != 2:
            continue  # vLLM refuses modules it has no layer for, naming them
        outputs, inputs = weight
        rank = lora_model.rank
        for part, tensor, want in (("lora_A", weights.lora_a, (rank, inputs)), ("lora_B", weights.lora_b, (outputs, rank))):
            if tuple(tensor.shape) != want:
                raise DogeAdapterError(
                    f"Doge LoRA adapter {lora_model.id}: {name}.{part} has shape {tuple(tensor.shape)}, expected "
                    f"{want} (rank {rank} from adapter_config.json, the layer's weight is {weight})"
                )


@functools.lru_cache(maxsize=1)
def cpu_ops_skip_unset_slot() -> bool:
    """Whether the CPU wrapper's shrink op leaves a token with slot index -1 without a LoRA contribution:
    one token of ones against one slot whose A is all ones (vLLM 0.32 reads that slot as weights[-1])."""
    from vllm.lora.punica_wrapper import punica_cpu

    out = torch.zeros(1, 2)
    punica_cpu.bgmv_shrink(torch.ones(1, 3), torch.ones(1, 1, 2, 3), out, torch.tensor([-1]), 1.0)
    return bool((out == 0).all())


def exact_base_rows(manager) -> None:
    """Fix 1 (see the module docstring) in every CPU punica wrapper of this LoRA manager, unless the
    installed vLLM's CPU ops already skip slot -1."""
    if cpu_ops_skip_unset_slot():
        return
    cpu_class, exact_class = _exact_base_class()
    for wrapper in getattr(manager, "punica_wrapper_mapping", {}).values():
        if type(wrapper) is cpu_class:  # GPU kernels skip index -1 themselves
            wrapper.__class__ = exact_class  # same state, one overridden method


def attach(manager, spec: DogeSpec) -> None:
    """Apply both fixes to this model's LoRA manager (see the module docstring)."""
    from . import surface

    surface.require(surface.LORA)
    add_adapter = manager._add_adapter

    def checked_add_adapter(lora_model) -> None:
        check_adapter(spec, lora_model)
        add_adapter(lora_model)

    manager._add_adapter = checked_add_adapter
    exact_base_rows(manager)
