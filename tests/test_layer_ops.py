"""The kernels around attention (vllm_doge/csrc): the cache write that computes the dynamic-mask bias, and
the scaled residual + RMSNorm, against float64 references, on each vector path this machine runs.

Bounds (tests/tolerances.py, rule 2): a dot product of n terms in fp32 is within gamma_n * sum|x_i w_i| of
the exact value; the bias b = exp(A softplus(dt)) moves by b |A| sigmoid(dt) per unit of dt, to first order
(doubled for the second), plus its rounding to fp32. The norm's fp32 reduction and scaling add
gamma_{n+4}(fp32) relative error before the two roundings to the model's dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_kernels import strided_cache, unpack
from tests.tolerances import gamma, unit_roundoff
from vllm_doge.backend import ops

pytestmark = pytest.mark.skipif(not ops.load(), reason="vllm_doge CPU kernels failed to build (see the warning)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = ["portable"] + (["avx512"] if ops.reconfigure().startswith("avx512") else [])


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("VLLM_DOGE_ISA", request.param)
    assert ops.reconfigure().startswith(request.param)
    yield request.param
    monkeypatch.undo()
    ops.reconfigure()


# ------------------------------------------------------------------------------ bias in the cache write


def mask_inputs(T, rows, n, dtype, seed):
    """dt inputs spread so that softplus runs both branches (dt beyond 20 too) and A spans the bias from
    ~1 down to ~exp(-30): the bias then matters to every score."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=gen).to(dtype)
    w = (torch.randn(rows, n, generator=gen) * (3.0 / math.sqrt(n))).to(dtype)
    shift = torch.linspace(-4.0, 22.0, rows).to(dtype)
    A = -torch.rand(rows, generator=gen).add(0.05).to(dtype)
    return x, w, shift, A


def reference_bias(x, w, shift, A):
    """float64 bias [T, rows] and its bound."""
    x64, w64 = x.double(), w.double()
    terms = x64[:, None, :] * w64[None]
    dt = terms.sum(-1) + shift.double()
    bias = torch.exp(A.double() * torch.nn.functional.softplus(dt))
    n = x.shape[1]
    dt_err = gamma(n + 1) * (terms.abs().sum(-1) + shift.double().abs())
    bound = bias * (2 * A.double().abs() * torch.sigmoid(dt) * dt_err + 2 * unit_roundoff())
    return bias, bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [256, 200], ids=["n256", "n200-tail"])
def test_cache_write_masked(dtype, n, isa):
    """K/V land exactly as cache_write puts them; the bias of each (token, kv head, channel) is within the
    bound of the float64 value; skipped slots stay untouched."""
    T, kv, C, d, bs, nb = 37, 2, 3, 16, 16, 6
    x, w, shift, A = mask_inputs(T, kv * C, n, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    key = torch.randn(T, kv, d, generator=gen).to(dtype)
    value = torch.randn(T, kv, d, generator=gen).to(dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[::5] = -1
    cell = ops.cell_elements(d, C, dtype)
    cache = strided_cache(nb, kv, bs, cell, dtype)
    ops.cache_write_masked(key, value, x, w, shift, A, cache, slots)
    expected, bound = reference_bias(x, w, shift, A)
    plain = strided_cache(nb, kv, bs, cell, dtype)
    ops.cache_write(key, value, torch.zeros(T, kv, C), plain, slots)
    k, v, b = unpack(cache, d, C)
    k0, v0, _ = unpack(plain, d, C)
    assert torch.equal(k.nan_to_num(7.0), k0.nan_to_num(7.0)) and torch.equal(v.nan_to_num(7.0), v0.nan_to_num(7.0))
    for t in range(T):
        s = int(slots[t])
        blk, off = divmod(s, bs)
        if s < 0:
            continue
        got = b[blk, :, :, off].reshape(-1)
        err = (got - expected[t]).abs()
        assert bool((err <= bound[t]).all()), (t, err.max().item(), bound[t].min().item())
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    untouched = unpack(strided_cache(nb, kv, bs, cell, dtype), d, C)[2]
    rows = b.permute(0, 3, 1, 2).reshape(nb * bs, -1)[~written]
    fill = untouched.permute(0, 3, 1, 2).reshape(nb * bs, -1)[~written]
    assert torch.equal(rows.nan_to_num(7.0), fill.nan_to_num(7.0))


def test_masked_bias_catches_a_wrong_scale(isa):
    """The bound is tight enough to see A off by 1%."""
    x, w, shift, A = mask_inputs(8, 2, 64, torch.float32, seed=5)
    kv, d, bs = 1, 16, 16
    cache = strided_cache(1, kv, bs, ops.cell_elements(d, 2, torch.float32), torch.float32)
    key = torch.zeros(8, kv, d)
    ops.cache_write_masked(key, key, x, w, shift, A * 1.01, cache, torch.arange(8))
    expected, bound = reference_bias(x, w, shift, A)
    got = unpack(cache, d, 2)[2][0, 0].t()[:8]
    assert not bool(((got - expected).abs() <= bound).all())


def test_masked_bias_is_batch_invariant(isa):
    """A token's bias has the same bits whatever else is in its batch, and wherever it sits."""
    x, w, shift, A = mask_inputs(40, 4, 96, torch.bfloat16, seed=6)
    kv, d, bs = 2, 16, 64
    cell = ops.cell_elements(d, 2, torch.bfloat16)
    key = torch.zeros(40, kv, d, dtype=torch.bfloat16)
    whole = strided_cache(1, kv, bs, cell, torch.bfloat16)
    ops.cache_write_masked(key, key, x, w, shift, A, whole, torch.arange(40))
    one = strided_cache(1, kv, bs, cell, torch.bfloat16)
    pick = torch.tensor([17, 3])
    ops.cache_write_masked(key[pick], key[pick], x[pick], w, shift, A, one, torch.tensor([50, 51]))
    b_whole, b_one = unpack(whole, d, 2)[2][0], unpack(one, d, 2)[2][0]
    assert torch.equal(b_one[..., 50], b_whole[..., 17]) and torch.equal(b_one[..., 51], b_whole[..., 3])


# ------------------------------------------------------------------------------ scaled residual + RMSNorm


def norm_inputs(T, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, n, generator=gen) * 4).to(dtype)
    y = torch.randn(T, n, generator=gen).to(dtype)
    scale = (torch.rand(n, generator=gen) * 1.5 + 0.25).to(dtype)
    weight = (torch.randn(n, generator=gen) + 1).to(dtype)
    return x, y, scale, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [256, 200], ids=["n256", "n200-tail"])
def test_residual_rms_norm(dtype, n, isa):
    """x' equals the torch expression scale * x + y bit for bit (the same two roundings); the normed output
    is within its bound of the float64 norm of x'."""
    x, y, scale, weight = norm_inputs(33, n, dtype, seed=7)
    eps_norm = 1e-6
    xo, h = ops.residual_rms_norm(x, y, scale, weight, eps_norm)
    assert torch.equal(xo, scale * x + y)
    x64 = xo.double()
    exact = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps_norm) * weight.double()
    u = unit_roundoff(dtype)
    rel = (1 + u) ** 2 * (1 + gamma(n + 4)) - 1
    err = (h.double() - exact).abs()
    assert bool((err <= rel * exact.abs() + torch.finfo(dtype).tiny).all()), err.max().item()
    # a row alone gives the same bits as in the batch
    xo1, h1 = ops.residual_rms_norm(x[5:6], y[5:6], scale, weight, eps_norm)
    assert torch.equal(xo1, xo[5:6]) and torch.equal(h1, h[5:6])


def test_residual_rms_norm_bound_catches_a_missing_weight(isa):
    x, y, scale, weight = norm_inputs(4, 64, torch.bfloat16, seed=8)
    xo, h = ops.residual_rms_norm(x, y, scale, torch.ones_like(weight), 1e-6)
    x64 = xo.double()
    exact = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    rel = (1 + unit_roundoff(torch.bfloat16)) ** 2 * (1 + gamma(68)) - 1
    assert not bool(((h.double() - exact).abs() <= rel * exact.abs()).all())


def test_fake_impls():
    x, y, scale, weight = norm_inputs(3, 32, torch.float32, seed=9)
    torch.library.opcheck(torch.ops.vllm_doge.residual_rms_norm, (x, y, scale, weight, 1e-6))
    xi, w, shift, A = mask_inputs(3, 2, 32, torch.float32, seed=9)
    cache = torch.zeros(2, 1, 16, ops.cell_elements(16, 2, torch.float32))
    key = torch.randn(3, 1, 16)
    torch.library.opcheck(
        torch.ops.vllm_doge.cache_write_masked, (key, key, xi, w, shift, A, cache, torch.arange(3)),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip
