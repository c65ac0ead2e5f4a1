"""The legacy SmallDoge format: checkpoints published with their own remote code (Doge-20M … -320M, their
-Instruct versions, Doge-20M-MoE-Instruct), written here from the equations of that code. Its config.json
(defaults, validation, tensor names) is described by doge_format.

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

import pathlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from doge_format import DogeConfigError, DogeSpec, read_checkpoint

from .cdmoe import DogeCDMoE, DogeMLP
from .configuration import LegacyDogeConfig, spec_of
from .layers import RMSNorm, rotate_half


class LegacyRope(nn.Module):
    """cos/sin tables, with the dynamic-NTK state of the legacy code (it changes with the calls it has seen)."""

    def __init__(self, spec: DogeSpec):
        super().__init__()
        self.head_dim = spec.head_dim
        self.theta = spec.rope["rope_theta"]
        self.dynamic = spec.rope_type == "dynamic"
        self.factor = spec.rope.get("factor", 1.0)
        self.pivot = spec.max_position_embeddings
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
    def __init__(self, spec: DogeSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = spec.head_dim
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.ratio = spec.dynamic_mask_ratio
        self.context_limit = spec.context_limit
        bias, hidden = spec.attention_bias, spec.hidden_size
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
        if self.context_limit is not None and n_keys > self.context_limit:
            raise DogeConfigError(
                f"legacy Doge: {n_keys} keys exceed `keep_window_size` = {self.context_limit}; the code versions "
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
    def __init__(self, spec: DogeSpec, layer_idx: int):
        super().__init__()
        self.pre_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = LegacyDogeAttention(spec, layer_idx)
        self.pre_residual = LegacyResidual(spec.hidden_size)
        self.post_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        # `hidden_bias` biases the feed-forward projections too (spec.mlp_bias)
        self.feed_forward = DogeCDMoE(spec) if spec.experts else DogeMLP(spec)
        self.post_residual = LegacyResidual(spec.hidden_size)

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
        spec = spec_of(config)
        self.rotary_emb = LegacyRope(spec)
        self.layers = nn.ModuleList(LegacyDogeDecoderLayer(spec, i) for i in range(spec.num_layers))
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
        """Load a local legacy checkpoint directory; its tensor names decide `router_bias` and are checked
        against the config (tying, format variant) before any weight is read."""
        if config is None:
            config = LegacyDogeConfig.from_pretrained(path)
        if pathlib.Path(path).is_dir():
            experts = read_checkpoint(path, legacy=True).experts
            config.router_bias = experts is not None and experts.router_bias
        return super().from_pretrained(path, *args, config=config, **kwargs)

    def forward(self, input_ids=None, position_ids=None, labels=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["LegacyDogeConfig", "LegacyDogeForCausalLM"]
