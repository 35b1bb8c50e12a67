"""Compute ops: one function per op, the same signature on every backend.

A backend is an op table (`Ops`) from a registry of names, chosen once per engine by `select` and handed to the
model; weights are then packed for it (the cpu backend's layout, see engine/cpu_model.py):
- `torch`: kernels/torch_ops.py (+ fused_ops.py), the reference and the fallback on every device;
- `cpu`: the C++ kernels (kernels/cpu/, built on first use; kernels/cpu_ops.py) for float32 activations on the
  CPU, weights fp32 or bf16;
- `triton`: the Triton kernels (kernels/triton_*.py) for CUDA; on a CPU only under TRITON_INTERPRET=1, set
  before the first Triton module is imported (tests).
An op a backend has no kernel for is the torch one. `auto` picks triton on CUDA and cpu on a CPU, and falls back
to torch (with a warning) where those cannot run; a backend named explicitly that cannot run here is an error.
Tests call each backend's module directly (same signatures).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from exaserve.kernels import cpu, cpu_ops, fused_ops, torch_ops

log = logging.getLogger("exaserve.kernels")
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("torch", "cpu", "triton")


class BackendError(ValueError):
    """A backend that cannot run on this machine, or an unknown name."""


@dataclass(frozen=True)
class Ops:
    """The op table of one backend."""
    name: str
    linear: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    silu_and_mul: Callable
    qk_norm_rope: Callable
    fused_moe: Callable
    write_kv: Callable
    paged_attention: Callable
    ring_attention: Callable
    moe_route: Callable
    argmax: Callable
    mlp: Callable     # SwiGLU MLP (dense layers, shared experts): down(silu(gate x) * up x)
    moe: Callable     # the MoE block after routing: routed experts (fused_moe) + the shared expert when given


_OPS = [f.name for f in dataclasses.fields(Ops) if f.name != "name"]


def _composites(table: dict) -> dict:
    """mlp and moe from the table's own linear, silu_and_mul and fused_moe (for backends without fused ones)."""
    linear, silu_and_mul, fused_moe = table["linear"], table["silu_and_mul"], table["fused_moe"]

    def mlp(x, gate_up, down):
        return linear(silu_and_mul(linear(x, gate_up)), down)

    def moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up=None, shared_down=None):
        out = fused_moe(x, w13, w2, topk_weights, topk_ids)
        return out if shared_gate_up is None else out + mlp(x, shared_gate_up, shared_down)

    return {"mlp": mlp, "moe": moe}


def _table(name: str, *modules) -> Ops:
    """Later modules override earlier ones; the torch path fills every op no module has."""
    table = {}
    for module in (torch_ops, fused_ops, *modules):
        table.update({op: getattr(module, op) for op in _OPS if hasattr(module, op)})
    if not any(hasattr(m, "moe") for m in modules):
        table.update(_composites(table))
    return Ops(name=name, **table)


def unavailable(name: str, device: torch.device, cpu_flags: tuple[str, ...] = ()) -> str | None:
    """Why backend `name` cannot run on `device` here, or None when it can."""
    if name not in BACKENDS:
        return f"unknown kernel backend {name!r}; use one of {', '.join(BACKENDS)} or auto"
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on the CPU, and the engine's device is {device}"
        if cpu.load(cpu_flags) is None:
            return "the C++ CPU kernels did not build here (see the warning above)"
    if name == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the Triton kernels need a CUDA device (the engine's device is {device})"
    return None


def select(name: str, device: torch.device | str, cpu_flags: tuple[str, ...] = ()) -> Ops:
    """The op table of backend `name` (torch, cpu, triton or auto) for `device`; BackendError when it cannot
    run here. cpu_flags: extra compiler flags for the C++ kernels (experiments; each set builds apart)."""
    device = torch.device(device)
    flags = tuple(cpu_flags)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
        why = unavailable(name, device, flags)
        if why is not None:
            log.warning("kernel backend %s unavailable (%s): using the torch path", name, why)
            name = "torch"
    why = unavailable(name, device, flags)
    if why is not None:
        raise BackendError(f"kernel backend {name!r} cannot run here: {why}")
    if name == "torch":
        return _table("torch")
    if name == "cpu":
        return _table("cpu", cpu_ops)
    return _table("triton", *(importlib.import_module(f"exaserve.kernels.triton_{m}")
                              for m in ("norm", "moe", "attention", "fp8")))
