"""Triton kernels for the row-wise ops: RMSNorm (optionally fused with the residual add), RoPE, SiLU*up, and
the fused per-head q/k RMSNorm + RoPE of the attention front. Each writes a fresh contiguous output and
rounds where the torch path rounds (the normalised row to the input dtype before the weight multiplies it,
the residual sum and each RoPE product to the input dtype), so fp16 results match it to the last bit or two.
"""
import torch
import triton
import triton.language as tl


def _rows3d(x: torch.Tensor):
    """x [..., N] as a [A, B, N] view with a unit last stride; (view, A, B, stride_a, stride_b).

    Two row strides cover the engine's strided inputs without a copy (q/k/v are column slices of the fused
    qkv output, reshaped to [T, heads, d])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        x = x.view(1, 1, -1)
    elif x.dim() == 2:
        x = x.unsqueeze(1)
    elif x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x, x.shape[0], x.shape[1], x.stride(0), x.stride(1)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, R, B, N, sxa, sxb, sra, srb, eps,
                     HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows of the [A, B, N] view per program (several short rows, e.g. heads, share one program)."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    a = (row // B).to(tl.int64)
    b = row % B
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (row < R) & (cols < N)
    x = tl.load(x_ptr + a * sxa + b * sxb + cols, mask=mask, other=0.0)
    dst = row.to(tl.int64) * N + cols
    if HAS_RES:
        r = tl.load(res_ptr + a * sra + b * srb + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + dst, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)
    y = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + dst, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(x3, r3, weight, out, s, A, B, sa, sb, ra, rb, eps, has_res):
    N = out.shape[-1]
    block = triton.next_power_of_2(N)
    rows = max(1, min(64, 4096 // block))
    _rms_norm_kernel[(triton.cdiv(A * B, rows),)](x3, r3, weight, out, s, A * B, B, N, sa, sb, ra, rb, eps,
                                                  HAS_RES=has_res, ROWS=rows, BLOCK=block,
                                                  num_warps=4 if block * rows <= 2048 else 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x3, A, B, sa, sb = _rows3d(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if out.numel():
        _launch_rms_norm(x3, x3, weight, out, out, A, B, sa, sb, sa, sb, eps, False)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x3, A, B, sa, sb = _rows3d(x)
    r3, _, _, ra, rb = _rows3d(residual.expand_as(x))
    s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(s.dtype, weight.dtype), device=x.device)
    if out.numel():
        _launch_rms_norm(x3, r3, weight, out, s, A, B, sa, sb, ra, rb, eps, True)
    return out, s


@triton.jit
def _head_norm_rope_kernel(x_ptr, w_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, NH, D, sxt, sxh, scos, eps,
                           NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """All heads [NH, D] of one token: per-head RMSNorm (NORM), then NeoX rotate-half RoPE (ROPE), each
    rounded to the output dtype as the torch path rounds it. Works on the two halves of every head."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    HALF = D // 2
    cols = tl.arange(0, BLOCK_D // 2)[None, :]
    mask = (heads < NH) & (cols < HALF)
    src = x_ptr + t * sxt + heads * sxh + cols
    x1 = tl.load(src, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / D + eps)[:, None]
        w1 = tl.load(w_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        a = (w1 * (a * rstd).to(x1.dtype).to(tl.float32)).to(dt).to(tl.float32)
        b = (w2 * (b * rstd).to(x1.dtype).to(tl.float32)).to(dt).to(tl.float32)
    if ROPE:
        p = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(cos_ptr + p * scos + cols, mask=cols < HALF, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + p * scos + cols, mask=cols < HALF, other=0.0).to(dt).to(tl.float32)
        a2 = (a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)
        b = (b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)
        a = a2
    dst = out_ptr + t * NH * D + heads * D + cols
    tl.store(dst, a.to(dt), mask=mask)
    tl.store(dst + HALF, b.to(dt), mask=mask)


def _head_norm_rope(x, weight, eps, positions, cos, sin, norm: bool, rope: bool):
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, nh, d = x.shape
    assert d % 2 == 0, "head_dim must be even"
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if norm else x.dtype
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if T:
        cos, sin = (cos.contiguous(), sin.contiguous()) if rope else (x, x)
        _head_norm_rope_kernel[(T,)](x, weight if norm else x, positions if rope else x, cos, sin, out, nh, d,
                                     x.stride(0), x.stride(1), cos.stride(0), eps, NORM=norm, ROPE=rope,
                                     BLOCK_H=triton.next_power_of_2(nh), BLOCK_D=max(2, triton.next_power_of_2(d)))
    return out


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _head_norm_rope(x, x, 0.0, positions, cos, sin, norm=False, rope=True)


def qk_norm_rope(q, k, q_weight, k_weight, eps: float, positions, cos, sin, use_rope: bool):
    return (_head_norm_rope(q, q_weight, eps, positions, cos, sin, True, use_rope),
            _head_norm_rope(k, k_weight, eps, positions, cos, sin, True, use_rope))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, sx, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + t * sx + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + t * sx + N + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + t * N + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    N = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(N))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(N, block))](x2, out, N, x2.stride(0), BLOCK=block)
    return out
