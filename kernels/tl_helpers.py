"""Triton device functions shared by the attention kernels (called from inside their @triton.jit bodies)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, F32: tl.constexpr):
    # F32: fp32 operands, IEEE products (exact-mode pools, and the CPU interpreter, whose bf16 dot is wrong).
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def cast_rne(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    # The interpreter's fp32 -> bf16 cast truncates; round to nearest even on the bits there, as the GPU does.
    if INTERP and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.int32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(dtype)
