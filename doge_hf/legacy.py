"""The legacy SmallDoge format: checkpoints published with their own remote code (Doge-20M … -320M, their
-Instruct versions, Doge-20M-MoE-Instruct), written here from the equations of that code.

    python -m doge_hf.legacy OUT_DIR [--preset dense-gqa|dense-mha|moe] [--seed 0]     (a tiny checkpoint)

Per decoder layer (H attention heads, KV kv heads, d = head_dim, G = H / KV; no q/k norm):
    x = pre_residual.weight ⊙ x + Attn(pre_layernorm(x))
    x = post_residual.weight ⊙ x + FF(post_layernorm(x))
Attention, for query i and key j ≤ i (causal), attention head h, its kv head h // G:
    b_j[h]  = exp(A[h] · softplus(dt_proj(v_j)[h]))       A: [H], dt_proj: R^{KV·d} → R^H (mask PER ATTENTION HEAD)
    s_ij[h] = q_i[h]·k_j[h//G] / √d + b_j[h]              softmax in fp32
    dynamic_mask_ratio r ∈ (0, 1): per (row, head), with L keys in the forward call, n = int(L·r); keys whose
        b is below the n-th smallest b of all L keys (future and padded keys of the call included) get the
        dtype minimum instead of b. This depends on how a sequence is split into forward calls.
FF: SwiGLU down(act(gate·h) ⊙ up·h) (bias = hidden_bias), or CDMoE (`is_moe`), routed per token:
    K = ⌊√E⌋; x, y = router_gate(h)[:K], router_gate(h)[K:]; candidates x_a + y_b; the top-k scores pick the
    experts a·K + b (the gathered id; every stored version of that code gathers); w = softmax(top-k scores)
    out = SwiGLU(h) + Σ w_i · act(down_embed[e_i]·h) · up_embed[e_i]
RoPE: rotate_half with rope_theta; `rope_scaling` {dynamic, factor f}: when a forward call's largest position
    + 1 = L exceeds the longest length seen so far beyond max_position_embeddings M, the base becomes
    θ·(f·L/M − (f − 1))^(d/(d−2)) (reset to θ when a call stays below M). Below M it is plain RoPE.
`hidden_bias` adds biases to q/k/v/o_proj, dt_proj and gate/up/down_proj; router_gate's bias is detected
from the checkpoint. `tie_word_embeddings` absent from config.json means tied (lm_head not stored).
"""

import argparse
import json
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .builder import BASE_CONFIG
from .cdmoe import DogeCDMoE, DogeMLP
from .layers import RMSNorm, rotate_half

# config.json fields that only the legacy format has (transformers' Doge spells biases attention_bias/mlp_bias).
LEGACY_CONFIG_FIELDS = (
    "dynamic_mask_ratio",
    "hidden_bias",
    "num_cdmmoe_experts",
    "num_cdmmoe_heads",
    "num_cdmmoe_experts_per_head",
    "num_cdmoe_experts",
    "expert_retrieval_size",
)
EXPERT_INDEX_VARIANTS = ("gather",)


class LegacyDogeConfigError(ValueError):
    """A legacy config.json field (or checkpoint) that this implementation cannot run exactly."""


class LegacyDogeConfig(PreTrainedConfig):
    """config.json of the legacy format, with that code's defaults (`tie_word_embeddings` absent = True).

    Two fields are not read from config.json of published checkpoints: `router_bias` is detected from the
    checkpoint's keys by `LegacyDogeForCausalLM.from_pretrained`, and `expert_index` names the CDMoE expert
    ids: "gather" (the gathered product-key id) is the only variant in any stored version of that code; a
    config naming another is refused rather than guessed.
    """

    model_type = "doge"
    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    hidden_bias: bool = False
    hidden_dropout: float | int = 0.0
    hidden_act: str = "silu"
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 2
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    rope_theta: float | int = 10000.0
    rope_scaling: dict | None = None
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_dropout: float | int = 0.0
    dynamic_mask_ratio: float | int = 0.0
    keep_window_size: int | None = None
    is_moe: bool = False
    num_experts: int = 2048
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    router_bias: bool = False
    expert_index: str = "gather"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        validate_legacy_config(self)


def legacy_head_dim(config) -> int:
    return config.head_dim if config.head_dim else config.hidden_size // config.num_attention_heads


def rope_kind(config) -> str:
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def validate_legacy_config(config) -> None:
    """Raise LegacyDogeConfigError naming the first field this implementation cannot run exactly."""

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            value = getattr(config, field, None)
            raise LegacyDogeConfigError(f"legacy Doge config: `{field}` = {value!r}; expected {expected}")

    def positive(field: str) -> None:
        value = getattr(config, field)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "a positive integer")

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
        positive(field)
    heads = config.num_attention_heads
    need(heads % config.num_key_value_heads == 0, "num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    if config.head_dim is None:
        need(config.hidden_size % heads == 0, "hidden_size", f"a multiple of num_attention_heads ({heads})")
    else:
        positive("head_dim")
    need(legacy_head_dim(config) % 2 == 0, "head_dim", "an even head size (RoPE rotates pairs)")
    need(config.hidden_act in ACT2FN, "hidden_act", "an activation transformers knows (silu, gelu, ...)")
    need(config.rope_scaling is None or isinstance(config.rope_scaling, dict), "rope_scaling", "null or a dict")
    need(rope_kind(config) in ("default", "dynamic"), "rope_scaling",
         "rope_type 'dynamic' or none (the only types the published checkpoints use)")
    if rope_kind(config) == "dynamic":
        factor = config.rope_scaling.get("factor")
        need(isinstance(factor, (int, float)) and factor >= 1, "rope_scaling", "a `factor` >= 1 for dynamic RoPE")
    ratio = config.dynamic_mask_ratio
    need(isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0, "dynamic_mask_ratio",
         "a number in [0, 1) (code versions differ at 1.0)")
    need(ratio == 0.0 or config.keep_window_size is None, "dynamic_mask_ratio",
         "0.0 when `keep_window_size` is set (the code versions with a keep window count the masked keys "
         "differently, and the config does not say which one wrote it)")
    keep = config.keep_window_size
    need(keep is None or (isinstance(keep, int) and keep >= 1), "keep_window_size", "null or a positive integer")
    need(config.expert_index in EXPERT_INDEX_VARIANTS, "expert_index", f"one of {EXPERT_INDEX_VARIANTS}")
    architectures = config.architectures or ["DogeForCausalLM"]
    need(list(architectures) == ["DogeForCausalLM"], "architectures", '["DogeForCausalLM"]')
    if config.is_moe:
        positive("num_experts")
        experts, top_k = config.num_experts, config.num_experts_per_tok
        need(math.isqrt(experts) ** 2 == experts, "num_experts", "a perfect square (product keys: √E × √E)")
        need(isinstance(top_k, int) and 1 <= top_k <= experts, "num_experts_per_tok", f"an integer in [1, {experts}]")


class LegacyRope(nn.Module):
    """cos/sin tables, with the dynamic-NTK state of the legacy code (it changes with the calls it has seen)."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = legacy_head_dim(config)
        self.theta = float(config.rope_theta)
        self.dynamic = rope_kind(config) == "dynamic"
        self.factor = float(config.rope_scaling["factor"]) if self.dynamic else 1.0
        self.pivot = config.max_position_embeddings
        self.cached_len = self.pivot
        self.register_buffer("inv_freq", self.frequencies(self.pivot), persistent=False)

    def frequencies(self, seq_len: int) -> torch.Tensor:
        d = self.head_dim
        base = torch.tensor(self.theta, dtype=torch.float32)
        if self.dynamic and seq_len > self.pivot:
            length = torch.tensor(seq_len, dtype=torch.float32)
            base = base * (self.factor * length / self.pivot - (self.factor - 1)) ** (d / (d - 2))
        return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cached_len:  # growth
                self.inv_freq = self.frequencies(seq_len).to(self.inv_freq.device)
                self.cached_len = seq_len
            if seq_len < self.pivot and self.cached_len > self.pivot:  # back below M: the original table
                self.inv_freq = self.frequencies(self.pivot).to(self.inv_freq.device)
                self.cached_len = self.pivot
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class LegacyDogeAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = legacy_head_dim(config)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.ratio = float(config.dynamic_mask_ratio)
        self.keep_window_size = config.keep_window_size
        bias, hidden = config.hidden_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.A = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_proj = nn.Linear(self.num_kv_heads * d, self.num_heads, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=bias)

    def forward(self, h, cos, sin, past_len: int, attention_mask=None, cache=None):
        b, s, _ = h.shape
        d = self.head_dim
        q = self.q_proj(h).view(b, s, -1, d).transpose(1, 2)
        k = self.k_proj(h).view(b, s, -1, d).transpose(1, 2)
        v = self.v_proj(h).view(b, s, -1, d).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        n_keys = k.shape[2]
        if self.keep_window_size is not None and n_keys > self.keep_window_size:
            raise LegacyDogeConfigError(
                f"legacy Doge: {n_keys} keys exceed `keep_window_size` = {self.keep_window_size}; the code versions "
                "that wrote such configs disagree beyond it (no masking vs top-k), so it is not run"
            )

        # One bias per key and ATTENTION head: [b, H, keys].
        bias = torch.exp(self.A * F.softplus(self.dt_proj(v.transpose(1, 2).reshape(b, n_keys, -1)))).transpose(1, 2)
        lowest = torch.finfo(bias.dtype).min
        if 0.0 < self.ratio < 1.0 and int(n_keys * self.ratio) > 0:
            kth = bias.kthvalue(int(n_keys * self.ratio), dim=-1, keepdim=True).values
            bias = bias.masked_fill(bias < kth, lowest)
        # Causal (by cache position) and padding, added as the dtype minimum like the legacy code does.
        key_pos = torch.arange(n_keys, device=h.device)
        query_pos = torch.arange(past_len, past_len + s, device=h.device)
        visible = (key_pos[None, :] <= query_pos[:, None])[None, None]
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :n_keys].bool()
        mask = bias[:, :, None, :] + torch.where(visible, 0.0, lowest).to(bias.dtype)

        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-1, -2) * d**-0.5 + mask
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))


class LegacyResidual(nn.Module):
    """weight ⊙ residual + update (its parameter is stored as `….pre_residual.weight`)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, residual, update):
        return self.weight * residual + update


class LegacyDogeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.pre_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LegacyDogeAttention(config, layer_idx)
        self.pre_residual = LegacyResidual(config.hidden_size)
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # `hidden_bias` biases the feed-forward projections too.
        self.feed_forward = (DogeCDMoE if config.is_moe else DogeMLP)(config, bias=config.hidden_bias)
        self.post_residual = LegacyResidual(config.hidden_size)

    def forward(self, x, cos, sin, past_len, attention_mask, cache):
        x = self.pre_residual(x, self.self_attn(self.pre_layernorm(x), cos, sin, past_len, attention_mask, cache))
        return self.post_residual(x, self.feed_forward(self.post_layernorm(x)))


class LegacyDogePreTrainedModel(PreTrainedModel):
    config_class = LegacyDogeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LegacyDogeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # linears, embeddings, RMSNorms
        if isinstance(module, LegacyDogeAttention):
            init.zeros_(module.A)
        elif isinstance(module, LegacyResidual):
            init.ones_(module.weight)
        elif isinstance(module, LegacyRope):
            module.cached_len = module.pivot
            init.copy_(module.inv_freq, module.frequencies(module.pivot))


class LegacyDogeModel(LegacyDogePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.word_embed = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.rotary_emb = LegacyRope(config)
        self.layers = nn.ModuleList(LegacyDogeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embed

    def set_input_embeddings(self, value):
        self.word_embed = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        x = self.word_embed(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + x.shape[1], device=x.device)[None]
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, past_len, attention_mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(x), past_key_values=past_key_values)


class LegacyDogeForCausalLM(LegacyDogePreTrainedModel, GenerationMixin):
    """The legacy checkpoints' DogeForCausalLM: same state-dict keys (model.word_embed, …, lm_head when untied)."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LegacyDogeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embed

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        """Load a local legacy checkpoint directory; the checkpoint's keys decide `router_bias` and are checked
        against the config (tying, format variant) before any weight is read."""
        if config is None:
            config = LegacyDogeConfig.from_pretrained(path)
        keys = checkpoint_keys(path)
        if keys is not None:
            inspect_checkpoint(config, keys, path)
        return super().from_pretrained(path, *args, config=config, **kwargs)

    def forward(self, input_ids=None, position_ids=None, labels=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint inspection and detection


def checkpoint_keys(path) -> set[str] | None:
    """The tensor names of a local safetensors checkpoint (single file or sharded), or None if there is none."""
    from safetensors import safe_open

    root = pathlib.Path(path)
    if not root.is_dir():
        return None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return None
    keys = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(f.keys())
    return keys


def _load_tensor(path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def inspect_checkpoint(config: LegacyDogeConfig, keys: set[str], path=None) -> None:
    """Check a legacy checkpoint's keys against its config and record what only the keys tell (router bias).

    Raises LegacyDogeConfigError with the reason when the checkpoint is not one this implementation runs exactly.
    """
    if "model.word_embed.weight" not in keys:
        hint = " (it looks like the transformers format: load it with doge_hf.DogeForCausalLM)" if (
            "model.embed_tokens.weight" in keys) else ""
        raise LegacyDogeConfigError(f"not a legacy Doge checkpoint: no `model.word_embed.weight`{hint}")
    other = sorted(k for k in keys if ".feed_forward.queries" in k or k.endswith(".feed_forward.keys"))
    if other:
        raise LegacyDogeConfigError(
            f"legacy Doge checkpoint with the older query/key expert retrieval ({other[0]}, …); only the "
            "`feed_forward.router_gate` variant of the published MoE checkpoints is supported"
        )
    if config.is_moe:
        gates = [k for k in keys if k.endswith(".feed_forward.router_gate.weight")]
        biases = [k for k in keys if k.endswith(".feed_forward.router_gate.bias")]
        if len(gates) != config.num_hidden_layers:
            raise LegacyDogeConfigError(
                f"legacy Doge config: `is_moe` = true but {len(gates)} of {config.num_hidden_layers} layers "
                "have feed_forward.router_gate.weight"
            )
        if biases and len(biases) != len(gates):
            raise LegacyDogeConfigError("legacy Doge checkpoint: only some layers have feed_forward.router_gate.bias")
        config.router_bias = bool(biases)
    has_head = "lm_head.weight" in keys
    if not config.tie_word_embeddings and not has_head:
        raise LegacyDogeConfigError(
            "legacy Doge config: `tie_word_embeddings` = false but the checkpoint has no lm_head.weight"
        )
    if config.tie_word_embeddings and has_head and path is not None:
        if not torch.equal(_load_tensor(path, "lm_head.weight"), _load_tensor(path, "model.word_embed.weight")):
            raise LegacyDogeConfigError(
                "legacy Doge config: `tie_word_embeddings` is true (absent means true in this format) but the "
                "checkpoint stores an lm_head.weight different from model.word_embed.weight; set the field explicitly"
            )


def is_legacy_checkpoint(path_or_config) -> bool:
    """True for the legacy SmallDoge format. A directory is judged by its tensor names when it has safetensors
    (`model.word_embed` / `pre_residual` vs `model.embed_tokens`), else by its config.json; a config dict by its
    fields (legacy-only fields such as `dynamic_mask_ratio` / `hidden_bias`, or remote code for DogeForCausalLM)."""
    if isinstance(path_or_config, dict):
        config, keys = path_or_config, None
    else:
        root = pathlib.Path(path_or_config)
        config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
        keys = checkpoint_keys(root)
    if keys:
        if "model.word_embed.weight" in keys or any(k.endswith(".pre_residual.weight") for k in keys):
            return True
        if "model.embed_tokens.weight" in keys:
            return False
    if config.get("model_type") not in (None, "doge"):
        return False
    if any(field in config for field in LEGACY_CONFIG_FIELDS):
        return True
    auto_map = config.get("auto_map") or {}
    if any("DogeForCausalLM" in str(target) for target in auto_map.values()):
        # Remote code for Doge exists only for the legacy format; transformers' Doge is built in.
        return "q_norm" not in json.dumps(config) and "attention_bias" not in config
    return False


# ---------------------------------------------------------------------------------------------------------
# Tiny legacy checkpoints for tests


# The builder's tiny shape (tying is that format's default, so it is left out of config.json).
LEGACY_BASE = dict(
    {k: v for k, v in BASE_CONFIG.items() if k not in ("tie_word_embeddings", "dtype")},
    hidden_bias=False,
    hidden_dropout=0.0,
    hidden_act="silu",
    initializer_range=0.02,
    use_cache=True,
    rope_theta=10000.0,
    rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 512},
    attention_dropout=0.0,
    dynamic_mask_ratio=0.0,
)
# Dense published configs still carry the (unused) expert fields of their config class.
_STALE_EXPERT_FIELDS = dict(num_cdmmoe_experts=2048, num_cdmmoe_heads=4, num_cdmmoe_experts_per_head=8,
                            expert_retrieval_size=64, is_moe=False)
LEGACY_PRESETS = {
    "dense-gqa": dict(_STALE_EXPERT_FIELDS),
    "dense-mha": dict(_STALE_EXPERT_FIELDS, num_key_value_heads=4),
    "moe": dict(is_moe=True, num_experts=64, num_experts_per_tok=8, keep_window_size=512),
}
AUTO_MAP = {"AutoConfig": "configuration_doge.DogeConfig", "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"}


def _legacy_init_rule(name: str, param: torch.Tensor, tied: bool, hidden: int):
    from .builder import (A_RANGE, DT_STD, EXPERT_DOWN_STD, EXPERT_UP_STD, LOGIT_STD, NORM_RANGE, RESIDUAL_RANGE,
                          TIED_EMBED_NORM)

    *_, module, last = ("",) + tuple(name.split("."))
    if last == "A":
        return "uniform", *A_RANGE
    if module in ("pre_residual", "post_residual"):
        return "uniform", *RESIDUAL_RANGE
    if module == "final_layernorm" and tied:  # the tied embedding is small: the final norm sets the logit scale
        gain = LOGIT_STD / TIED_EMBED_NORM
        return "uniform", NORM_RANGE[0] * gain, NORM_RANGE[1] * gain
    if module.endswith("layernorm"):
        return "uniform", *NORM_RANGE
    if last == "bias":
        return "normal", 0.0, 0.1
    if module == "dt_proj":
        return "normal", 0.0, DT_STD / param.shape[1] ** 0.5
    if module == "down_embed":
        return "normal", 0.0, EXPERT_DOWN_STD / hidden**0.5
    if module == "up_embed":
        return "normal", 0.0, EXPERT_UP_STD
    if module == "word_embed":
        return "normal", 0.0, TIED_EMBED_NORM / hidden**0.5 if tied else 1.0
    if module == "lm_head":
        return "normal", 0.0, LOGIT_STD / hidden**0.5
    if param.dim() == 2:
        return "normal", 0.0, 1.0 / param.shape[1] ** 0.5
    raise ValueError(f"no init rule for {name} {tuple(param.shape)}")


@torch.no_grad()
def reinitialize_legacy(model, seed: int = 0, share_group_masks: bool = False):
    """Draw every parameter again (sorted names, one generator): per-head A in [0.4, 0.8], dt_proj rows that
    differ per attention head, residual scales in [0.5, 1.5], expert tables comparable to the shared MLP.
    `share_group_masks` copies the A / dt_proj rows of each group's first head to the group's other heads
    (the only GQA case a per-kv-head mask can express)."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        kind, a, b = _legacy_init_rule(name, params[name], config.tie_word_embeddings, config.hidden_size)
        shape = params[name].shape
        if kind == "uniform":
            values = torch.rand(shape, generator=gen) * (b - a) + a
        else:
            values = torch.randn(shape, generator=gen) * b + a
        params[name].copy_(values)
    if share_group_masks:
        groups = config.num_attention_heads // config.num_key_value_heads
        for layer in model.model.layers:
            attn = layer.self_attn
            first = torch.arange(config.num_attention_heads) // groups * groups
            attn.A.copy_(attn.A[first])
            attn.dt_proj.weight.copy_(attn.dt_proj.weight[first])
            if attn.dt_proj.bias is not None:
                attn.dt_proj.bias.copy_(attn.dt_proj.bias[first])
    return model


def legacy_config_dict(preset: str = "dense-gqa", **overrides) -> dict:
    """The config.json content of a preset, in the legacy layout (tie_word_embeddings omitted = tied)."""
    if preset not in LEGACY_PRESETS:
        raise ValueError(f"unknown legacy preset {preset!r}; choose from {sorted(LEGACY_PRESETS)}")
    fields = {**LEGACY_BASE, **LEGACY_PRESETS[preset], **overrides}
    return {"architectures": ["DogeForCausalLM"], "auto_map": dict(AUTO_MAP), "model_type": "doge",
            "torch_dtype": "float32", **fields}


def build_legacy_checkpoint(out_dir, preset: str = "dense-gqa", seed: int = 0, *, share_group_masks: bool = False,
                            router_bias: bool = False, **overrides) -> pathlib.Path:
    """Write a tiny legacy checkpoint: config.json (legacy layout, auto_map to a modeling file that is never
    executed), model.safetensors with the published keys (no lm_head when tied), generation_config.json and
    the project's tokenizer. `overrides` are config.json fields; `router_bias` adds feed_forward.router_gate.bias."""
    from safetensors.torch import save_file

    from .tokenizer import BOS_ID, EOS_ID, PAD_ID, get_tokenizer, save_tokenizer

    fields = legacy_config_dict(preset, **overrides)
    config = LegacyDogeConfig(**{k: v for k, v in fields.items() if k != "torch_dtype"}, router_bias=router_bias)
    tokenizer = get_tokenizer(config.vocab_size)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, config.vocab_size is {config.vocab_size}")
    model = reinitialize_legacy(LegacyDogeForCausalLM(config).float(), seed, share_group_masks).eval()

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tokenizer, out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m doge_hf.legacy", description="Write a tiny legacy checkpoint.")
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="dense-gqa", choices=sorted(LEGACY_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--share-group-masks", action="store_true")
    args = parser.parse_args(argv)
    out = build_legacy_checkpoint(args.out_dir, args.preset, args.seed, share_group_masks=args.share_group_masks)
    print(f"wrote legacy {args.preset} checkpoint (seed {args.seed}) to {out}")


__all__ = [
    "LegacyDogeConfig",
    "LegacyDogeConfigError",
    "LegacyDogeForCausalLM",
    "build_legacy_checkpoint",
    "checkpoint_keys",
    "inspect_checkpoint",
    "is_legacy_checkpoint",
    "legacy_config_dict",
]

if __name__ == "__main__":
    main()
