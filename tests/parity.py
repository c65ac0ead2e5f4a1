"""Greedy parity between vLLM and the doge_hf reference, in the spirit of vLLM's check_logprobs_close."""

import gc
from contextlib import contextmanager

import torch

Sample = tuple[list[int], list[dict[int, float]]]  # generated tokens, per-step {token: logprob}


@torch.no_grad()
def reference_greedy(
    path: str, prompts: list[list[int]], max_tokens: int, top: int = 5, dtype: torch.dtype = torch.float32,
    model_class=None,
) -> list[Sample]:
    """doge_hf greedy decoding (with its KV cache), one prompt at a time, with per-step top logprobs.
    Legacy-format checkpoints run on doge_hf's legacy reference; `model_class` picks another model."""
    from doge_format import read_checkpoint
    from doge_hf import DogeForCausalLM
    from doge_hf.legacy import LegacyDogeForCausalLM

    if model_class is None:
        model_class = LegacyDogeForCausalLM if read_checkpoint(path).legacy else DogeForCausalLM
    model = model_class.from_pretrained(path, dtype=dtype).eval()
    samples = []
    for prompt in prompts:
        # A plain argmax loop over the model's KV cache: no logits processors (generate()'s
        # min_new_tokens would ban EOS, where vLLM's ignore_eos only keeps going).
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens, steps = [], []
        for _ in range(max_tokens):
            logprobs = out.logits[0, -1].float().log_softmax(-1)
            token = int(logprobs.argmax())
            best = logprobs.topk(top)
            steps.append(dict(zip(best.indices.tolist(), best.values.tolist())))
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        samples.append((tokens, steps))
    return samples


def vllm_greedy(llm, prompts: list[list[int]], max_tokens: int, top: int = 5, lora_request=None) -> list[Sample]:
    """`lora_request`: one LoRARequest for all prompts, or one per prompt (None: the base model)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=top)
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request
    )
    samples = []
    for out in outputs:
        completion = out.outputs[0]
        steps = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
        samples.append((list(completion.token_ids), steps))
    return samples


def check_greedy_parity(reference: list[Sample], actual: list[Sample], atol: float = 1e-3, name: str = "vllm") -> float:
    """Tokens must be identical, and each chosen token's logprob within `atol` nats of the reference.

    1e-3 nats is the criterion the project states for fp32 parity. It is a margin over rounding, not a
    guess: two fp32 implementations differ by at most ~36 eps x max|logit| per logit (tests/tolerances.py),
    so by ~72 eps x 40 = 3.4e-4 for a logprob of these builder models (|logits| up to ~40); measured gaps
    are 1e-5..2e-5. A wrong kept set, mask or routing moves logprobs by 1e-2..1 (test_keep_window's
    and test_build_checkpoint's ablations).

    Returns the largest logprob gap seen. On a token mismatch the message says whether the pick was
    at least a near-tie in the reference (which would point to numerics rather than a logic error).
    """
    worst = 0.0
    for i, ((ref_tokens, ref_steps), (got_tokens, got_steps)) in enumerate(zip(reference, actual, strict=True)):
        for step, (r, g) in enumerate(zip(ref_tokens, got_tokens, strict=True)):
            if r != g:
                ref_lp = ref_steps[step]
                raise AssertionError(
                    f"{name}: prompt {i} step {step}: token {g} != reference {r} "
                    f"(reference logprobs: chosen {ref_lp.get(r):.5f}, vllm's pick {ref_lp.get(g, float('-inf')):.5f}); "
                    f"reference {ref_tokens}, got {got_tokens}"
                )
            gap = abs(ref_steps[step][r] - got_steps[step][g])
            assert gap <= atol, f"{name}: prompt {i} step {step}: logprob gap {gap:.2e} > {atol}"
            worst = max(worst, gap)
    return worst


def check_logprobs_close(reference: list[Sample], actual: list[Sample], name: str = "vllm") -> int:
    """vLLM's criterion for lower-precision runs (its tests' check_logprobs_close): greedy tokens equal
    until a first divergence, where each side's pick must be among the other's top logprobs; the rest
    of that sequence is not compared. Returns how many sequences diverged."""
    diverged = 0
    for i, ((ref_tokens, ref_steps), (got_tokens, got_steps)) in enumerate(zip(reference, actual, strict=True)):
        for step, (r, g) in enumerate(zip(ref_tokens, got_tokens, strict=True)):
            if r != g:
                assert g in ref_steps[step] and r in got_steps[step], (
                    f"{name}: prompt {i} step {step}: {g} vs reference {r}, not in each other's top "
                    f"{len(ref_steps[step])} (reference {ref_steps[step]}, got {got_steps[step]})"
                )
                diverged += 1
                break
    return diverged


def error_chain(error: BaseException) -> list[str]:
    """`type: message` of an exception and of everything it was raised from (the engine wraps errors)."""
    chain = []
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return chain


def attention_path(llm) -> str:
    """The attention path the plugin chose for an engine: "DOGE_ATTN" (its own backend) or "fold"."""
    return llm.llm_engine.vllm_config.additional_config["doge_attention"]


@contextmanager
def engine(path: str, **kwargs):
    """A vLLM engine for a tiny fp32 model, shut down on exit so the next one can start."""
    from vllm import LLM

    options = dict(dtype="float32", gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True, seed=0)
    options.update(kwargs)
    llm = LLM(model=path, **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
