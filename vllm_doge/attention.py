"""Doge's dynamic-mask attention: projections, q/k norm, RoPE and the per-key bias
b_j = exp(A · softplus(dt_proj(v_j))), then one of two paths (chosen per engine, backend/__init__.py):

- DOGE_ATTN (CPU): k, v and the mask's inputs go to the plugin's backend, whose cache write computes the
  bias and stores it in fp32 beside the unpadded k and v; its kernel adds the bias, and past a keep window
  keeps each query's top-W keys.
- the fold on a stock backend: the bias is folded into the cached keys,

    q' = [q, 1/scale, 0…]    k' = [k, b, 0…]    v' = [v, 0…]     (padded to a head size P > d)
    ⇒  q'·k'·scale = q·k·scale + b

  so every backend computes Doge's scores, and paging, prefix caching (b depends on v_j only, so a
  cached block stays valid), chunked prefill and preemption keep working unchanged. The output is sliced
  back to d. The bias sits in k's channel, not multiplied by √d, which keeps it exact in fp16.

Legacy SmallDoge checkpoints have one mask per *attention* head: each kv head then carries G bias
channels (one per head of its group); head h reads channel h mod G (in the fold: q' of head h puts
1/scale in channel d + h mod G).

dt_proj reads the value vector of *all* kv heads. With `dt_proj(v) = W_dt (W_v h + b_v) + b_dt`, the
loader folds W_dt·W_v into one [mask rows, hidden] projection of h, which is replicated at the attention
input: each tensor-parallel rank computes its own kv heads' bias with no all-gather.

With LoRA enabled the fold would be wrong: an adapter on v_proj changes v, and the bias must read the
adapted v (vLLM adds the adapter's delta inside qkv_proj). dt_proj then stays unfolded and reads the v
slice of qkv_proj's output; under tensor parallelism each rank all-gathers the v of every kv head.
"""

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, get_current_vllm_config
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.v1.attention.selector import get_attn_backend

from doge_format import DogeSpec

from .backend import BACKEND_NAME, attention_path
from .backend.layer import DogeBiasAttention
from .keep_window import keep_window_binds


def folded_head_size(min_size: int, num_heads: int, dtype: torch.dtype, kv_cache_dtype: str | None) -> int:
    """The smallest head size >= min_size (head_dim plus the bias channels) this platform's backend runs."""
    for size in range(min_size, 513):
        if size % 8:
            continue
        try:
            backend = get_attn_backend(size, dtype, kv_cache_dtype, num_heads=num_heads)
        except (ValueError, NotImplementedError):
            continue
        if backend.supports_head_size(size):
            return size
    raise ValueError(
        f"Doge: the head size with the dynamic-mask bias channels is {min_size}, and no attention backend "
        "on this platform supports a head size that large (sizes up to 512 tried)."
    )


class DogeAttention(nn.Module):
    def __init__(
        self,
        spec: DogeSpec,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        hidden = spec.hidden_size
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = spec.num_heads
        self.total_num_kv_heads = spec.num_kv_heads
        if self.total_num_heads % tp_size or (
            self.total_num_kv_heads % tp_size if self.total_num_kv_heads >= tp_size else tp_size % self.total_num_kv_heads
        ):
            raise ValueError(
                f"Doge: tensor_parallel_size {tp_size} must divide num_attention_heads ({self.total_num_heads}) "
                f"and divide or be a multiple of num_key_value_heads ({self.total_num_kv_heads})."
            )
        self.tp_size = tp_size
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5

        # One mask row (A, dt_proj) per kv head, or per attention head (legacy GQA): each kv head then
        # carries one bias channel per head of its group.
        self.mask_per_head = spec.masks_per_kv_head > 1
        self.bias_channels = self.num_heads // self.num_kv_heads if self.mask_per_head else 1
        self.mask_rows = self.num_kv_heads * self.bias_channels

        self.qkv_proj = QKVParallelLinear(
            hidden,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=spec.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            hidden,
            bias=spec.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.qk_norm = spec.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=spec.rms_norm_eps)
        rope = dict(spec.rope)
        if spec.rope_type == "dynamic":
            # Dynamic NTK is plain RoPE up to max_position_embeddings, where the config hook caps the context.
            rope = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        self.rotary_emb = get_rope(self.head_dim, max_position=spec.max_position_embeddings, rope_parameters=rope)

        # Dynamic mask: A and the dt projection of this rank's mask rows, filled by `fold_dt_proj` after
        # the checkpoint's dt_proj/v_proj are read: folded (W_dt·W_v, a projection of h), or with LoRA
        # enabled dt_proj itself (a projection of all kv heads' v, see the module docstring).
        vllm_config = get_current_vllm_config()
        self.unfolded = vllm_config.lora_config is not None
        self.A = nn.Parameter(torch.zeros(self.mask_rows), requires_grad=False)
        self.A.weight_loader = lambda param, loaded: param.data.copy_(loaded[self._mask_rows(loaded.shape[0])])
        dtype = torch.get_default_dtype()
        dt_inputs = self.total_num_kv_heads * self.head_dim if self.unfolded else hidden
        self.dt_weight = nn.Parameter(torch.empty(self.mask_rows, dt_inputs, dtype=dtype), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.zeros(self.mask_rows, dtype=dtype), requires_grad=False)

        kv_cache_dtype = cache_config.cache_dtype if cache_config is not None else None
        sliding_window = spec.sliding_window
        max_model_len = vllm_config.model_config.max_model_len if vllm_config.model_config is not None else 0
        # Beyond keep_window_size keys each query keeps only its top keys by bias (keep_window.py); the
        # config hook put such a model on DOGE_ATTN or refused it.
        self.keep_window = keep_window_binds(spec.keep_window, sliding_window, max_model_len)
        if self.keep_window and self.unfolded:
            # The keep window's tie rule needs a token's bias to get the same bits in any batch; with
            # LoRA the bias reads v from vLLM's qkv GEMM and adapter kernels, which do not promise that.
            raise ValueError(
                f"Doge: LoRA with keep_window_size {spec.keep_window} < max_model_len is not supported "
                "(the kept keys would depend on rounding of the adapted values). Serve with "
                f"--max-model-len <= {spec.keep_window}, or without --enable-lora."
            )
        attention_kwargs = dict(cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")
        # The config hook chose the attention path for the whole model (backend/__init__.py).
        self.own_backend = attention_path(vllm_config) == BACKEND_NAME
        if self.own_backend:
            # DOGE_ATTN: K and V at head_dim, the bias in fp32 beside them, added by the kernel.
            self.attn = DogeBiasAttention(
                self.num_heads,
                self.head_dim,
                self.scaling,
                num_kv_heads=self.num_kv_heads,
                bias_channels=self.bias_channels,
                keep_window=spec.keep_window if self.keep_window else 0,  # then the layer is a window of W + 1
                per_layer_sliding_window=sliding_window,
                **attention_kwargs,
            )
            return
        if self.keep_window:
            raise RuntimeError("Doge: a binding keep window is served on DOGE_ATTN only (the config hook refuses it elsewhere)")
        # The fold on a stock backend: q' = [q, 1/scale, 0…], k' = [k, b, 0…] in a head of a size it runs.
        self.padded_head_size = folded_head_size(self.head_dim + self.bias_channels, self.num_heads, dtype, kv_cache_dtype)
        # q's extra channels: 1/scale in the channel of its own bias (head h of a group reads channel h % G).
        q_fold = torch.zeros(self.num_heads, self.padded_head_size - self.head_dim, dtype=dtype)
        q_fold[torch.arange(self.num_heads), torch.arange(self.num_heads) % self.bias_channels] = 1.0 / self.scaling
        self.register_buffer("q_fold", q_fold, persistent=False)
        self.attn = Attention(
            self.num_heads,
            self.padded_head_size,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            per_layer_sliding_window=sliding_window,
            **attention_kwargs,
        )

    def _mask_rows(self, total_rows: int) -> slice:
        """The mask rows this tensor-parallel rank owns: its attention heads' rows (legacy), or its kv
        heads' rows (kv heads replicate when tp > kv heads)."""
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        if self.mask_per_head or tp_size <= total_rows:
            first = tp_rank * self.mask_rows
        else:
            first = tp_rank // (tp_size // total_rows)
        return slice(first, first + self.mask_rows)

    @torch.no_grad()
    def fold_dt_proj(self, v_weight, v_bias, dt_weight, dt_bias) -> None:
        """dt_proj(v_proj(h)) as one projection of h, computed in fp64 so folding adds no rounding.
        With LoRA enabled, this rank's rows of dt_proj as they are (v_proj's bias is then in v already)."""
        rows = self._mask_rows(dt_weight.shape[0])
        dt_rows = dt_weight[rows].double()
        bias = torch.zeros(self.mask_rows, dtype=torch.float64)
        if self.unfolded:
            self.dt_weight.copy_(dt_rows)
        else:
            self.dt_weight.copy_(dt_rows @ v_weight.double())
            if v_bias is not None:
                bias += dt_rows @ v_bias.double()
        if dt_bias is not None:
            bias += dt_bias[rows].double()
        self.dt_bias.copy_(bias)

    def _all_kv_values(self, v: torch.Tensor) -> torch.Tensor:
        """[tokens, kv heads of this rank · d] -> [tokens, every kv head · d], in checkpoint order."""
        if self.tp_size == 1:
            return v
        gathered = tensor_model_parallel_all_gather(v.contiguous(), dim=-1)
        if self.tp_size > self.total_num_kv_heads:  # each kv head sits on tp / KV consecutive ranks
            copies = self.tp_size // self.total_num_kv_heads
            gathered = gathered.view(v.shape[0], self.tp_size, self.head_dim)[:, ::copies]
        return gathered.reshape(v.shape[0], self.total_num_kv_heads * self.head_dim)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.view(tokens, self.num_heads, self.head_dim)).view(tokens, self.q_size)
            k = self.k_norm(k.view(tokens, self.num_kv_heads, self.head_dim)).view(tokens, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)

        # A token's bias must get the same bits in any batch, so that repeated tokens tie exactly in
        # layer 0 and the keep window's tie rule decides: a product and a sum per row, not a matrix
        # multiply, and softplus/exp in fp64 (their vectorised and scalar paths differ in the last bit).
        # DOGE_ATTN computes it that way inside its cache write.
        dt_input = self._all_kv_values(v) if self.unfolded else hidden_states
        if self.own_backend:
            out = self.attn(q, k, v, dt_input, self.dt_weight, self.dt_bias, self.A, positions)
            return self.o_proj(out)[0]
        dt = (dt_input.unsqueeze(1) * self.dt_weight).sum(-1) + self.dt_bias
        bias = torch.exp(self.A.double() * F.softplus(dt.double()))
        pad = self.padded_head_size - self.head_dim
        bias = bias.view(tokens, self.num_kv_heads, self.bias_channels).to(k.dtype)
        q = torch.cat([q.view(tokens, self.num_heads, self.head_dim), self.q_fold.expand(tokens, -1, -1)], -1)
        k = torch.cat([k.view(tokens, self.num_kv_heads, self.head_dim), F.pad(bias, (0, pad - bias.shape[-1]))], -1)
        v = F.pad(v.view(tokens, self.num_kv_heads, self.head_dim), (0, pad))
        out = self.attn(q.view(tokens, -1), k.view(tokens, -1), v.view(tokens, -1))
        out = out.view(tokens, self.num_heads, self.padded_head_size)[..., : self.head_dim]
        out, _ = self.o_proj(out.reshape(tokens, self.q_size))
        return out
