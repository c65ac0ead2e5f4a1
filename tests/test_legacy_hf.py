"""The legacy SmallDoge format (doge_hf.legacy) and its converter (doge_hf.legacy_convert).

Oracle: `reference_logits` below, a straightforward float64 forward pass over the checkpoint's tensors written
from the published remote code's equations (per-attention-head mask, no q/k norm, pre/post residual scales,
dynamic NTK, dynamic_mask_ratio, per-token CDMoE with a brute-force search over the whole expert grid). It
shares no code with doge_hf.legacy.
"""

import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from doge_hf.legacy import (LegacyDogeConfig, LegacyDogeConfigError, LegacyDogeForCausalLM, build_legacy_checkpoint,
                            is_legacy_checkpoint, legacy_config_dict)
from doge_hf.legacy_convert import (QK_NORM_REASON, conversion_obstacles, convert_state_dict, load_legacy, main,
                                    transformers_config)
from tolerances import assert_clearly_apart, assert_logits_close

PRESETS = ["dense-gqa", "dense-mha", "moe"]
PAD = 2
# Distinct token ids (layer 0's bias depends on the token only; distinct ids avoid exact ties in rankings).
IDS = torch.tensor([[0] + [5 + (i * 37) % 500 for i in range(23)]])
LOWEST32 = torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """legacy(preset, seed=0, **options) -> directory of a tiny legacy checkpoint, built once per module."""
    root = tmp_path_factory.mktemp("legacy")
    built = {}

    def get(preset, seed=0, **options):
        key = (preset, seed, json.dumps(options, sort_keys=True))
        if key not in built:
            name = f"{preset}-{seed}-{len(built)}"
            built[key] = build_legacy_checkpoint(root / name, preset, seed, **options)
        return built[key]

    return get


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
    with pytest.raises(LegacyDogeConfigError, match="tie_word_embeddings"):
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
    with pytest.raises(LegacyDogeConfigError, match="keep_window_size"):
        logits(model, IDS[:, :17])


# ---------------------------------------------------------------------------------------------------------
# Config and detection


@pytest.mark.parametrize("overrides, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=66), "hidden_size"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(dynamic_mask_ratio=1.0), "dynamic_mask_ratio"),
    (dict(dynamic_mask_ratio=0.2, keep_window_size=64), "dynamic_mask_ratio"),
    (dict(is_moe=True, num_experts=60), "num_experts"),
    (dict(is_moe=True, num_experts=64, num_experts_per_tok=65), "num_experts_per_tok"),
    (dict(expert_index="first"), "expert_index"),
    (dict(architectures=["DogeForSequenceClassification"]), "architectures"),
])
def test_config_rejects(overrides, field):
    fields = {k: v for k, v in legacy_config_dict("dense-gqa").items() if k != "torch_dtype"}
    with pytest.raises(LegacyDogeConfigError, match=f"`{field}`"):
        LegacyDogeConfig(**{**fields, **overrides})


def test_config_reads_published_layout(legacy):
    config = LegacyDogeConfig.from_pretrained(legacy("dense-gqa"))
    assert (config.num_key_value_heads, config.tie_word_embeddings, config.dynamic_mask_ratio) == (2, True, 0.0)
    assert config.rope_scaling["rope_type"] == "dynamic" and config.num_cdmmoe_experts == 2048
    # num_key_value_heads absent: MHA (that code's default)
    fields = legacy_config_dict("dense-gqa")
    fields = {k: v for k, v in fields.items() if k not in ("torch_dtype", "num_key_value_heads")}
    assert LegacyDogeConfig(**fields).num_key_value_heads == 4


def test_detection(legacy, checkpoints):
    for preset in PRESETS:
        assert is_legacy_checkpoint(legacy(preset))
    assert not is_legacy_checkpoint(checkpoints("dense-gqa"))  # the transformers format (doge_hf.builder)
    assert is_legacy_checkpoint({"model_type": "doge", "dynamic_mask_ratio": 0.0})
    assert is_legacy_checkpoint({"model_type": "doge", "hidden_bias": False})
    remote = {"AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"}
    assert is_legacy_checkpoint({"model_type": "doge", "auto_map": remote})
    transformers_cfg = json.loads((pathlib.Path(checkpoints("dense-gqa")) / "config.json").read_text())
    assert not is_legacy_checkpoint(transformers_cfg)
    assert not is_legacy_checkpoint({"model_type": "llama", "hidden_bias": False})


def test_transformers_checkpoint_is_refused_by_legacy_loader(checkpoints):
    with pytest.raises(LegacyDogeConfigError, match="word_embed"):
        load(checkpoints("dense-gqa"))


# ---------------------------------------------------------------------------------------------------------
# Converter


def test_converter_cli_refuses_gqa_with_per_head_masks(legacy, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main([str(legacy("dense-gqa")), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "q/k norm" in err and "per-attention-head dynamic mask with GQA" in err and "layer 0 A" in err
    assert not dst.exists()


@pytest.mark.parametrize("preset, options", [("dense-mha", {}), ("dense-gqa", {"share_group_masks": True}),
                                             ("moe", {"share_group_masks": True})])
def test_converter_refuses_only_for_qk_norm_when_masks_merge(legacy, preset, options, capsys, tmp_path):
    config, state = load_legacy(legacy(preset, **options))
    assert conversion_obstacles(config, state) == [QK_NORM_REASON]
    assert main([str(legacy(preset, **options)), "--check"]) == 2
    assert "q/k norm" in capsys.readouterr().out
    assert main([str(legacy(preset, **options)), str(tmp_path / "out")]) == 2
    assert "no exact transformers-format equivalent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset, options", [("dense-mha", {}), ("dense-gqa", {"share_group_masks": True}),
                                             ("moe", {"share_group_masks": True})])
def test_everything_but_qk_norm_maps_exactly(legacy, preset, options):
    """With q_norm/k_norm replaced by identities, doge_hf on the converted tensors reproduces the legacy logits:
    q/k norm is the only obstacle. With RMSNorm (weights 1) in place, the logits move: the refusal is needed."""
    import doge_hf

    path = legacy(preset, **options)
    config, state = load_legacy(path)
    model = doge_hf.DogeForCausalLM(doge_hf.DogeConfig(**transformers_config(config))).eval()
    missing, unexpected = model.load_state_dict(convert_state_dict(config, state), strict=False)
    assert not unexpected
    assert sorted({m.split(".")[-2] for m in missing} - {"lm_head"}) == ["k_norm", "q_norm"]
    if config.tie_word_embeddings:
        model.tie_weights()
    expected = logits(load(path), IDS)
    with_norm = logits(model, IDS)
    for layer in model.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    assert_close(logits(model, IDS), expected, f"{preset}: converted, q/k norm removed, vs legacy")
    assert_clearly_apart(with_norm, expected, what=f"{preset}: converted with q/k norm vs legacy")


def test_converter_names_every_obstacle(legacy):
    config, state = load_legacy(legacy("moe", router_bias=True))
    reasons = conversion_obstacles(config, state)
    assert any("router_gate.bias" in r for r in reasons)
    config, state = load_legacy(legacy("dense-mha", dynamic_mask_ratio=0.3))
    assert any("dynamic_mask_ratio" in r for r in conversion_obstacles(config, state))


def test_converter_rejects_non_legacy_input(checkpoints, tmp_path, capsys):
    assert main([str(checkpoints("dense-gqa")), str(tmp_path / "x")]) == 2
    assert "not a legacy Doge checkpoint" in capsys.readouterr().err
