"""Block-FP8 weights in memory: the one layout every backend reads (torch, the C++ CPU kernels, Triton).

A quantized linear weight is a torch.float8_e4m3fn tensor [N, K] (or stacked experts [E, N, K]) that carries
its scales as attributes (`attach`): `fp8_scale`, float32 [..., ceil(N / 32), ceil(K / block_k)], one scale
per group of ROW_GROUP = 32 rows by `block_k` columns, and `fp8_block_k`. The weight it stands for is
w[n, k] = float(q[n, k]) * fp8_scale[n // 32, k // block_k].

Why groups of 32 rows when checkpoints scale 128 x 128 blocks: the engine fuses weights (q/k/v rows into one
matrix, gate/up rows, experts stacked), and every fused source starts on a multiple of 32 rows in every real
configuration, so one regular grid covers the fused matrix (each 128-row block's scale is repeated four times:
~0.1% of the weight's bytes). 32 is also the C++ kernels' panel width, so a panel has one scale per column
block. A weight whose sources do not start on 32-row boundaries is not kept as FP8 (engine/loader.py
dequantizes it and says so).
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0           # largest finite float8 e4m3fn value
ROW_GROUP = 32            # rows per scale in memory (see above)


def attach(w: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """Mark FP8 weight `w` (a tensor or parameter) with its scale grid; returns w."""
    if w.dtype != FP8:
        raise ValueError(f"an FP8 weight must be {FP8}, got {w.dtype}")
    want = (*w.shape[:-2], -(-w.shape[-2] // ROW_GROUP), -(-w.shape[-1] // block_k))
    if tuple(scale.shape) != want or scale.dtype != torch.float32:
        raise ValueError(f"the scale of an FP8 weight {list(w.shape)} in groups of {ROW_GROUP} rows x {block_k} "
                         f"columns must be float32 {list(want)}, got {scale.dtype} {list(scale.shape)}")
    w.fp8_scale, w.fp8_block_k = scale, int(block_k)
    return w


def parts(w) -> tuple[torch.Tensor, int] | None:
    """(scale, block_k) of an FP8 weight, None for any other weight."""
    scale = getattr(w, "fp8_scale", None)
    return None if scale is None else (scale, w.fp8_block_k)


def expand(scale: torch.Tensor, shape, block_k: int) -> torch.Tensor:
    """The scale of every element of a weight of `shape` (groups of ROW_GROUP rows x block_k columns)."""
    n, k = shape[-2], shape[-1]
    return scale.repeat_interleave(ROW_GROUP, -2)[..., :n, :].repeat_interleave(block_k, -1)[..., :k]


def dequantize(w: torch.Tensor, dtype=torch.float32, expert: int | None = None) -> torch.Tensor:
    """The weight an FP8 weight stands for, in `dtype` (one expert of a stack with `expert`); any other weight
    is returned as it is (converted to dtype)."""
    p = parts(w)
    if p is None:
        return (w if expert is None else w[expert]).to(dtype)
    scale, block_k = p
    q = w.data if expert is None else w.data[expert]
    s = scale if expert is None else scale[expert]
    return (q.float() * expand(s, q.shape, block_k)).to(dtype)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight in blocks of block[0] rows x block[1] columns (edges partial), as the published
    FP8 checkpoints are: scale = amax / 448 per block, q = w / scale rounded to e4m3. Returns (q, scale
    float32 [ceil(N / block[0]), ceil(K / block[1])])."""
    n, k = w.shape
    rows, cols = -(-n // block[0]), -(-k // block[1])
    padded = torch.zeros(rows * block[0], cols * block[1], device=w.device)
    padded[:n, :k] = w.float()
    scale = (padded.view(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
    wide = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (w.float() / wide).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
