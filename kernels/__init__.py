"""Compute ops used by the engine: one function per op, the same signature on every device.

Dispatch: the torch path (kernels/torch_ops.py) is the reference and the CPU path. `EXASERVE_KERNELS=torch`
forces it everywhere.
"""
from kernels.torch_ops import (  # noqa: F401
    add_rms_norm,
    fused_moe,
    moe_route,
    paged_attention,
    ring_attention,
    rms_norm,
    rope,
    silu_and_mul,
    write_kv,
)
