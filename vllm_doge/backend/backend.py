"""DOGE_ATTN: vLLM attention backend for Doge's dynamic mask on CPU.

A page holds, per (block, kv head), the block's K and V at head_dim d (no padding) and each key's
dynamic-mask bias in fp32, one per mask row of the kv head (1, or G for legacy checkpoints with one
mask per attention head): ``2·d·sizeof(dtype) + 4·C`` bytes per token and kv head, 1.008× a plain page
at d = 128 in bf16; a keep-window layer adds each slot's key position (int32). The interior of a page
is the kernels' (ops.py); vLLM only sizes, allocates, frees and shares pages, which stay a pure function
of their tokens without a keep window (prefix caching holds).

The impl writes the cache itself, computing each key's bias on the way from the mask's inputs, and
attends with the bias added to every score, in the plugin's C++ kernels; past a keep window it relocates
keys first (keep_window.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
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


POSITION_BYTES = 4  # a keep-window layer's int32 original position of each slot's key


def page_spec(spec: AttentionSpec, bias_channels: int, keep_window: bool) -> AttentionSpec:
    """The layer's spec with its page sized for K, V, the fp32 bias channels of each token and, in a
    keep-window layer, each slot's key position."""
    cell = ops.cell_elements(spec.head_size, bias_channels, spec.dtype) * spec.dtype.itemsize
    return replace(spec, state_content_bytes=cell + (POSITION_BYTES if keep_window else 0))


@dataclass
class DecodeRows:
    """The one-query requests of a step that also has prefill chunks, as a batch of their own."""

    rows: torch.Tensor  # [R'] int64: their query rows
    query_start_loc: torch.Tensor  # [R' + 1] int32
    seq_lens: torch.Tensor
    block_table: torch.Tensor


@dataclass
class DogeAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32, keys of each request after this step
    block_table: torch.Tensor  # [R, max blocks] int32
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64
    # Keep-window layers (the step plan, shared by the group's layers): chunks of several queries go to
    # the exact top-W prefill op; one-query requests to the windowed attention, all of them (None) or
    # `decode` (a mixed step), or none (`has_decode` False).
    has_prefill: bool = False
    has_decode: bool = True
    decode: DecodeRows | None = None


class DogeAttentionMetadataBuilder(AttentionMetadataBuilder[DogeAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()
        windows = {getattr(layer.impl, "keep_window", 0) for layer in layers}
        if len(windows) != 1:
            raise ValueError(f"{BACKEND_NAME}: one KV cache group mixes keep windows {sorted(windows)}")
        self.keep_window = windows.pop()

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> DogeAttentionMetadata:
        m = common_attn_metadata
        if m.causal is not True:
            raise NotImplementedError("Doge attention is causal; this batch asks for non-causal attention")
        metadata = DogeAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping[: m.num_actual_tokens],  # sliced once per step, not per layer
        )
        if self.keep_window:
            starts = m.query_start_loc[: m.num_reqs + 1]
            single = (starts[1:] - starts[:-1]) == 1
            metadata.has_prefill = not bool(single.all())
            metadata.has_decode = bool(single.any())
            if metadata.has_prefill and metadata.has_decode:
                reqs = single.nonzero().flatten()
                metadata.decode = DecodeRows(
                    rows=starts[reqs].long(),
                    query_start_loc=torch.arange(reqs.numel() + 1, dtype=torch.int32),
                    seq_lens=m.seq_lens[reqs],
                    block_table=m.block_table_tensor[reqs],
                )
        return metadata


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
        keep_window: int = 0,
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
        self.kv_cache_dtype = kv_cache_dtype
        self.bias_channels = bias_channels
        # A keep-window layer is a sliding window of W + 1 to vLLM (the slot that leaves is read by the
        # relocation); its queries attend the W slots that hold their kept keys.
        self.keep_window = keep_window
        if keep_window and bias_channels != 1:
            raise NotImplementedError(f"{BACKEND_NAME}: a keep window with {bias_channels} mask rows per kv head")
        self.window = keep_window or sliding_window or 0

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        raise RuntimeError(f"{BACKEND_NAME} attends through DogeBiasAttention.forward, which carries the mask")

    def forward_with_bias(
        self,
        query: torch.Tensor,  # [T, H, d]
        key: torch.Tensor,  # [T, KV, d]
        value: torch.Tensor,  # [T, KV, d]
        mask: tuple[torch.Tensor, ...],  # dt_input [T, inputs], dt_weight [KV·C, inputs], dt_bias, A [KV·C]
        positions: torch.Tensor | None,  # [T] (keep-window layers)
        kv_cache: torch.Tensor,  # [blocks, KV, block size, cell]
        metadata: DogeAttentionMetadata | None,
        output: torch.Tensor,  # [T, H, d]
    ) -> None:
        if metadata is None:  # profiling and warm-up runs carry no metadata
            return
        n = metadata.num_actual_tokens
        if n != query.shape[0]:  # padded batches: only the first n rows are tokens
            query, key, value, output = (t[:n] for t in (query, key, value, output))
            mask = (mask[0][:n], *mask[1:])
        slots = metadata.slot_mapping
        ops.cache_write_masked(key, value, *mask, kv_cache, slots)
        batch = (metadata.query_start_loc, metadata.seq_lens, metadata.block_table)
        if not self.keep_window:
            ops.attention(output, query, kv_cache, *batch, self.scale, self.window, self.bias_channels)
            return
        W = self.keep_window
        ops.keep_window_positions(kv_cache, positions[:n], slots, self.head_size, self.bias_channels)
        if metadata.has_prefill:
            ops.keep_window_prefill(output, query, kv_cache, *batch, self.scale, W)
        if not metadata.has_decode:
            return
        ops.keep_window_decode(kv_cache, *batch, W, self.head_size)
        decode = metadata.decode
        if decode is None:
            ops.attention(output, query, kv_cache, *batch, self.scale, W, self.bias_channels)
            return
        rows = output.new_empty((decode.rows.numel(), *output.shape[1:]))
        ops.attention(
            rows, query[decode.rows], kv_cache, decode.query_start_loc, decode.seq_lens, decode.block_table,
            self.scale, W, self.bias_channels,
        )  # fmt: skip
        output[decode.rows] = rows
