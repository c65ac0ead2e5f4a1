"""The tiny-checkpoint builder, the local tokenizer and the demo checkpoint.

Oracles: transformers' built-in Doge (nobody here wrote it) for the round trip, and ablations measured on
doge_hf for "the re-initialisation makes every feature matter".
"""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer

import doge_hf
from tools.build_checkpoint import PRESETS, build_checkpoint
from tolerances import assert_clearly_apart, assert_logits_close

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "checkpoints" / "doge-demo"
DENSE = ["dense-gqa", "dense-mha-tied", "keep-window", "sliding"]
MOE = ["moe", "moe-keep-window"]
# 40 distinct token ids. Layer 0's key bias depends only on the token, so a repeated token ties with
# itself; at the keep-window boundary a tie makes the kept set implementation-defined (torch.topk).
DISTINCT = torch.tensor([[0] + [5 + (i * 37) % 500 for i in range(39)]])
CODE = (
    "import os\n\n\ndef walk(top, topdown=True):\n    for name in os.listdir(top):\n"
    "        path = os.path.join(top, name)\n        if os.path.isdir(path):\n            yield path\n"
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """preset -> checkpoint dir, each built once per session (seed 0)."""
    root = tmp_path_factory.mktemp("doge-builder")
    built = {}

    def get(preset):
        if preset not in built:
            built[preset] = build_checkpoint(root / preset, preset, seed=0)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def tokenizer(checkpoints):
    return AutoTokenizer.from_pretrained(checkpoints("dense-gqa"))


def ids_of(tokenizer, text, limit=None):
    ids = tokenizer(text).input_ids
    return torch.tensor([ids[:limit] if limit else ids])


def load(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------- files and config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds(checkpoints, preset):
    path = checkpoints(preset)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "doge"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    tensors = load_file(path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 1, 2)
    if preset == "classifier":
        assert config["architectures"] == ["DogeForSequenceClassification"]
        assert config["num_labels"] == len(config["id2label"]) == 3
        assert tensors["score.weight"].shape == (3, config["hidden_size"])
    else:
        assert config["architectures"] == ["DogeForCausalLM"]
        # a tied lm_head is not stored; an untied one is
        assert ("lm_head.weight" in tensors) == (not config["tie_word_embeddings"])
    if config.get("is_moe"):
        assert tensors["model.layers.0.mlp.up_embed.weight"].shape == (64, config["hidden_size"])


def test_overrides_and_errors(tmp_path):
    path = build_checkpoint(tmp_path / "o", "moe", seed=1, num_hidden_layers=3, num_experts=16, num_experts_per_tok=4)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]) == (3, 16, 4)
    with pytest.raises(ValueError, match="unknown preset"):
        build_checkpoint(tmp_path / "x", "no-such-preset")


# ---------------------------------------------------------------- round trip through both model classes


@pytest.mark.parametrize("preset", DENSE)
def test_roundtrip_dense_matches_transformers(checkpoints, tokenizer, preset):
    path = checkpoints(preset)
    ours, theirs = load(doge_hf.DogeForCausalLM, path), load(transformers.DogeForCausalLM, path)
    prompts = [DISTINCT]  # 40 tokens: longer than both windows (16, 24)
    if preset != "keep-window":  # CODE repeats tokens: ties at the keep-window boundary (see DISTINCT)
        prompts.append(ids_of(tokenizer, CODE, limit=40))
    for ids in prompts:
        with torch.no_grad():
            a, b = ours(ids).logits, theirs(ids).logits
        assert a.isfinite().all()
        # Two fp32 implementations: rounding relative to the logits' scale (|logit| up to ~40 here).
        assert_logits_close(a, b, what=f"{preset}: doge_hf vs transformers, {ids.shape[1]} tokens")
    # loaded weights are exactly the stored ones
    stored = load_file(path / "model.safetensors")
    state = ours.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())


def stepwise_logits(model, ids):
    """Logits of `ids` fed one token at a time through the KV cache."""
    cache, logits = None, []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("preset", MOE)
def test_roundtrip_moe_matches_transformers_token_by_token(checkpoints, preset):
    # transformers routes a prefill with halves of different tokens; one token per forward is unaffected,
    # so our prefill must equal transformers decoding the same tokens one by one.
    path = checkpoints(preset)
    ours, theirs = load(doge_hf.DogeForCausalLM, path), load(transformers.DogeForCausalLM, path)
    with torch.no_grad():
        prefill = ours(DISTINCT).logits
    assert_logits_close(prefill, stepwise_logits(theirs, DISTINCT), what=f"{preset}: prefill vs transformers stepwise")


def test_roundtrip_classifier_matches_transformers(checkpoints, tokenizer):
    path = checkpoints("classifier")
    ours = load(doge_hf.DogeForSequenceClassification, path)
    theirs = load(transformers.DogeForSequenceClassification, path)
    ids = ids_of(tokenizer, CODE, limit=20)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.shape == (1, 3)
    assert_logits_close(a, b, what="classifier: doge_hf vs transformers")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_chat_template(checkpoints, tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
    ]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    ids = tokenizer("def main():\n    pass").input_ids
    assert ids[0] == 0 and 0 not in ids[1:]  # bos prepended once
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def main():\n    pass"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|end_of_text|>"
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|end_of_text|>"
        "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|end_of_text|>"
    )
    config = json.loads((checkpoints("dense-gqa") / "tokenizer_config.json").read_text())
    assert "chat_template" in config  # inside tokenizer_config.json, for loaders that look only there


def test_tokenizer_training_is_deterministic():
    from tools.tokenizer import corpus_files, train_backend

    files = corpus_files(limit_bytes=300_000)
    assert train_backend(300, files).to_str() == train_backend(300, files).to_str()


# ---------------------------------------------------------------- the re-initialisation matters


def key_bias_of_layer0(model, ids):
    """b = exp(A · softplus(dt_proj(v))) for the keys of layer 0: [kv_heads, keys]."""
    layer = model.model.layers[0]
    attn = layer.self_attn
    with torch.no_grad():
        v = attn.v_proj(layer.input_layernorm(model.model.embed_tokens(ids)))
        return torch.exp(attn.A * F.softplus(attn.dt_proj(v)))[0].T


def test_reinit_is_nontrivial(checkpoints, tokenizer):
    path = checkpoints("dense-gqa")
    tensors = load_file(path / "model.safetensors")
    for i in range(2):
        assert (tensors[f"model.layers.{i}.self_attn.A"] != 0).all()
        for name in ("input_residual", "post_attention_residual"):
            residual = tensors[f"model.layers.{i}.{name}"]
            assert residual.std() > 0.1 and not torch.allclose(residual, torch.ones_like(residual))
    model = load(doge_hf.DogeForCausalLM, path)
    bias = key_bias_of_layer0(model, ids_of(tokenizer, CODE, limit=40))
    spread = bias.max(dim=1).values - bias.min(dim=1).values
    assert (spread > 1.0).all(), f"key bias varies too little across keys: {spread}"


def changed_fraction(model, ablate, ids):
    """Fraction of positions whose greedy (argmax) next token changes when `ablate` is applied."""
    with torch.no_grad():
        before = model(ids).logits.argmax(-1)
        ablate(model)
        after = model(ids).logits.argmax(-1)
    return (before != after).float().mean().item()


def attentions(model):
    return [layer.self_attn for layer in model.model.layers]


ABLATIONS = {
    "A=0": (DENSE + MOE, lambda m: [a.A.data.zero_() for a in attentions(m)]),
    "residuals=1": (DENSE, lambda m: [
        (layer.input_residual.data.fill_(1), layer.post_attention_residual.data.fill_(1)) for layer in m.model.layers
    ]),
    "experts=0": (MOE, lambda m: [layer.mlp.up_embed.weight.data.zero_() for layer in m.model.layers]),
    "no keep window": (["keep-window", "moe-keep-window"], lambda m: [
        setattr(a, "keep_window_size", 10**6) for a in attentions(m)
    ]),
    "no sliding window": (["sliding"], lambda m: [setattr(a, "sliding_window", None) for a in attentions(m)]),
}


@pytest.mark.parametrize(
    "preset,ablation", [(p, name) for name, (presets, _) in ABLATIONS.items() for p in presets]
)
def test_each_feature_changes_greedy_tokens(checkpoints, tokenizer, preset, ablation):
    model = load(doge_hf.DogeForCausalLM, checkpoints(preset))
    ids = ids_of(tokenizer, CODE * 2, limit=80)
    fraction = changed_fraction(model, ABLATIONS[ablation][1], ids)
    assert fraction > 0.1, f"{ablation} changes only {fraction:.0%} of greedy tokens on {preset}"


def test_tied_model_does_not_echo_its_input(checkpoints, tokenizer):
    # With a large tied embedding the residual stream is the input token and argmax repeats it.
    model = load(doge_hf.DogeForCausalLM, checkpoints("dense-mha-tied"))
    ids = ids_of(tokenizer, CODE * 2, limit=80)
    with torch.no_grad():
        echo = (model(ids).logits.argmax(-1) == ids).float().mean().item()
    assert echo < 0.5


def test_greedy_margins_are_clear(checkpoints, tokenizer):
    # Sharpened lm_head: top-1 minus top-2 logit is usually far above fp32 noise (~1e-5).
    model = load(doge_hf.DogeForCausalLM, checkpoints("dense-gqa"))
    with torch.no_grad():
        top2 = model(ids_of(tokenizer, CODE * 2, limit=80)).logits.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    assert margins.median() > 1.0 and margins.min() > 1e-3


# ---------------------------------------------------------------- determinism and CLI


def test_same_seed_same_tensors(checkpoints, tmp_path):
    first = load_file(checkpoints("moe") / "model.safetensors")
    again = load_file(build_checkpoint(tmp_path / "again", "moe", seed=0) / "model.safetensors")
    other = load_file(build_checkpoint(tmp_path / "other", "moe", seed=1) / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)
    assert (checkpoints("moe") / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tools.build_checkpoint", str(out), "--preset", "keep-window", "--seed", "3",
           "--num-hidden-layers", "3", "--set", "keep_window_size=8"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["keep_window_size"]) == (3, 8)
    expected = load_file(build_checkpoint(tmp_path / "api", "keep-window", seed=3, num_hidden_layers=3,
                                          keep_window_size=8) / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- the trained demo checkpoint


def test_demo_checkpoint_is_small_and_trained():
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= 20 * 2**20
    config = json.loads((DEMO / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] < config["num_attention_heads"]
    model = load(doge_hf.DogeForCausalLM, DEMO)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    assert all((layer.self_attn.A != 0).all() for layer in model.model.layers)
    ids = ids_of(tokenizer, CODE)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.0, f"demo model loss {loss:.2f} on Python source: not trained?"  # random init: ~8.3


# ---------------------------------------------------------------- the logits tolerance is tight enough


MASK_ERRORS = {
    # A = 0 makes b = exp(0) = 1 for every key: a constant per row, which softmax ignores (the mask dropped).
    "mask dropped (A=0)": (lambda a: a.A.data.zero_(), 1000),
    # The mask 0.1% too strong: a bug as small as a wrong constant in its exponent.
    "A 0.1% too large": (lambda a: a.A.data.mul_(1.001), 5),
}


@pytest.mark.parametrize("error", MASK_ERRORS)
@pytest.mark.parametrize("preset", DENSE + MOE)
def test_tolerance_catches_mask_errors(checkpoints, preset, error):
    """The round-trip tolerance (tolerances.LOGITS_K = 512 eps x max|logit|, ~2.5e-3 here) leaves no room
    for a wrong mask: dropping it moves the logits by 8e3..1.6e4 tolerances, and even a 0.1% error in A by
    17..57 (measured; asserted: 1000 and 5)."""
    path = checkpoints(preset)
    with torch.no_grad():
        base = load(doge_hf.DogeForCausalLM, path)(DISTINCT).logits
        model = load(doge_hf.DogeForCausalLM, path)
        change, factor = MASK_ERRORS[error]
        for attention in attentions(model):
            change(attention)
        wrong = model(DISTINCT).logits
    assert_clearly_apart(wrong, base, what=f"{preset}: {error}", factor=factor)
