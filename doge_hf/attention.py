"""Dynamic-mask attention (Doge): scores q·k/√d plus a per-key bias learnt from the value states.

    b_j   = exp(A ⊙ softplus(dt_proj(v_j)))          one bias per key and kv head; reads all kv heads of v_j
    s_ij  = q_i·k_j / √d + b_j                        for the keys query i may see (causal, sliding window)
    keep window W: if query i sees more than W keys, only its W keys with the largest b_j are kept
                   (ties go to the earlier key)
"""

import torch
import torch.nn.functional as F
from torch import nn

from doge_format import DogeSpec

from .layers import RMSNorm, apply_rotary


def rowwise_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(x) as a product and a sum per row: the same bits for a row whatever else is in the batch.

    A matrix multiply rounds a row differently with the number of rows (prefill vs decode). In layer 0
    a key's bias depends on its token only, so a repeated token must tie *exactly* with its earlier copy
    for the keep window's tie rule to decide, not rounding noise.
    """
    out = (x.unsqueeze(-2) * linear.weight).sum(-1)
    return out if linear.bias is None else out + linear.bias


def key_bias(value_states: torch.Tensor, dt_proj: nn.Linear, A: torch.Tensor) -> torch.Tensor:
    """[batch, keys, kv_heads·d] value states -> [batch, kv_heads, keys] additive bias.

    softplus and exp run in fp64 and round once: their vectorised and scalar code paths differ in the
    last bit, which would make a token's bias depend on where it sits in the batch."""
    dt = rowwise_linear(value_states, dt_proj)
    return torch.exp(A.double() * F.softplus(dt.double())).to(dt.dtype).transpose(1, 2)


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[q] and [k] absolute positions -> [q, k] bool: causal, and within the sliding window if any."""
    offset = query_pos[:, None] - key_pos[None, :]
    visible = offset >= 0
    if sliding_window is not None:
        visible &= offset < sliding_window
    return visible


def dynamic_mask(bias: torch.Tensor, visible: torch.Tensor, keep_window_size: int) -> torch.Tensor:
    """Additive mask [batch, kv_heads, q, k]: the bias where kept, the dtype's minimum elsewhere.

    `visible` is [batch, 1, q, k]. Masked entries use the dtype minimum rather than -inf so that a
    query that sees nothing (left padding) gets a uniform softmax instead of NaN.
    """
    masked = torch.finfo(bias.dtype).min
    mask = bias[:, :, None, :].masked_fill(~visible, masked)
    if mask.shape[-1] > keep_window_size:
        # Invisible keys hold the minimum, so they never outrank a visible key. Equal biases are real
        # (in layer 0 a repeated token has exactly its earlier copy's bias): a stable sort keeps the
        # earlier key, the same rule at every query, where topk's choice among ties is unspecified.
        top = mask.sort(dim=-1, descending=True, stable=True).indices[..., :keep_window_size]
        kept = torch.zeros_like(mask, dtype=torch.bool).scatter(-1, top, True)
        mask = mask.masked_fill(~kept, masked)
    return mask


class DogeAttention(nn.Module):
    def __init__(self, spec: DogeSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.keep_window_size = spec.keep_window
        self.sliding_window = spec.sliding_window
        bias = spec.attention_bias
        d, hidden = self.head_dim, spec.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.A = nn.Parameter(torch.zeros(self.num_kv_heads))
        self.dt_proj = nn.Linear(self.num_kv_heads * d, self.num_kv_heads, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=bias)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps)
        self.k_norm = RMSNorm(d, spec.rms_norm_eps)

    def project(self, hidden_states, cos_sin):
        """q, k (normed, rotated) and v of new tokens: [b, heads or kv heads, q, d]."""
        b, q_len, _ = hidden_states.shape
        d = self.head_dim
        q = self.q_norm(self.q_proj(hidden_states).view(b, q_len, -1, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(b, q_len, -1, d)).transpose(1, 2)
        v = rowwise_linear(hidden_states, self.v_proj).view(b, q_len, -1, d).transpose(1, 2)
        return (*apply_rotary(q, k, *cos_sin), v)

    def forward(self, hidden_states, cos_sin, past_len: int, attention_mask=None, past_key_values=None):
        """hidden_states [b, q, hidden] follow `past_len` cached tokens; attention_mask [b, past_len + q]
        (1 = real token, 0 = padding) as in transformers."""
        b, q_len, _ = hidden_states.shape
        d = self.head_dim
        q, k, v = self.project(hidden_states, cos_sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        # The bias of every key the query may see, cached ones included: [b, kv, k].
        kv_len, end = k.shape[2], past_len + q_len
        bias = key_bias(v.transpose(1, 2).reshape(b, kv_len, -1), self.dt_proj, self.A)
        # A sliding-window cache may hold only the most recent keys: they are the last kv_len positions.
        query_pos = torch.arange(past_len, end, device=q.device)
        key_pos = torch.arange(end - kv_len, end, device=q.device)
        visible = visible_keys(query_pos, key_pos, self.sliding_window)[None, None]
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, -kv_len:].bool()
        mask = dynamic_mask(bias, visible, self.keep_window_size)

        groups = self.num_heads // self.num_kv_heads
        k, v, mask = (t.repeat_interleave(groups, dim=1) for t in (k, v, mask))
        scores = q @ k.transpose(-1, -2) * d**-0.5 + mask
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, q_len, -1)
        return self.o_proj(out)


__all__ = ["DogeAttention", "dynamic_mask", "key_bias", "visible_keys"]
