"""doge_hf against transformers' built-in Doge (the oracle), on tiny random fp32 models.

Every model is built with transformers, re-initialised so that every feature changes the output
(A != 0 makes the dynamic mask depend on the key; larger dt_proj; residual scales and norm weights
away from 1; expert tables with std 0.5; a sharpened lm_head so greedy choices are not coin flips),
then the same state dict is loaded into doge_hf with strict=True.

CDMoE is the one place where doge_hf differs from transformers on purpose: transformers' router does
`router_gate(h).view(2, bsz*seq_len, -1)`, which pairs the logits of different tokens during prefill.
With batch 1 and ONE token per forward it routes per token, so that is the oracle for CDMoE.
"""

import copy
import functools
import math

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

import doge_hf
from tolerances import assert_clearly_apart, assert_logits_close

# Logits are compared with tolerances.assert_logits_close (fp32 rounding relative to the logits' scale:
# ours vs transformers, ours alone vs in a batch, ours saved and loaded), and changes that must show with
# tolerances.assert_clearly_apart (more than 100 times that tolerance).

VOCAB = 128
PAD = 0
PROMPT_LEN = 24
NEW_TOKENS = 26

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=None,
    eos_token_id=None,
)

# Dense configs: name -> overrides of BASE.
DENSE = {
    "gqa_tied_keep8": dict(tie_word_embeddings=True, keep_window_size=8),
    "gqa_untied_plain": dict(tie_word_embeddings=False),
    "mha_untied_sliding10_bias": dict(
        num_key_value_heads=4, tie_word_embeddings=False, sliding_window=10, attention_bias=True, mlp_bias=True
    ),
    "mha_tied_keep8": dict(num_key_value_heads=4, tie_word_embeddings=True, keep_window_size=8),
    "gqa_untied_keep6_sliding12": dict(tie_word_embeddings=False, keep_window_size=6, sliding_window=12),
    "gqa_head_dim_explicit_keep8": dict(hidden_size=66, head_dim=16, keep_window_size=8),
}

MOE = {
    "moe16_top4": dict(is_moe=True, num_experts=16, num_experts_per_tok=4, tie_word_embeddings=True),
    "moe64_top8_keep8_norm": dict(
        is_moe=True, num_experts=64, num_experts_per_tok=8, keep_window_size=8, norm_topk_prob=True
    ),
}


# ---------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two fighting other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fields_of(overrides: dict) -> dict:
    return copy.deepcopy({**BASE, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (tied parameters are visited once)."""
    g = torch.Generator().manual_seed(seed)

    def normal(p, std):
        p.copy_(torch.randn(p.shape, generator=g) * std)

    def uniform(p, lo, hi):
        p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A":
            uniform(p, -2.0, 1.5)
        elif leaf in ("input_residual", "post_attention_residual"):
            uniform(p, 0.5, 1.5)
        elif "norm" in name:  # input/post-attention/final RMSNorm and the per-head q/k norms
            uniform(p, 0.5, 1.5)
        elif "down_embed" in name or "up_embed" in name:
            normal(p, 0.5)
        elif "embed_tokens" in name:
            normal(p, 1.0)
        elif leaf == "bias":
            normal(p, 0.2)
        elif "dt_proj" in name:
            normal(p, 2.0 / math.sqrt(p.shape[1]))
        elif "lm_head" in name:
            normal(p, 5.0 / math.sqrt(p.shape[1]))
        elif p.ndim == 2:
            normal(p, 1.0 / math.sqrt(p.shape[1]))
        else:
            raise AssertionError(f"randomize: no rule for {name}")


def build_pair(overrides: dict, seed: int = 0, kind: str = "DogeForCausalLM"):
    """(transformers model, doge_hf model) with identical weights, both in eval mode."""
    torch.manual_seed(seed)
    ref = getattr(transformers, kind)(transformers.DogeConfig(**fields_of(overrides))).eval()
    randomize(ref, seed)
    ours = getattr(doge_hf, kind)(doge_hf.DogeConfig(**fields_of(overrides))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@functools.lru_cache(maxsize=None)
def pair(name: str):
    return build_pair({**DENSE, **MOE}[name], seed=sum(map(ord, name)))


def ours_with(name: str, **changes):
    """A doge_hf model of config `name` with `changes`, holding the weights of `pair(name)`."""
    overrides = {**{**DENSE, **MOE}[name], **changes}
    model = doge_hf.DogeForCausalLM(doge_hf.DogeConfig(**fields_of(overrides))).eval()
    model.load_state_dict(pair(name)[1].state_dict(), strict=True)
    return model


def prompts(n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] token ids, no id repeated within a row.

    A repeated token has exactly the same layer-0 bias at both of its positions (v depends on the token
    only), and which of two tied keys the keep window keeps is up to torch.topk: transformers' own prefill
    and one-token-at-a-time results then differ (see test_layer0_bias_ties_on_repeated_tokens).
    """
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(VOCAB - 3, generator=g)[:length] + 3 for _ in range(n)])


@torch.no_grad()
def logits(model, ids, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kwargs).logits


@torch.no_grad()
def one_token_at_a_time(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` [1, T] computed one token per forward with a cache (transformers' per-token MoE path)."""
    assert ids.shape[0] == 1
    cache = DynamicCache(config=model.config)
    out = []
    for t in range(ids.shape[1]):
        step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        out.append(step.logits)
    return torch.cat(out, dim=1)


def greedy(model, ids, new_tokens=NEW_TOKENS, **kwargs):
    """Greedy decoding with the cache; returns (sequences, raw logits of each step [b, steps, vocab]).

    Tokens already in a row are banned (`no_repeat_ngram_size=1`, the same for both models): random tiny
    models, tied ones above all, otherwise fall into repeating one token, and a repeated token ties its
    layer-0 bias with its earlier copy, leaving the keep window to torch.topk's tie-breaking. The pad id
    is never generated, so a row continues alike with and without left padding.
    """
    out = model.generate(
        input_ids=ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        no_repeat_ngram_size=1,
        suppress_tokens=[PAD],
        use_cache=True,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------
# dense


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_prefill_logits_match_transformers(name):
    ref, ours = pair(name)
    ids = prompts(2, PROMPT_LEN, seed=1)
    expected = logits(ref, ids)
    got = logits(ours, ids)
    assert_logits_close(got, expected, what=f"{name}: prefill vs transformers")
    # Ours run one token at a time with a cache agrees with the prefill (no token is repeated, see prompts()).
    assert_logits_close(one_token_at_a_time(ours, ids[:1]), expected[:1], what=f"{name}: stepwise vs transformers prefill")


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_greedy_generate_matches_transformers(name):
    ref, ours = pair(name)
    ids = prompts(1, PROMPT_LEN, seed=2)
    seq_ref, logits_ref = greedy(ref, ids)
    seq_ours, logits_ours = greedy(ours, ids)
    assert seq_ref.shape[1] == PROMPT_LEN + NEW_TOKENS
    assert torch.equal(seq_ours, seq_ref)
    assert_logits_close(logits_ours, logits_ref, what=f"{name}: generate() logits vs transformers")


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_left_padded_batch_generate_matches_transformers(name):
    ref, ours = pair(name)
    rows = [prompts(1, n, seed=10 + n)[0] for n in (PROMPT_LEN, 17, 11)]
    ids, mask = left_pad(rows)
    seq_ref, logits_ref = greedy(ref, ids, attention_mask=mask)
    seq_ours, logits_ours = greedy(ours, ids, attention_mask=mask)
    assert torch.equal(seq_ours, seq_ref)
    assert_logits_close(logits_ours, logits_ref, what=f"{name}: left-padded generate() logits vs transformers")
    # Each row also continues as it does alone (padding is invisible).
    for i, r in enumerate(rows):
        alone, _ = greedy(ours, r[None])
        assert torch.equal(alone[0, len(r) :], seq_ours[i, ids.shape[1] :])


@pytest.mark.parametrize("name", ["gqa_tied_keep8", "gqa_untied_keep6_sliding12"])
def test_dense_left_padded_forward_with_position_ids(name):
    """Forward on a padded batch with explicit position_ids: every real position matches transformers."""
    ref, ours = pair(name)
    rows = [prompts(1, n, seed=20 + n)[0] for n in (PROMPT_LEN, 19, 9)]
    ids, mask = left_pad(rows)
    pos = positions_of(mask)
    expected = logits(ref, ids, attention_mask=mask, position_ids=pos)
    got = logits(ours, ids, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert_logits_close(got[real], expected[real], what=f"{name}: left-padded forward vs transformers")


@pytest.mark.parametrize("name", ["gqa_tied_keep8", "mha_tied_keep8"])
def test_dynamic_mask_matters(name):
    """With A = 0 the bias is a constant: the logits must change clearly, so the parity tests can fail."""
    ref, ours = pair(name)
    ids = prompts(2, PROMPT_LEN, seed=3)
    expected = logits(ref, ids)
    flat = ours_with(name)
    with torch.no_grad():
        for layer in flat.model.layers:
            layer.self_attn.A.zero_()
    assert_clearly_apart(logits(flat, ids), expected, what=f"{name}: A = 0")


@pytest.mark.parametrize("name", ["gqa_tied_keep8", "mha_tied_keep8", "gqa_untied_keep6_sliding12"])
def test_keep_window_matters(name):
    """Same weights, keep window large: equal logits up to the window, clearly different past it."""
    ref, ours = pair(name)
    window = ours.config.keep_window_size
    ids = prompts(2, PROMPT_LEN, seed=4)
    expected = logits(ref, ids)
    wide = logits(ours_with(name, keep_window_size=1024), ids)
    assert_logits_close(wide[:, :window], expected[:, :window], what=f"{name}: wide keep window, within the window")
    assert_clearly_apart(wide[:, window:], expected[:, window:], what=f"{name}: wide keep window, past the window")


@pytest.mark.parametrize("name", ["mha_untied_sliding10_bias", "gqa_untied_keep6_sliding12"])
def test_sliding_window_matters(name):
    ref, ours = pair(name)
    window = ours.config.sliding_window
    ids = prompts(2, PROMPT_LEN, seed=5)
    expected = logits(ref, ids)
    unbounded = logits(ours_with(name, sliding_window=None), ids)
    assert_logits_close(unbounded[:, :window], expected[:, :window], what=f"{name}: no sliding window, within it")
    assert_clearly_apart(unbounded[:, window:], expected[:, window:], what=f"{name}: no sliding window, past it")


def test_layer0_bias_ties_on_repeated_tokens():
    """Why prompts() never repeats a token within a row: layer 0's key bias is a function of the token
    alone (v = v_proj(norm(embedding))), so two copies of a token have exactly equal biases, and which
    copy the keep window keeps is then torch.topk's tie-breaking (it differs between a prefill row and a
    decode row, in transformers as well)."""
    _, ours = pair("gqa_tied_keep8")
    layer = ours.model.layers[0]
    attn = layer.self_attn
    ids = torch.tensor([[5, 9, 5, 7]])
    with torch.no_grad():
        v = attn.v_proj(layer.input_layernorm(ours.model.embed_tokens(ids)))
        bias = torch.exp(attn.A * torch.nn.functional.softplus(attn.dt_proj(v)))  # [1, 4, kv]
    assert torch.equal(bias[0, 0], bias[0, 2])
    assert (bias[0, 0] - bias[0, 1]).abs().min() > 0


# ---------------------------------------------------------------------------------------------------
# CDMoE


@pytest.mark.parametrize("name", list(MOE))
def test_moe_prefill_matches_transformers_one_token_at_a_time(name):
    ref, ours = pair(name)
    ids = prompts(1, PROMPT_LEN, seed=6)
    expected = one_token_at_a_time(ref, ids)
    got = logits(ours, ids)
    assert_logits_close(got, expected, what=f"{name}: prefill vs transformers one token at a time")


@pytest.mark.parametrize("name", list(MOE))
def test_moe_batch_invariance(name):
    _, ours = pair(name)
    batch = prompts(3, PROMPT_LEN, seed=7)
    together = logits(ours, batch)
    for i in range(3):
        assert_logits_close(logits(ours, batch[i : i + 1])[0], together[i], what=f"{name}: row {i} alone vs in a batch")
    # With left padding as well (explicit positions): real tokens do not see the other rows.
    rows = [batch[0], batch[1, :15], batch[2, :7]]
    ids, mask = left_pad(rows)
    padded = logits(ours, ids, attention_mask=mask, position_ids=positions_of(mask))
    for i, r in enumerate(rows):
        alone = logits(ours, r[None])[0]
        assert_logits_close(padded[i, ids.shape[1] - len(r) :], alone, what=f"{name}: row {i} left-padded vs alone")


@pytest.mark.parametrize("name", list(MOE))
def test_transformers_prefill_routing_mixes_tokens(name):
    """Documents the transformers bug doge_hf avoids: its prefill routing pairs halves of different tokens,
    so its prefill logits differ from its own one-token-at-a-time logits, and a row changes with its batch."""
    ref, _ = pair(name)
    ids = prompts(2, PROMPT_LEN, seed=8)
    prefill = logits(ref, ids[:1])
    stepwise = one_token_at_a_time(ref, ids[:1])
    assert_clearly_apart(prefill, stepwise, what=f"{name}: transformers prefill vs its stepwise logits")
    assert_clearly_apart(logits(ref, ids)[0], prefill[0], what=f"{name}: transformers row in a batch vs alone")


@pytest.mark.parametrize("name", list(MOE))
def test_moe_generate_cache_equals_recompute(name):
    ref, ours = pair(name)
    ids = prompts(1, PROMPT_LEN, seed=9)
    steps = 6
    cached, _ = greedy(ours, ids, new_tokens=steps)
    seq = ids
    for _ in range(steps):
        last = logits(ours, seq)[0, -1]
        last[seq[0]] = -math.inf  # the same bans as greedy(): no repeated token, no pad
        last[PAD] = -math.inf
        seq = torch.cat([seq, last.argmax().view(1, 1)], dim=1)
    assert torch.equal(cached, seq)
    # transformers fed one token at a time (per-token routing) gives the same logits along the way.
    assert_logits_close(one_token_at_a_time(ref, seq), logits(ours, seq), what=f"{name}: transformers stepwise vs ours")


def test_moe_routing_matters():
    """The routed experts change the output clearly (zeroing the expert tables is visible)."""
    name = "moe64_top8_keep8_norm"
    _, ours = pair(name)
    ids = prompts(1, PROMPT_LEN, seed=11)
    no_experts = ours_with(name)
    with torch.no_grad():
        for layer in no_experts.model.layers:
            layer.mlp.up_embed.weight.zero_()
    assert_clearly_apart(logits(no_experts, ids), logits(ours, ids), what=f"{name}: expert tables zeroed")


# ---------------------------------------------------------------------------------------------------
# config validation and RoPE spellings


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(is_moe=True, num_experts=15, num_experts_per_tok=4), "num_experts"),
        (dict(is_moe=True, num_experts=16, num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(keep_window_size=0), "keep_window_size"),
        (dict(hidden_size=66), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(rope_parameters={"rope_type": "bogus", "rope_theta": 10000.0}), "rope"),
    ],
)
def test_config_rejects(overrides, field):
    with pytest.raises(doge_hf.DogeConfigError, match=field) as info:
        doge_hf.DogeConfig(**fields_of(overrides))
    assert isinstance(info.value, ValueError)


def test_config_accepts_explicit_head_dim():
    config = doge_hf.DogeConfig(**fields_of(dict(hidden_size=66, head_dim=16)))
    assert config.head_dim == 16
    assert issubclass(doge_hf.DogeConfigError, ValueError)


ROPE_SCALED = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}


@pytest.mark.parametrize(
    "legacy",
    [
        dict(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        dict(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0}),
    ],
)
def test_legacy_rope_spelling(legacy):
    base = DENSE["gqa_tied_keep8"]
    ref, _ = build_pair({**base, "rope_parameters": dict(ROPE_SCALED)}, seed=5)
    ids = prompts(1, PROMPT_LEN, seed=12)
    expected = logits(ref, ids)

    def ours_for(rope_fields):
        model = doge_hf.DogeForCausalLM(doge_hf.DogeConfig(**fields_of({**base, **rope_fields}))).eval()
        model.load_state_dict(ref.state_dict(), strict=True)
        return model

    legacy_logits = logits(ours_for(legacy), ids)
    current = logits(ours_for({"rope_parameters": dict(ROPE_SCALED)}), ids)
    assert_logits_close(legacy_logits, current, what=f"legacy spelling {legacy} vs rope_parameters")
    assert_logits_close(legacy_logits, expected, what=f"legacy spelling {legacy} vs transformers")
    # The scaling is not ignored: default RoPE (theta 500) gives clearly different logits.
    assert_clearly_apart(logits(ours_for({"rope_theta": 500.0}), ids), legacy_logits, what="scaling dropped")


def test_rope_theta_alone():
    base = DENSE["gqa_untied_plain"]
    ref, ours_default = build_pair(base, seed=6)
    ids = prompts(1, PROMPT_LEN, seed=13)
    ours = doge_hf.DogeForCausalLM(doge_hf.DogeConfig(**fields_of({**base, "rope_theta": 50.0}))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.config.rope_parameters["rope_theta"] == 50.0
    got = logits(ours, ids)
    assert_clearly_apart(got, logits(ours_default, ids), what="rope_theta 50 vs the default")
    ref_theta = transformers.DogeForCausalLM(
        transformers.DogeConfig(**fields_of({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 50.0}}))
    ).eval()
    ref_theta.load_state_dict(ref.state_dict(), strict=True)
    assert_logits_close(got, logits(ref_theta, ids), what="rope_theta 50 vs transformers")


# ---------------------------------------------------------------------------------------------------
# save / load and sequence classification


def config_fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "architectures")}


def assert_clean(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info.get(key))


SAVE_LOAD = ["gqa_tied_keep8", "gqa_untied_keep6_sliding12", "moe16_top4"]


@pytest.mark.parametrize("name", SAVE_LOAD)
def test_save_pretrained_round_trip(name, tmp_path):
    _, ours = pair(name)
    ids = prompts(1, PROMPT_LEN, seed=14)
    expected = logits(ours, ids)
    ours.save_pretrained(tmp_path)

    loaded, info = doge_hf.DogeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean(info)
    loaded.eval()
    assert isinstance(loaded.config, doge_hf.DogeConfig)
    assert config_fields(loaded.config) == config_fields(ours.config)
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied == ours.config.tie_word_embeddings
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Non-persistent buffers (RoPE tables) are rebuilt, not left as allocated memory.
    for key, value in ours.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[key], value), key
    assert_logits_close(logits(loaded, ids), expected, what=f"{name}: saved and loaded")


@pytest.mark.parametrize("name", SAVE_LOAD)
def test_transformers_loads_doge_hf_checkpoint(name, tmp_path):
    ref, ours = pair(name)
    ids = prompts(1, PROMPT_LEN, seed=14)
    expected = logits(ours, ids)
    ours.save_pretrained(tmp_path)
    theirs, info = transformers.DogeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean(info)
    theirs.eval()
    if ours.config.is_moe:
        assert_logits_close(one_token_at_a_time(theirs, ids), expected, what=f"{name}: transformers stepwise, our file")
    else:
        assert_logits_close(logits(theirs, ids), expected, what=f"{name}: transformers, our file")
    for key, value in ref.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key


def test_sequence_classification_matches_transformers():
    overrides = dict(DENSE["gqa_tied_keep8"], num_labels=3)
    ref, ours = build_pair(overrides, seed=7, kind="DogeForSequenceClassification")
    rows = [prompts(1, n, seed=30 + n)[0] for n in (PROMPT_LEN, 16, 5)]
    width = PROMPT_LEN
    ids = torch.full((3, width), PAD, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (3, 3)
    assert_logits_close(got, expected, what="classifier vs transformers")
    # The score is read at the last real token: each row equals its unpadded self.
    with torch.no_grad():
        for i, r in enumerate(rows):
            assert_logits_close(ours(input_ids=r[None]).logits[0], got[i], what=f"classifier row {i} alone vs padded")
    assert_clearly_apart(got[0], got[1], what="classifier rows 0 and 1")
