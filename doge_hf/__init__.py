"""doge_hf: the reference Doge implementation (HF transformers, no vLLM), written from the equations.

It is the oracle of the tests. `DogeForCausalLM` is transformers' Doge format; `legacy.LegacyDogeForCausalLM`
the legacy SmallDoge format. Both read their configuration through doge_format.
"""

from doge_format import DogeConfigError

from .configuration import DogeConfig, LegacyDogeConfig, spec_of
from .modeling import DogeForCausalLM, DogeForSequenceClassification, DogeModel, DogePreTrainedModel

__all__ = [
    "DogeConfig",
    "DogeConfigError",
    "DogeForCausalLM",
    "DogeForSequenceClassification",
    "DogeModel",
    "DogePreTrainedModel",
    "LegacyDogeConfig",
    "spec_of",
]
