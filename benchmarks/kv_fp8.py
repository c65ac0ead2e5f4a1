"""How much an fp8 KV cache hurts Doge, compared with the same fp8 setting on a Qwen3 of the same shape.

    python -m benchmarks.kv_fp8 [--prompts 16 --prompt-len 64 --max-tokens 128]

Doge folds its per-key bias b = exp(A·softplus(dt_proj(v))) into an extra channel of the cached key
(design §3): k' = [k, b, 0…], q' = [q, 1/scale, 0…]. With an fp8 KV cache that channel is stored in fp8
too, so the bias (1..8 for these checkpoints) keeps only 3 (e4m3) or 2 (e5m2) mantissa bits.

Models: the throughput benchmark's Doge-20M-shape checkpoint (`PRESETS["doge-20m"]`, random non-trivial
weights, keep_window_size 2048) and the Qwen3 of identical shape. max_model_len 512 <= keep window, so the
plain folded path runs (the keep-window path refuses a quantized cache).

For each model, in bf16 (dtype="bfloat16", enforce_eager=True), each KV cache dtype (the default, i.e.
bf16, then each fp8 variant the CPU backend accepts): greedy decoding (temperature 0, ignore_eos,
logprobs=5) of N random-token prompts (fixed seed). Each engine runs in its own process. Against the same
model's default-KV run:
  (a) steps until the fp8 greedy path first differs (per prompt; max_tokens when it never does)
  (b) mean |logprob gap| of the chosen token over the steps before divergence
  (c) fraction of prompts whose generated tokens are all identical

Mechanism check (`mechanism`): the CPU backend's fp8 store is probed directly (`cpu_attn_reshape_and_cache`
with k_scale 1.0, vLLM's default per-tensor scale for a checkpoint without scales) to learn how it rounds;
then, on the Doge checkpoint in transformers (doge_hf, fp32), every layer's q, k and b are captured for a
few prompts, rounded to bf16 like the engine's, and the score error q·k·scale + b caused by storing k and b
in fp8 that way is split into the part from k and the part from b.

Writes benchmarks/results/kv-fp8.json and benchmarks/results/kv-fp8.md; prints the markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PRESET = "doge-20m"
MAX_MODEL_LEN = 512
DEFAULT_KV = "auto"
REPEAT = "auto (repeat)"  # control: the default-KV run again in a fresh process (should match exactly)
FP8_VARIANTS = ("fp8", "fp8_e5m2")
SEED = 1234
# Comparable: Doge's mean steps to divergence is at least this fraction of Qwen3's.
COMPARABLE_FRACTION = 0.5


# --------------------------------------------------------------------------------------------------
# One engine run (child process)
# --------------------------------------------------------------------------------------------------


def random_prompts(seed: int, count: int, length: int, vocab: int) -> list[list[int]]:
    """Token ids 5..vocab-1 (ids below 5 are the special tokens), the same for every engine."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(length)] for _ in range(count)]


def engine_run(model: str, kv_dtype: str, prompts: list[list[int]], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="bfloat16",
        kv_cache_dtype=kv_dtype,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        gpu_memory_utilization=0.5,
        seed=0,
    )
    start_s = time.perf_counter() - started
    try:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, logprobs=5, detokenize=False)
        began = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        generate_s = time.perf_counter() - began
        runs = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            chosen = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, tokens)]
            # the first step's top tokens (the chosen one included): the candidate's logprob of the
            # reference's first token, from the same context (the prompt) in both runs
            first = {int(t): float(lp.logprob) for t, lp in completion.logprobs[0].items()}
            runs.append({"tokens": tokens, "logprobs": chosen, "first_step": first})
        return {"start_s": round(start_s, 1), "generate_s": round(generate_s, 1), "runs": runs}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def child_main(args) -> None:
    spec = json.loads(Path(args.child).read_text())
    try:
        result = engine_run(spec["model"], spec["kv_dtype"], spec["prompts"], spec["max_tokens"])
    except Exception as exc:  # an engine that refuses the setting: record why
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    Path(spec["out"]).write_text(json.dumps(result))


def run_in_child(model: Path, kv_dtype: str, prompts, max_tokens: int, log_dir: Path, tag: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec = {"model": str(model), "kv_dtype": kv_dtype, "prompts": prompts, "max_tokens": max_tokens,
                "out": str(out_path)}  # fmt: skip
        spec_path.write_text(json.dumps(spec))
        log = log_dir / f"{model.name}-{tag.replace(' ', '_')}.log"
        began = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.kv_fp8", "--child", str(spec_path)],
                cwd=HERE.parent, stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wall = time.perf_counter() - began
        if out_path.is_file():
            result = json.loads(out_path.read_text())
        else:
            tail = log.read_text()[-2000:]
            result = {"error": f"child exited {proc.returncode} without a result", "traceback": tail}
    result["wall_s"] = round(wall, 1)
    result["log"] = str(log)
    return result


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def compare(reference: list[dict], candidate: list[dict], max_tokens: int) -> dict:
    steps, gaps, identical, first_gaps, first_missing = [], [], 0, [], 0
    for ref, cand in zip(reference, candidate, strict=True):
        token = ref["tokens"][0]
        lp = cand["first_step"].get(str(token))  # keys are strings after the JSON round trip
        if lp is not None:
            first_gaps.append(abs(ref["logprobs"][0] - lp))
        else:
            first_missing += 1
        first = next((i for i, (a, b) in enumerate(zip(ref["tokens"], cand["tokens"])) if a != b), None)
        if first is None:
            first = min(len(ref["tokens"]), len(cand["tokens"]))
            identical += first == max_tokens
        steps.append(first)
        gaps.extend(abs(a - b) for a, b in zip(ref["logprobs"][:first], cand["logprobs"][:first]))
    return {
        "steps_to_divergence": steps,
        "steps_mean": statistics.fmean(steps),
        "steps_median": statistics.median(steps),
        "steps_min": min(steps),
        "logprob_gap_mean": statistics.fmean(gaps) if gaps else None,
        "logprob_gap_max": max(gaps) if gaps else None,
        "identical_fraction": identical / len(steps),
        # |logprob gap| of the reference's first token (prefill context, identical in both runs); prompts
        # where that token is not in the candidate's top 5 are left out and counted
        "first_step_gap_mean": statistics.fmean(first_gaps) if first_gaps else None,
        "first_step_gap_missing": first_missing,
    }


# --------------------------------------------------------------------------------------------------
# Mechanism: how the CPU backend stores fp8, and where the score error comes from
# --------------------------------------------------------------------------------------------------

TORCH_FP8 = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def toward_zero(x, fp8_dtype):
    """x rounded to the fp8 format toward zero (the nearest fp8 value no larger in magnitude)."""
    import torch

    near = x.float().to(fp8_dtype)
    over = near.float().abs() > x.float().abs()
    bits = near.view(torch.uint8).clone()
    bits[over] -= 1  # sign-magnitude: one code down is the next value toward zero
    return bits.view(fp8_dtype).float()


def probe_store(kv_dtype: str, head_size: int = 160, block: int = 32) -> dict:
    """Store known bf16 keys through vLLM's CPU fp8 path and compare with two rounding rules.

    The cache layout inside a block depends on the ISA, so the comparison is of the multisets of values."""
    import torch
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    fp8 = getattr(torch, TORCH_FP8[kv_dtype])
    isa = _get_attn_isa(torch.bfloat16, block, head_size, kv_dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = 8
    # keys of content size plus bias-like values 1..8 (one token holds evenly spaced values over 0.9..8.3)
    key = torch.randn(tokens, 1, head_size, generator=gen) * 2
    key[0, 0] = torch.linspace(0.9, 8.3, head_size)
    key = key.to(torch.bfloat16)
    out = {"isa": isa}
    for k_scale in (1.0, 2.0):
        k_cache = torch.zeros(1, 1, block, head_size, dtype=torch.uint8)
        v_cache = torch.zeros_like(k_cache)
        ops.cpu_attn_reshape_and_cache(
            key, key.clone(), k_cache, v_cache, torch.arange(tokens), isa,
            k_scale=k_scale, v_scale=1.0, kv_cache_dtype=kv_dtype,
        )  # fmt: skip
        stored = k_cache.view(fp8).float().flatten()
        stored = stored[stored != 0].sort().values  # unused slots, and values that round to (-)0
        scaled = key.float() / k_scale
        rules = {"round_to_nearest": scaled.to(fp8).float(), "toward_zero": toward_zero(scaled, fp8)}
        matches = []
        for name, expected in rules.items():
            expected = expected.flatten()
            if torch.equal(stored, expected[expected != 0].sort().values):
                matches.append(name)
        out[f"k_scale_{k_scale:g}"] = matches or ["neither"]
    return out


def fp8_relative_precision(kv_dtype: str, rule: str) -> dict:
    """Relative error of bias values in [1, 8] stored in this fp8 format with the observed rounding."""
    import torch

    fp8 = getattr(torch, TORCH_FP8[kv_dtype])
    b = torch.linspace(1.0, 8.0, 20001).to(torch.bfloat16).float()
    stored = toward_zero(b, fp8) if rule == "toward_zero" else b.to(fp8).float()
    rel = (stored - b) / b
    return {"rel_err_mean": rel.mean().item(), "rel_err_max_abs": rel.abs().max().item(),
            "abs_err_max_b_in_4_8": (stored - b)[b >= 4].abs().max().item()}  # fmt: skip


def capture_doge_qkb(model_dir: Path, prompts: list[list[int]]):
    """Per layer, per prompt: q [heads, T, d], k [kv, T, d], b [kv, T] of the doge_hf model (fp32)."""
    import torch

    from doge_hf import DogeForCausalLM
    from doge_hf.attention import DogeAttention, key_bias

    model = DogeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured: list[dict] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos_sin = args[1] if len(args) > 1 else kwargs["cos_sin"]
        b_, t, _ = hidden.shape
        q, k, v = module.project(hidden, cos_sin)
        bias = key_bias(v.transpose(1, 2).reshape(b_, t, -1), module.dt_proj, module.A)
        captured.append({"q": q[0], "k": k[0], "b": bias[0], "scale": module.head_dim**-0.5})

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in model.modules()
               if isinstance(m, DogeAttention)]  # fmt: skip
    with torch.no_grad():
        for prompt in prompts:
            model(input_ids=torch.tensor([prompt]))
    for h in handles:
        h.remove()
    return captured


def score_error_split(captured, kv_dtype: str, rule: str) -> dict:
    """Score error e_ij = scale·q_i·(k8_j - k_j) + (b8_j - b_j) over causal pairs, split into its k and b
    parts. q, k, b are first rounded to bf16 (the engine's dtype). 'centered' subtracts each query's
    mean error over its visible keys: a shift common to all keys of a query does not change softmax."""
    import torch

    fp8 = getattr(torch, TORCH_FP8[kv_dtype])
    quant = (lambda x: toward_zero(x, fp8)) if rule == "toward_zero" else (lambda x: x.float().to(fp8).float())
    sums = {name: [0.0, 0.0] for name in ("k", "b", "total")}  # raw, centered sums of squares
    count, score_sq, b_rel = 0, 0.0, []
    for item in captured:
        q = item["q"].to(torch.bfloat16).float()
        k = item["k"].to(torch.bfloat16).float()
        b = item["b"].to(torch.bfloat16).float()
        heads, kv = q.shape[0], k.shape[0]
        k = k.repeat_interleave(heads // kv, 0)
        b = b.repeat_interleave(heads // kv, 0)
        k8, b8 = quant(k), quant(b)
        t = q.shape[1]
        visible = torch.ones(t, t, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) * item["scale"] + b[:, None, :]
        err_k = (q @ (k8 - k).transpose(-1, -2)) * item["scale"]
        err_b = (b8 - b)[:, None, :].expand(-1, t, -1)
        parts = {"k": err_k, "b": err_b, "total": err_k + err_b}
        n_vis = visible.sum(-1, keepdim=True)
        for name, err in parts.items():
            err = err.masked_fill(~visible, 0.0)
            centered = (err - err.sum(-1, keepdim=True) / n_vis).masked_fill(~visible, 0.0)
            sums[name][0] += err.pow(2).sum().item()
            sums[name][1] += centered.pow(2).sum().item()
        score_sq += (scores - scores.masked_fill(~visible, 0).sum(-1, keepdim=True) / n_vis).masked_fill(
            ~visible, 0.0).pow(2).sum().item()  # fmt: skip
        count += int(visible.sum().item()) * heads
        b_rel.append(((b8 - b) / b).flatten())
    rms = {f"{name}_rms": (s[0] / count) ** 0.5 for name, s in sums.items()}
    rms.update({f"{name}_rms_centered": (s[1] / count) ** 0.5 for name, s in sums.items()})
    rel = torch.cat(b_rel)
    rms["score_spread_rms"] = (score_sq / count) ** 0.5  # centered score size, for scale
    rms["b_rel_err_mean"] = rel.mean().item()
    rms["b_rel_err_max_abs"] = rel.abs().max().item()
    return rms


def mechanism(doge: Path, prompts, variants: list[str]) -> dict:
    import torch

    out: dict = {"k_scale_default": None, "variants": {}}
    from vllm.model_executor.layers.attention.attention import set_default_quant_scales

    holder = torch.nn.Module()
    set_default_quant_scales(holder, register_buffer=True)
    out["k_scale_default"] = holder._k_scale_float
    captured = capture_doge_qkb(doge, prompts)
    all_b = torch.cat([c["b"].flatten() for c in captured])
    out["bias_values"] = {"min": all_b.min().item(), "median": all_b.median().item(), "max": all_b.max().item(),
                          "p99": all_b.quantile(0.99).item()}  # fmt: skip
    for kv_dtype in variants:
        probe = probe_store(kv_dtype)
        rule = probe["k_scale_1"][0]
        entry = {"store_probe": probe, "rule": rule}
        if rule != "neither":
            entry["bias_1_to_8"] = fp8_relative_precision(kv_dtype, rule)
            entry["score_error"] = score_error_split(captured, kv_dtype, rule)
            # the same split had the store rounded to nearest, for comparison
            if rule != "round_to_nearest":
                entry["score_error_if_round_to_nearest"] = score_error_split(captured, kv_dtype, "round_to_nearest")
        out["variants"][kv_dtype] = entry
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def fmt(x, digits=3):
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def render(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# fp8 KV cache: Doge vs a same-shape Qwen3",
        "",
        f"Run: `cd /work/main && .venv/bin/python -m benchmarks.kv_fp8` ({result['elapsed_s']:.0f} s, "
        f"{cfg['prompts']} prompts x ({cfg['prompt_len']} random token ids -> {cfg['max_tokens']} greedy tokens), "
        f"seed {cfg['seed']}, dtype bfloat16, enforce_eager, max_model_len {cfg['max_model_len']} "
        f"<= keep_window_size {cfg['keep_window_size']}, {cfg['preset']} shape, logprobs=5).",
        "Reference: the same model with the default KV cache dtype (bf16). Each engine in its own process. "
        f"`{REPEAT}` is a control: the reference run again in a fresh process. Steps to divergence count "
        "generated tokens before the first different one (the max when none differs). The last column compares "
        "the reference's first generated token's logprob in both runs (same context: the prompt; taken from "
        "the candidate's top 5).",
        "",
        "Accepted KV cache dtypes (engine started and generated): "
        + ", ".join(f"`{k}` ({'yes' if v else 'no'})" for k, v in result["accepted"].items()),
        "",
        "| model | kv cache | steps to divergence mean | median | min | mean abs logprob gap before divergence "
        "| max gap | prompts identical (all tokens) | first-token abs logprob gap (same context) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, per in result["metrics"].items():
        for kv, m in per.items():
            lines.append(
                f"| {model} | {kv} | {m['steps_mean']:.1f} | {fmt(m['steps_median'])} | {m['steps_min']} | "
                f"{fmt(m['logprob_gap_mean'])} | {fmt(m['logprob_gap_max'])} | {m['identical_fraction']:.2f} | "
                f"{fmt(m['first_step_gap_mean'])}{' (%d missing)' % m['first_step_gap_missing'] if m['first_step_gap_missing'] else ''} |"
            )
    lines += ["", "## Verdict", "", result["verdict_rule"], ""]
    for kv, v in result["verdicts"].items():
        lines.append(f"- `{kv}`: {v}")
    per = result["metrics"]
    floor = [kv for kv in result["verdicts"] if kv in per.get("doge", {}) and kv in per.get("qwen3", {})
             and max(per["doge"][kv]["steps_mean"], per["qwen3"][kv]["steps_mean"]) < 0.05 * cfg["max_tokens"]]
    if floor:
        lines += ["", f"Caveat ({', '.join(floor)}): both models diverge within a few tokens (median step 0 or so: "
                  "the first generated token already differs for many prompts), so steps-to-divergence is near "
                  "its floor and separates the models poorly; these random-weight checkpoints have large logit "
                  "spreads (LOGIT_STD 10) that turn small attention changes into flips. The same-context "
                  "first-token logprob gap (last column) is the better-resolved comparison."]
    mech = result.get("mechanism")
    if mech:
        b = mech["bias_values"]
        lines += [
            "",
            "## Mechanism",
            "",
            f"- vLLM's CPU backend uses one per-tensor scale per layer for K and V (`layer._k_scale_float`), "
            f"{mech['k_scale_default']} unless the checkpoint ships scales (these do not); the stored value is "
            "k / k_scale in fp8, dequantised by multiplying with k_scale.",
            f"- Doge bias values seen (doge_hf fp32, all layers, mechanism prompts): min {b['min']:.3g}, median "
            f"{b['median']:.3g}, p99 {b['p99']:.3g}, max {b['max']:.3g}.",
        ]
        for kv, e in mech["variants"].items():
            probe = e["store_probe"]
            lines.append(
                f"- `{kv}` store (probed through `cpu_attn_reshape_and_cache`, isa {probe['isa']}): rounding "
                f"= {', '.join(probe['k_scale_1'])} (k_scale 1), {', '.join(probe['k_scale_2'])} (k_scale 2)."
            )
            if "bias_1_to_8" in e:
                p = e["bias_1_to_8"]
                lines.append(
                    f"  - bias in [1, 8]: relative error mean {p['rel_err_mean']:+.3f}, max |rel| "
                    f"{p['rel_err_max_abs']:.3f}; absolute error up to {p['abs_err_max_b_in_4_8']:.3g} for b in [4, 8)."
                )
            if "score_error" in e:
                s = e["score_error"]
                lines.append(
                    f"  - score error RMS over causal (query, key) pairs: from k {s['k_rms']:.3g}, from b "
                    f"{s['b_rms']:.3g}, total {s['total_rms']:.3g}; per-query centered (what softmax sees): "
                    f"k {s['k_rms_centered']:.3g}, b {s['b_rms_centered']:.3g}, total {s['total_rms_centered']:.3g} "
                    f"(centered score spread {s['score_spread_rms']:.3g}); b's observed relative error mean "
                    f"{s['b_rel_err_mean']:+.3f}."
                )
            if "score_error_if_round_to_nearest" in e:
                s = e["score_error_if_round_to_nearest"]
                lines.append(
                    f"  - had the store rounded to nearest: centered RMS k {s['k_rms_centered']:.3g}, "
                    f"b {s['b_rms_centered']:.3g}, total {s['total_rms_centered']:.3g}."
                )
        if mech.get("summary"):
            lines += ["", mech["summary"]]
    return "\n".join(lines) + "\n"


def mechanism_summary(mech: dict) -> str:
    parts = []
    for kv, e in mech["variants"].items():
        s = e.get("score_error")
        if not s:
            continue
        dominant = "b" if s["b_rms_centered"] > s["k_rms_centered"] else "k"
        parts.append(
            f"`{kv}`: the centered score error comes mostly from {dominant} "
            f"(b {s['b_rms_centered']:.3g} vs k {s['k_rms_centered']:.3g} nats RMS)"
        )
    return "Summary: " + "; ".join(parts) + "." if parts else ""


# --------------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> bool:
    """Bars per fp8 variant, Doge beside Qwen3: mean steps to divergence and the first-token logprob gap."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (the project's bench extra)")
        return False
    variants = [kv for kv in result["verdicts"] if all(kv in result["metrics"][m] for m in ("doge", "qwen3"))]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "steps_mean", "mean steps to divergence"),
                           (axes[1], "first_step_gap_mean", "first-token |logprob gap|")):  # fmt: skip
        for i, (model, color) in enumerate((("doge", "#d62728"), ("qwen3", "#1f77b4"))):
            values = [result["metrics"][model][kv][key] or 0.0 for kv in variants]
            ax.bar([j + (i - 0.5) * 0.4 for j in range(len(variants))], values, 0.4, label=model, color=color)
        ax.set_xticks(range(len(variants)), variants)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"fp8 KV cache against the {cfg['dtype']} cache, {cfg['prompts']} x ({cfg['prompt_len']} -> "
                 f"{cfg['max_tokens']}), {cfg['preset']} shape", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--variants", default=",".join(FP8_VARIANTS), help="comma-separated fp8 kv_cache_dtype values")
    parser.add_argument("--mechanism-prompts", type=int, default=4)
    parser.add_argument("--no-control", action="store_true", help="skip the repeated default-KV run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--rerender", action="store_true", help="rewrite kv-fp8.md from kv-fp8.json, no runs")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.rerender:
        result = json.loads((RESULTS / "kv-fp8.json").read_text())
        text = render(result)
        (RESULTS / "kv-fp8.md").write_text(text)
        plot(result, RESULTS / "kv-fp8.png")
        print(text)
        return

    from benchmarks._checkpoints import config_summary, doge_checkpoint, qwen3_checkpoint
    from benchmarks.throughput import PRESETS

    began = time.perf_counter()
    doge = doge_checkpoint(PRESET, PRESETS[PRESET].doge)
    qwen3 = qwen3_checkpoint(PRESET + "-qwen3", doge)
    doge_cfg = json.loads((doge / "config.json").read_text())
    keep = doge_cfg.get("keep_window_size") or doge_cfg["max_position_embeddings"]
    if MAX_MODEL_LEN > keep:
        raise SystemExit(f"max_model_len {MAX_MODEL_LEN} > keep_window_size {keep}: the keep window would bind")
    if args.prompt_len + args.max_tokens > MAX_MODEL_LEN:
        raise SystemExit(f"prompt + generated tokens exceed max_model_len {MAX_MODEL_LEN}")
    prompts = random_prompts(SEED, args.prompts, args.prompt_len, doge_cfg["vocab_size"])
    variants = [v for v in args.variants.split(",") if v]
    log_dir = Path(tempfile.mkdtemp(prefix="kv-fp8-logs-"))

    runs: dict = {}
    for label, model in (("doge", doge), ("qwen3", qwen3)):
        runs[label] = {}
        for kv in (DEFAULT_KV, *variants, *(() if args.no_control else (REPEAT,))):
            kv_dtype = DEFAULT_KV if kv == REPEAT else kv
            result = run_in_child(model, kv_dtype, prompts, args.max_tokens, log_dir, tag=kv)
            status = result.get("error") or f"start {result['start_s']} s, generate {result['generate_s']} s"
            print(f"[{label} kv={kv}] {status} (wall {result['wall_s']} s)", file=sys.stderr, flush=True)
            runs[label][kv] = result

    accepted = {kv: all("error" not in runs[m][kv] for m in runs) for kv in variants}
    metrics: dict = {}
    for label, per in runs.items():
        metrics[label] = {}
        ref = per[DEFAULT_KV]
        if "error" in ref:
            raise SystemExit(f"{label} default-KV run failed: {ref['error']}\n{ref.get('traceback', '')}")
        for kv in per:
            if kv != DEFAULT_KV and "error" not in per[kv]:
                metrics[label][kv] = compare(ref["runs"], per[kv]["runs"], args.max_tokens)

    rule = (
        f"Rule: Doge is *comparable* if its mean steps-to-divergence is at least {COMPARABLE_FRACTION:g} x Qwen3's "
        f"under the same fp8 setting, else *clearly worse* (divergence is censored at {args.max_tokens} tokens "
        "for prompts that never diverge)."
    )
    verdicts = {}
    for kv in variants:
        if kv in metrics["doge"] and kv in metrics["qwen3"]:
            d, q = metrics["doge"][kv]["steps_mean"], metrics["qwen3"][kv]["steps_mean"]
            word = "comparable" if d >= COMPARABLE_FRACTION * q else "clearly worse"
            verdicts[kv] = f"**{word}**: Doge {d:.1f} vs Qwen3 {q:.1f} mean steps (ratio {d / q:.2f})"
        else:
            verdicts[kv] = "not run (the engine refused this KV cache dtype): " + "; ".join(
                f"{m}: {runs[m][kv].get('error')}" for m in runs if "error" in runs[m][kv]
            )

    mech = None
    if args.mechanism_prompts:
        mech_variants = [kv for kv in variants if accepted.get(kv)] or variants
        mech = mechanism(doge, prompts[: args.mechanism_prompts], mech_variants)
        mech["summary"] = mechanism_summary(mech)

    result = {
        "config": {"preset": PRESET, "prompts": args.prompts, "prompt_len": args.prompt_len,
                   "max_tokens": args.max_tokens, "seed": SEED, "max_model_len": MAX_MODEL_LEN,
                   "keep_window_size": keep, "dtype": "bfloat16", "enforce_eager": True,
                   "doge": str(doge), "qwen3": str(qwen3), "shape": config_summary(doge)},  # fmt: skip
        "accepted": accepted,
        "engines": {m: {kv: {k: v for k, v in r.items() if k != "runs"} for kv, r in per.items()}
                    for m, per in runs.items()},  # fmt: skip
        "metrics": metrics,
        "verdict_rule": rule,
        "verdicts": verdicts,
        "mechanism": mech,
    }
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    result["tokens"] = {m: {kv: [r["tokens"] for r in per[kv]["runs"]] for kv in per if "runs" in per[kv]}
                        for m, per in runs.items()}  # fmt: skip
    text = render(result)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kv-fp8.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "kv-fp8.md").write_text(text)
        plot(result, RESULTS / "kv-fp8.png")


if __name__ == "__main__":
    main()
