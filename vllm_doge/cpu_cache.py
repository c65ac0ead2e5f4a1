"""Slot-level access to one layer's paged KV cache on vLLM's CPU attention backend.

The keep window (keep_window.py) moves whole cached keys between slots and reads their bias and
position channels. vLLM has no public accessor for that: the CPU backend stores each layer's cache as
``[num_blocks, kv_heads, block_size, 2*P]`` but reinterprets every (block, kv head) page of
``2*block_size*P`` elements in an ISA-specific order (``vec``/``vec16``: K as ``[P, block_size]``
then V as ``[block_size, P]``; ``amx``: K packed in 4-byte groups of 16 tokens, V packed along
tokens). Rather than hard-coding those orders, :func:`probe_block_layout` learns the order once per
(isa, dtype, block size, P) by writing a coded pattern with the backend's own cache-write op into a
scratch cache. This module is the only place that depends on that private layout (and on the
``isa`` the CPU metadata builder sets on each layer); surface.py lists the vLLM pieces it uses.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Where each element of one (block, kv head) page lives.

    A page is ``kv_cache.view(num_blocks, kv_heads, -1)[block, head]``: ``2*n`` elements with
    n = block_size*P. ``key_index[t, c]`` / ``value_index[t, c]``: the page offset of token t's key or
    value channel c.
    """

    block_size: int
    head_size: int
    key_index: torch.Tensor
    value_index: torch.Tensor

    @classmethod
    def rows(cls, block_size: int, head_size: int) -> "BlockLayout":
        """Token-major pages, K then V per token (``[..., :P]`` / ``[..., P:]`` of a
        ``[blocks, kv_heads, block_size, 2P]`` view), as FlashAttention-style backends store them."""
        t = torch.arange(block_size)[:, None] * (2 * head_size)
        c = torch.arange(head_size)[None, :]
        return cls(block_size, head_size, t + c, t + head_size + c)


def _split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key/value views the CPU backend hands to its kernels (the same arithmetic as cpu_attn.py)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    view = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


@functools.lru_cache(maxsize=None)
def probe_block_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> BlockLayout:
    """Learn the page order of ``cpu_attn_reshape_and_cache(…, isa)`` by writing coded values.

    Every logical element (K or V, token, channel, and kv head 0/1) gets an id; the id is written in
    base-16 digits (values 1..16, exact in fp32/bf16/fp16), one write per digit, into block 1 of a
    two-block, two-head scratch cache. Decoding the digits found at each position gives the id stored
    there; the result must be a permutation, block 0 must stay untouched, and head 1's page must be
    head 0's shifted by one page (so the order is the same for every block and head).
    """
    from .surface import cpu_attn_reshape_and_cache

    write_cache = cpu_attn_reshape_and_cache()  # vllm._cpu_ops from 0.34 on, vllm._custom_ops before
    n = block_size * head_size
    page = 2 * n
    heads = 2
    ids = torch.arange(heads * page, dtype=torch.int64).view(heads, 2, block_size, head_size)
    key_ids = ids[:, 0].permute(1, 0, 2)  # [tokens, heads, channels]
    value_ids = ids[:, 1].permute(1, 0, 2)
    digits = max(1, math.ceil(math.log(heads * page, 16)))
    slots = torch.arange(block_size, 2 * block_size, dtype=torch.int64)

    def fail(why: str):
        return RuntimeError(
            f"Doge keep window: unexpected CPU KV-cache layout (isa={isa}, dtype={dtype}, "
            f"block_size={block_size}, head_size={head_size}): {why}"
        )

    decoded = torch.zeros(heads * page, dtype=torch.int64)
    for p in range(digits):
        kv_cache = torch.zeros(2, heads, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = _split_cache(kv_cache)
        key = ((key_ids // 16**p) % 16 + 1).to(dtype).contiguous()
        value = ((value_ids // 16**p) % 16 + 1).to(dtype).contiguous()
        write_cache(key, value, key_cache, value_cache, slots, isa)
        raw = kv_cache.float().reshape(2, heads * page)
        if not bool((raw[0] == 0).all()):
            raise fail("a write reached another block")
        if not bool(((raw[1] >= 1) & (raw[1] <= 16)).all()):
            raise fail("a block is not filled by its tokens")
        decoded += (raw[1].round().to(torch.int64) - 1) * 16**p
    if not torch.equal(decoded.sort().values, torch.arange(heads * page)):
        raise fail("positions do not form a permutation")
    where = torch.empty_like(decoded)
    where[decoded] = torch.arange(heads * page)
    where = where.view(heads, 2, block_size, head_size)
    if not torch.equal(where[1], where[0] + page):
        raise fail("pages differ between kv heads")
    return BlockLayout(block_size, head_size, where[0, 0].contiguous(), where[0, 1].contiguous())


def layer_layout(layer, kv_cache: torch.Tensor) -> BlockLayout:
    """The page order of an ``Attention`` layer's CPU cache (the metadata builder sets ``layer.isa``)."""
    isa = getattr(layer, "isa", None)
    if isa is None:
        raise RuntimeError(f"Doge keep window: layer {layer.layer_name} has no CPU attention ISA set")
    return probe_block_layout(isa, kv_cache.dtype, kv_cache.shape[2], kv_cache.shape[3] // 2)


class PagedSlots:
    """Key/value channels of cached tokens, addressed by (block, token in block), read and written through
    flat element offsets into the layer's cache (one gather or scatter per access).

    ``key_offsets(blocks, tokens, channels)`` with ``blocks``/``tokens`` of one shape [...] gives
    [..., kv_heads, C] offsets of those tokens' key channels in every kv head.
    """

    def __init__(self, kv_cache: torch.Tensor, layout: BlockLayout):
        num_blocks, kv_heads, block_size, width = kv_cache.shape
        page = block_size * width
        if kv_cache.stride(1) != page or kv_cache.stride(2) != width or kv_cache.stride(3) != 1:
            raise RuntimeError(f"Doge keep window: a (block, kv head) page of the KV cache is not contiguous: {kv_cache.stride()}")
        self.block_stride = kv_cache.stride(0)
        span = (num_blocks - 1) * self.block_stride + kv_heads * page
        self.flat = kv_cache.as_strided((span,), (1,))
        self.layout = layout
        self.head_offsets = torch.arange(kv_heads) * page

    def _offsets(self, index: torch.Tensor, blocks, tokens, channels) -> torch.Tensor:
        base = blocks.long()[..., None, None] * self.block_stride + self.head_offsets[:, None]
        return base + index[:, channels][tokens].unsqueeze(-2)

    def key_offsets(self, blocks: torch.Tensor, tokens: torch.Tensor, channels=slice(None)) -> torch.Tensor:
        return self._offsets(self.layout.key_index, blocks, tokens, channels)

    def value_offsets(self, blocks: torch.Tensor, tokens: torch.Tensor, channels=slice(None)) -> torch.Tensor:
        return self._offsets(self.layout.value_index, blocks, tokens, channels)

    def read(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.flat[offsets]

    def write(self, offsets: torch.Tensor, values: torch.Tensor) -> None:
        self.flat[offsets] = values.to(self.flat.dtype)

    def keys(self, blocks: torch.Tensor, tokens: torch.Tensor, channels=slice(None)) -> torch.Tensor:
        return self.read(self.key_offsets(blocks, tokens, channels))

    def values(self, blocks: torch.Tensor, tokens: torch.Tensor, channels=slice(None)) -> torch.Tensor:
        return self.read(self.value_offsets(blocks, tokens, channels))
