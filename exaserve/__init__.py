"""exaserve: a high-throughput OpenAI-compatible inference server for EXAONE-MoE (K-EXAONE) checkpoints.

The repository's top-level folders install as subpackages of this one (pyproject.toml, `package-dir`):
`exaserve.engine` (engine/), `exaserve.kernels` (kernels/), `exaserve.server` (server/). `exaserve.cli` is the
`exaserve` command; `exaserve.testing` makes checkpoints for tests and benchmarks.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("exaserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.1.0+src"
