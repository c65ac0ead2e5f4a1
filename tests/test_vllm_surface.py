"""vllm_doge/surface.py: the list of vLLM pieces the plugin relies on, checked against the installed vLLM
(by import and statically on its source), failing with the missing piece's name, and complete (every vLLM
name the plugin imports is on it). Cheap: no engine is started."""

import ast
import re
from pathlib import Path

import pytest
import torch

from tools import vllm_surface
from vllm_doge import lora, surface

PACKAGE = Path(surface.__file__).parent


def installed_root() -> Path:
    return surface._installed_tree().root


def test_installed_vllm_has_every_piece():
    results = surface.check_installed(platform_is_cpu=True)  # every stage, CPU and LoRA pieces included
    assert len(results) == len(surface.NEEDS)
    assert [(r.need.label, r.status, r.detail) for r in results if r.failed] == []


def test_installed_source_has_every_piece(capsys):
    results = surface.check_source(installed_root())
    assert [(r.need.label, r.status, r.detail) for r in results if r.failed] == []
    assert vllm_surface.main([str(installed_root())]) == 0
    out = capsys.readouterr().out
    assert f"{len(surface.NEEDS)} pieces, {len(surface.NEEDS)} ok" in out
    assert "vllm.model_executor.layers.attention.Attention" in out


def _vllm_imports():
    """(module, name) for every `from vllm… import name`, (module, None) for every `import vllm…`, in vllm_doge/."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
                found |= {(node.module, alias.name, path.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {(a.name, None, path.name) for a in node.names if a.name.split(".")[0] == "vllm"}
    return found


def test_every_vllm_name_the_plugin_imports_is_listed():
    imports = _vllm_imports()
    assert len(imports) > 40  # the scan sees the plugin's imports (model.py alone has 20)

    def listed(module, name):
        for need in surface.NEEDS:
            if name is None and module in need.modules and need.name is None:
                return True
            if name is not None and module in need.modules and need.name and need.name.split(".")[0] == name:
                return True
            if name is not None and f"{module}.{name}" in need.modules:  # `from vllm import _custom_ops`
                return True
        return False

    missing = sorted(f"{module}.{name} (imported in {where})" for module, name, where in imports if not listed(module, name))
    assert missing == [], "add these to vllm_doge/surface.py NEEDS: " + ", ".join(missing)


def test_static_check_names_a_removed_function_and_parameter(tmp_path, capsys):
    """A copy of vLLM's rotary_embedding package with get_rope's `rope_parameters` renamed, then get_rope
    deleted: the static check reports 'changed' naming the parameter, then 'missing' naming the function."""
    source = installed_root() / "vllm" / "model_executor" / "layers" / "rotary_embedding" / "__init__.py"
    target = tmp_path / "vllm" / "model_executor" / "layers" / "rotary_embedding" / "__init__.py"
    target.parent.mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (need,) = [n for n in surface.NEEDS if n.name == "get_rope"]
    text = source.read_text()
    assert "    rope_parameters:" in text
    target.write_text(text.replace("    rope_parameters:", "    rope_params:", 1))
    (result,) = surface.check_source(tmp_path, [need])
    assert (result.status, result.detail) == ("changed", "no parameter `rope_parameters`")

    target.write_text(text.replace("def get_rope(", "def get_rope_renamed(", 1))
    (result,) = surface.check_source(tmp_path, [need])
    assert result.status == "missing" and "defines no `get_rope`" in result.detail

    # The tool on that tree: every other piece is missing too, so it fails, and it names get_rope.
    assert vllm_surface.main([str(tmp_path)]) == 1
    assert re.search(r"^missing +vllm\.model_executor\.layers\.rotary_embedding\.get_rope ", capsys.readouterr().out, re.M)


def test_static_check_finds_a_piece_in_either_module(tmp_path):
    """A piece that moved between vLLM versions (as the CPU op wrappers did from vllm._custom_ops to
    vllm._cpu_ops in 0.34) is listed with both modules: the newer is tried first, the older still counts."""
    need = surface.Need(("vllm._cpu_ops", "vllm._custom_ops"), "cpu_attn_reshape_and_cache", "a moved op",
                        args=("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"))
    root = tmp_path / "vllm"
    root.mkdir()
    (root / "__init__.py").write_text("")
    op = "def cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa, k_scale=1.0):\n    pass\n"
    (root / "_custom_ops.py").write_text(op)
    assert surface.check_source(tmp_path, [need])[0] == surface.Result(need, "ok", "in vllm._custom_ops")
    (root / "_cpu_ops.py").write_text(op)
    assert surface.check_source(tmp_path, [need])[0] == surface.Result(need, "ok", "in vllm._cpu_ops")
    for path in (root / "_cpu_ops.py", root / "_custom_ops.py"):
        path.write_text(op.replace("slot_mapping, isa", "isa, slot_mapping"))
    result = surface.check_source(tmp_path, [need])[0]
    assert result.status == "changed" and "positional parameters" in result.detail


def test_static_check_follows_reexports_and_reads_instance_attributes(tmp_path):
    """A name re-exported by a package (`from .layer import Layer`) and an attribute assigned in a base
    class's method count; one assigned nowhere does not."""
    pkg = tmp_path / "vllm" / "layers"
    pkg.mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .layer import Layer\n")
    (pkg / "base.py").write_text("class Base:\n    def __init__(self, size, *, prefix=''):\n        self.layer_name = prefix\n")
    (pkg / "layer.py").write_text("from vllm.layers.base import Base\n\nclass Layer(Base):\n    kind = 'x'\n")
    need = surface.Need("vllm.layers", "Layer", "a test", args=("size",), kwargs=("prefix",), attrs=("layer_name", "kind"))
    assert surface.check_source(tmp_path, [need])[0].status == "ok"
    gone = surface.Need("vllm.layers", "Layer", "a test", kwargs=("scale",), attrs=("impl",))
    assert surface.check_source(tmp_path, [gone])[0].detail == "no parameter `scale`; no attribute `impl`"


FAKES = (
    surface.Need("vllm.no_such_module", "thing", "the fake feature A", stage=surface.REGISTER),
    surface.Need("vllm.model_executor.layers.rotary_embedding", "get_rope", "the fake feature B", stage=surface.REGISTER,
                 kwargs=("no_such_parameter",)),
    surface.Need("vllm.config", "CacheConfig", "the fake feature C", stage=surface.REGISTER, attrs=("no_such_field",)),
)


def test_runtime_check_names_each_missing_piece_and_its_feature(monkeypatch):
    monkeypatch.setattr(surface, "NEEDS", surface.NEEDS + FAKES)
    monkeypatch.delenv(surface.ALLOW_UNTESTED, raising=False)
    with pytest.raises(RuntimeError) as error:
        surface.require(surface.REGISTER)
    message = str(error.value)
    assert "vllm.no_such_module.thing: missing (no module vllm.no_such_module); needed for the fake feature A" in message
    assert "get_rope: changed (no parameter `no_such_parameter`); needed for the fake feature B" in message
    assert "vllm.config.CacheConfig: changed (no attribute `no_such_field`); needed for the fake feature C" in message
    assert f"{surface.ALLOW_UNTESTED}=1" in message
    assert "init_logger" not in message  # only the failing pieces are named


def test_runtime_check_with_the_override_only_warns(monkeypatch):
    monkeypatch.setattr(surface, "NEEDS", surface.NEEDS + FAKES)
    monkeypatch.setenv(surface.ALLOW_UNTESTED, "1")
    surface.require(surface.REGISTER)  # no exception: the user asked to try


def test_optional_piece_only_warns(monkeypatch):
    fake = surface.Need("vllm.config", "ModelConfig", "a fallback", stage=surface.REGISTER, attrs=("gone",), required=False)
    monkeypatch.setattr(surface, "NEEDS", (fake,))
    monkeypatch.delenv(surface.ALLOW_UNTESTED, raising=False)
    surface.require(surface.REGISTER)


class _Manager:
    def __init__(self, wrapper):
        self.punica_wrapper_mapping = {0: wrapper}


def test_lora_slot_fix_follows_what_the_cpu_op_does(monkeypatch):
    """The installed vLLM 0.32's CPU shrink gives slot -1 the last slot's adapter, so the fix is applied;
    an op that masks slot -1 (as vLLM 0.33 and 0.34 do) leaves the wrapper as vLLM made it."""
    from vllm.lora.punica_wrapper import punica_cpu

    lora.cpu_ops_skip_unset_slot.cache_clear()
    try:
        out = torch.zeros(1, 2)
        punica_cpu.bgmv_shrink(torch.ones(1, 3), torch.ones(1, 1, 2, 3), out, torch.tensor([-1]), 1.0)
        leaks = bool(out.any())  # the probe's question, asked here directly
        assert lora.cpu_ops_skip_unset_slot() is (not leaks)
        wrapper = object.__new__(punica_cpu.PunicaWrapperCPU)
        lora.exact_base_rows(_Manager(wrapper))
        assert (type(wrapper) is not punica_cpu.PunicaWrapperCPU) is leaks

        original = punica_cpu.bgmv_shrink

        def masked(inputs, weights, output, indices, scaling=1.0):
            original(inputs, weights, output, indices.clamp(min=0), scaling)
            output[indices < 0] = 0

        monkeypatch.setattr(punica_cpu, "bgmv_shrink", masked)
        lora.cpu_ops_skip_unset_slot.cache_clear()
        assert lora.cpu_ops_skip_unset_slot() is True
        wrapper = object.__new__(punica_cpu.PunicaWrapperCPU)
        lora.exact_base_rows(_Manager(wrapper))
        assert type(wrapper) is punica_cpu.PunicaWrapperCPU
    finally:
        lora.cpu_ops_skip_unset_slot.cache_clear()
