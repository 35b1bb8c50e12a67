"""The C++ CPU kernels (kernels/cpu/exa_cpu.cpp), compiled on first use and cached.

`load()` returns the extension module, or None when it cannot be built here (no C++ compiler, or
EXASERVE_CPU_EXT=0); callers then take the torch path. The build is once per source version and machine
(torch keeps it under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR); `exaserve build-kernels` runs it
ahead of time. It is compiled with -march=native: a cache directory must not be shared between machines of
different CPU generations.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import zlib
from pathlib import Path

log = logging.getLogger("exaserve.kernels")
SOURCE = Path(__file__).with_name("exa_cpu.cpp")


@functools.cache
def load():
    if os.environ.get("EXASERVE_CPU_EXT", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension
        # EXASERVE_CPU_EXT_CFLAGS: extra compiler flags for experiments (e.g. -DEXA_PREFETCH=64); each set of
        # flags builds under its own name, so switching back and forth does not rebuild.
        extra = os.environ.get("EXASERVE_CPU_EXT_CFLAGS", "").split()
        name = "exaserve_cpu" + (f"_{zlib.crc32(' '.join(extra).encode()):08x}" if extra else "")
        t0 = time.monotonic()
        module = cpp_extension.load(
            name=name, sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", *extra],
            extra_ldflags=["-fopenmp"], verbose=False)
        dt = time.monotonic() - t0
        if dt > 2:
            log.info("built the C++ CPU kernels in %.1f s", dt)
        return module
    except Exception as e:  # no compiler, no ninja, a build error: fall back, but say so
        log.warning("C++ CPU kernels unavailable (%s: %s); using the slower torch path",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None


def available() -> bool:
    return load() is not None
