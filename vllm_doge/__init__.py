"""vLLM plugin for the Doge model family.

`register()` is the `vllm.general_plugins` entry point. It runs in every vLLM process, so it imports
nothing heavy: the model is registered by its "module:Class" name and imported lazily.
"""

ARCHITECTURES = ("DogeForCausalLM", "DogeForSequenceClassification")


def register() -> None:
    """Point vLLM at our native Doge model (it wins over the Transformers fallback) and its config hook."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    ModelRegistry.register_model("DogeForCausalLM", "vllm_doge.model:DogeForCausalLM")
    from .config import DogeConfigHook

    for architecture in ARCHITECTURES:
        MODELS_CONFIG_MAP[architecture] = DogeConfigHook
