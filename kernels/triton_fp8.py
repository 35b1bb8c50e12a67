"""Block-FP8 Triton kernels: the dense GEMM and the fused grouped MoE with float8 e4m3 weights.

Weights as kernels/fp8.py keeps them in memory (fp8.parts reads the scales a weight carries): e4m3 [N, K]
(experts stacked [E, N, K]) with float32 scales [ceil(N / 32), ceil(K / BK)], one per group of 32 rows x BK
columns (BK: the checkpoint's block width; these kernels take a power of two >= 16); w[n, k] = q[n, k] *
scale[n // 32, k // BK], edge groups partial.

Activations are quantized dynamically per token in groups of BK columns, as the FP8 checkpoints are meant to be
run: scale = max(amax, MIN_AMAX) / 448, q = x / scale rounded to e4m3 (nearest, ties to even). Every GEMM steps
through K one group at a time (BLOCK_K = BK): one e4m3 x e4m3 dot per group into a fresh accumulator, then
acc += dot * a_scale[row] * w_scale[col] in fp32; the per-group fp32 add also keeps Hopper's narrow fp8 tensor
core accumulation from spanning more than BK products. Outputs are in x's dtype.

What is fused (the tile config's FUSED_QUANT chooses, per token-count bucket):
- FUSED_QUANT (decode-sized batches): the GEMM loads x in its own dtype and quantizes each [BLOCK_M, BK] tile in
  registers, so a linear is one launch; every column tile repeats that work, which only pays while M is small.
- otherwise: `quantize` (one launch, one read of x) writes e4m3 x and its scales, and the GEMM reads those.
- MoE: the gate_up kernel quantizes its SiLU*up output in its epilogue (BLOCK_N is a multiple of BK, so a tile
  holds whole groups) and stores e4m3 h with its scales; the down kernel reads them: h never exists in 16 bits.
  x goes in fused or pre-quantized as above.

MoE structure as kernels/triton_moe.fused_moe, whose align and top-k sum kernels it shares: align sorts the pairs
by expert; gate_up -> SiLU*up -> down per pair in fp32; the sum weights each token's pairs by their routing
weights in fp32 into x's dtype. topk_ids may hold -1 (an expert on another rank under expert parallelism): align
leaves those pairs out and the sum skips them, so they cost no work.

Under TRITON_INTERPRET=1 the float -> e4m3 cast rounds ties away from zero and loses the carry into the exponent
(126.06 -> 64.0), so there the kernels round in integer arithmetic (`_round_e4m3`, SOFT_ROUND); on a GPU the
cast itself rounds to nearest even with saturation (cvt.rn.satfinite on sm_89+; tests/test_triton_fp8.py checks
the PTX). Divisions use div_rn so the GPU matches torch's `x / scale` bit for bit.

Tile configs: kernels/configs/fp8_<device>.json (fp8_NVIDIA_H200.json for a GPU without its own file):
{"linear" | "moe": {"<shape key>" | "default": {"<bucket>": config}}}; the shape key is
"N=<N>,K=<K>,bk=<BK>,dtype=<x dtype>" for a linear and "E=<E>,N=<I>,K=<H>,bk=<BK>,dtype=<x dtype>" for the MoE;
buckets are token counts M for a linear and rows per expert (M * top_k / E) for the MoE, the smallest bucket
>= the batch (else the largest). A config: BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages, FUSED_QUANT.
"""
from __future__ import annotations

import functools
import json

import torch
import triton
import triton.language as tl

from exaserve.kernels import fp8, torch_ops, triton_moe
from exaserve.kernels.triton_common import INTERPRET, cdiv, pow2
from exaserve.kernels.triton_moe import CONFIG_DIR, align, device_name

FP8, FP8_MAX, ROW_GROUP = fp8.FP8, fp8.FP8_MAX, fp8.ROW_GROUP
MIN_AMAX = 1e-10           # an all-zero group gets this amax (its values quantize to 0 either way)
FALLBACK_DEVICE = "NVIDIA_H200"
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)
_ROW_GROUP = tl.constexpr(ROW_GROUP)


# -- device helpers ------------------------------------------------------------------------------------------

@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as an fp32 (exact in e4m3). Integer
    arithmetic on the fp32 bits: the significand loses 20 bits (normal e4m3, exponent >= -6) or more (subnormal:
    multiples of 2^-9)."""
    bits = v.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32)
    m = ((bits & 0x7FFFFF) | 0x800000).to(tl.int32)
    shift = tl.where(e < 121, 141 - e, 20)
    shift = tl.where(shift > 25, 25, shift)
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    r = q.to(tl.float32) * ((tl.where(e < 121, 121, e) - 3) << 23).to(tl.float32, bitcast=True)
    return tl.where((bits >> 31) == 1, -r, r)


@triton.jit
def _quantize_rows(x, SOFT_ROUND: tl.constexpr):
    """x fp32 [R, BK] (one group per row; masked elements 0) -> (e4m3 [R, BK], scale fp32 [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(tl.where(amax > _MIN_AMAX, amax, _MIN_AMAX), _FP8_MAX)
    v = tl.math.div_rn(x, scale[:, None])
    if SOFT_ROUND:
        v = _round_e4m3(v)
    return v.to(tl.float8e4nv), scale


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: GROUP_M row tiles share each weight column
    tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    per_group = GROUP_M * ((N + BLOCK_N - 1) // BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.where(num_m - first_m < GROUP_M, num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


# -- kernels --------------------------------------------------------------------------------------------------

@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, K, num_groups, sxm, sqm, ssm,
                     BK: tl.constexpr, GROUPS: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """Row pid(0), groups pid(1)*GROUPS ...: q[row] = e4m3(x[row] / scale), one scale per BK columns."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * BK + tl.arange(0, BK)[None, :]
    ok = cols < K
    x = tl.load(x_ptr + row * sxm + cols, mask=ok, other=0.0).to(tl.float32)
    q, scale = _quantize_rows(x, SOFT_ROUND)
    tl.store(q_ptr + row * sqm + cols, q, mask=ok)
    tl.store(s_ptr + row * ssm + g, scale, mask=g < num_groups)


@triton.jit(do_not_specialize=["M"])       # batch-dependent: one compiled kernel for every M
def _linear_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, sam, sasm, swn, swsn, scm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                   FUSED_QUANT: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """c = a @ w^T with a e4m3 + scales (or x, quantized here under FUSED_QUANT), w e4m3 + block scales."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * sam + ks[None, :]
    as_ptrs = as_ptr + rows.to(tl.int64) * sasm
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * swn + ks[:, None]
    ws_ptrs = ws_ptr + (cols // _ROW_GROUP) * swsn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (K + BK - 1) // BK):
        k_ok = ks < K - kb * BK
        if FUSED_QUANT:
            x = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a, a_s = _quantize_rows(x, SOFT_ROUND)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=row_ok, other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_s = tl.load(ws_ptrs + kb, mask=col_ok, other=0.0)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BK
        w_ptrs += BK
    out = c_ptr + rows[:, None].to(tl.int64) * scm + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _gate_up_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, sorted_ptr, expert_ptr,
                    num_pairs, top_k, N, K, num_rows,
                    sam, sasm, swe, swn, swse, swsn, shm, shsm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    FUSED_QUANT: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """h[row, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, N + n]) for one expert's tile of sorted rows, stored
    as e4m3 with one scale per BK columns (hs[row, n // BK])."""
    pid_m, pid_n = _tile(num_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:                            # past the last tile
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + tok[:, None] * sam + ks[None, :]
    as_ptrs = as_ptr + tok * sasm
    g_ptrs = w_ptr + e.to(tl.int64) * swe + cols[None, :].to(tl.int64) * swn + ks[:, None]
    u_ptrs = g_ptrs + N * swn
    gs_ptrs = ws_ptr + e * swse + (cols // _ROW_GROUP) * swsn
    us_ptrs = ws_ptr + e * swse + ((N + cols) // _ROW_GROUP) * swsn
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (K + BK - 1) // BK):
        k_ok = ks < K - kb * BK
        if FUSED_QUANT:
            x = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a, a_s = _quantize_rows(x, SOFT_ROUND)
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=valid, other=0.0)
        w_ok = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=w_ok, other=0.0)
        u = tl.load(u_ptrs, mask=w_ok, other=0.0)
        g_s = tl.load(gs_ptrs + kb, mask=col_ok, other=0.0)
        u_s = tl.load(us_ptrs + kb, mask=col_ok, other=0.0)
        acc_g += tl.dot(a, g) * a_s[:, None] * g_s[None, :]
        acc_u += tl.dot(a, u) * a_s[:, None] * u_s[None, :]
        a_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u       # 0 in columns past N (their weights load as 0)
    q, scale = _quantize_rows(tl.reshape(h, (BLOCK_M * (BLOCK_N // BK), BK)), SOFT_ROUND)
    out = h_ptr + rows[:, None].to(tl.int64) * shm + cols[None, :]
    tl.store(out, tl.reshape(q, (BLOCK_M, BLOCK_N)), mask=valid[:, None] & col_ok[None, :])
    gs = pid_n * (BLOCK_N // BK) + tl.arange(0, BLOCK_N // BK)
    s_out = hs_ptr + rows[:, None].to(tl.int64) * shsm + gs[None, :]
    tl.store(s_out, tl.reshape(scale, (BLOCK_M, BLOCK_N // BK)), mask=valid[:, None] & (gs[None, :] * BK < N))


@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, sorted_ptr, expert_ptr, num_pairs, N, K, num_rows,
                 shm, shsm, swe, swn, swse, swsn, sym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y[pair, n] = h[row] . w[e, n] in fp32, for one expert's tile of sorted rows."""
    pid_m, pid_n = _tile(num_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    valid = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BK)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * shm + ks[None, :]
    as_ptrs = hs_ptr + rows.to(tl.int64) * shsm
    w_ptrs = w_ptr + e.to(tl.int64) * swe + cols[None, :].to(tl.int64) * swn + ks[:, None]
    ws_ptrs = ws_ptr + e * swse + (cols // _ROW_GROUP) * swsn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (K + BK - 1) // BK):
        k_ok = ks < K - kb * BK
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=valid, other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_s = tl.load(ws_ptrs + kb, mask=col_ok, other=0.0)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        a_ptrs += BK
        w_ptrs += BK
    out = y_ptr + pair[:, None].to(tl.int64) * sym + cols[None, :]
    tl.store(out, acc, mask=valid[:, None] & col_ok[None, :])


# -- tile configs -----------------------------------------------------------------------------------------------

def interpreter_config(block_k: int) -> dict:
    """Few mid-size tiles: the interpreter's time grows with the number of programs."""
    return dict(BLOCK_M=16, BLOCK_N=max(32, block_k), GROUP_M=1, num_warps=4, num_stages=1, FUSED_QUANT=True)


@functools.cache
def config_table(device: str) -> dict:
    """kernels/configs/fp8_<device>.json, else the H200 defaults."""
    path = CONFIG_DIR / f"fp8_{device}.json"
    if not path.exists():
        path = CONFIG_DIR / f"fp8_{FALLBACK_DEVICE}.json"
    return json.loads(path.read_text())


def pick(op: str, shape_key: str, size: float, device: str) -> dict:
    """The config of `op` ("linear" or "moe") for the bucket of `size` under `shape_key`, else the defaults."""
    tables = config_table(device)[op]
    table = tables.get(shape_key) or tables["default"]
    above = [int(b) for b in table if int(b) >= size]
    return table[str(min(above) if above else max(int(b) for b in table))]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=4096)
def linear_config(M: int, N: int, K: int, block_k: int, dtype: torch.dtype, device=None) -> dict:
    if INTERPRET:
        return interpreter_config(block_k)
    return pick("linear", f"N={N},K={K},bk={block_k},dtype={_dtype_name(dtype)}", M, device_name(device))


@functools.lru_cache(maxsize=4096)
def moe_config(M: int, E: int, N: int, K: int, top_k: int, block_k: int, dtype: torch.dtype, device=None) -> dict:
    if INTERPRET:
        return interpreter_config(block_k)
    return pick("moe", f"E={E},N={N},K={K},bk={block_k},dtype={_dtype_name(dtype)}", M * top_k / E,
                device_name(device))


# -- host wrappers ----------------------------------------------------------------------------------------------

def _check_block_k(block_k: int) -> None:
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"FP8 block width {block_k}: the Triton FP8 kernels need a power of two >= 16")


def _check_weight(name: str, w: torch.Tensor, scale: torch.Tensor, block_k: int) -> None:
    if w.dtype != FP8:
        raise ValueError(f"{name} must be {FP8}, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {list(w.shape)}, strides {list(w.stride())})")
    want = (*w.shape[:-2], -(-w.shape[-2] // ROW_GROUP), -(-w.shape[-1] // block_k))
    if tuple(scale.shape) != want or scale.dtype != torch.float32:
        raise ValueError(f"the scale of {name} {list(w.shape)} (groups of {ROW_GROUP} rows x {block_k} columns) "
                         f"must be float32 {list(want)}, got {scale.dtype} {list(scale.shape)}")
    if not scale.is_contiguous():
        raise ValueError(f"the scale of {name} must be contiguous")


def quantize(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group activation quantization: x [M, K] -> (e4m3 [M, K], scale float32 [M, ceil(K / block_k)])
    with x ~= q * scale[:, k // block_k]."""
    _check_block_k(block_k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    num_groups = -(-K // block_k)
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, num_groups, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    groups = max(1, min(pow2(num_groups), (256 if INTERPRET else 4096) // block_k))
    _quantize_kernel[(M, cdiv(num_groups, groups))](
        x, q, scale, K, num_groups, x.stride(0), q.stride(0), scale.stride(0),
        BK=block_k, GROUPS=groups, SOFT_ROUND=INTERPRET, num_warps=4)
    return q, scale


def linear_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int,
               config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ w^T for an e4m3 weight w [N, K] with block scales; activations quantized per token in groups of
    block_k; fp32 accumulation; output [..., N] in x's dtype."""
    _check_block_k(block_k)
    _check_weight("the FP8 weight", w, scale, block_k)
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear_fp8: x has {x.shape[-1]} columns, the weight {list(w.shape)} needs {K}")
    lead = x.shape[:-1]
    x = x.reshape(-1, K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*lead, N)
    cfg = config or linear_config(M, N, K, block_k, x.dtype, x.device)
    if cfg["FUSED_QUANT"]:
        a, a_scale = x, scale            # a_scale unused: the kernel quantizes x itself
    else:
        a, a_scale = quantize(x, block_k)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    _linear_kernel[(cdiv(M, BM) * cdiv(N, BN),)](
        a, a_scale, w, scale, out, M, N, K, a.stride(0), a_scale.stride(0), w.stride(0), scale.stride(0),
        out.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BK=block_k, GROUP_M=cfg["GROUP_M"], FUSED_QUANT=cfg["FUSED_QUANT"],
        SOFT_ROUND=INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*lead, N)


def fused_moe_fp8(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_k: int,
                  config: dict | None = None) -> torch.Tensor:
    """Routed experts with e4m3 weights: sum_j topk_weights[t, j] * down(silu(gate x) * up x) over the experts
    topk_ids[t, j] >= 0 (-1: an expert of another rank, skipped). x [T, H]; w13 [E, 2I, H] (gate rows, then up);
    w2 [E, H, I]; scales per kernels/fp8.py; output [T, H] in x's dtype."""
    _check_block_k(block_k)
    _check_weight("w13", w13, w13_scale, block_k)
    _check_weight("w2", w2, w2_scale, block_k)
    T, H = x.shape
    E, two_n, _ = w13.shape
    N = two_n // 2
    if w13.shape != (E, 2 * N, H) or w2.shape != (E, H, N):
        raise ValueError(f"fused_moe_fp8: x [{T}, {H}] needs w13 [E, 2I, {H}] and w2 [E, {H}, I]; got w13 "
                         f"{list(w13.shape)}, w2 {list(w2.shape)}")
    k = topk_ids.shape[1]
    P = T * k
    if T == 0:
        return torch.empty_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or moe_config(T, E, N, H, k, block_k, x.dtype, x.device)
    BM, BN, GM = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["GROUP_M"]
    if BN % block_k:
        raise ValueError(f"fused_moe_fp8: BLOCK_N {BN} must be a multiple of the block width {block_k} (the "
                         f"gate_up epilogue quantizes whole groups)")
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    topk_ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    sorted_pairs, block_expert = align(topk_ids, E, BM)
    num_rows = block_expert.numel() * BM
    if cfg["FUSED_QUANT"]:
        a, a_scale = x, w13_scale        # a_scale unused
    else:
        a, a_scale = quantize(x, block_k)

    h = torch.empty(num_rows, N, dtype=FP8, device=x.device)
    h_scale = torch.empty(num_rows, cdiv(N, block_k), dtype=torch.float32, device=x.device)
    _gate_up_kernel[(block_expert.numel() * cdiv(N, BN),)](
        a, a_scale, w13, w13_scale, h, h_scale, sorted_pairs, block_expert, P, k, N, H, num_rows,
        a.stride(0), a_scale.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1),
        h.stride(0), h_scale.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BK=block_k, GROUP_M=GM, FUSED_QUANT=cfg["FUSED_QUANT"], SOFT_ROUND=INTERPRET,
        **launch)

    y = torch.empty(P, H, dtype=torch.float32, device=x.device)
    _down_kernel[(block_expert.numel() * cdiv(H, BN),)](
        h, h_scale, w2, w2_scale, y, sorted_pairs, block_expert, P, H, N, num_rows,
        h.stride(0), h_scale.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1),
        y.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BK=block_k, GROUP_M=GM, **launch)

    out = torch.empty_like(x)
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    block = 128 if INTERPRET else 1024
    triton_moe._sum_topk_kernel[(T, cdiv(H, block))](y, topk_ids, weights, out, H, y.stride(0), out.stride(0),
                                                      TOP_K=k, K_PAD=pow2(k), BLOCK=block)
    return out


# -- op table entries -------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The triton backend's linear: block-FP8 weights through linear_fp8, any other weight as the torch path."""
    parts = fp8.parts(weight)
    if parts is None:
        return torch_ops.linear(x, weight)
    return linear_fp8(x, weight, *parts)


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    """The triton backend's fused_moe: FP8 expert stacks through fused_moe_fp8, others through triton_moe."""
    p13, p2 = fp8.parts(w13), fp8.parts(w2)
    if p13 is None and p2 is None:
        return triton_moe.fused_moe(x, w13, w2, topk_weights, topk_ids)
    if p13 is None or p2 is None or p13[1] != p2[1]:
        raise ValueError("fused_moe: w13 and w2 must both be FP8 with the same block width, or neither "
                         f"(w13: {w13.dtype}, w2: {w2.dtype})")
    return fused_moe_fp8(x, w13, p13[0], w2, p2[0], topk_weights, topk_ids, p13[1])
