"""Doge's CPU attention kernels (vllm_doge/csrc): build once per process, typed wrappers, fake impls.

`load()` compiles the C++ sources with the torch JIT (cached under ``$VLLM_DOGE_CACHE`` or
``~/.cache/vllm_doge/<torch version>-<source hash>``; the JIT's file lock serialises concurrent builds)
and returns whether the ops are usable. It never raises: without a compiler, on another architecture
or on a build error it logs one warning and returns False.

Page layout of one (block, kv head) of the ``[num_blocks, KV, BS, cell]`` cache (see csrc/common.h):
K as ``[d/2][BS][2]`` (fp32: ``[d][BS]``), then V as ``[BS/2][d][2]`` (fp32: ``[BS][d]``), then the fp32
bias ``[C][BS]``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from vllm.logger import init_logger

logger = init_logger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = (
    "cache_write.cpp", "attention.cpp", "attention_portable.cpp", "attention_avx2.cpp", "attention_avx512.cpp",
    "keep_window.cpp", "residual_norm.cpp",
)  # fmt: skip
_NAME = "vllm_doge_kernels"


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(_CSRC.glob("*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    root = os.environ.get("VLLM_DOGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vllm_doge")
    return Path(root) / f"{torch.__version__}-{digest.hexdigest()[:16]}"


@functools.cache
def load() -> bool:
    """Build (or reuse) and load the kernels; True when torch.ops.vllm_doge.* are available."""
    if not _build():
        return False
    try:
        path = isa()  # also validates VLLM_DOGE_ISA / VLLM_DOGE_BRGEMM / VLLM_DOGE_BF16
    except RuntimeError as exc:
        logger.warning("Doge: CPU kernels unavailable: %s", str(exc).strip().splitlines()[0])
        return False
    _register_fakes()
    logger.info("Doge: CPU kernels loaded, path: %s", path)
    return True


def _build() -> bool:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        logger.warning("Doge: CPU kernels unavailable: built for x86-64 only, this is %s", platform.machine())
        return False
    try:
        from torch.utils import cpp_extension

        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        # at::parallel_for is OpenMP in torch's CPU builds: without -fopenmp it would run on one thread.
        # No implicit FMA contraction: the ops that promise torch's roundings (residual_rms_norm) round
        # every product; the kernels' FMAs are explicit.
        cpp_extension.load(
            name=_NAME,
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported once
        logger.warning("Doge: CPU kernels unavailable: %s", str(exc).strip().splitlines()[-1] if str(exc) else exc)
        return False
    return True


def isa() -> str:
    """The path the kernels run: "avx512", "avx2" or "portable", with "+brgemm(bf16|fp32)" where prefill uses
    oneDNN's brgemm."""
    return torch.ops.vllm_doge.isa()


def reconfigure() -> str:
    """Re-read VLLM_DOGE_ISA (auto | portable | avx2 | avx512), VLLM_DOGE_BRGEMM (auto | 0 | 1) and VLLM_DOGE_BF16
    (auto | dot | fp32: bf16 products on vdpbf16ps or widened to fp32, auto measured once); returns `isa()`.
    The keep-window ops read VLLM_DOGE_ISA at every call."""
    return torch.ops.vllm_doge.reconfigure()


def cell_elements(head_dim: int, bias_channels: int, dtype: torch.dtype) -> int:
    """Elements of the last cache dim: one token's K, V and fp32 biases, (2*d*elt + 4*C) / elt."""
    elt = torch.empty((), dtype=dtype).element_size()
    size = 2 * head_dim * elt + 4 * bias_channels
    if size % elt:
        raise ValueError(
            f"a cache cell of head_dim {head_dim} and {bias_channels} fp32 bias channels is {size} bytes, "
            f"not a whole number of {dtype} elements"
        )
    return size // elt


def cache_write(key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, KV, d] (model dtype) and bias [T, KV, C] (fp32) at slot_mapping [T] (int64,
    block * BS + offset; < 0 skips the token) of cache [num_blocks, KV, BS, cell]."""
    torch.ops.vllm_doge.cache_write(key, value, bias, cache, slot_mapping)


def cache_write_masked(key: torch.Tensor, value: torch.Tensor, dt_input: torch.Tensor, dt_weight: torch.Tensor,
                       dt_bias: torch.Tensor, A: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache_write with each token's bias computed on the way, for mask row r = kv head * C + channel:
    exp(A[r] * softplus(dt_weight[r] . dt_input[t] + dt_bias[r])), in a fixed order per token (the same
    bits in any batch). dt_input [T, inputs] and dt_weight [KV * C, inputs] share a dtype."""
    torch.ops.vllm_doge.cache_write_masked(key, value, dt_input, dt_weight, dt_bias, A, cache, slot_mapping)


def residual_rms_norm(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', RMSNorm(x') * weight) for x' = scale * x + y, rows [T, hidden], rounded as the torch ops would."""
    return torch.ops.vllm_doge.residual_rms_norm(x, y, scale, weight, float(eps))


def attention(out: torch.Tensor, query: torch.Tensor, cache: torch.Tensor, query_start_loc: torch.Tensor,
              seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float, sliding_window: int,
              bias_channels: int) -> None:
    """out [T, H, d] = softmax(scale * q.k + bias) v over each request's cached keys (causal, optional
    sliding window > 0); query_start_loc [B+1], seq_lens [B], block_table [B, max_blocks] are int32."""
    torch.ops.vllm_doge.attention(out, query, cache, query_start_loc, seq_lens, block_table, float(scale),
                                  int(sliding_window), int(bias_channels))


def keep_window_positions(cache: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, head_dim: int,
                          bias_channels: int) -> None:
    """A keep-window layer's cells: the int32 position of each token's key at slot_mapping (< 0 skips)."""
    torch.ops.vllm_doge.keep_window_positions(cache, positions, slot_mapping, int(head_dim), int(bias_channels))


def keep_window_decode(cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       block_table: torch.Tensor, window: int, head_dim: int) -> None:
    """One-query requests at p >= W: the lowest-ranked of slots p-W … p leaves (slot p-W's entry moves onto
    its slot), so that slots p-W+1 … p hold the query's kept keys (keep_window.py)."""
    torch.ops.vllm_doge.keep_window_decode(cache, query_start_loc, seq_lens, block_table, int(window), int(head_dim))


def keep_window_prefill(out: torch.Tensor, query: torch.Tensor, cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float, window: int) -> None:
    """Requests of several queries: exact rows over each query's top-W keys, then the kept keys packed into
    the window's slots (keep_window.py). One-query requests are left alone."""
    torch.ops.vllm_doge.keep_window_prefill(out, query, cache, query_start_loc, seq_lens, block_table, float(scale),
                                            int(window))


def _register_fakes() -> None:
    @torch.library.register_fake("vllm_doge::cache_write")
    def _(key, value, bias, cache, slot_mapping):
        return None

    @torch.library.register_fake("vllm_doge::cache_write_masked")
    def _(key, value, dt_input, dt_weight, dt_bias, A, cache, slot_mapping):
        return None

    @torch.library.register_fake("vllm_doge::residual_rms_norm")
    def _(x, y, scale, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
            x, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake("vllm_doge::attention")
    def _(out, query, cache, query_start_loc, seq_lens, block_table, scale, sliding_window, bias_channels):
        return None

    @torch.library.register_fake("vllm_doge::keep_window_positions")
    def _(cache, positions, slot_mapping, head_dim, bias_channels):
        return None

    @torch.library.register_fake("vllm_doge::keep_window_decode")
    def _(cache, query_start_loc, seq_lens, block_table, window, head_dim):
        return None

    @torch.library.register_fake("vllm_doge::keep_window_prefill")
    def _(out, query, cache, query_start_loc, seq_lens, block_table, scale, window):
        return None
