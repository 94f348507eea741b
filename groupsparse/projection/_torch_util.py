"""Small helpers of the torch engine: NumPy's sqrt for CPU tensors, the output's allocation, exact ldexp."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


class _HostXP:
    """torch for the per-vector arithmetic of CPU tensors (``h_and_slope``), but sqrt from NumPy. Two reasons:
    torch's CPU sqrt splits work at 2048 entries, so a sqrt over the vectors woke the thread pool on every
    evaluation (5 ms each on the shared 2-core machine with two torch threads); and it is not the correctly rounded
    IEEE sqrt in float64 (torch 2.13 CPU: 0.9 % of uniform inputs one ulp off NumPy's / numba's ``math.sqrt``).
    The host and the device loop both take it on the CPU (they must agree bit for bit); the NumPy view of a CPU
    tensor is no device sync, so it runs outside torch's function dispatch (``tests``' sync guard)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def sqrt(x):
        with torch._C.DisableTorchFunction():
            return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))


HOST_XP = _HostXP()


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` for the output; on the CPU NumPy's memory (as the numba engine returns), because NumPy
    asks the kernel for transparent huge pages on large arrays and torch's allocator does not: first-touch page
    faults made writing a fresh 40 MB output 16 ms, against 6 ms in NumPy's memory."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.empty_like(x)
    return torch.from_numpy(np.empty(tuple(x.shape), dtype=np.float32 if x.dtype == torch.float32 else np.float64))


def ldexp(values, shift):
    """values * 2^shift, exact even where 2^shift alone would overflow (two halves)."""
    half = torch.div(shift, 2, rounding_mode="floor")
    two = torch.full((), 2.0, dtype=F64, device=values.device)  # a fill, not a host-to-device copy
    return values * two.pow(half.double()) * two.pow((shift - half).double())
