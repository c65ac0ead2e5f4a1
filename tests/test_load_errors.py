"""Checkpoints the native model cannot run are refused at engine start with an error that names the
field or tensor and what was expected."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity import engine, error_chain


def broken_copy(src, dst, *, config=None, tensors=None):
    """Copy a checkpoint, then apply `config(dict)` and `tensors(dict)` edits in place."""
    shutil.copytree(src, dst)
    if config is not None:
        path = dst / "config.json"
        fields = json.loads(path.read_text())
        config(fields)
        path.write_text(json.dumps(fields))
    if tensors is not None:
        path = dst / "model.safetensors"
        state = load_file(path)
        tensors(state)
        save_file(state, path, metadata={"format": "pt"})
    return str(dst)


def drop(key):
    return lambda state: state.pop(key)


def reshape(key, shape):
    def edit(state):
        state[key] = torch.zeros(shape)

    return edit


def setfield(**values):
    return lambda fields: fields.update(values)


CASES = {
    "missing tensor": (
        "dense-gqa",
        dict(tensors=drop("model.layers.1.self_attn.dt_proj.weight")),
        r"model\.layers\.1\.self_attn\.dt_proj\.weight.*missing",
    ),
    "A of the wrong shape": (
        "dense-gqa",
        dict(tensors=reshape("model.layers.0.self_attn.A", (4,))),
        r"model\.layers\.0\.self_attn\.A.*\(4,\).*expected \(2,\)",
    ),
    "dt_proj of the wrong shape": (
        "dense-gqa",
        dict(tensors=reshape("model.layers.0.self_attn.dt_proj.weight", (4, 32))),
        r"dt_proj\.weight.*expected \(2, 32\)",
    ),
    "expert table of the wrong shape": (
        "moe",
        dict(tensors=reshape("model.layers.0.mlp.up_embed.weight", (49, 64))),
        r"up_embed\.weight.*expected \(64, 64\)",
    ),
    "num_experts not a square": ("moe", dict(config=setfield(num_experts=60)), r"`num_experts` = 60.*perfect square"),
    "top-k above num_experts": ("moe", dict(config=setfield(num_experts_per_tok=65)), r"`num_experts_per_tok` = 65"),
    "keep window below 1": ("dense-gqa", dict(config=setfield(keep_window_size=0)), r"`keep_window_size` = 0"),
    "head size no backend runs (the fold)": (
        "dense-gqa",
        dict(config=setfield(head_dim=512)),
        r"head size with the dynamic-mask bias channels is 513, and no attention backend",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_with_clear_error(checkpoints, tmp_path, monkeypatch, case):
    preset, edits, message = CASES[case]
    if "(the fold)" in case:  # DOGE_ATTN runs any even head size; the stock backends do not
        monkeypatch.setenv("VLLM_DOGE_ATTENTION", "fold")
    path = broken_copy(checkpoints(preset), tmp_path / "broken", **edits)
    with pytest.raises(Exception) as failure:
        with engine(path, skip_tokenizer_init=True):
            pass
    chain = error_chain(failure.value)  # the engine may wrap the model's error
    assert any(__import__("re").search(message, text) for text in chain), chain
