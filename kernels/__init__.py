"""Compute ops used by the engine: one function per op, the same signature on every device.

Dispatch, decided on every call from the first tensor argument and the environment variable
`EXASERVE_KERNELS` (read at call time, so a process can switch between paths):
- unset or `auto`: the Triton kernel for CUDA tensors; for float32 CPU tensors the C++ kernels
  (kernels/cpu/, built on first use) when they build here; the torch path (kernels/torch_ops.py) otherwise;
- `torch`: the torch path everywhere;
- `cpu`: the C++ kernels (CPU float32 activations; weights float32 or bfloat16);
- `triton`: the Triton kernel everywhere (on CPU this needs `TRITON_INTERPRET=1` set before the first op
  runs, since the kernel modules read it when they are imported).
An op with no kernel on the chosen path takes the torch path.

The Triton modules are imported on first use, so importing `kernels` works without triton installed.
`moe_route` and `argmax` have no Triton kernel (torch on GPU; C++ on CPU).
"""
import functools
import importlib
import importlib.util
import os

import torch

from exaserve.kernels import cpu, cpu_ops, fused_ops, torch_ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
_module = functools.cache(importlib.import_module)
_environ = os.environ   # read per call (a process may switch paths); bound once to skip the module lookup


def backend(x) -> str:
    """'triton', 'cpu' or 'torch': the path an op on tensor x takes now."""
    mode = _environ.get("EXASERVE_KERNELS", "auto")
    if mode == "auto":
        if x.is_cuda:
            return "triton" if HAS_TRITON else "torch"
        return "cpu" if x.dtype is torch.float32 and x.is_cpu and cpu.available() else "torch"
    if mode not in ("torch", "triton", "cpu"):
        raise ValueError(f"EXASERVE_KERNELS={mode!r}; use torch, triton, cpu or auto")
    return mode


def _op(reference, module: str | None):
    name = reference.__name__
    cpu_impl = getattr(cpu_ops, name, None)

    @functools.wraps(reference)
    def op(*args, **kwargs):
        path = backend(args[0])
        if path == "triton" and module is not None:
            return getattr(_module(module), name)(*args, **kwargs)
        if path == "cpu" and cpu_impl is not None:
            return cpu_impl(*args, **kwargs)
        return reference(*args, **kwargs)

    return op


linear = _op(torch_ops.linear, None)
rms_norm = _op(torch_ops.rms_norm, "exaserve.kernels.triton_norm")
add_rms_norm = _op(torch_ops.add_rms_norm, "exaserve.kernels.triton_norm")
rope = _op(torch_ops.rope, "exaserve.kernels.triton_norm")
silu_and_mul = _op(torch_ops.silu_and_mul, "exaserve.kernels.triton_norm")
qk_norm_rope = _op(fused_ops.qk_norm_rope, "exaserve.kernels.triton_norm")
fused_moe = _op(torch_ops.fused_moe, "exaserve.kernels.triton_moe")
write_kv = _op(torch_ops.write_kv, "exaserve.kernels.triton_attention")
paged_attention = _op(torch_ops.paged_attention, "exaserve.kernels.triton_attention")
ring_attention = _op(torch_ops.ring_attention, "exaserve.kernels.triton_attention")
moe_route = _op(torch_ops.moe_route, None)
argmax = _op(torch_ops.argmax, None)


def mlp(x, gate_up, down):
    """SwiGLU MLP (dense layers, shared experts): down(silu(gate x) * up x)."""
    if backend(x) == "cpu":
        return cpu_ops.mlp(x, gate_up, down)
    return linear(silu_and_mul(linear(x, gate_up)), down)


def moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up=None, shared_down=None):
    """The MoE block after routing: routed experts (fused_moe) plus the shared expert when given."""
    if backend(x) == "cpu":
        return cpu_ops.moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up, shared_down)
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    return out if shared_gate_up is None else out + mlp(x, shared_gate_up, shared_down)
