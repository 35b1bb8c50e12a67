"""Sweep fused-MoE tile configs on this GPU and write the fastest per (E, N, M bucket) to
kernels/configs/<device>.json, which kernels/triton_moe.py reads (merging with what the file already holds).

    python benchmarks/tune_moe.py                          # K-EXAONE: E 128, H 6144, top-8, N 2048 and 512
    python benchmarks/tune_moe.py --N 512 --M 1 64 4096    # a subset
    python benchmarks/tune_moe.py --quick                  # a smaller search space

N is the expert width of this shard (moe_intermediate_size / TP). Routing is uniform random top-k.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path

import torch
from triton.testing import do_bench

from exaserve.kernels import torch_ops, triton_moe

SMEM_LIMIT = 220 * 1024
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def search_space(M: int, E: int, k: int, quick: bool):
    rows = M * k / E
    if rows <= 16:
        bms, groups = [16], [1]
    elif rows <= 64:
        bms, groups = [16, 32, 64], [1, 8]
    else:
        bms, groups = [64, 128], [1, 8, 16]
    bns = [64, 128] if quick else [32, 64, 128, 256]
    bks = [64, 128] if quick else [64, 128, 256]
    warps = [4, 8]
    stages = [3, 4] if quick else [2, 3, 4, 5]
    for bm, bn, bk, gm, w, s in itertools.product(bms, bns, bks, groups, warps, stages):
        if s * (bm * bk + 2 * bk * bn) * 2 > SMEM_LIMIT:    # gate_up holds two weight tiles per stage
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s)


def tune_point(x, w13, w2, weights, ids, quick):
    M, E, k = x.shape[0], w13.shape[0], ids.shape[1]
    best = (float("inf"), None)
    for cfg in search_space(M, E, k, quick):
        try:
            t = do_bench(partial(triton_moe.fused_moe, x, w13, w2, weights, ids, config=cfg), warmup=5, rep=20,
                         return_mode="median")
        except Exception as e:     # out of shared memory / registers for this tile: not a candidate
            print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
            continue
        if t < best[0]:
            best = (t, cfg)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--H", type=int, default=6144)
    ap.add_argument("--N", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--M", type=int, nargs="+", default=DEFAULT_M)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="default: kernels/configs/<device>.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_moe.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    out = Path(args.out) if args.out else triton_moe.CONFIG_DIR / f"{triton_moe.device_name()}.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    E, H, k = args.E, args.H, args.top_k
    for N in args.N:
        w13 = (torch.randn(E, 2 * N, H, device="cuda") * 0.02).to(dtype)
        w2 = (torch.randn(E, H, N, device="cuda") * 0.02).to(dtype)
        entry = table.setdefault(f"E={E},N={N}", {})
        for M in args.M:
            x = torch.randn(M, H, device="cuda").to(dtype)
            ids = torch.rand(M, E, device="cuda").topk(k, dim=-1).indices
            weights = torch.rand(M, k, device="cuda")
            t, cfg = tune_point(x, w13, w2, weights, ids, args.quick)
            if cfg is None:
                continue
            got = triton_moe.fused_moe(x, w13, w2, weights, ids, config=cfg).float()
            want = torch_ops.fused_moe(x, w13, w2, weights, ids).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                sys.exit(f"E={E} N={N} M={M} {cfg}: relative error {err:.2e} against the torch path")
            base = triton_moe.default_config(M, E, k)
            t_base = do_bench(partial(triton_moe.fused_moe, x, w13, w2, weights, ids, config=base), warmup=5,
                              rep=20, return_mode="median")
            print(f"E={E} N={N} M={M}: {t * 1e3:.1f} us (heuristic {t_base * 1e3:.1f} us) {cfg}", flush=True)
            entry[str(M)] = cfg
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")   # after each point: resumable
        del w13, w2
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
