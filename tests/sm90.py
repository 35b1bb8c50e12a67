"""Compiling Triton kernels for an H200 (sm_90) on a CPU machine, for the compile checks of
tests/test_sm90_compile.py and tests/test_triton_fp8.py: a stub driver whose target is sm_90 (installed in a
child process: it replaces Triton's driver for the whole process), and `ptxas -v` from the triton wheel for the
registers and spills of the PTX each launch compiles to."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

SMEM_LIMIT = 232_448          # H200 (sm_90): the most shared memory one block may have


def ptxas_path() -> Path | None:
    """The triton wheel's ptxas (the newer one, named -blackwell, first), None where it has none."""
    import triton
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return next((p for p in (folder / "ptxas-blackwell", folder / "ptxas") if p.exists()), None)


def install_driver() -> None:
    """Make Triton compile for sm_90 in this process: a driver whose current target is sm_90 (no GPU needed to
    compile; launching is the caller's business: see JITFunction.run(..., warmup=True))."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class Sm90Stub(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def __init__(self):
            pass

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise NotImplementedError

        def get_device_interface(self):
            raise NotImplementedError

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError

        def clear_cache(self, cache):
            pass

    driver.set_active(Sm90Stub())


_SEEN: dict[str, dict] = {}


def ptxas_info(ptx: str) -> dict:
    """{registers, spill_stores, spill_loads} of `ptx` for sm_90a from `ptxas -v` (the wheel's ptxas binaries in
    turn: the first that reads this PTX version answers), or {ptxas_error}. Cached by PTX text."""
    if ptx in _SEEN:
        return _SEEN[ptx]
    ptxas = ptxas_path()
    if ptxas is None:
        return dict(ptxas_error="the triton wheel has no ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        for exe in dict.fromkeys((ptxas, ptxas.with_name("ptxas"))):
            if not exe.exists():
                continue
            res = subprocess.run([str(exe), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
    info = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    if res.returncode != 0 or not regs or not spill:
        return dict(ptxas_error=info[-2000:])
    _SEEN[ptx] = dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
                      spill_loads=int(spill.group(2)))
    return _SEEN[ptx]
