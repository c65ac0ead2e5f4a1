"""DOGE_ATTN, the plugin's own attention backend on CPU (vllm_doge/backend/): served against doge_hf
where only this backend runs (speculative decoding, torch.compile, TP/PP without a binding keep window),
its page size against a same-shape Qwen3, and the fold it falls back to when its kernels cannot build.

The parity tests of test_model.py, test_legacy_vllm.py and test_lora.py run on DOGE_ATTN too (every model
without a binding keep window); `test_model.py::test_greedy_parity` asserts which path each preset took.
"""

import json
import os
import subprocess
import sys

import pytest

from parity import attention_path, check_greedy_parity, engine, reference_greedy, vllm_greedy
from test_model import MAX_TOKENS, make_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repeating_prompts(seed: int = 5) -> list[list[int]]:
    """Prompts that repeat themselves, so that n-gram lookup proposes drafts and some are accepted."""
    base = make_prompts(seed, lengths=(6, 9, 12, 20))
    return [p * 4 for p in base]


@pytest.mark.parametrize(
    "speculative",
    [
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2},
        "draft-model",
    ],
    ids=["ngram", "draft-model"],
)
def test_speculative_decoding(checkpoints, monkeypatch, speculative):
    """Verification steps send several queries per request over cached context: greedy tokens equal to
    doge_hf's plain decoding, and drafts were accepted (else the test would not exercise them)."""
    # The engine core in its own process: the ngram proposer imports numba, and once llvmlite is in
    # sys.modules every later in-process vLLM 0.32 worker start fails (its CPU kernel-override scan of
    # sys.modules trips over llvmlite's lazy library object in triton_utils/dispatcher.py).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    path = checkpoints("dense-gqa", num_hidden_layers=3)
    if speculative == "draft-model":
        # A Doge draft model with its own layers and KV cache; random weights of another checkpoint would
        # agree on no token, so the target drafts for itself and every verification step runs.
        speculative = {"model": path, "num_speculative_tokens": 2}
    prompts = repeating_prompts()
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path, speculative_config=speculative, disable_log_stats=False) as llm:
        assert attention_path(llm) == "DOGE_ATTN"
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
        accepted = sum(
            getattr(m, "value", 0) for m in llm.llm_engine.get_metrics() if m.name.endswith("spec_decode_num_accepted_tokens")
        )
    assert accepted > 0, "no draft token was accepted: the verification path was not exercised"
    check_greedy_parity(reference, got, name=f"speculative {speculative}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(enforce_eager=False),
        dict(tensor_parallel_size=2),
        # vLLM's CPU runner creates PP's intermediate-tensor buffers only in its compile warm-up.
        dict(pipeline_parallel_size=2, enforce_eager=False),
    ],
    ids=["compiled", "tp2", "pp2"],
)
def test_compiled_and_parallel(checkpoints, monkeypatch, options):
    """torch.compile sees the backend's op as opaque; TP shards the kv heads (each rank's bias and page),
    PP splits the layers. CDMoE, chunked prefill over cached context."""
    if options.get("tensor_parallel_size", 1) > 1 or options.get("pipeline_parallel_size", 1) > 1:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    path = checkpoints("moe", num_hidden_layers=3)
    prompts = make_prompts(7, lengths=(5, 40, 70, 130))
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path, max_num_batched_tokens=48, **options) as llm:
        assert attention_path(llm) == "DOGE_ATTN"
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
    check_greedy_parity(reference, got, name=str(options))


def kv_tokens(llm) -> int:
    config = llm.llm_engine.vllm_config.cache_config
    return config.num_gpu_blocks * config.block_size


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kv_bytes_per_token_match_a_dense_model(checkpoints, tmp_path, dtype):
    """With the same KV cache space, a Doge model at head_dim 128 holds at least 1/1.02 the tokens a
    same-shape Qwen3 holds: K and V are unpadded, the bias adds 4 bytes per token and kv head (bf16:
    516/512). The fold held 1/1.25 (head 160): asserted too, so the comparison can tell them apart."""
    sys.path.insert(0, REPO)
    from benchmarks._checkpoints import qwen3_fields
    from transformers import Qwen3Config, Qwen3ForCausalLM

    doge = checkpoints("dense-gqa", hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128, num_hidden_layers=2)
    qwen = tmp_path / "qwen3"
    Qwen3ForCausalLM(Qwen3Config(**qwen3_fields(doge))).save_pretrained(qwen)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(doge, name)):
            with open(os.path.join(doge, name)) as src, open(qwen / name, "w") as dst:
                dst.write(src.read())
    held = {}
    for name, model in (("doge", doge), ("qwen3", str(qwen))):
        with engine(model, dtype=dtype) as llm:
            held[name] = kv_tokens(llm)
            if name == "doge":
                assert attention_path(llm) == "DOGE_ATTN"
    os.environ["VLLM_DOGE_ATTENTION"] = "fold"
    try:
        with engine(doge, dtype=dtype) as llm:
            held["fold"] = kv_tokens(llm)
    finally:
        del os.environ["VLLM_DOGE_ATTENTION"]
    assert held["qwen3"] / held["doge"] <= 1.02, held
    assert held["qwen3"] / held["fold"] >= 1.2, held


FALLBACK_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    prompts = json.loads(sys.argv[2])
    params = SamplingParams(max_tokens=int(sys.argv[3]), temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    print("RESULT", json.dumps({"path": llm.llm_engine.vllm_config.additional_config["doge_attention"],
                                "tokens": [list(o.outputs[0].token_ids) for o in outs]}))
"""


def test_falls_back_to_the_fold_when_the_kernels_cannot_build(checkpoints, tmp_path):
    """No compiler (a fresh kernel cache and CXX pointing nowhere): the plugin says why in one warning,
    serves through the fold on vLLM's stock backend, and the tokens equal doge_hf's."""
    path = checkpoints("dense-gqa")
    prompts = make_prompts(4, lengths=(5, 30, 60))
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), VLLM_DOGE_CACHE=str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, path, json.dumps(prompts), str(MAX_TOKENS)],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["path"] == "fold"
    warnings = [line for line in (run.stdout + run.stderr).splitlines() if "Doge: CPU kernels unavailable" in line]
    assert len(warnings) == 1, warnings
    assert result["tokens"] == [tokens for tokens, _ in reference]
