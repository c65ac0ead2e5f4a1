"""Exact keep-window attention for Doge on vLLM's CPU attention backend.

Doge keeps, for a query that sees more than ``keep_window_size`` (W) keys, only its W keys with the
largest per-key bias ``b_j`` (the others get -inf). The model folds the bias into the paged cache
(design §3): with head_dim d and padded head size P, ``k' = [k, b, 0…]``, ``q' = [q, 1/scale, 0…]``,
``v' = [v, 0…]``, so channel d of every cached key carries its bias and the stock kernel computes
``q'·k'·scale = q·k·scale + b``. That is exact while a query sees at most W keys. The per-query top-W
cannot be expressed to a stock kernel, so :func:`wrap_keep_window` wraps the layer's backend impl:
after the stock forward (which fills every output row), the rows of queries that see more than W keys
are recomputed exactly from the paged cache (every key of the request is read back through its block
table, so prefix-cache hits and chunked prefill are covered) and overwritten.

Eviction (prefix caching off, no sliding window). The bias does not depend on the query, so the kept set
only shrinks as a sequence grows: top-W(S ∪ {x}) = top-W(top-W(S) ∪ {x}), and a key that falls out of a
query's window never comes back for a later query. Before the stock kernel runs, every key a request's
first query of the step no longer keeps gets its cached bias overwritten with a huge negative value
(:func:`evict_outside_window`; biases are exp(…) > 0, so it ranks below every live key): the kernel
then gives it a weight of exactly 0, one-query rows need no fix-up, and only the later rows of
multi-query steps (prefill chunks) are recomputed. Shared prefix-cache blocks must not be edited this
way (another request's window differs), nor may a sliding window let keys return, so the wrapper evicts
only when both are off.

Where things happen in vLLM 0.32 (CPU):
- ``Attention.forward`` runs ``torch.ops.vllm.unified_kv_cache_update`` (which calls
  ``impl.do_kv_cache_update`` -> ``torch.ops._C.cpu_attn_reshape_and_cache``) *before*
  ``torch.ops.vllm.unified_attention_with_output`` (which calls ``impl.forward``), because
  ``CPUAttentionBackend.forward_includes_kv_cache_update`` is False. When ``impl.forward`` runs, the
  keys of this step are already in the cache. (The wrapper calls the stock forward first, so a
  backend that writes inside ``forward`` would be covered as well.)
- Both are opaque custom ops for torch.compile on CPU (``CpuPlatform.opaque_attention_op()`` is
  True), so the Python in the wrapper runs eagerly at run time even with compilation on; the CPU
  platform captures no graphs (``cudagraph_capture_sizes = []``).
- The per-layer cache is ``[num_blocks, num_kv_heads, block_size, 2*P]``; the kernels reinterpret
  each (block, kv head) page of ``2*block_size*P`` elements with an ISA-specific order (``vec`` and
  ``vec16``: K as ``[P, block_size]`` followed by V as ``[block_size, P]``; ``amx``: K packed in
  4-byte groups of 16 tokens, V packed along tokens). Rather than hard-coding those orders, the
  order is learnt once per (isa, dtype, block size, P) by writing a coded pattern with the backend's
  own ``cpu_attn_reshape_and_cache`` into a scratch cache (:func:`probe_block_layout`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "BlockLayout",
    "evict_outside_window",
    "evicted_bias",
    "gather_kv",
    "keep_window_attention",
    "key_order",
    "probe_block_layout",
    "wrap_keep_window",
]

# Upper bound on the fp32 score elements materialised at once by the multi-query path.
_SCORE_BUDGET = 1 << 22
# Most elements of gathered keys (or values) per decode group; the buffers are kept for reuse.
_GATHER_BUDGET = 1 << 23


# --------------------------------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Where each logical element of one (block, kv head) page of the CPU cache lives.

    A page is ``kv_cache.flatten(2)[block, head]``: ``2*n`` elements, n = block_size*head_size, the
    keys in the first n and the values in the last n (that split is made by the Python side of the
    backend, ``view(…, 2*block_size, P).chunk(2)``). ``key_index[t, c]`` / ``value_index[t, c]``: the
    page offset of token t's channel c. ``key_kind`` / ``value_kind`` name the order inside a half:
    ``"transposed"`` ([P, block_size]), ``"rows"`` ([block_size, P]) or ``"permuted"`` (anything
    else, e.g. AMX's packed tiles; read through an index).
    """

    block_size: int
    head_size: int
    key_index: torch.Tensor
    value_index: torch.Tensor
    key_kind: str
    value_kind: str

    def keys_t(self, half: torch.Tensor) -> torch.Tensor:
        """K halves [..., n] -> keys transposed [..., P, block_size] (a view unless permuted)."""
        bs, p = self.block_size, self.head_size
        if self.key_kind == "transposed":
            return half.unflatten(-1, (p, bs))
        if self.key_kind == "rows":
            return half.unflatten(-1, (bs, p)).transpose(-1, -2)
        return half.index_select(-1, self.key_index.flatten()).unflatten(-1, (bs, p)).transpose(-1, -2)

    def values(self, half: torch.Tensor) -> torch.Tensor:
        """V halves [..., n] -> values [..., block_size, P] (a view unless permuted)."""
        bs, p = self.block_size, self.head_size
        if self.value_kind == "rows":
            return half.unflatten(-1, (bs, p))
        if self.value_kind == "transposed":
            return half.unflatten(-1, (p, bs)).transpose(-1, -2)
        n = bs * p
        return half.index_select(-1, self.value_index.flatten() - n).unflatten(-1, (bs, p))


def _split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key/value views the CPU backend hands to its kernels (same arithmetic as cpu_attn.py)."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    view = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


def _kind(index: torch.Tensor, base: int, block_size: int, head_size: int) -> str:
    t = torch.arange(block_size)[:, None]
    c = torch.arange(head_size)[None, :]
    if torch.equal(index, base + c * block_size + t):
        return "transposed"
    if torch.equal(index, base + t * head_size + c):
        return "rows"
    return "permuted"


@functools.lru_cache(maxsize=None)
def probe_block_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> BlockLayout:
    """Learn the page order of ``cpu_attn_reshape_and_cache(…, isa)`` by writing coded values.

    Every logical element (K or V, token, channel, and kv head 0/1) gets an id; the id is written in
    base-16 digits (values 1..16, exact in fp32/bf16/fp16), one write per digit, into block 1 of a
    two-block, two-head scratch cache. Decoding the digits found at each position gives the id stored
    there; the result must be a permutation, block 0 must stay untouched, and head 1's page must be
    head 0's shifted by one page (so the order is the same for every block and head).
    """
    from vllm import _custom_ops as ops

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
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
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
    key_index, value_index = where[0, 0].contiguous(), where[0, 1].contiguous()
    if int(key_index.max()) >= n or int(value_index.min()) < n:
        raise fail("keys and values are not in separate halves of a page")
    return BlockLayout(
        block_size,
        head_size,
        key_index,
        value_index,
        _kind(key_index, 0, block_size, head_size),
        _kind(value_index, n, block_size, head_size),
    )


def _pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, kv_heads, 2*block_size*P], a view (eviction writes through it), as the backend's own."""
    return kv_cache.view(*kv_cache.shape[:2], -1)


def gather_kv(
    kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one request at token ``positions`` ([n], int64) -> two [kv_heads, n, P].

    Copies the pages of the blocks spanned by ``positions`` (whole pages, memcpy-like), reorders
    them to [kv_heads, tokens, P] and picks the positions. Keeps the cache dtype.
    """
    pages = _pages(kv_cache)
    bs = layout.block_size
    n = bs * layout.head_size
    first = int(positions.min()) // bs
    last = int(positions.max()) // bs
    blocks = block_row[first : last + 1].long()
    kt = layout.keys_t(pages[:, :, :n].index_select(0, blocks))  # [m, kvh, P, bs]
    v = layout.values(pages[:, :, n:].index_select(0, blocks))  # [m, kvh, bs, P]
    kvh = pages.shape[1]
    k = kt.transpose(-1, -2).transpose(0, 1).reshape(kvh, -1, layout.head_size)
    v = v.transpose(0, 1).reshape(kvh, -1, layout.head_size)
    local = positions - first * bs
    count = local.numel()
    if count and int(local[0]) + count - 1 == int(local[-1]) and bool((local.diff() == 1).all()):
        start = int(local[0])
        return k[:, start : start + count], v[:, start : start + count]
    return k.index_select(1, local), v.index_select(1, local)


# --------------------------------------------------------------------------------------------------
# Exact attention
# --------------------------------------------------------------------------------------------------


_LOWEST = torch.iinfo(torch.int64).min


def key_order(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A strict total order of keys, as int64: by bias, then the earlier position first.

    Equal biases are not rare (in the first layer, repeated tokens have equal values and hence equal
    biases; bf16 rounding makes more), and torch.topk breaks such ties arbitrarily. Ranking by
    (bias, -position) makes the kept set the same whatever way a sequence is batched or chunked.
    ``bias`` [..., L] (any float dtype), ``positions`` broadcastable to it.
    """
    bits = bias.float().contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    return (bits << 32) | (0x7FFFFFFF - positions)


def _is_range(x: torch.Tensor) -> bool:
    return x.numel() > 0 and int(x[-1]) - int(x[0]) == x.numel() - 1 and bool((x.diff() == 1).all())


def _keep_by_topk(order, k_pos, q_pos, keep_window_size, sliding_window):
    """[kvh, nq, L] kept keys: per query, the top W of its visible keys in ``order``."""
    offset = q_pos[:, None] - k_pos[None, :]
    visible = offset >= 0
    if sliding_window is not None:
        visible &= offset < sliding_window
    keep = visible[None].expand(order.shape[0], -1, -1)
    if order.shape[-1] > keep_window_size:
        ranked = order[:, None, :].masked_fill(~visible[None], _LOWEST)
        top = ranked.topk(keep_window_size, dim=-1, sorted=False).indices
        keep = torch.zeros_like(keep).scatter_(-1, top, True) & keep
    return keep


def _keep_by_counting(order, k_pos, q_pos, keep_window_size):
    """Causal, no binding window, queries = the last keys: candidates [kvh, C] and kept [kvh, nq, C].

    Key j is kept by the query at position p iff j <= p and fewer than W keys at positions <= p
    rank above it. Split that count into A_j (keys before the first query) and B_j(p) (keys from
    the first query up to p): a key with A_j >= W is never kept, so at most W + nq candidates
    remain, and B is a cumulative sum over the new keys.
    """
    W = keep_window_size
    first = int(q_pos[0])
    old = int((k_pos < first).sum())  # keys are a range ending at the last query
    new_order = order[:, old:]  # [kvh, nq] in position order
    if old:
        sorted_old = order[:, :old].sort(dim=-1).values
        above_old = old - torch.searchsorted(sorted_old, order.contiguous(), right=True)  # A_j
    else:
        above_old = torch.zeros_like(order)
    cand = above_old < W
    count = cand.sum(dim=-1)
    width = int(count.max())
    # Candidate indices first, in position order (stable sort of "not a candidate").
    idx = (~cand).to(torch.int8).sort(dim=-1, stable=True).indices[:, :width]
    real = torch.arange(width)[None, :] < count[:, None]
    cand_order = order.gather(1, idx)
    above = above_old.gather(1, idx)
    above_new = (new_order[:, None, :] > cand_order[:, :, None]).cumsum(dim=-1)  # [kvh, C, nq]
    seen = k_pos[idx][:, :, None] <= q_pos[None, None, :]
    keep = seen & (above[:, :, None] + above_new < W) & real[:, :, None]
    return idx, keep.transpose(1, 2)


def keep_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    keep_window_size: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """Exact folded attention with the keep window, for one sequence.

    q [nq, H, P] (folded queries), k / v [kv_heads, L, P] (folded keys/values), bias [kv_heads, L]
    (any positive multiple of the per-key bias: it only ranks keys), q_pos [nq] and k_pos [L]
    absolute positions, increasing. Key j is visible to query i if
    ``0 <= q_pos_i - k_pos_j < sliding_window``; of the visible keys only the ``keep_window_size``
    ranking highest in :func:`key_order` are kept. Scores are ``q·k·scale`` over all P channels
    (the fold adds the bias), softmax in fp32. Returns [nq, H, P] fp32. Every query must see a key.
    """
    nq, num_heads, head_size = q.shape
    num_kv_heads, length, _ = k.shape
    groups = num_heads // num_kv_heads
    W = keep_window_size
    kf = k.float()
    vf = v.float()
    order = key_order(bias, k_pos)
    out = torch.empty(nq, num_heads, head_size, dtype=torch.float32)
    # Counting applies when the window never binds and the queries are the last keys.
    binds = sliding_window is not None and int(q_pos[-1]) - int(k_pos[0]) >= sliding_window
    counting = not binds and _is_range(q_pos) and _is_range(k_pos) and int(k_pos[-1]) == int(q_pos[-1])
    if counting:
        # A chunk of c queries has at most W + c candidate keys: chunks of about W rows score each
        # query against ~2W keys instead of all earlier ones (measured: 1024-token prefills, W = 256).
        chunk = max(1, min(max(64, W), 1024, _SCORE_BUDGET // (num_heads * min(length, W + 1024))))
    else:
        chunk = max(1, _SCORE_BUDGET // max(1, num_heads * length))
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        qc = q[start:stop].float().view(stop - start, num_kv_heads, groups, head_size)
        if counting:
            end = int(q_pos[stop - 1]) - int(k_pos[0]) + 1  # keys after the chunk are unseen
            idx, keep = _keep_by_counting(order[:, :end], k_pos[:end], q_pos[start:stop], W)
            expand = idx[:, :, None].expand(-1, -1, head_size)
            kc, vc = kf.gather(1, expand), vf.gather(1, expand)
        else:
            keep = _keep_by_topk(order, k_pos, q_pos[start:stop], W, sliding_window)
            kc, vc = kf, vf
        scores = torch.einsum("qkgp,kcp->kgqc", qc, kc) * scale
        scores.masked_fill_(~keep[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        o = torch.einsum("kgqc,kcp->qkgp", probs, vc)
        out[start:stop] = o.reshape(stop - start, num_heads, head_size)
    return out


# --------------------------------------------------------------------------------------------------
# Batch plans (shared by all layers of one step: the metadata object is the same)
# --------------------------------------------------------------------------------------------------


@dataclass
class _DecodeGroup:
    """One-query requests of similar length that see more than W keys, padded to one width."""

    rows: torch.Tensor  # [R] output row of each request
    blocks: torch.Tensor  # [R, width] physical blocks (padding repeats a real block)
    valid: torch.Tensor  # [R, width*block_size] the slot holds a key the query sees
    positions: torch.Tensor  # [R, width*block_size] absolute position of each slot


@dataclass
class _PrefillItem:
    request: int
    rows: torch.Tensor  # output rows to recompute
    q_pos: torch.Tensor  # their absolute positions
    k_pos: torch.Tensor  # keys they may see: [lo, seq_len)


@dataclass
class _Plan:
    decode: list[_DecodeGroup]
    prefill: list[_PrefillItem]


_plan_slot: tuple | None = None


def _build_plan(
    md, keep_window_size: int, sliding_window: int | None, block_size: int, group_elements: int, decode_rows: bool
) -> _Plan:
    """Rows to recompute. ``group_elements``: most key slots (requests x padded keys) per decode
    group, so that a group's gathered keys or values stay within the working-set budget.
    ``decode_rows``: False when eviction already made one-query rows exact."""
    W, sw, bs = keep_window_size, sliding_window, block_size
    num_reqs = md.seq_lens.shape[0]
    qsl = md.query_start_loc[: num_reqs + 1].long()
    seq_lens = md.seq_lens.long()
    q_lens = qsl[1:] - qsl[:-1]
    # Query at absolute position p sees min(p + 1, sw) keys; rows to redo have p >= W (sw > W).
    needs = (seq_lens > W) & (q_lens > 0)
    is_decode = needs & (q_lens == 1) & decode_rows
    multi = (needs & (q_lens > 1)).nonzero().flatten().tolist()

    decode = []
    if bool(is_decode.any()):
        reqs = is_decode.nonzero().flatten()
        lens = seq_lens[reqs]
        lo = (lens - sw).clamp(min=0) if sw is not None else torch.zeros_like(lens)
        first = lo // bs
        counts = (lens + bs - 1) // bs - first
        order = counts.argsort(descending=True)
        reqs, lens, lo, first, counts = reqs[order], lens[order], lo[order], first[order], counts[order]
        counts_list = counts.tolist()
        start = 0
        while start < len(counts_list):
            # Longest first: the group's width is its first request's block count.
            width = counts_list[start]
            size = max(1, group_elements // (width * bs))
            stop = min(len(counts_list), start + size)
            g = slice(start, stop)
            steps = torch.arange(width)
            slots = (first[g, None] + torch.minimum(steps[None, :], counts[g, None] - 1))
            blocks = md.block_table[reqs[g, None], slots].long()
            pos = first[g, None] * bs + torch.arange(width * bs)[None, :]
            valid = (pos >= lo[g, None]) & (pos < lens[g, None])
            decode.append(_DecodeGroup(rows=qsl[reqs[g]], blocks=blocks, valid=valid, positions=pos))
            start = stop

    prefill = []
    if multi:
        starts = qsl.tolist()
        lens = seq_lens.tolist()
        for r in multi:
            q_len = starts[r + 1] - starts[r]
            ctx = lens[r] - q_len
            first_row = max(0, W - ctx)  # first query row with position >= W
            lo = 0 if sw is None else max(0, ctx + first_row - sw + 1)
            prefill.append(
                _PrefillItem(
                    request=r,
                    rows=torch.arange(starts[r] + first_row, starts[r + 1]),
                    q_pos=torch.arange(ctx + first_row, lens[r]),
                    k_pos=torch.arange(lo, lens[r]),
                )
            )
    return _Plan(decode=decode, prefill=prefill)


def _plan_for(
    md, keep_window_size: int, sliding_window: int | None, block_size: int, group_elements: int, decode_rows: bool
) -> _Plan:
    global _plan_slot
    key = (keep_window_size, sliding_window, block_size, group_elements, decode_rows, md.num_actual_tokens, md.max_seq_len)
    slot = _plan_slot
    if slot is not None and slot[0] is md and slot[1] == key:
        return slot[2]
    plan = _build_plan(md, keep_window_size, sliding_window, block_size, group_elements, decode_rows)
    _plan_slot = (md, key, plan)  # holds a reference to md, so its identity cannot be reused
    return plan


_workspace: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer: fresh multi-MB allocations cost more in page faults than the copy itself."""
    numel = math.prod(shape)
    buf = _workspace.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _workspace[(name, dtype)] = buf
    return buf[:numel].view(shape)


def _gather_keys(pages, layout: BlockLayout, flat: torch.Tensor) -> torch.Tensor:
    """Keys of the blocks ``flat`` [T] -> fp32 [kv_heads, P, T, block_size] (a reused buffer)."""
    bs, p = layout.block_size, layout.head_size
    n = bs * p
    kvh, count = pages.shape[1], flat.shape[0]
    out = _scratch("keys", (kvh, p, count, bs), torch.float32)
    half = pages[:, :, :n]
    if layout.key_kind == "transposed" and pages.dtype == torch.float32:
        src = half.unflatten(-1, (p, bs)).permute(1, 2, 0, 3)  # [kvh, P, blocks, bs]
        return torch.index_select(src, 2, flat, out=out)
    tmp = _scratch("pages", (count, n), pages.dtype)
    for h in range(kvh):  # row-contiguous index_select per head: the fast path
        torch.index_select(half[:, h], 0, flat, out=tmp)
        out[h].copy_(layout.keys_t(tmp).permute(1, 0, 2))
    return out


def _gather_values(pages, layout: BlockLayout, flat: torch.Tensor) -> torch.Tensor:
    """Values of the blocks ``flat`` [T] -> fp32 [kv_heads, T, block_size, P] (a reused buffer)."""
    bs, p = layout.block_size, layout.head_size
    n = bs * p
    kvh, count = pages.shape[1], flat.shape[0]
    out = _scratch("values", (kvh, count, bs, p), torch.float32)
    half = pages[:, :, n:]
    direct = layout.value_kind == "rows" and pages.dtype == torch.float32
    tmp = None if direct else _scratch("pages", (count, n), pages.dtype)
    for h in range(kvh):
        if direct:
            torch.index_select(half[:, h], 0, flat, out=out[h].view(count, n))
        else:
            torch.index_select(half[:, h], 0, flat, out=tmp)
            out[h].copy_(layout.values(tmp))
    return out


def _fix_decode(group: _DecodeGroup, query, output, kv_cache: torch.Tensor, layout: BlockLayout, *args) -> None:
    """A group of one-query requests at once (see `_fix_decode_kept` and `_fix_decode_full`); ``args``:
    head_dim, scale, keep_window_size."""
    # The kept path reads V rows of the whole cache as one [*, P] view.
    kept = kv_cache.is_contiguous() and kv_cache.dtype == torch.float32
    kept = kept and layout.key_kind == "transposed" and layout.value_kind == "rows"
    (_fix_decode_kept if kept else _fix_decode_full)(group, query, output, kv_cache, layout, *args)


def _fix_decode_kept(group, query, output, kv_cache, layout, head_dim, scale, keep_window_size) -> None:
    """fp32 cache with K transposed and V in rows inside a page (the `vec`/`vec16` ISAs).

    Ranks keys by the bias row of each page (channel `head_dim`, contiguous in the transposed K),
    scores all keys with one batched matmul over whole gathered K pages, but takes the softmax over
    the W kept scores only and reads only the W kept value rows (V is the larger gather otherwise).
    Every buffer of page size comes from `_scratch`: fresh multi-MB tensors cost page faults.
    """
    pages = _pages(kv_cache)
    bs, p = layout.block_size, layout.head_size
    n = bs * p
    kvh = pages.shape[1]
    num_heads = query.shape[1]
    groups = num_heads // kvh
    rows, blocks = group.rows, group.blocks
    num, width = blocks.shape
    length = width * bs
    W = keep_window_size
    flat = blocks.flatten()

    k_pages = pages[:, :, :n].unflatten(-1, (p, bs))  # [blocks, kvh, P, bs]
    bias = k_pages[:, :, head_dim][blocks]  # [R, width, kvh, bs]
    bias = bias.permute(2, 0, 1, 3).reshape(kvh, num, length)
    ranked = key_order(bias, group.positions).masked_fill(~group.valid, _LOWEST)
    top = ranked.topk(W, dim=-1, sorted=False).indices  # [kvh, R, W]

    q = query[rows].float().view(num, kvh, groups, p).repeat_interleave(width, dim=0)  # [R*width, kvh, G, P]
    out = torch.empty(num, kvh, groups, p)
    keys = _scratch("keys", (num * width, n), torch.float32)
    # Every token's K or V row of P channels, as rows of the whole cache (a view): a page is
    # [2*bs rows of P] with the values in rows bs..2*bs-1 (the V half is in rows in this layout).
    v_rows = pages.view(-1, p)
    kept_v = _scratch("values", (num * W, p), torch.float32)
    for h in range(kvh):
        # Whole K pages of this head (a row-contiguous copy), then one bmm per page:
        # [R*width, G, P] @ [R*width, P, bs] -> [R, width, G, bs] -> [R, G, L]
        torch.index_select(pages[:, h, :n], 0, flat, out=keys)
        scores = torch.bmm(q[:, h], keys.view(num * width, p, bs))
        scores = scores.view(num, width, groups, bs).transpose(1, 2).reshape(num, groups, length)
        idx = top[h]  # [R, W]
        kept = scores.gather(-1, idx[:, None, :].expand(-1, groups, -1)).mul_(scale)
        probs = kept.softmax(dim=-1)  # [R, G, W]
        slot = (blocks.gather(1, idx // bs) * kvh + h) * (2 * bs) + bs + idx % bs
        torch.index_select(v_rows, 0, slot.flatten(), out=kept_v)
        torch.bmm(probs, kept_v.view(num, W, p), out=out[:, h])
    output[rows] = out.view(num, num_heads, p).to(output.dtype)


def _fix_decode_full(
    group: _DecodeGroup,
    query: torch.Tensor,
    output: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: BlockLayout,
    head_dim: int,
    scale: float,
    keep_window_size: int,
) -> None:
    """A group of one-query requests at once.

    Copies the keys of the requests' blocks into [kv_heads, P, R, keys] fp32, scores every key
    with one bmm per kv head and reads the bias row; forms the top-W mask and the softmax per
    request; then copies the values into [kv_heads, R, keys, P] and applies one bmm per kv head.
    """
    pages = _pages(kv_cache)
    p = layout.head_size
    kvh = pages.shape[1]
    num_heads = query.shape[1]
    groups = num_heads // kvh
    rows, blocks = group.rows, group.blocks
    num, width = blocks.shape
    length = width * layout.block_size
    flat = blocks.flatten()
    neg = float("-inf")

    keys = _gather_keys(pages, layout, flat).view(kvh, p, num, length)
    ranked = key_order(keys[:, head_dim], group.positions).masked_fill(~group.valid, _LOWEST)
    top = ranked.topk(keep_window_size, dim=-1, sorted=False).indices  # [kvh, R, W]
    keep = torch.zeros(kvh, num, length, dtype=torch.bool).scatter_(-1, top, True)

    q = query[rows].float().view(num, kvh, groups, p)
    scores = torch.empty(kvh, num, groups, length)
    for h in range(kvh):
        torch.bmm(q[:, h], keys[h].transpose(0, 1), out=scores[h])
    scores.mul_(scale).masked_fill_(~keep[:, :, None, :], neg)
    probs = scores.softmax(dim=-1)

    values = _gather_values(pages, layout, flat).view(kvh, num, length, p)
    out = torch.empty(num, kvh, groups, p)
    for h in range(kvh):
        torch.bmm(probs[h], values[h], out=out[:, h])
    output[rows] = out.view(num, num_heads, p).to(output.dtype)


# --------------------------------------------------------------------------------------------------
# Eviction
# --------------------------------------------------------------------------------------------------


def evicted_bias(dtype: torch.dtype) -> torch.Tensor:
    """The cached bias of an evicted key: below every live bias (those are exp(…) > 0), and so negative
    that its score's exp() is exactly 0, yet finite after the fold's ×1/scale (up to head size 4096),
    so that the zero channels of other heads give 0·bias = 0, never NaN."""
    return torch.tensor(-torch.finfo(dtype).max / 64, dtype=dtype)


@torch.no_grad()
def evict_outside_window(kv_cache: torch.Tensor, layout: BlockLayout, md, head_dim: int, keep_window_size: int) -> None:
    """Evict, in the cache, the keys that each request's first query of this step does not keep.

    That query sees positions < ``seq_len - query_len + 1``; of those only its top W by (bias,
    earlier position) stay live. Reads and writes only the bias channel (``layout.key_index[:, d]``),
    through the block table. In steady decoding one key per request and layer is evicted per step.
    """
    W, bs = keep_window_size, layout.block_size
    num_reqs = md.seq_lens.shape[0]
    qsl = md.query_start_loc[: num_reqs + 1].long()
    q_lens = qsl[1:] - qsl[:-1]
    seen = md.seq_lens.long() - q_lens + 1
    reqs = ((q_lens > 0) & (seen > W)).nonzero().flatten()
    if reqs.numel() == 0:
        return
    seen = seen[reqs]
    width = int(seen.max() + bs - 1) // bs
    blocks = md.block_table[reqs, :width].long()  # [R, width]
    pages = _pages(kv_cache)
    kvh = pages.shape[1]
    offsets = layout.key_index[:, head_dim]  # [bs] page offset of each token's bias
    heads = torch.arange(kvh)
    bias = pages[blocks[:, :, None, None], heads[:, None], offsets]  # [R, width, kvh, bs]
    bias = bias.permute(2, 0, 1, 3).reshape(kvh, reqs.numel(), width * bs)
    positions = torch.arange(width * bs)
    live = positions < seen[:, None]  # [R, L]
    ranked = key_order(bias, positions).masked_fill(~live, _LOWEST)
    top = ranked.topk(W, dim=-1, sorted=False).indices  # [kvh, R, W]
    dead = evicted_bias(kv_cache.dtype)
    drop = (live & (bias != dead)).scatter_(-1, top, False)  # keys to evict now
    h, r, k = drop.nonzero(as_tuple=True)
    if h.numel():
        pages[blocks[r, k // bs], h, offsets[k % bs]] = dead


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeepWindowConfig:
    head_dim: int
    keep_window_size: int
    sliding_window: int | None
    evict: bool  # evict keys in the cache (prefix caching off, no sliding window), see the module doc


_OWN = frozenset({"forward", "_kw_inner", "_kw_config", "_kw_fix", "_kw_layout", "_kw_needed"})


class _KeepWindowMixin:
    """Delegates every attribute (read and write) to the wrapped impl, except ``forward``.

    The class is also a subclass of the wrapped impl's class, so ``isinstance`` checks in vLLM
    (e.g. the CPU metadata builder's sliding-window scan) still see a CPU impl.
    """

    def __getattribute__(self, name: str):
        if name in _OWN or (name.startswith("__") and name.endswith("__")):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_kw_inner"), name)

    def __setattr__(self, name: str, value) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(object.__getattribute__(self, "_kw_inner"), name, value)

    def __repr__(self) -> str:
        cfg = self._kw_config
        return f"KeepWindow({self._kw_inner!r}, W={cfg.keep_window_size}, d={cfg.head_dim})"

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self._kw_config
        layout = None
        if attn_metadata is not None and self._kw_needed(kv_cache, attn_metadata):
            layout = self._kw_layout(layer, kv_cache)
            if cfg.evict:
                evict_outside_window(kv_cache, layout, attn_metadata, cfg.head_dim, cfg.keep_window_size)
        result = self._kw_inner.forward(
            layer,
            query,
            key,
            value,
            kv_cache,
            attn_metadata,
            output,
            output_scale=output_scale,
            output_block_scale=output_block_scale,
        )
        if layout is not None:
            self._kw_fix(query, kv_cache, layout, attn_metadata, output)
        return result

    def _kw_layout(self, layer, kv_cache: torch.Tensor) -> BlockLayout:
        block_size, head_size = kv_cache.shape[2], kv_cache.shape[3] // 2
        isa = getattr(layer, "isa", None)
        if isa is None:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(kv_cache.dtype, block_size, head_size)
        return probe_block_layout(isa, kv_cache.dtype, block_size, head_size)

    def _kw_needed(self, kv_cache, md) -> bool:
        """Whether a query of this step may see more than W keys (else the folded kernel is exact)."""
        W, sw = self._kw_config.keep_window_size, self._kw_config.sliding_window
        if md.max_seq_len <= W or (sw is not None and sw <= W) or kv_cache.numel() == 0:
            return False
        if md.causal is not True or md.dynamic_causal is not None:
            raise RuntimeError("Doge keep window: only causal decoder attention is supported")
        return True

    def _kw_fix(self, query, kv_cache, layout: BlockLayout, md, output) -> None:
        """Recompute the rows the stock kernel got wrong (a step where some query sees more than W keys)."""
        cfg = self._kw_config
        W, sw = cfg.keep_window_size, cfg.sliding_window
        inner = self._kw_inner
        block_size = kv_cache.shape[2]
        per_key = kv_cache.shape[1] * kv_cache.shape[3] // 2  # kv_heads * P elements per key
        plan = _plan_for(md, W, sw, block_size, max(block_size, _GATHER_BUDGET // per_key), not cfg.evict)
        scale = inner.scale
        for group in plan.decode:
            _fix_decode(group, query, output, kv_cache, layout, cfg.head_dim, scale, W)
        for item in plan.prefill:
            block_row = md.block_table[item.request]
            k, v = gather_kv(kv_cache, layout, block_row, item.k_pos)
            bias = k[:, :, cfg.head_dim]
            out = keep_window_attention(
                query[item.rows],
                k,
                v,
                bias,
                item.q_pos,
                item.k_pos,
                scale=scale,
                keep_window_size=W,
                sliding_window=sw,
            )
            output[item.rows] = out.to(output.dtype)


@functools.lru_cache(maxsize=None)
def _wrapper_class(impl_cls: type) -> type:
    return type(f"KeepWindow{impl_cls.__name__}", (_KeepWindowMixin, impl_cls), {})


def _current_config():
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # pragma: no cover
        return None
    return get_current_vllm_config_or_none()


def _max_model_len() -> int | None:
    value = getattr(getattr(_current_config(), "model_config", None), "max_model_len", None)
    return value if isinstance(value, int) else None


def _prefix_caching() -> bool:
    cache_config = getattr(_current_config(), "cache_config", None)
    return bool(getattr(cache_config, "enable_prefix_caching", True))


def wrap_keep_window(attn, *, head_dim: int, keep_window_size: int, sliding_window: int | None) -> None:
    """Make ``attn`` (a vLLM ``Attention`` built with the folded head size) honour the keep window.

    Replaces ``attn.impl`` by a wrapper that runs the stock forward and then recomputes exactly the
    rows of queries that see more than ``keep_window_size`` keys (with prefix caching off and no
    sliding window, it first evicts keys in the cache, and one-query rows need no recomputation). Does nothing when no query can
    see more than W keys (``max_model_len <= W`` or ``sliding_window <= W``); otherwise requires
    vLLM's CPU backend and raises ``ValueError`` for any other backend or unsupported setting.
    """
    if not isinstance(keep_window_size, int) or keep_window_size < 1:
        raise ValueError(f"keep_window_size must be an integer >= 1, got {keep_window_size!r}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window!r}")
    max_len = _max_model_len()
    # A query sees at most min(max_model_len, sliding_window) keys.
    limits = [n for n in (max_len, sliding_window) if n is not None]
    if limits and min(limits) <= keep_window_size:
        return

    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = attn.impl
    if isinstance(impl, _KeepWindowMixin):
        impl = object.__getattribute__(impl, "_kw_inner")
    backend = getattr(getattr(attn, "attn_backend", None), "get_name", lambda: None)()
    if not isinstance(impl, CPUAttentionBackendImpl):
        raise ValueError(
            f"Doge keep_window_size={keep_window_size} < max_model_len={max_len} is only computed "
            f"exactly on vLLM's CPU attention backend (CPU_ATTN), but this layer uses "
            f"{backend or 'another backend'} ({type(impl).__name__}). Serve with "
            f"--max-model-len <= {keep_window_size} (then the folded bias is exact on any backend), "
            f"or run on the CPU backend."
        )
    problems = []
    if not 0 < head_dim < impl.head_size:
        problems.append(f"head_dim {head_dim} must be below the folded head size {impl.head_size}")
    if impl.attn_type != AttentionType.DECODER:
        problems.append(f"attention type {impl.attn_type} (decoder only)")
    if impl.is_fp8_kv_cache:
        problems.append(f"quantized KV cache ({impl.kv_cache_dtype})")
    if impl.alibi_slopes is not None or impl.logits_soft_cap or impl.sinks is not None:
        problems.append("ALiBi, logits soft-cap or sinks")
    if impl.kv_sharing_target_layer_name is not None:
        problems.append("KV sharing")
    window = None if impl.sliding_window in (None, -1) else impl.sliding_window
    if window != sliding_window:
        problems.append(f"sliding_window {sliding_window} but the attention layer was built with {window}")
    if problems:
        raise ValueError("Doge keep window cannot be applied exactly: " + "; ".join(problems))

    wrapper = object.__new__(_wrapper_class(type(impl)))
    object.__setattr__(wrapper, "_kw_inner", impl)
    config = _KeepWindowConfig(
        head_dim=head_dim,
        keep_window_size=keep_window_size,
        sliding_window=sliding_window,
        evict=sliding_window is None and not _prefix_caching(),
    )
    object.__setattr__(wrapper, "_kw_config", config)
    attn.impl = wrapper
