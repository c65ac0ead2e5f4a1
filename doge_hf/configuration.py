"""The two Doge formats as transformers configs, each validated by doge_format at construction.

- `DogeConfig`: transformers' built-in Doge configuration (same config.json), RoPE as `rope_parameters`
  or in the older `rope_theta` / `rope_scaling` spelling, and an optional `head_dim`.
- `LegacyDogeConfig`: config.json of the legacy SmallDoge format, whose defaults (tying when absent, MHA
  when `num_key_value_heads` is absent, …) are doge_format's `LEGACY_DEFAULTS`.

`spec_of(config)` is the DogeSpec the model classes build from.
"""

from typing import Any

from transformers import DogeConfig as _TransformersDogeConfig
from transformers import PreTrainedConfig

from doge_format import DogeConfigError, DogeSpec, describe
from doge_format.spec import LEGACY_DEFAULTS


class DogeConfig(_TransformersDogeConfig):
    """transformers' Doge configuration plus validation at construction."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        describe(self.to_dict(), legacy=False)


class LegacyDogeConfig(PreTrainedConfig):
    """config.json of the legacy format. Its fields and their defaults are doge_format's LEGACY_DEFAULTS,
    declared as this dataclass's fields below. `router_bias` is not a config.json field of the published
    checkpoints: `LegacyDogeForCausalLM.from_pretrained` reads it from the checkpoint's tensor names."""

    model_type = "doge"
    __annotations__ = {**dict.fromkeys(LEGACY_DEFAULTS, Any), "router_bias": bool}
    vars().update(LEGACY_DEFAULTS, router_bias=False)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads  # that code's default: MHA
        describe(self.to_dict(), legacy=True)


def spec_of(config) -> DogeSpec:
    return describe(config.to_dict(), legacy=isinstance(config, LegacyDogeConfig))


__all__ = ["DogeConfig", "DogeConfigError", "LegacyDogeConfig", "spec_of"]
