"""Unit tests of the keep window's key relocation (vllm_doge.keep_window, vllm_doge.cpu_cache) against
vLLM 0.32's CPU attention backend, without a model.

Each step runs as in the model: our custom op relocates keys and computes the exact prefill rows, then
the real ``Attention`` layer (sliding window W + 1) writes the step's keys with the backend's own
cache-write op and runs the stock kernel on a hand-built ``CPUAttentionMetadata``. Every output row is
compared with a float64 loop over queries that applies the keep window to the original keys.
"""

import itertools
import math
import types

import pytest
import torch

from vllm import _custom_ops as ops
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata, _get_attn_isa

from vllm_doge.cpu_cache import BlockLayout, PagedSlots, probe_block_layout
from vllm_doge.keep_window import (
    dead_bias,
    decode_positions,
    encode_positions,
    keep_window_binds,
    position_digits,
)

DIGITS = 2  # base-256 position digits (positions < 65536)


def _config(dtype: torch.dtype) -> VllmConfig:
    """A VllmConfig whose model_config carries just what Attention/CPU impl construction reads."""
    cfg = VllmConfig()
    stub = types.SimpleNamespace(dtype=dtype, is_mm_prefix_lm=False, rswa_window=None, max_model_len=4096)
    object.__setattr__(cfg, "model_config", stub)
    return cfg


def _attention(cfg, num_heads, num_kv_heads, padded, head_dim, dtype, block, sliding_window, name="l0.attn"):
    with set_current_vllm_config(cfg):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            attn = Attention(
                num_heads, padded, head_dim**-0.5, num_kv_heads, per_layer_sliding_window=sliding_window, prefix=name
            )
        finally:
            torch.set_default_dtype(old)
    attn.isa = _get_attn_isa(dtype, block, padded)  # what CPUAttentionMetadataBuilder sets
    return attn


def _fold(q, k, v, bias, positions, padded, scale):
    """The model's fold: q' = [q, 1/scale, 0…], k' = [k, b, position digits, 0…], v' = [v, 0…]."""
    d = q.shape[-1]
    qf = torch.zeros(*q.shape[:-1], padded, dtype=q.dtype)
    kf = torch.zeros(*k.shape[:-1], padded, dtype=k.dtype)
    vf = torch.zeros(*v.shape[:-1], padded, dtype=v.dtype)
    qf[..., :d] = q
    qf[..., d] = 1.0 / scale
    kf[..., :d] = k
    kf[..., d] = bias
    kf[..., d + 1 : d + 1 + DIGITS] = encode_positions(positions, DIGITS, torch.float64)[:, None, :]
    vf[..., :d] = v
    return qf, kf, vf


def _reference(q, k, v, bias, q_pos, scale, keep, bias_coef):
    """Unfolded float64 loop: q [nq,H,d] at positions q_pos, k/v [L,KV,d] and bias [L,KV] at positions
    0…L-1 -> [nq,H,d]. Of the keys a query sees only the `keep` largest biases count (ties: the
    earlier key)."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    nq, num_heads, d = q.shape
    groups = num_heads // k.shape[1]
    out = torch.zeros(nq, num_heads, d, dtype=torch.float64)
    for i in range(nq):
        p = int(q_pos[i])
        for h in range(num_heads):
            g = h // groups
            seen = sorted(range(p + 1), key=lambda j: (-float(bias[j, g]), j))[:keep]
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


def _metadata(attn, q_lens, seq_lens, block_table, slot_mapping, kv_heads, dtype, window) -> CPUAttentionMetadata:
    """What CPUAttentionMetadataBuilder builds for one step of these requests."""
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
            sliding_window_size=window,
            isa=attn.isa,
            enable_kv_split=False,
        ),
        causal=True,
    )


def _layer_step(attn, cfg, md, q, k, v, *, d, keep, relocate=True):
    """One layer step as DogeAttention.forward runs it: relocation op, then vLLM's Attention.
    q [T,H,P], k/v [T,KV,P] -> [T,H,P]."""
    name = attn.layer_name
    k, v = k.clone(), v.clone()
    with set_current_vllm_config(cfg), set_forward_context({name: md}, cfg, slot_mapping={name: md.slot_mapping}):
        if relocate:
            exact, use = torch.ops.vllm_doge.keep_window(q, k, v, name, d, keep, DIGITS, d**-0.5)
        out = attn(q.flatten(1), k.flatten(1), v.flatten(1)).view(q.shape)
    return torch.where(use[:, None, None], exact, out) if relocate else out


def _run_schedule(schedule, *, dtype, d, padded, keep, block, ties, seed=0, num_heads=4, kv_heads=2, relocate=True):
    """schedule: per request, its query count at each step (0 = not scheduled). Returns the largest
    error over all rows and steps, and the final (cache, layout, block table, per-request totals)."""
    gen = torch.Generator().manual_seed(seed)
    scale = d**-0.5
    cfg = _config(dtype)
    attn = _attention(cfg, num_heads, kv_heads, padded, d, dtype, block, keep + 1)
    totals = [sum(steps) for steps in schedule]
    max_blocks = math.ceil(max(totals) / block)
    num_blocks = len(schedule) * max_blocks + 2
    # Stale contents (finite, as in a reused block): reading any of them as a live key would show.
    kv_cache = (torch.randn(num_blocks, kv_heads, block, 2 * padded, generator=gen) * 100).to(dtype)
    attn.kv_cache = kv_cache
    block_table = torch.randperm(num_blocks, generator=gen)[: len(schedule) * max_blocks].view(len(schedule), -1).int()
    folded, biases = [], []
    for total in totals:
        q = torch.randn(total, num_heads, d, generator=gen)
        k = torch.randn(total, kv_heads, d, generator=gen)
        v = torch.randn(total, kv_heads, d, generator=gen)
        biases.append(_bias(total, kv_heads, gen, ties))
        folded.append(tuple(t.to(dtype) for t in _fold(q, k, v, biases[-1], torch.arange(total), padded, scale)))
    bias_coef = float(folded[0][0][0, 0, d].double()) * scale
    done = [0] * len(schedule)
    worst = 0.0
    for step in range(len(schedule[0])):
        q_lens = [steps[step] for steps in schedule]
        rows = [torch.arange(done[r], done[r] + n) for r, n in enumerate(q_lens)]
        slot_mapping = torch.cat([block_table[r].long()[pos // block] * block + pos % block for r, pos in enumerate(rows)])
        seq_lens = [done[r] + n for r, n in enumerate(q_lens)]
        md = _metadata(attn, q_lens, seq_lens, block_table, slot_mapping, kv_heads, dtype, keep + 1)
        qf, kf, vf = (torch.cat([folded[r][i][pos] for r, pos in enumerate(rows)]) for i in range(3))
        out = _layer_step(attn, cfg, md, qf, kf, vf, d=d, keep=keep, relocate=relocate)
        assert out.isfinite().all(), f"step {step}"
        ref = torch.cat(
            [
                _reference(folded[r][0][pos, :, :d], folded[r][1][: seq_lens[r], :, :d],
                           folded[r][2][: seq_lens[r], :, :d], folded[r][1][: seq_lens[r], :, d], pos, scale, keep, bias_coef)
                for r, pos in enumerate(rows)
            ]
        )  # fmt: skip
        worst = max(worst, (out[..., :d].double() - ref).abs().max().item())
        done = seq_lens
    return worst, (kv_cache, probe_block_layout(attn.isa, dtype, block, padded), block_table, totals, biases)


SCHEDULES = {
    # W = 16; each request's query count per step
    "decode-across-W": [[12] + [1] * 12],
    "prefill-past-W": [[40] + [1] * 20],
    "chunks-W/2": [[8] * 8 + [1] * 10],
    "chunks-W+3": [[19] * 4 + [1] * 10],
    "chunks-4W": [[64] * 2 + [1] * 20],
    "mixed-batch": [  # short and long requests, multi-query steps between decodes
        [20, 15, 1, 1, 1, 1, 1, 1, 1, 1],
        [40, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [3, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [30, 1, 3, 1, 1, 2, 1, 1, 1, 1],
        [0, 0, 70, 1, 1, 1, 1, 1, 1, 1],
    ],
}
# fp32: both sides round in fp32 from the same inputs; softmax(scores) @ values with |v| ~ 3, scores
# summed over ~P channels: differences ~1e-6. bf16: the kernel rounds q'·k' and the output to bf16
# (relative 2^-8 = 4e-3 of values up to ~3): 3e-2. Wrong kept sets move rows by O(0.1..1) (asserted below).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_relocation_matches_reference_fp32(schedule, ties):
    worst, _ = _run_schedule(SCHEDULES[schedule], dtype=torch.float32, d=32, padded=48, keep=16, block=16, ties=ties)
    assert worst <= ATOL[torch.float32], worst


@pytest.mark.parametrize(
    ("dtype", "d", "padded", "block"),
    [(torch.float32, 64, 80, 32), (torch.bfloat16, 64, 80, 32), (torch.bfloat16, 32, 64, 32), (torch.float32, 16, 32, 16)],
    ids=["fp32-vec16", "bf16-vec16", "bf16-amx", "fp32-vec"],
)
def test_relocation_isas_and_dtypes(dtype, d, padded, block):
    worst, _ = _run_schedule(SCHEDULES["mixed-batch"], dtype=dtype, d=d, padded=padded, keep=16, block=block, ties=True)
    assert worst <= ATOL[dtype], worst


def test_slots_hold_the_kept_set_after_every_request():
    """The invariant: after the last step of a request at position p, the slots (p-W, p] hold exactly
    its top W keys (with their original positions); slot p-W is dead after a decode step."""
    keep, block, d = 16, 16, 32
    _, (kv_cache, layout, table, totals, biases) = _run_schedule(
        SCHEDULES["mixed-batch"], dtype=torch.float32, d=d, padded=48, keep=keep, block=block, ties=True
    )
    slots = PagedSlots(kv_cache, layout)
    for r, total in enumerate(totals):
        p = total - 1
        if p < keep:
            continue  # never past the window: nothing relocated
        window = torch.arange(p - keep + 1, p + 1)
        k = slots.keys(table[r].long()[window // block], window % block)  # [W, kvh, P]
        for h in range(k.shape[1]):
            want = sorted(range(total), key=lambda j: (-float(biases[r][j, h]), j))[:keep]
            assert sorted(decode_positions(k[:, h, d + 1 : d + 1 + DIGITS]).tolist()) == sorted(want)
        first = torch.tensor([p - keep])
        assert (slots.keys(table[r].long()[first // block], first % block)[..., d] == dead_bias(torch.float32)).all()


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_the_comparison_can_fail(ties):
    """Without the relocation (the stock sliding-window kernel alone) the same schedule is far off."""
    worst, _ = _run_schedule(
        SCHEDULES["mixed-batch"], dtype=torch.float32, d=32, padded=48, keep=16, block=16, ties=ties, relocate=False
    )
    assert worst > 1000 * ATOL[torch.float32] and worst > 10 * ATOL[torch.bfloat16], worst


def test_kernel_window_is_p_minus_W_to_p():
    """vLLM's CPU kernel with sliding window S = W + 1 reads exactly the slots p-W … p of a query at p
    (decode and prefill rows alike): the relocation relies on it."""
    gen = torch.Generator().manual_seed(3)
    dtype, d, padded, block, W, n = torch.float32, 32, 48, 16, 8, 30
    cfg = _config(dtype)
    attn = _attention(cfg, 2, 2, padded, d, dtype, block, W + 1)
    kv_cache = torch.zeros(4, 2, block, 2 * padded, dtype=dtype)
    attn.kv_cache = kv_cache
    table = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)
    q = torch.randn(n, 2, padded, generator=gen)
    k = torch.randn(n, 2, padded, generator=gen)
    v = torch.randn(n, 2, padded, generator=gen)
    slots = table[0].long()[torch.arange(n) // block] * block + torch.arange(n) % block
    md = _metadata(attn, [n], [n], table, slots, 2, dtype, W + 1)
    name = attn.layer_name
    with set_current_vllm_config(cfg), set_forward_context({name: md}, cfg, slot_mapping={name: slots}):
        out = attn(q.flatten(1), k.flatten(1), v.flatten(1)).view(n, 2, padded)
    for p in range(n):
        lo = max(0, p - W)
        s = torch.einsum("hc,jhc->hj", q[p], k[lo : p + 1]) * d**-0.5
        ref = torch.einsum("hj,jhc->hc", s.softmax(-1), v[lo : p + 1])
        torch.testing.assert_close(out[p], ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# the cache accessor, positions, the dead mark, when the window binds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("isa", "dtype", "padded"),
    [("vec", torch.float32, 64), ("vec16", torch.float32, 80), ("vec16", torch.bfloat16, 80), ("amx", torch.bfloat16, 64)],
)
def test_paged_slots_read_and_write_what_the_backend_does(isa, dtype, padded):
    gen = torch.Generator().manual_seed(0)
    block, kv_heads, num_blocks, n = 32, 2, 8, 75
    kv_cache = torch.zeros(num_blocks, kv_heads, block, 2 * padded, dtype=dtype)
    block_row = torch.tensor([5, 1, 6, 0])  # non-contiguous, out of order
    pos = torch.arange(n)
    blocks, tokens = block_row[pos // block], pos % block
    key = torch.randn(n, kv_heads, padded, generator=gen).to(dtype)
    value = torch.randn(n, kv_heads, padded, generator=gen).to(dtype)
    with set_current_vllm_config(_config(dtype)):
        impl = CPUAttentionBackendImpl(2 * kv_heads, padded, 0.1, kv_heads, None, None, "auto")
    stub = types.SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    impl.do_kv_cache_update(stub, key, value, kv_cache, blocks * block + tokens)
    slots = PagedSlots(kv_cache, probe_block_layout(isa, dtype, block, padded))
    assert torch.equal(slots.keys(blocks, tokens), key)
    assert torch.equal(slots.values(blocks, tokens), value)
    assert torch.equal(slots.keys(blocks, tokens, slice(3, 5)), key[..., 3:5])
    # write token 70's rows over token 3 (kv head 1 only), and one channel of token 4
    slots.write(slots.key_offsets(blocks[3], tokens[3])[1], key[70, 1])
    slots.write(slots.value_offsets(blocks[3], tokens[3])[1], value[70, 1])
    slots.write(slots.key_offsets(blocks[4], tokens[4], slice(2, 3))[0], torch.full((1,), 7.0))
    key[3, 1], value[3, 1], key[4, 0, 2] = key[70, 1], value[70, 1], 7.0
    assert torch.equal(slots.keys(blocks, tokens), key) and torch.equal(slots.values(blocks, tokens), value)


def test_rows_layout_accessor():
    """A token-major [blocks, kv_heads, block_size, 2P] cache (K = [..., :P], V = [..., P:]), the
    layout of FlashAttention-style backends."""
    kv_cache = torch.randn(3, 2, 4, 10)
    slots = PagedSlots(kv_cache, BlockLayout.rows(4, 5))
    blocks, tokens = torch.tensor([2, 0]), torch.tensor([1, 3])
    assert torch.equal(slots.keys(blocks, tokens), kv_cache[blocks, :, tokens, :5])
    assert torch.equal(slots.values(blocks, tokens), kv_cache[blocks, :, tokens, 5:])


def test_probe_layouts():
    block = 32
    layout = probe_block_layout("vec", torch.float32, block, 64)
    t, c = torch.arange(block)[:, None], torch.arange(64)[None, :]
    assert torch.equal(layout.key_index, c * block + t)  # K page: [P, block_size]
    assert torch.equal(layout.value_index, block * 64 + t * 64 + c)  # V page: [block_size, P]
    amx = probe_block_layout("amx", torch.bfloat16, block, 64)
    # K: pairs of bf16 channels in 4-byte words, 16 tokens per group; V: pairs of tokens per word.
    assert torch.equal(amx.key_index, (t // 16) * 16 * 64 + (c // 2) * 32 + (t % 16) * 2 + c % 2)
    assert torch.equal(amx.value_index, block * 64 + (c // 16) * block * 16 + (t // 2) * 32 + (c % 16) * 2 + t % 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_positions_exact_and_dead_bias_gives_weight_zero(dtype):
    positions = torch.tensor([0, 1, 255, 256, 4095, 65535])
    assert torch.equal(decode_positions(encode_positions(positions, 2, dtype)), positions)
    assert position_digits(256) == 1 and position_digits(257) == 2 and position_digits(65537) == 3
    # The dead bias times 1/scale (head size up to 4096) stays finite, and its fp32 softmax weight is
    # exactly 0 in the worst case dead_bias's docstring allows: the dead key's content score at +459 and
    # every live key's at -459 (bias ~0); at +470 / -470 (fp16) the weight would no longer be 0.
    dead = torch.tensor(dead_bias(dtype), dtype=dtype)
    assert torch.isfinite(dead * torch.tensor(4096**0.5, dtype=dtype))
    worst = torch.tensor([float(dead) + 459.0, -459.0, -459.0], dtype=torch.float32)
    assert worst.softmax(0)[0] == 0
    if dtype == torch.float16:
        beyond = torch.tensor([float(dead) + 470.0, -470.0], dtype=torch.float32)
        assert beyond.softmax(0)[0] > 0  # the bound is tight enough to matter


def test_keep_window_binds():
    assert not keep_window_binds(16, None, 16)
    assert keep_window_binds(16, None, 17)
    assert not keep_window_binds(16, 16, 512)  # a sliding window no wider than W: the kernel alone
    with pytest.raises(ValueError, match="sliding_window 24"):
        keep_window_binds(16, 24, 512)
