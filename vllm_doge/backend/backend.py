"""DOGE_ATTN: vLLM attention backend for Doge's dynamic mask on CPU.

A page holds, per (block, kv head), the block's K and V at head_dim d (no padding) and each key's
dynamic-mask bias in fp32, one per mask row of the kv head (1, or G for legacy checkpoints with one
mask per attention head): ``2·d·sizeof(dtype) + 4·C`` bytes per token and kv head, 1.008× a plain page
at d = 128 in bf16. The interior of a page is the kernels' (ops.py); vLLM only sizes, allocates,
frees and shares pages, which stay a pure function of their tokens (prefix caching holds).

The impl writes the cache itself (the bias travels beside k and v) and attends with the bias added to
every score, in the plugin's C++ kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from . import BACKEND_NAME, ops
BLOCK_MULTIPLE = 16  # tokens of a block: whole 16-key vectors, and pairs for the packed 16-bit layouts


class DogeAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["DogeAttentionImpl"]:
        return DogeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["DogeAttentionMetadataBuilder"]:
        return DogeAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(BLOCK_MULTIPLE)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # a (block, kv head) page is contiguous

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any even head size

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


def page_spec(spec: AttentionSpec, bias_channels: int) -> AttentionSpec:
    """The layer's spec with its page sized for K, V and the fp32 bias channels of each token."""
    return replace(spec, state_content_bytes=ops.cell_elements(spec.head_size, bias_channels, spec.dtype) * spec.dtype.itemsize)


@dataclass
class DogeAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32, keys of each request after this step
    block_table: torch.Tensor  # [R, max blocks] int32
    slot_mapping: torch.Tensor  # [tokens] int64


class DogeAttentionMetadataBuilder(AttentionMetadataBuilder[DogeAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> DogeAttentionMetadata:
        m = common_attn_metadata
        if m.causal is not True:
            raise NotImplementedError("Doge attention is causal; this batch asks for non-causal attention")
        return DogeAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
        )


class DogeAttentionImpl(AttentionImpl[DogeAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        bias_channels: int = 1,
    ) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "a logits soft cap": bool(logits_soft_cap),
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        }
        for what, present in unsupported.items():
            if present:
                raise NotImplementedError(f"{BACKEND_NAME} does not support {what}")
        if not ops.load():  # every worker process loads the build the config hook's process made
            raise RuntimeError(f"Doge: {BACKEND_NAME} was chosen, but its kernels do not load in this process (see the warning above)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window or 0
        self.kv_cache_dtype = kv_cache_dtype
        self.bias_channels = bias_channels

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        raise RuntimeError(f"{BACKEND_NAME} attends through DogeBiasAttention.forward, which carries the bias")

    def forward_with_bias(
        self,
        query: torch.Tensor,  # [T, H, d]
        key: torch.Tensor,  # [T, KV, d]
        value: torch.Tensor,  # [T, KV, d]
        bias: torch.Tensor,  # [T, KV, C] fp32
        kv_cache: torch.Tensor,  # [blocks, KV, block size, cell]
        metadata: DogeAttentionMetadata | None,
        output: torch.Tensor,  # [T, H, d]
    ) -> None:
        if metadata is None:  # profiling and warm-up runs carry no metadata
            return
        n = metadata.num_actual_tokens
        if n != query.shape[0]:  # padded batches: only the first n rows are tokens
            query, key, value, bias, output = (t[:n] for t in (query, key, value, bias, output))
        ops.cache_write(key, value, bias, kv_cache, metadata.slot_mapping[:n])
        ops.attention(
            output,
            query,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_table,
            self.scale,
            self.sliding_window,
            self.bias_channels,
        )
