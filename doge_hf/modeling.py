"""The Doge models as transformers `PreTrainedModel`s (same config.json and state-dict keys as
transformers' built-in Doge).

Per decoder layer:
    x = input_residual ⊙ x + Attn(input_layernorm(x))
    x = post_attention_residual ⊙ x + MLP_or_CDMoE(post_attention_layernorm(x))
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .attention import DogeAttention
from .cdmoe import DogeCDMoE, DogeMLP
from doge_format import DogeSpec

from .configuration import DogeConfig, spec_of
from .layers import RMSNorm, RotaryEmbedding


class DogeDecoderLayer(nn.Module):
    def __init__(self, spec: DogeSpec, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DogeAttention(spec, layer_idx)
        self.input_residual = nn.Parameter(torch.ones(spec.hidden_size))
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = DogeCDMoE(spec) if spec.experts else DogeMLP(spec)
        self.post_attention_residual = nn.Parameter(torch.ones(spec.hidden_size))

    def forward(self, x, cos_sin, past_len, attention_mask, past_key_values):
        attn = self.self_attn(self.input_layernorm(x), cos_sin, past_len, attention_mask, past_key_values)
        x = self.input_residual * x + attn
        return self.post_attention_residual * x + self.mlp(self.post_attention_layernorm(x))


class DogePreTrainedModel(PreTrainedModel):
    config_class = DogeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DogeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # linears, embeddings, norms and the RoPE tables
        if isinstance(module, DogeAttention):
            init.zeros_(module.A)
        elif isinstance(module, DogeDecoderLayer):
            init.ones_(module.input_residual)
            init.ones_(module.post_attention_residual)


class DogeModel(DogePreTrainedModel):
    def __init__(self, config: DogeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        spec = spec_of(config)
        self.layers = nn.ModuleList(DogeDecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + x.shape[1], device=x.device)[None]
        cos_sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos_sin, past_len, attention_mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class DogeForCausalLM(DogePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DogeConfig):
        super().__init__(config)
        self.model = DogeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self, input_ids=None, position_ids=None, labels=None, logits_to_keep: int = 0, **kwargs
    ) -> CausalLMOutputWithPast:
        # `position_ids` is named so that generate() passes padding-aware positions, as for transformers.
        out = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class DogeForSequenceClassification(DogePreTrainedModel):
    """Scores the last non-padding token (transformers' convention for decoder classifiers)."""

    def __init__(self, config: DogeConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DogeModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> SequenceClassifierOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.score(out.last_hidden_state)
        batch = torch.arange(logits.shape[0], device=logits.device)
        if input_ids is not None and self.config.pad_token_id is not None:
            # The rightmost token that is not padding (with right padding, the last real token).
            real = (input_ids != self.config.pad_token_id).int()
            last = (real * torch.arange(real.shape[1], device=real.device)).argmax(-1)
        else:
            last = torch.full_like(batch, logits.shape[1] - 1)
        return SequenceClassifierOutputWithPast(logits=logits[batch, last], past_key_values=out.past_key_values)
