"""The keep-window C++ ops (vllm_doge/csrc/keep_window.cpp) against a float64 simulation of whole sequences.

A keep-window layer's page is DOGE_ATTN's (csrc/common.h) plus an int32 position per slot after the fp32
bias: K, V, bias [C][BS], positions [BS], cell = (2 d e + 4 C + 4) / e elements (C = 1 here).

The driver runs a schedule of steps as the backend does: write the step's K/V/bias (a pure-torch packer
in integer bits, standing in for cache_write) and positions (`keep_window_positions`), relocate for decode
rows (`keep_window_decode`), compute the prefill rows and pack the window (`keep_window_prefill`). After
every step it checks, per (request, kv head), that the slots max(0, p-W+1) .. p hold exactly K_p, each
entry's K/V/bias bits verbatim; prefill rows are compared with the float64 reference within the rounding
bound of tests/tolerances.py (rule 2). Decode rows are then exact by construction: the windowed main
attention op reads exactly K_p.

Freed blocks (wholly before max(0, p0 - W) of the next chunk) keep their ids in the block table and are
poisoned (NaN K/V with the highest- or the lowest-ranked bias and position, see `poison`) and reused by
other requests; table entries not yet allocated point at a poisoned block: an op that reads outside the
window produces NaN or a wrong kept set.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
import zlib
from dataclasses import dataclass, field

import pytest
import torch

from tolerances import assert_within_bound, gamma, unit_roundoff
from vllm_doge.backend import ops


# The ops live in the plugin's kernel library; a build failure fails these tests (never a skip).
assert ops.load(), "the plugin's C++ kernels did not build (see the warning above)"
OPS = torch.ops.vllm_doge

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _has_fast_path() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


# name: (VLLM_DOGE_ISA, VLLM_DOGE_KW_BF16): the portable C++ and the AVX-512 path (bf16 scores on
# vdpbf16ps); bf16 keys widened to the fp32 tiles: test_schedule_bf16_widened.
PATHS = {"portable": ("portable", "auto")}
if _has_fast_path():
    PATHS |= {"avx512": ("avx512", "dot")}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    isa, bf16 = PATHS[request.param]
    monkeypatch.setenv("VLLM_DOGE_ISA", isa)
    monkeypatch.setenv("VLLM_DOGE_KW_BF16", bf16)
    return request.param


# ---------------------------------------------------------------------------------------------- layout


@dataclass
class Geo:
    d: int
    bs: int
    dtype: torch.dtype
    c: int = 1

    @property
    def e(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def cell(self) -> int:
        size = 2 * self.d * self.e + 4 * self.c + 4
        assert size % self.e == 0
        return size // self.e

    @property
    def int_dtype(self) -> torch.dtype:
        return torch.int32 if self.e == 4 else torch.int16

    @property
    def r(self) -> int:  # elements per fp32/int32 field
        return 4 // self.e

    def k_idx(self, off: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
        if self.e == 4:
            return ch * self.bs + off
        return ((ch // 2) * self.bs + off) * 2 + ch % 2

    def v_idx(self, off: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
        if self.e == 4:
            return self.bs * self.d + off * self.d + ch
        return self.bs * self.d + ((off // 2) * self.d + ch) * 2 + off % 2

    def bias_idx(self, off: torch.Tensor) -> torch.Tensor:  # [..., r] (channel 0)
        return 2 * self.bs * self.d + off[..., None] * self.r + torch.arange(self.r)

    def pos_idx(self, off: torch.Tensor) -> torch.Tensor:
        return 2 * self.bs * self.d + (4 * self.c * self.bs) // self.e + off[..., None] * self.r + torch.arange(self.r)


def new_cache(num_blocks: int, kv: int, geo: Geo) -> torch.Tensor:
    """A NaN cache whose blocks are not adjacent (stride(0) = 2 pages per head)."""
    return torch.full((num_blocks, 2, kv, geo.bs, geo.cell), float("nan"), dtype=geo.dtype)[:, 1]


def int_pages(cache: torch.Tensor, geo: Geo) -> torch.Tensor:
    """The cache's bits as [NB, KV, BS*cell] integers (a view: writes land in the cache)."""
    nb, kv, bs, cell = cache.shape
    return cache.view(geo.int_dtype).view(nb, kv, bs * cell)


def to_fields(x: torch.Tensor, geo: Geo) -> torch.Tensor:
    """fp32/int32 [...] -> the cache's integer elements [..., r] (little endian: low half first)."""
    return x.contiguous().view(torch.int32).unsqueeze(-1).contiguous().view(geo.int_dtype)


def from_fields(x: torch.Tensor, geo: Geo, dtype: torch.dtype) -> torch.Tensor:
    return x.contiguous().view(torch.int32).view(dtype).squeeze(-1)


def pack(cache, geo: Geo, blocks, offs, k, v, bias):
    """cache_write in pure torch: k/v [T, KV, d] (model dtype), bias [T, KV] fp32 at (blocks, offs) [T]."""
    ip = int_pages(cache, geo)
    T, kv = bias.shape
    g = torch.arange(kv)[None, :, None]
    ch = torch.arange(geo.d)[None, :]
    b3 = blocks[:, None, None]
    ip[b3, g, geo.k_idx(offs[:, None], ch)[:, None, :]] = k.view(geo.int_dtype)
    ip[b3, g, geo.v_idx(offs[:, None], ch)[:, None, :]] = v.view(geo.int_dtype)
    ip[b3, g, geo.bias_idx(offs)[:, None, :]] = to_fields(bias.float(), geo)


def read_slots(cache, geo: Geo, blocks, offs):
    """(k bits, v bits [T, KV, d], bias fp32 [T, KV], positions int32 [T, KV]) of slots (blocks, offs)."""
    ip = int_pages(cache, geo)
    kv = cache.shape[1]
    g = torch.arange(kv)[None, :, None]
    ch = torch.arange(geo.d)[None, :]
    b3 = blocks[:, None, None]
    k = ip[b3, g, geo.k_idx(offs[:, None], ch)[:, None, :]]
    v = ip[b3, g, geo.v_idx(offs[:, None], ch)[:, None, :]]
    bias = from_fields(ip[b3, g, geo.bias_idx(offs)[:, None, :]], geo, torch.float32)
    pos = from_fields(ip[b3, g, geo.pos_idx(offs)[:, None, :]], geo, torch.int32)
    return k, v, bias, pos


def poison(cache, geo: Geo, block: int, high: bool = True):
    """NaN K/V in every slot of `block`, with the highest-ranked entry (bias 3e38, position 0: an op that
    reads it keeps it, so its output is NaN) or the lowest-ranked one (bias 1e-30, position 2^31 - 1: a
    relocation that reads it evicts it instead of a key of the window, so the kept set is wrong)."""
    ip = int_pages(cache, geo)
    offs = torch.arange(geo.bs)
    nan = torch.full((), float("nan"), dtype=geo.dtype).view(geo.int_dtype)
    bias, pos = (3.0e38, 0) if high else (1.0e-30, 2**31 - 1)
    ip[block] = nan
    ip[block][:, geo.bias_idx(offs).flatten()] = to_fields(torch.full((geo.bs,), bias), geo).flatten()
    ip[block][:, geo.pos_idx(offs).flatten()] = to_fields(torch.full((geo.bs,), pos, dtype=torch.int32), geo).flatten()


# ------------------------------------------------------------------------------------------- reference


def kept_sets(bias: torch.Tensor, W: int) -> torch.Tensor:
    """bias [L] fp32 of one (request, kv head) -> kept [L, L] bool: kept[i, j] iff query i keeps key j.
    Rank (bias, -position); K_i = top-W(K_{i-1} ∪ {i})."""
    L = bias.shape[0]
    kept = torch.zeros(L, L, dtype=torch.bool)
    heap: list[tuple[float, int]] = []  # min-heap of (bias, -j): the lowest rank on top
    members = set()
    for i in range(L):
        heapq.heappush(heap, (float(bias[i]), -i))
        members.add(i)
        if len(heap) > W:
            _, nj = heapq.heappop(heap)
            members.discard(-nj)
        kept[i, sorted(members)] = True
    return kept


def make_bias(L: int, kv: int, rnd: random.Random, gen: torch.Generator) -> torch.Tensor:
    """[L, KV] fp32 > 0 with many exact ties: levels from a small set, runs of one value (repeated tokens)."""
    levels = [0.25, 0.5, 1.0, 1.5, 2.5]
    bias = torch.rand(L, kv, generator=gen) * 3 + 0.05
    for j in range(L):
        for g in range(kv):
            if rnd.random() < 0.5:
                bias[j, g] = rnd.choice(levels)
    j = 0
    while j < L:  # runs of one value across heads
        if rnd.random() < 0.1:
            n = rnd.randint(2, 12)
            bias[j: j + n] = rnd.choice(levels)
            j += n
        j += 1
    return bias.float()


@dataclass
class Req:
    prompt: int
    chunk: int
    decode: int
    start: int
    # filled by the driver
    L: int = 0
    q: torch.Tensor = None  # [L, H, d] model dtype
    k: torch.Tensor = None  # [L, KV, d]
    v: torch.Tensor = None
    bias: torch.Tensor = None  # [L, KV] fp32
    kept: list = None  # per kv head [L, L]
    blocks: list = field(default_factory=list)  # the block-table row (freed ids stay)
    freed: int = 0  # blocks [0, freed) were freed
    done: int = 0  # keys processed


def reference_rows(req: Req, p0: int, p1: int, scale: float, G: int, dtype, keep_window: bool = True,
                   W: int = 0):
    """float64 output and bound [q, H, d] of queries p0..p1 (rule 2 of tests/tolerances.py).

    Per output element (u: fp32 unit roundoff, n <= W kept keys): scores within E = gamma_{d+2} max_j
    (scale sum_c |q_c k_jc| + |bias_j|) (exact 16-bit products, fp32 dot, scale, bias add), moving each
    weight by exp(+-2E); 8 u per exponential, twice; the sums over the kept keys and the normalisation
    gamma_{n+16}; then u_out for the output rounding. First-order terms, doubled as in test_kernels.py."""
    H, d = req.q.shape[1:]
    q = req.q[p0: p1 + 1].double()
    seq = p1 + 1
    out = torch.zeros(q.shape, dtype=torch.float64)
    bound = torch.zeros_like(out)
    u, u_out = unit_roundoff(torch.float32), unit_roundoff(dtype)
    for h in range(H):
        g = h // G
        K = req.k[:seq, g].double()
        V = req.v[:seq, g].double()
        bi = req.bias[:seq, g].double()
        if keep_window:
            allowed = req.kept[g][p0: p1 + 1, :seq]
        else:  # a plain sliding window of W (what the kernel would compute without the keep window)
            i = torch.arange(p0, p1 + 1)[:, None]
            j = torch.arange(seq)[None, :]
            allowed = (j <= i) & (i - j < W)
        qh = q[:, h]
        scores = (scale * qh @ K.T + bi[None, :]).masked_fill(~allowed, -math.inf)
        p = torch.softmax(scores, dim=-1)
        o = p @ V
        mags = scale * qh.abs() @ K.abs().T + bi.abs()[None, :]
        E = gamma(d + 2) * mags.masked_fill(~allowed, 0).amax(dim=-1, keepdim=True)
        n = int(allowed.sum(dim=-1).max())
        err = (2 * E + 16 * u + gamma(n + 16)) * (p @ V.abs())
        out[:, h] = o
        bound[:, h] = 2 * (err + u_out * (o.abs() + err))
    return out, bound


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class Config:
    W: int
    bs: int
    heads: int
    kv: int
    d: int


def run_schedule(reqs: list[Req], cfg: Config, dtype, seed: int, *, relocate: bool = True,
                 check_rows: bool = True, data=None) -> int:
    """Run every step of the schedule on the ops, checking the cache after each; returns prefill rows checked.
    data(req): replaces the random q/k/v/bias of a request."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    W, bs, H, KV, d = cfg.W, cfg.bs, cfg.heads, cfg.kv, cfg.d
    G = H // KV
    geo = Geo(d, bs, dtype)
    scale = d**-0.5
    for r in reqs:
        r.L = r.prompt + r.decode
        r.q = torch.randn(r.L, H, d, generator=gen).to(dtype)
        r.k = torch.randn(r.L, KV, d, generator=gen).to(dtype)
        r.v = torch.randn(r.L, KV, d, generator=gen).to(dtype)
        r.bias = make_bias(r.L, KV, rnd, gen)
        if data is not None:
            data(r)
        r.kept = [kept_sets(r.bias[:, g], W) for g in range(KV)]
    need = sum(math.ceil(r.L / bs) for r in reqs)
    num_blocks = need + 2
    cache = new_cache(num_blocks, KV, geo)
    pool = list(range(num_blocks))
    rnd.shuffle(pool)
    poison_block = pool.pop()
    poison(cache, geo, poison_block)
    for blk in pool:
        poison(cache, geo, blk, high=rnd.random() < 0.5)
    max_blocks = max(math.ceil(r.L / bs) for r in reqs) + 1
    rows_checked = 0
    step = 0
    while any(r.done < r.L for r in reqs):
        active = [r for r in reqs if r.start <= step and r.done < r.L]
        step += 1
        if not active:
            continue
        q_lens = [min(r.chunk, r.prompt - r.done) if r.done < r.prompt else 1 for r in active]
        # Allocate blocks and write the step's keys (cache_write + keep_window_positions).
        slots, blocks, offs, ks, vs, bis, poss = [], [], [], [], [], [], []
        for r, ql in zip(active, q_lens):
            while len(r.blocks) * bs < r.done + ql:
                r.blocks.append(pool.pop(rnd.randrange(len(pool))))
            for j in range(r.done, r.done + ql):
                blk = r.blocks[j // bs]
                slots.append(blk * bs + j % bs)
                blocks.append(blk)
                offs.append(j % bs)
                poss.append(j)
            ks.append(r.k[r.done: r.done + ql])
            vs.append(r.v[r.done: r.done + ql])
            bis.append(r.bias[r.done: r.done + ql])
        pack(cache, geo, torch.tensor(blocks), torch.tensor(offs), torch.cat(ks), torch.cat(vs), torch.cat(bis))
        slot_mapping = torch.tensor(slots + [-1], dtype=torch.int64)  # a padded token
        positions = torch.tensor(poss + [12345], dtype=torch.int32 if step % 2 else torch.int64)
        OPS.keep_window_positions(cache, positions, slot_mapping, d, 1)

        qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
        seq_lens = torch.tensor([r.done + ql for r, ql in zip(active, q_lens)], dtype=torch.int32)
        table = torch.full((len(active), max_blocks), poison_block, dtype=torch.int32)
        for b, r in enumerate(active):
            table[b, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        T = int(qsl[-1])
        query = torch.cat([r.q[r.done: r.done + ql] for r, ql in zip(active, q_lens)])
        query = torch.cat([query, torch.randn(T, H, d).to(dtype)], dim=1)[:, :H]  # a strided view
        out = torch.full((T, H, d), float("nan"), dtype=dtype)

        if relocate:
            OPS.keep_window_decode(cache, qsl, seq_lens, table, W, d)
        OPS.keep_window_prefill(out, query, cache, qsl, seq_lens, table, scale, W)

        for b, (r, ql) in enumerate(zip(active, q_lens)):
            rows = out[int(qsl[b]): int(qsl[b + 1])]
            p0, p1 = r.done, r.done + ql - 1
            if ql == 1:
                assert rows.isnan().all(), "a decode row was written by keep_window_prefill"
            elif check_rows:
                assert not rows.isnan().any(), f"NaN in prefill rows {p0}..{p1}: a slot outside the window was read"
                expected, bound = reference_rows(r, p0, p1, scale, G, dtype)
                assert_within_bound((rows.double() - expected).abs(), bound, what=f"rows {p0}..{p1} {dtype}")
                rows_checked += ql
            check_window(cache, geo, r, p1, W)
            r.done += ql
        # vLLM frees the blocks wholly before the next chunk's window (max(0, p0 - W)); ids stay in the table.
        for r in active:
            first = max(0, r.done - W) // bs if r.done < r.L else len(r.blocks)
            while r.freed < first:
                poison(cache, geo, r.blocks[r.freed], high=rnd.random() < 0.5)
                pool.append(r.blocks[r.freed])
                r.freed += 1
    return rows_checked


def check_window(cache, geo: Geo, r: Req, p: int, W: int):
    """Slots max(0, p-W+1) .. p hold exactly K_p per kv head, every entry verbatim."""
    lo = max(0, p - W + 1)
    s = torch.arange(lo, p + 1)
    blocks = torch.tensor(r.blocks)[s // geo.bs]
    k, v, bias, pos = read_slots(cache, geo, blocks, s % geo.bs)
    for g in range(cache.shape[1]):
        want = torch.nonzero(r.kept[g][p]).flatten()
        got = pos[:, g].long()
        assert sorted(got.tolist()) == want.tolist(), (
            f"kept set of head {g} after position {p}: slots hold {sorted(got.tolist())}, K_p is {want.tolist()}")
        assert torch.equal(k[:, g], r.k[got, g].view(geo.int_dtype)), "K of a relocated entry changed"
        assert torch.equal(v[:, g], r.v[got, g].view(geo.int_dtype)), "V of a relocated entry changed"
        assert torch.equal(bias[:, g].view(torch.int32), r.bias[got, g].view(torch.int32)), "bias changed"


# ----------------------------------------------------------------------------------------------- cases


def schedule(name: str, W: int) -> list[Req]:
    """(prompt, chunk, decode steps, first step) per request; staggered starts give mixed batches."""
    if name == "prompts":  # prompts of 1..8W in one chunk, then >= 3W decode steps
        lens = [1, 5, W, W + 1, 3 * W, 8 * W]
        starts = [0, 0, 1, 2, 3, 0]
        return [Req(n, 8 * W, 3 * W, s) for n, s in zip(lens, starts)]
    if name == "chunks":  # chunks of W/2, W+3 and 4W, mid-sequence past W
        return [Req(5 * W, W // 2, 3 * W, 0), Req(8 * W, W + 3, 3 * W, 1), Req(2 * W + 1, 4 * W, 3 * W, 2)]
    raise KeyError(name)


CONFIGS = {
    "w16-bs16-g2": Config(W=16, bs=16, heads=4, kv=2, d=32),
    "w8-bs32-g1": Config(W=8, bs=32, heads=2, kv=2, d=16),
    "w8-bs16-g2-d24": Config(W=8, bs=16, heads=2, kv=1, d=24),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sched", ["prompts", "chunks"])
def test_schedule(sched, config, dtype, path):
    cfg = CONFIGS[config]
    reqs = schedule(sched, cfg.W)
    rows = run_schedule(reqs, cfg, dtype, seed=zlib.crc32(f"{sched}/{config}".encode()) % 1000)
    assert rows > 0


@pytest.mark.skipif(not _has_fast_path(), reason="this CPU has no AVX-512 BF16: the widened path cannot run")
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sched", ["prompts", "chunks"])
def test_schedule_bf16_widened(sched, config, monkeypatch):
    """The AVX-512 path with bf16 keys widened to fp32 (VLLM_DOGE_KW_BF16=widen) instead of vdpbf16ps."""
    monkeypatch.setenv("VLLM_DOGE_ISA", "avx512")
    monkeypatch.setenv("VLLM_DOGE_KW_BF16", "widen")
    cfg = CONFIGS[config]
    rows = run_schedule(schedule(sched, cfg.W), cfg, torch.bfloat16, seed=zlib.crc32(f"{sched}/{config}".encode()) % 1000)
    assert rows > 0


def test_bs32_w16_gqa_mixed(path):
    """Block size 32 with W = 16 (a window inside one block), GQA 2, every schedule in one batch."""
    cfg = Config(W=16, bs=32, heads=4, kv=2, d=32)
    reqs = schedule("prompts", 16) + schedule("chunks", 16)
    run_schedule(reqs, cfg, torch.bfloat16, seed=7)


def test_positions_op():
    """Positions (int32 or int64) land beside the entry for every kv head; slot -1 skips; nothing else moves."""
    geo = Geo(16, 16, torch.bfloat16)
    cache = new_cache(4, 3, geo)
    gen = torch.Generator().manual_seed(0)
    cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
    before = cache.clone()
    slots = torch.tensor([5, 17, -1, 63, 0])
    for dt in (torch.int32, torch.int64):
        pos = torch.tensor([100, 7, 9, 2**31 - 1, 0], dtype=dt)
        OPS.keep_window_positions(cache, pos, slots, 16, 1)
        keep = slots >= 0
        _, _, _, got = read_slots(cache, geo, slots[keep] // 16, slots[keep] % 16)
        assert torch.equal(got, pos[keep].to(torch.int32)[:, None].expand(-1, 3))
    changed = (int_pages(cache, geo) != int_pages(before, geo))
    assert int(changed.sum()) == 4 * 3 * geo.r  # exactly the position fields of 4 slots x 3 heads
    with pytest.raises(RuntimeError, match="cell"):
        OPS.keep_window_positions(torch.zeros(2, 1, 16, 2 * 16 + 2, dtype=torch.bfloat16), pos, slots, 16, 1)


def test_decode_tie_new_key_leaves():
    """W keys of one bias and a new key of the same bias: the new key ranks lowest (latest) and leaves;
    slot p-W's key moves onto slot p. A higher-biased new key instead evicts the earliest lowest key."""
    W, geo = 4, Geo(16, 16, torch.float32)
    for new_bias, want in ((1.0, [0, 1, 2, 3]), (2.0, [1, 2, 3, 4]), (0.5, [0, 1, 2, 3])):
        cache = new_cache(2, 1, geo)
        poison(cache, geo, 0)
        poison(cache, geo, 1)
        bias = torch.tensor([[1.0]] * W + [[new_bias]])
        if new_bias == 2.0:
            bias[2, 0] = 0.75  # the unique lowest: leaves, key 0 takes its slot
            want = [0, 1, 3, 4]
        k = torch.randn(W + 1, 1, 16)
        pack(cache, geo, torch.ones(W + 1, dtype=torch.long), torch.arange(W + 1), k, k.clone(), bias)
        OPS.keep_window_positions(cache, torch.arange(W + 1), 16 + torch.arange(W + 1), 16, 1)
        OPS.keep_window_decode(cache, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([W + 1], dtype=torch.int32),
                               torch.tensor([[1]], dtype=torch.int32), W, 16)
        _, _, _, pos = read_slots(cache, geo, torch.ones(W, dtype=torch.long), torch.arange(1, W + 1))
        assert sorted(pos[:, 0].tolist()) == want, (new_bias, pos[:, 0].tolist())


def test_fails_without_relocation():
    """Removing the decode relocation breaks the kept set (the checker sees it), and the schedules' keep
    window differs from a plain sliding window of W by far more than the bound (evictions are exercised)."""
    cfg = CONFIGS["w8-bs32-g1"]
    with pytest.raises(AssertionError, match="kept set"):
        run_schedule(schedule("prompts", cfg.W), cfg, torch.float32, seed=3, relocate=False)
    reqs = schedule("chunks", cfg.W)
    run_schedule(reqs, cfg, torch.float32, seed=3)
    r = reqs[0]
    exact, bound = reference_rows(r, cfg.W, r.L - 1, cfg.d**-0.5, cfg.heads // cfg.kv, torch.float32)
    window, _ = reference_rows(r, cfg.W, r.L - 1, cfg.d**-0.5, cfg.heads // cfg.kv, torch.float32,
                               keep_window=False, W=cfg.W)
    assert ((exact - window).abs() / bound).max() > 1e3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [80, 128])
def test_wide_heads(d, dtype, path):
    """Head dims of several register chunks (the fast P.V tiles 64 channels at a time) and a query block
    boundary inside a chunk (4W = 64 rows, blocks of 32)."""
    cfg = Config(W=16, bs=16, heads=2, kv=1, d=d)
    reqs = [Req(4 * 16, 16 + 3, 16, 0), Req(2 * 16, 4 * 16, 16, 1), Req(5 * 16, 4 * 16, 4, 0)]
    assert run_schedule(reqs, cfg, dtype, seed=d) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softmax_weights(dtype, path):
    """Each output channel is one softmax weight (q = 0, so the scores are the biases; V one-hot per key):
    the weights themselves within the bound, with biases that spread the exponent's reduced argument over
    [-ln2/2, ln2/2] (an inexact exponential shows here, where few other roundings hide it)."""
    W, d = 16, 32

    def data(r):
        r.q.zero_()
        r.v.zero_()
        for j in range(r.L):
            r.v[j, :, j % d] = 1
            r.bias[j] = 0.02 + 0.5 * ((j * 0.6180339887) % 1.0)

    cfg = Config(W=W, bs=16, heads=2, kv=1, d=d)
    assert run_schedule([Req(W + 8, W + 8, 0, 0), Req(2 * W, 7, 0, 0)], cfg, dtype, seed=5, data=data) > 0


def test_schema_annotations():
    """The schemas declare exactly what each op mutates (cache; out and cache for prefill)."""
    geo = Geo(16, 16, torch.float32)
    W, L = 4, 12
    cache = new_cache(2, 1, geo)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(L, 1, 16, generator=gen)
    pack(cache, geo, torch.arange(L) // 16, torch.arange(L) % 16, k, k.clone(), torch.rand(L, 1, generator=gen) + 0.1)
    slots = torch.arange(L)
    torch.library.opcheck(OPS.keep_window_positions, (cache, slots.clone(), slots, 16, 1), test_utils=("test_schema",))
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    q = torch.randn(L, 2, 16, generator=gen)
    torch.library.opcheck(OPS.keep_window_prefill,
                          (torch.zeros_like(q), q, cache, torch.tensor([0, L], dtype=torch.int32),
                           torch.tensor([L], dtype=torch.int32), table, 0.25, W), test_utils=("test_schema",))
    torch.library.opcheck(OPS.keep_window_decode,
                          (cache, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([L], dtype=torch.int32),
                           table, W, 16), test_utils=("test_schema",))
