"""Cost of Doge's per-key attention bias on vLLM's CPU attention kernel, and of keeping it outside the head.

Doge adds a per-key bias b_j (one per kv head) to the attention scores. The plugin folds it into the
paged KV cache (design §3): k' = [k, b, 0…], q' = [q, 1/scale, 0…], v' = [v, 0…], padded to a head size
the CPU kernel supports, so head_dim d = 128 runs at P = 160. This script times, at the Doge-20M attention
shape (2 query heads, 1 kv head, d = 128), decode (16 sequences, one query token each, contexts 128, 512,
2048) and prefill (one causal 512-token chunk), in bf16 and fp32:

  fold P=160      vLLM's `cpu_attention_with_kv_cache` on the folded cache (what the plugin runs)
  stock P=128     the same kernel at the unpadded head, no bias (the lower limit: Qwen3-like)
  flex            torch.compile'd FlexAttention over contiguous K/V of head 128, a `score_mod` adding
                  bias[b, kv head, kv_idx] (causal `block_mask` for prefill)
  sdpa+mask       `scaled_dot_product_attention` with the bias as an additive float mask (plus -inf
                  above the diagonal for prefill; the mask is built inside the timed call)
  flex+gather     flex after gathering K, V and b from a paged, row-major cache by block table
  sdpa+gather     the same for sdpa+mask

Every output is compared with a float64 reference built from the same rounded q, k, v, b (stock P=128
with the bias-free reference). Timings alternate the variants round by round (rotating their order);
each round takes the median of a few calls per variant, and the report gives medians over rounds of
per-round ratios to the fold. Threads default to 1: the 2-core machine is shared, and with two OpenMP
threads a descheduled thread stalls every barrier.

    python -m benchmarks.attention_bias [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from benchmarks.throughput import DOGE_20M

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BLOCK = 128  # vLLM's CPU default block size
PADDED = {64: 80, 128: 160}  # d -> the fold's head size on the CPU backend (design §3)
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # as tests/test_keep_window.py
CASES = [("decode", 16, 128, 1), ("decode", 16, 512, 1), ("decode", 16, 2048, 1), ("prefill", 1, 512, 512)]
VARIANTS = ["fold P=160", "stock P=128", "flex", "sdpa+mask", "flex+gather", "sdpa+gather"]
PROTOTYPES = ["flex", "sdpa+mask", "flex+gather", "sdpa+gather"]


def shape() -> tuple[int, int, int]:
    heads, kv_heads = DOGE_20M["num_attention_heads"], DOGE_20M["num_key_value_heads"]
    return heads, kv_heads, DOGE_20M["hidden_size"] // heads


# --------------------------------------------------------------------------------------------- inputs


class Case:
    """One workload: `reqs` sequences of `ctx` keys each, the last `qlen` of which are queries."""

    def __init__(self, phase, reqs, ctx, qlen, dtype, gen):
        self.phase, self.reqs, self.ctx, self.qlen, self.dtype = phase, reqs, ctx, qlen, dtype
        self.heads, self.kv_heads, self.d = shape()
        self.padded = PADDED[self.d]
        self.scale = self.d**-0.5
        self.groups = self.heads // self.kv_heads
        h, kvh, d = self.heads, self.kv_heads, self.d
        # Rounded once to the run dtype: every variant and the reference see the same values.
        self.q = torch.randn(reqs, qlen, h, d, generator=gen).to(dtype)
        self.k = torch.randn(reqs, ctx, kvh, d, generator=gen).to(dtype)
        self.v = torch.randn(reqs, ctx, kvh, d, generator=gen).to(dtype)
        # Doge's bias exp(A)·softplus(dt(v)) is non-negative and of order 1; range 0..4 dominates q·k·scale.
        self.bias = (torch.rand(reqs, ctx, kvh, generator=gen) * 4).to(dtype)
        blocks_per_req = math.ceil(ctx / BLOCK)
        self.num_blocks = reqs * blocks_per_req
        # A shuffled block table, as after a while of serving.
        perm = torch.randperm(self.num_blocks, generator=gen)
        self.block_table = perm.view(reqs, blocks_per_req).to(torch.int32)
        self.seq_lens = torch.full((reqs,), ctx, dtype=torch.int32)
        self.query_start_loc = torch.arange(reqs + 1, dtype=torch.int32) * qlen

    @property
    def label(self) -> str:
        if self.phase == "decode":
            return f"decode {self.reqs}x ctx {self.ctx}"
        return f"prefill 1x{self.qlen} chunk"


# -------------------------------------------------------------------------------------- stock kernel


class StockKernel:
    """vLLM's CPU attention on a paged cache written by its own cache-write op, head size P."""

    def __init__(self, case: Case, padded: int, fold: bool):
        c, dt = case, case.dtype
        self.isa = _get_attn_isa(dt, BLOCK, padded)
        d = c.d
        q = torch.zeros(c.reqs, c.qlen, c.heads, padded, dtype=dt)
        k = torch.zeros(c.reqs, c.ctx, c.kv_heads, padded, dtype=dt)
        v = torch.zeros(c.reqs, c.ctx, c.kv_heads, padded, dtype=dt)
        q[..., :d], k[..., :d], v[..., :d] = c.q, c.k, c.v
        if fold:
            q[..., d] = 1.0 / c.scale
            k[..., d] = c.bias
        cache = torch.zeros(c.num_blocks, c.kv_heads, 2 * BLOCK, padded, dtype=dt)
        self.key_cache, self.value_cache = cache.chunk(2, dim=2)
        pos = torch.arange(c.ctx)
        slots = torch.cat([c.block_table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK for r in range(c.reqs)])
        ops.cpu_attn_reshape_and_cache(
            k.flatten(0, 1), v.flatten(0, 1), self.key_cache, self.value_cache, slots, self.isa
        )
        self.query = q.flatten(0, 1).contiguous()
        self.out = torch.empty_like(self.query)
        self.case, self.padded = c, padded
        self.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=c.reqs,
            num_heads=c.heads,
            num_kv_heads=c.kv_heads,
            head_dim=padded,
            seq_lens=c.seq_lens,
            dtype=dt,
            query_start_loc=c.query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=bool(int(os.environ.get("VLLM_CPU_ATTN_SPLIT_KV", "1"))),  # vLLM's default: on
        )

    def __call__(self) -> torch.Tensor:
        c = self.case
        ops.cpu_attention_with_kv_cache(
            query=self.query,
            key_cache=self.key_cache,
            value_cache=self.value_cache,
            output=self.out,
            query_start_loc=c.query_start_loc,
            seq_lens=c.seq_lens,
            scale=c.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=c.block_table,
            softcap=0.0,
            scheduler_metadata=self.scheduler_metadata,
            s_aux=None,
        )
        return self.out

    def result(self) -> torch.Tensor:
        """[reqs, qlen, heads, d]"""
        c = self.case
        return self.out.view(c.reqs, c.qlen, c.heads, self.padded)[..., : c.d]


# ------------------------------------------------------------------------------------------ prototypes


def _flex_biased(q, k, v, bias, block_mask, scale: float, groups: int):
    """q [B,H,Lq,d], k/v [B,KV,L,d], bias [B,KV,L] -> [B,H,Lq,d]."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h // groups, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=groups > 1)


FLEX = torch.compile(_flex_biased, dynamic=False, fullgraph=True)


def _sdpa_biased(q, k, v, bias, causal: torch.Tensor | None, scale: float, groups: int):
    """Additive float mask [B, KV or H, Lq, L] of the bias (+ -inf above the diagonal)."""
    mask = bias.repeat_interleave(groups, 1)[:, :, None, :] if groups > 1 and bias.shape[1] > 1 else bias[:, :, None, :]
    if causal is not None:
        mask = mask + causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)


class Prototype:
    """Bias outside the head: K/V of head d, b in its own tensor. `gather`: K, V, b live in a paged,
    row-major cache ([blocks, kv heads, block, d] and [blocks, kv heads, block]) and are gathered by block
    table into contiguous [B, KV, L, …] at every call (the simplest paged read a PyTorch path could do)."""

    def __init__(self, case: Case, kind: str, gather: bool):
        c = self.case = case
        self.kind, self.gather = kind, gather
        self.q = c.q.transpose(1, 2).contiguous()  # [B, H, Lq, d]
        self.k = c.k.transpose(1, 2).contiguous()  # [B, KV, L, d]
        self.v = c.v.transpose(1, 2).contiguous()
        self.bias = c.bias.transpose(1, 2).contiguous()  # [B, KV, L]
        if gather:
            nb, kvh, d = c.num_blocks, c.kv_heads, c.d
            self.k_pages = torch.empty(nb, kvh, BLOCK, d, dtype=c.dtype)
            self.v_pages = torch.empty(nb, kvh, BLOCK, d, dtype=c.dtype)
            self.b_pages = torch.zeros(nb, kvh, BLOCK, dtype=c.dtype)
            per = c.block_table.shape[1]
            for r in range(c.reqs):
                for i in range(per):
                    blk, span = int(c.block_table[r, i]), slice(i * BLOCK, min((i + 1) * BLOCK, c.ctx))
                    n = span.stop - span.start
                    self.k_pages[blk, :, :n] = self.k[r, :, span]
                    self.v_pages[blk, :, :n] = self.v[r, :, span]
                    self.b_pages[blk, :, :n] = self.bias[r, :, span]
            self.table = c.block_table.long()
        self.block_mask = None
        self.causal = None
        if c.qlen > 1:  # prefill: the chunk's queries are the last qlen positions
            off = c.ctx - c.qlen

            def causal(b, h, q_idx, kv_idx):
                return q_idx + off >= kv_idx

            if kind == "flex":
                self.block_mask = create_block_mask(causal, None, None, c.qlen, c.ctx, device="cpu")
            qi = torch.arange(c.qlen)[:, None] + off
            self.causal = torch.zeros(c.qlen, c.ctx, dtype=c.dtype).masked_fill(qi < torch.arange(c.ctx), -math.inf)

    def _kvb(self):
        if not self.gather:
            return self.k, self.v, self.bias
        c = self.case
        nblk = self.table.shape[1]

        def pick(pages):  # [nb, KV, BLOCK, …] -> [B, KV, L, …]
            g = pages[self.table]  # [B, nblk, KV, BLOCK, …]
            g = g.transpose(1, 2).reshape(c.reqs, c.kv_heads, nblk * BLOCK, *pages.shape[3:])
            return g[:, :, : c.ctx].contiguous()

        return pick(self.k_pages), pick(self.v_pages), pick(self.b_pages)

    def __call__(self) -> torch.Tensor:
        c = self.case
        k, v, b = self._kvb()
        if self.kind == "flex":
            self.out = FLEX(self.q, k, v, b, self.block_mask, c.scale, c.groups)
        else:
            self.out = _sdpa_biased(self.q, k, v, b, self.causal, c.scale, c.groups)
        return self.out

    def result(self) -> torch.Tensor:
        return self.out.transpose(1, 2)  # [B, Lq, H, d]


# ------------------------------------------------------------------------------------------- checking


def reference(case: Case, with_bias: bool) -> torch.Tensor:
    """float64 attention of the rounded inputs -> [reqs, qlen, heads, d]."""
    c = case
    q = c.q.double().transpose(1, 2)  # [B, H, Lq, d]
    k = c.k.double().transpose(1, 2).repeat_interleave(c.groups, 1)  # [B, H, L, d]
    v = c.v.double().transpose(1, 2).repeat_interleave(c.groups, 1)
    s = q @ k.transpose(-1, -2) * c.scale
    if with_bias:
        s = s + c.bias.double().transpose(1, 2).repeat_interleave(c.groups, 1)[:, :, None, :]
    qi = torch.arange(c.qlen)[:, None] + (c.ctx - c.qlen)
    s = s.masked_fill(qi < torch.arange(c.ctx), -math.inf)
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


# --------------------------------------------------------------------------------------------- timing


def _one(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_case(fns: dict, rounds: int, budget_s: float = 0.02) -> dict[str, list[float]]:
    """Per variant, one value per round (median of `calls` calls), variants in rotating order."""
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
        fn()
    calls = {n: max(3, min(200, int(budget_s / max(min(_one(fns[n]) for _ in range(3)), 1e-6)))) for n in names}
    per_round = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            per_round[n].append(statistics.median(_one(fns[n]) for _ in range(calls[n])))
    return per_round


def summarize(per_round: dict[str, list[float]], base: str, floor: str) -> dict[str, dict]:
    out = {}
    for n, ts in per_round.items():
        vs_base = [t / b for t, b in zip(ts, per_round[base], strict=True)]
        vs_floor = [t / b for t, b in zip(ts, per_round[floor], strict=True)]
        out[n] = {
            "median_us": statistics.median(ts) * 1e6,
            "ratio_vs_fold": statistics.median(vs_base),
            "ratio_vs_fold_iqr": _iqr(vs_base),
            "ratio_vs_p128": statistics.median(vs_floor),
        }
    return out


def _iqr(xs):
    qs = statistics.quantiles(xs, n=4)
    return [qs[0], qs[2]]


# ----------------------------------------------------------------------------------------------- main


def run(threads: int, rounds: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    torch._dynamo.config.cache_size_limit = 64
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # bf16 uses the kernel's AMX path: the process needs the tile permission
    heads, kv_heads, d = shape()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    compile_s = 0.0
    for dtype, (phase, reqs, ctx, qlen) in itertools.product((torch.bfloat16, torch.float32), CASES):
        case = Case(phase, reqs, ctx, qlen, dtype, gen)
        fns = {
            "fold P=160": StockKernel(case, case.padded, fold=True),
            "stock P=128": StockKernel(case, d, fold=False),
            "flex": Prototype(case, "flex", gather=False),
            "sdpa+mask": Prototype(case, "sdpa", gather=False),
            "flex+gather": Prototype(case, "flex", gather=True),
            "sdpa+gather": Prototype(case, "sdpa", gather=True),
        }
        t = time.perf_counter()
        fns["flex"]()  # compiles (the +gather variant's inputs have the same shapes and strides)
        fns["flex+gather"]()
        compile_s += time.perf_counter() - t
        ref_b, ref_nob = reference(case, True), reference(case, False)
        errors = {}
        for n, fn in fns.items():
            fn()
            ref = ref_nob if n == "stock P=128" else ref_b
            errors[n] = (fn.result().double() - ref).abs().max().item()
        # The check is sensitive: leaving the bias out moves the output far beyond the tolerance.
        unbiased_gap = (ref_nob - ref_b).abs().max().item()
        per_round = time_case(fns, rounds)
        stats = summarize(per_round, "fold P=160", "stock P=128")
        for n in fns:
            stats[n]["max_abs_err_vs_fp64"] = errors[n]
            stats[n]["within_tol"] = errors[n] <= ATOL[dtype]
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "phase": phase,
            "case": case.label,
            "isa": {"fold P=160": fns["fold P=160"].isa, "stock P=128": fns["stock P=128"].isa},
            "tolerance": ATOL[dtype],
            "no_bias_gap": unbiased_gap,
            "variants": stats,
        }
        rows.append(row)
        print(f"{row['dtype']:8s} {case.label:22s} " + "  ".join(f"{n}: {stats[n]['ratio_vs_fold']:.2f}" for n in fns), flush=True)
    return {
        "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": d, "padded": PADDED[d], "block_size": BLOCK},
        "threads": threads,
        "rounds": rounds,
        "seed": seed,
        "flex_compile_s_total": compile_s,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "loadavg_1m_at_end": os.getloadavg()[0],
        "rows": rows,
    }


def verdict(res: dict) -> dict:
    """Per dtype and phase: the best prototype's ratio to the fold (worst case over contexts)."""
    out = {}
    for (dt, phase), grp in itertools.groupby(res["rows"], key=lambda r: (r["dtype"], r["phase"])):
        grp = list(grp)
        best = {}
        for p in PROTOTYPES:
            if all(r["variants"][p]["within_tol"] for r in grp):
                best[p] = max(r["variants"][p]["ratio_vs_fold"] for r in grp)
        name = min(best, key=best.get) if best else None
        wins = [
            [r["case"], p, round(r["variants"][p]["ratio_vs_fold"], 3)]
            for r in grp
            for p in PROTOTYPES
            if r["variants"][p]["within_tol"] and r["variants"][p]["ratio_vs_fold"] < 0.95
        ]
        out[f"{dt} {phase}"] = {
            "cases_where_a_prototype_beats_fold": wins,
            "best_prototype": name,
            "worst_ratio_vs_fold": best.get(name),
            "p128_ratio_vs_fold": [round(r["variants"]["stock P=128"]["ratio_vs_fold"], 3) for r in grp],
            "beats_fold": name is not None and best[name] < 0.95,
        }
    return out


INTEGRATION = """\
What adopting a bias-outside-the-head path would take in vLLM 0.32 (CPU):
- Paged reads. FlexAttention and SDPA read contiguous [B, KV, L, d] K/V. vLLM's CPU cache is paged and its
  in-block layout is ISA-specific (`vec`/`vec16`: K transposed [P, block]; `amx`: K packed in 4-byte groups
  of 16 tokens, V packed along tokens), so either every step gathers each request's context into contiguous
  tensors (the `+gather` rows measure this from the easiest, row-major page layout: O(context) copies per
  layer per step), or a new cache layout is needed that flex can index directly: torch's experimental
  `torch.nn.attention.experimental._paged_attention.PagedAttention` rewrites a block mask to physical pages
  (page size a multiple of flex's 128-token block), but only over one flat [1, KV, slots, d] tensor.
- A custom attention backend, not a patch: its own `get_kv_cache_shape`, metadata builder (block tables,
  seq lens, per-step `BlockMask` for ragged batches: a `mask_mod` over seq_lens/query_start_loc rebuilt
  every step), and an impl; the stock `CPUAttentionBackendImpl` has no per-key bias input.
- Storage for b: vLLM allocates K and V pages only (`AttentionSpec.page_size_bytes` = 2·block·kv·P·dtype);
  b needs a per-slot side tensor or a custom KV spec with extra page bytes, written at each step and kept
  in step with prefix caching, preemption and the keep-window relocation (design §3b), which today edits
  the bias channel in place through the backend's own cache layout.
- Compilation: vLLM compiles the model once with dynamo (fullgraph, guards dropped); attention is an opaque
  custom op, so flex must be compiled inside it, with dynamic token counts and context lengths (each
  static shape took ~{compile:.0f} s to compile in this run, more with a cold inductor cache; dynamic shapes or padding to buckets otherwise).
"""


def write(res: dict, path_json: Path, path_md: Path) -> str:
    hdr = "| dtype | case | " + " | ".join(VARIANTS) + " |"
    lines = [
        f"Doge-20M attention shape: {res['shape']['heads']} heads, {res['shape']['kv_heads']} kv head, "
        f"d = {res['shape']['head_dim']} (fold P = {res['shape']['padded']}), block {res['shape']['block_size']}; "
        f"{res['threads']} thread(s), {res['rounds']} alternating rounds, torch {res['torch']}.",
        "",
        "Median per-call time in µs, and in brackets the median of paired per-round ratios to the fold "
        "(< 1: faster than the fold). ✗: output outside the tolerance of the fp64 reference.",
        "",
        hdr,
        "|" + "---|" * (len(VARIANTS) + 2),
    ]
    for r in res["rows"]:
        cells = []
        for n in VARIANTS:
            s = r["variants"][n]
            mark = "" if s["within_tol"] else " ✗"
            cells.append(f"{s['median_us']:.0f} ({s['ratio_vs_fold']:.2f}){mark}")
        lines.append(f"| {r['dtype']} | {r['case']} | " + " | ".join(cells) + " |")
    lines += ["", "Largest |error| against the fp64 reference (stock P=128 against the bias-free one):", ""]
    lines += ["| dtype | case | tolerance | no-bias gap | " + " | ".join(VARIANTS) + " |"]
    lines += ["|" + "---|" * (len(VARIANTS) + 4)]
    for r in res["rows"]:
        errs = " | ".join(f"{r['variants'][n]['max_abs_err_vs_fp64']:.1e}" for n in VARIANTS)
        lines.append(f"| {r['dtype']} | {r['case']} | {r['tolerance']:.0e} | {r['no_bias_gap']:.2f} | {errs} |")
    lines += ["", "Verdict (best prototype per dtype and phase, its worst ratio to the fold over the contexts):", ""]
    for key, v in res["verdict"].items():
        lines.append(
            f"- {key}: best {v['best_prototype']} at {v['worst_ratio_vs_fold']:.2f}× the fold "
            f"({'beats' if v['beats_fold'] else 'does not beat'} it); stock P=128 (no bias) at {v['p128_ratio_vs_fold']}× the fold; "
            f"single cases below 0.95×: {v['cases_where_a_prototype_beats_fold'] or 'none'}."
        )
    lines += ["", f"Overall: **{res['decision']}**.", "", INTEGRATION.format(compile=res["flex_compile_s_per_shape"])]
    text = "\n".join(lines)
    path_json.write_text(json.dumps(res, indent=2) + "\n")
    path_md.write_text("# Attention bias: fold vs bias outside the head (CPU)\n\n" + text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "attention-bias"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args.threads, args.rounds, args.seed)
    res["verdict"] = verdict(res)
    res["decision"] = "adopt" if any(v["beats_fold"] for v in res["verdict"].values()) else "do not adopt"
    res["flex_compile_s_per_shape"] = res["flex_compile_s_total"] / len(res["rows"])
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print()
    print(write(res, out.with_suffix(".json"), out.with_suffix(".md")))


if __name__ == "__main__":
    main()
