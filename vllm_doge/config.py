"""Engine-config hook for Doge checkpoints (registered in vLLM's MODELS_CONFIG_MAP by `register()`).

It runs while vLLM builds its config, before the model exists:
- the checkpoint is described once (doge_format: either format, validated, a local checkpoint's files
  checked complete) and the description travels with the HF config to every worker (`spec_of`); the
  fields vLLM itself reads (head_dim, kv heads, tying) are set from it;
- weights are read from safetensors only;
- the context length is capped where the reference cannot be matched beyond it: dynamic-NTK RoPE is
  plain RoPE up to `max_position_embeddings` (vLLM would otherwise allow 4x that from its `factor`),
  and legacy checkpoints define no attention beyond their `keep_window_size`. A length the user asked
  for explicitly is refused instead of capped;
- the attention path is chosen once (backend/__init__.py: DOGE_ATTN on CPU, else the fold);
- a keep window shorter than the context relocates keys in the KV cache (keep_window.py): prefix caching
  is turned off, and speculative decoding and KV connectors are refused.
"""

import dataclasses
import json
import pathlib

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from doge_format import DogeSpec, describe, read_checkpoint

from .backend import choose_attention_path
from .keep_window import keep_window_binds

logger = init_logger(__name__)

SPEC_FIELD = "doge_spec"  # the HF config attribute that carries the DogeSpec (as plain data)


def spec_of(hf_config) -> DogeSpec:
    fields = getattr(hf_config, SPEC_FIELD, None)
    if fields is None:
        raise RuntimeError("Doge: the model config was not prepared by vllm_doge's config hook (is the plugin registered?)")
    return DogeSpec.from_dict(fields)


def raw_config(model_config) -> dict:
    """config.json as written, which tells absent fields from defaults (legacy: absent tie = tied)."""
    from transformers.utils import cached_file

    path = cached_file(model_config.model, "config.json", revision=model_config.revision)
    with open(path) as f:
        return json.load(f)


class DogeConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        config = model_config.hf_config
        local = pathlib.Path(model_config.model)
        spec = read_checkpoint(local) if local.is_dir() else describe(raw_config(model_config))
        if not spec.legacy:  # the HF config holds the transformers format, --hf-overrides included
            spec = describe(config.to_dict(), legacy=False)
        elif spec.dynamic_mask_ratio:
            raise ValueError(
                f"Doge (legacy format): `dynamic_mask_ratio` = {spec.dynamic_mask_ratio}; vLLM needs 0.0 — "
                "the published code masks a fraction of *all* keys of a forward call (future ones included), "
                "which depends on how a sequence is split and cannot be served exactly"
            )
        setattr(config, SPEC_FIELD, dataclasses.asdict(spec))
        config.head_dim = spec.head_dim
        config.num_key_value_heads = spec.num_kv_heads
        config.tie_word_embeddings = spec.tie_word_embeddings

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if vllm_config.load_config.load_format == "auto":
            vllm_config.load_config.load_format = "safetensors"  # never a pickled .bin
        model_config = vllm_config.model_config
        spec = spec_of(model_config.hf_config)
        limits = []
        if spec.rope_type == "dynamic":
            limits.append((spec.max_position_embeddings, "dynamic-NTK RoPE is plain RoPE only up to max_position_embeddings"))
        if spec.context_limit:
            limits.append((spec.context_limit, "the legacy format defines no attention beyond keep_window_size"))
        for limit, why in limits:
            if model_config.max_model_len <= limit:
                continue
            if getattr(model_config, "original_max_model_len", None) not in (None, -1):
                raise ValueError(f"Doge: max_model_len {model_config.max_model_len} > {limit}: {why}. Use --max-model-len <= {limit}.")
            logger.warning("Doge: capping max_model_len %d to %d: %s.", model_config.max_model_len, limit, why)
            model_config.max_model_len = limit
        binds = keep_window_binds(spec.keep_window, spec.sliding_window, model_config.max_model_len)
        if binds:
            refuse_with_keep_window(vllm_config, spec.keep_window)
        choose_attention_path(vllm_config, spec.keep_window if binds else None)


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
