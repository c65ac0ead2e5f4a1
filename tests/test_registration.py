"""vllm_doge/__init__.py: the plugin's entry point, the vLLMs it accepts (any version that has the pieces
surface.py lists; tests/test_vllm_surface.py checks the list itself), and what a serving process imports
(the plugin only: not the reference model nor the test tooling)."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import vllm_doge


def test_entry_point_is_registered():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [p.value for p in plugins if p.name == "doge"] == ["vllm_doge:register"]


def test_installed_vllm_has_what_registration_needs():
    from vllm_doge import surface

    assert [r.need.label for r in surface.check_installed(surface.REGISTER) if r.failed] == []


def test_register_accepts_any_version_number(monkeypatch):
    """No version gate: a vLLM that has the pieces is accepted whatever it calls itself (0.33, 0.34 on GPU)."""
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    monkeypatch.delenv(vllm_doge.ALLOW_UNTESTED, raising=False)
    for version in ("0.34.0", "1.0.0"):
        monkeypatch.setattr(vllm, "__version__", version)
        vllm_doge.register()
    assert "DogeForCausalLM" in ModelRegistry.get_supported_archs()
    assert all(MODELS_CONFIG_MAP[a].__name__ == "DogeConfigHook" for a in vllm_doge.ARCHITECTURES)


def _missing_piece():
    from vllm_doge import surface

    return surface.Need("vllm.model_executor.models.config", "MODELS_CONFIG_MAP_V2", "the engine-config hook",
                        stage=surface.REGISTER)


def test_register_refuses_a_vllm_lacking_a_piece(monkeypatch):
    from vllm_doge import surface

    monkeypatch.setattr(surface, "NEEDS", surface.NEEDS + (_missing_piece(),))
    monkeypatch.delenv(vllm_doge.ALLOW_UNTESTED, raising=False)
    with pytest.raises(RuntimeError, match=r"(?s)vllm\.model_executor\.models\.config\.MODELS_CONFIG_MAP_V2: missing.*"
                       rf"needed for the engine-config hook.*{vllm_doge.ALLOW_UNTESTED}=1"):
        vllm_doge.register()


def test_register_with_the_override_tries_a_vllm_lacking_a_piece(monkeypatch):
    from vllm_doge import surface

    monkeypatch.setattr(surface, "NEEDS", surface.NEEDS + (_missing_piece(),))
    monkeypatch.setenv(vllm_doge.ALLOW_UNTESTED, "1")
    vllm_doge.register()  # no exception: the user asked to try (a warning names the piece)


SERVE_AND_LIST_MODULES = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=64, gpu_memory_utilization=0.3,
              enforce_eager=True, skip_tokenizer_init=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0.0))
    print(json.dumps({"tokens": list(out[0].outputs[0].token_ids),
                      "model": type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model).__module__,
                      "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.parametrize("preset", ["moe-keep-window"])
def test_serving_imports_no_reference_model(checkpoints, preset, tmp_path):
    """A process that serves Doge imports vllm_doge and doge_format, never doge_hf, einx or tools."""
    script = tmp_path / "serve.py"
    script.write_text(SERVE_AND_LIST_MODULES)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, str(script), checkpoints(preset)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "vllm_doge.model" and len(report["tokens"]) == 4
    assert {"vllm_doge", "doge_format"} <= set(report["modules"])
    assert not {"doge_hf", "einx", "tools"} & set(report["modules"])
