"""Unit tests of vllm_doge.keep_window against vLLM 0.32's CPU attention backend (no model needed).

The cache is written with the backend's own routine (``impl.do_kv_cache_update`` ->
``torch.ops._C.cpu_attn_reshape_and_cache``), attention is driven through the real ``Attention``
layer (its ``unified_kv_cache_update`` and ``unified_attention_with_output`` custom ops) with a
hand-built ``CPUAttentionMetadata``, and results are compared with a plain float64 loop over
queries that applies the keep window by sorting biases.
"""

import itertools
import math
import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm import _custom_ops as ops  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import (  # noqa: E402
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    _get_attn_isa,
)

from vllm_doge.keep_window import (  # noqa: E402
    evicted_bias,
    gather_kv,
    keep_window_attention,
    probe_block_layout,
    wrap_keep_window,
)

BLOCK = 32


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _config(dtype: torch.dtype, max_model_len: int | None = 4096, prefix_caching: bool = True) -> VllmConfig:
    """A VllmConfig whose model_config carries just what Attention/CPU impl construction reads."""
    cfg = VllmConfig()
    stub = types.SimpleNamespace(
        dtype=dtype, is_mm_prefix_lm=False, rswa_window=None, max_model_len=max_model_len
    )
    object.__setattr__(cfg, "model_config", stub)
    cfg.cache_config.enable_prefix_caching = prefix_caching
    return cfg


def _attention(cfg, num_heads, num_kv_heads, padded, head_dim, dtype, sliding_window=None, name="l0.attn"):
    with set_current_vllm_config(cfg):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            attn = Attention(
                num_heads,
                padded,
                head_dim**-0.5,
                num_kv_heads,
                per_layer_sliding_window=sliding_window,
                prefix=name,
            )
        finally:
            torch.set_default_dtype(old)
    attn.isa = _get_attn_isa(dtype, BLOCK, padded)  # what CPUAttentionMetadataBuilder sets
    return attn


def _stub_layer(isa: str):
    return types.SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)


def _fold(q, k, v, bias, padded, scale):
    """Design §3: q' = [q, 1/scale, 0…], k' = [k, b, 0…], v' = [v, 0…]."""
    d = q.shape[-1]
    qf = torch.zeros(*q.shape[:-1], padded, dtype=q.dtype)
    kf = torch.zeros(*k.shape[:-1], padded, dtype=k.dtype)
    vf = torch.zeros(*v.shape[:-1], padded, dtype=v.dtype)
    qf[..., :d] = q
    qf[..., d] = 1.0 / scale
    kf[..., :d] = k
    kf[..., d] = bias
    vf[..., :d] = v
    return qf, kf, vf


def _reference(q, k, v, bias, q_pos, k_pos, scale, keep, window, bias_coef=1.0):
    """Unfolded float64 loop: q [nq,H,d], k/v [L,KV,d], bias [L,KV] -> [nq,H,d].

    Scores q·k·scale + bias_coef·b over the visible keys; of those only the `keep` largest b count,
    equal biases ranked by position (earlier first)."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    nq, num_heads, d = q.shape
    groups = num_heads // k.shape[1]
    out = torch.zeros(nq, num_heads, d, dtype=torch.float64)
    for i in range(nq):
        p = int(q_pos[i])
        for h in range(num_heads):
            g = h // groups
            offsets = [p - int(k_pos[j]) for j in range(len(k_pos))]
            seen = [j for j, o in enumerate(offsets) if 0 <= o and (window is None or o < window)]
            if len(seen) > keep:
                seen = sorted(seen, key=lambda j: (-float(bias[j, g]), int(k_pos[j])))[:keep]
            idx = torch.tensor(seen)
            s = (k[idx, g] @ q[i, h]) * scale + bias_coef * bias[idx, g]
            out[i, h] = torch.softmax(s, 0) @ v[idx, g]
    return out


def _bias(n, kv, gen, ties=False):
    """Positive biases exactly representable in bf16: pairwise distinct, or from 5 values (ties)."""
    if ties:
        return torch.randint(0, 5, (n, kv), generator=gen).double() / 4.0 + 0.5
    cols = [torch.randperm(n, generator=gen).double() / 128.0 + 0.5 for _ in range(kv)]
    return torch.stack(cols, 1)


# --------------------------------------------------------------------------------------------------
# cache layout and gather
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("isa", "padded"), [("vec", 64), ("vec16", 80)])
def test_probe_finds_transposed_key_layout_on_vec_isas(isa, padded):
    layout = probe_block_layout(isa, torch.float32, BLOCK, padded)
    t = torch.arange(BLOCK)[:, None]
    c = torch.arange(padded)[None, :]
    assert torch.equal(layout.key_index, c * BLOCK + t)  # K page: [P, block_size]
    assert torch.equal(layout.value_index, BLOCK * padded + t * padded + c)  # V page: [block_size, P]
    assert (layout.key_kind, layout.value_kind) == ("transposed", "rows")


def test_probe_amx_layout_is_a_packed_permutation():
    layout = probe_block_layout("amx", torch.bfloat16, BLOCK, 64)
    t = torch.arange(BLOCK)[:, None]
    c = torch.arange(64)[None, :]
    # K: pairs of bf16 channels in 4-byte words, 16 tokens per group; V: pairs of tokens per word.
    assert torch.equal(layout.key_index, (t // 16) * 16 * 64 + (c // 2) * 32 + (t % 16) * 2 + c % 2)
    value = BLOCK * 64 + (c // 16) * BLOCK * 16 + (t // 2) * 32 + (c % 16) * 2 + t % 2
    assert torch.equal(layout.value_index, value)
    assert (layout.key_kind, layout.value_kind) == ("permuted", "permuted")


@pytest.mark.parametrize(
    ("isa", "dtype", "padded"),
    [
        ("vec", torch.float32, 64),
        ("vec16", torch.float32, 80),
        ("vec", torch.bfloat16, 160),
        ("vec16", torch.bfloat16, 80),
        ("amx", torch.bfloat16, 64),
    ],
)
@pytest.mark.parametrize("padded_pages", [False, True])
def test_gather_reads_back_what_the_backend_wrote(isa, dtype, padded, padded_pages):
    gen = torch.Generator().manual_seed(0)
    kv_heads, num_blocks, n = 2, 8, 75
    if padded_pages:  # blocks further apart than one page, as vLLM may lay them out
        page = kv_heads * BLOCK * 2 * padded
        buf = torch.zeros(num_blocks * (page + 96), dtype=dtype)
        shape = (num_blocks, kv_heads, BLOCK, 2 * padded)
        kv_cache = buf.as_strided(shape, (page + 96, BLOCK * 2 * padded, 2 * padded, 1))
    else:
        kv_cache = torch.zeros(num_blocks, kv_heads, BLOCK, 2 * padded, dtype=dtype)
    block_row = torch.tensor([5, 1, 6, 0], dtype=torch.int32)  # non-contiguous, out of order
    pos = torch.arange(n)
    slots = block_row.long()[pos // BLOCK] * BLOCK + pos % BLOCK
    key = torch.randn(n, kv_heads, padded, generator=gen).to(dtype)
    value = torch.randn(n, kv_heads, padded, generator=gen).to(dtype)

    with set_current_vllm_config(_config(dtype)):
        impl = CPUAttentionBackendImpl(2 * kv_heads, padded, 0.1, kv_heads, None, None, "auto")
    impl.do_kv_cache_update(_stub_layer(isa), key, value, kv_cache, slots)

    layout = probe_block_layout(isa, dtype, BLOCK, padded)
    k, v = gather_kv(kv_cache, layout, block_row, pos)
    assert torch.equal(k, key.transpose(0, 1))
    assert torch.equal(v, value.transpose(0, 1))
    some = torch.randperm(n, generator=gen)[:20]
    k, v = gather_kv(kv_cache, layout, block_row, some)
    assert torch.equal(k, key[some].transpose(0, 1))
    assert torch.equal(v, value[some].transpose(0, 1))
    k, v = gather_kv(kv_cache, layout, block_row, pos[40:70])  # a range inside the blocks
    assert torch.equal(k, key[40:70].transpose(0, 1))
    assert torch.equal(v, value[40:70].transpose(0, 1))


@pytest.mark.parametrize(
    ("isa", "dtype", "padded"),
    [("vec", torch.float32, 64), ("vec16", torch.bfloat16, 80), ("amx", torch.bfloat16, 64)],
)
def test_decode_block_gathers_match_gather_kv(isa, dtype, padded):
    """The decode path's batched block copies (one-step, two-step, permuted layouts)."""
    from vllm_doge.keep_window import _gather_keys, _gather_values, _pages

    gen = torch.Generator().manual_seed(2)
    kv_heads, num_blocks = 3, 9
    kv_cache = torch.randn(num_blocks, kv_heads, BLOCK, 2 * padded, generator=gen).to(dtype)
    layout = probe_block_layout(isa, dtype, BLOCK, padded)
    flat = torch.tensor([4, 0, 7, 7, 2])
    keys = _gather_keys(_pages(kv_cache), layout, flat).clone()  # [kvh, P, T, bs]
    values = _gather_values(_pages(kv_cache), layout, flat).clone()  # [kvh, T, bs, P]
    for i, block in enumerate(flat.tolist()):
        k, v = gather_kv(kv_cache, layout, torch.tensor([block]), torch.arange(BLOCK))
        assert torch.equal(keys[:, :, i].transpose(1, 2), k.float())
        assert torch.equal(values[:, i], v.float())


# --------------------------------------------------------------------------------------------------
# exact masked attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "context", "keep", "window"),
    [
        (40, 0, 12, None),  # prefill
        (40, 23, 12, None),  # chunked prefill: queries start at position 23
        (40, 0, 12, 20),  # sliding window wider than the keep window
        (40, 17, 12, 20),
        (40, 17, 12, 9),  # window narrower than W: keep window inactive
        (30, 0, 64, None),  # W larger than the sequence
        (33, 32, 8, None),  # one query (decode)
        (200, 50, 12, None),  # 150 queries: several query chunks, each with its own candidates
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_keep_window_attention_matches_dense_reference(length, context, keep, window, ties):
    gen = torch.Generator().manual_seed(length + context + keep)
    num_heads, kv_heads, d, padded = 6, 2, 16, 32
    scale = d**-0.5
    q = torch.randn(length - context, num_heads, d, generator=gen)
    k = torch.randn(length, kv_heads, d, generator=gen)
    v = torch.randn(length, kv_heads, d, generator=gen)
    if ties:
        bias = _bias(length, kv_heads, gen, ties=True).float()
    else:
        bias = torch.rand(length, kv_heads, generator=gen) * 3
    qf, kf, vf = _fold(q, k.transpose(0, 1), v.transpose(0, 1), bias.T, padded, scale)
    q_pos = torch.arange(context, length)
    k_pos = torch.arange(length)
    out = keep_window_attention(
        qf, kf, vf, kf[:, :, d], q_pos, k_pos, scale=scale, keep_window_size=keep, sliding_window=window
    )
    ref = _reference(q, k, v, bias, q_pos, k_pos, scale, keep, window)
    assert out.dtype == torch.float32
    assert torch.allclose(out[..., :d].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[..., d:] == 0)


@pytest.mark.parametrize(
    ("length", "context", "keep"), [(60, 0, 10), (60, 35, 10), (60, 59, 25), (20, 5, 30)]
)
def test_counting_and_topk_keep_the_same_keys(length, context, keep):
    """The prefill shortcut (count keys ranking above) against per-query top-W, with ties."""
    from vllm_doge.keep_window import _keep_by_counting, _keep_by_topk, key_order

    gen = torch.Generator().manual_seed(length * keep + context)
    k_pos = torch.arange(length)
    q_pos = torch.arange(context, length)
    bias = torch.randint(0, 6, (3, length), generator=gen).float()
    order = key_order(bias, k_pos)
    assert all(len(set(row.tolist())) == length for row in order)  # strict, even with equal biases
    by_topk = _keep_by_topk(order, k_pos, q_pos, keep, None)
    idx, kept = _keep_by_counting(order, k_pos, q_pos, keep)
    dense = torch.zeros(by_topk.shape, dtype=torch.int64)
    dense.scatter_add_(2, idx[:, None, :].expand(-1, q_pos.numel(), -1), kept.long())
    assert torch.equal(dense > 0, by_topk)
    assert int(by_topk.sum(-1).max()) == min(keep, length)


def test_keep_window_attention_key_subrange():
    """Keys given as a sub-range [lo, L) (what the wrapper gathers under a sliding window)."""
    gen = torch.Generator().manual_seed(3)
    num_heads, kv_heads, d, padded, length, window, keep = 4, 1, 8, 16, 50, 15, 6
    scale = d**-0.5
    q = torch.randn(10, num_heads, d, generator=gen)
    k = torch.randn(length, kv_heads, d, generator=gen)
    v = torch.randn(length, kv_heads, d, generator=gen)
    bias = torch.rand(length, kv_heads, generator=gen)
    q_pos = torch.arange(40, 50)
    ref = _reference(q, k, v, bias, q_pos, torch.arange(length), scale, keep, window)
    lo = 40 - window + 1
    qf, kf, vf = _fold(q, k[lo:].transpose(0, 1), v[lo:].transpose(0, 1), bias[lo:].T, padded, scale)
    out = keep_window_attention(
        qf, kf, vf, kf[:, :, d], q_pos, torch.arange(lo, length),
        scale=scale, keep_window_size=keep, sliding_window=window,
    )
    assert torch.allclose(out[..., :d].double(), ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# the wrapped impl, driven through the real Attention layer
# --------------------------------------------------------------------------------------------------


def _metadata(attn, q_lens, seq_lens, block_table, slot_mapping, kv_heads, dtype, window) -> CPUAttentionMetadata:
    """What CPUAttentionMetadataBuilder would build for one step of these requests."""
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return CPUAttentionMetadata(
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(q_lens),
        query_start_loc=qsl,
        max_seq_len=max(seq_lens),
        seq_lens=sl,
        block_table=block_table,
        slot_mapping=slot_mapping,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(q_lens),
            num_heads=attn.num_heads,
            num_kv_heads=kv_heads,
            head_dim=attn.head_size,
            seq_lens=sl,
            dtype=dtype,
            query_start_loc=qsl,
            causal=True,
            sliding_window_size=-1 if window is None else window,
            isa=attn.isa,
            enable_kv_split=False,
        ),
        causal=True,
    )


def _step(attn, cfg, md, query, key, value) -> torch.Tensor:
    """One forward of the Attention layer (cache update, then attention) -> [T, H, P]."""
    name = attn.layer_name
    with set_current_vllm_config(cfg), set_forward_context({name: md}, cfg, slot_mapping={name: md.slot_mapping}):
        return attn(query, key, value).view(-1, attn.num_heads, attn.head_size)


def _run_batch(attn, cfg, requests, *, num_heads, kv_heads, d, padded, dtype, keep, window, gen, ties=False):
    """requests: list of (context_len, new_len). Writes each context into the cache with the
    backend's routine (earlier steps / prefix-cache hits), then runs one mixed step through
    Attention.forward. Returns (output [T,H,P], reference [T,H,d], stock output [T,H,P])."""
    scale = d**-0.5
    max_blocks = max(math.ceil((c + n) / BLOCK) for c, n in requests)
    num_blocks = len(requests) * max_blocks + 3
    kv_cache = torch.zeros(num_blocks, kv_heads, BLOCK, 2 * padded, dtype=dtype)
    attn.kv_cache = kv_cache
    # Scatter each request over shuffled physical blocks.
    ids = torch.randperm(num_blocks, generator=gen)[: len(requests) * max_blocks]
    ids = ids.view(len(requests), max_blocks)
    block_table = ids.to(torch.int32)

    qs, keys, vals, slots, refs, seq_lens, starts = [], [], [], [], [], [], [0]
    for r, (ctx, new) in enumerate(requests):
        total = ctx + new
        q = torch.randn(new, num_heads, d, generator=gen)
        k = torch.randn(total, kv_heads, d, generator=gen)
        v = torch.randn(total, kv_heads, d, generator=gen)
        b = _bias(total, kv_heads, gen, ties)
        qf, kf, vf = _fold(q, k, v, b, padded, scale)
        qf, kf, vf = qf.to(dtype), kf.to(dtype), vf.to(dtype)
        pos = torch.arange(total)
        slot = block_table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK
        if ctx:
            attn.impl.do_kv_cache_update(attn, kf[:ctx], vf[:ctx], kv_cache, slot[:ctx])
        qs.append(qf)
        keys.append(kf[ctx:])
        vals.append(vf[ctx:])
        slots.append(slot[ctx:])
        # Reference from the values the model actually sees (rounded to the cache dtype).
        refs.append(
            _reference(
                qf[..., :d].double(),
                kf[..., :d].double(),
                vf[..., :d].double(),
                kf[..., d].double(),
                torch.arange(ctx, total),
                pos,
                scale,
                keep,
                window,
                bias_coef=float(qf[0, 0, d].double()) * scale,  # 1 up to the rounding of 1/scale
            )
        )
        seq_lens.append(total)
        starts.append(starts[-1] + new)

    query = torch.cat(qs).reshape(-1, num_heads * padded)
    key = torch.cat(keys).reshape(-1, kv_heads * padded)
    value = torch.cat(vals).reshape(-1, kv_heads * padded)
    slot_mapping = torch.cat(slots)
    md = _metadata(attn, [n for _, n in requests], seq_lens, block_table, slot_mapping, kv_heads, dtype, window)
    snapshot = kv_cache.clone()
    out = _step(attn, cfg, md, query, key, value)
    # The stock kernel alone, on the same cache (for the sanity check that W matters here).
    stock = torch.empty_like(out)
    inner = attn.impl
    if type(inner) is not CPUAttentionBackendImpl:
        inner = object.__getattribute__(inner, "_kw_inner")
    inner.forward(attn, query.view(-1, num_heads, padded), None, None, kv_cache, md, stock)
    # Blocks that received no new token are untouched (the fix-up only reads the cache).
    untouched = torch.ones(kv_cache.shape[0], dtype=torch.bool)
    untouched[slot_mapping // BLOCK] = False
    assert torch.equal(kv_cache[untouched], snapshot[untouched])
    return out, torch.cat(refs), stock


@pytest.mark.parametrize(
    ("dtype", "d", "padded", "window", "atol", "ties"),
    [
        (torch.float32, 64, 80, None, 2e-5, False),  # vec16 ISA
        (torch.float32, 32, 64, None, 2e-5, False),  # vec ISA
        (torch.float32, 32, 64, 40, 2e-5, False),  # sliding window wider than W
        (torch.float32, 64, 80, None, 2e-5, True),  # many equal biases
        (torch.bfloat16, 64, 80, None, 3e-2, False),
    ],
)
def test_wrapped_forward_mixed_batch(dtype, d, padded, window, atol, ties):
    gen = torch.Generator().manual_seed(7)
    num_heads, kv_heads, keep = 4, 2, 16
    cfg = _config(dtype, max_model_len=256)
    attn = _attention(cfg, num_heads, kv_heads, padded, d, dtype, sliding_window=window)
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=d, keep_window_size=keep, sliding_window=window)
    assert isinstance(attn.impl, CPUAttentionBackendImpl)
    requests = [
        (49, 1),  # decode, 50 keys
        (20, 15),  # chunked prefill with context (prefix hit); rows 0..15 need no fix
        (9, 1),  # short decode: the fold alone is exact
        (0, 30),  # fresh prefill
        (70, 1),  # another decode, longer (pads the batched decode)
        (16, 1),  # decode that just crosses W (17 keys)
    ]
    out, ref, stock = _run_batch(
        attn, cfg, requests, num_heads=num_heads, kv_heads=kv_heads, d=d, padded=padded,
        dtype=dtype, keep=keep, window=window, gen=gen, ties=ties,
    )
    err = (out[..., :d].double() - ref).abs().max().item()
    assert err <= atol, err
    assert torch.all(out[..., d:].float().abs() <= atol)
    # Without the fix-up the long rows are wrong: the test exercises the keep window.
    assert (stock[..., :d].double() - ref).abs().max().item() > 0.05


def test_wrapped_forward_profile_run_and_short_batches_are_untouched():
    cfg = _config(torch.float32, max_model_len=256)
    attn = _attention(cfg, 2, 1, 64, 32, torch.float32)
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=32, keep_window_size=16, sliding_window=None)
    out = torch.full((3, 2, 64), 7.0)
    # Profile / warm-up runs have no metadata: nothing is computed, nothing read.
    assert attn.impl.forward(attn, torch.zeros(3, 2, 64), None, None, torch.empty(0), None, out) is out
    assert torch.all(out == 7.0)
    gen = torch.Generator().manual_seed(1)
    out, ref, stock = _run_batch(
        attn, cfg, [(3, 5), (15, 1)], num_heads=2, kv_heads=1, d=32, padded=64,
        dtype=torch.float32, keep=16, window=None, gen=gen,
    )
    assert torch.equal(out, stock)  # all seq_len <= W: the stock kernel's rows are kept as they are
    assert torch.allclose(out[..., :32].double(), ref, atol=2e-5)


def test_sliding_window_not_wider_than_keep_window_is_left_to_the_kernel():
    """sw <= W: no query sees more than W keys, wrap is a no-op, and the stock kernel's window
    convention (key j visible to query i iff 0 <= i - j < sw) matches the reference."""
    cfg = _config(torch.float32, max_model_len=256)
    attn = _attention(cfg, 4, 2, 64, 32, torch.float32, sliding_window=12)
    inner = attn.impl
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=32, keep_window_size=16, sliding_window=12)
    assert attn.impl is inner
    gen = torch.Generator().manual_seed(5)
    out, ref, _ = _run_batch(
        attn, cfg, [(40, 1), (10, 20), (0, 33)], num_heads=4, kv_heads=2, d=32, padded=64,
        dtype=torch.float32, keep=16, window=12, gen=gen,
    )
    assert torch.allclose(out[..., :32].double(), ref, atol=2e-5)


def test_wrapped_forward_under_torch_compile():
    """The attention custom op is opaque to Dynamo: a fullgraph compile of Attention.forward traces
    without breaks and the wrapper's Python runs at run time."""
    cfg = _config(torch.float32, max_model_len=256)
    attn = _attention(cfg, 4, 2, 80, 64, torch.float32)
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=64, keep_window_size=16, sliding_window=None)
    attn.forward = torch.compile(attn.forward, backend="eager", fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(11)
    out, ref, stock = _run_batch(
        attn, cfg, [(49, 1), (0, 30)], num_heads=4, kv_heads=2, d=64, padded=80,
        dtype=torch.float32, keep=16, window=None, gen=gen,
    )
    assert torch.allclose(out[..., :64].double(), ref, atol=2e-5)
    assert (stock[..., :64].double() - ref).abs().max().item() > 0.05


# --------------------------------------------------------------------------------------------------
# wrap_keep_window: delegation, refusals, no-ops
# --------------------------------------------------------------------------------------------------


def test_wrapper_delegates_to_the_backend_impl():
    cfg = _config(torch.float32, max_model_len=256)
    attn = _attention(cfg, 4, 2, 80, 64, torch.float32, sliding_window=100)
    inner = attn.impl
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=64, keep_window_size=32, sliding_window=100)
    wrapper = attn.impl
    assert wrapper is not inner and isinstance(wrapper, type(inner))
    assert wrapper.sliding_window == 100 and wrapper.head_size == 80 and wrapper.scale == inner.scale
    assert wrapper.num_queries_per_kv == 2 and wrapper.kv_cache_dtype == "auto"
    wrapper.some_flag = 3  # vLLM sometimes sets attributes on impls: they land on the backend impl
    assert inner.some_flag == 3
    assert wrapper.do_kv_cache_update.__self__ is inner
    # Wrapping again replaces the configuration instead of stacking wrappers.
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=64, keep_window_size=16, sliding_window=100)
    assert object.__getattribute__(attn.impl, "_kw_inner") is inner


def test_refuses_other_backends_with_a_clear_error():
    class FlashAttentionImpl:  # stands in for any non-CPU impl
        head_size = 136

    attn = types.SimpleNamespace(
        impl=FlashAttentionImpl(), attn_backend=types.SimpleNamespace(get_name=lambda: "FLASH_ATTN")
    )
    with set_current_vllm_config(_config(torch.float16, max_model_len=8192)):
        with pytest.raises(ValueError, match=r"only computed exactly on vLLM's CPU.*--max-model-len <= 2048"):
            wrap_keep_window(attn, head_dim=128, keep_window_size=2048, sliding_window=None)
        # A sliding window no wider than W means no query ever sees more than W keys: no-op.
        wrap_keep_window(attn, head_dim=128, keep_window_size=2048, sliding_window=1024)
    # max_model_len <= W: the fold alone is exact on any backend; nothing to wrap.
    with set_current_vllm_config(_config(torch.float16, max_model_len=2048)):
        wrap_keep_window(attn, head_dim=128, keep_window_size=2048, sliding_window=None)
    assert isinstance(attn.impl, FlashAttentionImpl)


def test_refuses_inconsistent_settings():
    cfg = _config(torch.float32, max_model_len=256)
    attn = _attention(cfg, 4, 2, 80, 64, torch.float32)
    with set_current_vllm_config(cfg):
        with pytest.raises(ValueError, match="sliding_window"):
            wrap_keep_window(attn, head_dim=64, keep_window_size=16, sliding_window=64)
        with pytest.raises(ValueError, match="head_dim"):
            wrap_keep_window(attn, head_dim=80, keep_window_size=16, sliding_window=None)
        with pytest.raises(ValueError, match="keep_window_size"):
            wrap_keep_window(attn, head_dim=64, keep_window_size=0, sliding_window=None)


@pytest.mark.parametrize(
    ("dtype", "d", "padded", "atol"),
    [(torch.float32, 64, 80, 2e-5), (torch.float32, 32, 64, 2e-5), (torch.bfloat16, 64, 80, 3e-2)],
)
def test_eviction_over_steps(dtype, d, padded, atol):
    """Prefix caching off: keys are evicted in the cache step after step (prefill chunks, then decodes);
    every row equals the reference over the original keys (one-query rows come from the stock kernel
    alone), and in the end each request's live keys are exactly its last query's top W."""
    gen = torch.Generator().manual_seed(11)
    num_heads, kv_heads, keep = 4, 2, 16
    scale = d**-0.5
    cfg = _config(dtype, max_model_len=256, prefix_caching=False)
    attn = _attention(cfg, num_heads, kv_heads, padded, d, dtype)
    with set_current_vllm_config(cfg):
        wrap_keep_window(attn, head_dim=d, keep_window_size=keep, sliding_window=None)
    assert object.__getattribute__(attn.impl, "_kw_config").evict
    schedule = [  # each request's query count per step
        [20, 15, 1, 1, 1, 1, 1, 1],  # chunked prefill across W, then decodes
        [40, 1, 1, 1, 1, 1, 1, 1],  # one prefill step past W
        [12, 1, 1, 1, 1, 1, 1, 1],  # crosses W while decoding
        [30, 1, 3, 1, 1, 2, 1, 1],  # multi-query steps between decodes
    ]
    totals = [sum(steps) for steps in schedule]
    max_blocks = math.ceil(max(totals) / BLOCK)
    num_blocks = len(schedule) * max_blocks + 2
    kv_cache = torch.zeros(num_blocks, kv_heads, BLOCK, 2 * padded, dtype=dtype)
    attn.kv_cache = kv_cache
    block_table = torch.randperm(num_blocks, generator=gen)[: len(schedule) * max_blocks].view(len(schedule), -1).int()
    folded, biases = [], []
    for total in totals:
        q = torch.randn(total, num_heads, d, generator=gen)
        k = torch.randn(total, kv_heads, d, generator=gen)
        v = torch.randn(total, kv_heads, d, generator=gen)
        biases.append(_bias(total, kv_heads, gen))
        folded.append(tuple(t.to(dtype) for t in _fold(q, k, v, biases[-1], padded, scale)))
    bias_coef = float(folded[0][0][0, 0, d].double()) * scale
    done = [0] * len(schedule)
    for step in range(len(schedule[0])):
        q_lens = [steps[step] for steps in schedule]
        rows = [torch.arange(done[r], done[r] + n) for r, n in enumerate(q_lens)]
        slot_mapping = torch.cat([block_table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK for r, pos in enumerate(rows)])
        seq_lens = [done[r] + n for r, n in enumerate(q_lens)]
        md = _metadata(attn, q_lens, seq_lens, block_table, slot_mapping, kv_heads, dtype, None)
        qf, kf, vf = (torch.cat([folded[r][i][pos] for r, pos in enumerate(rows)]) for i in range(3))
        out = _step(attn, cfg, md, qf.flatten(1), kf.flatten(1), vf.flatten(1))
        ref = torch.cat(
            [
                _reference(
                    folded[r][0][pos, :, :d], folded[r][1][: seq_lens[r], :, :d], folded[r][2][: seq_lens[r], :, :d],
                    folded[r][1][: seq_lens[r], :, d], pos, torch.arange(seq_lens[r]), scale, keep, None, bias_coef,
                )
                for r, pos in enumerate(rows)
            ]
        )  # fmt: skip
        err = (out[..., :d].double() - ref).abs().max().item()
        assert err <= atol, f"step {step}: {err}"
        done = seq_lens
    layout = probe_block_layout(attn.isa, dtype, BLOCK, padded)
    dead = evicted_bias(dtype)
    for r, total in enumerate(totals):
        k, _ = gather_kv(kv_cache, layout, block_table[r], torch.arange(total))
        for h in range(kv_heads):
            ranked = sorted(range(total), key=lambda j: (-float(biases[r][j, h]), j))
            live = (k[h, :, d] != dead).nonzero().flatten().tolist()
            # The last step was a decode: its query saw every key, so W keys stay live.
            assert live == sorted(ranked[:keep]), f"request {r}, kv head {h}"
