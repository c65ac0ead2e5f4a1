"""DogeBiasAttention: vLLM's Attention layer with a per-key bias beside k and v, on DOGE_ATTN.

``Attention.forward`` carries q, k and v only, so this layer has a forward of its own that hands the
bias to the backend through one opaque custom op (``torch.ops.vllm_doge.biased_attention``): it reads
the step's metadata and the layer's cache from the forward context, which torch.compile must not trace,
and writes the cache before it attends. Everything else (the spec, the cache binding, registration in
the forward context) is vLLM's Attention.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.utils.torch_utils import direct_register_custom_op

from .backend import DogeAttentionBackend, page_spec


class DogeBiasAttention(Attention):
    def __init__(self, num_heads: int, head_size: int, scale: float, *, num_kv_heads: int, bias_channels: int, **kwargs) -> None:
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads=num_kv_heads,
            attn_backend=DogeAttentionBackend,
            bias_channels=bias_channels,
            **kwargs,
        )
        self.bias_channels = bias_channels

    def get_kv_cache_spec(self, vllm_config):
        return page_spec(super().get_kv_cache_spec(vllm_config), self.bias_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """query [T, H·d], key/value [T, KV·d], bias [T, KV, C] fp32 -> [T, H·d]."""
        tokens = query.shape[0]
        output = torch.empty(tokens, self.num_heads, self.head_size, dtype=query.dtype, device=query.device)
        torch.ops.vllm_doge.biased_attention(
            query.view(tokens, self.num_heads, self.head_size),
            key.view(tokens, self.num_kv_heads, self.head_size),
            value.view(tokens, self.num_kv_heads, self.head_size),
            bias,
            output,
            self.layer_name,
        )
        return output.view(tokens, -1)


def biased_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, output: torch.Tensor, layer_name: str
) -> None:
    metadata, layer, kv_cache, _ = get_attention_context(layer_name)
    layer.impl.forward_with_bias(query, key, value, bias, kv_cache, metadata, output)


def _biased_attention_fake(query, key, value, bias, output, layer_name: str) -> None:
    return None


_LIBRARY = torch.library.Library("vllm_doge", "FRAGMENT")
direct_register_custom_op(
    "biased_attention", biased_attention, mutates_args=["output"], fake_impl=_biased_attention_fake, target_lib=_LIBRARY
)
