"""The committed demo checkpoint (`checkpoints/doge-demo`, trained by tools/train_demo.py) served past its
keep window, against doge_hf; and the demo's own arithmetic (tools/serve_demo.py).

The keep-window tests of test_model.py use random weights; these are trained ones, whose biases tie and
spread differently. The prompts are the heads of standard-library files that training held out (text
the model did not see, opening with ordinary code rather than a run of one token: see the README's
known differences), longer than W, and generation goes on past W too.
"""

import json
import math
import pathlib
import sysconfig

import pytest
import torch
from transformers import AutoTokenizer

from parity import attention_path, check_greedy_parity, engine, reference_greedy, vllm_greedy

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "checkpoints" / "doge-demo"
CONTEXT = 512  # what `make demo` serves (--max-model-len)
GENERATED = 100
# Held-out files (tools.train_demo keeps every 25th file out of training) and prompt lengths, bos included:
# one crosses W while generating, the others start past it; the longest fills the context.
PROMPTS = [("base64.py", 60), ("difflib.py", 150), ("plistlib.py", 280), ("smtplib.py", CONTEXT - GENERATED)]


def demo_config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


def held_out_prompts() -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name, length in PROMPTS:
        # the backend encoder (bos prepended by its post-processor): no warning about texts past 2048 tokens
        ids = tokenizer.backend_tokenizer.encode((stdlib / name).read_text(encoding="utf-8")).ids[:length]
        assert len(ids) == length and ids[0] == tokenizer.bos_token_id
        assert len(set(ids[1:5])) > 1, f"{name} opens with a run of one token"
        prompts.append(ids)
    return prompts


def test_demo_window_binds_in_serving_and_training():
    """W below the served context, and training ran with it on sequences longer than W."""
    config, info = demo_config(), json.loads((DEMO / "train_info.json").read_text())
    window = config["keep_window_size"]
    assert window < CONTEXT <= config["max_position_embeddings"]
    assert info["keep_window_size"] == window < info["seq_len"], info
    assert info["steps"] == info["planned_steps"], "training was cut short by its time cap: not reproducible"


def test_prompt_files_were_held_out_of_training():
    from tools.tokenizer import corpus_files
    from tools.train_demo import EVAL_EVERY_NTH_FILE

    from tools.serve_demo import LONG_PROMPT_FILE

    nth = EVAL_EVERY_NTH_FILE
    held_out = {p.name for i, p in enumerate(corpus_files()) if i % nth == nth - 1}
    assert {name for name, _ in PROMPTS} | {LONG_PROMPT_FILE} <= held_out


@torch.no_grad()
def test_window_changes_the_trained_model():
    """The parity below tests the sparse path: with the trained weights, the keep window moves the
    logprobs past W by far more than the parity criterion (1e-3 nats), and not at all before W."""
    from doge_hf import DogeForCausalLM

    window = demo_config()["keep_window_size"]
    ids = torch.tensor([held_out_prompts()[-1]])
    model = DogeForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    sparse = model(ids).logits[0].log_softmax(-1)
    for layer in model.model.layers:
        layer.self_attn.keep_window_size = CONTEXT  # every visible key kept: dense attention
    dense = model(ids).logits[0].log_softmax(-1)
    gap = (sparse - dense).abs().amax(-1)
    assert gap[:window].max() == 0
    assert gap[window:].max() > 0.1, f"the keep window moves the trained model's logprobs by {gap[window:].max():.1e}"


def test_demo_checkpoint_past_the_window():
    """Greedy tokens equal and chosen-token logprobs within 1e-3 nats of doge_hf, fp32, for prompts of
    60 to 412 tokens generating 100 more (up to the whole 512-token context), in one batch."""
    window = demo_config()["keep_window_size"]
    prompts = held_out_prompts()
    assert all(len(p) + GENERATED > window for p in prompts) and max(len(p) for p in prompts) + GENERATED == CONTEXT
    reference = reference_greedy(str(DEMO), prompts, GENERATED)
    with engine(str(DEMO), max_model_len=CONTEXT) as llm:
        # a binding keep window turns prefix caching off (relocated keys): the sparse path is the one served
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        path = attention_path(llm)
        got = vllm_greedy(llm, prompts, GENERATED)
    worst = check_greedy_parity(reference, got, name=f"doge-demo ({path})")
    print(f"doge-demo past W = {window} ({path}): {len(prompts)} prompts, largest logprob gap {worst:.1e} nats")


# ---------------------------------------------------------------- the demo's numbers (no server)


def test_serve_demo_window_and_block_bound(monkeypatch):
    from types import SimpleNamespace

    from tools import serve_demo

    window = demo_config()["keep_window_size"]
    assert serve_demo._keep_window(DEMO, CONTEXT) == window
    assert serve_demo._keep_window(DEMO, window) is None  # no query sees more than W keys

    metrics = (
        '# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
        'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="1001",prefix_caching_hash_algo="sha256"} 1.0\n'
    )
    blocks = serve_demo.KvBlocks("http://unused")
    monkeypatch.setattr(blocks, "_metrics", lambda: metrics)
    assert blocks.read_config() and (blocks.block_size, blocks.total) == (32, 1000)
    blocks._decoding_at = 10.0
    # (time, running, usage): idle samples do not count; the prefill step's blocks, then decoding's
    blocks.record([(9.0, 0.0, 0.5), (9.5, 1.0, 0.013), (10.5, 1.0, 0.005), (11.0, 1.0, 0.006), (12.0, 0.0, 0.0)])
    assert (blocks.peak, blocks.decode_peak) == (13, 6)
    usage = SimpleNamespace(prompt_tokens=412, completion_tokens=96)
    line = serve_demo._answer_line(usage, 2.0, window, blocks)
    bound = math.ceil((window + 1) / 32) + 1
    assert f"{412 + 96 - window} past the keep window W = {window}" in line and "(48 tok/s)" in line
    assert "while decoding (sampled from /metrics): at most 6 blocks of 32 tokens (13 at the prefill step)" in line
    assert f"ceil((W+1)/32)+1 = {bound}, 16 without a window" in line
    short = serve_demo._answer_line(SimpleNamespace(prompt_tokens=20, completion_tokens=64), 1.0, window, blocks)
    assert f"0 past the keep window W = {window}" in short
