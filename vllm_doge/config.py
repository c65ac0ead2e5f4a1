"""Engine-config hook for Doge checkpoints (registered in vLLM's MODELS_CONFIG_MAP by `register()`).

It runs while vLLM builds its config, before the model exists:
- weights are read from safetensors only, and a local checkpoint's files are checked to be complete;
- the legacy SmallDoge format (published remote-code checkpoints) is recognised from its config.json, and
  the fields that format spells or defaults differently are set on the config vLLM passes to the model;
- the context length is capped where the reference cannot be matched beyond it: dynamic-NTK RoPE is
  plain RoPE up to `max_position_embeddings` (vLLM would otherwise allow 4x that from its `factor`),
  and legacy checkpoints define no keep-window top-k. A length the user asked for explicitly is refused
  instead of capped;
- a keep window shorter than the context relocates keys in the KV cache (keep_window.py): prefix caching
  is turned off, and speculative decoding and KV connectors are refused.
"""

import json
import pathlib

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .checkpoint import check_safetensors_files
from .keep_window import keep_window_binds

logger = init_logger(__name__)


def raw_config(model_config) -> dict:
    """config.json as written, which tells absent fields from defaults (legacy: absent tie = tied)."""
    from transformers.utils import cached_file

    path = cached_file(model_config.model, "config.json", revision=model_config.revision)
    with open(path) as f:
        return json.load(f)


def rope_type(config) -> str:
    return (config.rope_parameters or {}).get("rope_type", "default")


class DogeConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        from doge_hf.legacy import LegacyDogeConfig, is_legacy_checkpoint

        local = pathlib.Path(model_config.model)
        if local.is_dir():
            check_safetensors_files(local)
        fields = raw_config(model_config)
        config = model_config.hf_config
        config.doge_legacy = is_legacy_checkpoint(fields)
        if not config.doge_legacy:
            return
        legacy = LegacyDogeConfig(**fields)  # validates, with that format's defaults
        if legacy.dynamic_mask_ratio:
            raise ValueError(
                f"Doge (legacy format): `dynamic_mask_ratio` = {legacy.dynamic_mask_ratio}; vLLM needs 0.0 — "
                "the published code masks a fraction of *all* keys of a forward call (future ones included), "
                "which depends on how a sequence is split and cannot be served exactly"
            )
        config.tie_word_embeddings = legacy.tie_word_embeddings
        config.attention_bias = config.mlp_bias = legacy.hidden_bias
        config.head_dim = legacy.head_dim
        config.num_key_value_heads = legacy.num_key_value_heads
        # The legacy format has no keep-window top-k: `keep_window_size` only caps the context below.
        config.doge_legacy_window = legacy.keep_window_size
        config.keep_window_size = 2**31 - 1

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if vllm_config.load_config.load_format == "auto":
            vllm_config.load_config.load_format = "safetensors"  # never a pickled .bin
        model_config = vllm_config.model_config
        config = model_config.hf_config
        limits = []
        if rope_type(config) == "dynamic":
            limits.append((config.max_position_embeddings, "dynamic-NTK RoPE is plain RoPE only up to max_position_embeddings"))
        if getattr(config, "doge_legacy_window", None):
            limits.append((config.doge_legacy_window, "the legacy format defines no attention beyond keep_window_size"))
        for limit, why in limits:
            if model_config.max_model_len <= limit:
                continue
            if getattr(model_config, "original_max_model_len", None) not in (None, -1):
                raise ValueError(f"Doge: max_model_len {model_config.max_model_len} > {limit}: {why}. Use --max-model-len <= {limit}.")
            logger.warning("Doge: capping max_model_len %d to %d: %s.", model_config.max_model_len, limit, why)
            model_config.max_model_len = limit
        if keep_window_binds(config.keep_window_size, getattr(config, "sliding_window", None), model_config.max_model_len):
            refuse_with_keep_window(vllm_config, config.keep_window_size)


def refuse_with_keep_window(vllm_config, window: int) -> None:
    """Settings that cannot be exact once the keep window relocates keys (keep_window.py): cached blocks
    are edited in place, so their contents are no longer determined by their tokens."""
    why = f"keep_window_size {window} < max_model_len {vllm_config.model_config.max_model_len}: keys are relocated in the KV cache"
    if vllm_config.speculative_config is not None:
        raise ValueError(f"Doge: speculative decoding is not supported with {why} (rejected drafts would need relocations undone).")
    if vllm_config.kv_transfer_config is not None or vllm_config.cache_config.kv_offloading_size:
        raise ValueError(f"Doge: KV connectors and offloading are not supported with {why} (stored blocks are edited).")
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        cache_config.enable_prefix_caching = False
        logger.info("Doge: prefix caching turned off: %s, so a cached block must never be shared.", why)
