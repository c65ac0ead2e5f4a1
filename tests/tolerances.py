"""How far two floating-point results may legitimately differ, in one place.

Every tolerance of the numerical tests comes from one of two rules, each stated in units of the dtype's
machine epsilon (`eps`, the gap between 1 and the next float: 2^-23 for fp32) times a scale taken from the
data, so that a tolerance means the same thing whatever the magnitudes, the machine or its load.

1. Whole networks (`assert_logits_close`): two fp32 implementations of the same network, or one
   implementation run on another batch shape, thread count or memory layout, differ only by rounding:
   other summation orders in GEMMs and reductions, other fusions, SDPA against an explicit softmax. That
   rounding is relative to the magnitude of what is summed, which after the final RMSNorm and lm_head is
   the size of the logits, so the bound is

       |actual - expected| <= LOGITS_K * eps(fp32) * max(max|expected|, 1)

   LOGITS_K = 512: the worst ratio measured over every such comparison of the test suite (1 and 2 threads,
   idle and with both cores busy) was 36 eps * scale (test_doge_hf.py, gqa_untied_plain, doge_hf against
   transformers' Doge, while doge_hf computed the mask bias in fp32; 9 since it does so in fp64). The
   comparison that failed at atol=1e-4 measures 22..23 (test_build_checkpoint.py, dense-mha-tied: 1.17e-4 at
   |logits| up to 40). 512 leaves a margin of 14x over the worst. At |logits| ~ 40 the tolerance is
   ~2.4e-3, and real defects move the logits by far more: dropping the dynamic mask (A = 0) by 8e3..1.6e4
   tolerances, and even A 0.1% too large by 17..57 (asserted by
   test_build_checkpoint.py::test_tolerance_catches_mask_errors); every other ablation of test_build_checkpoint.py,
   test_doge_hf.py, test_legacy_hf.py and test_cdmoe.py (no keep window, no sliding window, no
   experts, another RoPE, transformers' token-mixing MoE prefill, q/k norm) by 9.6e2 or more (asserted:
   more than 100, `assert_clearly_apart`).
   Logprobs: `logprob = logit - logsumexp(logits)` carries at most twice the logits' error, so
   `logprob_tolerance` is 2 * LOGITS_K eps * max|logit| (vLLM against doge_hf measured 1.2..5.5).

2. Kernels (`dot_error_bound`): a sum of n products, in any order, with unit roundoff u = eps / 2 in the
   accumulation, is within gamma_n * sum_i |x_i * y_i| of the exact value, gamma_n = n u / (1 - n u)
   (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5). This is a worst-case bound,
   not a statistical one: it holds for any summation order, any blocking, any machine. Kernel tests
   compute the sum of absolute products in fp64 beside the exact result and compare elementwise
   (`assert_within_bound`); test_cdmoe.routed_error_bound carries the bound through the CDMoE
   activation, the routing weights and the up-projection sum, for each path's roundings.

Exact comparisons (`atol=0`, `torch.equal`) stay exact where equality holds by construction (the same
kernel on the same inputs, a permutation, a copy).
"""

from __future__ import annotations

import os

import torch

LOGITS_K = 512


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon of a floating dtype (fp32: 1.19e-7, bf16: 7.8e-3, fp16: 9.8e-4)."""
    return torch.finfo(dtype).eps


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = eps / 2: the largest relative error of one correctly rounded operation."""
    return eps(dtype) / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative bound of n successive roundings (Higham, Lemma 3.1)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"gamma_{n} undefined in {dtype}: n u = {nu}"
    return nu / (1 - nu)


def dot_error_bound(abs_products: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Worst-case error of `n`-term sums of products accumulated in `dtype`, elementwise: gamma_n times the
    sum of the absolute products (computed by the caller in fp64)."""
    return gamma(n, dtype) * abs_products


def logits_tolerance(expected: torch.Tensor, k: float = LOGITS_K, dtype: torch.dtype = torch.float32) -> float:
    """Rule 1: k * eps(dtype) * max(max|expected|, 1)."""
    scale = max(expected.detach().abs().max().item(), 1.0)
    return k * eps(dtype) * scale


def logprob_tolerance(logits_scale: float, dtype: torch.dtype = torch.float32) -> float:
    """Rule 1 for log-probabilities of logits whose largest magnitude is `logits_scale`: the logit error and
    the log-sum-exp error add up, so twice the logits' tolerance."""
    return 2 * LOGITS_K * eps(dtype) * max(logits_scale, 1.0)


def _record(kind: str, what: str, value: float) -> None:
    """With DOGE_TOLERANCE_LOG=FILE, append each comparison's measured ratio to FILE (to re-measure the
    headroom on another machine: `sort -t$'\\t' -k3 -g FILE | tail`)."""
    path = os.environ.get("DOGE_TOLERANCE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{kind}\t{what}\t{value:.6g}\n")


def assert_logprobs_close(actual, expected, *, logits_scale: float, what: str) -> float:
    """Rule 1 for log-probabilities (tensors or floats) of logits whose largest magnitude is `logits_scale`.
    Returns the error in units of eps * scale."""
    err = max_abs_diff(torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64))
    tol = logprob_tolerance(logits_scale)
    units = err / (eps() * max(logits_scale, 1.0))
    _record("eps*scale (logprobs)", what, units)
    assert err <= tol, (
        f"{what}: logprobs differ by {err:.3g} > {tol:.3g} = 2 x {LOGITS_K} eps x max|logit| ({logits_scale:.3g})"
    )
    return units


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str, k: float = LOGITS_K,
                        dtype: torch.dtype = torch.float32) -> float:
    """Rule 1. Returns the error in units of eps * scale (how much of the budget was used)."""
    err = max_abs_diff(actual, expected)
    tol = logits_tolerance(expected, k, dtype)
    units = err / (tol / k)
    _record("eps*scale", what, units)
    assert err <= tol, (
        f"{what}: max |diff| {err:.3g} > {tol:.3g} = {k:g} eps * max|expected| "
        f"({units:.0f} eps * scale; rounding alone measured at most 36)"
    )
    return units


def assert_clearly_apart(actual: torch.Tensor, expected: torch.Tensor, *, what: str, factor: float = 100.0) -> float:
    """The opposite of `assert_logits_close`: a change that must show (an ablation, a known defect) moves the
    logits by more than `factor` times rule 1's tolerance, so no rounding could hide it. Returns the gap in
    units of that tolerance."""
    gap = max_abs_diff(actual, expected)
    tol = logits_tolerance(expected)
    _record("x tolerance (apart)", what, gap / tol)
    assert gap > factor * tol, f"{what}: logits moved by {gap:.3g}, not more than {factor:g} x tolerance {tol:.3g}"
    return gap / tol


def assert_within_bound(err: torch.Tensor, bound: torch.Tensor, *, what: str) -> float:
    """Elementwise `err <= bound` (rule 2); returns max(err / bound), the fraction of the bound used."""
    assert err.shape == bound.shape, (tuple(err.shape), tuple(bound.shape))
    ratio = (err.double() / bound.double().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    _record("of bound", what, ratio)
    assert (err <= bound).all(), f"{what}: error exceeds the rounding bound by {ratio:.3g}x"
    return ratio
