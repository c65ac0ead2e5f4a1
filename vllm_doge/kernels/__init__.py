"""Triton kernels of vllm-doge.

Submodules import triton at import time; this package itself imports nothing, so that CPU-only
installs without triton can still import `vllm_doge`.
"""
