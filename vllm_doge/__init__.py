"""vLLM plugin for the Doge model family.

`register()` is the `vllm.general_plugins` entry point. It runs in every vLLM process, so this module
imports nothing heavy: the model is registered by its "module:Class" name and imported lazily.
"""


def register() -> None:
    """Point vLLM's registry at our native Doge model (wins over the Transformers fallback)."""
    from vllm import ModelRegistry

    if "DogeForCausalLM" not in ModelRegistry.get_supported_archs() or not _is_ours():
        ModelRegistry.register_model("DogeForCausalLM", "vllm_doge.model:DogeForCausalLM")


def _is_ours() -> bool:
    from vllm.model_executor.models.registry import ModelRegistry as _Registry

    model = _Registry.models.get("DogeForCausalLM")
    return getattr(model, "module_name", "") == "vllm_doge.model"
