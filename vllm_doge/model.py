"""Native vLLM implementation of Doge (`model_type: doge`; transformers format and the legacy SmallDoge format).

Per decoder layer:
    x = input_residual ⊙ x + Attn(input_layernorm(x))
    x = post_attention_residual ⊙ x + MLP_or_CDMoE(post_attention_layernorm(x))
The residual scales stop vLLM's fused add+RMSNorm from applying. Each scaled residual and the RMSNorm
after it run as one op instead (on DOGE_ATTN, the plugin's kernel; elsewhere the torch expression): a
layer hands its MLP output and scale on, and the next layer's input_layernorm (or the final norm) adds
them in.
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from . import surface

# The model's vLLM pieces (attention.py, cdmoe.py, backend/ included), checked before they are imported so
# that a vLLM lacking one fails naming it and the feature that needs it, not with a bare ImportError.
surface.require(surface.MODEL)

from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from doge_format import LEGACY_RENAMES, DogeSpec, checked, expected_shapes

from .attention import DogeAttention
from .backend import BACKEND_NAME, attention_path, ops
from .cdmoe import DogeCDMoE
from .config import spec_of
from . import lora

LEGACY_NAMES = WeightsMapper(orig_to_new_substr=LEGACY_RENAMES)

# A residual update a layer leaves to the next norm: (y, scale), the stream being scale ⊙ x + y.
Pending = tuple[torch.Tensor, torch.Tensor]


class DogeDecoderLayer(nn.Module):
    def __init__(
        self,
        spec: DogeSpec,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        hidden = spec.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps=spec.rms_norm_eps)
        self.self_attn = DogeAttention(spec, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.input_residual = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps=spec.rms_norm_eps)
        if spec.experts is not None:
            self.mlp = DogeCDMoE(spec, quant_config=quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = LlamaMLP(
                hidden,
                spec.intermediate_size,
                spec.hidden_act,
                quant_config=quant_config,
                bias=spec.mlp_bias,
                prefix=f"{prefix}.mlp",
            )
        self.post_attention_residual = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, pending: Pending | None
    ) -> tuple[torch.Tensor, Pending]:
        """The stream entering the layer is x, or scale ⊙ x + y for pending = (y, scale) (the previous
        layer's MLP output and post_attention_residual); returns this layer's (x, pending)."""
        fused = self.self_attn.own_backend
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = scaled_residual_norm(self.input_layernorm, x, *pending, fused=fused)
        y = self.self_attn(positions, h)
        x, h = scaled_residual_norm(self.post_attention_layernorm, x, y, self.input_residual, fused=fused)
        return x, (self.mlp(h), self.post_attention_residual)


def scaled_residual_norm(
    norm: RMSNorm, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', norm(x')) for x' = scale ⊙ x + y; fused: one pass in the plugin's kernel, with the same roundings."""
    if fused:
        return ops.residual_rms_norm(x, y, scale, norm.weight, norm.variance_epsilon)
    x = scale * x + y
    return x, norm(x)


@support_torch_compile
class DogeModel(nn.Module):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        spec = spec_of(self.config)
        quant_config = vllm_config.quant_config
        pp = get_pp_group()
        if pp.is_first_rank or (spec.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, quant_config=quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            spec.num_layers,
            lambda prefix: DogeDecoderLayer(spec, vllm_config.cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.fused_norms = attention_path(vllm_config) == BACKEND_NAME
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], spec.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            x = intermediate_tensors["hidden_states"]
        pending = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            x, pending = layer(positions, x, pending)
        if not get_pp_group().is_last_rank:
            if pending is not None:
                x = pending[1] * x + pending[0]
            return IntermediateTensors({"hidden_states": x})
        if pending is None:
            return self.norm(x)
        return scaled_residual_norm(self.norm, x, *pending, fused=self.fused_norms)[1]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Stacked loading for q/k/v and gate/up; dt_proj is folded into each layer's attention."""
        dt_inputs: dict[int, dict[str, torch.Tensor]] = {}

        def route(weights):
            for name, tensor in weights:
                parts = name.split(".")  # layers.<i>.self_attn.<proj>.<weight|bias>
                if len(parts) == 5 and parts[3] in ("v_proj", "dt_proj"):
                    dt_inputs.setdefault(int(parts[1]), {})[f"{parts[3]}.{parts[4]}"] = tensor
                    if parts[3] == "dt_proj":
                        continue
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(route(weights), mapper=self.hf_to_vllm_mapper)
        for index in range(self.start_layer, self.end_layer):
            found = dt_inputs.get(index, {})
            self.layers[index].self_attn.fold_dt_proj(
                found["v_proj.weight"], found.get("v_proj.bias"), found["dt_proj.weight"], found.get("dt_proj.bias")
            )
            loaded |= {f"layers.{index}.self_attn.dt_weight", f"layers.{index}.self_attn.dt_bias"}
        return loaded


class DogeForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
    """LoRA: vLLM wraps every linear layer (qkv_proj, o_proj, gate_up_proj, down_proj, CDMoE's
    router_gate, whose output the routing reads, so an adapter there is applied exactly). dt_proj is
    not a module of ours (DogeAttention reads it as a tensor) and the expert tables are not linear
    layers: vLLM refuses adapters targeting them, naming the modules. Embeddings and lm_head take no
    adapters (`embedding_modules` stays empty), so vLLM refuses those too. lora.py checks each adapter's
    shapes and keeps base-model rows exact in mixed batches on CPU."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @property
    def lora_manager(self):
        return self.__dict__.get("_lora_manager")

    @lora_manager.setter
    def lora_manager(self, manager) -> None:
        # vLLM attaches its LoRA manager here once its layers are wrapped: the one moment a model sees it.
        lora.attach(manager, self.spec)
        self.__dict__["_lora_manager"] = manager

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.spec = spec = spec_of(self.config)
        if spec.legacy:  # adapters trained on a legacy model name its modules the legacy way
            self.hf_to_vllm_mapper = LEGACY_NAMES
        if spec.hidden_act != "silu":
            raise ValueError(f"Doge: `hidden_act` = {spec.hidden_act!r}; vLLM's fused SwiGLU serves 'silu' only")
        self.model = DogeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                spec.vocab_size,
                spec.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if spec.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(spec.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        optional = set()
        if self.spec.tie_word_embeddings:  # a tied lm_head some exports still store is the embedding again
            optional.add("lm_head.weight")
        if self.spec.legacy:
            weights = LEGACY_NAMES.apply(weights)
        expected = expected_shapes(self.spec)
        if getattr(self, "is_pooling_model", False):
            # vLLM's pooling adapters (e.g. the seq-cls wrapper serving a DogeForSequenceClassification
            # checkpoint) have no lm_head; the checkpoint's `score` passes through to the adapter's head.
            expected.pop("lm_head.weight", None)
        return AutoWeightsLoader(self).load_weights(checked(weights, expected, optional=optional))
