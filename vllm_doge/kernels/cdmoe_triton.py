"""Fused Triton kernel for the routed half of Doge's CDMoE layer.

For every token t, given its k routed expert ids e_i and routing weights w_i, it computes

    out[t] = sum_i  w_i * silu(down_embed[e_i] . h[t]) * up_embed[e_i]

in one pass: gather of the k down rows, dot products with h, activation, scaling by w, gather of the
k up rows and their weighted sum. Everything accumulates in fp32 whatever the input dtype (fp32, fp16,
bf16); the result is cast to h's dtype at the end.

Grid: (T, S). Program (t, s) computes the k dot products of token t over the whole hidden size, then
writes output columns [s * cols_per_prog, (s + 1) * cols_per_prog). With S > 1 the down rows are read by
S programs (mostly from L2) in exchange for more programs in flight, which only pays for small T
(decode); for prefill S = 1.

This module imports no vLLM: it is usable (and tested) on its own, and under `TRITON_INTERPRET=1`
on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cdmoe_routed_triton", "default_launch_config"]


@triton.jit
def _cdmoe_routed_kernel(
    h_ptr,
    w_ptr,
    ids_ptr,
    down_ptr,
    up_ptr,
    out_ptr,
    hidden,
    top_k,
    cols_per_prog,
    stride_h_t,
    stride_h_d,
    stride_w_t,
    stride_w_k,
    stride_ids_t,
    stride_ids_k,
    stride_down_e,
    stride_down_d,
    stride_up_e,
    stride_up_d,
    stride_out_t,
    stride_out_d,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)

    # Routing of this token: k expert ids and weights (masked lanes get weight 0 and id 0).
    k_offs = tl.arange(0, BLOCK_K)
    k_mask = k_offs < top_k
    ids = tl.load(ids_ptr + tok * stride_ids_t + k_offs * stride_ids_k, mask=k_mask, other=0)
    ids = ids.to(tl.int64)
    w = tl.load(w_ptr + tok * stride_w_t + k_offs * stride_w_k, mask=k_mask, other=0.0)
    w = w.to(tl.float32)

    down_rows = down_ptr + ids * stride_down_e  # [BLOCK_K] row base pointers
    up_rows = up_ptr + ids * stride_up_e
    h_row = h_ptr + tok * stride_h_t

    # Phase 1: scores[i] = down_embed[e_i] . h, over the full hidden size in BLOCK_H chunks.
    scores = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, hidden, BLOCK_H):
        d_offs = d0 + tl.arange(0, BLOCK_H)
        d_mask = d_offs < hidden
        hv = tl.load(h_row + d_offs * stride_h_d, mask=d_mask, other=0.0).to(tl.float32)
        rows = tl.load(
            down_rows[:, None] + d_offs[None, :] * stride_down_d,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        scores += tl.sum(rows * hv[None, :], axis=1)

    # silu(s) * w; masked lanes carry w = 0, so they add nothing below.
    coef = scores * tl.sigmoid(scores) * w

    # Phase 2: this program's slice of output columns, again in BLOCK_H chunks.
    col_start = split * cols_per_prog
    col_end = tl.minimum(col_start + cols_per_prog, hidden)
    out_row = out_ptr + tok * stride_out_t
    for d0 in range(col_start, col_end, BLOCK_H):
        d_offs = d0 + tl.arange(0, BLOCK_H)
        d_mask = d_offs < col_end
        rows = tl.load(
            up_rows[:, None] + d_offs[None, :] * stride_up_d,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.sum(rows * coef[:, None], axis=0)
        tl.store(out_row + d_offs * stride_out_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def default_launch_config(num_tokens: int, hidden: int, top_k: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_H, splits) used when the caller does not choose.

    BLOCK_K covers all k ids of a token in one tile. BLOCK_H keeps a [BLOCK_K, BLOCK_H] fp32 tile at
    <= 4096 elements (32 registers a thread with 4 warps). Splitting output columns across programs
    only helps when there are too few tokens to fill the GPU; aim for roughly 256 programs.
    """
    block_k = max(triton.next_power_of_2(top_k), 1)
    block_h = min(triton.next_power_of_2(hidden), max(16, 4096 // block_k))
    n_chunks = triton.cdiv(hidden, block_h)
    splits = 1
    if num_tokens < 256:
        splits = max(1, min(n_chunks, 256 // max(num_tokens, 1)))
    return block_k, block_h, splits


def cdmoe_routed_triton(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    down_embed: torch.Tensor,
    up_embed: torch.Tensor,
    *,
    block_h: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Routed-experts sum with SiLU, fused in one Triton kernel.

    h: [T, hidden]; weights: [T, k] (any float dtype, read as fp32); ids: [T, k] int32/int64 expert ids
    (must be valid rows: no bounds check in the kernel); down_embed, up_embed: [E, hidden].
    Returns [T, hidden] in h's dtype. `block_h` / `splits` override the launch heuristic (benchmarks).
    """
    if h.dim() != 2 or weights.dim() != 2 or ids.dim() != 2:
        raise ValueError("cdmoe_routed_triton expects h [T, hidden], weights and ids [T, k]")
    num_tokens, hidden = h.shape
    top_k = ids.shape[1]
    if weights.shape != ids.shape or ids.shape[0] != num_tokens:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weights {tuple(weights.shape)}, ids {tuple(ids.shape)}")
    if down_embed.shape[1] != hidden or up_embed.shape != down_embed.shape:
        raise ValueError(
            f"expert tables must be [E, {hidden}]: got {tuple(down_embed.shape)} and {tuple(up_embed.shape)}"
        )
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    if num_tokens == 0 or top_k == 0:
        return out.zero_()

    block_k, auto_block_h, auto_splits = default_launch_config(num_tokens, hidden, top_k)
    block_h = auto_block_h if block_h is None else triton.next_power_of_2(block_h)
    if splits is None:
        splits = auto_splits if block_h == auto_block_h else 1
    n_chunks = triton.cdiv(hidden, block_h)
    splits = max(1, min(splits, n_chunks))
    # Each split owns a whole number of BLOCK_H chunks.
    cols_per_prog = triton.cdiv(n_chunks, splits) * block_h
    splits = triton.cdiv(hidden, cols_per_prog)

    grid = (num_tokens, splits)
    _cdmoe_routed_kernel[grid](
        h,
        weights,
        ids,
        down_embed,
        up_embed,
        out,
        hidden,
        top_k,
        cols_per_prog,
        h.stride(0),
        h.stride(1),
        weights.stride(0),
        weights.stride(1),
        ids.stride(0),
        ids.stride(1),
        down_embed.stride(0),
        down_embed.stride(1),
        up_embed.stride(0),
        up_embed.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_K=block_k,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out


# An opaque custom op, so that torch.compile (vLLM compiles the model) treats the launch as one node
# instead of tracing into the Python wrapper. Its fake implementation only describes the output.
@torch.library.custom_op("vllm_doge::cdmoe_routed", mutates_args=())
def cdmoe_routed_op(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    down_embed: torch.Tensor,
    up_embed: torch.Tensor,
) -> torch.Tensor:
    return cdmoe_routed_triton(h, weights, ids, down_embed, up_embed)


@cdmoe_routed_op.register_fake
def _cdmoe_routed_fake(h, weights, ids, down_embed, up_embed):
    return torch.empty_like(h, memory_format=torch.contiguous_format)
