"""Compute ops used by the engine: one function per op, the same signature on every device.

Dispatch, decided on every call from the first tensor argument and the environment variable
`EXASERVE_KERNELS` (read at call time, so a process can switch between paths):
- unset or `auto`: the Triton kernel for CUDA tensors, the torch path (kernels/torch_ops.py) elsewhere;
- `torch`: the torch path everywhere;
- `triton`: the Triton kernel everywhere (on CPU this needs `TRITON_INTERPRET=1` set before the first op
  runs, since the kernel modules read it when they are imported).

The Triton modules are imported on first use, so importing `kernels` works without triton installed.
`moe_route` is fused torch on every device (a few small fp32 ops).
"""
import functools
import importlib
import importlib.util
import os

from kernels import fused_ops, torch_ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
_module = functools.cache(importlib.import_module)


def backend(x) -> str:
    """'triton' or 'torch': the path an op on tensor x takes now."""
    mode = os.environ.get("EXASERVE_KERNELS", "auto")
    if mode == "auto":
        return "triton" if HAS_TRITON and x.is_cuda else "torch"
    if mode not in ("torch", "triton"):
        raise ValueError(f"EXASERVE_KERNELS={mode!r}; use torch, triton or auto")
    return mode


def _op(reference, module: str):
    name = reference.__name__

    @functools.wraps(reference)
    def op(*args, **kwargs):
        if backend(args[0]) == "triton":
            return getattr(_module(module), name)(*args, **kwargs)
        return reference(*args, **kwargs)

    return op


rms_norm = _op(torch_ops.rms_norm, "kernels.triton_norm")
add_rms_norm = _op(torch_ops.add_rms_norm, "kernels.triton_norm")
rope = _op(torch_ops.rope, "kernels.triton_norm")
silu_and_mul = _op(torch_ops.silu_and_mul, "kernels.triton_norm")
qk_norm_rope = _op(fused_ops.qk_norm_rope, "kernels.triton_norm")
fused_moe = _op(torch_ops.fused_moe, "kernels.triton_moe")
write_kv = _op(torch_ops.write_kv, "kernels.triton_attention")
paged_attention = _op(torch_ops.paged_attention, "kernels.triton_attention")
ring_attention = _op(torch_ops.ring_attention, "kernels.triton_attention")
moe_route = torch_ops.moe_route
