"""Torch paths of fused ops that have no single counterpart in torch_ops (the reference for their kernels)."""
import torch

from exaserve.kernels import torch_ops


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_rope: bool):
    """The attention front after the qkv projection: per-head RMSNorm of q [T, nq, d] and k [T, nkv, d]
    (weights [d]), then NeoX RoPE on both when use_rope. Returns new (q, k)."""
    q = torch_ops.rms_norm(q, q_weight, eps)
    k = torch_ops.rms_norm(k, k_weight, eps)
    if use_rope:
        q = torch_ops.rope(q, positions, cos, sin)
        k = torch_ops.rope(k, positions, cos, sin)
    return q, k
