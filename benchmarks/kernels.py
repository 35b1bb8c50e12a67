"""Kernel micro-benchmarks: each op's Triton kernel against its torch path at K-EXAONE shapes.

    python benchmarks/kernels.py              # GPU: full table
    python benchmarks/kernels.py --quick      # GPU: fewer shapes
    python benchmarks/kernels.py --cpu        # torch paths only, reduced shapes (well under a minute)
    python benchmarks/kernels.py --json r.json

The two ceilings are measured once on the device (a device-to-device copy for bandwidth, a large bf16/fp32
matmul for compute). For each case: time, achieved TB/s and TFLOP/s (bytes and flops an ideal kernel must
move and do), "roof" = the fraction of the roofline time max(bytes / BW, flops / PEAK) the kernel reaches,
and the speedup of the Triton kernel over the torch path; %BW and %peak: achieved bytes/s and flop/s as a share
of the measured copy bandwidth (HBM) and matmul peak (bf16 on a GPU). MoE bytes count only the experts actually routed
to (plus activations in and out).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from exaserve.kernels import fused_ops
from exaserve.kernels import torch_ops as ref


@dataclass
class Case:
    op: str
    shape: str
    torch_fn: Callable
    triton_fn: Callable | None
    bytes: float
    flops: float


def timeit(fn, device) -> float:
    """Seconds per call (median)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3
    fn()
    times = []
    deadline = time.perf_counter() + 0.3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def ceilings(device, dtype) -> tuple[float, float]:
    """(bytes/s of a device-to-device copy, flop/s of a large matmul) measured here."""
    n = (1 << 28 if device.type == "cuda" else 1 << 24) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    bw = 2 * a.numel() * a.element_size() / timeit(lambda: b.copy_(a), device)
    m = 8192 if device.type == "cuda" else 1024
    x = torch.randn(m, m, device=device).to(dtype)
    y = torch.randn(m, m, device=device).to(dtype)
    peak = 2 * m ** 3 / timeit(lambda: x @ y, device)
    return bw, peak


def _triton(module: str, name: str | None, with_triton: bool):
    """The Triton op (or module, name None) to time beside the torch path, or None without Triton."""
    if not with_triton:
        return None
    mod = importlib.import_module(f"exaserve.kernels.{module}")
    return mod if name is None else getattr(mod, name)


def moe_cases(device, dtype, H, E, k, widths, Ms, with_triton):
    tri = _triton("triton_moe", "fused_moe", with_triton)
    el = torch.empty((), dtype=dtype).element_size()
    for N in widths:
        w13 = torch.randn(E, 2 * N, H, device=device).to(dtype) * 0.02
        w2 = torch.randn(E, H, N, device=device).to(dtype) * 0.02
        for M in Ms:
            x = torch.randn(M, H, device=device).to(dtype)
            ids = torch.rand(M, E, device=device).topk(k, dim=-1).indices
            w = torch.rand(M, k, device=device)
            touched = ids.unique().numel()
            nbytes = touched * 3 * N * H * el + 2 * M * H * el
            flops = 2 * M * k * 3 * N * H
            yield Case("fused_moe", f"E{E} N{N} M{M}", partial(ref.fused_moe, x, w13, w2, w, ids),
                       tri and partial(tri, x, w13, w2, w, ids), nbytes, flops)
        del w13, w2


def paged_cases(device, dtype, nq, nkv, d, page, shapes, with_triton):
    """shapes: (batch, context, new tokens per sequence)."""
    tri = _triton("triton_attention", "paged_attention", with_triton)
    el = torch.empty((), dtype=dtype).element_size()
    for B, L, n in shapes:
        blocks = -(-L // page)
        k_cache = torch.randn(B * blocks, page, nkv, d, device=device).to(dtype)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(B * blocks, device=device).view(B, blocks).int()
        seq_lens = torch.full((B,), L, dtype=torch.int32, device=device)
        qsl = torch.arange(0, B * n + 1, n, dtype=torch.int32, device=device)
        q = torch.randn(B * n, nq, d, device=device).to(dtype)
        args = (q, k_cache, v_cache, tables, seq_lens, qsl, d ** -0.5)
        visible = B * sum(L - n + 1 + i for i in range(n))
        nbytes = 2 * B * L * nkv * d * el + 2 * q.numel() * el
        name = f"B{B} L{L // 1024}K q{n}" if L >= 1024 else f"B{B} L{L} q{n}"
        yield Case("paged_attn", name, partial(ref.paged_attention, *args), tri and partial(tri, *args), nbytes,
                   4 * visible * nq * d)
        del k_cache, v_cache


def ring_cases(device, dtype, nq, nkv, d, window, shapes, with_triton):
    """shapes: (batch, context before the step, new tokens per sequence)."""
    tri = _triton("triton_attention", "ring_attention", with_triton)
    el = torch.empty((), dtype=dtype).element_size()
    for B, c, n in shapes:
        q = torch.randn(B * n, nq, d, device=device).to(dtype)
        k = torch.randn(B * n, nkv, d, device=device).to(dtype)
        v = torch.randn_like(k)
        ring = torch.randn(B, window, nkv, d, device=device).to(dtype)
        args = (q, k, v, ring, torch.randn_like(ring), torch.arange(B, device=device),
                torch.arange(0, B * n + 1, n, dtype=torch.int32, device=device),
                torch.full((B,), c, dtype=torch.int32, device=device), window, d ** -0.5)
        keys = min(c, window - 1) + n
        nbytes = 2 * B * keys * nkv * d * el + 2 * q.numel() * el
        visible = B * sum(min(window, c + i + 1) for i in range(n))
        yield Case("ring_attn", f"B{B} ctx{c} q{n}", lambda a=args: ref.ring_attention(*a),
                   tri and (lambda a=args: tri(*a)), nbytes, 4 * visible * nq * d)


def norm_cases(device, dtype, H, T, nq, nkv, d, with_triton):
    tri = _triton("triton_norm", None, with_triton)
    el = torch.empty((), dtype=dtype).element_size()
    x, r, w = (torch.randn(T, H, device=device).to(dtype) for _ in range(3))
    w = w[0]
    yield Case("add_rms_norm", f"T{T} H{H}", lambda: ref.add_rms_norm(x, r, w, 1e-5),
               tri and (lambda: tri.add_rms_norm(x, r, w, 1e-5)), 4 * T * H * el, 4 * T * H)
    qkv = torch.randn(T, (nq + 2 * nkv) * d, device=device).to(dtype)
    q, k, _ = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    q, k = q.reshape(T, nq, d), k.reshape(T, nkv, d)
    wq, wk = torch.randn(d, device=device).to(dtype), torch.randn(d, device=device).to(dtype)
    pos = torch.arange(T, device=device)
    f = pos[:, None].float() * (1e6 ** (-torch.arange(0, d, 2, device=device) / d))[None]
    cos, sin = f.cos(), f.sin()
    yield Case("qk_norm_rope", f"T{T} {nq}+{nkv}x{d}",
               lambda: fused_ops.qk_norm_rope(q, k, wq, wk, 1e-5, pos, cos, sin, True),
               tri and (lambda: tri.qk_norm_rope(q, k, wq, wk, 1e-5, pos, cos, sin, True)),
               2 * T * (nq + nkv) * d * el, 10 * T * (nq + nkv) * d)


def all_cases(device, dtype, quick, cpu, with_triton):
    if cpu:   # reduced shapes, torch path only
        yield from moe_cases(device, dtype, 512, 16, 4, [128], [1, 8, 64, 256], False)
        yield from paged_cases(device, dtype, 8, 1, 64, 16, [(4, 256, 1), (4, 4096, 1), (1, 1024, 256)], False)
        yield from ring_cases(device, dtype, 8, 1, 64, 128, [(8, 1000, 1), (1, 1000, 256)], False)
        yield from norm_cases(device, dtype, 512, 256, 8, 1, 64, False)
        return
    Ms = [1, 64, 4096] if quick else [1, 8, 64, 256, 1024, 4096]
    yield from moe_cases(device, dtype, 6144, 128, 8, [2048, 512], Ms, with_triton)
    contexts = [1024, 32768] if quick else [1024, 4096, 16384, 32768]
    shapes = [(16, L, 1) for L in contexts] + [(1, 32768, 1), (4, 131072, 1), (1, 8192, 2048)]
    yield from paged_cases(device, dtype, 64, 8, 128, 16, shapes, with_triton)
    yield from ring_cases(device, dtype, 64, 8, 128, 128, [(64, 5000, 1), (1, 5000, 2048)], with_triton)
    yield from norm_cases(device, dtype, 6144, 4096, 64, 8, 128, with_triton)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="torch paths only, reduced shapes (also without CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", help="write the rows here as JSON")
    args = ap.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    bw, peak = ceilings(device, dtype)
    name = "cpu" if cpu else torch.cuda.get_device_name()
    print(f"# {name}, {str(dtype).split('.')[-1]}: copy {bw / 1e12:.3f} TB/s, matmul {peak / 1e12:.2f} TFLOP/s")
    header = (f"{'op':<13} {'shape':<20} {'torch us':>10} {'triton us':>10} {'TB/s':>6} {'%BW':>5} {'TFLOP/s':>8} "
              f"{'%peak':>6} {'roof':>5} {'x torch':>7}")
    print(header)
    rows = []
    for c in all_cases(device, dtype, args.quick, cpu, with_triton=not cpu):
        t_ref = timeit(c.torch_fn, device)
        t = timeit(c.triton_fn, device) if c.triton_fn else t_ref
        roof = max(c.bytes / bw, c.flops / peak) / t
        row = dict(op=c.op, shape=c.shape, torch_us=t_ref * 1e6, triton_us=t * 1e6 if c.triton_fn else None,
                   tbps=c.bytes / t / 1e12, tflops=c.flops / t / 1e12, roofline=roof, speedup=t_ref / t)
        rows.append(row)
        tri = f"{t * 1e6:>10.1f}" if c.triton_fn else f"{'-':>10}"
        print(f"{c.op:<13} {c.shape:<20} {t_ref * 1e6:>10.1f} {tri} {row['tbps']:>6.2f} "
              f"{c.bytes / t / bw:>5.0%} {row['tflops']:>8.1f} {c.flops / t / peak:>6.0%} {roof:>5.0%} "
              f"{row['speedup']:>7.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, copy_bytes_per_s=bw, matmul_flops=peak,
                                                   rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
