"""vLLM (our plugin) against the doge_hf reference: greedy tokens identical, per-step logprobs close.

Every checkpoint comes from the builder, which re-initialises A, dt_proj, the residual scales and the
expert tables with non-trivial values and sharpens lm_head, so a wrong mask, residual or routing
changes tokens. Engines run fp32, in-process (see conftest.py), one per configuration.
"""

import random

import pytest

from parity import check_greedy_parity, engine, reference_greedy, vllm_greedy

MAX_TOKENS = 32
CONFIGS = ["dense-gqa", "dense-mha-tied", "sliding", "keep-window", "moe", "moe-keep-window"]


def make_prompts(seed: int = 0, lengths=(3, 9, 17, 24, 33, 40, 52, 64), vocab: int = 512) -> list[list[int]]:
    """Prompts of varied lengths without repeated tokens.

    In layer 0 a key's bias depends on its token only, so a repeated token ties exactly with its copy
    and the keep window's choice between them rests on the last bit of two separately rounded GEMMs.
    """
    rng = random.Random(seed)
    return [rng.sample(range(3, vocab), n) for n in lengths]


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


@pytest.mark.parametrize("preset", CONFIGS)
def test_greedy_parity(checkpoints, prompts, preset):
    path = checkpoints(preset)
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
    check_greedy_parity(reference, got, name=preset)


def evicting_layers(llm) -> int:
    """How many attention layers evict keys in the cache (see vllm_doge.keep_window)."""

    def count(model):
        impls = [m.impl for m in model.modules() if hasattr(m, "impl") and hasattr(m, "kv_cache")]
        return sum(bool(getattr(getattr(impl, "_kw_config", None), "evict", False)) for impl in impls)

    return sum(llm.apply_model(count))


@pytest.mark.parametrize(("preset", "evicts"), [("keep-window", True), ("moe-keep-window", True), ("sliding", False)])
def test_keep_window_without_prefix_caching(checkpoints, prompts, preset, evicts):
    """Prefix caching off: the keep window evicts keys in the cache (no sliding window) instead of
    recomputing decode rows; chunked prefill splits the long prompts."""
    path = checkpoints(preset)
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    options = dict(enable_prefix_caching=False, enable_chunked_prefill=True, max_num_batched_tokens=48)
    with engine(path, **options) as llm:
        assert (evicting_layers(llm) > 0) == evicts
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
    check_greedy_parity(reference, got, name=f"evict-{preset}")


def test_resolves_native_class(checkpoints):
    """With the plugin installed, vLLM picks vllm_doge's model, not the Transformers fallback."""
    with engine(checkpoints("dense-gqa")) as llm:
        names = llm.apply_model(lambda model: type(model).__module__ + "." + type(model).__name__)
    assert names == ["vllm_doge.model.DogeForCausalLM"]


def counter(llm, fragment: str) -> float:
    """Sum of the engine's counters whose name contains `fragment` (needs disable_log_stats=False)."""
    return sum(getattr(m, "value", 0) for m in llm.llm_engine.get_metrics() if fragment in m.name)


def test_prefix_caching_shared_prefixes(checkpoints):
    """Requests sharing long prefixes hit the prefix cache (whole blocks of folded keys, past the keep
    window) and still match."""
    path = checkpoints("keep-window")
    rng = random.Random(1)
    shared = rng.sample(range(3, 512), 90)
    tails = rng.sample(sorted(set(range(3, 512)) - set(shared)), 20)
    prompts = [shared[:n] + tails[5 * i : 5 * i + 5] for i, n in enumerate((64, 70, 75, 90))]
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path, enable_prefix_caching=True, block_size=32, disable_log_stats=False) as llm:
        vllm_greedy(llm, prompts[:1], MAX_TOKENS)  # fills the cache with the shared blocks
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
        hits = counter(llm, "prefix_cache_hits")
    assert hits >= 4 * 64, f"expected the shared blocks to come from the prefix cache, got {hits} hit tokens"
    check_greedy_parity(reference, got, name="prefix-cache")


@pytest.mark.parametrize("preset", ["keep-window", "moe"])
def test_chunked_prefill(checkpoints, prompts, preset):
    """A 32-token batch budget splits every long prompt into chunks that start mid-sequence."""
    path = checkpoints(preset)
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path, enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
    check_greedy_parity(reference, got, name=f"chunked-{preset}")


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "evicting"])
def test_preemption(checkpoints, prefix_caching):
    """A KV cache of a few blocks forces preemption and recomputation; outputs must not change (with
    eviction: the recomputed blocks are evicted anew)."""
    path = checkpoints("keep-window")
    prompts = make_prompts(seed=2, lengths=(40, 45, 50, 55, 60, 62, 64, 30))
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    options = dict(num_gpu_blocks_override=8, block_size=32, max_model_len=128, max_num_seqs=8)
    with engine(path, disable_log_stats=False, enable_prefix_caching=prefix_caching, **options) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
        preempted = counter(llm, "preempt")
    assert preempted > 0, "the tiny KV cache was meant to force preemption"
    check_greedy_parity(reference, got, name="preemption")


@pytest.mark.slow
def test_torch_compile(checkpoints, prompts):
    """The default compiled mode (no enforce_eager) on a CDMoE model with a keep window."""
    path = checkpoints("moe-keep-window")
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path, enforce_eager=False) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
    check_greedy_parity(reference, got, name="compiled")


def test_multiprocess_engine(checkpoints, prompts, monkeypatch):
    """The default engine layout: the engine core runs in its own process, the plugin loads there too."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    path = checkpoints("dense-gqa")
    reference = reference_greedy(path, prompts[:4], MAX_TOKENS)
    with engine(path) as llm:
        got = vllm_greedy(llm, prompts[:4], MAX_TOKENS)
    check_greedy_parity(reference, got, name="multiprocess")


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel",
    # vLLM's CPU runner creates the pipeline's intermediate-tensor buffers only in its compile warm-up,
    # which enforce_eager skips: PP on CPU needs the compiled mode.
    [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2, enforce_eager=False)],
    ids=["tp2", "pp2"],
)
def test_parallel(checkpoints, prompts, monkeypatch, parallel):
    """Two CPU workers: TP shards heads (each rank folds its own kv heads' dt_proj, the routed experts
    are added on rank 0 only), PP splits the layers. Outputs equal the single-process reference."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    # The CPU build binds each worker to its own NUMA node unless told which cores to use.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    path = checkpoints("moe-keep-window")
    reference = reference_greedy(path, prompts[:4], MAX_TOKENS)
    with engine(path, **parallel) as llm:
        got = vllm_greedy(llm, prompts[:4], MAX_TOKENS)
    check_greedy_parity(reference, got, name=str(parallel))
