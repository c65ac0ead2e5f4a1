"""Doge's own attention backend on CPU (DOGE_ATTN), and the choice between it and the fold.

Two paths compute the same attention:
- DOGE_ATTN (CPU): K/V unpadded, the bias in fp32 beside them, the plugin's C++ kernels (ops.py);
- the fold (attention.py) on vLLM's stock backend: the bias in a padded head channel. It serves GPUs,
  quantized (fp8) KV caches, and any CPU where the kernels cannot be built or loaded (ops.load says
  why, once). A model whose keep window binds needs DOGE_ATTN (keep_window.py) and is refused elsewhere.

The config hook decides once per engine and records the choice in ``additional_config``, which vLLM
hashes into its compile cache key, so a cached graph of one path is never reused for the other.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

logger = init_logger(__name__)

BACKEND_NAME = "DOGE_ATTN"

PATH_FIELD = "doge_attention"  # the additional_config key holding the chosen path
FOLD = "fold"
FORCE = "VLLM_DOGE_ATTENTION"  # "fold" serves through the fold even where DOGE_ATTN could run


def register() -> None:
    """Make DOGE_ATTN a name vLLM resolves (Attention looks the backend's name up in its enum); runs in
    every vLLM process, so the backend module itself is not imported here."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, "vllm_doge.backend.backend.DogeAttentionBackend")


def choose_attention_path(vllm_config, keep_window: int | None) -> str:
    """DOGE_ATTN where it serves exactly, else the fold; recorded in vllm_config.additional_config.
    `keep_window`: W when the model's keep window binds (then only DOGE_ATTN serves it), else None."""
    from vllm.platforms import current_platform

    reason = None
    cache_dtype = vllm_config.cache_config.cache_dtype
    if os.environ.get(FORCE, "auto") == FOLD:
        reason = f"{FORCE}={FOLD}"
    elif not current_platform.is_cpu():
        reason = f"{BACKEND_NAME} runs on CPU only"
    elif cache_dtype != "auto":
        reason = f"a quantized KV cache ({cache_dtype}): {BACKEND_NAME} stores K and V in the model's dtype"
    else:
        from . import ops

        if not ops.load():
            reason = "its C++ kernels are not available (see the warning above)"
    if reason and keep_window:
        raise ValueError(
            f"Doge: keep_window_size {keep_window} < max_model_len {vllm_config.model_config.max_model_len} needs "
            f"{BACKEND_NAME}, which keeps each query's top keys exactly, but {reason}. Serve with "
            f"--max-model-len <= {keep_window} (then no query sees more than the window, and the folded bias "
            "is exact on any backend)."
        )
    path = FOLD if reason else BACKEND_NAME
    if reason is None:
        logger.info("Doge: attention on %s (kernels: %s).", BACKEND_NAME, ops.isa())
    elif current_platform.is_cpu():
        logger.info("Doge: attention through the folded bias on vLLM's stock backend: %s.", reason)
    if not isinstance(vllm_config.additional_config, dict):
        raise ValueError("Doge: additional_config must be a dict (the plugin records its attention path there)")
    vllm_config.additional_config[PATH_FIELD] = path
    return path


def attention_path(vllm_config) -> str:
    config = vllm_config.additional_config
    return config.get(PATH_FIELD, FOLD) if isinstance(config, dict) else FOLD
