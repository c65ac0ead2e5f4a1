"""The reference model of the legacy SmallDoge format (doge_hf.legacy).

Oracle: `reference_logits` below, a straightforward float64 forward pass over the checkpoint's tensors written
from the published remote code's equations (per-attention-head mask, no q/k norm, pre/post residual scales,
dynamic NTK, dynamic_mask_ratio, per-token CDMoE with a brute-force search over the whole expert grid). It
shares no code with doge_hf.legacy.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from doge_format import DogeConfigError
from doge_hf.legacy import LegacyDogeConfig, LegacyDogeForCausalLM
from tolerances import assert_clearly_apart, assert_logits_close

PRESETS = ["dense-gqa", "dense-mha", "moe"]
PAD = 2
# Distinct token ids (layer 0's bias depends on the token only; distinct ids avoid exact ties in rankings).
IDS = torch.tensor([[0] + [5 + (i * 37) % 500 for i in range(23)]])
LOWEST32 = torch.finfo(torch.float32).min


def load(path):
    return LegacyDogeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(input_ids=ids, use_cache=False, **kwargs).logits


# ---------------------------------------------------------------------------------------------------------
# The oracle


def reference_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of one sequence, in float64, from config.json and model.safetensors alone."""
    cfg = json.loads((path / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    H, KV, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d = cfg.get("head_dim") or hidden // H
    G, eps, T = H // KV, cfg["rms_norm_eps"], ids.shape[1]

    def linear(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def rms(x, name):
        return sd[name + ".weight"] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def swiglu(h, prefix):
        gate = linear(h, prefix + "gate_proj")
        return linear(gate * torch.sigmoid(gate) * linear(h, prefix + "up_proj"), prefix + "down_proj")

    # RoPE for one forward call over positions 0..T-1 (dynamic NTK: the base of length T once T > M).
    theta, M = cfg["rope_theta"], cfg["max_position_embeddings"]
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "dynamic" and T > M:
        f = scaling["factor"]
        theta = theta * (f * T / M - (f - 1)) ** (d / (d - 2))
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos(), angle.sin()

    def rope(t):  # [T, heads, d], halves (i, i + d/2) rotated together
        a, b = t[..., : d // 2], t[..., d // 2 :]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    ratio = cfg.get("dynamic_mask_ratio", 0.0)
    causal = torch.ones(T, T).tril().bool()
    x = sd["model.word_embed.weight"][ids[0]]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, p + "pre_layernorm")
        q = rope(linear(h, p + "self_attn.q_proj").view(T, H, d))
        k = rope(linear(h, p + "self_attn.k_proj").view(T, KV, d))
        v = linear(h, p + "self_attn.v_proj").view(T, KV, d)
        dt = linear(v.reshape(T, KV * d), p + "self_attn.dt_proj")  # [T keys, H]: one row per ATTENTION head
        bias = torch.exp(sd[p + "self_attn.A"] * F.softplus(dt))
        heads = []
        for head in range(H):
            b = bias[:, head].clone()
            n = int(T * ratio)
            if 0 < ratio < 1 and n > 0:  # below the n-th smallest bias of the call's keys: the fp32 minimum
                b[b < b.sort().values[n - 1]] = LOWEST32
            scores = q[:, head] @ k[:, head // G].T / math.sqrt(d) + b[None, :]
            scores = scores + torch.where(causal, 0.0, LOWEST32)
            heads.append(scores.softmax(-1) @ v[:, head // G])
        x = sd[p + "pre_residual.weight"] * x + linear(torch.cat(heads, dim=-1), p + "self_attn.o_proj")

        h = rms(x, p + "post_layernorm")
        out = swiglu(h, p + "feed_forward.")
        if cfg.get("is_moe"):
            E, top = cfg["num_experts"], cfg["num_experts_per_tok"]
            K = math.isqrt(E)
            routed = []
            for t in range(T):
                logit = linear(h[t], p + "feed_forward.router_gate")
                grid = (logit[:K, None] + logit[None, K:]).flatten()  # grid[a*K + b] = x_a + y_b
                scores, experts = grid.topk(top)
                w = scores.softmax(-1)
                pre = sd[p + "feed_forward.down_embed.weight"][experts] @ h[t]
                routed.append((w * pre * torch.sigmoid(pre)) @ sd[p + "feed_forward.up_embed.weight"][experts])
            out = out + torch.stack(routed)
        x = sd[p + "post_residual.weight"] * x + out
    x = rms(x, "model.final_layernorm")
    head = sd["lm_head.weight"] if not cfg.get("tie_word_embeddings", True) else sd["model.word_embed.weight"]
    return x @ head.T


def assert_close(actual, expected, what):
    """fp32 logits against the fp64 oracle, or against each other: tolerances.assert_logits_close."""
    assert_logits_close(actual, expected, what=what)


# ---------------------------------------------------------------------------------------------------------
# Forward, generation, weights


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_reference(legacy, preset):
    path = legacy(preset)
    assert_close(logits(load(path), IDS)[0], reference_logits(path, IDS), f"{preset} vs the fp64 oracle")


@pytest.mark.parametrize("preset", PRESETS)
def test_per_head_mask_matters(legacy, preset, tmp_path):
    """The checkpoints have non-trivial masks: a constant bias (A = 0), or one shared by a group's heads, moves
    the logits by whole units. So agreement with the oracle really checks the per-attention-head mask."""
    path = legacy(preset)
    base = logits(load(path), IDS)
    sd = load_file(path / "model.safetensors")
    variants = {"A=0": {k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("self_attn.A")}}
    cfg = json.loads((path / "config.json").read_text())
    groups = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    if groups > 1:
        variants["group-shared"] = {k: v[torch.arange(v.shape[0]) // groups * groups]
                                    for k, v in sd.items() if k.endswith(("self_attn.A", "dt_proj.weight"))}
    for label, changed in variants.items():
        out = tmp_path / label
        out.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            (out / f).write_bytes((path / f).read_bytes())
        save_file({**sd, **changed}, out / "model.safetensors")
        assert_clearly_apart(logits(load(out), IDS), base, what=f"{preset}: {label}")


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_generate_equals_full_prefill(legacy, preset):
    model = load(legacy(preset))
    out = model.generate(IDS[:, :12], max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True,
                         no_repeat_ngram_size=1, suppress_tokens=[PAD], pad_token_id=PAD,
                         return_dict_in_generate=True, output_logits=True)
    steps = torch.stack(out.logits, dim=1)
    full = logits(model, out.sequences)[:, 11:-1]
    assert_close(steps, full, f"{preset}: cached generate vs full prefill")
    # and the full forward over the generated sequence is the oracle's
    assert_close(full[0], reference_logits(legacy(preset), out.sequences)[11:-1], f"{preset}: generated vs the oracle")


def test_left_padded_batch_generates_like_single_rows(legacy):
    model = load(legacy("dense-gqa"))
    rows = [IDS[0, :12], IDS[0, 3:9]]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), PAD)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    kwargs = dict(max_new_tokens=6, do_sample=False, no_repeat_ngram_size=1, suppress_tokens=[PAD], pad_token_id=PAD)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], **kwargs)
        assert batch[i, width:].tolist() == alone[0, len(r):].tolist()


def test_tied_by_default(legacy):
    path = legacy("dense-gqa")
    assert "tie_word_embeddings" not in json.loads((path / "config.json").read_text())
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = load(path)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.word_embed.weight.data_ptr()
    assert LegacyDogeConfig().tie_word_embeddings is True


def test_untied_checkpoint(legacy):
    path = legacy("dense-mha", tie_word_embeddings=False)
    assert "lm_head.weight" in load_file(path / "model.safetensors")
    model = load(path)
    assert model.lm_head.weight.data_ptr() != model.model.word_embed.weight.data_ptr()
    assert_close(logits(model, IDS)[0], reference_logits(path, IDS), "untied vs the oracle")


def test_untied_without_lm_head_is_refused(legacy, tmp_path):
    path = legacy("dense-gqa")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(DogeConfigError, match="tie_word_embeddings"):
        load(tmp_path)


def test_router_bias_detected_from_keys(legacy):
    path = legacy("moe", router_bias=True)
    assert any(k.endswith("router_gate.bias") for k in load_file(path / "model.safetensors"))
    model = load(path)
    assert model.config.router_bias is True
    assert_close(logits(model, IDS)[0], reference_logits(path, IDS), "router bias vs the oracle")


def test_dynamic_mask_ratio_matches_reference(legacy):
    """r > 0: keys below the n-th smallest bias of the forward call are masked (the published code's rule)."""
    path = legacy("dense-gqa", dynamic_mask_ratio=0.3)
    out = logits(load(path), IDS)
    assert_close(out[0], reference_logits(path, IDS), "dynamic_mask_ratio 0.3 vs the oracle")
    assert_clearly_apart(out, logits(load(legacy("dense-gqa")), IDS), what="dynamic_mask_ratio 0.3 vs 0")


def test_dynamic_ntk_beyond_max_position(legacy):
    """Past max_position_embeddings the base grows with the call's length (M = 16 here, 24 tokens)."""
    path = legacy("dense-mha", max_position_embeddings=16,
                  rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16})
    model = load(path)
    assert_close(logits(model, IDS)[0], reference_logits(path, IDS), "dynamic NTK past M vs the oracle")
    # below M again: the original frequencies come back (the legacy code's reset rule)
    assert_close(logits(model, IDS[:, :10])[0], reference_logits(path, IDS[:, :10]), "back below M vs the oracle")


def test_keep_window_size_bounds_the_context(legacy):
    model = load(legacy("moe", keep_window_size=16))
    logits(model, IDS[:, :16])
    with pytest.raises(DogeConfigError, match="keep_window_size"):
        logits(model, IDS[:, :17])
