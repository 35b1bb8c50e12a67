"""Pieces shared by the Triton kernel modules.

Kernels call no other @triton.jit functions, and use tl.where / tl.full / integer arithmetic where
tl.maximum / tl.minimum / tl.zeros / tl.cdiv (themselves @jit helpers) would do: the interpreter re-patches
triton.language on every nested jit call (milliseconds each), which made the CPU tests several times slower.

Host code uses cdiv / pow2 below, not triton.cdiv / triton.next_power_of_2: those cost microseconds a call in
recent Triton, and a decode step makes dozens of such calls.
"""
import os

import torch

# Read when the first kernel module is imported, which is also when triton decides interpreter vs compiler.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype):
    """tl.dot input_precision: full fp32 ("ieee", not TF32) for fp32 operands, so fp32 runs match the torch
    path to ~1e-6; the default (tensor cores) for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else None
