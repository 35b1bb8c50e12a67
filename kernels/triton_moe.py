"""Fused MoE as two grouped GEMMs over (token, expert) pairs sorted by expert.

1. align (torch, no host sync): sort the T*k pairs by expert and pad each expert's group to a multiple of
   BLOCK_M, so every BLOCK_M-row tile belongs to one expert; tiles past the real total are marked -1 and
   exit at once (the grid is sized from an upper bound, which keeps the op CUDA-graph safe).
2. GEMM 1: h = silu(x W_gate^T) * (x W_up^T), both halves accumulated by one program, SiLU*up in the
   epilogue; h rows are stored in sorted order so GEMM 2 reads them contiguously.
3. GEMM 2: y = (h W_down^T) * routing weight, fp32, stored per pair.
4. out = sum over the k pairs of each token in fp32, cast to the input dtype.

Tile sizes come from kernels/configs/<device>.json (written by benchmarks/tune_moe.py), keyed by
"E=<experts>,N=<expert width>" then the token count M bucket; absent entries fall back to a heuristic.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from exaserve.kernels.triton_common import INTERPRET, dot_precision

CONFIG_DIR = Path(__file__).parent / "configs"


@triton.jit
def _tile(N, num_m_blocks, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped launch order: GROUP_M row tiles in a row share
    each weight column tile while it is in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * ((N + BLOCK_N - 1) // BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.where(num_m_blocks - first_m < GROUP_M, num_m_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ptr, expert_ptr, num_pairs, top_k, N, K, num_m_blocks,
                    sxm, swe, swn, swk, shm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr):
    """h[row, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, N + n]) for the rows of one expert's tile."""
    pid_m, pid_n = _tile(N, num_m_blocks, BLOCK_N, GROUP_M)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * sxm + ks[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * swe + cols[None, :].to(tl.int64) * swn + ks[:, None] * swk
    up_off = N * swn
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(g_ptrs + up_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, u, acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * swk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out = h_ptr + rows[:, None].to(tl.int64) * shm + cols[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, y_ptr, sorted_ptr, expert_ptr, weight_ptr, num_pairs, N, K, num_m_blocks,
                 shm, swe, swn, swk, sym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """y[pair, n] = routing_weight[pair] * (h[row] . w[e, n]) in fp32, for the rows of one expert's tile."""
    pid_m, pid_n = _tile(N, num_m_blocks, BLOCK_N, GROUP_M)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * shm + ks[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * swe + cols[None, :].to(tl.int64) * swn + ks[:, None] * swk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * swk
    w = tl.load(weight_ptr + pair, mask=valid, other=0.0)
    out = y_ptr + pair[:, None].to(tl.int64) * sym + cols[None, :]
    tl.store(out, acc * w[:, None], mask=valid[:, None] & col_ok[None, :])


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the T*k (token, expert) pairs by expert, each expert's group padded to a multiple of block_m.

    Returns (sorted_pairs int32 [num_blocks*block_m], pair index or T*k for padding; block_expert int32
    [num_blocks], -1 for tiles past the end). Only device ops: no host sync, fixed output sizes.
    """
    flat = topk_ids.reshape(-1).long()
    P = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[expert_sorted]
    dest = (pad_end - padded)[expert_sorted] + rank
    # at most min(E, P) experts are non-empty, each adding < block_m padding rows
    num_blocks = triton.cdiv(P + min(num_experts, P) * (block_m - 1), block_m)
    sorted_pairs = torch.full((num_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pairs[dest] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def device_name(device=None) -> str:
    """The config file stem of a device: "NVIDIA_H200" for "NVIDIA H200"; "cpu" for the interpreter."""
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() and not INTERPRET else "cpu"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


@functools.cache
def _config_file(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def default_config(M: int, E: int, top_k: int) -> dict:
    if INTERPRET:   # numpy time grows with the number of programs: few, mid-size tiles
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    rows_per_expert = M * top_k / E
    if rows_per_expert <= 16:       # decode: weight-bandwidth bound, keep the padding waste small
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=4096)
def get_config(M: int, E: int, N: int, top_k: int, device=None) -> dict:
    """The tuned config for the nearest M bucket of (E, N) on this device, else the heuristic."""
    table = _config_file(device_name(device)).get(f"E={E},N={N}")
    if table:
        above = [int(m) for m in table if int(m) >= M]
        bucket = min(above) if above else max(int(m) for m in table)
        return table[str(bucket)]
    return default_config(M, E, top_k)


def fused_moe(x, w13, w2, topk_weights, topk_ids, config: dict | None = None):
    T, H = x.shape
    E, two_n, _ = w13.shape
    N = two_n // 2
    k = topk_ids.shape[1]
    P = T * k
    if T == 0:
        return torch.empty_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or get_config(T, E, N, k, x.device)
    BM, BN, BK, GM = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sorted_pairs, block_expert = align(topk_ids, E, BM)
    num_m = block_expert.numel()
    upcast = INTERPRET and x.dtype != torch.float32
    prec = dot_precision(x.dtype)

    h = torch.empty(num_m * BM, N, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_m * triton.cdiv(N, BN),)](
        x, w13, h, sorted_pairs, block_expert, P, k, N, H, num_m,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, UPCAST=upcast, PREC=prec, **launch)

    y = torch.empty(P, H, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).float()
    _down_kernel[(num_m * triton.cdiv(H, BN),)](
        h, w2, y, sorted_pairs, block_expert, weights, P, H, N, num_m,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, UPCAST=upcast, PREC=prec, **launch)
    return y.view(T, k, H).sum(1).to(x.dtype)
