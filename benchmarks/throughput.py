"""Offline generation throughput of vllm_doge against the engine's limit and the alternatives.

    python -m benchmarks.throughput                      # every preset, eager and compiled, bf16 and fp32, 2 rounds x 3 reps
    python -m benchmarks.throughput --quick              # smoke run: doge-20m 16 x (64 -> 64) and doge-20m-long-decode
                                                         # 4 x (768 -> 128), bf16 only, 1 round x 2 reps
    python -m benchmarks.throughput --presets doge-20m,doge-20m-moe --modes eager --dtypes float32 --reps 3
    python -m benchmarks.throughput --presets doge-20m-long-decode,doge-20m-long-prefill --modes compiled
    python -m benchmarks.throughput --presets doge-20m --systems doge,qwen3 --doge-alt /tmp/copy  # A/B a change
    python -m benchmarks.throughput --presets doge-20m --systems doge --lora --modes eager --dtypes float32  # LoRA cost
    python -m benchmarks.throughput --report latest      # re-print the table and redraw the chart from JSON

For each shape preset, on one workload (N requests of L random prompt token ids, M generated tokens,
greedy, EOS ignored), in each dtype of `--dtypes` (bfloat16 and float32 by default: weights and KV
cache; the checkpoints are fp32 on disk and the engines cast them), the systems are timed in
alternation, each repetition in a rotated order, and medians are reported:

    doge      vllm_doge (this plugin) on a Doge checkpoint with random non-trivial weights (on CPU its own
              attention backend, DOGE_ATTN, unless the keep window binds; `attention_path` in each
              system's info says which path ran, `attention_isa` which kernels)
    fold      vllm_doge forced onto the fold (VLLM_DOGE_ATTENTION=fold: the bias in a padded head on vLLM's
              stock CPU backend), the path DOGE_ATTN replaces and the fallback where it cannot build
    qwen3     vLLM's native Qwen3ForCausalLM with identical dimensions: the engine's limit for this shape
    fallback  vLLM's Transformers fallback (model_impl="transformers") on the same Doge checkpoint
    hf        transformers' DogeForCausalLM.generate (one batch, KV cache) on the same checkpoint
    dense     (CDMoE preset) vllm_doge on the same model without experts (is_moe false)
    doge_alt  (only with --doge-alt DIR) vllm_doge imported from DIR (a modified copy), same checkpoint:
              A/B-tests an optimisation against `doge` in the same alternation (ratio alt_over_doge)
    lora      (only with --lora) vllm_doge with LoRA enabled, every request with one rank-8 adapter on
              q/k/v/o/gate/up/down (benchmarks._checkpoints.lora_adapter; ratio lora_over_doge)

Presets: doge-20m, doge-60m (Doge-20M/60M shapes), doge-20m-moe (CDMoE), and two long-context presets
on the Doge-20M shape with keep_window_size W = 256 < max_model_len = prompt + generated, where the
sparse keep-window path runs (every attention layer is a sliding window of W + 1 to vLLM, which frees
KV blocks before the window, and vllm_doge relocates keys inside it):

    doge-20m-long-decode   16 x (2048 -> 512)   decode-heavy   (target doge/qwen3 >= 1.8, compiled)
    doge-20m-long-prefill   4 x (4096 -> 64)    prefill-heavy  (target doge/qwen3 >= 1.0)

vllm_doge turns prefix caching off for such a model, so both systems of these presets run with
`enable_prefix_caching=False` (the presets' `prefix_caching=False`); the other presets keep vLLM's default
(on) for both. The engines' max_model_len is the model's max_position_embeddings, or prompt + generated
for the long-context presets (`fit_context`); the KV cache (VLLM_CPU_KVCACHE_SPACE) holds the whole
workload of the largest system (fp32, padded head) twice over, so nothing is preempted.

KV cache per request (`kv_probe`): after a group's timed runs, each vLLM system runs ONE request of the
workload's shape through its engine step by step (`llm_engine.add_request` + `step()`); after every
step the request's non-null KV blocks x block size, summed over KV cache groups, is the cache it holds.
`kv_tokens_per_request` is the peak over decode steps, `kv_tokens_per_request_prefill_peak` over prefill
steps. Ratios: `kv_tokens_per_request_over_qwen3` (the keep window's target: <= (W + 2 blocks) / (prompt
+ generated)) and `requests_per_kv_budget_over_qwen3`, how many such requests one KV budget holds, Doge
over Qwen3 = Qwen3's KV bytes per request / Doge's (tokens held x the engine's bytes per token, which
for Doge includes the padded head; target >= 4). A preset's `targets` are checked and printed.

vLLM systems run in `enforce_eager=True` ("eager") and the default torch.compile mode ("compiled");
`hf` does not depend on the mode and is timed in both groups (its two medians are a noise check).
Every system runs in its own process (benchmarks._worker); all processes of a (preset, mode, dtype)
group start first (untimed), each does one untimed warm-up run, then the timed repetitions alternate between
them. Each repetition draws fresh prompts (the same for every system in that repetition), so vLLM's
prefix cache never hits across repetitions. A group runs in `--rounds` rounds, each with freshly
started processes: on this machine two engine instances of one model differ by a few percent (measured:
vllm_doge and a copy of it whose code change is worth ~0.1% of the work, alternated, came out 1-5%
apart, each pair of instances consistently in one direction), so repetitions inside one instance alone
understate the spread.

Noise: each system gets one thread by default (`--threads`). On a shared 2-core machine an OpenMP team
of 2 threads stalls at every barrier when another process holds a core: measured under load, the same
vllm_doge run took 1.3 s or 9.2 s; with one thread, repetitions stay within a few percent. Wall time and process CPU time are
both recorded; `ratios_cpu_time` (tokens per CPU second) is the less load-sensitive of the two.

Output: a markdown table on stdout (one row per preset, dtype and mode), benchmarks/results/<name>.json
(name: latest, or quick with --quick) with the raw per-repetition numbers, the KV probes and, per preset
and dtype (`<preset>.dtypes.<dtype>`), `ratios` (medians of ratios paired within each repetition; output
tokens/s of the first system over the second; plus the KV ratios) and one chart per preset,
benchmarks/results/<name>.<preset>.png, linked from <name>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._checkpoints import cache_dir, config_summary, doge_checkpoint, lora_adapter, qwen3_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
WORKER = "benchmarks._worker"  # run as a module from the repository root

# --------------------------------------------------------------------------------------------------
# Presets and workloads
# --------------------------------------------------------------------------------------------------

DOGE_20M = dict(
    vocab_size=32768,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
DOGE_60M = {**DOGE_20M, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 16,
            "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
CDMOE = dict(is_moe=True, num_experts=1024, num_experts_per_tok=16)


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_len: int
    max_tokens: int

    def describe(self) -> str:
        return f"{self.requests} x ({self.prompt_len} -> {self.max_tokens})"


WORKLOADS = {
    "full": {
        "main": Workload(64, 128, 128),
        "single": Workload(1, 128, 512),
        "long-decode": Workload(16, 2048, 512),
        "long-prefill": Workload(4, 4096, 64),
    },
    "quick": {
        "main": Workload(16, 64, 64),
        "single": Workload(1, 64, 256),
        "long-decode": Workload(4, 768, 128),  # still past the keep window (256): the sparse path runs
        "long-prefill": Workload(2, 1024, 32),
    },
}


@dataclass(frozen=True)
class Preset:
    doge: dict
    workload: str  # key of WORKLOADS[...]
    systems: tuple[str, ...]
    note: str = ""
    prefix_caching: bool = True  # vLLM's default; every vLLM system of the preset runs with this setting
    # True: every vLLM system runs with max_model_len = prompt_len + max_tokens of the workload (else the
    # model's max_position_embeddings); for a Doge model this decides whether the keep window binds.
    fit_context: bool = False
    # ratio key -> (">=" or "<=", value); "kv_window" stands for (W + 2 * block) / (prompt + generated)
    targets: tuple = ()


# keep_window_size 256 < max_model_len: every attention layer is a sliding window of W + 1 to vLLM (blocks
# before the window are freed: O(W) KV per request) and keys are relocated inside it (keep_window.py).
LONG = {**DOGE_20M, "keep_window_size": 256}
LONG_NOTE = (
    "Doge-20M shape, keep_window_size 256 < max_model_len = prompt + generated: the sparse keep-window path "
    "(sliding window of W+1, relocation); prefix caching off for both systems (vllm_doge turns it off for "
    "such a model, so Qwen3 runs without it too)"
)

# Past the keep window a request holds the window, not its context (design §3b).
KV_TARGETS = (("kv_tokens_per_request_over_qwen3", "<=", "kv_window"), ("requests_per_kv_budget_over_qwen3", ">=", 4.0))

PRESETS = {
    "doge-20m": Preset(
        DOGE_20M, "main", ("doge", "fold", "qwen3", "fallback", "hf"), "Doge-20M shape",
        targets=(("doge_over_qwen3", ">=", 1.0),),
    ),
    "doge-20m-single": Preset(
        DOGE_20M, "single", ("doge", "fold", "qwen3"), "Doge-20M shape, one stream (what one chat user feels)",
        targets=(("doge_over_qwen3", ">=", 1.0),),
    ),
    "doge-60m": Preset(DOGE_60M, "main", ("doge", "qwen3", "fallback", "hf"), "Doge-60M shape"),
    "doge-20m-moe": Preset(
        {**DOGE_20M, **CDMOE},
        "main",
        ("doge", "dense", "qwen3", "fallback", "hf"),
        "Doge-20M shape with CDMoE (1024 experts, top-16); qwen3 and dense have no experts",
    ),
    "doge-20m-long-decode": Preset(
        {**LONG, "max_position_embeddings": 2560},
        "long-decode",
        ("doge", "qwen3"),
        LONG_NOTE + "; decode-heavy",
        prefix_caching=False,
        fit_context=True,
        targets=(("doge_over_qwen3", ">=", 1.8), *KV_TARGETS),
    ),
    "doge-20m-long-prefill": Preset(
        {**LONG, "max_position_embeddings": 8192},
        "long-prefill",
        ("doge", "qwen3"),
        LONG_NOTE + "; prefill-heavy",
        prefix_caching=False,
        fit_context=True,
        targets=(("doge_over_qwen3", ">=", 1.0), *KV_TARGETS),
    ),
}
FULL_PRESETS = ["doge-20m", "doge-20m-single", "doge-60m", "doge-20m-moe", "doge-20m-long-decode", "doge-20m-long-prefill"]
QUICK_PRESETS = ["doge-20m", "doge-20m-long-decode"]
DTYPES = ["bfloat16", "float32"]


def native_bf16() -> str | None:
    """The CPU flag that makes bf16 native here (AMX or AVX-512 bf16), or None."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def cpu_isa() -> list[str]:
    """The vector ISA flags of this CPU that decide which kernels run (vLLM's and DOGE_ATTN's)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "avx512_fp16", "avx2") if f in flags]


def default_dtypes(quick: bool) -> tuple[list[str], str]:
    """bf16 first where it is native (what a user serves with there), fp32 as well; --quick runs one dtype
    (each dtype doubles the engine starts, and a compiled start takes 1-2 min here)."""
    flag = native_bf16()
    dtypes = DTYPES if flag else DTYPES[::-1]
    why = f"bfloat16 first: this CPU has native bf16 ({flag})" if flag else "float32 first: no native bf16 on this CPU"
    return dtypes[:1] if quick else dtypes, why

RATIOS = {  # ratio key -> (numerator, denominator): output tokens/s, paired per repetition
    "doge_over_qwen3": ("doge", "qwen3"),
    "doge_over_fold": ("doge", "fold"),
    "doge_over_fallback": ("doge", "fallback"),
    "doge_over_hf": ("doge", "hf"),
    "moe_over_dense": ("doge", "dense"),
    "alt_over_doge": ("doge_alt", "doge"),
    "lora_over_doge": ("lora", "doge"),
}
LABELS = {
    "doge": "vllm_doge",
    "fold": "vllm_doge, fold on the stock backend",
    "qwen3": "vLLM Qwen3 (same shape)",
    "fallback": "vLLM Transformers fallback",
    "hf": "transformers generate",
    "dense": "vllm_doge, no experts",
    "doge_alt": "vllm_doge (--doge-alt copy)",
    "lora": "vllm_doge + one LoRA adapter",
}


@dataclass
class Checkpoints:
    doge: Path
    qwen3: Path
    dense: Path | None = None
    lora: Path | None = None  # a LoRA adapter of `doge` (the lora system)


def build_checkpoints(name: str, preset: Preset, lora: bool = False) -> Checkpoints:
    doge = doge_checkpoint(name, preset.doge)
    dense = None
    if "dense" in preset.systems:
        fields = {k: v for k, v in preset.doge.items() if k not in CDMOE}
        dense = doge_checkpoint(name + "-dense", fields)
    qwen3 = qwen3_checkpoint(name + "-qwen3", dense or doge)
    return Checkpoints(doge, qwen3, dense, lora_adapter(doge) if lora else None)


def max_model_len(preset: Preset, workload: Workload) -> int | None:
    """The engines' max_model_len: None = the model's own (max_position_embeddings)."""
    return workload.prompt_len + workload.max_tokens if preset.fit_context else None


def worker_argv(system: str, mode: str, ckpts: Checkpoints, preset: Preset, dtype: str = "float32",
                workload: Workload | None = None) -> list[str]:  # fmt: skip
    base = [sys.executable, "-m", WORKER, "--dtype", dtype]
    if system == "hf":
        return base + ["--system", "hf", "--model", str(ckpts.doge)]
    model = {"doge": ckpts.doge, "fold": ckpts.doge, "doge_alt": ckpts.doge, "fallback": ckpts.doge, "qwen3": ckpts.qwen3,
             "dense": ckpts.dense, "lora": ckpts.doge}[system]  # fmt: skip
    impl = "transformers" if system == "fallback" else "auto"
    argv = base + ["--system", "vllm", "--model", str(model), "--mode", mode, "--impl", impl]
    length = workload and max_model_len(preset, workload)
    if length:
        argv += ["--max-model-len", str(length)]
    if system == "lora":
        argv += ["--lora", str(ckpts.lora)]
    if system == "fold":
        argv += ["--attention", "fold"]
    return argv if preset.prefix_caching else argv + ["--no-prefix-caching"]


def kv_space_gib(preset: Preset, workload: Workload) -> int:
    """KV cache size for the engines: the whole workload resident (no preemption) with room to spare.

    Sized for the largest system of any dtype: fp32 (bf16 needs half), the head padded by 64 channels
    (Doge's folded bias; Qwen3 needs less), every request holding its whole context rounded up to
    128-token blocks (true of Qwen3; Doge past its keep window holds less), times 2.
    """
    d = preset.doge
    head_dim = d["hidden_size"] // d["num_attention_heads"]
    per_token = d["num_hidden_layers"] * d["num_key_value_heads"] * 2 * 4 * (head_dim + 64)  # padded head
    context = -(-(workload.prompt_len + workload.max_tokens) // 128) * 128
    need = per_token * workload.requests * context
    return max(1, math.ceil(2 * need / 2**30))


# --------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """One system in its own process; JSON commands on stdin, JSON replies on a dedicated pipe."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        read_fd, write_fd = os.pipe()
        env = {**env, "BENCH_RESULT_FD": str(write_fd)}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            pass_fds=(write_fd,), text=True, cwd=str(REPO),
        )  # fmt: skip
        os.close(write_fd)
        self._fd = read_fd
        self._buffer = b""
        self.info: dict = {}

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{self.name}: no reply within {timeout:.0f} s (log: {self.log_path})")
            ready, _, _ = select.select([self._fd], [], [], min(remaining, 5.0))
            if not ready:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise WorkerError(f"{self.name}: process exited (code {self.proc.poll()}):\n{self.log_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if message.get("event") == "error":
            raise WorkerError(f"{self.name}: {message['where']} failed: {message['error']}\n{message.get('trace', '')}")
        return message

    def send(self, **command) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def request(self, timeout: float, **command) -> dict:
        self.send(**command)
        return self.receive(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self, timeout: float = 120.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        os.close(self._fd)
        self._log.close()


def worker_env(kv_gib: int, threads: int | None) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=str(kv_gib),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if threads:
        # vLLM keeps an OMP_NUM_THREADS set outside; torch (hf) reads it too.
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# --------------------------------------------------------------------------------------------------
# One (preset, mode) group: start, warm up, alternate
# --------------------------------------------------------------------------------------------------


METRICS = ("elapsed_s", "cpu_s", "output_tokens", "tok_s", "tok_per_cpu_s", "load", "first_tokens", "rep_ids")


def run_round(name, preset, mode, dtype, workload, ckpts, reps, seed_base, log_dir, timeouts, threads, systems, alt,
              rnd, kv_probe) -> dict:  # fmt: skip
    """Start every system of a (preset, mode, dtype) group, warm each up once, then alternate `reps` timed
    runs; then (if `kv_probe`) measure the KV cache one request holds in each vLLM system (untimed)."""
    env = worker_env(kv_space_gib(preset, workload), threads)
    group = {"systems": {}, "order": [], "errors": {}, "kv_probe": {}}
    workers: dict[str, Worker] = {}
    tag = f"[{name} {mode} {dtype}{f' round {rnd + 1}' if rnd else ''}]"
    try:
        for system in systems:  # started one after another: engine start is never timed
            log = log_dir / f"{name}.{mode}.{dtype}.{system}.r{rnd + 1}.log"
            print(f"  {tag} starting {system} ...", flush=True)
            system_env = env
            if system == "doge_alt":  # the copy's vllm_doge comes first on sys.path (before the editable install)
                system_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (alt, env.get("PYTHONPATH")) if p)}
            worker = Worker(system, worker_argv(system, mode, ckpts, preset, dtype, workload), system_env, log)
            try:
                worker.info = worker.receive(timeouts["start"])["info"]
            except WorkerError as exc:
                print(f"  {tag} {system} failed to start: {str(exc)[:2000]}", flush=True)
                group["errors"][system] = str(exc)[-4000:]
                worker.close(timeout=10)
                continue
            print(f"  {tag} {system} ready in {worker.info.get('start_s')} s", flush=True)
            workers[system] = worker
            group["systems"][system] = {"info": worker.info, **{m: [] for m in METRICS}}

        def run(system: str, seed: int) -> dict | None:
            try:
                return workers[system].request(
                    timeouts["run"], cmd="run", seed=seed, requests=workload.requests,
                    prompt_len=workload.prompt_len, max_tokens=workload.max_tokens,
                )  # fmt: skip
            except WorkerError as exc:
                print(f"  {tag} {system} run failed: {str(exc)[:2000]}", flush=True)
                group["errors"][system] = str(exc)[-4000:]
                workers.pop(system).close(timeout=10)
                return None

        for system in list(workers):  # warm-up: allocator, first shapes, lazy inits
            run(system, seed_base + 999)

        expected = workload.requests * workload.max_tokens
        for rep in range(reps):
            live = [s for s in systems if s in workers]
            order = live[rep % len(live) :] + live[: rep % len(live)] if live else []
            group["order"].append(order)
            for system in order:
                result = run(system, seed_base + rep)
                if result is None:
                    continue
                if result["output_tokens"] != expected:
                    print(f"  {tag} {system}: {result['output_tokens']} tokens, expected {expected}")
                record = group["systems"][system]
                record["rep_ids"].append(f"{rnd + 1}.{rep + 1}")
                record["elapsed_s"].append(result["elapsed_s"])
                record["output_tokens"].append(result["output_tokens"])
                record["cpu_s"].append(result["cpu_s"])
                record["tok_s"].append(result["output_tokens"] / result["elapsed_s"])
                record["tok_per_cpu_s"].append(result["output_tokens"] / result["cpu_s"])
                record["load"].append(result["load"])
                record["first_tokens"].append(result.get("head"))
                print(
                    f"  {tag} rep {rep + 1}/{reps} {system:8s} {record['tok_s'][-1]:8.1f} tok/s "
                    f"({result['elapsed_s']:.2f} s wall, {result['cpu_s']:.2f} s CPU, load {result['load']:.1f})",
                    flush=True,
                )

        for system in [s for s in systems if s in workers and s != "hf"] if kv_probe else []:
            try:
                probe = workers[system].request(
                    timeouts["run"], cmd="kv", seed=seed_base + 555, prompt_len=workload.prompt_len,
                    max_tokens=workload.max_tokens,
                )  # fmt: skip
            except WorkerError as exc:
                print(f"  {tag} {system} kv probe failed: {str(exc)[:2000]}", flush=True)
                group["errors"][f"{system} kv probe"] = str(exc)[-4000:]
                continue
            probe.pop("event", None)
            group["kv_probe"][system] = probe
            print(
                f"  {tag} kv probe {system:8s} {probe['kv_tokens_per_request']} tokens held per request decoding "
                f"(prefill peak {probe['kv_tokens_per_request_prefill_peak']}), "
                f"{fmt(probe['kv_bytes_per_request'] and probe['kv_bytes_per_request'] / 2**20, 2)} MiB",
                flush=True,
            )
    finally:
        for worker in workers.values():
            worker.close()
    return group


def merge_rounds(rounds: list[dict]) -> dict:
    """One group from several rounds (fresh processes each): lists concatenated, medians and ratios over all."""
    group = {"systems": {}, "order": [], "errors": {}, "rounds": len(rounds), "kv_probe": {}}
    for rnd, part in enumerate(rounds):
        for system, probe in part.get("kv_probe", {}).items():
            group["kv_probe"].setdefault(system, probe)
        group["order"] += part["order"]
        group["errors"].update({f"{s} (round {rnd + 1})": e for s, e in part["errors"].items()})
        for system, record in part["systems"].items():
            merged = group["systems"].setdefault(system, {"info": record["info"], "start_s": [], **{m: [] for m in METRICS}})
            merged["start_s"].append(record["info"].get("start_s"))
            for m in METRICS:
                merged[m] += record[m]
    for record in group["systems"].values():
        record["median_tok_s"] = statistics.median(record["tok_s"]) if record["tok_s"] else None
        record["median_tok_per_cpu_s"] = statistics.median(record["tok_per_cpu_s"]) if record["tok_per_cpu_s"] else None
    # A correctness smell test, not a parity test: the first 8 greedy tokens of request 0, per repetition,
    # against transformers' DogeForCausalLM (hf) on the same prompts, where it ran.
    ref = dict(zip(group["systems"].get("hf", {}).get("rep_ids", []), group["systems"].get("hf", {}).get("first_tokens", [])))
    if ref:
        group["first_tokens_match_hf"] = {}
        for system, record in group["systems"].items():
            if system in ("hf", "qwen3", "dense", "lora"):  # other models (lora: the adapted one)
                continue
            same = [ref[i] == t for i, t in zip(record["rep_ids"], record["first_tokens"]) if i in ref]
            group["first_tokens_match_hf"][system] = sum(same) / len(same) if same else None
    group["ratios"] = paired_ratios(group, "tok_s")
    group["ratios"].update(kv_probe_ratios(group))
    group["ratios_cpu_time"] = paired_ratios(group, "tok_per_cpu_s")
    return group


def kv_probe_ratios(group: dict) -> dict:
    """vllm_doge over Qwen3 from the KV probes (one request of the workload's shape in each engine)."""
    doge, qwen = group["kv_probe"].get("doge"), group["kv_probe"].get("qwen3")
    if not doge or not qwen:
        return {}
    out = {}
    for key in ("kv_tokens_per_request", "kv_tokens_per_request_prefill_peak"):
        if doge.get(key) and qwen.get(key):
            out[key + "_over_qwen3"] = doge[key] / qwen[key]
    # Requests of this shape that fit one KV budget (bytes), Doge over Qwen3: the inverse ratio of the
    # cache bytes one request holds while decoding (tokens held x bytes per token, over each KV group).
    if doge.get("kv_bytes_per_request") and qwen.get("kv_bytes_per_request"):
        out["requests_per_kv_budget_over_qwen3"] = qwen["kv_bytes_per_request"] / doge["kv_bytes_per_request"]
    return out


def check_targets(preset: Preset, workload: Workload, group: dict, relative_only: bool = False) -> dict:
    """Each of the preset's targets against this group's ratios: {key: {op, target, value, met}}.

    `relative_only` (--quick: the workload is not the one the numbers were set for): only the targets
    that scale with the workload ("kv_window")."""
    out = {}
    for key, op, target in preset.targets:
        if relative_only and target != "kv_window":
            continue
        if target == "kv_window":  # (W + 2 blocks) / (prompt + generated)
            probe = group["kv_probe"].get("doge")
            if not probe:
                continue
            target = (preset.doge["keep_window_size"] + 2 * max(probe["block_sizes"])) / (
                workload.prompt_len + workload.max_tokens
            )
        value = group["ratios"].get(key)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[key] = {"op": op, "target": target, "value": value, "met": met}
    return out


def paired_ratios(group: dict, metric: str) -> dict:
    """Median over repetitions of (numerator / denominator) of `metric` measured in the same repetition."""
    out = {}
    systems = group["systems"]
    for key, (num, den) in RATIOS.items():
        if num not in systems or den not in systems:
            continue
        a = dict(zip(systems[num]["rep_ids"], systems[num][metric]))
        b = dict(zip(systems[den]["rep_ids"], systems[den][metric]))
        pairs = [a[i] / b[i] for i in a if i in b]
        if pairs:
            out[key] = statistics.median(pairs)
            out[key + "_per_rep"] = pairs
    return out


def kv_ratio(groups: dict) -> tuple[float | None, dict]:
    """KV bytes per token of vllm_doge over Qwen3 from the engines' KV cache specs (any mode)."""
    for group in groups.values():
        systems = group["systems"]
        doge = systems.get("doge", {}).get("info", {}).get("kv_bytes_per_token")
        qwen = systems.get("qwen3", {}).get("info", {}).get("kv_bytes_per_token")
        if doge and qwen:
            detail = {
                "doge_kv_bytes_per_token": doge,
                "qwen3_kv_bytes_per_token": qwen,
                "source": "engine KV cache spec (page_size_bytes / block_size, summed over layers)",
            }
            fb = systems.get("fallback", {}).get("info", {}).get("kv_bytes_per_token")
            if fb:
                detail["fallback_kv_bytes_per_token"] = fb
            return doge / qwen, detail
    return None, {}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


KV_COLUMNS = ("kv_tokens_per_request_over_qwen3", "requests_per_kv_budget_over_qwen3")
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def dtype_entries(entry: dict) -> dict:
    """dtype -> {"modes": ..., "ratios": ...} of one preset (JSON written before --dtypes: all fp32)."""
    return entry["dtypes"] if "dtypes" in entry else {"float32": entry}


def markdown_table(results: dict, modes: list[str]) -> str:
    entries = {n: dtype_entries(p) for n, p in results.items() if not n.startswith("_")}
    groups = [g for per in entries.values() for d in per.values() for g in d["modes"].values()]
    present = {s for g in groups for s in g["systems"]}
    systems = [s for s in ["doge", "fold", "doge_alt", "lora", "qwen3", "fallback", "hf", "dense"] if s in present]
    ratio_keys = [k for k in RATIOS if any(k in g["ratios"] for g in groups)]
    kv = any(g.get("kv_probe") for g in groups)
    kv_systems = [s for s in ("doge", "qwen3") if any(s in g.get("kv_probe", {}) for g in groups)] if kv else []
    kv_keys = [k for k in KV_COLUMNS if any(k in g["ratios"] for g in groups)]
    head = ["preset", "dtype", "mode", *[f"{LABELS[s]} tok/s" for s in systems], *ratio_keys,
            *[f"{s} KV tokens/request" for s in kv_systems], *kv_keys]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in entries.items():
        for dtype, entry in per.items():
            for mode in modes:
                group = entry["modes"].get(mode)
                if group is None:
                    continue
                cells = [name, SHORT_DTYPE.get(dtype, dtype), mode]
                for s in systems:
                    record = group["systems"].get(s)
                    cells.append(fmt(record and record["median_tok_s"]))
                cells += [fmt(group["ratios"].get(k), 3) for k in ratio_keys]
                for s in kv_systems:
                    probe = group.get("kv_probe", {}).get(s)
                    cells.append(fmt(probe and probe["kv_tokens_per_request"], 0))
                cells += [fmt(group["ratios"].get(k), 3) for k in kv_keys]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_report(results: dict) -> list[str]:
    lines = []
    for name, entry in results.items():
        if name.startswith("_"):
            continue
        for dtype, per in dtype_entries(entry).items():
            for mode, group in per["modes"].items():
                for key, t in group.get("targets", {}).items():
                    verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
                    lines.append(
                        f"  {name} {SHORT_DTYPE.get(dtype, dtype)} {mode}: {key} = {fmt(t['value'], 3)} "
                        f"(target {t['op']} {fmt(t['target'], 3)}): {verdict}"
                    )
    return lines


def plot_presets(results: dict, modes: list[str], stem: str) -> list[Path]:
    """One chart per preset, <stem>.<preset>.png (both dtypes, every system); returns the files written."""
    charts = []
    for name in (n for n in results if not n.startswith("_")):
        path = RESULTS / f"{stem}.{name}.png"
        if not plot({name: results[name], "_meta": results["_meta"]}, modes, path):
            break
        charts.append(path)
    return charts


def plot(results: dict, modes: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib, or the project's bench extra)")
        return False
    names = [n for n in results if not n.startswith("_")]
    systems = ["doge", "fold", "doge_alt", "lora", "dense", "qwen3", "fallback", "hf"]
    colors = {"doge": "#d62728", "fold": "#ff7f0e", "doge_alt": "#9467bd", "lora": "#8c564b", "dense": "#ff9896", "qwen3": "#1f77b4", "fallback": "#2ca02c",
              "hf": "#7f7f7f"}  # fmt: skip
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(8.0, 6.0 * cols), 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        per = dtype_entries(results[name])
        # one cluster of bars per (dtype, mode) group
        groups = [(d, m) for d in per for m in modes if m in per[d]["modes"]]
        present = [s for s in systems if any(s in per[d]["modes"][m]["systems"] for d, m in groups)]
        width = 0.8 / max(1, len(present))
        for i, system in enumerate(present):
            xs, ys, lo, hi = [], [], [], []
            for j, (dtype, mode) in enumerate(groups):
                record = per[dtype]["modes"][mode]["systems"].get(system)
                if not record or record["median_tok_s"] is None:
                    continue
                med = record["median_tok_s"]
                xs.append(j + (i - (len(present) - 1) / 2) * width)
                ys.append(med)
                lo.append(med - min(record["tok_s"]))
                hi.append(max(record["tok_s"]) - med)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=LABELS[system], color=colors[system])
        ax.set_xticks(range(len(groups)), [f"{m}\n{SHORT_DTYPE.get(d, d)}" for d, m in groups], fontsize=8)
        ax.set_title(f"{name}\n{results[name]['workload']['describe']}", fontsize=9)
        ax.set_ylabel("output tokens/s")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=8)
    meta = results["_meta"]
    threads = meta.get("threads_per_system", "?")
    fig.suptitle(
        f"vllm-doge offline throughput, {'/'.join(SHORT_DTYPE.get(d, d) for d in meta.get('dtypes', ['float32']))}, "
        f"{threads} thread(s) per system on a {meta['cpu_count']}-core CPU "
        f"({meta['date'][:10]})\nbars: median, whiskers: min-max over repetitions",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07 if rows > 1 else 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------


def parse_list(text: str, known: list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {unknown}; choose from {known}")
    return items


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: smaller workloads, 1 round x 2 reps, presets {QUICK_PRESETS}, one dtype",
    )  # fmt: skip
    parser.add_argument("--presets", default=None, help=f"comma-separated, from {list(PRESETS)}")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument(
        "--dtypes", default=None,
        help=f"comma-separated, from {DTYPES} (weights and KV cache; checkpoints are fp32 on disk, the engines cast "
        "them); default both, bfloat16 first where the CPU has native bf16 (with --quick only the first)",
    )  # fmt: skip
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per system and round (default 3; 2 quick)")
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="rounds per (preset, mode, dtype), each with freshly started processes (default 2; 1 quick): engine "
        "instances differ by a few %% from one start to the next, repetitions within one do not",
    )  # fmt: skip
    parser.add_argument("--name", default=None, help="results file stem (default latest; quick with --quick)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="OMP/torch threads per system (default 1: on a shared machine, OpenMP teams of 2 threads stall "
        "whenever another process takes a core; 0 = leave vLLM's and torch's defaults)",
    )  # fmt: skip
    parser.add_argument("--systems", default=None, help="comma-separated subset of each preset's systems")
    parser.add_argument("--doge-alt", default=None, metavar="DIR", help="also time vllm_doge imported from DIR")
    parser.add_argument("--lora", action="store_true", help="also time vllm_doge serving one LoRA adapter (system lora)")
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="seconds for one engine start")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds for one timed run")
    parser.add_argument("--report", default=None, metavar="NAME", help="only re-render results/NAME.json (table, charts), e.g. of an interrupted run")
    args = parser.parse_args(argv)

    if args.report:
        results = json.loads((RESULTS / f"{args.report}.json").read_text())
        modes = results["_meta"]["modes"]
        table = markdown_table(results, modes)
        print(table)
        print("\n".join(targets_report(results)))
        charts = plot_presets(results, modes, args.report)
        links = "".join(f"\n![{c.stem}]({c.name})" for c in charts)
        (RESULTS / f"{args.report}.md").write_text(table + "\n" + links + ("\n" if links else ""))
        for chart in charts:
            print(f"chart: {chart}")
        return

    presets = parse_list(args.presets, list(PRESETS), "presets") if args.presets else (
        QUICK_PRESETS if args.quick else FULL_PRESETS
    )  # fmt: skip
    modes = parse_list(args.modes, ["eager", "compiled"], "modes")
    if args.dtypes:
        dtypes = parse_list(args.dtypes, DTYPES, "dtypes")
    else:
        dtypes, why = default_dtypes(args.quick)
        print(f"# dtypes {','.join(dtypes)} ({why})", flush=True)
    reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    workloads = WORKLOADS["quick" if args.quick else "full"]
    stem = args.name or ("quick" if args.quick else "latest")
    only = set(parse_list(args.systems, list(LABELS), "systems")) if args.systems else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = cache_dir() / "logs" / stem
    log_dir.mkdir(parents=True, exist_ok=True)
    timeouts = {"start": args.start_timeout, "run": args.run_timeout}

    import torch
    import transformers
    import vllm

    results: dict = {
        "_meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "native_bf16": native_bf16(),
            "cpu_isa": cpu_isa(),
            "load_average_at_start": os.getloadavg(),
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "dtypes": dtypes,
            "checkpoint_dtype": "float32 (vLLM's dtype= / transformers' from_pretrained(dtype=) cast to each dtype)",
            "reps": reps,
            "rounds": rounds,
            "threads_per_system": args.threads or "vLLM/torch default",
            "modes": modes,
            "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "per preset (GiB)"},
            "sampling": "SamplingParams(max_tokens=M, temperature=0, ignore_eos=True, detokenize=False)",
            "metric": "output tokens / wall seconds of one LLM.generate (or model.generate) call, prefill included",
            "ratios": "median over all repetitions (of all rounds) of tok/s(first) / tok/s(second) measured in the same "
            "repetition; "
            "`ratios` of a preset = {dtype: ratios of compiled mode if measured, else eager}; each dtype's "
            "`ratios_by_mode` has both",
            "kv_probe": "per vLLM system and group: ONE request of the workload's shape driven through the engine "
            "step by step; after each step the non-null KV blocks it holds x block size, summed over KV cache "
            "groups (kv_tokens_per_request: peak while decoding; ..._prefill_peak: peak over prefill steps; "
            "kv_bytes_per_request: the same in bytes). kv_tokens_per_request_over_qwen3 and "
            "requests_per_kv_budget_over_qwen3 (= Qwen3's KV bytes per request / Doge's) are in each group's ratios",
            "logs": str(log_dir),
        }
    }
    print(
        f"# vllm-doge throughput: presets {presets}, modes {modes}, dtypes {dtypes}, {rounds} round(s) x {reps} reps, "
        f"logs in {log_dir}",
        flush=True,
    )
    started = time.monotonic()
    for index, name in enumerate(presets):
        preset = PRESETS[name]
        workload = workloads[preset.workload]
        print(f"\n## {name}: {preset.note}; workload {workload.describe()}", flush=True)
        ckpts = build_checkpoints(name, preset, lora=args.lora)
        entry = {
            "note": preset.note,
            "workload": {**workload.__dict__, "describe": workload.describe()},
            "config": config_summary(ckpts.doge),
            "checkpoints": {k: str(v) for k, v in ckpts.__dict__.items() if v is not None},
            "kv_cache_gib": kv_space_gib(preset, workload),
            "max_model_len": max_model_len(preset, workload) or "the model's max_position_embeddings",
            "prefix_caching": preset.prefix_caching,
            "dtypes": {},
        }
        systems = [s for s in preset.systems if not only or s in only]
        if args.doge_alt:
            systems.insert(1, "doge_alt")
        if args.lora:
            systems.insert(1, "lora")
        alt = args.doge_alt and str(Path(args.doge_alt).resolve())
        for dtype_index, dtype in enumerate(dtypes):
            per = {"modes": {}}
            for mode in modes:
                parts = [
                    run_round(
                        name, preset, mode, dtype, workload, ckpts, reps,
                        1000 * (index + 1) + 100 * rnd + 10 * dtype_index, log_dir, timeouts, args.threads, systems,
                        alt, rnd, kv_probe=rnd == 0,
                    )
                    for rnd in range(rounds)
                ]  # fmt: skip
                group = merge_rounds(parts)
                group["targets"] = check_targets(preset, workload, group, relative_only=args.quick)
                per["modes"][mode] = group
            ratio_mode = "compiled" if "compiled" in per["modes"] else modes[0]
            ratios = {k: v for k, v in per["modes"][ratio_mode]["ratios"].items() if not k.endswith("_per_rep")}
            kv, kv_detail = kv_ratio(per["modes"])
            if kv is None:  # from the layer attributes: padded head size P vs head_dim
                group = per["modes"][ratio_mode]["systems"].get("doge", {})
                padded = group.get("info", {}).get("padded_head_size")
                head_dim = entry["config"]["hidden_size"] // entry["config"]["num_attention_heads"]
                if padded:
                    kv, kv_detail = padded[0] / head_dim, {"source": "DogeAttention.padded_head_size / head_dim"}
            if kv is not None:
                ratios["kv_bytes_per_token_over_qwen3"] = kv
            per["ratios"] = ratios
            per["ratios_cpu_time"] = {
                k: v for k, v in per["modes"][ratio_mode]["ratios_cpu_time"].items() if not k.endswith("_per_rep")
            }
            per["ratios_mode"] = ratio_mode
            per["ratios_by_mode"] = {m: g["ratios"] for m, g in per["modes"].items()}
            per["ratios_cpu_time_by_mode"] = {m: g["ratios_cpu_time"] for m, g in per["modes"].items()}
            per["kv"] = kv_detail
            entry["dtypes"][dtype] = per
            entry["ratios"] = {d: p["ratios"] for d, p in entry["dtypes"].items()}
            results[name] = entry
            # Written after every group, so a long run leaves partial results if interrupted.
            results["_meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
            results["_meta"]["load_average_at_end"] = os.getloadavg()
            (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")

    table = markdown_table(results, modes)
    print("\n## Output tokens/s (median) and paired ratios\n")
    print(table)
    print("\nratios (per preset and dtype):")
    for name in presets:
        for dtype, per in results[name]["dtypes"].items():
            print(f"  {name} {dtype} [{per['ratios_mode']}]: " + json.dumps({k: round(v, 4) for k, v in per["ratios"].items()}))
    targets = targets_report(results)
    if targets:
        print("\ntargets:")
        print("\n".join(targets))
    charts = plot_presets(results, modes, stem)
    links = "".join(f"\n![{c.stem}]({c.name})" for c in charts)
    (RESULTS / f"{stem}.md").write_text(table + "\n" + links + ("\n" if links else ""))
    for chart in charts:
        print(f"chart: {chart}")
    print(f"results: {RESULTS / f'{stem}.json'} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
