"""Suite-wide set-up: Triton runs under its CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test
module imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
