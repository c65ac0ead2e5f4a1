"""The published SmallDoge (legacy remote-code) format served natively: no trust_remote_code, no conversion.

Per-attention-head masks (one folded bias channel per head of a kv group), no q/k norm, tied-by-default
embeddings, renamed tensors, dynamic-NTK RoPE (plain RoPE within max_position_embeddings)."""

import pytest
import torch

from doge_hf.legacy import LegacyDogeForCausalLM
from parity import check_greedy_parity, check_logprobs_close, engine, reference_greedy, vllm_greedy
from test_model import MAX_TOKENS, make_prompts
from tolerances import assert_logprobs_close, logprob_tolerance


@pytest.fixture(scope="module")
def legacy_checkpoints(legacy):
    return {preset: str(legacy(preset)) for preset in ("dense-gqa", "dense-mha", "moe")}


@torch.no_grad()
def logits_scale(path: str, prompts: list[list[int]], reference) -> float:
    """max |logit| of the legacy reference at the steps that chose the reference tokens."""
    model = LegacyDogeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return max(
        model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].abs().max().item()
        for prompt, (tokens, _) in zip(prompts, reference)
    )


@pytest.mark.parametrize("preset", ["dense-gqa", "dense-mha", "moe"])
def test_legacy_greedy_parity(legacy_checkpoints, preset):
    path = legacy_checkpoints[preset]
    prompts = make_prompts(seed=3)
    reference = reference_greedy(path, prompts, MAX_TOKENS)
    with engine(path) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
        limit = llm.llm_engine.vllm_config.model_config.max_model_len
    # Two fp32 implementations: rule 1 of tolerances.py for logprobs, at the scale of the reference's logits.
    scale = logits_scale(path, prompts, reference)
    worst = check_greedy_parity(reference, got, atol=logprob_tolerance(scale), name=f"legacy-{preset}")
    assert_logprobs_close(worst, 0.0, logits_scale=scale, what=f"legacy-{preset}: worst logprob gap, vLLM vs reference")
    assert limit <= 512, "dynamic-NTK RoPE is exact only within max_position_embeddings"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["dense-gqa", "moe"])
def test_legacy_low_precision(legacy_checkpoints, preset, dtype):
    """bf16 / fp16 against the legacy reference in the same dtype, judged like vLLM's check_logprobs_close."""
    path = legacy_checkpoints[preset]
    prompts = make_prompts(seed=3)
    reference = reference_greedy(path, prompts, MAX_TOKENS, dtype=getattr(torch, dtype))
    with engine(path, dtype=dtype) as llm:
        got = vllm_greedy(llm, prompts, MAX_TOKENS)
    check_logprobs_close(reference, got, name=f"legacy-{preset} {dtype}")


def test_context_capped_to_plain_rope_range(legacy_checkpoints):
    """vLLM would allow factor × max_position_embeddings for dynamic RoPE; we cap to where it is exact."""
    with engine(legacy_checkpoints["dense-gqa"], max_model_len=None, skip_tokenizer_init=True) as llm:
        assert llm.llm_engine.vllm_config.model_config.max_model_len == 512


def test_explicit_longer_context_refused(legacy_checkpoints):
    with pytest.raises(Exception, match=r"max_model_len 1024 > 512: dynamic-NTK RoPE"):
        with engine(legacy_checkpoints["dense-gqa"], max_model_len=1024, skip_tokenizer_init=True):
            pass
