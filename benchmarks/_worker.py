"""One benchmark system in its own process, driven by `python -m benchmarks.throughput` (or `benchmarks.profile_models`).

    python -m benchmarks._worker --system vllm --model DIR --mode eager|compiled [--impl auto|transformers]
        [--dtype float32|bfloat16] [--max-model-len N] [--no-prefix-caching]
    python -m benchmarks._worker --system hf --model DIR [--dtype float32|bfloat16]

Checkpoints are fp32 on disk; `--dtype` is the dtype the engine (vLLM's `dtype=`, transformers'
`from_pretrained(dtype=...)`) casts them to, and so also the KV cache's dtype.

The process loads one model (a vLLM engine, or transformers' `DogeForCausalLM` for `generate`), reports
`ready`, then serves commands, one JSON object per line on stdin:

    {"cmd": "run", "seed": S, "requests": N, "prompt_len": L, "max_tokens": M}
        generate once (greedy, EOS ignored) on N random prompts of L token ids drawn from `seed`;
        reports the wall time of that call only (engine start is never timed)
    {"cmd": "profile", "seed": S, ..., "out": "PATH", "row_limit": 40}
        the same under torch.profiler; writes PATH.txt (op table) and PATH.json (op totals)
    {"cmd": "kv", "seed": S, "prompt_len": L, "max_tokens": M}
        (vLLM only, untimed) one request of that shape, driven step by step through the engine
        (`llm_engine.add_request` + `llm_engine.step()`); after every step, the KV cache blocks the
        request holds (non-null blocks of each KV cache group x the group's block size): see
        `VllmSystem.kv_probe`
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

# `python -m benchmarks._worker` puts the repository first on sys.path; drop it so that vllm_doge comes
# from PYTHONPATH (an A/B copy) or the installed package, like for a user.
_REPO = str(Path(__file__).resolve().parents[1])
if sys.path and sys.path[0] in ("", _REPO, os.getcwd()):
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
            dtype=args.dtype,
            enforce_eager=args.mode == "eager",
            model_impl=args.impl,
            gpu_memory_utilization=0.3,
            seed=0,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        if args.max_model_len:
            options["max_model_len"] = args.max_model_len
        self.lora_request = None
        if args.lora:  # every request runs with this one adapter
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(args.lora) / "adapter_config.json").read_text())["r"]
            options.update(enable_lora=True, max_lora_rank=max(rank, 8), max_loras=1)
            self.lora_request = LoRARequest("bench", 1, args.lora)
        start = time.perf_counter()
        self.llm = LLM(**options)
        self.start_s = time.perf_counter() - start
        self.vocab = _config_vocab(args.model)

    def info(self) -> dict:
        import torch

        info = {"start_s": round(self.start_s, 1), "torch_threads": torch.get_num_threads()}
        engine = self.llm.llm_engine
        info["dtype"] = str(engine.vllm_config.model_config.dtype).removeprefix("torch.")
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
        vllm_config = engine.vllm_config
        sched = vllm_config.scheduler_config
        info["max_num_seqs"] = sched.max_num_seqs
        info["max_num_batched_tokens"] = sched.max_num_batched_tokens
        info["enable_prefix_caching"] = vllm_config.cache_config.enable_prefix_caching
        info["compilation_mode"] = str(vllm_config.compilation_config.mode)
        info["max_model_len"] = vllm_config.model_config.max_model_len
        info["async_scheduling"] = getattr(sched, "async_scheduling", None)
        if isinstance(vllm_config.additional_config, dict) and "doge_attention" in vllm_config.additional_config:
            info["attention_path"] = vllm_config.additional_config["doge_attention"]
            if info["attention_path"] == "DOGE_ATTN":
                from vllm_doge.backend import ops

                info["attention_isa"] = ops.isa()
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
                        "sliding_window": getattr(spec, "sliding_window", None),
                        "dtype": str(getattr(spec, "dtype", "")).removeprefix("torch."),
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
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
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

    def kv_probe(self, seed: int, prompt_len: int, max_tokens: int) -> dict:
        """KV cache held by ONE request of the workload's shape, from the engine's own block accounting.

        The request is driven through the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), one
        `step()` at a time; after each step, per KV cache group, the request's non-null blocks (a
        sliding-window group replaces the blocks it has freed by the null block) x the group's block
        size = the tokens' worth of cache it holds. Summed over groups: `kv_tokens_per_request`; with
        each group's bytes per token (layers x page bytes / block size): `kv_bytes_per_request`.
        Steps whose request has computed at most the prompt are prefill steps (their peak:
        `..._prefill_peak`; a prompt done in one chunk holds all its blocks until the next step's
        scheduling frees those before the window); the later ones are decode steps (the peak there is
        the steady state the KV budget has to hold per running request).
        """
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("kv probe: the engine has unfinished requests")
        scheduler = engine.engine_core.engine_core.scheduler
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        groups = scheduler.kv_cache_config.kv_cache_groups
        # bytes one token's worth of a block costs in each group, over all of the group's layers
        # (manager.block_size is the spec's block size times the DCP world size: 1 here)
        per_token = [len(g.layer_names) * g.kv_cache_spec.page_size_bytes / g.kv_cache_spec.block_size for g in groups]
        prompt = make_prompts(seed, 1, prompt_len, self.vocab)[0]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        request_id = engine.add_request(f"kv-probe-{seed}", {"prompt_token_ids": prompt}, params)
        trace = []  # (tokens computed after the step, tokens held per group)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            request = scheduler.requests.get(request_id)
            if request is None:  # finished: its blocks are already freed
                continue
            held = [sum(not b.is_null for b in m.req_to_blocks.get(request_id, [])) * m.block_size for m in managers]
            trace.append((request.num_computed_tokens, held))
            if steps > 4 * (prompt_len + max_tokens):
                raise RuntimeError("kv probe: the request does not finish")
        prefill = [h for computed, h in trace if computed <= prompt_len]
        decode = [h for computed, h in trace if computed > prompt_len]

        def peak(rows, weights=None):
            if not rows:
                return None
            weights = weights or [1] * len(managers)
            return max(sum(w * t for w, t in zip(weights, row)) for row in rows)

        return {
            "prompt_len": prompt_len,
            "max_tokens": max_tokens,
            "steps": steps,
            "prefill_steps": len(prefill),
            "block_sizes": [m.block_size for m in managers],
            "managers": [type(m).__name__ for m in managers],
            "kv_bytes_per_token_by_group": per_token,
            "kv_tokens_per_request": peak(decode),
            "kv_tokens_per_request_prefill_peak": peak(prefill),
            "kv_bytes_per_request": peak(decode, per_token),
            "kv_bytes_per_request_prefill_peak": peak(prefill, per_token),
            # tokens held by each group, at the decode peak (summed over groups above)
            "kv_tokens_per_request_by_group": max(decode, key=sum) if decode else None,
            # (tokens computed, tokens held summed over groups) after each step, thinned to ~64 points
            "trace": [(c, sum(h)) for c, h in trace[:: max(1, len(trace) // 64)]],
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
        # transformers' own DogeForCausalLM (not doge_hf), as a user would load the checkpoint.
        self.dtype = getattr(torch, args.dtype)
        self.model = transformers.DogeForCausalLM.from_pretrained(args.model, dtype=self.dtype).eval()
        self.start_s = time.perf_counter() - start
        self.vocab = self.model.config.vocab_size
        self.torch = torch

    def info(self) -> dict:
        return {
            "start_s": round(self.start_s, 1),
            "torch_threads": self.torch.get_num_threads(),
            "dtype": str(self.model.dtype).removeprefix("torch."),
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
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and KV cache")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM max_model_len (default: the model's)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="enable_prefix_caching=False")
    parser.add_argument("--lora", default=None, metavar="DIR", help="enable LoRA; every request uses this adapter")
    parser.add_argument("--attention", choices=["auto", "fold"], default="auto", help="vllm_doge's attention path (VLLM_DOGE_ATTENTION)")
    args = parser.parse_args()
    os.environ["VLLM_DOGE_ATTENTION"] = args.attention

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
            elif cmd == "kv":
                if not isinstance(system, VllmSystem):
                    raise ValueError("kv: vLLM systems only")
                result = system.kv_probe(command["seed"], command["prompt_len"], command["max_tokens"])
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply.send(event="result", load=os.getloadavg()[0], **result)
        except Exception as exc:  # noqa: BLE001
            reply.send(event="error", where=cmd, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    system.close()
    reply.send(event="bye")


if __name__ == "__main__":
    main()
