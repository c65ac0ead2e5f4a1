"""doge_format: the Doge checkpoint formats, described once (no model code, no torch).

`spec.py` turns a config.json (transformers format or legacy SmallDoge format) into a frozen DogeSpec with
one validation; `checkpoint.py` knows the tensors a checkpoint holds. The reference model (doge_hf) and
the vLLM model (vllm_doge) both build from them.
"""

from .checkpoint import (
    LEGACY_RENAMES,
    DogeCheckpointError,
    check_safetensors_files,
    checked,
    expected_shapes,
    legacy_to_transformers_name,
    read_checkpoint,
)
from .spec import DogeConfigError, DogeSpec, Experts, describe, is_legacy

__all__ = [
    "LEGACY_RENAMES",
    "DogeCheckpointError",
    "DogeConfigError",
    "DogeSpec",
    "Experts",
    "check_safetensors_files",
    "checked",
    "describe",
    "expected_shapes",
    "is_legacy",
    "legacy_to_transformers_name",
    "read_checkpoint",
]
