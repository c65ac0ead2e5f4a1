"""Doge's CPU attention kernel (vllm_doge/csrc) against vLLM's `cpu_attention_with_kv_cache`.

    python -m benchmarks.attention_kernel [--quick]

Shapes: GQA 2:1 (8 query heads, 4 kv heads), block size 128, contexts L = 256 / 2048, B = 1 / 16 requests,
decode (one query per request over L keys) and prefill (L-token prompts), 1 and 2 threads, bf16 and fp32.
Two comparisons:
  d128     both at head_dim 128, no bias (ours with one zero bias channel): the kernels head to head;
  fold160  ours at head_dim 128 with its bias channel against vLLM at head_dim 160, the size today's fold
           of the bias into q/k needs (what the Doge backend replaces).
Runs alternate (ours, vLLM, ours, ...) and each cell reports medians. Prefill of B = 16 x 2048 tokens is
left out (tens of seconds per call in fp32 on one core).

On a CPU with AMX a second table, "no-AMX emulation" (bf16 only), reruns the bf16 cells in a child process with
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (oneDNN, hence our auto path, sees no AMX) against vLLM's `vec` ISA:
the setting of an AVX512_BF16 machine without AMX (e.g. AMD EPYC), where the issue's target was set.
Writes benchmarks/results/NAME.{json,md} (--report NAME, default attention-kernel; attention-kernel-avx2 holds
a run on a CPU with AVX2 only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_doge.backend import ops

HEADS, KV_HEADS, BS = 8, 4, 128
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_flags() -> dict:
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo", encoding="utf-8")
                  if l.startswith("model name")), "?")
    return {"model": model, **{k: k in flags for k in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")}}


def isa_label(flags: dict) -> str:
    return next((name for key, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"), ("avx512f", "AVX-512"),
                                        ("avx2", "AVX2")) if flags[key]), "no AVX2")


def batch_shape(mode: str, B: int, L: int):
    q_lens = [1] * B if mode == "decode" else [L] * B
    return q_lens, [L] * B


def paged(seq_lens, gen):
    """Blocks per request, a block table over a random permutation of the blocks, every token's slot."""
    nblk = [math.ceil(s / BS) for s in seq_lens]
    table = torch.zeros(len(seq_lens), max(nblk), dtype=torch.int32)
    perm = torch.randperm(sum(nblk), generator=gen).to(torch.int32)
    slots, start = [], 0
    for b, (n, s) in enumerate(zip(nblk, seq_lens)):
        table[b, :n] = perm[start: start + n]
        start += n
        slots += [int(table[b, j // BS]) * BS + j % BS for j in range(s)]
    return sum(nblk), table, torch.tensor(slots)


def make_ours(q_lens, seq_lens, d, dtype, gen):
    blocks, table, slots = paged(seq_lens, gen)
    cache = torch.zeros(blocks, KV_HEADS, BS, ops.cell_elements(d, 1, dtype), dtype=dtype)
    T = sum(seq_lens)
    k = torch.randn(T, KV_HEADS, d, generator=gen).to(dtype)
    v = torch.randn(T, KV_HEADS, d, generator=gen).to(dtype)
    bias = torch.randn(T, KV_HEADS, 1, generator=gen)
    ops.cache_write(k, v, bias, cache, slots)
    q = torch.randn(sum(q_lens), HEADS, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    out = torch.empty_like(q)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return lambda: ops.attention(out, q, cache, qsl, sl, table, d**-0.5, 0, 1)


VLLM_ISA_OVERRIDE: str | None = None  # "vec" in the no-AMX child


def vllm_isa(dtype, d) -> str:
    if VLLM_ISA_OVERRIDE:
        return VLLM_ISA_OVERRIDE
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, BS, d)


def make_vllm(q_lens, seq_lens, d, dtype, gen):
    from vllm import _custom_ops as vops

    isa = vllm_isa(dtype, d)
    blocks, table, slots = paged(seq_lens, gen)
    kv_cache = torch.zeros(blocks, KV_HEADS, BS, 2 * d, dtype=dtype)
    key_cache, value_cache = kv_cache.view(blocks, KV_HEADS, BS * 2, d).chunk(2, dim=2)
    T = sum(seq_lens)
    k = torch.randn(T, KV_HEADS, d, generator=gen).to(dtype)
    v = torch.randn(T, KV_HEADS, d, generator=gen).to(dtype)
    vops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    q = torch.randn(sum(q_lens), HEADS, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    out = torch.empty_like(q)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    meta = vops.cpu_attn_get_scheduler_metadata(len(seq_lens), HEADS, KV_HEADS, d, sl, dtype, qsl, True, -1, isa,
                                                True)

    def fn():
        vops.cpu_attention_with_kv_cache(q, key_cache, value_cache, out, qsl, sl, d**-0.5, True, None, -1, table, 0.0,
                                         meta, None)

    return fn


def timed(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e6 / iters


def measure(a, b, budget_s: float, rounds: int) -> tuple[float, float]:
    """Median microseconds per call of a and b over `rounds` alternating rounds."""
    a(), b()
    once = max(timed(a, 1), timed(b, 1)) * 1e-6
    iters = max(1, min(200, int(budget_s / rounds / 2 / once)))
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(a, iters))
        tb.append(timed(b, iters))
    return statistics.median(ta), statistics.median(tb)


def run_cells(dtypes, threads_list, budget, rounds, table) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in dtypes:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for mode in ("decode", "prefill"):
                for B in (1, 16):
                    for L in (256, 2048):
                        if mode == "prefill" and B == 16 and L == 2048:
                            continue
                        q_lens, seq_lens = batch_shape(mode, B, L)
                        ours = make_ours(q_lens, seq_lens, 128, dtype, gen)
                        for cmp, vd in (("d128", 128), ("fold160", 160)):
                            theirs = make_vllm(q_lens, seq_lens, vd, dtype, gen)
                            t_ours, t_vllm = measure(ours, theirs, budget, rounds)
                            row = {"table": table, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
                                   "mode": mode, "B": B, "L": L, "compare": cmp, "ours_us": round(t_ours, 1),
                                   "vllm_us": round(t_vllm, 1), "ratio": round(t_ours / t_vllm, 3),
                                   "ours_path": ops.isa(), "vllm_isa": vllm_isa(dtype, vd)}
                            rows.append(row)
                            print(f"{table:6s} {row['dtype']:8s} t={threads} {mode:7s} B={B:2d} L={L:4d} {cmp:7s} "
                                  f"ours {t_ours:9.1f} us  vllm {t_vllm:9.1f} us  ratio {row['ratio']:.2f}",
                                  flush=True)
    return rows


def table_lines(rows) -> list[str]:
    lines = [
        "| dtype | threads | mode | B | L | compare | ours (us) | vLLM (us) | ours/vLLM | vLLM isa |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['mode']} | {r['B']} | {r['L']} | {r['compare']} | "
                     f"{r['ours_us']} | {r['vllm_us']} | {r['ratio']:.2f} | {r['vllm_isa']} |")
    return lines


def main() -> None:
    global VLLM_ISA_OVERRIDE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one dtype, one thread count, short budget")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per cell (both systems)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-amx", action="store_true", help="skip the no-AMX emulation table (always skipped "
                        "on a CPU without AMX)")
    parser.add_argument("--report", default="attention-kernel", help="results/NAME.{json,md} (default: %(default)s)")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)  # the no-AMX child: write its rows here
    args = parser.parse_args()
    assert ops.load(), "the vllm_doge kernels did not build"
    threads_list = [1] if args.quick else [1, 2]
    if args.child_out:
        VLLM_ISA_OVERRIDE = "vec"
        rows = run_cells([torch.bfloat16], threads_list, args.budget, args.rounds, "no-amx")
        Path(args.child_out).write_text(json.dumps({"ours_path": ops.isa(), "rows": rows}))
        return
    flags = cpu_flags()
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    rows = run_cells(dtypes, threads_list, args.budget, args.rounds, "cpu")
    child = {"ours_path": None, "rows": []}
    if not args.no_amx and flags["amx_bf16"]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "benchmarks.attention_kernel", "--child-out", out, "--budget",
                   str(args.budget), "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
            env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
            subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parent.parent)
            child = json.loads(Path(out).read_text())
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpu": flags, "torch": torch.__version__, "heads": HEADS, "kv_heads": KV_HEADS, "block_size": BS,
            "ours_path": ops.isa(), "ours_path_no_amx": child["ours_path"]}
    (RESULTS / f"{args.report}.json").write_text(
        json.dumps({"meta": meta, "rows": rows + child["rows"]}, indent=1) + "\n")
    lines = [
        "# Doge CPU attention kernel vs vLLM cpu_attention_with_kv_cache",
        "",
        f"CPU: {flags['model']}; amx_bf16={flags['amx_bf16']} avx512_bf16={flags['avx512_bf16']} "
        f"avx2={flags['avx2']}. torch {torch.__version__}. Heads {HEADS}/{KV_HEADS} (GQA 2:1), block size {BS}. "
        f"Medians of {args.rounds} alternating rounds, microseconds per call.",
        "d128: both head_dim 128 without bias; fold160: ours head_dim 128 + bias channel vs vLLM head_dim 160.",
        "",
        f"## This CPU ({isa_label(flags)}): ours ran `{ops.isa()}`, vLLM its own choice of ISA",
        "",
        *table_lines(rows),
    ]
    if child["rows"]:
        lines += [
            "",
            f"## No-AMX emulation: ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, ours ran `{child['ours_path']}`, "
            "vLLM forced to `vec`",
            "",
            "What an AVX512_BF16 CPU without AMX (the issue's AMD EPYC) would run, on this CPU's cores and caches.",
            "",
            *table_lines(child["rows"]),
        ]
    (RESULTS / f"{args.report}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
