"""Doge's keep window served as a sliding window of W + 1 slots, exactly (design §3b).

Past ``keep_window_size`` (W) keys, a query keeps only its W keys with the largest bias (equal biases:
the earlier key wins). The bias depends on the key alone, so the kept set only shrinks:
K_p = top-W(K_{p-1} ∪ {p}). Each layer is declared sliding-window W + 1, so vLLM frees every block
wholly before the window and the stock kernel reads the slots p-W … p of a query at p. This module keeps
the invariant

    after step p, the slots (p-W, p] of each (request, kv head) hold exactly K_p

by relocating keys inside the window before vLLM writes the step's keys and runs the kernel:

- decode (one query at p >= W): the key e with the lowest rank in K_{p-1} ∪ {p} leaves. Slot p-W's key
  moves into e's slot (or becomes the new token's key when e is the new one, so that vLLM's own cache
  write puts it in slot p), and slot p-W is marked dead: its bias channel holds a large finite negative
  value that gives it weight exactly 0. The stock kernel then sees exactly K_p.
- a prefill chunk p0 … p1 with p1 >= W: every row is computed here, exactly, from K_{p0-1} (read from
  the slots (p0-1-W, p0-1]) and the chunk's own keys, in blocks of queries, each against at most
  W + block candidates; the kernel's rows are replaced. Then K_{p1} is packed into (p1-W, p1].

A relocated key keeps its original position for the tie rule: k' carries it in spare channels of the
padded head (base-256 digits, exact in fp32, bf16 and fp16), where q' is zero. Keys are never read below
the window start: the worker's block table still lists freed blocks, which may hold other requests' keys.

The step runs as a custom op (``torch.ops.vllm_doge.keep_window``), opaque to torch.compile: it reads
the forward context, which is not set while vLLM traces the model, and edits the cache in place, which a
traced graph would not order. It mutates the step's k/v (which feed vLLM's cache write) and returns the
exact rows, so the graph orders it before vLLM's attention ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.utils.torch_utils import direct_register_custom_op

from .cpu_cache import PagedSlots, layer_layout

POSITION_BASE = 256  # digits 0..255: integers exact in bf16 (8 significant bits) and wider types
# Queries per block of the exact prefill path; each scores W + block candidates.
QUERY_BLOCK = 128


def keep_window_binds(keep_window_size: int | None, sliding_window: int | None, max_model_len: int) -> bool:
    """Whether some query can see more than W keys (then the layer relocates keys; else the fold alone
    is exact; None: no keep window). A true sliding window wider than W lets keys that left the kept set
    return: refused."""
    if keep_window_size is None or max_model_len <= keep_window_size or (sliding_window is not None and sliding_window <= keep_window_size):
        return False
    if sliding_window is not None:
        raise ValueError(
            f"Doge: keep_window_size {keep_window_size} together with sliding_window {sliding_window} > "
            f"keep_window_size cannot be served exactly (keys leaving the sliding window let dropped keys "
            f"return). Serve with --max-model-len <= {keep_window_size}."
        )
    return True


def position_digits(max_model_len: int) -> int:
    """Base-256 digits that hold every position below max_model_len."""
    digits = 1
    while POSITION_BASE**digits < max_model_len:
        digits += 1
    return digits


def encode_positions(positions: torch.Tensor, digits: int, dtype: torch.dtype) -> torch.Tensor:
    """[T] int positions -> [T, digits] base-256 digits, least significant first."""
    scale = POSITION_BASE ** torch.arange(digits, device=positions.device)
    return (positions[:, None] // scale % POSITION_BASE).to(dtype)


def decode_positions(digits: torch.Tensor) -> torch.Tensor:
    """[..., digits] (any float dtype, integer values) -> [...] int64."""
    positions = digits[..., -1].long()
    for i in range(digits.shape[-1] - 2, -1, -1):
        positions = positions * POSITION_BASE + digits[..., i].long()
    return positions


def key_order(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A strict total order of keys as int64: by bias, then the earlier position first.

    Equal biases are real (in layer 0 a repeated token has exactly its earlier copy's bias; bf16
    rounding makes more), so the kept set is decided by (bias, -position), the same whatever way a
    sequence is batched or chunked. ``bias`` [...] (any float dtype; a live key's bias is an exp(), >= 0,
    so its fp32 bits order like its value), ``positions`` broadcastable to it.
    """
    bits = bias.float().contiguous().view(torch.int32).long()
    return (bits << 32) | (0x7FFFFFFF - positions)


def stored_order(channels: torch.Tensor) -> torch.Tensor:
    """key_order of cached keys from their channels d … d+D ([..., 1+D]: the bias, then position digits)."""
    return key_order(channels[..., 0], decode_positions(channels[..., 1:]))


def dead_bias(dtype: torch.dtype) -> float:
    """The bias of a dead slot: finite even after the fold's ×1/scale (up to head size 4096), so the
    zero channels of other heads give 0·bias = 0, not NaN.

    Its softmax weight is exactly 0: the kernels take the softmax in fp32, where exp(x) rounds to 0 below
    x = ln 2^-150 ≈ -103.97, and the dead score is bias + c_dead while the best live score is at least
    c_live (live biases are > 0), with c = q·k/√d the content part. fp32 and bf16: bias ≈ -5.3e36. fp16,
    the smallest range: bias = -65504/64 = -1023.5, so the weight is 0 while |c| < (1023.5 - 103.97) / 2
    ≈ 459 for every key: q/k-normed content scores of a trained model are orders of magnitude below."""
    return -torch.finfo(dtype).max / 64


# --------------------------------------------------------------------------------------------------
# Decode: one relocation and one dead mark per (request, kv head)
# --------------------------------------------------------------------------------------------------


@dataclass
class DecodePlan:
    """Where the one-query requests of a step read and write, the same for every layer of the step (the
    layers share the block table and the cache shape): computed once per step.

    For R requests at positions p >= W: ``meta`` [R, W, kvh, 1+D] offsets of the bias and position
    channels of slots p-W … p-1 (K_{p-1}); ``first_k``/``first_v`` [R, kvh, P] offsets of slot p-W's rows;
    ``bases``/``tokens`` [R, W] each slot's block offset and token in block.
    """

    rows: torch.Tensor
    p: torch.Tensor
    meta: torch.Tensor
    first_k: torch.Tensor
    first_v: torch.Tensor
    bases: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def build(cls, slots: PagedSlots, block_table, reqs, p, rows, head_dim: int, digits: int, W: int) -> "DecodePlan":
        bs = slots.layout.block_size
        window = p[:, None] - W + torch.arange(W)
        blocks = block_table[reqs[:, None], window // bs]
        tokens = window % bs
        return cls(
            rows=rows,
            p=p,
            meta=slots.key_offsets(blocks, tokens, slice(head_dim, head_dim + 1 + digits)),
            first_k=slots.key_offsets(blocks[:, 0], tokens[:, 0]),
            first_v=slots.value_offsets(blocks[:, 0], tokens[:, 0]),
            bases=blocks.long() * slots.block_stride,
            tokens=tokens,
        )


def relocate_decode(slots: PagedSlots, plan: DecodePlan, key, value, head_dim: int, W: int) -> None:
    """One-query requests at positions p >= W: make slots (p-W, p] hold K_p.

    ``key``/``value`` [T, kv_heads, P] are the step's folded rows (written to slot p by vLLM afterwards).
    Every (request, kv head) does the same work, whichever key leaves: slot p-W's row is copied onto the
    leaving key's slot (onto itself when the leaving key is p-W's or the new one; the new one is then
    replaced by it), then slot p-W is marked dead.
    """
    old = stored_order(slots.read(plan.meta))  # [R, W, kvh]
    new = key_order(key[plan.rows, :, head_dim], plan.p[:, None])  # [R, kvh]
    lowest, dst = old.min(1)  # [R, kvh]
    new_leaves = (new < lowest)[..., None]
    dst.masked_fill_(new_leaves[..., 0], 0)  # the new key leaves: slot p-W's row takes its place

    first_k, first_v = slots.read(plan.first_k), slots.read(plan.first_v)  # slot p-W: [R, kvh, P]
    base = plan.bases.gather(1, dst)[..., None] + slots.head_offsets[:, None]  # [R, kvh, 1]
    tokens = plan.tokens.gather(1, dst)
    slots.write(base + slots.layout.key_index[tokens], first_k)
    slots.write(base + slots.layout.value_index[tokens], first_v)
    key[plan.rows] = torch.where(new_leaves, first_k, key[plan.rows])
    value[plan.rows] = torch.where(new_leaves, first_v, value[plan.rows])
    slots.write(plan.first_k[..., head_dim], torch.full_like(first_k[..., 0], dead_bias(key.dtype)))


# --------------------------------------------------------------------------------------------------
# Prefill chunks: exact rows from K_{p0-1} and the chunk, then K_{p1} packed into (p1-W, p1]
# --------------------------------------------------------------------------------------------------


def chunk_attention(q, new, kept, *, scale: float, W: int, head_dim: int):
    """Exact keep-window attention for the queries of one chunk, one per chunk key, in order.

    q [c, H, P] folded queries; ``new`` = (k, v, order, slot) of the chunk's keys and ``kept`` the same
    for K_{p0-1}: k / v [kvh, n, P], order / slot [kvh, n] (m <= W old keys per head; slot = where a
    key is cached). Query i keeps key j iff j is visible (an old key, or a chunk key at or before i)
    and fewer than W visible keys rank above it. Queries go in blocks; each block is scored against
    the kept set before it plus its own keys. Only the channels q' and v carry are multiplied: q·k and
    the bias (d + 1), and v (d). Returns (out [c, H, d] fp32, the kept set after the last query).
    """
    c, num_heads, _ = q.shape
    k_new, v_new, order_new, slot_new = new
    kvh, _, p = k_new.shape
    groups = num_heads // kvh
    out = torch.empty(c, num_heads, head_dim, dtype=torch.float32)
    k, v, order, slot = kept
    for a in range(0, c, QUERY_BLOCK):
        b = min(c, a + QUERY_BLOCK)
        s, m = b - a, order.shape[1]
        k = torch.cat([k, k_new[:, a:b]], 1)  # candidates [kvh, m+s, P]
        v = torch.cat([v, v_new[:, a:b]], 1)
        block_order = order_new[:, a:b]
        order = torch.cat([order, block_order], 1)
        slot = torch.cat([slot, slot_new[:, a:b]], 1)
        # Keys ranked above candidate j: old ones (fixed), plus chunk keys up to query i (a running count).
        above = (order[:, :m, None] > order[:, None, :]).sum(1)  # [kvh, m+s]
        above = above[:, None, :] + (block_order[:, :, None] > order[:, None, :]).cumsum(1, dtype=torch.int16)
        visible = torch.ones(s, m + s, dtype=torch.bool)
        visible[:, m:] = torch.ones(s, s, dtype=torch.bool).tril()
        keep = visible & (above < W)  # [kvh, s, m+s]
        qf = q[a:b, :, : head_dim + 1].float().view(s, kvh, groups, -1).permute(1, 2, 0, 3)  # [kvh, G, s, d+1]
        scores = (qf @ k[..., : head_dim + 1].float().transpose(1, 2)[:, None]).mul_(scale)
        probs = scores.masked_fill_(~keep[:, None], float("-inf")).softmax(-1)
        out[a:b] = (probs @ v[..., :head_dim].float()[:, None]).permute(2, 0, 1, 3).reshape(s, num_heads, head_dim)
        if m + s > W:
            top = order.topk(W, dim=1, sorted=False).indices
            rows = top[..., None].expand(-1, -1, p)
            k, v, order, slot = k.gather(1, rows), v.gather(1, rows), order.gather(1, top), slot.gather(1, top)
    return out, (k, v, order, slot)


def prefill_chunk(slots: PagedSlots, block_row, p0: int, rows: slice, query, key, value, out, head_dim, digits, W, scale):
    """One request's chunk at positions p0 … p1 (p1 >= W, rows ``rows`` of the step): exact output
    rows into ``out``, then K_{p1} packed into the slots (p1-W, p1]."""
    bs = slots.layout.block_size
    c = rows.stop - rows.start
    p1 = p0 + c - 1
    kvh = key.shape[1]
    # K_{p0-1}: all keys before p0 while p0 <= W, else the slots (p0-1-W, p0-1] (the invariant).
    old = torch.arange(max(0, p0 - W), p0)
    blocks, tokens = block_row[old // bs], old % bs
    k_old = slots.keys(blocks, tokens).transpose(0, 1)  # [kvh, m, P]
    v_old = slots.values(blocks, tokens).transpose(0, 1)
    order_old = stored_order(k_old[..., head_dim : head_dim + 1 + digits])
    k_new, v_new = key[rows].transpose(0, 1), value[rows].transpose(0, 1)  # [kvh, c, P]
    positions = torch.arange(p0, p1 + 1)
    new = (k_new, v_new, key_order(k_new[..., head_dim], positions), positions.expand(kvh, -1))
    kept = (k_old, v_old, order_old, old.expand(kvh, -1))
    result, (k, v, _, slot) = chunk_attention(query[rows], new, kept, scale=scale, W=W, head_dim=head_dim)
    out[rows, :, :head_dim] = result.to(out.dtype)
    out[rows, :, head_dim:] = 0

    # Pack: kept keys already in (p1-W, p1] stay; the others move into the slots there that hold a
    # dropped key. Chunk slots are written through the step's k/v rows, earlier ones in the cache.
    first = p1 - W + 1
    inside = slot >= first
    vacant = torch.ones(kvh, W, dtype=torch.bool)
    h, j = inside.nonzero(as_tuple=True)
    vacant[h, slot[h, j] - first] = False
    h_to, dst = vacant.nonzero(as_tuple=True)  # both sorted by head, with equal counts per head
    h_from, src = (~inside).nonzero(as_tuple=True)
    dst = dst + first
    moved_k, moved_v = k[h_from, src], v[h_from, src]
    in_chunk = dst >= p0
    key[rows.start + dst[in_chunk] - p0, h_to[in_chunk]] = moved_k[in_chunk]
    value[rows.start + dst[in_chunk] - p0, h_to[in_chunk]] = moved_v[in_chunk]
    cached = ~in_chunk
    if cached.any():
        d = dst[cached]
        heads = h_to[cached]
        blocks, tokens = block_row[d // bs], d % bs
        slots.write(slots.key_offsets(blocks, tokens)[torch.arange(d.numel()), heads], moved_k[cached])
        slots.write(slots.value_offsets(blocks, tokens)[torch.arange(d.numel()), heads], moved_v[cached])


# --------------------------------------------------------------------------------------------------
# The step, as a custom op
# --------------------------------------------------------------------------------------------------


def keep_window_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_name: str,
    head_dim: int,
    keep_window_size: int,
    digits: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relocate this step's keys for one layer (mutates ``key``/``value`` [T, kvh, P] before vLLM
    writes them) and return (exact rows [T, H, P], which rows to take from it [T])."""
    exact = torch.empty_like(query)
    use = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    md, layer, kv_cache, _ = get_attention_context(layer_name)
    W = keep_window_size
    if md is None or kv_cache.numel() == 0 or md.max_seq_len <= W:
        return exact, use  # warm-up, profiling, or every request within the window
    if md.causal is not True:
        raise RuntimeError("Doge keep window: only causal decoder attention is supported")
    slots = PagedSlots(kv_cache, layer_layout(layer, kv_cache))
    plan = _step_plan(md, slots, head_dim, digits, W)
    if plan.decode is not None:
        relocate_decode(slots, plan.decode, key, value, head_dim, W)
    for r, rows, p0 in plan.prefill:
        prefill_chunk(slots, md.block_table[r], p0, rows, query, key, value, exact, head_dim, digits, W, scale)
        use[rows] = True
    return exact, use


@dataclass
class StepPlan:
    """What a step does, computed by its first layer and reused by the others: they share the metadata
    object (one KV cache group), the block table and the cache shape."""

    md: object
    layout: object
    params: tuple
    decode: DecodePlan | None
    prefill: list[tuple[int, slice, int]]  # (request, its rows, first position) of chunks ending past W


_last_plan: StepPlan | None = None


def _step_plan(md, slots: PagedSlots, head_dim: int, digits: int, W: int) -> StepPlan:
    global _last_plan
    params = (slots.block_stride, head_dim, digits, W)
    last = _last_plan
    if last is not None and last.md is md and last.layout is slots.layout and last.params == params:
        return last
    num_reqs = md.seq_lens.shape[0]
    starts = md.query_start_loc[: num_reqs + 1].long()
    q_lens = starts[1:] - starts[:-1]
    seq_lens = md.seq_lens.long()
    past = seq_lens > W  # the last query of the step sees more than W keys
    reqs = ((q_lens == 1) & past).nonzero().flatten()
    decode = None
    if reqs.numel():
        decode = DecodePlan.build(slots, md.block_table, reqs, seq_lens[reqs] - 1, starts[reqs], head_dim, digits, W)
    prefill = [
        (r, slice(int(starts[r]), int(starts[r + 1])), int(seq_lens[r] - q_lens[r]))
        for r in ((q_lens > 1) & past).nonzero().flatten().tolist()
    ]
    _last_plan = StepPlan(md, slots.layout, params, decode, prefill)
    return _last_plan


def _keep_window_step_fake(query, key, value, layer_name, head_dim, keep_window_size, digits, scale):
    return torch.empty_like(query), torch.empty(query.shape[0], dtype=torch.bool, device=query.device)


_LIBRARY = torch.library.Library("vllm_doge", "FRAGMENT")
direct_register_custom_op(
    "keep_window",
    keep_window_step,
    mutates_args=["key", "value"],
    fake_impl=_keep_window_step_fake,
    target_lib=_LIBRARY,
)
