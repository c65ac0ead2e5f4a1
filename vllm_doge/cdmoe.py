"""CDMoE layer of Doge for vLLM: a shared SwiGLU MLP plus a product-key memory of routed experts.

    out(h) = down_proj(silu(gate_proj h) * up_proj h)
           + sum_i w_i * silu(down_embed[e_i] . h) * up_embed[e_i]

Routing is per token (see `route`). transformers' built-in DogeCDMoE reshapes the router logits with
`.view(2, bsz * seq_len, -1)`, which pairs the two halves of *different* tokens during prefill; we do not
reproduce that: for one token both agree, for several tokens ours does not mix tokens.

Public API:
- `DogeCDMoE(spec, quant_config=None, prefix="")`: the vLLM layer, `forward(hidden_states [T, hidden])`.
- `route(router_logits, num_keys, top_k, norm_topk_prob=False) -> (weights [T, k] fp32, ids [T, k] int64)`.
- `routed_experts(h, weights, ids, down_embed, up_embed, use_triton=None) -> [T, hidden]` (SiLU experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from doge_format import DogeSpec

# The fused kernel registers `torch.ops.vllm_doge.cdmoe_routed`. Only import triton where it can be used
# (CUDA), so CPU installs need no triton, and tests can import triton themselves with TRITON_INTERPRET set.
_HAS_TRITON_OP = False
if current_platform.is_cuda_alike():
    try:
        import vllm_doge.kernels.cdmoe_triton  # noqa: F401  (registers the op)

        _HAS_TRITON_OP = True
    except ImportError:  # pragma: no cover - depends on the install
        _HAS_TRITON_OP = False

__all__ = ["DogeCDMoE", "route", "routed_experts", "routed_experts_torch"]


def _load_triton_op() -> None:
    global _HAS_TRITON_OP
    import vllm_doge.kernels.cdmoe_triton  # noqa: F401  (registers torch.ops.vllm_doge.cdmoe_routed)

    _HAS_TRITON_OP = True


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


def _routed_block(h, weights, ids, down_embed, up_embed):
    rows = F.embedding(ids, down_embed)  # [T, k, hidden]
    scores = (rows * h.to(down_embed.dtype).unsqueeze(1)).sum(-1)  # [T, k]
    coef = F.silu(scores.float()) * weights.float()
    out = F.embedding_bag(ids, up_embed, per_sample_weights=coef.to(up_embed.dtype), mode="sum")
    return out.to(h.dtype)


def routed_experts_torch(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    down_embed: torch.Tensor,
    up_embed: torch.Tensor,
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
    num_tokens, top_k = ids.shape
    row_bytes = top_k * down_embed.shape[1] * down_embed.element_size()
    if not torch.compiler.is_compiling() and num_tokens * row_bytes > _EAGER_CHUNK_BYTES:
        block = max(1, _EAGER_CHUNK_BYTES // row_bytes)
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        for start in range(0, num_tokens, block):
            stop = start + block
            out[start:stop] = _routed_block(h[start:stop], weights[start:stop], ids[start:stop], down_embed, up_embed)
        return out
    return _routed_block(h, weights, ids, down_embed, up_embed)


def routed_experts(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    down_embed: torch.Tensor,
    up_embed: torch.Tensor,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """sum_i weights[:, i] * silu(down_embed[ids[:, i]] . h) * up_embed[ids[:, i]]  -> [T, hidden].

    h [T, hidden]; weights [T, k]; ids [T, k]; down_embed, up_embed [E, hidden]. `use_triton=None`
    picks the fused Triton kernel for CUDA tensors, the torch path otherwise; True forces the kernel
    (e.g. CPU tensors under TRITON_INTERPRET=1), False forces torch. The choice depends on the device
    and Python arguments only, never on values, so it is fixed at trace time.
    """
    if use_triton is None:
        use_triton = h.is_cuda and _HAS_TRITON_OP
    if use_triton:
        if not _HAS_TRITON_OP:  # forced use off CUDA (tests under TRITON_INTERPRET=1): import on demand
            _load_triton_op()
        return torch.ops.vllm_doge.cdmoe_routed(h, weights, ids, down_embed, up_embed)
    return routed_experts_torch(h, weights, ids, down_embed, up_embed)


class _ExpertTable(nn.Module):
    """A replicated [E, hidden] table exposing `.weight` (checkpoint key `...down_embed.weight`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, replicated"


class DogeCDMoE(LlamaMLP):
    """vLLM CDMoE layer: vLLM's LlamaMLP is the shared SwiGLU (gate_up_proj, down_proj), plus the routed
    product-key experts (router_gate, down_embed, up_embed).

    Tensor parallelism: the shared MLP is sharded and all-reduced as in Llama (its bias added once). The
    router and both expert tables are replicated, and every rank adds the same routed sum after the
    all-reduce: no extra collective, and the result equals tp=1's. The tables are small (2·E·hidden:
    0.5 M values for Doge-20M-MoE) and the routed work O(T·k·hidden) is tiny next to the shared MLP's
    O(T·hidden·intermediate/tp), so repeating it on each rank costs little.
    """

    def __init__(self, spec: DogeSpec, quant_config=None, prefix: str = "") -> None:
        super().__init__(
            spec.hidden_size,
            spec.intermediate_size,
            spec.hidden_act,
            quant_config=quant_config,
            bias=spec.mlp_bias,
            prefix=prefix,
        )
        experts = spec.experts
        self.num_keys, self.top_k, self.norm_topk_prob = experts.keys, experts.top_k, experts.norm_topk_prob
        # The router stays unquantised (tiny, and its top-k decisions are sensitive to rounding).
        self.router_gate = ReplicatedLinear(
            spec.hidden_size, 2 * self.num_keys, bias=experts.router_bias, quant_config=None, prefix=f"{prefix}.router_gate"
        )
        self.down_embed = _ExpertTable(experts.count, spec.hidden_size)
        self.up_embed = _ExpertTable(experts.count, spec.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.router_gate(hidden_states)
        weights, ids = route(router_logits, self.num_keys, self.top_k, self.norm_topk_prob)
        routed = routed_experts(hidden_states, weights, ids, self.down_embed.weight, self.up_embed.weight)
        return super().forward(hidden_states) + routed
