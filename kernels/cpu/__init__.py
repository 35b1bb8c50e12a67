"""The C++ CPU kernels (kernels/cpu/exa_cpu.cpp and the headers it includes), compiled on first use and cached.

`load(extra_flags)` returns the extension module, or None when it cannot be built here (no C++ compiler, a
machine that is not x86-64); callers then take the torch path. `extra_flags` (EXASERVE_CPU_EXT_CFLAGS, for
experiments) are added to the compiler's; the first load of a process fixes them, and the ops in
kernels/cpu_ops.py run that build. Each build lives in its own folder
under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), named by a hash of the sources (SOURCES:
exa_cpu.cpp and every header beside it), the compiler flags, the torch version and the Python environment
(sys.prefix and torch's folder: torch's builder rebuilds when its include paths change, so two virtual
environments sharing one folder rebuilt over each other) and the sources' folder (likewise when the source
path changes: two copies of one version took turns rebuilding), so checkouts of different versions and different
environments never rebuild over each other; `exaserve build-kernels` builds ahead of time. It is compiled with
-march=native: a cache directory must not be shared between machines of different CPU generations.

Concurrent builds (two servers starting at once) wait on an flock, which the kernel releases when its holder
dies; a lock file left by torch's builder in a killed process is then removed instead of waited on forever.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

log = logging.getLogger("exaserve.kernels")
SOURCE = Path(__file__).with_name("exa_cpu.cpp")  # the one translation unit: it #includes the headers
SOURCES = [SOURCE, *sorted(SOURCE.parent.glob("*.h"))]  # all that the build hash covers
X86_64 = ("x86_64", "amd64")  # platform.machine() of an x86-64 machine, lower-cased (Windows says AMD64)
NAME = "exaserve_cpu"
BASE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


def build_dir(extra_flags: list[str]) -> Path:
    import torch
    key = hashlib.sha256()
    for src in SOURCES:  # name and length delimit each file, so moving code between files changes the key too
        data = src.read_bytes()
        key.update(f"{src.name}\0{len(data)}\0".encode())
        key.update(data)
    key.update(" ".join([*BASE_FLAGS, *extra_flags, torch.__version__]).encode())
    key.update(f"\0{sys.prefix}\0{Path(torch.__file__).parent}\0{SOURCE.parent.resolve()}".encode())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return root / f"{NAME}-{key.hexdigest()[:16]}"


_loaded: list = []   # the first build this process loaded, which cpu_ops uses


def load(extra_flags: tuple[str, ...] | list[str] = ()):
    """The extension built with `extra_flags`, or None where it cannot be built. Once a build is loaded, a
    process keeps it: asking for other flags then is an error (one Python process can load one build)."""
    if _loaded:
        module, flags = _loaded[0]
        if tuple(extra_flags) not in (flags, ()):
            raise RuntimeError(f"the C++ CPU kernels are already loaded with flags {list(flags)}; a process cannot "
                               f"load them again with {list(extra_flags)}")
        return module
    return _build(tuple(extra_flags))


@functools.cache
def _build(extra: tuple[str, ...]):
    if platform.machine().lower() not in X86_64:  # written and tuned for x86-64 only
        log.warning("C++ CPU kernels are written for x86-64; this machine is %s: using the torch path",
                    platform.machine() or "of unknown architecture")
        return None
    try:
        from torch.utils import cpp_extension
        # each set of flags builds in its own folder, so switching back and forth does not rebuild
        where = build_dir(list(extra))
        where.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(where.with_name(where.name + ".flock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # held only while this process builds or loads
            stale = where / "lock"  # torch's own lock; with the flock held, nobody is building
            if stale.exists():
                log.warning("removing a lock left by an interrupted kernel build in %s", where)
                stale.unlink()
            if not (where / f"{NAME}.so").exists():  # a first start would otherwise be silent for a minute
                log.info("building the C++ CPU kernels in %s (once per source version; about a minute)", where)
            module = cpp_extension.load(
                name=NAME, sources=[str(SOURCE.resolve())], build_directory=str(where),
                extra_cflags=[*BASE_FLAGS, *extra], extra_ldflags=["-fopenmp"], verbose=False)
        dt = time.monotonic() - t0
        if dt > 2:
            log.info("built the C++ CPU kernels in %.1f s (%s)", dt, where)
        _loaded.append((module, extra))
        _check_openmp_spin()
        return module
    except Exception as e:  # no compiler, no ninja, a build error: fall back, but say so
        log.warning("C++ CPU kernels unavailable (%s: %s); using the slower torch path",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None


def _check_openmp_spin() -> None:
    import exaserve
    if exaserve.OPENMP_SPIN == "late":
        log.warning("torch was imported before exaserve, so its OpenMP threads keep libgomp's long spin-wait, "
                    "which makes decoding several times slower when other processes share the cores; import "
                    "exaserve first or set GOMP_SPINCOUNT=%d before starting Python", exaserve.OPENMP_SPIN_COUNT)


def available() -> bool:
    return load() is not None
