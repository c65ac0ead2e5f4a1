"""CDMoE layer of Doge for vLLM: a shared SwiGLU MLP plus a product-key memory of routed experts.

    out(h) = down_proj(silu(gate_proj h) * up_proj h)
           + sum_i w_i * silu(down_embed[e_i] . h) * up_embed[e_i]

Routing is per token (see `route`). transformers' built-in DogeCDMoE reshapes the router logits with
`.view(2, bsz * seq_len, -1)`, which pairs the two halves of *different* tokens during prefill; we do not
reproduce that: for one token both agree, for several tokens ours does not mix tokens.

Public API:
- `DogeCDMoE(config, quant_config=None, prefix="", router_bias=False)`: the vLLM layer,
  `forward(hidden_states [T, hidden]) -> [T, hidden]`.
- `route(router_logits, num_keys, top_k, norm_topk_prob=False) -> (weights [T, k] fp32, ids [T, k] int64)`.
- `routed_experts(h, weights, ids, down_embed, up_embed, act="silu", use_triton=None) -> [T, hidden]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The fused kernel registers `torch.ops.vllm_doge.cdmoe_routed`. Only import triton where it can be used
# (CUDA), so CPU installs need no triton, and tests can import triton themselves with TRITON_INTERPRET set.
_HAS_TRITON_OP = False
if torch.cuda.is_available():
    try:
        import vllm_doge.kernels.cdmoe_triton  # noqa: F401  (registers the op)

        _HAS_TRITON_OP = True
    except ImportError:  # pragma: no cover - depends on the install
        _HAS_TRITON_OP = False

__all__ = ["DogeCDMoE", "num_keys_for", "route", "routed_experts", "routed_experts_torch"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _activation(act: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(act):
        return act
    try:
        return _ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unsupported CDMoE activation {act!r}; known: {sorted(_ACTIVATIONS)}") from None


def _load_triton_op() -> None:
    global _HAS_TRITON_OP
    import vllm_doge.kernels.cdmoe_triton  # noqa: F401  (registers torch.ops.vllm_doge.cdmoe_routed)

    _HAS_TRITON_OP = True


def _is_silu(act: str | Callable[[torch.Tensor], torch.Tensor]) -> bool:
    return act in ("silu", "swish") or act is F.silu


def num_keys_for(num_experts: int) -> int:
    """K = floor(sqrt(E)), as transformers computes it. Ids are a*K + b < K*K <= E."""
    return math.isqrt(num_experts)


_RANK_CACHE: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _candidate_ranks(kk: int, top_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) rank pairs, a-major, with a, b < kk and (a + 1) * (b + 1) <= top_k.

    Under torch.compile they become constants of the graph; in eager they are cached per device
    (building them costs more than the routing of a decode step)."""
    if not torch.compiler.is_compiling():
        cached = _RANK_CACHE.get((kk, top_k, device))
        if cached is not None:
            return cached
    pairs = [(a, b) for a in range(kk) for b in range(kk) if (a + 1) * (b + 1) <= top_k]
    rank_a = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
    rank_b = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
    if not torch.compiler.is_compiling():
        _RANK_CACHE[(kk, top_k, device)] = (rank_a, rank_b)
    return rank_a, rank_b


def route(
    router_logits: torch.Tensor,
    num_keys: int,
    top_k: int,
    norm_topk_prob: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token product-key routing.

    router_logits: [T, 2K] (first K: x keys, last K: y keys). Candidates are all pairs (a, b) of the
    top keys of each half, scored x_a + y_b, with expert id a*K + b; the best `top_k` are kept and their
    scores softmaxed. Returns (weights [T, top_k] float32, expert_ids [T, top_k] int64), best first.

    Only pairs that can make the top_k are scored: with both halves sorted best first, pair (a, b) is
    beaten by every (a', b') with a' <= a, b' <= b, i.e. by (a+1)(b+1) - 1 other pairs, so it can only
    be among the best top_k if (a+1)(b+1) <= top_k. That is 50 pairs for top_k = 16 instead of K^2 = 1024
    (and only the top-min(top_k, K) keys of each half are needed): the same set as the full K x K search,
    barring exact ties in scores. CPU top-k cost grows with the row length, so this matters in prefill.
    Computed in fp32 whatever the logits' dtype; no data-dependent control flow (traceable by
    torch.compile).
    """
    if router_logits.shape[-1] != 2 * num_keys:
        raise ValueError(f"router logits have {router_logits.shape[-1]} columns, expected 2*num_keys = {2 * num_keys}")
    if not 1 <= top_k <= num_keys * num_keys:
        raise ValueError(f"top_k={top_k} must be in [1, num_keys**2 = {num_keys * num_keys}]")
    logits = router_logits.float()
    kk = min(top_k, num_keys)
    scores_x, keys_x = logits[..., :num_keys].topk(kk, dim=-1)  # sorted, best first
    scores_y, keys_y = logits[..., num_keys:].topk(kk, dim=-1)
    rank_a, rank_b = _candidate_ranks(kk, top_k, router_logits.device)
    pair_scores = scores_x.index_select(-1, rank_a) + scores_y.index_select(-1, rank_b)
    pair_ids = keys_x.index_select(-1, rank_a) * num_keys + keys_y.index_select(-1, rank_b)
    scores, pos = pair_scores.topk(top_k, dim=-1)
    expert_ids = pair_ids.gather(-1, pos)
    weights = torch.softmax(scores, dim=-1)
    if norm_topk_prob:
        # A no-op after softmax up to rounding; kept for parity with the reference implementation.
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


# Eager mode only: bound the [tokens, k, hidden] temporaries of the torch path to this many bytes.
_EAGER_CHUNK_BYTES = 4 << 20


def _routed_block(h, weights, ids, down_embed, up_embed, act_fn):
    rows = F.embedding(ids, down_embed)  # [T, k, hidden]
    scores = (rows * h.to(down_embed.dtype).unsqueeze(1)).sum(-1)  # [T, k]
    coef = act_fn(scores.float()) * weights.float()
    out = F.embedding_bag(ids, up_embed, per_sample_weights=coef.to(up_embed.dtype), mode="sum")
    return out.to(h.dtype)


def routed_experts_torch(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    down_embed: torch.Tensor,
    up_embed: torch.Tensor,
    act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
) -> torch.Tensor:
    """Torch path of `routed_experts` (CPU, or any device without the kernel).

    Down half: gather the k rows, multiply by h and sum over hidden (on a 2-core CPU, eager, 4-5x
    faster than `bmm` with a [hidden, 1] right-hand side in fp32; under torch.compile inductor fuses
    the gather, product and sum into one loop). Up half: `F.embedding_bag` with per-sample weights,
    which gathers and sums without materialising [T, k, hidden] (design.md measured 651 -> 280 us
    against gather+bmm). Activation and weighting in fp32. In eager mode, long inputs are processed in
    token blocks so that the [block, k, hidden] temporaries stay in cache (3-5x at 2048 tokens, fp32);
    compiled graphs take the single expression (the loop depends on the token count, which is dynamic).
    Each token's result depends only on that token.
    """
    act_fn = _activation(act)
    num_tokens, top_k = ids.shape
    row_bytes = top_k * down_embed.shape[1] * down_embed.element_size()
    if not torch.compiler.is_compiling() and num_tokens * row_bytes > _EAGER_CHUNK_BYTES:
        block = max(1, _EAGER_CHUNK_BYTES // row_bytes)
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        for start in range(0, num_tokens, block):
            stop = start + block
            out[start:stop] = _routed_block(
                h[start:stop], weights[start:stop], ids[start:stop], down_embed, up_embed, act_fn
            )
        return out
    return _routed_block(h, weights, ids, down_embed, up_embed, act_fn)


def routed_experts(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    down_embed: torch.Tensor,
    up_embed: torch.Tensor,
    act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
    use_triton: bool | None = None,
) -> torch.Tensor:
    """sum_i weights[:, i] * act(down_embed[ids[:, i]] . h) * up_embed[ids[:, i]]  -> [T, hidden].

    h [T, hidden]; weights [T, k]; ids [T, k]; down_embed, up_embed [E, hidden]. `use_triton=None`
    picks the fused Triton kernel for CUDA tensors with SiLU, the torch path otherwise; True forces the
    kernel (e.g. CPU tensors under TRITON_INTERPRET=1), False forces torch. The choice depends on the
    device and Python arguments only, never on values, so it is fixed at trace time.
    """
    if use_triton is None:
        use_triton = h.is_cuda and _HAS_TRITON_OP and _is_silu(act)
    if use_triton:
        if not _is_silu(act):
            raise ValueError(f"the fused CDMoE kernel implements silu only, got act={act!r}")
        if not _HAS_TRITON_OP:  # forced use off CUDA (tests under TRITON_INTERPRET=1): import on demand
            _load_triton_op()
        return torch.ops.vllm_doge.cdmoe_routed(h, weights, ids, down_embed, up_embed)
    return routed_experts_torch(h, weights, ids, down_embed, up_embed, act)


class _ExpertTable(nn.Module):
    """A replicated [E, hidden] table exposing `.weight` (checkpoint key `...down_embed.weight`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader
        from vllm.model_executor.utils import set_weight_attrs

        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, replicated"


class DogeCDMoE(nn.Module):
    """vLLM CDMoE layer (transformers-format names: gate_proj/up_proj -> gate_up_proj, down_proj,
    router_gate, down_embed, up_embed).

    Tensor parallelism: the shared SwiGLU is sharded like Qwen2MLP (gate_up_proj column-parallel,
    down_proj row-parallel), but down_proj does not all-reduce itself (`reduce_results=False`). The
    router and both expert tables are replicated, and only TP rank 0 computes the routed sum (and adds
    down_proj's bias, if any) into its partial result before the single all-reduce. The routed part is
    thus counted exactly once, is bit-identical to tp=1, and costs no extra collective. The tables are
    small (2*E*hidden: 0.5 M values for Doge-20M-MoE) and the routed work is O(T*k*hidden), tiny next
    to the shared MLP's O(T*hidden*intermediate/tp), so not sharding it costs little. (Sharding expert
    rows across ranks would balance memory, but every rank would still route and read k ids per token.)
    """

    def __init__(
        self,
        config,
        quant_config=None,
        prefix: str = "",
        router_bias: bool = False,
    ) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.linear import (
            MergedColumnParallelLinear,
            ReplicatedLinear,
            RowParallelLinear,
        )

        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(
                f"DogeCDMoE supports hidden_act='silu' only (vLLM's fused SiluAndMul and the routed-expert "
                f"kernel); this checkpoint has hidden_act={hidden_act!r}"
            )
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.num_experts = int(config.num_experts)
        self.num_keys = num_keys_for(self.num_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        if self.num_keys < 1 or not 1 <= self.top_k <= self.num_keys**2:
            raise ValueError(
                f"CDMoE needs 1 <= num_experts_per_tok <= floor(sqrt(num_experts))**2; got "
                f"num_experts={self.num_experts}, num_experts_per_tok={self.top_k}"
            )
        mlp_bias = bool(getattr(config, "mlp_bias", False))

        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()

        self.gate_up_proj = MergedColumnParallelLinear(
            self.hidden_size,
            [self.intermediate_size] * 2,
            bias=mlp_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        # No all-reduce here: the routed part joins the partial sum first (see class docstring). A bias
        # is returned unadded (skip_bias_add) and added on rank 0 only.
        self.down_proj = RowParallelLinear(
            self.intermediate_size,
            self.hidden_size,
            bias=mlp_bias,
            skip_bias_add=mlp_bias,
            reduce_results=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

        # The router stays unquantised (tiny, and its top-k decisions are sensitive to rounding).
        self.router_gate = ReplicatedLinear(
            self.hidden_size,
            2 * self.num_keys,
            bias=router_bias,
            quant_config=None,
            prefix=f"{prefix}.router_gate",
        )
        self.down_embed = _ExpertTable(self.num_experts, self.hidden_size)
        self.up_embed = _ExpertTable(self.num_experts, self.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(hidden_states)
        out, down_bias = self.down_proj(self.act_fn(gate_up))
        if self.tp_rank == 0:  # a constant of the module: no data-dependent control flow
            router_logits, _ = self.router_gate(hidden_states)
            weights, ids = route(router_logits, self.num_keys, self.top_k, self.norm_topk_prob)
            out = out + routed_experts(
                hidden_states, weights, ids, self.down_embed.weight, self.up_embed.weight, "silu"
            )
            if down_bias is not None:
                out = out + down_bias
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out
