"""A linear layer with block-scaled FP8 weights and bf16 activations (w8a16), and its plain-torch reference.

    y [M, N] = x [M, K] @ (W [N, K] float8_e4m3fn * scale [ceil(N / bn), ceil(K / bk)] per bn x bk block)^T

GLM-5.1-FP8 stores every projection this way (bn = bk = 128). Decode reads each weight once per step, so keeping it
FP8 halves the bytes a step reads against dequantising it to bf16 at load, and halves the GPU memory the non-expert
weights take (memory the expert cache gets). Each program owns BLOCK_M rows and BLOCK_N output columns and walks K
one scale block (bk) at a time: the FP8 tile is converted to bf16 (exact: every e4m3 value is a bf16 value), a
tensor-core dot with the activations gives the block's fp32 partial sum, and the block's scales (one per column's
bn-row group) multiply it into the accumulator. The activations are not quantised, so the result differs from the
dequantise-then-bf16-GEMM path only by rounding: that path rounds each dequantised weight to bf16 first.

`fp8_linear` runs the kernel on a GPU for steps of at most `MAX_KERNEL_ROWS` rows (decode, verify, small chunks) and
otherwise dequantises the weight into a bf16 scratch and calls the dense GEMM (prefill is compute-bound: the
scratch's bytes are small beside the GEMM's work).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moed.formats.fp8 import dequantize_block_fp8, linear_dequantized, scale_shape
from moed.kernels.act_quant import interpreting
from moed.kernels.tl_helpers import cast_rne, dot

MAX_KERNEL_ROWS = 64
SPLIT_WAVES = 4  # programs per SM a split aims for
MIN_SPLIT_BLOCKS = 4  # scale blocks (128 inputs each) per K range at least


@triton.jit(do_not_specialize=["M"])
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    stride_ys,  # SPLIT_K > 1: y is the fp32 workspace [SPLIT_K, M, N], one slice a K range
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # == bk: one scale column per K step
    SCALE_N: tl.constexpr,  # bn
    SPLIT_K: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    s_rows = s_ptr + (offs_n // SCALE_N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    for kb in range(pid_k * per_split, tl.minimum(k_blocks, (pid_k + 1) * per_split)):
        k = kb * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(s_rows + kb, mask=n_ok, other=0.0)
        # the interpreter's bf16 dot is wrong: fp32 operands there (FP8 -> fp32 is exact too)
        part = dot(x, tl.trans(w.to(tl.float32 if INTERP else tl.bfloat16)), INTERP)
        acc += part * s[None, :]
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y, cast_rne(acc, y_ptr.dtype.element_ty, INTERP), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(y, acc, mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        index if index is not None else torch.cuda.current_device()
    ).multi_processor_count


def split_k(programs: int, k_blocks: int, sms: int) -> int:
    """K ranges per output tile: enough programs for SPLIT_WAVES of them per SM (a decode step's narrow projections
    launch 36-128 programs of 16-64 columns on a 132-SM H100: too few weight bytes in flight to reach HBM's rate),
    each range at least MIN_SPLIT_BLOCKS scale blocks long. 1: no split."""
    want = -(-SPLIT_WAVES * sms // max(programs, 1))
    return max(1, min(want, k_blocks // MIN_SPLIT_BLOCKS))


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    problems = []
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        problems.append(f"x [M, K] and weight [N, K] needed, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != torch.float8_e4m3fn:
        problems.append(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() == 2:
        want = scale_shape(weight.shape[0], weight.shape[1], *block)
        if scale.dtype != torch.float32 or tuple(scale.shape) != want:
            problems.append(f"scale must be fp32 {list(want)} for block {block}, got {scale.dtype} {list(scale.shape)}")
    if x.device != weight.device or scale.device != weight.device:
        problems.append(f"x, weight and scale must share a device, got {x.device}, {weight.device}, {scale.device}")
    if problems:
        raise ValueError("fp8_linear: " + "; ".join(problems))


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Plain torch: the dequantised weight in fp32 times x in fp32, returned in x's dtype."""
    _check(x, weight, scale, block)
    return (x.float() @ dequantize_block_fp8(weight, scale, *block).t()).to(x.dtype)


def fp8_linear_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    splits: int | None = None,
) -> torch.Tensor:
    """The Triton kernel alone (x bf16 [M, K], unit stride along K; any M, though it is meant for small ones).
    `splits`: K ranges per output tile, summed in fp32 after (None: `split_k` for this GPU)."""
    _check(x, weight, scale, block)
    if x.dtype != torch.bfloat16 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"fp8_linear_kernel: x must be bf16 with unit stride along K, got {x.dtype} {x.stride()}")
    M, K = x.shape
    N = weight.shape[0]
    bn, bk = block
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    # One row block for every row the kernel is meant for (M <= MAX_KERNEL_ROWS): each row block reads the whole
    # weight, so 16-row blocks read it M / 16 times (4x at batch 64, where the H100 measured this kernel 1.4x slower
    # than the bf16 GEMM).
    block_m = min(max(16, triton.next_power_of_2(M)), MAX_KERNEL_ROWS)
    # Narrow outputs (the MLA down-projections: 576, 2048 columns) get narrow tiles, so more programs share the read.
    block_n = 16 if N <= 4096 else 64
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    if splits is None:
        splits = split_k(tiles, triton.cdiv(K, bk), _sm_count(x.device.index) if x.is_cuda else 132)
    if splits < 1:
        raise ValueError(f"fp8_linear_kernel: splits must be >= 1, got {splits}")
    out = y if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), splits)
    _w8a16_kernel[grid](
        x,
        weight,
        scale,
        out,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        scale.stride(0),
        out.stride(-2),
        out.stride(0) if splits > 1 else 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=bk,
        SCALE_N=bn,
        SPLIT_K=splits,
        INTERP=interpreting(),
        num_warps=4,
        num_stages=1 if interpreting() else 4,
    )
    if splits > 1:
        y.copy_(out.sum(dim=0))  # a fixed order: the same bits every run
    return y


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """y = x @ dequantised(weight)^T for x [..., K]: the w8a16 kernel for bf16 steps of <= MAX_KERNEL_ROWS rows on a
    GPU; otherwise the weight dequantised into x's dtype and a dense GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.is_cuda and x2.dtype == torch.bfloat16 and x2.shape[0] <= MAX_KERNEL_ROWS:
        y = fp8_linear_kernel(x2.contiguous(), weight, scale, block)
    else:
        _check(x2, weight, scale, block)
        y = linear_dequantized(x2, weight, scale, block)
    return y.reshape(*lead, weight.shape[0])
