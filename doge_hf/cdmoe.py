"""Feed-forward blocks: the dense SwiGLU MLP and CDMoE (SwiGLU plus a product-key expert memory).

CDMoE, per token h (E experts, K = √E product keys, top-k experts):
    x, y      = router_gate(h)[:K], router_gate(h)[K:]          the two halves of the SAME token's logits
    candidates: score x_a + y_b, expert a·K + b, for a ∈ topK(x), b ∈ topK(y)
    e_1..e_k  = top-k candidates,  w = softmax(their scores)
    out       = SwiGLU(h) + Σ_i w_i · act(down_embed[e_i] · h) · up_embed[e_i]

Routing is per token. transformers' built-in Doge computes `router_gate(h).view(2, bsz*seq_len, -1)`,
which during prefill pairs the first half of the flattened batch with the second half: a token is routed
with logits of other tokens (even other batch rows). With one token per forward the two agree, which is
how the tests check this implementation against transformers.
"""

import einx
import torch
from torch import nn
from transformers.activations import ACT2FN

from doge_format import DogeSpec


class DogeMLP(nn.Module):
    """SwiGLU: down(act(gate·h) ⊙ up·h)."""

    def __init__(self, spec: DogeSpec):
        super().__init__()
        hidden, inter, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = ACT2FN[spec.hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))


class DogeCDMoE(DogeMLP):
    """The shared SwiGLU (inherited) plus routed product-key experts."""

    def __init__(self, spec: DogeSpec):
        super().__init__(spec)
        experts = spec.experts
        self.num_keys = experts.keys
        self.top_k = experts.top_k
        self.norm_topk_prob = experts.norm_topk_prob
        # Some legacy SmallDoge checkpoints have a router bias; transformers' format has none.
        self.router_gate = nn.Linear(spec.hidden_size, 2 * self.num_keys, bias=experts.router_bias)
        self.down_embed = nn.Embedding(experts.count, spec.hidden_size)
        self.up_embed = nn.Embedding(experts.count, spec.hidden_size)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [..., hidden] -> routing weights and expert ids, both [..., top_k]."""
        logits_x, logits_y = self.router_gate(h).split(self.num_keys, dim=-1)
        score_x, key_x = logits_x.topk(self.num_keys, dim=-1)
        score_y, key_y = logits_y.topk(self.num_keys, dim=-1)
        scores = einx.add("... a, ... b -> ... (a b)", score_x, score_y)
        experts = einx.add("... a, ... b -> ... (a b)", key_x * self.num_keys, key_y)
        scores, picked = scores.topk(self.top_k, dim=-1)
        weights = scores.softmax(dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts.gather(-1, picked)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(h)
        down = self.down_embed(experts)  # [..., k, hidden]
        up = self.up_embed(experts)
        gates = self.act_fn(einx.dot("... k d, ... d -> ... k", down, h)) * weights
        routed = einx.dot("... k, ... k d -> ... d", gates, up)
        return super().forward(h) + routed
