"""Where the time goes: torch.profiler on vllm_doge and the same-shape Qwen3, eager and compiled.

    python -m benchmarks.profile_models                                 # doge-20m, both modes
    python -m benchmarks.profile_models --preset doge-60m --modes eager --systems doge,qwen3
    python -m benchmarks.profile_models --doge-path /tmp/proto          # a modified copy of vllm_doge
    python -m benchmarks.profile_models --preset doge-20m-long-decode --dtype bfloat16 --modes compiled

Each system runs in its own process (benchmarks._worker), one thread by default, does one warm-up
run and then the workload once under torch.profiler. Self CPU time per operator is grouped into
categories (GEMMs, attention kernel, norms, RoPE, elementwise, sampling, compiled kernels, ...); the
time the profiler attributes to no operator (scheduler, input preparation, Python glue) is the
difference between the wall time and the summed self times (single thread: they add up). Writes
benchmarks/results/profile/<preset>.<mode>[.<dtype>].<system>.{txt,json} (the dtype only when not float32)
and prints one comparison table per mode. Weights and KV cache are `--dtype` (default float32); the
engines' max_model_len is the preset's (prompt + generated for the long-context presets).

Compiled mode sets TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1 (inductor's fused C++ kernels then show
up by name) and VLLM_DISABLE_COMPILE_CACHE=1 (so that the profiling build is not reused elsewhere, nor
an earlier build reused here): each engine compiles cold.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from benchmarks.throughput import (
    PRESETS,
    WORKLOADS,
    Workload,
    Worker,
    build_checkpoints,
    kv_space_gib,
    worker_argv,
    worker_env,
)

OUT = Path(__file__).resolve().parent / "results" / "profile"

# (category, regex on the operator name), first match wins. Names are those of vLLM 0.32's CPU build
# and torch 2.13 (aten::, _C::, vllm::, inductor's cpp_fused_*).
CATEGORIES = [
    # inductor's fused C++ kernels are named after the aten ops they absorb (e.g. "..._onednn_mm_silu_..."
    # for the SiLU-and-mul next to a GEMM): match them before any aten name.
    ("compiled kernels (inductor)", r"cpp_fused|graph_\d+_kernel|kernel_cpp"),
    ("compiled-graph wrappers", r"Call CompiledFxGraph|Torch-Compiled Region|CompiledFunction|Pregraph bytecode|AOTDispatcher"),
    ("attention kernel", r"cpu_attention_with_kv_cache|cpu_attn_|unified_attention|paged_attention|vllm_doge::attention$|vllm_doge::keep_window_prefill"),
    ("keep window relocation", r"vllm_doge::keep_window_(decode|positions)"),
    ("KV cache write", r"reshape_and_cache|unified_kv_cache_update|kv_cache_update|vllm_doge::cache_write"),
    ("DOGE_ATTN op (Python glue)", r"vllm_doge::biased_attention"),
    ("GEMM (linear, lm_head)", r"aten::(addmm|mm|bmm|matmul|linear|baddbmm)$|onednn|mkldnn|_C::.*gemm|_C::.*mm$|extern_kernels"),
    ("embedding / gather", r"aten::(embedding|index_select|gather|embedding_bag|_embedding_bag|index)$"),
    ("RMSNorm", r"rms_norm"),
    ("RoPE", r"rotary"),
    ("SiLU-and-mul", r"silu_and_mul|aten::silu"),
    ("top-k / sort / sampling", r"greedy|sampl|aten::(topk|sort|argmax|max|softmax|_softmax|log_softmax|_log_softmax|multinomial|exponential_|div_)$"),
    ("copies (cat, pad, copy, fill)", r"aten::(cat|constant_pad_nd|pad|copy_|clone|contiguous|fill_|zero_|zeros|new_zeros|new_full|full|empty|empty_strided|slice_scatter|_to_copy|to|as_strided_|index_put_|_index_put_impl_|masked_fill_)$"),
    ("elementwise math", r"aten::(mul|add|sub|div|exp|softplus|sum|mean|pow|rsqrt|neg|where|clamp|sigmoid|tanh|abs|eq|ne|lt|gt|ge|le|bitwise_.*|logical_.*|cumsum|arange|addcmul|lerp)_?$"),
    ("views / metadata", r"aten::(view|reshape|slice|select|split|split_with_sizes|narrow|unsqueeze|squeeze|transpose|t|permute|expand|as_strided|detach|alias|_unsafe_view|unbind|chunk|lift_fresh|item|_local_scalar_dense|numpy_T|resolve_conj|resolve_neg|is_nonzero|result_type)$"),
]


def categorise(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other ops"


def summarise(ops: list[dict], wall_s: float) -> dict[str, float]:
    """Milliseconds per category of self CPU time, plus what no operator accounts for."""
    totals: dict[str, float] = {}
    for op in ops:
        # Outer wrappers whose children are operators too: their self time is only the wrapper's own.
        totals[categorise(op["name"])] = totals.get(categorise(op["name"]), 0.0) + op["self_us"] / 1e3
    totals["not in any operator (scheduler, Python glue)"] = wall_s * 1e3 - sum(totals.values())
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="doge-20m", choices=list(PRESETS))
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--systems", default="doge,qwen3")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per system (0: defaults)")
    parser.add_argument("--doge-path", default=None, help="prepend to PYTHONPATH for the doge system (a modified copy)")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--from-files", action="store_true", help="only re-summarise the JSON files of an earlier run")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    base = WORKLOADS["full"][preset.workload]
    requests = args.requests or base.requests
    prompt_len = args.prompt_len or base.prompt_len
    max_tokens = args.max_tokens or base.max_tokens
    workload = Workload(requests, prompt_len, max_tokens)
    dtag = "" if args.dtype == "float32" else f".{args.dtype}"
    ckpts = None if args.from_files else build_checkpoints(args.preset, preset)
    OUT.mkdir(parents=True, exist_ok=True)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    print(f"# profile {args.preset}: {workload.describe()}, {args.dtype}, systems {systems}", flush=True)

    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        env = worker_env(kv_space_gib(preset, workload), args.threads)
        if mode == "compiled":
            env.update(TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE="1", VLLM_DISABLE_COMPILE_CACHE="1")
        summaries, walls = {}, {}
        for system in systems:
            stem = f"{args.preset}.{mode}{dtag}.{system}{args.tag}"
            if args.from_files:
                saved = json.loads((OUT / f"{stem}.json").read_text())
                earlier = json.loads((OUT / f"{args.preset}.{mode}{dtag}{args.tag}.summary.json").read_text())["walls"][system]
                summaries[system] = summarise(saved["ops"], saved["result"]["elapsed_s"])
                walls[system] = tuple(earlier)
                continue
            sys_env = dict(env)
            if system == "doge" and args.doge_path:
                sys_env["PYTHONPATH"] = os.pathsep.join([args.doge_path, env.get("PYTHONPATH", "")]).strip(os.pathsep)
            worker = Worker(system, worker_argv(system, mode, ckpts, preset, args.dtype, workload), sys_env, OUT / f"{stem}.log")
            try:
                info = worker.receive(3600)["info"]
                print(f"  {mode} {system}: started in {info.get('start_s')} s ({info.get('model_class')})", flush=True)
                work = dict(requests=requests, prompt_len=prompt_len, max_tokens=max_tokens)
                worker.request(3600, cmd="run", seed=7, **work)
                plain = worker.request(3600, cmd="run", seed=8, **work)
                result = worker.request(3600, cmd="profile", seed=9, out=str(OUT / stem), row_limit=60, **work)
            finally:
                worker.close()
            ops = json.loads((OUT / f"{stem}.json").read_text())["ops"]
            summaries[system] = summarise(ops, result["elapsed_s"])
            walls[system] = (plain["elapsed_s"], result["elapsed_s"], plain["output_tokens"])
            print(
                f"  {mode} {system}: {plain['output_tokens'] / plain['elapsed_s']:.1f} tok/s unprofiled "
                f"({plain['elapsed_s']:.2f} s), {result['elapsed_s']:.2f} s under the profiler",
                flush=True,
            )
        categories = sorted({c for s in summaries.values() for c in s}, key=lambda c: -max(s.get(c, 0) for s in summaries.values()))
        print(f"\n### {args.preset}, {mode}, {args.dtype}: self CPU ms per category (one profiled run)\n")
        print("| category | " + " | ".join(systems) + (" | difference (first − second) |" if len(systems) == 2 else " |"))
        print("|---|" + "---|" * (len(systems) + (1 if len(systems) == 2 else 0)))
        for c in categories:
            cells = [f"{summaries[s].get(c, 0.0):.1f}" for s in systems]
            if len(systems) == 2:
                cells.append(f"{summaries[systems[0]].get(c, 0.0) - summaries[systems[1]].get(c, 0.0):+.1f}")
            print(f"| {c} | " + " | ".join(cells) + " |")
        print("| **wall (profiled)** | " + " | ".join(f"{walls[s][1] * 1e3:.0f}" for s in systems) + (" | |" if len(systems) == 2 else " |"))
        print("| wall unprofiled | " + " | ".join(f"{walls[s][0] * 1e3:.0f}" for s in systems) + (" | |" if len(systems) == 2 else " |"))
        (OUT / f"{args.preset}.{mode}{dtag}{args.tag}.summary.json").write_text(
            json.dumps({"summaries": summaries, "walls": walls}, indent=1) + "\n"
        )
        print(flush=True)


if __name__ == "__main__":
    main()
