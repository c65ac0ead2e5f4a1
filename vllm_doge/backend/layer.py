"""DogeBiasAttention: vLLM's Attention layer with a per-key bias beside k and v, on DOGE_ATTN.

``Attention.forward`` carries q, k and v only, so this layer has a forward of its own that hands the
mask's inputs (from which the cache write computes each key's bias) to the backend through one opaque
custom op (``torch.ops.vllm_doge.biased_attention``): it reads the step's metadata and the layer's cache
from the forward context, which torch.compile must not trace, and writes the cache (past a keep window
also relocating keys in it) before it attends. Everything else (the spec, the cache binding,
registration in the forward context) is vLLM's Attention.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.utils.torch_utils import direct_register_custom_op

from .backend import DogeAttentionBackend, page_spec


class DogeBiasAttention(Attention):
    def __init__(
        self, num_heads: int, head_size: int, scale: float, *, num_kv_heads: int, bias_channels: int,
        keep_window: int = 0, **kwargs,
    ) -> None:  # fmt: skip
        """keep_window W > 0: the layer keeps each query's top-W keys by bias (a sliding window of W + 1
        slots to vLLM, see keep_window.py)."""
        if keep_window:
            kwargs["per_layer_sliding_window"] = keep_window + 1
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads=num_kv_heads,
            attn_backend=DogeAttentionBackend,
            bias_channels=bias_channels,
            keep_window=keep_window,
            **kwargs,
        )
        self.bias_channels = bias_channels
        self.keep_window = keep_window

    def get_kv_cache_spec(self, vllm_config):
        return page_spec(super().get_kv_cache_spec(vllm_config), self.bias_channels, bool(self.keep_window))

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dt_input: torch.Tensor,
        dt_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, positions: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """query [T, H·d], key/value [T, KV·d]; the bias of mask row r (kv head · C + channel) is
        exp(A[r] · softplus(dt_weight[r] · dt_input[t] + dt_bias[r])); positions [T] (keep window)
        -> [T, H·d]."""
        tokens = query.shape[0]
        output = torch.empty(tokens, self.num_heads, self.head_size, dtype=query.dtype, device=query.device)
        torch.ops.vllm_doge.biased_attention(
            query.view(tokens, self.num_heads, self.head_size),
            key.view(tokens, self.num_kv_heads, self.head_size),
            value.view(tokens, self.num_kv_heads, self.head_size),
            dt_input,
            dt_weight,
            dt_bias,
            A,
            positions if self.keep_window else None,
            output,
            self.layer_name,
        )
        return output.view(tokens, -1)


def biased_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dt_input: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    positions: torch.Tensor | None,
    output: torch.Tensor,
    layer_name: str,
) -> None:
    metadata, layer, kv_cache, _ = get_attention_context(layer_name)
    mask = (dt_input, dt_weight, dt_bias, A)
    layer.impl.forward_with_bias(query, key, value, mask, positions, kv_cache, metadata, output)


def _biased_attention_fake(query, key, value, dt_input, dt_weight, dt_bias, A, positions, output, layer_name: str) -> None:
    return None


_LIBRARY = torch.library.Library("vllm_doge", "FRAGMENT")
direct_register_custom_op(
    "biased_attention", biased_attention, mutates_args=["output"], fake_impl=_biased_attention_fake, target_lib=_LIBRARY
)
