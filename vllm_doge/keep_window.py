"""Doge's keep window served as a sliding window of W + 1 slots on DOGE_ATTN, exactly (design §3b).

Past ``keep_window_size`` (W) keys, a query keeps only its W keys with the largest bias (equal biases:
the earlier key wins). The bias depends on the key alone, so the kept set only shrinks:
K_p = top-W(K_{p-1} ∪ {p}). Each layer is declared sliding-window W + 1, so vLLM frees every block
wholly before the window. DOGE_ATTN's page carries, beside each slot's K, V and fp32 bias, the original
position of the key it holds (int32), and its ops keep the invariant

    after the step of position p, the slots max(0, p-W+1) … p of each (request, kv head) hold K_p

- decode (one query at p >= W, its key written to slot p): of the W + 1 keys in slots p-W … p the
  lowest-ranked one leaves; slot p-W's entry moves onto its slot (nothing moves when it is p-W's own),
  and the query attends the W slots p-W+1 … p with the ordinary kernel (window W). vLLM keeps slot p-W's
  block until this step, the W + 1 of the spec.
- a prefill chunk p0 … p1: each query i keeps the top W of K_{p0-1} (the slots before p0) and the
  chunk's keys up to i, computed exactly in the kernel, each block of queries against at most W + block
  candidates; then K_{p1} is packed into the slots p1-W+1 … p1.

Keys are never read below the window start (the worker's block table still lists freed blocks, which may
hold other requests' keys). The step plan (which requests decode, which prefill) is made once per step
by the backend's metadata builder and shared by the layers; torch.compile sees one opaque op.
Cached blocks are edited, so the config hook turns prefix caching off and refuses speculative decoding
and KV connectors for such a model.
"""

from __future__ import annotations


def keep_window_binds(keep_window_size: int | None, sliding_window: int | None, max_model_len: int) -> bool:
    """Whether some query can see more than W keys (then the layer relocates keys; else the fold alone
    is exact; None: no keep window). A true sliding window wider than W lets keys that left the kept set
    return: refused."""
    if keep_window_size is None or max_model_len <= keep_window_size or (sliding_window is not None and sliding_window <= keep_window_size):
        return False
    if sliding_window is not None:
        raise ValueError(
            f"Doge: keep_window_size {keep_window_size} together with sliding_window {sliding_window} > "
            f"keep_window_size cannot be served exactly (keys leaving the sliding window let dropped keys "
            f"return). Serve with --max-model-len <= {keep_window_size}."
        )
    return True
