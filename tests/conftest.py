"""Shared test set-up.

Without a GPU the Triton kernels run in the interpreter. Triton decides interpreter vs compiler when a kernel
is defined, i.e. when a kernels/triton_*.py module is imported, so the variable is set here, before any test
module is collected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
