"""One benchmark system in its own process, driven by `benchmarks/throughput.py` (or `profile_models.py`).

    python benchmarks/_worker.py --system vllm --model DIR --mode eager|compiled [--impl auto|transformers]
    python benchmarks/_worker.py --system hf --model DIR

The process loads one model (a vLLM engine, or transformers' `DogeForCausalLM` for `generate`), reports
`ready`, then serves commands, one JSON object per line on stdin:

    {"cmd": "run", "seed": S, "requests": N, "prompt_len": L, "max_tokens": M}
        generate once (greedy, EOS ignored) on N random prompts of L token ids drawn from `seed`;
        reports the wall time of that call only (engine start is never timed)
    {"cmd": "profile", "seed": S, ..., "out": "PATH", "row_limit": 40}
        the same under torch.profiler; writes PATH.txt (op table) and PATH.json (op totals)
    {"cmd": "quit"}

Replies are JSON lines written to the file descriptor named by $BENCH_RESULT_FD (stdout and stderr
are left to vLLM's and transformers' logs). Each system lives in its own process because, with
VLLM_ENABLE_V1_MULTIPROCESSING=0, vLLM's Transformers fallback patches transformers' classes in the
process that starts it, and so that engines never share a process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

# Never let this module's directory shadow a library: benchmarks/ is sys.path[0] when run as a script.
_HERE = str(Path(__file__).resolve().parent)
if sys.path and sys.path[0] == _HERE:
    sys.path.pop(0)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_prompts(seed: int, requests: int, prompt_len: int, vocab_size: int) -> list[list[int]]:
    """Random token ids (no specials: ids 0-4 are bos/eos/pad/headers), the same for every system."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab_size) for _ in range(prompt_len)] for _ in range(requests)]


class _Reply:
    def __init__(self) -> None:
        fd = int(os.environ["BENCH_RESULT_FD"])
        self._out = os.fdopen(fd, "w", buffering=1)

    def send(self, **message) -> None:
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()


def _config_vocab(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


# --------------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------------


class VllmSystem:
    def __init__(self, args) -> None:
        from vllm import LLM

        options = dict(
            model=args.model,
            dtype="float32",
            enforce_eager=args.mode == "eager",
            model_impl=args.impl,
            gpu_memory_utilization=0.3,
            seed=0,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        if args.max_model_len:
            options["max_model_len"] = args.max_model_len
        start = time.perf_counter()
        self.llm = LLM(**options)
        self.start_s = time.perf_counter() - start
        self.vocab = _config_vocab(args.model)

    def info(self) -> dict:
        import torch

        info = {"start_s": round(self.start_s, 1), "torch_threads": torch.get_num_threads()}
        engine = self.llm.llm_engine
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
        vllm_config = engine.vllm_config
        sched = vllm_config.scheduler_config
        info["max_num_seqs"] = sched.max_num_seqs
        info["max_num_batched_tokens"] = sched.max_num_batched_tokens
        info["enable_prefix_caching"] = vllm_config.cache_config.enable_prefix_caching
        info["compilation_mode"] = str(vllm_config.compilation_config.mode)
        info["max_model_len"] = vllm_config.model_config.max_model_len
        kv = getattr(getattr(core, "scheduler", None), "kv_cache_config", None)
        if kv is not None:
            # Bytes one token occupies in the cache, summed over every attention layer, from the
            # engine's own KV cache spec (page bytes of a block / tokens per block).
            per_token = 0.0
            groups = []
            for group in kv.kv_cache_groups:
                spec = group.kv_cache_spec
                page = spec.page_size_bytes
                per_token += len(group.layer_names) * page / spec.block_size
                groups.append(
                    {
                        "layers": len(group.layer_names),
                        "block_size": spec.block_size,
                        "page_size_bytes": page,
                        "num_kv_heads": getattr(spec, "num_kv_heads", None),
                        "head_size": getattr(spec, "head_size", None),
                        "spec": type(spec).__name__,
                    }
                )
            info["kv_bytes_per_token"] = per_token
            info["kv_groups"] = groups
            info["num_blocks"] = kv.num_blocks
        model = self._model()
        if model is not None:
            info["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
            info["model_file"] = sys.modules[type(model).__module__].__file__
            padded = {getattr(m, "padded_head_size", None) for m in model.modules()} - {None}
            if padded:
                info["padded_head_size"] = sorted(padded)
            info["keep_window_layers"] = sum(bool(getattr(m, "keep_window", False)) for m in model.modules())
        return info

    def _model(self):
        try:
            core = self.llm.llm_engine.engine_core.engine_core
            runner = core.model_executor.driver_worker.worker.model_runner
            return runner.get_model()
        except Exception:  # noqa: BLE001 - informational only
            return None

    def run(self, seed: int, requests: int, prompt_len: int, max_tokens: int) -> dict:
        from vllm import SamplingParams

        prompts = make_prompts(seed, requests, prompt_len, self.vocab)
        # detokenize=False: the random ids include ids beyond the stand-in tokenizer's 26k tokens, and
        # text is not needed; the same for every vLLM system (transformers' generate returns ids too).
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        first = list(outputs[0].outputs[0].token_ids[:8])
        return {
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "output_tokens": generated,
            "prompt_tokens": requests * prompt_len,
            "head": first,
        }

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------------
# transformers generate
# --------------------------------------------------------------------------------------------------


class HfSystem:
    def __init__(self, args) -> None:
        import torch
        import transformers

        start = time.perf_counter()
        # transformers' own DogeForCausalLM (not doge_hf), fp32, as a user would load the checkpoint.
        self.model = transformers.DogeForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        self.start_s = time.perf_counter() - start
        self.vocab = self.model.config.vocab_size
        self.torch = torch

    def info(self) -> dict:
        return {
            "start_s": round(self.start_s, 1),
            "torch_threads": self.torch.get_num_threads(),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
        }

    def run(self, seed: int, requests: int, prompt_len: int, max_tokens: int) -> dict:
        torch = self.torch
        ids = torch.tensor(make_prompts(seed, requests, prompt_len, self.vocab))
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            # One batch, equal-length prompts (no padding), KV cache on; min_new_tokens keeps EOS out,
            # like ignore_eos.
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=self.model.config.pad_token_id,
            )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        generated = (out.shape[1] - prompt_len) * out.shape[0]
        return {
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "output_tokens": int(generated),
            "prompt_tokens": requests * prompt_len,
            "head": out[0, prompt_len : prompt_len + 8].tolist(),
        }

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------


def _profile(system, command: dict) -> dict:
    """Run the workload once under torch.profiler; write the op table and per-op totals."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        result = system.run(command["seed"], command["requests"], command["prompt_len"], command["max_tokens"])
    averages = prof.key_averages()
    out = Path(command["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".txt").write_text(
        averages.table(sort_by="self_cpu_time_total", row_limit=int(command.get("row_limit", 60)))
    )
    ops = [
        {
            "name": e.key,
            "count": e.count,
            "self_us": e.self_cpu_time_total,
            "total_us": e.cpu_time_total,
        }
        for e in averages
    ]
    ops.sort(key=lambda o: -o["self_us"])
    Path(str(out) + ".json").write_text(json.dumps({"result": result, "ops": ops}, indent=1))
    del torch
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=["vllm", "hf"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--impl", default="auto", help="vLLM model_impl (auto, vllm, transformers)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true", help="enable_prefix_caching=False")
    args = parser.parse_args()

    reply = _Reply()
    try:
        system = VllmSystem(args) if args.system == "vllm" else HfSystem(args)
        reply.send(event="ready", info=system.info(), pid=os.getpid())
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
        reply.send(event="error", where="start", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        return

    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        cmd = command.get("cmd")
        if cmd == "quit":
            break
        try:
            if cmd == "run":
                result = system.run(command["seed"], command["requests"], command["prompt_len"], command["max_tokens"])
            elif cmd == "profile":
                result = _profile(system, command)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply.send(event="result", load=os.getloadavg()[0], **result)
        except Exception as exc:  # noqa: BLE001
            reply.send(event="error", where=cmd, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    system.close()
    reply.send(event="bye")


if __name__ == "__main__":
    main()
