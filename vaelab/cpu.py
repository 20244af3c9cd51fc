"""Reproducible vector maths on the CPU.

PyTorch's CPU build hands float32 and float64 log, exp, cos, tanh and their kin, on contiguous
tensors of more than 2,048 values, to Intel MKL's vector maths library (VML), one share per
thread. The first such call of a process can compute one thread's share by another code path, a
last-bit difference (seen with PyTorch 2.13 and MKL 2024.2, in a few fresh processes in a hundred;
the calls after it agree). One call on a single value, which runs on one thread, comes first
instead: every call after it is reproducible, as exact resume and paired comparisons need.
"""

from __future__ import annotations

import torch


def settle_vector_maths() -> None:
    """Make the process's first VML calls single-threaded ones (idempotent, microseconds)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for f in (torch.log, torch.exp, torch.cos, torch.tanh):
            f(x)
