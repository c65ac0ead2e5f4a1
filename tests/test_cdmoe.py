"""CDMoE: fused Triton kernel, per-token routing and the vLLM layer.

(a) The Triton kernel against the torch path and an fp64 reference, run under TRITON_INTERPRET=1 on CPU
    tensors. The interpreter must be chosen before triton is imported, and other test modules (or vLLM)
    may already have imported triton in this process, so the kernel runs in a fresh subprocess; the
    subprocess proves the kernel was interpreted and executed, it does not skip.
(b) `route` + `routed_experts` against transformers' built-in DogeCDMoE fed one token at a time, and
    the difference from its batched prefill (which pairs router halves of different tokens).
(c) Batch invariance: a token's output does not depend on the other tokens of the batch.
(d) The vLLM layer `vllm_doge.cdmoe.DogeCDMoE` (world size 1, gloo), loaded from a transformers
    module's state dict, against transformers per token; refusal of non-silu activations.

Tolerances (tests/tolerances.py): the routed sum is held to a worst-case rounding bound computed from its
operands (`routed_error_bound`: reduction lengths, sums of absolute products, the roundings each path
does); whole layers compared with another implementation to rule 1 (LOGITS_K eps x the output's scale).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tolerances import (assert_clearly_apart, assert_logits_close, assert_within_bound, dot_error_bound, gamma,
                        unit_roundoff)
from doge_format import describe
from vllm_doge.cdmoe import route, routed_experts, routed_experts_torch

REPO = Path(__file__).resolve().parents[1]

# |silu'(x)| <= 1.0998: how an error in a score carries over.
ACT_SLOPE = 1.2
# Roundings of silu(x) itself in fp32 (exp: <= 1 ulp, 1 + e, division, product): 8 u is ample.
ACT_ROUNDINGS = 8


def routed_error_bound(h, w, ids, down, up, *, path: str):
    """(exact, bound): the fp64 value of out[t] = sum_i w[t,i] silu(down[ids[t,i]] . h[t]) up[ids[t,i]], and
    elementwise the worst-case error of computing it from the same (rounded) inputs by `path`:

    - "kernel" (cdmoe_triton): every input read as fp32 (exact), fp32 accumulation, one conversion of the
      result to h.dtype, faithful but not necessarily to nearest (Triton's interpreter truncates fp32 to
      bf16), so up to eps(h.dtype) relative rather than eps / 2;
    - "torch" (routed_experts_torch): products and scores rounded to h.dtype, the scores summed in fp32,
      silu and weighting in fp32, coefficients rounded to h.dtype, and the up half (embedding_bag) taken
      to round and accumulate in h.dtype (the worst case).

    Each stage's error follows Higham's gamma_n bound for a sum of n products (tolerances.gamma) times the
    sum of absolute products, carried through silu by ACT_SLOPE. Valid for any summation order or blocking.
    """
    dtype = h.dtype
    u, us = unit_roundoff(torch.float32), unit_roundoff(dtype)  # u = eps / 2
    hidden, k = h.shape[1], ids.shape[1]
    ids = ids.long()
    rows_down, rows_up = down.double()[ids], up.double()[ids]  # [T, k, hidden]
    hd, wd = h.double(), w.double()
    scores = torch.einsum("tkd,td->tk", rows_down, hd)
    abs_scores = torch.einsum("tkd,td->tk", rows_down.abs(), hd.abs())
    activated = F.silu(scores)
    coef = wd * activated
    exact = torch.einsum("tk,tkd->td", coef, rows_up)
    abs_terms = torch.einsum("tk,tkd->td", coef.abs(), rows_up.abs())
    if path == "kernel":
        score_err = dot_error_bound(abs_scores, hidden + 1)  # fp32 products (exact for 16-bit inputs) and sums
        coef_err = wd.abs() * (ACT_SLOPE * score_err + ACT_ROUNDINGS * u * activated.abs()) + 2 * u * coef.abs()
        acc_err = torch.einsum("tk,tkd->td", coef_err, rows_up.abs()) + gamma(k + 1) * abs_terms
        final = 0.0 if dtype == torch.float32 else 2 * us
        return exact, acc_err + final * (exact.abs() + acc_err)
    assert path == "torch", path
    score_err = (2 * us + gamma(hidden)) * abs_scores
    coef_err = wd.abs() * (ACT_SLOPE * score_err + ACT_ROUNDINGS * u * activated.abs()) + (u + us) * coef.abs()
    return exact, torch.einsum("tk,tkd->td", coef_err, rows_up.abs()) + gamma(k + 2, dtype) * abs_terms


# --------------------------------------------------------------------------------------------------
# (a) Triton kernel under the interpreter, in a subprocess
# --------------------------------------------------------------------------------------------------

_KERNEL_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" not in sys.modules
    import torch
    import triton
    from vllm_doge.kernels import cdmoe_triton as kt
    from vllm_doge.cdmoe import routed_experts, routed_experts_torch
    from test_cdmoe import routed_error_bound

    def worst(err, bound):  # max(err / bound): <= 1 where the error is within the bound
        return (err.double() / bound.clamp_min(1e-300)).max().item()

    # With the interpreter, @triton.jit yields an InterpretedFunction; a compiled JITFunction would
    # need a GPU driver and fail, never skip.
    kernel_type = type(kt._cdmoe_routed_kernel).__name__
    calls = {"n": 0}
    real_run = kt._cdmoe_routed_kernel.run
    def counting_run(*args, **kwargs):
        calls["n"] += 1
        return real_run(*args, **kwargs)
    kt._cdmoe_routed_kernel.run = counting_run

    cases = [
        # T, hidden, E, k, dtype, extra launch kwargs, id dtype, strided h
        (1, 64, 16, 4, "float32", {}, "int64", False),
        (3, 48, 25, 3, "float32", {}, "int32", False),
        (7, 100, 64, 5, "float32", {"block_h": 32, "splits": 2}, "int64", True),
        (2, 256, 1024, 16, "float32", {}, "int64", False),
        (5, 40, 36, 6, "bfloat16", {}, "int64", False),
        (4, 256, 1024, 16, "bfloat16", {"block_h": 64, "splits": 3}, "int64", True),
        (3, 64, 49, 7, "float16", {}, "int64", False),
    ]
    results = []
    gen = torch.Generator().manual_seed(1234)
    for T, H, E, k, dt_name, launch, id_dt, strided in cases:
        dt = getattr(torch, dt_name)
        base = torch.randn(T, 2 * H if strided else H, generator=gen)
        h = (base[:, ::2] if strided else base).to(dt)
        down = (torch.randn(E, H, generator=gen) * (2.0 / H**0.5)).to(dt)
        up = torch.randn(E, H, generator=gen).to(dt)
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(getattr(torch, id_dt))
        w = torch.softmax(torch.randn(T, k, generator=gen) * 2, dim=-1)
        n0 = calls["n"]
        out = kt.cdmoe_routed_triton(h, w, ids, down, up, **launch)
        via_op = routed_experts(h, w, ids.long(), down, up, use_triton=True)
        ran = calls["n"] - n0
        exact64, bound_kernel = routed_error_bound(h, w, ids, down, up, path="kernel")
        _, bound_torch = routed_error_bound(h, w, ids, down, up, path="torch")
        torch_path = routed_experts_torch(h, w, ids.long(), down, up)
        # A kernel bug the bound must not hide: the least-weighted expert's id off by one.
        wrong = ids.long().clone()
        wrong[:, -1] = (wrong[:, -1] + 1) % E
        wrong64, _ = routed_error_bound(h, w, wrong, down, up, path="kernel")
        results.append({
            "case": [T, H, E, k, dt_name, launch, id_dt, strided],
            "kernel_runs": ran,
            "out_dtype": str(out.dtype),
            "out_shape": list(out.shape),
            "scale": exact64.abs().max().item(),
            "kernel_vs_fp64": worst((out.double() - exact64).abs(), bound_kernel),
            "torch_vs_fp64": worst((torch_path.double() - exact64).abs(), bound_torch),
            "kernel_vs_torch": worst((out.double() - torch_path.double()).abs(), bound_kernel + bound_torch),
            "op_equals_direct": torch.equal(via_op, out),
            "op_vs_direct": worst((via_op.double() - out.double()).abs(), 2 * bound_kernel),
            "wrong_id_vs_bound": worst((wrong64 - exact64).abs(), bound_kernel),
        })
    # The kernel sits behind an opaque custom op, so torch.compile traces it as one node.
    compiled = torch.compile(
        lambda *a: routed_experts(*a, use_triton=True), backend="eager", fullgraph=True, dynamic=True
    )
    n0 = calls["n"]
    compile_errs = []
    for T in (2, 5):
        h = torch.randn(T, 32, generator=gen)
        down, up = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
        ids = torch.randint(0, 16, (T, 3), generator=gen)
        w = torch.softmax(torch.randn(T, 3, generator=gen), dim=-1)
        compile_errs.append(
            (compiled(h, w, ids, down, up) - kt.cdmoe_routed_triton(h, w, ids, down, up)).abs().max().item()
        )
    compiled_runs = calls["n"] - n0
    print("RESULT" + json.dumps({
        "kernel_type": kernel_type, "results": results,
        "compiled_errs": compile_errs, "compiled_runs": compiled_runs,
    }))
    """
)


@pytest.fixture(scope="module")
def kernel_results():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the fused CDMoE kernel cannot be checked")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _KERNEL_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"kernel subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, f"no result from kernel subprocess:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(line[-1][len("RESULT") :])


def test_triton_kernel_is_interpreted_and_runs(kernel_results):
    assert kernel_results["kernel_type"] == "InterpretedFunction"
    assert len(kernel_results["results"]) == 7
    for r in kernel_results["results"]:
        # one launch from the wrapper, one through the custom op used by routed_experts(use_triton=True)
        assert r["kernel_runs"] == 2, r
        assert r["scale"] > 0.1, r  # non-trivial outputs
        T, H = r["case"][0], r["case"][1]
        assert r["out_shape"] == [T, H]
        assert r["out_dtype"] == f"torch.{r['case'][4]}"


def test_triton_kernel_under_torch_compile(kernel_results):
    assert kernel_results["compiled_runs"] == 4  # 2 calls compiled + 2 direct
    assert kernel_results["compiled_errs"] == [0.0, 0.0]


def test_triton_kernel_matches_torch_path(kernel_results):
    """Elementwise, as fractions of the rounding bounds of `routed_error_bound` (<= 1: within the bound):
    the kernel and the torch path against fp64, and against each other (within the sum of both bounds).

    Measured: fp32 0.002..0.01 of the bound; fp16 0.42, bf16 0.91..0.96. In 16 bits the bound is the
    final conversion's worst case, eps(dtype) relative (the interpreter truncates), and the kernel reaches
    it; it cannot exceed it, since truncation is off by less than one unit in the last place."""
    for r in kernel_results["results"]:
        assert r["kernel_vs_fp64"] <= 1.0, r
        assert r["torch_vs_fp64"] <= 1.0, r
        assert r["kernel_vs_torch"] <= 1.0, r
        if not r["case"][5]:  # same launch configuration: bit-identical through the custom op
            assert r["op_equals_direct"], r
        else:  # another BLOCK_H / split sums in another order: each within the kernel's bound
            assert r["op_vs_direct"] <= 1.0, r


def test_triton_kernel_bound_catches_a_wrong_expert(kernel_results):
    """The bound is tight enough for a real defect: one expert id off by one (the least-weighted expert)
    moves the exact result far past the kernel's bound, in every case and dtype."""
    for r in kernel_results["results"]:
        assert r["wrong_id_vs_bound"] > 10.0, r


# --------------------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------------------


def _route_full_grid(logits: torch.Tensor, num_keys: int, top_k: int):
    """Literal K x K search (as in the paper / transformers, per token), for checking `route`."""
    x, y = logits[:, :num_keys].double(), logits[:, num_keys:].double()
    sx, ix = x.topk(num_keys, dim=-1)
    sy, iy = y.topk(num_keys, dim=-1)
    scores = (sx[:, :, None] + sy[:, None, :]).reshape(len(logits), -1)
    ids = (ix[:, :, None] * num_keys + iy[:, None, :]).reshape(len(logits), -1)
    top, pos = scores.topk(top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids.gather(-1, pos)


@pytest.mark.parametrize("num_keys,top_k", [(4, 1), (4, 4), (4, 6), (4, 16), (8, 3), (32, 16), (5, 7)])
def test_route_matches_full_grid_search(num_keys, top_k):
    gen = torch.Generator().manual_seed(num_keys * 100 + top_k)
    logits = torch.randn(37, 2 * num_keys, generator=gen) * 3
    w, ids = route(logits, num_keys, top_k, norm_topk_prob=True)
    w_ref, ids_ref = _route_full_grid(logits, num_keys, top_k)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert w.shape == ids.shape == (37, top_k)
    assert torch.equal(ids, ids_ref)
    # fp32 softmax of fp32 sums x_a + y_b, against fp64: each score is rounded once (u |s|), shifting by the
    # row maximum rounds again (u |s - m|, |s - m| <= 2 max|s|), so exp's argument is off by <= 4 u max|s|
    # (relative error of exp(s - m)); the row sum, the division and the renormalisation add gamma_{2k+8}.
    # A weight's relative error is at most twice the argument error (numerator and denominator) plus those.
    biggest = logits.double().abs().amax(dim=-1, keepdim=True) * 2  # |x_a + y_b| <= 2 max|logit|
    bound = w_ref * (8 * unit_roundoff() * biggest + gamma(2 * top_k + 8))
    assert_within_bound((w.double() - w_ref).abs(), bound, what=f"route weights, K={num_keys}, top_k={top_k}")
    assert ids.min() >= 0 and ids.max() < num_keys * num_keys
    # each token's ids are distinct experts
    assert all(len(set(row.tolist())) == top_k for row in ids)


def test_route_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2\\*num_keys"):
        route(torch.randn(2, 7), 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(2, 8), 4, 17)


def test_route_and_routed_experts_trace_without_graph_breaks():
    """vLLM runs the layer under torch.compile: the torch path must trace as one graph, dynamic T."""

    def f(h, logits, down, up):
        w, ids = route(logits, 8, 5, True)
        return routed_experts(h, w, ids, down, up)

    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(64, 24, generator=gen), torch.randn(64, 24, generator=gen)
    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    for T in (1, 3, 9):
        h, logits = torch.randn(T, 24, generator=gen), torch.randn(T, 16, generator=gen)
        torch.testing.assert_close(compiled(h, logits, down, up), f(h, logits, down, up), atol=0, rtol=0)


def test_routed_experts_torch_path_matches_gather_bmm():
    gen = torch.Generator().manual_seed(5)
    T, H, E, k = 11, 32, 49, 6
    h = torch.randn(T, H, generator=gen)
    down, up = torch.randn(E, H, generator=gen) / 4, torch.randn(E, H, generator=gen)
    w, ids = route(torch.randn(T, 14, generator=gen), 7, k)
    ref = torch.einsum("tk,tkd->td", F.silu(torch.einsum("tkd,td->tk", down[ids], h)) * w, up[ids])
    exact, bound = routed_error_bound(h, w, ids, down, up, path="torch")
    assert_within_bound((routed_experts(h, w, ids, down, up).double() - exact).abs(), bound, what="torch path vs fp64")
    # gather + bmm (einsum) sums in another order; it too is within the fp32 bound of the exact value
    assert_within_bound((ref.double() - exact).abs(), bound, what="einsum reference vs fp64")


def test_routed_experts_eager_token_blocks(monkeypatch):
    """Eager mode processes long inputs in token blocks; the result must not change."""
    import vllm_doge.cdmoe as cdmoe

    gen = torch.Generator().manual_seed(9)
    T, H, E, k = 23, 16, 36, 5
    h = torch.randn(T, H, generator=gen)
    down, up = torch.randn(E, H, generator=gen) / 3, torch.randn(E, H, generator=gen)
    w, ids = route(torch.randn(T, 12, generator=gen), 6, k)
    whole = routed_experts_torch(h, w, ids, down, up)
    monkeypatch.setattr(cdmoe, "_EAGER_CHUNK_BYTES", 4 * k * H * 4)  # blocks of 4 tokens, ragged tail
    blocks = routed_experts_torch(h, w, ids, down, up)
    exact, bound = routed_error_bound(h, w, ids, down, up, path="torch")
    # Each token is computed alone in either case; only the vectorisation of a block's shape may differ.
    assert_within_bound((blocks.double() - exact).abs(), bound, what="token blocks vs fp64")
    assert_within_bound((blocks - whole).abs(), 2 * bound, what="token blocks vs one block")


# --------------------------------------------------------------------------------------------------
# (b), (c): against transformers' built-in DogeCDMoE
# --------------------------------------------------------------------------------------------------


def _hf_config(**overrides):
    import transformers

    kwargs = dict(
        hidden_size=32,
        intermediate_size=48,
        num_experts=64,
        num_experts_per_tok=6,
        norm_topk_prob=True,
        is_moe=True,
        hidden_act="silu",
        mlp_bias=False,
    )
    kwargs.update(overrides)
    return transformers.DogeConfig(**kwargs)


def _hf_cdmoe(config, seed=0):
    from transformers.models.doge.modeling_doge import DogeCDMoE as HFDogeCDMoE

    torch.manual_seed(seed)
    module = HFDogeCDMoE(config).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if "router_gate" in name else 0.25
            p.copy_(torch.randn(p.shape) * std)
    return module


def _ours_from_hf(hf, h: torch.Tensor) -> torch.Tensor:
    """Shared SwiGLU + per-token routing + routed sum, with the pure functions and hf's weights."""
    with torch.no_grad():
        shared = hf.down_proj(F.silu(hf.gate_proj(h)) * hf.up_proj(h))
        w, ids = route(hf.router_gate(h), hf.num_keys, hf.top_k, hf.norm_topk_prob)
        return shared + routed_experts(h, w, ids, hf.down_embed.weight, hf.up_embed.weight)


def _hf_one_token_at_a_time(hf, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([hf(h[i].view(1, 1, -1))[0].view(1, -1) for i in range(len(h))])


@pytest.mark.parametrize("norm_topk_prob,mlp_bias", [(True, False), (False, True)])
def test_matches_transformers_per_token(norm_topk_prob, mlp_bias):
    hf = _hf_cdmoe(_hf_config(norm_topk_prob=norm_topk_prob, mlp_bias=mlp_bias))
    h = torch.randn(9, 32, generator=torch.Generator().manual_seed(7))
    ours = _ours_from_hf(hf, h)
    ref = _hf_one_token_at_a_time(hf, h)
    # the routed part is not negligible in this test: dropping it would fail the comparison below
    assert_clearly_apart(_ours_shared_only(hf, h), ref, what="the layer without its routed experts")
    assert_logits_close(ours, ref, what=f"layer vs transformers per token (norm_topk_prob={norm_topk_prob})")


def _ours_shared_only(hf, h):
    with torch.no_grad():
        return hf.down_proj(F.silu(hf.gate_proj(h)) * hf.up_proj(h))


def test_transformers_batched_prefill_differs():
    """transformers' `.view(2, bsz*seq_len, -1)` pairs halves of different tokens; we do not."""
    hf = _hf_cdmoe(_hf_config())
    h = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        hf_batched = hf(h)[0].reshape(12, 32)
    flat = h.reshape(12, 32)
    ours = _ours_from_hf(hf, flat)
    per_token = _hf_one_token_at_a_time(hf, flat)
    assert_logits_close(ours, per_token, what="layer vs transformers per token")
    assert_clearly_apart(hf_batched, ours, what="transformers' batched prefill")
    # and a single token through transformers' batched path is fine
    with torch.no_grad():
        single = hf(flat[:1].view(1, 1, 32))[0].view(1, 32)
    assert_logits_close(single, ours[:1], what="one token through transformers' batched path")


def test_batch_invariance():
    hf = _hf_cdmoe(_hf_config(num_experts=100, num_experts_per_tok=8), seed=3)
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(16, 32, generator=gen)
    full = _ours_from_hf(hf, h)
    down, up = hf.down_embed.weight.detach(), hf.up_embed.weight.detach()
    with torch.no_grad():
        logits_full = hf.router_gate(h)
    w_full, ids_full = route(logits_full, hf.num_keys, hf.top_k, True)
    routed_full = routed_experts(h, w_full, ids_full, down, up)
    for start, stop in [(0, 1), (5, 6), (3, 9), (15, 16)]:
        # given the same logits, routing is bit-identical whatever the batch; the routed sum too, up
        # to the last bit of CPU elementwise kernels (vectorised body vs scalar tail of silu)
        w, ids = route(logits_full[start:stop], hf.num_keys, hf.top_k, True)
        assert torch.equal(ids, ids_full[start:stop]) and torch.equal(w, w_full[start:stop])
        routed_part = routed_experts(h[start:stop], w, ids, down, up)
        _, bound = routed_error_bound(h[start:stop], w, ids, down, up, path="torch")
        assert_within_bound((routed_part - routed_full[start:stop]).abs(), 2 * bound, what=f"routed rows {start}:{stop}")
        # the whole layer: only the dense GEMMs' rounding may depend on the number of rows
        part = _ours_from_hf(hf, h[start:stop])
        assert_logits_close(part, full[start:stop], what=f"layer rows {start}:{stop} vs the whole batch")
        with torch.no_grad():
            _, ids = route(hf.router_gate(h[start:stop]), hf.num_keys, hf.top_k, True)
        assert torch.equal(ids, ids_full[start:stop])
    # the same tokens surrounded by other tokens, in another order
    perm = torch.randperm(16, generator=gen)
    assert_logits_close(_ours_from_hf(hf, h[perm]), full[perm], what="layer on permuted rows")
    # transformers' batched path is not batch invariant
    with torch.no_grad():
        a = hf(h[:4].view(1, 4, 32))[0].view(4, 32)
        b = hf(h[:8].view(1, 8, 32))[0].view(8, 32)[:4]
    assert_clearly_apart(a, b, what="transformers' batched path, 4 vs 8 rows")


# --------------------------------------------------------------------------------------------------
# (d) the vLLM layer
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    config = VllmConfig()
    owned = False
    with set_current_vllm_config(config):
        if not ps.model_parallel_is_initialized():
            ps.init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                backend="gloo",
            )
            ps.initialize_model_parallel(1, 1)
            owned = True
    yield config
    if owned:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


def _build_vllm_layer(vllm_env, hf_config, hf_module):
    from vllm.config import set_current_vllm_config

    from vllm_doge.cdmoe import DogeCDMoE

    with set_current_vllm_config(vllm_env):
        from torch import nn
        from vllm.model_executor.models.utils import AutoWeightsLoader

        from vllm_doge.model import DogeModel

        layer = DogeCDMoE(describe(hf_config.to_dict()), prefix="model.layers.0.mlp")
        # The model's own stacked loading (gate/up -> gate_up_proj), on a holder named like the layer.
        holder = nn.Module()
        holder.mlp = layer
        weights = ((f"mlp.{name}", tensor) for name, tensor in hf_module.state_dict().items())
        loaded = AutoWeightsLoader(holder).load_weights(weights, mapper=DogeModel.hf_to_vllm_mapper)
        loaded = {name.removeprefix("mlp.") for name in loaded}
        # what vLLM's loader does after loading (selects the CPU GEMM implementation)
        for module in layer.modules():
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)
    return layer, loaded


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_vllm_layer_matches_transformers_per_token(vllm_env, mlp_bias):
    from vllm.config import set_current_vllm_config

    cfg = _hf_config(mlp_bias=mlp_bias)
    hf = _hf_cdmoe(cfg, seed=21)
    layer, loaded = _build_vllm_layer(vllm_env, cfg, hf)
    expected = {"gate_up_proj.weight", "down_proj.weight", "router_gate.weight", "down_embed.weight", "up_embed.weight"}
    if mlp_bias:
        expected |= {"gate_up_proj.bias", "down_proj.bias"}
    assert loaded == expected
    assert set(dict(layer.named_parameters())) == expected
    assert tuple(layer.down_embed.weight.shape) == (64, 32)
    # (the CPU GEMM dispatch may have repacked the linear weights; check the declared sizes)
    assert (layer.router_gate.input_size, layer.router_gate.output_size) == (32, 2 * math.isqrt(64))

    h = torch.randn(10, 32, generator=torch.Generator().manual_seed(17))
    with set_current_vllm_config(vllm_env), torch.no_grad():
        out = layer(h)
        out_one = layer(h[4:5])
    ref = _hf_one_token_at_a_time(hf, h)
    assert out.shape == (10, 32)
    assert_logits_close(out, ref, what=f"vLLM layer vs transformers per token (mlp_bias={mlp_bias})")
    assert_logits_close(out_one, out[4:5], what="vLLM layer, one token vs in a batch")


def test_vllm_layer_refuses_non_silu(vllm_env):
    from vllm.config import set_current_vllm_config

    from vllm_doge.cdmoe import DogeCDMoE

    with set_current_vllm_config(vllm_env), pytest.raises(ValueError, match="silu"):
        DogeCDMoE(describe(_hf_config(hidden_act="gelu").to_dict()))


def test_vllm_layer_traces_as_one_graph(vllm_env):
    """vLLM compiles the model with dynamic token counts: the layer must trace without graph breaks."""
    from vllm.config import set_current_vllm_config

    cfg = _hf_config()
    layer, _ = _build_vllm_layer(vllm_env, cfg, _hf_cdmoe(cfg, seed=5))
    gen = torch.Generator().manual_seed(29)
    with set_current_vllm_config(vllm_env), torch.no_grad():
        compiled = torch.compile(layer.forward, backend="eager", fullgraph=True, dynamic=True)
        for T in (1, 6, 11):
            h = torch.randn(T, 32, generator=gen)
            assert_logits_close(compiled(h), layer(h), what=f"vLLM layer compiled vs eager, {T} tokens")
