"""Tooling that is not part of the installed packages: run from the repository root with `python -m tools.…`.

- `build_checkpoint`: tiny randomly initialised checkpoints (both formats) for the tests and benchmarks;
- `tokenizer`: the local stand-in tokenizer (byte-level BPE on the Python standard library);
- `train_demo`, `hf_demo`: train the demo checkpoint, and generate from it with the reference model;
- `serve_demo`: `make demo`, and the `vllm serve` subprocess harness the end-to-end tests use.
"""
