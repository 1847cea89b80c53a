"""The CUDA-core tiles of `moed.kernels.fused_moe_int4` (config keys GEMV_ROWS, SPLIT_K) and the zero-point read both
tile kinds share.

At decode sizes a row block holds 1-4 routes of its 16 rows, and a tensor-core K step still unpacks a [BK/2, BN] byte
tile into two bf16 tiles and moves them through shared memory into the MMA layout. These kernels compute ROWS routes
a pass instead: each packed tile is unpacked once into fp32, scaled, and the products accumulate elementwise
([ROWS, BK/2, BN] fp32), summed over K once, after the loop. A block with more routes than ROWS takes several passes,
so the key is a tile choice, not a contract on M. With SPLIT_K > 1 (config key) several programs share an output
tile's K steps and a second kernel adds their fp32 sums in a fixed order: a decode step's few hundred tiles alone keep
too few loads in flight. Same arguments, alignment and outputs as the tensor-core kernels; their torch reference is
`moed.kernels.fused_moe_reference.fused_moe_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moed.formats.int4 import Int4Weight
from moed.kernels.act_quant import interpreting
from moed.kernels.fused_moe import _route_block, _to_bf16
from moed.kernels.moe_align import MoEAlignment


class TokenSum(NamedTuple):
    """Where a sum-of-routes caller wants down's result: out [M, H] bf16, summed over each token's routes with a slot
    (the down launches may write it straight from their split-K workspace)."""

    out: torch.Tensor
    topk_ids: torch.Tensor
    expert_to_slot: torch.Tensor


def zero_strides(w: Int4Weight) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(zero-point tensor, its three strides) as the kernels take them; symmetric weights pass the scales as a
    never-read stand-in pointer (HAS_ZP is off)."""
    if w.zeros is None:
        return w.scales, (0, 0, 0)
    return w.zeros, (w.zeros.stride(0), w.zeros.stride(1), w.zeros.stride(2))


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
    no tensor-core layout for 1-4 rows of 16. Each nibble w becomes the fp32 2^23 + w by OR-ing it into 2^23's
    mantissa (its ulp is 1), so no weight takes an int-to-float conversion (a quarter-rate instruction on Hopper);
    subtracting 2^23 + z is exact."""
    p = packed.to(tl.int32)
    lo = ((p & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
    hi = ((p >> 4) | 0x4B000000).to(tl.float32, bitcast=True)
    zc = (z.to(tl.float32) + 8388608.0)[None, :]
    lo = (lo - zc) * s[None, :]
    hi = (hi - zc) * s[None, :]
    return a_even[:, :, None] * lo[None, :, :] + a_odd[:, :, None] * hi[None, :, :]


@triton.jit
def _int4_word_sums(a_ptrs, stride_j, a_mask, wg, wu, TWO: tl.constexpr):
    """GEMV_WORDS' unpack for a K step of 32-bit words ([BK/8, BN] each; nibble j of word i is k = 8i + j), from
    activations laid out [8, K/8] fp32 a route (`word_major`: a_j of consecutive words side by side, already fp32).
    Each nibble w is shifted into bits 19-22 of 1.0 (a shift and an and-or), which makes the fp32 1 + w/16 exactly,
    and meets its activation in one FMA -> (u_g, u_u, A) [ROWS, BK/8, BN] and [ROWS, BK/8]: u = sum_j a_j (1 +
    w_j/16), A = sum_j a_j. TWO: a second weight tile (gate-up's up half) shares the activation loads. The compiler
    (Triton 3.9, sm_90) still loads a thread's activations one by one: its layout gives a thread strided words."""
    ug = tl.zeros((a_mask.shape[0], wg.shape[0], wg.shape[1]), dtype=tl.float32)
    uu = tl.zeros((a_mask.shape[0], wu.shape[0], wu.shape[1]), dtype=tl.float32)
    A = tl.zeros((a_mask.shape[0], wg.shape[0]), dtype=tl.float32)
    for j in tl.static_range(8):
        a = tl.load(a_ptrs + j * stride_j, mask=a_mask, other=0.0)
        A += a
        if 4 * j <= 19:
            bg = (wg << (19 - 4 * j)) & 0x00780000
        else:
            bg = (wg >> (4 * j - 19)) & 0x00780000
        ug += a[:, :, None] * (bg | 0x3F800000).to(tl.float32, bitcast=True)[None, :, :]
        if TWO:
            if 4 * j <= 19:
                bu = (wu << (19 - 4 * j)) & 0x00780000
            else:
                bu = (wu >> (4 * j - 19)) & 0x00780000
            uu += a[:, :, None] * (bu | 0x3F800000).to(tl.float32, bitcast=True)[None, :, :]
    return ug, uu, A


@triton.jit
def _int4_word_terms(u, A, z, s):
    """a . ((w - z) * s) from `_int4_word_sums`: sum_j a_j (w_j - z) = 16 u - (16 + z) A, so the zero point, the 1
    and the scale come off once a word, not once a weight (u and A are sums of like magnitude: the difference keeps
    ~20 of fp32's 24 bits)."""
    zc = 16.0 + z.to(tl.float32)
    return (16.0 * u - zc[None, None, :] * A[:, :, None]) * s[None, None, :]


@triton.jit
def _real_rows(sorted_ptr, pid_m, T, BLOCK_M: tl.constexpr):
    """Rows of row block pid_m that hold routes (alignment puts them first, padding after)."""
    return tl.sum((tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) < T).to(tl.int32))


@triton.jit(do_not_specialize=["T", "top_k", "k_steps"])
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
    ws_ptr,
    k_steps,
    stride_wsk,
    stride_wsm,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_ZP: tl.constexpr,
    INTERPRET: tl.constexpr,
    WORDS: tl.constexpr = False,
):
    """h as `fused_moe_int4._gate_up_int4_kernel` computes it, ROWS of a block's routes a pass (one pass at M <= ROWS),
    each weight tile unpacked once a pass into fp32 and multiplied on the CUDA cores. Program (i, s) runs K steps
    [s * k_steps, (s + 1) * k_steps); with SPLIT it stores its gate and up sums to ws[s] for `split_k_sum_kernel`."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_pid_n = tl.cdiv(N, HALF_N)
    pid = tl.program_id(0)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    slot, _rows, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    split = tl.program_id(1)
    kb0 = split * k_steps
    kb1 = tl.minimum(kb0 + k_steps, tl.cdiv(KH, HALF_K))
    offs_n = pid_n * HALF_N + tl.arange(0, HALF_N)
    n_ok = offs_n < N
    offs_up = offs_n + N
    offs_kh = tl.arange(0, HALF_K)
    offs_kw = tl.arange(0, BLOCK_K // 8)
    wg0 = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    # GEMV_WORDS: 32-bit words; no 16-byte vector hint: its layout costs a shared-memory round trip a K step (sm_90
    # SASS: 539 instructions a step against 476 without)
    ww0 = (w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + 4 * offs_kw[:, None]).to(
        tl.pointer_type(tl.int32)
    )
    sg_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    su_ptrs = s_ptr + slot * stride_ss + offs_up * stride_sn
    zg_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    zu_ptrs = z_ptr + slot * stride_zs + (offs_up // 8) * stride_zn
    for r0 in range(0, _real_rows(sorted_ptr, pid_m, T, BLOCK_M), ROWS):
        flat = tl.load(sorted_ptr + pid_m * BLOCK_M + r0 + tl.arange(0, ROWS))
        row_ok = flat < T
        tok = (flat // top_k).to(tl.int64)
        if WORDS:
            a_ptrs = a_ptr + tok[:, None] * stride_am + offs_kw[None, :] + kb0 * (BLOCK_K // 8)
            ww_ptrs = ww0 + kb0 * (BLOCK_K // 8)
            acc_g = tl.zeros((ROWS, BLOCK_K // 8, HALF_N), dtype=tl.float32)
            acc_u = tl.zeros((ROWS, BLOCK_K // 8, HALF_N), dtype=tl.float32)
        else:
            a_ptrs = a_ptr + tok[:, None] * stride_am + 2 * offs_kh[None, :] + kb0 * BLOCK_K
            wg_ptrs = wg0 + kb0 * HALF_K
            acc_g = tl.zeros((ROWS, HALF_K, HALF_N), dtype=tl.float32)
            acc_u = tl.zeros((ROWS, HALF_K, HALF_N), dtype=tl.float32)
        for kb in range(kb0, kb1):
            g = (kb * BLOCK_K) // group
            zg = zero_points(zg_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
            zu = zero_points(zu_ptrs + g * stride_zk, offs_up, n_ok, HAS_ZP)
            sg = tl.load(sg_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
            su = tl.load(su_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
            if WORDS:
                kw_ok = offs_kw < KH // 4 - kb * (BLOCK_K // 8)
                a_mask = row_ok[:, None] & kw_ok[None, :]
                wg = tl.load(ww_ptrs, mask=kw_ok[:, None] & n_ok[None, :], other=0)
                wu = tl.load(ww_ptrs + N * (stride_wn // 4), mask=kw_ok[:, None] & n_ok[None, :], other=0)
                ug, uu, A = _int4_word_sums(a_ptrs, stride_am // 8, a_mask, wg, wu, True)
                acc_g += _int4_word_terms(ug, A, zg, sg)
                acc_u += _int4_word_terms(uu, A, zu, su)
                ww_ptrs += BLOCK_K // 8
                a_ptrs += BLOCK_K // 8
            else:
                k_ok = offs_kh < KH - kb * HALF_K
                a_even = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                a_odd = tl.load(a_ptrs + 1, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
                wu = tl.load(wg_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0)
                acc_g += _int4_gemv_terms(a_even, a_odd, wg, zg, sg)
                acc_u += _int4_gemv_terms(a_even, a_odd, wu, zu, su)
                wg_ptrs += HALF_K
                a_ptrs += BLOCK_K
        gate = tl.sum(acc_g, axis=1)
        up = tl.sum(acc_u, axis=1)
        if SPLIT:
            ws = ws_ptr + split * stride_wsk + flat[:, None].to(tl.int64) * stride_wsm + offs_n[None, :]
            tl.store(ws, gate, mask=row_ok[:, None] & n_ok[None, :])
            tl.store(ws + N, up, mask=row_ok[:, None] & n_ok[None, :])
        else:
            h = gate * tl.sigmoid(gate) * up
            h_ptrs = h_ptr + flat[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
            tl.store(h_ptrs, _to_bf16(h, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T", "k_steps"])
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
    ws_ptr,
    k_steps,
    stride_wsk,
    stride_wsm,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_ZP: tl.constexpr,
    INTERPRET: tl.constexpr,
    WORDS: tl.constexpr = False,
):
    """partial as `fused_moe_int4._down_int4_kernel` computes it, the GEMM and its K split as in
    `gate_up_int4_gemv_kernel` (with SPLIT, unweighted sums to ws[s])."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_pid_n = tl.cdiv(H, BLOCK_N)
    pid = tl.program_id(0)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    slot, _rows, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    split = tl.program_id(1)
    kb0 = split * k_steps
    kb1 = tl.minimum(kb0 + k_steps, tl.cdiv(NH, HALF_K))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_kh = tl.arange(0, HALF_K)
    offs_kw = tl.arange(0, BLOCK_K // 8)
    w0 = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    ww0 = (w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + 4 * offs_kw[:, None]).to(
        tl.pointer_type(tl.int32)
    )
    s_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    z_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    for r0 in range(0, _real_rows(sorted_ptr, pid_m, T, BLOCK_M), ROWS):
        flat = tl.load(sorted_ptr + pid_m * BLOCK_M + r0 + tl.arange(0, ROWS))
        row_ok = flat < T
        rows = flat.to(tl.int64)
        if WORDS:
            a_ptrs = h_ptr + rows[:, None] * stride_hm + offs_kw[None, :] + kb0 * (BLOCK_K // 8)
            ww_ptrs = ww0 + kb0 * (BLOCK_K // 8)
            acc = tl.zeros((ROWS, BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        else:
            a_ptrs = h_ptr + rows[:, None] * stride_hm + 2 * offs_kh[None, :] + kb0 * BLOCK_K
            w_ptrs = w0 + kb0 * HALF_K
            acc = tl.zeros((ROWS, HALF_K, BLOCK_N), dtype=tl.float32)
        for kb in range(kb0, kb1):
            g = (kb * BLOCK_K) // group
            z = zero_points(z_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
            s = tl.load(s_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
            if WORDS:
                kw_ok = offs_kw < NH // 4 - kb * (BLOCK_K // 8)
                w = tl.load(ww_ptrs, mask=kw_ok[:, None] & n_ok[None, :], other=0)
                a_mask = row_ok[:, None] & kw_ok[None, :]
                u, _, A = _int4_word_sums(a_ptrs, stride_hm // 8, a_mask, w, w, False)
                acc += _int4_word_terms(u, A, z, s)
                ww_ptrs += BLOCK_K // 8
                a_ptrs += BLOCK_K // 8
            else:
                k_ok = offs_kh < NH - kb * HALF_K
                a_even = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                a_odd = tl.load(a_ptrs + 1, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
                acc += _int4_gemv_terms(a_even, a_odd, w, z, s)
                w_ptrs += HALF_K
                a_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if SPLIT:
            ws = ws_ptr + split * stride_wsk + rows[:, None] * stride_wsm + offs_n[None, :]
            tl.store(ws, y, mask=row_ok[:, None] & n_ok[None, :])
        else:
            y *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
            out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
            tl.store(out_ptrs, _to_bf16(y, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T", "splits"])
def split_k_sum_kernel(
    ws_ptr,
    out_ptr,
    topk_w_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    N,
    T,
    splits,
    stride_wsk,
    stride_wsm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """The K split's second pass: out = silu(gate) * up of the summed ws (GATED; ws rows hold gate | up, N each) or
    route weight * sum (down). The same blocks as the GEMM, so it writes exactly the rows the GEMM would have; the
    splits are summed in a fixed order, so results do not depend on scheduling."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    _slot, flat, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    row_ok = flat < T
    rows = flat.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (offs_n < N)[None, :]
    ws = ws_ptr + rows[:, None] * stride_wsm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, splits):
        acc += tl.load(ws, mask=mask, other=0.0)
        if GATED:
            acc_up += tl.load(ws + N, mask=mask, other=0.0)
        ws += stride_wsk
    if GATED:
        y = acc * tl.sigmoid(acc) * acc_up
    else:
        y = acc * tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], _to_bf16(y, INTERPRET), mask=mask)


# The second pass's tile: columns of fp32 sums per program (it reads only [splits, routes, N])
_SUM_N = 128


@triton.jit(do_not_specialize=["top_k", "splits"])
def split_k_topk_sum_kernel(
    ws_ptr,
    route_w_ptr,
    ids_ptr,
    e2s_ptr,
    out_ptr,
    H,
    top_k,
    num_ids,
    splits,
    stride_wsk,
    stride_wsm,
    stride_om,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Down's split sums and the top-k sum in one pass, for a caller that wants token sums (`fused_moe_int4`):
    out[t] = sum over routes j with a slot of route_w[t, j] * sum over splits of ws[., t * top_k + j], in fp32, the
    splits and routes in a fixed order. A route without a slot was never computed: its ws rows are not read."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, top_k):
        r = t * top_k + j
        e = tl.load(ids_ptr + r)
        slot = tl.load(e2s_ptr + e, mask=(e >= 0) & (e < num_ids), other=-1)
        ok = col_ok & (tl.zeros_like(cols) + slot >= 0)
        ws = ws_ptr + r * stride_wsm + cols
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(0, splits):
            y += tl.load(ws, mask=ok, other=0.0)
            ws += stride_wsk
        acc += y * tl.load(route_w_ptr + r)
    tl.store(out_ptr + t * stride_om + cols, _to_bf16(acc, INTERPRET), mask=col_ok)


def split_k_topk_sum(
    ws: torch.Tensor,
    out: torch.Tensor,
    route_w: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_to_slot: torch.Tensor,
    splits: int,
) -> None:
    """Launch `split_k_topk_sum_kernel`: ws fp32 [splits, M * k, H] -> out bf16 [M, H] (route_w fp32 [M * k])."""
    M, top_k = topk_ids.shape
    H = out.shape[1]
    block = 1024
    split_k_topk_sum_kernel[(M, triton.cdiv(H, block))](
        ws, route_w, topk_ids, expert_to_slot, out, H, top_k, expert_to_slot.numel(), splits, ws.stride(0),
        ws.stride(1), out.stride(0), BLOCK=block, INTERPRET=interpreting(), num_warps=4,
    )  # fmt: skip


def split_k_topk_sum_reference(
    ws: torch.Tensor,
    out: torch.Tensor,
    route_w: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_to_slot: torch.Tensor,
    splits: int,
) -> None:
    """Plain-torch twin of `split_k_topk_sum`."""
    M, top_k = topk_ids.shape
    ids = topk_ids.long().view(-1)
    in_range = (ids >= 0) & (ids < expert_to_slot.numel())
    slotted = in_range & (expert_to_slot[ids.clamp(0, expert_to_slot.numel() - 1)] >= 0)
    y = ws[:splits].sum(dim=0) * route_w.view(-1, 1).float()
    y = torch.where(slotted[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    out.copy_(y.view(M, top_k, -1).sum(dim=1).to(out.dtype))


def word_major(a: torch.Tensor) -> torch.Tensor:
    """GEMV_WORDS' activations: [M, K] -> fp32 [M, 8, K / 8] (row m, j, i holds a[m, 8i + j]), contiguous."""
    M, K = a.shape
    return a.reshape(M, K // 8, 8).transpose(1, 2).float().contiguous()


def split_k(config: dict, K: int, ws_shape: tuple[int, int], device: torch.device):
    """(K steps per program, programs along K, fp32 workspace [splits, *ws_shape]) for a CUDA-core GEMM of depth K:
    SPLIT_K programs share one output tile so that a decode step keeps more loads in flight; a split that would get
    no K step is dropped."""
    total = triton.cdiv(K, config["BLOCK_SIZE_K"])
    steps = triton.cdiv(total, min(config.get("SPLIT_K", 1), total))
    splits = triton.cdiv(total, steps)
    ws = torch.empty((splits, *ws_shape) if splits > 1 else (1, 1), dtype=torch.float32, device=device)
    return steps, splits, ws


def split_k_sum(ws, out, route_w, align: MoEAlignment, bm: int, splits: int, gated: bool) -> None:
    """Launch `split_k_sum_kernel` over the GEMM's row blocks of `bm`."""
    n = out.shape[1]
    grid = (align.sorted_ids.numel() // bm * triton.cdiv(n, _SUM_N),)
    args = (ws, out, route_w, align.sorted_ids, align.block_slot, align.num_padded, n, out.shape[0], splits)
    split_k_sum_kernel[grid](
        *args, ws.stride(0), ws.stride(1), out.stride(0), BLOCK_M=bm, BLOCK_N=_SUM_N, GATED=gated,
        INTERPRET=interpreting(),
    )  # fmt: skip
