"""Micro-benchmark of the routed half of CDMoE (Doge-20M-MoE shape by default: hidden 256, E 1024, k 16).

Compares, for given routing (weights, ids):
  gather+bmm        both halves by gathering [T, k, hidden] rows and a batched matmul
  bmm+embedding_bag  down half gather+bmm, up half F.embedding_bag with per-sample weights
  torch path        `routed_experts_torch`: down half gather * h summed over hidden, up half F.embedding_bag
                    with per-sample weights; in eager mode, blocks of tokens bounding temporaries to 4 MiB
  triton            the fused kernel (CUDA only)
and times `route` (per-token product-key routing) on its own. Prints a markdown table of microseconds;
on a GPU also the achieved bandwidth (bytes of the gathered rows + h + out) and its ratio to the card's
copy bandwidth measured with a large `Tensor.copy_` (read + write bytes).

    python -m benchmarks.kernels                        # CPU: small iteration counts
    python -m benchmarks.kernels --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from vllm_doge.cdmoe import route, routed_experts_torch


def gather_bmm(h, w, ids, down, up):
    scores = torch.bmm(down[ids], h.unsqueeze(-1)).squeeze(-1)
    coef = (F.silu(scores.float()) * w).to(up.dtype)
    return torch.bmm(coef.unsqueeze(1), up[ids]).squeeze(1)


def bmm_embedding_bag(h, w, ids, down, up):
    scores = torch.bmm(F.embedding(ids, down), h.unsqueeze(-1)).squeeze(-1)
    coef = (F.silu(scores.float()) * w).to(up.dtype)
    return F.embedding_bag(ids, up, per_sample_weights=coef, mode="sum")


def torch_path(h, w, ids, down, up):
    return routed_experts_torch(h, w, ids, down, up)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn, device: torch.device, iters: int, warmup: int, repeats: int = 3) -> float:
    """Best of `repeats` means over `iters` calls, in microseconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) * 1e3 / iters
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            elapsed = (time.perf_counter() - t0) * 1e6 / iters
        best = min(best, elapsed)
    return best


def copy_bandwidth_gbs(device: torch.device, mib: int = 1024) -> float:
    """Read + write GB/s of a large device-to-device copy."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, iters=20, warmup=3)
    return 2 * n * 4 / (us * 1e-6) / 1e9


def routed_bytes(T: int, hidden: int, k: int, elem: int) -> int:
    # k down rows + k up rows per token, h in, out, plus ids (int64) and weights (fp32)
    return T * (2 * k * hidden * elem + 2 * hidden * elem + k * (8 + 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 2048])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing (default: 200 GPU, ~2M-token-row budget CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(dynamic=True) of the torch paths")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    H, E, k = args.hidden, args.experts, args.top_k
    num_keys = int(E**0.5)
    elem = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)

    down = (torch.randn(E, H, generator=gen) / H**0.5).to(device, dtype)
    up = torch.randn(E, H, generator=gen).to(device, dtype)
    router = (torch.randn(2 * num_keys, H, generator=gen) / H**0.5).to(device, dtype)

    triton_fn = None
    triton_note = ""
    if device.type == "cuda":
        try:
            from vllm_doge.kernels.cdmoe_triton import cdmoe_routed_triton

            triton_fn = cdmoe_routed_triton
        except ImportError as exc:  # pragma: no cover
            triton_note = f"triton kernel unavailable: {exc}"
    else:
        triton_note = "no CUDA device: the Triton kernel is not timed (it is checked under TRITON_INTERPRET=1 in tests)"

    paths = {"gather+bmm": gather_bmm, "bmm+embedding_bag": bmm_embedding_bag, "torch path": torch_path}
    if args.compile:
        paths["gather+bmm (compiled)"] = torch.compile(gather_bmm, dynamic=True)
        paths["torch path (compiled)"] = torch.compile(torch_path, dynamic=True)
    if triton_fn is not None:
        paths["triton"] = triton_fn

    peak = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:  # shared machines: the load average says how much to trust CPU numbers
        dev_name = f"CPU ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    print(f"# CDMoE routed experts: hidden {H}, E {E}, k {k}, {args.dtype}, {dev_name}")
    if peak is not None:
        print(f"copy bandwidth (read+write, 1 GiB copy_): {peak:.0f} GB/s")
    if triton_note:
        print(triton_note)
    print()
    cols = ["T", "route"] + list(paths)
    header = "| " + " | ".join(c + (" µs" if c != "T" else "") for c in cols) + " |"
    if peak is not None:
        header += f" {'triton' if triton_fn is not None else 'best'} GB/s | % of copy |"
    print(header)
    print("|" + "---|" * (len(cols) + (2 if peak is not None else 0)))

    for T in args.tokens:
        h = torch.randn(T, H, generator=gen).to(device, dtype)
        logits = h @ router.t()
        weights, ids = route(logits, num_keys, k, True)
        ref = gather_bmm(h.float(), weights, ids, down.float(), up.float())
        if args.iters is not None:
            iters = args.iters
        elif device.type == "cuda":
            iters = 200
        else:
            iters = max(2, min(50, 20000 // T))
        warmup = 2 if device.type == "cpu" else 10
        row = [str(T), f"{time_us(lambda: route(logits, num_keys, k, True), device, iters, warmup):.0f}"]
        timings = {}
        for name, fn in paths.items():
            out = fn(h, weights, ids, down, up)
            err = (out.float() - ref).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            if err > tol * max(1.0, ref.abs().max().item()):
                raise SystemExit(f"{name} disagrees with the fp32 reference at T={T}: max error {err:.3g}")
            us = time_us(lambda fn=fn: fn(h, weights, ids, down, up), device, iters, warmup)
            timings[name] = us
            row.append(f"{us:.0f}" if us >= 10 else f"{us:.1f}")
        line = "| " + " | ".join(row) + " |"
        if peak is not None:
            us = timings["triton"] if "triton" in timings else min(timings.values())
            gbs = routed_bytes(T, H, k, elem) / (us * 1e-6) / 1e9
            line += f" {gbs:.0f} | {100 * gbs / peak:.0f}% |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
