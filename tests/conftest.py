"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter. Triton reads TRITON_INTERPRET
when it is first imported, and importing Lightning (tests/test_cli.py) can import it early, so the
variable is set here, before any test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
