"""Fused MoE as two grouped GEMMs over (token, expert) pairs sorted by expert, and the routing before it.

0. route (moe_route): the router GEMM in fp32 (torch), then one kernel per token row: sigmoid, top-k by
   score + bias, the unbiased scores of the chosen experts normalised and scaled.
1. align (one single-program kernel, no host sync): sort the T*k pairs by expert and pad each expert's group
   to a multiple of BLOCK_M, so every BLOCK_M-row tile belongs to one expert; tiles past the real total are
   marked -1 and exit at once (the grid is sized from an upper bound, which keeps the op CUDA-graph safe).
   An expert id of -1 (an expert on another rank under expert parallelism) is no pair: no work, no output.
2. GEMM 1: h = silu(x W_gate^T) * (x W_up^T), both halves accumulated by one program, SiLU*up in the
   epilogue; h rows are stored in sorted order so GEMM 2 reads them contiguously.
3. GEMM 2: y = h W_down^T per pair, in the input dtype (rounded where the torch path rounds it).
4. out[t] = sum over the token's k pairs of weight * y in fp32, cast to the input dtype (one kernel).

Tile sizes come from kernels/configs/<device>.json (written by benchmarks/tune_moe.py), keyed by
"E=<experts>,N=<expert width>,dtype=<dtype>" then the token count M bucket; absent entries fall back to a
heuristic (per dtype: an fp32 tile needs twice the shared memory of a bf16 one).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from exaserve.kernels import torch_ops
from exaserve.kernels.triton_common import INTERPRET, cdiv, dot_precision, pow2

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


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
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


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _down_kernel(h_ptr, w_ptr, y_ptr, sorted_ptr, expert_ptr, num_pairs, N, K, num_m_blocks,
                 shm, swe, swn, swk, sym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """y[pair, n] = h[row] . w[e, n] for the rows of one expert's tile, in y's dtype."""
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
    out = y_ptr + pair[:, None].to(tl.int64) * sym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _sum_topk_kernel(y_ptr, ids_ptr, weight_ptr, out_ptr, H, sym, sot, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """out[t, cols] = sum_j weight[t, j] * y[t*k + j, cols] in fp32 over the pairs j whose expert id is >= 0."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_PAD)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pair = t * TOP_K + j
    live = (j < TOP_K) & (tl.load(ids_ptr + pair, mask=j < TOP_K, other=-1) >= 0)
    w = tl.load(weight_ptr + pair, mask=live, other=0.0).to(tl.float32)
    ok = live[:, None] & (cols < H)[None, :]
    y = tl.load(y_ptr + pair[:, None] * sym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * sot + cols, tl.sum(w[:, None] * y, axis=0).to(out_ptr.dtype.element_ty), mask=cols < H)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
def _align_kernel(ids_ptr, sorted_ptr, expert_ptr, num_pairs, num_experts, num_blocks,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program: count the pairs of each expert, lay the experts' groups out padded to BLOCK_M, then place
    each pair at its group's start + its rank among the expert's pairs (stable: in pair order)."""
    experts = tl.arange(0, E_PAD)
    known = experts < num_experts
    counts = tl.full([E_PAD], 0, tl.int32)
    for base in range(0, num_pairs, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        counts += tl.sum(((e[:, None] == experts[None, :]) & known[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    # each tile's expert (-1 past the end), and padding (num_pairs) in every row before the pairs go in
    for base in range(0, num_blocks, CHUNK):
        blocks = base + tl.arange(0, CHUNK)
        first = blocks * BLOCK_M
        owner = tl.sum((pad_end[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ptr + blocks, tl.where(first < total, owner, -1), mask=blocks < num_blocks)
    for base in range(0, num_blocks * BLOCK_M, CHUNK):
        rows = base + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + rows, tl.full([CHUNK], 0, tl.int32) + num_pairs, mask=rows < num_blocks * BLOCK_M)
    tl.debug_barrier()      # the padding is written (by any thread) before a pair overwrites it
    placed = pad_start
    for base in range(0, num_pairs, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        onehot = ((e[:, None] == experts[None, :]) & known[None, :]).to(tl.int32)
        earlier = tl.cumsum(onehot, axis=0) - onehot           # pairs of this chunk before it, same expert
        dest = tl.sum(onehot * (placed[None, :] + earlier), axis=1)
        tl.store(sorted_ptr + dest, offs, mask=tl.sum(onehot, axis=1) > 0)
        placed += tl.sum(onehot, axis=0)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the T*k (token, expert) pairs by expert, each expert's group padded to a multiple of block_m; pairs
    of expert -1 (another rank's, under expert parallelism) are left out.

    Returns (sorted_pairs int32 [num_blocks*block_m], pair index or T*k for padding; block_expert int32
    [num_blocks], -1 for tiles past the end). One kernel launch: no host sync, fixed output sizes.
    """
    P = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    # at most min(E, P) experts are non-empty, each adding < block_m padding rows
    num_blocks = cdiv(P + min(num_experts, P) * (block_m - 1), block_m)
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    e_pad = pow2(num_experts)
    _align_kernel[(1,)](ids, sorted_pairs, block_expert, P, num_experts, num_blocks, BLOCK_M=block_m, E_PAD=e_pad,
                        CHUNK=max(16, 8192 // e_pad), num_warps=8 if e_pad >= 128 else 4)
    return sorted_pairs, block_expert


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, scaling, TOP_K: tl.constexpr,
                  K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORM: tl.constexpr):
    """One token: s = sigmoid(logits); the top-k experts by s + bias (lowest id first among equals); their s,
    divided by its sum when NORM, times scaling."""
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_PAD)
    ok = experts < E
    s = 1.0 / (1.0 + tl.exp(-tl.load(logits_ptr + t * E + experts, mask=ok, other=0.0)))
    choice = tl.where(ok, s + tl.load(bias_ptr + experts, mask=ok, other=0.0), float("-inf"))
    slots = tl.arange(0, K_PAD)
    picked = tl.full([K_PAD], 0, tl.int32)
    picked_s = tl.full([K_PAD], 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(choice, axis=0)
        e = tl.min(tl.where(choice == best, experts, E_PAD), axis=0)
        picked = tl.where(slots == j, e, picked)
        picked_s = tl.where(slots == j, tl.sum(tl.where(experts == e, s, 0.0), axis=0), picked_s)
        choice = tl.where(experts == e, float("-inf"), choice)
    if NORM:
        picked_s = picked_s / (tl.sum(picked_s, axis=0) + 1e-20)
    tl.store(weights_ptr + t * TOP_K + slots, picked_s * scaling, mask=slots < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slots, picked.to(tl.int64), mask=slots < TOP_K)


def moe_route(x, gate_weight, bias, top_k: int, n_group: int = 1, topk_group: int = 1,
              norm_topk_prob: bool = True, scaling: float = 1.0):
    """kernels/torch_ops.moe_route with the selection in one kernel (group-limited routing, n_group > 1, stays
    on the torch path). Returns (weights fp32 [T, k], expert ids int64 [T, k])."""
    if n_group > 1:
        return torch_ops.moe_route(x, gate_weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling)
    logits = F.linear(x.float(), gate_weight.float())
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    if T:
        _route_kernel[(T,)](logits, bias.float(), weights, ids, E, float(scaling), TOP_K=top_k, K_PAD=pow2(top_k),
                            E_PAD=pow2(E),
                            NORM=norm_topk_prob)
    return weights, ids


def device_name(device=None) -> str:
    """The config file stem of a device: "NVIDIA_H200" for "NVIDIA H200"; "cpu" for the interpreter."""
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() and not INTERPRET else "cpu"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


@functools.cache
def _config_file(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


# Programs a decode launch should have to keep every SM of an H100/H200 (132) streaming weights.
TARGET_PROGRAMS = 128


def default_config(M: int, E: int, N: int, top_k: int, dtype: torch.dtype) -> dict:
    if INTERPRET:   # numpy time grows with the number of programs: few, mid-size tiles
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    wide = dtype == torch.float32            # twice the bytes per tile: fewer stages, smaller tiles
    rows_per_expert = M * top_k / E
    if rows_per_expert <= 16:
        # decode: weight-bandwidth bound, keep the padding waste small; when few experts are hit, narrower
        # column tiles so the gate_up grid still covers the SMs
        tiles = min(M * top_k, E)
        block_n = 64
        while block_n > 16 and tiles * cdiv(N, block_n) < TARGET_PROGRAMS:
            block_n //= 2
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=64 if wide else 128, GROUP_M=1, num_warps=4,
                    num_stages=3 if wide else 4)
    if rows_per_expert <= 128 or wide:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32 if wide else 64, GROUP_M=8, num_warps=4,
                    num_stages=3 if wide else 4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_key(E: int, N: int, dtype: torch.dtype) -> str:
    """The key of a tuned table in the config file (benchmarks/tune_moe.py writes it)."""
    return f"E={E},N={N},dtype={_dtype_name(dtype)}"


@functools.lru_cache(maxsize=4096)
def get_config(M: int, E: int, N: int, top_k: int, dtype: torch.dtype, device=None) -> dict:
    """The tuned config for the nearest M bucket of (E, N, dtype) on this device, else the heuristic. A table
    tuned for one dtype is never used for another (an fp32 tile needs twice the shared memory)."""
    table = _config_file(device_name(device)).get(config_key(E, N, dtype))
    if table:
        above = [int(m) for m in table if int(m) >= M]
        bucket = min(above) if above else max(int(m) for m in table)
        return table[str(bucket)]
    return default_config(M, E, N, top_k, dtype)


def fused_moe(x, w13, w2, topk_weights, topk_ids, config: dict | None = None):
    """Routed experts (kernels/torch_ops.fused_moe); an expert id of -1 contributes nothing and costs nothing."""
    T, H = x.shape
    E, two_n, _ = w13.shape
    N = two_n // 2
    k = topk_ids.shape[1]
    P = T * k
    if T == 0:
        return torch.empty_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or get_config(T, E, N, k, x.dtype, x.device)
    BM, BN, BK, GM = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    topk_ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    sorted_pairs, block_expert = align(topk_ids, E, BM)
    num_m = block_expert.shape[0]
    upcast = INTERPRET and x.dtype != torch.float32
    prec = dot_precision(x.dtype)

    h = torch.empty(num_m * BM, N, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_m * cdiv(N, BN),)](
        x, w13, h, sorted_pairs, block_expert, P, k, N, H, num_m,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, UPCAST=upcast, PREC=prec, **launch)

    y = torch.empty(P, H, dtype=x.dtype, device=x.device)
    _down_kernel[(num_m * cdiv(H, BN),)](
        h, w2, y, sorted_pairs, block_expert, P, H, N, num_m,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, UPCAST=upcast, PREC=prec, **launch)

    out = torch.empty_like(x)
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    block = 128 if INTERPRET else 1024
    _sum_topk_kernel[(T, cdiv(H, block))](y, topk_ids, weights, out, H, y.stride(0), out.stride(0), TOP_K=k,
                                          K_PAD=pow2(k), BLOCK=block)
    return out
