"""vLLM plugin for the Doge model family.

`register()` is the `vllm.general_plugins` entry point. It runs in every vLLM process, so it imports
nothing heavy: the model is registered by its "module:Class" name and imported lazily.

The plugin reaches into vLLM pieces that are not a stable API (the config-hook table, attention-backend
classes and metadata, layer constructors' keyword arguments). surface.py lists each of
them; instead of a version gate, `register()` checks that the installed vLLM has the ones registration
needs (model.py and lora.py check the rest where they are used) and refuses a vLLM that lacks one,
naming it, unless VLLM_DOGE_ALLOW_UNTESTED_VLLM=1 says to try.
"""

from .surface import ALLOW_UNTESTED  # noqa: F401  (the override's name, for users and tests)

ARCHITECTURES = ("DogeForCausalLM", "DogeForSequenceClassification")


def register() -> None:
    """Point vLLM at our native Doge model (it wins over the Transformers fallback) and its config hook."""
    from . import surface

    surface.require(surface.REGISTER)  # before the imports below, so that a missing piece is named
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from . import backend
    from .config import DogeConfigHook

    backend.register()
    ModelRegistry.register_model("DogeForCausalLM", "vllm_doge.model:DogeForCausalLM")
    for architecture in ARCHITECTURES:
        MODELS_CONFIG_MAP[architecture] = DogeConfigHook
