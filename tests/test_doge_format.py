"""doge_format: one description of both checkpoint formats (spec.py) and of their tensors (checkpoint.py).

The models built from these descriptions are tested against their oracles elsewhere (test_doge_hf,
test_legacy_hf, test_model); here: the fields each format defaults, validates and derives, format
detection, the expected tensors, and the checks on a checkpoint's files.
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from doge_format import (DogeCheckpointError, DogeConfigError, DogeSpec, check_safetensors_files, describe,
                         expected_shapes, is_legacy, read_checkpoint)
from doge_hf.legacy import LegacyDogeConfig
from tools.build_checkpoint import legacy_config_dict

PRESETS = ["dense-gqa", "dense-mha", "moe"]


def test_transformers_format_spec(checkpoints):
    spec = read_checkpoint(checkpoints("moe-keep-window"))
    assert not spec.legacy and spec.qk_norm and spec.masks_per_kv_head == 1 and spec.mask_rows == 2
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.keep_window, spec.context_limit) == (4, 2, 16, 16, None)
    assert (spec.experts.count, spec.experts.keys, spec.experts.top_k, spec.experts.router_bias) == (64, 8, 8, False)
    # absent fields take transformers' DogeConfig defaults; the older RoPE spelling is normalised
    spec = describe({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 50.0})
    assert spec.keep_window == 2048 and spec.rope == {"rope_type": "default", "rope_theta": 50.0}
    assert describe({"hidden_size": 66, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}).head_dim == 16


def test_legacy_format_spec(legacy):
    spec = read_checkpoint(legacy("dense-gqa"))
    assert spec.legacy and not spec.qk_norm and spec.masks_per_kv_head == 2 and spec.mask_rows == 4
    assert spec.tie_word_embeddings and spec.keep_window is None  # tying is that format's default
    assert spec.rope == {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    spec = read_checkpoint(legacy("moe", router_bias=True))
    assert spec.context_limit == 512 and spec.experts.router_bias  # only the tensor names tell
    assert not read_checkpoint(legacy("moe")).experts.router_bias


def test_spec_travels_as_plain_data(legacy, checkpoints):
    """The vLLM config hook ships the spec to every worker inside the HF config, as JSON-able data."""
    for path in (legacy("moe", router_bias=True), checkpoints("moe")):
        spec = read_checkpoint(path)
        data = json.loads(json.dumps(dataclasses.asdict(spec)))
        assert DogeSpec.from_dict(data) == spec


@pytest.mark.parametrize("preset", ["dense-gqa", "moe", "dense-mha-tied"])
def test_expected_shapes_are_the_checkpoint(checkpoints, preset):
    path = pathlib.Path(checkpoints(preset))
    stored = {k: tuple(v.shape) for k, v in load_file(path / "model.safetensors").items()}
    assert expected_shapes(read_checkpoint(path)) == stored


def test_expected_shapes_of_the_legacy_format(legacy):
    from doge_format import legacy_to_transformers_name

    path = legacy("moe", router_bias=True)
    stored = {legacy_to_transformers_name(k): tuple(v.shape) for k, v in load_file(path / "model.safetensors").items()}
    assert expected_shapes(read_checkpoint(path)) == stored


def test_checkpoint_files_are_checked(checkpoints, tmp_path):
    src = pathlib.Path(checkpoints("dense-gqa"))
    shutil.copytree(src, tmp_path / "cut")
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(DogeCheckpointError, match="truncated or corrupt"):
        check_safetensors_files(tmp_path / "cut")
    (tmp_path / "cut" / "model.safetensors").unlink()
    (tmp_path / "cut" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DogeCheckpointError, match=r"no \*\.safetensors file \(pytorch_model\.bin\)"):
        read_checkpoint(tmp_path / "cut")


def test_legacy_tied_head_must_equal_the_embedding(legacy, tmp_path):
    """Tying is the legacy default: a stored lm_head must be the embedding again, byte for byte."""
    src = legacy("dense-gqa")
    shutil.copytree(src, tmp_path / "same")
    state = load_file(src / "model.safetensors")
    save_file({**state, "lm_head.weight": state["model.word_embed.weight"].clone()}, tmp_path / "same" / "model.safetensors")
    assert read_checkpoint(tmp_path / "same").tie_word_embeddings
    shutil.copytree(src, tmp_path / "other")
    save_file({**state, "lm_head.weight": state["model.word_embed.weight"] * 2}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(DogeConfigError, match="different from model.word_embed.weight"):
        read_checkpoint(tmp_path / "other")


def test_no_model_code_is_imported():
    code = "import sys, doge_format; print(sorted(m for m in sys.modules if m.startswith(('doge_hf', 'vllm', 'einx'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"




@pytest.mark.parametrize("overrides, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=66), "hidden_size"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(dynamic_mask_ratio=1.0), "dynamic_mask_ratio"),
    (dict(dynamic_mask_ratio=0.2, keep_window_size=64), "dynamic_mask_ratio"),
    (dict(is_moe=True, num_experts=60), "num_experts"),
    (dict(is_moe=True, num_experts=64, num_experts_per_tok=65), "num_experts_per_tok"),
    (dict(expert_index="first"), "expert_index"),
    (dict(architectures=["DogeForSequenceClassification"]), "architectures"),
])
def test_config_rejects(overrides, field):
    fields = {k: v for k, v in legacy_config_dict("dense-gqa").items() if k != "torch_dtype"}
    with pytest.raises(DogeConfigError, match=f"`{field}`"):
        LegacyDogeConfig(**{**fields, **overrides})


def test_config_reads_published_layout(legacy):
    config = LegacyDogeConfig.from_pretrained(legacy("dense-gqa"))
    assert (config.num_key_value_heads, config.tie_word_embeddings, config.dynamic_mask_ratio) == (2, True, 0.0)
    assert config.rope_scaling["rope_type"] == "dynamic" and config.num_cdmmoe_experts == 2048
    # num_key_value_heads absent: MHA (that code's default)
    fields = legacy_config_dict("dense-gqa")
    fields = {k: v for k, v in fields.items() if k not in ("torch_dtype", "num_key_value_heads")}
    assert LegacyDogeConfig(**fields).num_key_value_heads == 4


def test_detection(legacy, checkpoints):
    for preset in PRESETS:
        assert is_legacy({}, set(load_file(legacy(preset) / "model.safetensors")))
    assert not read_checkpoint(checkpoints("dense-gqa")).legacy  # the transformers format
    assert is_legacy({"model_type": "doge", "dynamic_mask_ratio": 0.0})
    assert is_legacy({"model_type": "doge", "hidden_bias": False})
    remote = {"AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"}
    assert is_legacy({"model_type": "doge", "auto_map": remote})
    transformers_cfg = json.loads((pathlib.Path(checkpoints("dense-gqa")) / "config.json").read_text())
    assert not is_legacy(transformers_cfg)
    assert not is_legacy({"model_type": "llama", "hidden_bias": False})


def test_transformers_checkpoint_is_not_read_as_legacy(checkpoints):
    with pytest.raises(DogeConfigError, match="word_embed"):
        read_checkpoint(checkpoints("dense-gqa"), legacy=True)
