"""Shared test setup: fast in-process vLLM engines, tiny checkpoints built once per session."""

import json
import os

# Engines start in seconds in-process with a 1 GiB KV cache; tests that need the default
# multiprocess path set VLLM_ENABLE_V1_MULTIPROCESSING=1 themselves.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(preset, **overrides) -> path of a tiny Doge checkpoint, built once per session."""
    from tools.build_checkpoint import build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(preset: str, seed: int = 0, **overrides):
        key = (preset, seed, tuple(sorted(overrides.items())))
        if key not in built:
            name = "-".join([preset, str(seed), *(f"{k}={v}" for k, v in sorted(overrides.items()))])
            built[key] = str(build_checkpoint(root / name, preset=preset, seed=seed, **overrides))
        return built[key]

    return get


@pytest.fixture(scope="session")
def legacy(tmp_path_factory):
    """legacy(preset, seed=0, **options) -> directory of a tiny legacy-format checkpoint, built once per session."""
    from tools.build_checkpoint import build_legacy_checkpoint

    root = tmp_path_factory.mktemp("legacy")
    built = {}

    def get(preset: str, seed: int = 0, **options):
        key = (preset, seed, json.dumps(options, sort_keys=True))
        if key not in built:
            built[key] = build_legacy_checkpoint(root / f"{preset}-{seed}-{len(built)}", preset, seed, **options)
        return built[key]

    return get
