"""The C++ CPU kernels (kernels/cpu/exa_cpu.cpp), compiled on first use and cached.

`load()` returns the extension module, or None when it cannot be built here (no C++ compiler, or
EXASERVE_CPU_EXT=0); callers then take the torch path. Each build lives in its own folder under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), named by a hash of the source, the compiler flags
and the torch version, so checkouts of different versions never rebuild over each other; `exaserve
build-kernels` builds ahead of time. It is compiled with -march=native: a cache directory must not be shared
between machines of different CPU generations.

Concurrent builds (two servers starting at once) wait on an flock, which the kernel releases when its holder
dies; a lock file left by torch's builder in a killed process is then removed instead of waited on forever.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("exaserve.kernels")
SOURCE = Path(__file__).with_name("exa_cpu.cpp")
NAME = "exaserve_cpu"
BASE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


def build_dir(extra_flags: list[str]) -> Path:
    import torch
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([*BASE_FLAGS, *extra_flags, torch.__version__]).encode())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return root / f"{NAME}-{key.hexdigest()[:16]}"


@functools.cache
def load():
    if os.environ.get("EXASERVE_CPU_EXT", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension
        # EXASERVE_CPU_EXT_CFLAGS: extra compiler flags for experiments (e.g. -DEXA_PREFETCH=64); each set of
        # flags builds in its own folder, so switching back and forth does not rebuild.
        extra = os.environ.get("EXASERVE_CPU_EXT_CFLAGS", "").split()
        where = build_dir(extra)
        where.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(where.with_name(where.name + ".flock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held only while this process builds or loads
            stale = where / "lock"  # torch's own lock; with the flock held, nobody is building
            if stale.exists():
                log.warning("removing a lock left by an interrupted kernel build in %s", where)
                stale.unlink()
            module = cpp_extension.load(
                name=NAME, sources=[str(SOURCE)], build_directory=str(where),
                extra_cflags=[*BASE_FLAGS, *extra], extra_ldflags=["-fopenmp"], verbose=False)
        dt = time.monotonic() - t0
        if dt > 2:
            log.info("built the C++ CPU kernels in %.1f s (%s)", dt, where)
        return module
    except Exception as e:  # no compiler, no ninja, a build error: fall back, but say so
        log.warning("C++ CPU kernels unavailable (%s: %s); using the slower torch path",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None


def available() -> bool:
    return load() is not None
