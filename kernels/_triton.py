"""Whether Triton can run here, and small launch helpers shared by the kernels.

Triton is optional: without it (or without an active driver) every operation falls back to its
PyTorch twin. TRITON_INTERPRET=1 runs the same kernels on CPU tensors, which is how they are
tested on machines without a GPU.
"""
from __future__ import annotations

import os

import torch

from dspark_plugin import envs

try:  # Triton is an optional dependency.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_ieee(dtype: torch.dtype) -> bool:
    # fp32 inputs would otherwise be rounded to tf32 inside tl.dot and drift from the twin.
    return dtype == torch.float32


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def alloc(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for kernel outputs; DSPARK_KERNELS_POISON=1 fills them with NaN / -1 first so
    tests prove every element is written by the kernel, not left over from the allocator."""
    out = torch.empty(*shape, device=device, dtype=dtype)
    if envs.read(envs.KERNELS_POISON):
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out
