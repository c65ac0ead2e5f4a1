"""vLLM plugin for the Doge model family.

`register()` is the `vllm.general_plugins` entry point. It runs in every vLLM process, so it imports
nothing heavy: the model is registered by its "module:Class" name and imported lazily.

The plugin reaches into a few vLLM pieces that are not a stable API (MODELS_CONFIG_MAP and
VerifyAndUpdateConfig, `original_max_model_len`, the CPU KV-cache page layout in cpu_cache.py), so it
refuses a vLLM outside the tested range unless VLLM_DOGE_ALLOW_UNTESTED_VLLM=1 says to try.
"""

import os

ARCHITECTURES = ("DogeForCausalLM", "DogeForSequenceClassification")
TESTED_VLLM = ("0.32.",)  # version prefixes the plugin was written and tested against
ALLOW_UNTESTED = "VLLM_DOGE_ALLOW_UNTESTED_VLLM"


def check_vllm_version(version: str) -> None:
    """Raise unless `version` is a tested vLLM or the override is set (then only warn)."""
    if version.startswith(TESTED_VLLM):
        return
    message = (
        f"vllm-doge was tested with vLLM {' / '.join(p + 'x' for p in TESTED_VLLM)}, and vLLM {version} is "
        "installed: the private pieces the plugin uses may have changed. Install a tested vLLM"
    )
    if os.environ.get(ALLOW_UNTESTED) != "1":
        raise RuntimeError(f"{message}, or set {ALLOW_UNTESTED}=1 to try anyway.")
    from vllm.logger import init_logger

    init_logger(__name__).warning("%s; trying anyway (%s=1).", message, ALLOW_UNTESTED)


def register() -> None:
    """Point vLLM at our native Doge model (it wins over the Transformers fallback) and its config hook."""
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from . import backend
    from .config import DogeConfigHook

    backend.register()
    ModelRegistry.register_model("DogeForCausalLM", "vllm_doge.model:DogeForCausalLM")
    for architecture in ARCHITECTURES:
        MODELS_CONFIG_MAP[architecture] = DogeConfigHook
