"""Per-token-group FP8 e4m3 activation quantisation (Triton) and its plain-torch reference.

Buffers (`x: [M, K]` bf16/fp16/fp32, row-major with unit stride along K, group size G, 128 for GLM-5.1-FP8):
- `q: float8_e4m3fn [M, K]`, contiguous;
- `scale: fp32 [M, ceil(K / G)]`, contiguous; `x[m, k] ~= q[m, k] * scale[m, k // G]`.
`scale = max(amax(|x| over the group), 1e-10) / 448` and `q = clamp(x / scale, -448, 448)` rounded to nearest
even, the w8a8 block format's activation side (weights use `moed.formats.fp8`).

`quantize_groups_fp8` is the in-register form the fused-MoE GEMMs call on a tile when they quantise in the
kernel. The Triton interpreter's fp32 -> fp8 cast drops the carry when rounding crosses a power of two
(126.4 -> 64); under the interpreter (`exact_cast=True`) values are first rounded onto the e4m3 grid in fp32
so the cast is exact. On a GPU the hardware cast rounds correctly and that step is skipped.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = 448.0
AMAX_MIN = 1e-10


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def round_to_e4m3_grid(v):
    """Round fp32 values inside [-448, 448] to the nearest e4m3 value (ties to even), staying in fp32."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of the 23 mantissa bits, round to nearest even on the 20 dropped ones.
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # -1048576 == 0xFFF00000
    # Subnormal range (|v| < 2^-6): multiples of 2^-9; adding 1.5 * 2^14 makes fp32 rounding do it.
    sub = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def quantize_groups_fp8(x, EXACT_CAST: tl.constexpr):
    """x: fp32 [R, G] tile, one group per row -> (q float8e4nv [R, G], scale fp32 [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, 1e-10) / 448.0
    y = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    if EXACT_CAST:
        y = round_to_e4m3_grid(y)
    return y.to(tl.float8e4nv), scale


@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_g * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    q, scale = quantize_groups_fp8(x.to(tl.float32), EXACT_CAST)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + pid_g, scale, mask=rows < M)


def check_group_quant_input(x: torch.Tensor, group_size: int, who: str = "per_token_group_quant_fp8") -> None:
    """The inputs the activation quant takes (shared with its custom op, so every path rejects the same)."""
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{who}: x dtype {x.dtype} unsupported; use bf16, fp16 or fp32")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"{who}: group_size {group_size} must be a power of two >= 16")


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float -> (q float8_e4m3fn [M, K], scale fp32 [M, ceil(K / group_size)]); no host sync."""
    check_group_quant_input(x, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    groups = triton.cdiv(K, group_size)
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, scale
    block_m = 16
    grid = (triton.cdiv(M, block_m), groups)
    _act_quant_kernel[grid](
        x,
        q,
        scale,
        M,
        K,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        GROUP=group_size,
        BLOCK_M=block_m,
        EXACT_CAST=interpreting(),
        num_warps=4,
    )
    return q, scale


def _padded_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] -> fp32 [M, ceil(K / group_size), group_size], the last group zero-padded (the references' view)."""
    M, K = x.shape
    groups = -(-K // group_size)
    padded = x.float().new_zeros(M, groups * group_size)
    padded[:, :K] = x.float()
    return padded.view(M, groups, group_size)


def per_token_group_quant_fp8_reference(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `per_token_group_quant_fp8` (same formula, same layout)."""
    M, K = x.shape
    g = _padded_groups(x, group_size)
    groups = g.shape[1]
    scale = g.abs().amax(dim=-1).clamp(min=AMAX_MIN) / FP8_E4M3_MAX
    q = (g / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).view(M, groups * group_size)[:, :K]
    q = q.to(torch.float8_e4m3fn)  # (the explicit width keeps M = 0 viewable)
    return q.contiguous(), scale.contiguous()


def dequantize_groups_fp8(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """(q [M, K], scale [M, ceil(K / G)]) -> fp32 [M, K]: the value the GEMMs multiply with."""
    K = q.shape[1]
    return q.float() * scale.repeat_interleave(group_size, dim=1)[:, :K]


# Per-token-group int8 activations for the int4 experts' int8 tensor-core tiles (fused_moe_int4's config key A8).
# Layout `q: int8 [M, 2, K / 2]`: the even k of a row first, then the odd k, so the GEMM loads each half of its
# K step as one contiguous tile (the packed weights hold even k in their low nibbles, odd k in their high ones);
# `scale: fp32 [M, G]` (amax / 127, x ~= q * scale) and `qsum: int32 [M, G]`, each group's sum of q, which takes the
# weights' zero point off once a group: sum_k q_k (w_k - z) = sum_k q_k w_k - z * qsum.
INT8_MAX = 127.0


@triton.jit(do_not_specialize=["M"])
def _act_quant_int8_kernel(
    x_ptr, q_ptr, s_ptr, sum_ptr, M, KH, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr, BLOCK_M: tl.constexpr
):
    HALF: tl.constexpr = GROUP // 2
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    half = pid_g * HALF + tl.arange(0, HALF)  # this group's pairs (k = 2 * half and 2 * half + 1)
    mask = (rows[:, None] < M) & (half[None, :] < KH)
    x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm + 2 * half[None, :]
    even = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x_row + 1, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
    scale = tl.maximum(amax, 1e-10) / 127.0
    # round half away from zero, as torch.round does not: the reference below does the same (floor(|v| + 0.5))
    qe = tl.floor(tl.abs(even) / scale[:, None] + 0.5)
    qo = tl.floor(tl.abs(odd) / scale[:, None] + 0.5)
    qe = tl.where(even < 0, -qe, qe).to(tl.int32)
    qo = tl.where(odd < 0, -qo, qo).to(tl.int32)
    q_row = q_ptr + rows[:, None].to(tl.int64) * stride_qm + half[None, :]
    tl.store(q_row, qe.to(tl.int8), mask=mask)
    tl.store(q_row + KH, qo.to(tl.int8), mask=mask)
    s_off = rows.to(tl.int64) * stride_sm + pid_g
    tl.store(s_ptr + s_off, scale, mask=rows < M)
    tl.store(sum_ptr + s_off, tl.sum(qe + qo, axis=1), mask=rows < M)


def per_token_group_quant_int8(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, K] float, K even -> (q int8 [M, 2, K / 2], scale fp32 [M, G], qsum int32 [M, G]), G = ceil(K /
    group_size), in the layout above; no host sync."""
    who = "per_token_group_quant_int8"
    check_group_quant_input(x, group_size, who)
    if x.shape[1] % 2:
        raise ValueError(f"{who}: K = {x.shape[1]} must be even (k pairs share a packed int4 byte)")
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    groups = triton.cdiv(K, group_size)
    q = torch.empty((M, 2, K // 2), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    qsum = torch.empty((M, groups), dtype=torch.int32, device=x.device)
    if M == 0 or K == 0:
        return q, scale, qsum
    block_m = 16
    grid = (triton.cdiv(M, block_m), groups)
    _act_quant_int8_kernel[grid](
        x, q, scale, qsum, M, K // 2, x.stride(0), q.stride(0), scale.stride(0), GROUP=group_size, BLOCK_M=block_m,
        num_warps=4,
    )  # fmt: skip
    return q, scale, qsum


def per_token_group_quant_int8_reference(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `per_token_group_quant_int8` (same formula, same layout)."""
    M, K = x.shape
    g = _padded_groups(x, group_size)
    groups = g.shape[1]
    scale = g.abs().amax(dim=-1).clamp(min=AMAX_MIN) / INT8_MAX
    v = g / scale[..., None]
    q = (torch.floor(v.abs() + 0.5) * v.sign()).to(torch.int32)
    qsum = q.sum(dim=-1, dtype=torch.int32)
    q = q.view(M, groups * group_size)[:, :K].to(torch.int8)
    return torch.stack((q[:, 0::2], q[:, 1::2]), dim=1).contiguous(), scale.contiguous(), qsum.contiguous()


def dequantize_groups_int8(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """(q [M, 2, K / 2], scale [M, G]) -> fp32 [M, K], k interleaved back: the value the int8 GEMMs multiply with."""
    M, _, KH = q.shape
    x = torch.stack((q[:, 0], q[:, 1]), dim=2).reshape(M, 2 * KH).float()
    return x * scale.repeat_interleave(group_size, dim=1)[:, : 2 * KH]
