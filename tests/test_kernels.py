"""The C++ CPU attention kernels (vllm_doge/csrc) against a float64 reference that unpacks the page layout.

Every case runs on each path this machine can run: the AVX-512 tiles (vdpbf16ps for bf16), bf16 widened to
the fp32 tiles (bf16 cases only), oneDNN's brgemm for prefill where it is used, the AVX2 loops (on any CPU
with AVX2, AVX-512 ones included) and the portable C++ (forced with VLLM_DOGE_ISA / VLLM_DOGE_BRGEMM /
VLLM_DOGE_BF16 and `ops.reconfigure()`); a child process repeats the bf16/fp32 cases with oneDNN capped
below AMX.
Caches start as NaN and only this batch's keys are written, so a kernel that reads an unwritten slot, a
block-table entry past the request's blocks or a block wholly before the sliding window returns NaN.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

from tests.tolerances import assert_within_bound, gamma, unit_roundoff
from vllm_doge.backend import ops

pytestmark = pytest.mark.skipif(not ops.load(), reason="vllm_doge CPU kernels failed to build (see the warning)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _paths() -> list[tuple[str, dict]]:
    """(name, environment) of every path this machine runs."""
    paths = [("portable", {"VLLM_DOGE_ISA": "portable"})]
    auto = ops.reconfigure() if os.environ.get("VLLM_DOGE_ISA", "auto") == "auto" else "portable"
    if auto.startswith(("avx2", "avx512")):  # every AVX-512 CPU runs the AVX2 path too
        paths.append(("avx2", {"VLLM_DOGE_ISA": "avx2"}))
    if auto.startswith("avx512"):
        paths += [
            ("avx512-loops", {"VLLM_DOGE_ISA": "avx512", "VLLM_DOGE_BRGEMM": "0", "VLLM_DOGE_BF16": "dot"}),
            ("avx512-fp32-tiles", {"VLLM_DOGE_ISA": "avx512", "VLLM_DOGE_BRGEMM": "0", "VLLM_DOGE_BF16": "fp32"}),
            ("avx512-brgemm", {"VLLM_DOGE_ISA": "avx512", "VLLM_DOGE_BRGEMM": "1"}),
        ]
    return paths


PATHS = _paths()


def _use_path(request, monkeypatch):
    name, env = request.param
    for key in ("VLLM_DOGE_ISA", "VLLM_DOGE_BRGEMM", "VLLM_DOGE_BF16"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    running = ops.reconfigure()
    assert running.startswith(env["VLLM_DOGE_ISA"]), running
    yield name
    monkeypatch.undo()
    ops.reconfigure()


@pytest.fixture(params=PATHS, ids=[name for name, _ in PATHS])
def path(request, monkeypatch):
    yield from _use_path(request, monkeypatch)


# Only bf16 is widened to the fp32 tiles (fp32 and fp16 run the plain AVX-512 loops there).
NARROW_PATHS = [p for p in PATHS if p[0] != "avx512-fp32-tiles"]


@pytest.fixture(params=NARROW_PATHS, ids=[name for name, _ in NARROW_PATHS])
def narrow_path(request, monkeypatch):
    yield from _use_path(request, monkeypatch)


# ---------------------------------------------------------------------------------------------- layout


def unpack(cache: torch.Tensor, head_dim: int, channels: int):
    """The page layout of csrc/common.h, read back as float64 K, V [NB, KV, BS, d] and bias [NB, KV, C, BS]."""
    nb, kv, bs, _ = cache.shape
    d = head_dim
    page = cache.reshape(nb, kv, -1) if cache.is_contiguous() else torch.stack([c.reshape(kv, -1) for c in cache])
    k_raw, v_raw = page[..., : bs * d], page[..., bs * d: 2 * bs * d]
    if cache.dtype == torch.float32:
        k = k_raw.view(nb, kv, d, bs).transpose(-1, -2)
        v = v_raw.view(nb, kv, bs, d)
    else:  # K[t, c] at ((c/2) BS + t) 2 + c%2, V[t, c] at ((t/2) d + c) 2 + t%2
        k = k_raw.view(nb, kv, d // 2, bs, 2).permute(0, 1, 3, 2, 4).reshape(nb, kv, bs, d)
        v = v_raw.view(nb, kv, bs // 2, d, 2).permute(0, 1, 2, 4, 3).reshape(nb, kv, bs, d)
    bias = page[..., 2 * bs * d:].contiguous().view(torch.float32).view(nb, kv, channels, bs)
    return k.double(), v.double(), bias.double()


def strided_cache(num_blocks: int, kv: int, bs: int, cell: int, dtype) -> torch.Tensor:
    """A NaN cache whose blocks are not adjacent (stride(0) = 2 pages per head), as a view can be."""
    return torch.full((num_blocks, 2, kv, bs, cell), float("nan"), dtype=dtype)[:, 1]


def test_cell_elements():
    assert ops.cell_elements(128, 1, torch.bfloat16) == 258
    assert ops.cell_elements(128, 4, torch.float32) == 260
    assert ops.cell_elements(16, 2, torch.float16) == 36


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write_round_trip(dtype):
    """Every element lands where the reference unpacker expects it, skipped slots and other blocks stay
    untouched (bit for bit), and key/value may be strided views of one qkv tensor."""
    gen = torch.Generator().manual_seed(1)
    T, kv, d, C, bs, nb = 50, 3, 16, 2, 32, 7
    qkv = torch.randn(T, 5 * kv * d, generator=gen).to(dtype)
    key = qkv[:, kv * d: 2 * kv * d].view(T, kv, d)
    value = qkv[:, 3 * kv * d: 4 * kv * d].view(T, kv, d)
    bias = torch.randn(T, kv, C, generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[::7] = -1
    cache = strided_cache(nb, kv, bs, ops.cell_elements(d, C, dtype), dtype)
    before = cache.clone()
    ops.cache_write(key, value, bias, cache, slots)
    k, v, b = unpack(cache, d, C)
    written = torch.zeros(nb, bs, dtype=torch.bool)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        blk, off = divmod(s, bs)
        written[blk, off] = True
        assert torch.equal(k[blk, :, off], key[t].double())
        assert torch.equal(v[blk, :, off], value[t].double())
        assert torch.equal(b[blk, :, :, off], bias[t].double())
    def same(x, y):
        return bool(((x == y) | (x.isnan() & y.isnan())).all())

    k0, v0, b0 = unpack(before, d, C)
    for got, old in ((k, k0), (v, v0)):
        assert same(got.permute(0, 2, 1, 3)[~written], old.permute(0, 2, 1, 3)[~written])
    assert same(b.permute(0, 3, 1, 2)[~written], b0.permute(0, 3, 1, 2)[~written])


# ------------------------------------------------------------------------------------------- reference


@dataclass
class Batch:
    query: torch.Tensor  # [T, H, d], a strided view
    cache: torch.Tensor
    qsl: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scale: float
    window: int
    channels: int
    q_lens: list[int]


def make_batch(reqs, *, heads, kv, d, channels, bs, window, dtype, seed) -> Batch:
    """reqs: (context, q_len) per request. Writes every key a query may attend (all keys < seq_len,
    except blocks wholly before the first query's window, which are left NaN and skipped with slot -1) at
    random blocks; block-table entries past each request's blocks point at a NaN block."""
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    seq_lens = [c + q for c, q in reqs]
    need = [math.ceil(s / bs) for s in seq_lens]
    nb = sum(need) + 3
    ids = list(range(nb))
    rnd.shuffle(ids)
    nan_block = ids.pop()
    max_blocks = max(need) + 2
    table = torch.full((len(reqs), max_blocks), nan_block, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    cache = strided_cache(nb, kv, bs, ops.cell_elements(d, channels, dtype), dtype)
    T = sum(seq_lens)
    qkv = torch.randn(T, (heads + 2 * kv) * d, generator=gen).to(dtype)
    keys = qkv[:, heads * d: (heads + kv) * d].view(T, kv, d)
    values = qkv[:, (heads + kv) * d:].view(T, kv, d)
    bias = torch.randn(T, kv, channels, generator=gen)
    slots, row = [], 0
    for b, (ctx, q) in enumerate(reqs):
        first_window_block = max(0, ctx - window + 1) // bs if window > 0 else 0
        for j in range(ctx + q):
            blk = j // bs
            slots.append(-1 if blk < first_window_block else int(table[b, blk]) * bs + j % bs)
    ops.cache_write(keys, values, bias, cache, torch.tensor(slots, dtype=torch.int64))
    # The queries: rows of a second qkv-shaped tensor, so a strided view too.
    q_rows = sum(q for _, q in reqs)
    query = torch.randn(q_rows, (heads + 2 * kv) * d, generator=gen).to(dtype)[:, : heads * d].view(q_rows, heads, d)
    qsl = torch.tensor([0] + [sum(q for _, q in reqs[: i + 1]) for i in range(len(reqs))], dtype=torch.int32)
    return Batch(query, cache, qsl, torch.tensor(seq_lens, dtype=torch.int32), table, d**-0.5, window, channels,
                 [q for _, q in reqs])


def reference(batch: Batch, swap_bias: bool = False):
    """Exact (float64) output and its rounding bound, both [T, H, d].

    Bound, per output element (u = unit roundoff of fp32, u_out of the output dtype, n keys in nb blocks,
    p_j the exact weights, S1 = sum_j p_j |v_j|):
      score error    |e_j| <= E = gamma_{d+2} max_j (scale sum_c |q_c k_jc| + |bias_j|)  (dot, scale, bias add;
                     16-bit products are exact in fp32); it moves each p_j by a factor within exp(+-2E);
      exp            8 u per exponential (the AVX-512 polynomial is within a few ulp), twice: weight and sum;
      accumulation   gamma_{n + 10 nb + 16} S1: the sums over keys, one rescale and one exp per block, the
                     split-KV merge;
      P in bf16      2^-8 S1 for 16-bit inputs (P.V on bf16 weights, as brgemm and vdpbf16ps do);
      output         u_out (|out| + the above), the final rounding to the output dtype.
    The terms are first-order (products of (1 + delta) factors and exp(2E) - 1 ~ 2E are linearised), so the
    sum is doubled: the neglected second-order terms are below 1% of it for every case here.
    """
    nb_total, kv, bs, _ = batch.cache.shape
    heads, d = batch.query.shape[1:]
    G, C = heads // kv, batch.channels
    # Unwritten slots are NaN (or, for the bias of 16-bit caches, NaN bits read as fp32): zero them so
    # that the masked weights (exactly 0) keep the reference finite.
    k_all, v_all, b_all = (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in unpack(batch.cache, d, C))
    q_all = batch.query.double()
    out = torch.zeros_like(q_all)
    bound = torch.zeros_like(q_all)
    u, u_out = unit_roundoff(torch.float32), unit_roundoff(batch.query.dtype)
    p_round = 2.0**-8 if batch.query.dtype != torch.float32 else 0.0
    for b, ql in enumerate(batch.q_lens):
        seq = int(batch.seq_lens[b])
        ctx = seq - ql
        blocks = batch.block_table[b, : math.ceil(seq / bs)].long()
        K = k_all[blocks].permute(1, 0, 2, 3).reshape(kv, -1, d)[:, :seq]  # [KV, seq, d]
        V = v_all[blocks].permute(1, 0, 2, 3).reshape(kv, -1, d)[:, :seq]
        Bi = b_all[blocks].permute(1, 2, 0, 3).reshape(kv, C, -1)[:, :, :seq]  # [KV, C, seq]
        pos = ctx + torch.arange(ql)[:, None]
        j = torch.arange(seq)[None, :]
        allowed = j <= pos
        if batch.window > 0:
            allowed &= pos - j < batch.window
        n_blocks = math.ceil(seq / bs)
        for h in range(heads):
            g, c = h // G, (h % G if C > 1 else 0)
            if swap_bias:
                c = (c + 1) % C
            q = q_all[int(batch.qsl[b]): int(batch.qsl[b + 1]), h]  # [ql, d]
            scores = batch.scale * q @ K[g].T + Bi[g, c][None, :]
            scores = scores.masked_fill(~allowed, -math.inf)
            p = torch.softmax(scores, dim=-1)
            o = p @ V[g]
            mags = batch.scale * q.abs() @ K[g].abs().T + Bi[g, c].abs()[None, :]
            E = gamma(d + 2) * mags.masked_fill(~allowed, 0).amax(dim=-1, keepdim=True)
            s1 = p @ V[g].abs()
            rel = 2 * E + 16 * u + gamma(seq + 10 * n_blocks + 16) + p_round
            err = rel * s1
            out[int(batch.qsl[b]): int(batch.qsl[b + 1]), h] = o
            bound[int(batch.qsl[b]): int(batch.qsl[b + 1]), h] = 2 * (err + u_out * (o.abs() + err))
    return out, bound


def run(batch: Batch) -> torch.Tensor:
    out = torch.empty(batch.query.shape, dtype=batch.query.dtype)
    ops.attention(out, batch.query, batch.cache, batch.qsl, batch.seq_lens, batch.block_table, batch.scale,
                  batch.window, batch.channels)
    return out


# ---------------------------------------------------------------------------------------------- cases

# name: (requests as (context, q_len), heads, kv heads, head_dim, bias channels, block size, window)
CASES = {
    "decode": ([(0, 1), (37, 1), (300, 1), (15, 1), (16, 1)], 4, 2, 32, 1, 16, 0),
    "decode-mha-legacy-bias": ([(90, 1), (7, 1)], 4, 4, 16, 1, 32, 0),
    "decode-long-split": ([(700, 1)], 4, 1, 32, 4, 16, 0),
    "prefill-gqa4-bias-per-head": ([(0, 40), (0, 17)], 8, 2, 16, 4, 32, 0),
    "long-prefill": ([(0, 150), (40, 70)], 4, 2, 32, 1, 32, 0),
    "chunked-prefill": ([(50, 20), (130, 33)], 2, 2, 32, 1, 16, 0),
    "spec-verify": ([(100, 3), (255, 4), (1, 2)], 4, 2, 32, 2, 128, 0),
    "mixed": ([(33, 1), (0, 45), (60, 19), (200, 1), (10, 3)], 4, 2, 32, 1, 16, 0),
    "sliding-window": ([(100, 1), (0, 70), (80, 25), (47, 3)], 4, 2, 32, 2, 16, 20),
    "d128-mixed": ([(150, 1), (0, 36), (130, 18), (257, 1)], 4, 2, 128, 1, 128, 0),
    "d160-window": ([(300, 1), (90, 24)], 2, 1, 160, 1, 32, 64),
    # AMX tiles for <= 16 stacked rows (d % 64 == 0, bs % 32 == 0): partial blocks of odd and even length, a
    # 32-key tail, M = 4 .. 16 (and 20, past the tiles), per-head bias, a window.
    "d64-decode-spec": ([(0, 1), (31, 1), (32, 1), (62, 1), (100, 4), (77, 3), (5, 5)], 8, 2, 64, 4, 32, 0),
    "d64-window": ([(200, 1), (90, 4), (33, 2)], 4, 1, 64, 1, 64, 40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_bf16(case, path):
    check_attention(case, torch.bfloat16, path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention(case, dtype, narrow_path):
    check_attention(case, dtype, narrow_path)


def check_attention(case, dtype, path):
    reqs, heads, kv, d, C, bs, window = CASES[case]
    batch = make_batch(reqs, heads=heads, kv=kv, d=d, channels=C, bs=bs, window=window, dtype=dtype,
                       seed=hash(case) % 1000)
    got = run(batch)
    assert not got.isnan().any(), "a NaN: an unwritten slot or a block outside the request/window was read"
    expected, bound = reference(batch)
    assert_within_bound((got.double() - expected).abs(), bound, what=f"{case}/{dtype}/{path}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bound_catches_swapped_bias(dtype, path):
    """The bound is tight enough to see a defect: reading the neighbouring bias channel (C = G = 2) breaks
    it by far more than 10x."""
    reqs, heads, kv, d, C, bs, window = CASES["spec-verify"]
    batch = make_batch(reqs, heads=heads, kv=kv, d=d, channels=C, bs=bs, window=window, dtype=dtype, seed=3)
    got = run(batch).double()
    wrong, bound = reference(batch, swap_bias=True)
    assert ((got - wrong).abs() / bound).max() > 10


def test_fake_impls():
    """The meta/fake registrations let torch.compile trace through both ops."""
    batch = make_batch([(5, 3)], heads=2, kv=1, d=16, channels=1, bs=16, window=0, dtype=torch.float32, seed=0)
    out = torch.empty(batch.query.shape)
    torch.library.opcheck(torch.ops.vllm_doge.attention,
                          (out, batch.query, batch.cache, batch.qsl, batch.seq_lens, batch.block_table, 0.25, 0, 1),
                          test_utils=("test_schema", "test_faketensor"))
    T = 4
    kv = torch.randn(T, 1, 16)
    cache = torch.zeros(2, 1, 16, ops.cell_elements(16, 1, torch.float32))
    torch.library.opcheck(torch.ops.vllm_doge.cache_write,
                          (kv, kv.clone(), torch.randn(T, 1, 1), cache, torch.arange(T)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") is not None or not any(n == "avx512-brgemm" for n, _ in PATHS),
                    reason="needs AVX-512 and is itself the no-AMX run")
def test_no_amx_emulation():
    """A CPU with AVX512_BF16 but no AMX, emulated with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 in a child:
    auto leaves bf16 to the hand-written tiles, VLLM_DOGE_BRGEMM=1 runs oneDNN's avx512_core_bf16 ukernel on
    the same VNNI pages, and every bf16/fp32 case passes on both."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_DOGE_ISA", "VLLM_DOGE_BRGEMM", "VLLM_DOGE_BF16")}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    probe = ("from vllm_doge.backend import ops; import os; assert ops.load(); a = ops.reconfigure(); "
             "os.environ['VLLM_DOGE_BRGEMM'] = '1'; f = ops.reconfigure(); print(a, f); "
             "assert 'brgemm(bf16)' not in a and 'brgemm(bf16)' in f, (a, f)")
    r = subprocess.run([sys.executable, "-c", probe], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "test_attention and not fp16 and avx512"], env=env, cwd=root, capture_output=True,
                       text=True)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
