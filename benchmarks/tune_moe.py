"""Sweep fused-MoE tile configs on this GPU and write the fastest per (E, N, M bucket) to
kernels/configs/<device>.json, which kernels/triton_moe.py reads (merging with what the file already holds).

    python benchmarks/tune_moe.py                          # K-EXAONE: E 128, H 6144, top-8, N 2048 and 512
    python benchmarks/tune_moe.py --N 512 --M 1 64 4096    # a subset
    python benchmarks/tune_moe.py --quick                  # under 5 minutes: M 1 16 64 256 1024 4096, N 2048 256,
                                                           # a small search space

N is the expert width of this shard (moe_intermediate_size / TP). Routing is uniform random top-k. Entries are
keyed by dtype too (kernels/triton_moe.config_key): a tile tuned for bf16 is never used for fp32.
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
QUICK_M = [1, 16, 64, 256, 1024, 4096]
QUICK_N = [2048, 256]          # tp 1 and tp 8


def search_space(M: int, E: int, k: int, quick: bool):
    """Candidate tiles for M tokens; --quick keeps about 24 distinct tiles over all M (each compiles once), so a
    whole quick run stays under 5 minutes on an H200."""
    rows = M * k / E
    if rows <= 16:       # decode: column tile width decides how many SMs stream weights
        bms, bns, groups = [16], [16, 32, 64] if quick else [16, 32, 64, 128], [1]
    elif rows <= 64:
        bms, bns, groups = ([32, 64], [64], [8]) if quick else ([16, 32, 64], [32, 64, 128, 256], [1, 8])
    else:
        bms, bns, groups = ([64, 128], [128], [8]) if quick else ([64, 128], [32, 64, 128, 256], [1, 8, 16])
    bks = ([64, 128] if rows <= 16 else [64]) if quick else [64, 128, 256]
    warps = ([4] if rows <= 64 else [4, 8]) if quick else [4, 8]
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
    ap.add_argument("--N", type=int, nargs="+", help="default: 2048 512 (--quick: 2048 256)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--M", type=int, nargs="+", help="default: 1 2 4 ... 4096 (--quick: 1 16 64 256 1024 4096)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="default: kernels/configs/<device>.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_moe.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    widths = args.N or (QUICK_N if args.quick else [2048, 512])
    token_counts = args.M or (QUICK_M if args.quick else DEFAULT_M)
    out = Path(args.out) if args.out else triton_moe.CONFIG_DIR / f"{triton_moe.device_name()}.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    E, H, k = args.E, args.H, args.top_k
    for N in widths:
        w13 = (torch.randn(E, 2 * N, H, device="cuda") * 0.02).to(dtype)
        w2 = (torch.randn(E, H, N, device="cuda") * 0.02).to(dtype)
        entry = table.setdefault(triton_moe.config_key(E, N, dtype), {})
        for M in token_counts:
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
            base = triton_moe.default_config(M, E, N, k, dtype)
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
