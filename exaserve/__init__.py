"""exaserve: a high-throughput OpenAI-compatible inference server for EXAONE-MoE (K-EXAONE) checkpoints.

The repository's top-level folders install as subpackages of this one (pyproject.toml, `package-dir`):
`exaserve.engine` (engine/), `exaserve.kernels` (kernels/), `exaserve.server` (server/). `exaserve.cli` is the
`exaserve` command; `exaserve.testing` makes checkpoints for tests and benchmarks.
"""
import os
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("exaserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.1.0+src"

# How long an idle OpenMP thread spins before it sleeps, in libgomp's units (pause-loop iterations: ~45-60 ns
# each on this project's AMD EPYC host, so ~1.5 ms). libgomp's own default is 300,000, ~15 ms there: longer
# than a scheduler time slice. On the CPU path every layer is a few parallel regions with microseconds between
# them, so a short spin still catches the next region, while a thread that waits longer (between steps, or for
# a team-mate whose core went to another process) sleeps instead of burning the time slice that team-mate, the
# event loop or the client needs. With the default, decode on two shared cores ran 4-90x slower than on quiet
# ones (issue 13); benchmarks/contention.py measures it and benchmarks/RESULTS.md has the figures.
# Measured (benchmarks/RESULTS.md): 10,000 was as good under load but 3-6% slower at batch 1 on quiet cores in
# two of three runs; 30,000 matched the default on quiet cores (1.00x over 5 rounds) and stayed under 3x loaded.
OPENMP_SPIN_COUNT = 30_000


def _bound_openmp_spinning() -> str:
    """Set GOMP_SPINCOUNT for libgomp (torch's OpenMP runtime, shared by the C++ kernels), which reads it once,
    when torch is first imported. Returns how the spin is set: "exaserve", "user" (the user set GOMP_SPINCOUNT or
    OMP_WAIT_POLICY; theirs stands) or "late" (torch was imported first: libgomp's default stays)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return "user"
    if "torch" in sys.modules:
        return "late"
    os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    return "exaserve"


OPENMP_SPIN = _bound_openmp_spinning()
