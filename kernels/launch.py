"""Launch-shape helpers shared by the kernel wrappers: vectorisation width and SM count."""

from __future__ import annotations

import functools

import torch


def vec(t: torch.Tensor, *strides: int) -> int:
    """Elements per 16 bytes of t's dtype, halved until it divides every row stride (a vectorisation hint)."""
    v = 16 // t.element_size()
    while v > 1 and any(s % v for s in strides):
        v //= 2
    return v


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter only needs a small grid)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
