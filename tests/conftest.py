"""Shared test set-up.

Without a GPU the Triton kernels run in the interpreter. Triton decides interpreter vs compiler when a kernel
is defined, i.e. when a kernels/triton_*.py module is imported, so the variable is set here, before any test
module is collected. exaserve is imported before torch so that its bound on OpenMP spin-waiting
(exaserve/__init__.py) reaches libgomp in this process too: the suite shares two cores with its own servers.
"""
import os

import exaserve  # noqa: F401  (before torch: see above)

# isort: split
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
