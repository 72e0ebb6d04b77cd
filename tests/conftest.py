"""Triton picks its CPU interpreter when ``triton`` is first imported: set it up front
so the Triton kernels are tested on machines without a GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
