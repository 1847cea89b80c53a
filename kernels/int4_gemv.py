"""The CUDA-core tiles of `moed.kernels.fused_moe_int4` (config key GEMV_ROWS) and the zero-point read both tile kinds
share.

At decode sizes a row block holds 1-4 routes of its 16 rows, and a tensor-core K step still unpacks a [BK/2, BN] byte
tile into two bf16 tiles and moves them through shared memory into the MMA layout. These kernels compute ROWS routes
a pass instead: each packed tile is unpacked once into fp32, the group's scale and zero point fold into one FMA a
weight, the products accumulate elementwise ([ROWS, BK/2, BN] fp32) and are summed over K once, after the loop. A
block with more routes than ROWS takes several passes, so the key is a tile choice, not a contract on M. Same
arguments, alignment and outputs as the tensor-core kernels; their torch reference is
`moed.kernels.fused_moe_reference.fused_moe_reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moed.kernels.fused_moe import _to_bf16


@triton.jit
def zero_points(zp_ptrs, offs_n, n_ok, HAS_ZP: tl.constexpr):
    """Stored zero point (z + 8) of each column for one group: nibble n % 8 of word n // 8; 8 when symmetric."""
    if HAS_ZP:
        word = tl.load(zp_ptrs, mask=n_ok, other=0)
        return (word >> ((offs_n % 8) * 4)) & 0xF
    else:
        return tl.full(offs_n.shape, 8, tl.int32)


@triton.jit
def _int4_gemv_terms(a_even, a_odd, packed, z, s):
    """a . ((w - z) * s) for a K step as elementwise fp32 products [ROWS, BK/2, BN], summed over K after the loop:
    no tensor-core layout for 1-4 rows of 16, and the zero point and scale fold into one FMA per weight."""
    zs = (z.to(tl.float32) * s)[None, :]
    lo = (packed & 0xF).to(tl.float32) * s[None, :] - zs
    hi = (packed >> 4).to(tl.float32) * s[None, :] - zs
    return a_even[:, :, None] * lo[None, :, :] + a_odd[:, :, None] * hi[None, :, :]


@triton.jit
def _real_rows(sorted_ptr, pid_m, T, BLOCK_M: tl.constexpr):
    """Rows of row block pid_m that hold routes (alignment puts them first, padding after)."""
    return tl.sum((tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) < T).to(tl.int32))


@triton.jit(do_not_specialize=["T", "top_k"])
def gate_up_int4_gemv_kernel(
    a_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    h_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    N,
    KH,
    T,
    top_k,
    group,
    stride_am,
    stride_ws,
    stride_wn,
    stride_ss,
    stride_sn,
    stride_sk,
    stride_zs,
    stride_zn,
    stride_zk,
    stride_hm,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """h as `fused_moe_int4._gate_up_int4_kernel` computes it, ROWS of a block's routes a pass (one pass at M <= ROWS),
    each weight tile unpacked once a pass into fp32 and multiplied on the CUDA cores."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_pid_n = tl.cdiv(N, HALF_N)
    pid = tl.program_id(0)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    offs_n = pid_n * HALF_N + tl.arange(0, HALF_N)
    n_ok = offs_n < N
    offs_up = offs_n + N
    offs_kh = tl.arange(0, HALF_K)
    wg0 = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    sg_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    su_ptrs = s_ptr + slot * stride_ss + offs_up * stride_sn
    zg_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    zu_ptrs = z_ptr + slot * stride_zs + (offs_up // 8) * stride_zn
    for r0 in range(0, _real_rows(sorted_ptr, pid_m, T, BLOCK_M), ROWS):
        flat = tl.load(sorted_ptr + pid_m * BLOCK_M + r0 + tl.arange(0, ROWS))
        row_ok = flat < T
        tok = (flat // top_k).to(tl.int64)
        a_ptrs = a_ptr + tok[:, None] * stride_am + 2 * offs_kh[None, :]
        wg_ptrs = wg0
        acc_g = tl.zeros((ROWS, HALF_K, HALF_N), dtype=tl.float32)
        acc_u = tl.zeros((ROWS, HALF_K, HALF_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(KH, HALF_K)):
            k_ok = offs_kh < KH - kb * HALF_K
            a_even = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a_odd = tl.load(a_ptrs + 1, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            wu = tl.load(wg_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0)
            g = (kb * BLOCK_K) // group
            zg = zero_points(zg_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
            zu = zero_points(zu_ptrs + g * stride_zk, offs_up, n_ok, HAS_ZP)
            sg = tl.load(sg_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
            su = tl.load(su_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
            acc_g += _int4_gemv_terms(a_even, a_odd, wg, zg, sg)
            acc_u += _int4_gemv_terms(a_even, a_odd, wu, zu, su)
            a_ptrs += BLOCK_K
            wg_ptrs += HALF_K
        gate = tl.sum(acc_g, axis=1)
        h = gate * tl.sigmoid(gate) * tl.sum(acc_u, axis=1)
        h_ptrs = h_ptr + flat[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, _to_bf16(h, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T"])
def down_int4_gemv_kernel(
    h_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    topk_w_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    H,
    NH,
    T,
    group,
    stride_hm,
    stride_ws,
    stride_wn,
    stride_ss,
    stride_sn,
    stride_sk,
    stride_zs,
    stride_zn,
    stride_zk,
    stride_om,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """partial as `fused_moe_int4._down_int4_kernel` computes it, the GEMM as in `gate_up_int4_gemv_kernel`."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_pid_n = tl.cdiv(H, BLOCK_N)
    pid = tl.program_id(0)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_kh = tl.arange(0, HALF_K)
    w0 = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    s_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    z_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    for r0 in range(0, _real_rows(sorted_ptr, pid_m, T, BLOCK_M), ROWS):
        flat = tl.load(sorted_ptr + pid_m * BLOCK_M + r0 + tl.arange(0, ROWS))
        row_ok = flat < T
        rows = flat.to(tl.int64)
        a_ptrs = h_ptr + rows[:, None] * stride_hm + 2 * offs_kh[None, :]
        w_ptrs = w0
        acc = tl.zeros((ROWS, HALF_K, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(NH, HALF_K)):
            k_ok = offs_kh < NH - kb * HALF_K
            a_even = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a_odd = tl.load(a_ptrs + 1, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            g = (kb * BLOCK_K) // group
            z = zero_points(z_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
            s = tl.load(s_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
            acc += _int4_gemv_terms(a_even, a_odd, w, z, s)
            a_ptrs += BLOCK_K
            w_ptrs += HALF_K
        y = tl.sum(acc, axis=1) * tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, _to_bf16(y, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])
