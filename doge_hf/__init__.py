"""doge_hf: the reference Doge implementation (HF transformers, no vLLM), written from the equations.

It is the oracle of the tests, and it builds the tiny checkpoints they run on.
"""

from .configuration import DogeConfig, DogeConfigError, validate_doge_config
from .modeling import DogeForCausalLM, DogeForSequenceClassification, DogeModel, DogePreTrainedModel

__all__ = [
    "DogeConfig",
    "DogeConfigError",
    "DogeForCausalLM",
    "DogeForSequenceClassification",
    "DogeModel",
    "DogePreTrainedModel",
    "validate_doge_config",
]
