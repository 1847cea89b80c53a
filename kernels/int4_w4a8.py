"""The int8 tensor-core tiles of `moed.kernels.fused_moe_int4` (config key A8): int4 experts times int8 activations.

The w4a16 tiles spend 6-10 sm_90 instructions a weight turning nibbles into bf16 or fp32 (byte permutes and widening,
a zero-point subtraction), which caps a decode step near 1 TB/s of int4 on the H100 against its ~3 TB/s of HBM.
Here the activations are quantised per token and K step to int8 first (`per_token_group_quant_int8`: [rows, 2,
K / 2], even k then odd k, a scale and the sum of q a step), and a packed weight tile becomes its two int8 nibble
tiles with one 32-bit and (low) and one shift-and (high) per four bytes, inline PTX on the GPU: the int8 MMA takes
them as they are, the zero point comes off once a K step as z * sum(q), and the scales once a step per output.
Compiled for sm_90 (Triton 3.9), the 16x128 decode tile's K step is 324 instructions for gate-up and 293 for down,
2.5 and 2.3 a weight, against 801 and 807 with UNPACK_BF16.
Accuracy: int8 activations in 128-wide steps (the CPU experts' int4 path uses 128-wide int8 blocks too) add 0.65%
(Gaussian inputs) to 1.3% (SiLU-gated, heavier-tailed) relative error a GEMM on random weights, measured against the
same GEMM on the unquantised activations; int4's own rounding is several times that. The tuner checks every
candidate against the torch reference (3% at most) and picks A8 only where it is faster.

Same arguments, alignment and outputs as the w4a16 kernels (`fused_moe_int4`), whose torch reference
`moed.kernels.fused_moe_reference.fused_moe_reference` is this one's too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moed.formats.int4 import Int4Weight
from moed.kernels.act_quant import per_token_group_quant_int8
from moed.kernels.fused_moe import _route_block, _tile_ids, _to_bf16
from moed.kernels.int4_gemv import TokenSum, split_k, split_k_sum, split_k_topk_sum, zero_points, zero_strides
from moed.kernels.moe_align import MoEAlignment

# int8 MMA takes K in steps of 32, so a K step's even (or odd) half must hold at least that many
A8_MIN_BLOCK_K = 64


@triton.jit
def _nibble_tiles(packed, INTERPRET: tl.constexpr):
    """(low, high) nibbles of a packed uint8 tile as int8 tiles (values 0-15). On the GPU a 32-bit and (and a shift)
    does four bytes at once; Triton's own byte ops compile to a permute and a widening a byte."""
    if INTERPRET:
        return (packed & 0xF).to(tl.int8, bitcast=True), (packed >> 4).to(tl.int8, bitcast=True)
    lo = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    hi = tl.inline_asm_elementwise(
        "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
        "=r,r",
        [packed],
        dtype=tl.int8,
        is_pure=True,
        pack=4,
    )
    return lo, hi


@triton.jit
def _int8_step(a_even, a_odd, packed, qsum, uz, INTERPRET: tl.constexpr):
    """sum_k q_k (w_k - z) over one K step, int32 [BM, BN]: two int8 dots (even k against the low nibbles, odd k
    against the high ones), the zero point (stored z + 8) off once with the step's sum of q."""
    lo, hi = _nibble_tiles(packed, INTERPRET)
    d = tl.dot(a_even, lo, out_dtype=tl.int32)
    d = tl.dot(a_odd, hi, d, out_dtype=tl.int32)
    return d - qsum[:, None] * uz[None, :]


@triton.jit
def _w_tile(ptrs, offs_kh, n_ok, k_left, live):
    """A packed weight tile [HALF_K, BN] of a K step `k_left` half-columns from the end (zeros unless `live`). The
    masks fold `live` into a bound: the interpreter takes a mask of a Python bool and a tensor as int."""
    return tl.load(ptrs, mask=(offs_kh < k_left * live)[:, None] & n_ok[None, :], other=0)


@triton.jit
def _a_tiles(a_ptrs, rows, k_ok, KH):
    """One K step's int8 activations of a block's rows (even k, odd k), zeros where `rows` is False. Loaded in the
    step that uses them: the compiler's pipelining stages them (and the weight tiles) ahead through shared memory."""
    a_mask = rows[:, None] & k_ok[None, :]
    return tl.load(a_ptrs, mask=a_mask, other=0), tl.load(a_ptrs + KH, mask=a_mask, other=0)


@triton.jit
def _live_rows(row_ok, live):
    """The block's rows, none unless `live` (folded into a bound: the interpreter takes no mask of a Python bool and
    a tensor)."""
    return row_ok & (tl.arange(0, row_ok.shape[0]) < row_ok.shape[0] * live)


# A K step's small operands (`_gate_up_side`, `_down_side`): the activations' scale and sum of q per row (0 where the
# row or the step is dead) and the weights' zero points and scales per column (group g in bounds even for a dead
# step: the callers take the live step's group there). Too small for the compiler's pipelining, which stages the
# weight and activation tiles ahead through shared memory (LDGSTS); loaded in their own step they are a global round
# trip every K step, waited out after the MMAs (sm_90 SASS: 12 LDG a gate-up step, consumed at its end). The decode
# tiles load them a step ahead (AHEAD, `_ahead`).
@triton.jit
def _gate_up_side(
    as_ptrs, aq_ptrs, kb, rows, zg_ptrs, zu_ptrs, sg_ptrs, su_ptrs, offs_n, offs_up, n_ok, g, stride_zk, stride_sk,
    HAS_ZP: tl.constexpr,
):  # fmt: skip
    sa = tl.load(as_ptrs + kb, mask=rows, other=0.0)
    qsum = tl.load(aq_ptrs + kb, mask=rows, other=0)
    zg = zero_points(zg_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
    zu = zero_points(zu_ptrs + g * stride_zk, offs_up, n_ok, HAS_ZP)
    sg = tl.load(sg_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
    su = tl.load(su_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
    return sa, qsum, zg, zu, sg, su


@triton.jit
def _down_side(as_ptrs, aq_ptrs, kb, rows, z_ptrs, s_ptrs, offs_n, n_ok, g, stride_zk, stride_sk, HAS_ZP: tl.constexpr):
    sa = tl.load(as_ptrs + kb, mask=rows, other=0.0)
    qsum = tl.load(aq_ptrs + kb, mask=rows, other=0)
    z = zero_points(z_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
    return sa, qsum, z, tl.load(s_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)


@triton.jit
def _k_range(KH, HALF_K: tl.constexpr, steps, SPLIT: tl.constexpr):
    """[first, end) K steps of this program: all of them, or with SPLIT the `steps` of split program_id(1)."""
    total = tl.cdiv(KH, HALF_K)
    if SPLIT:
        kb0 = tl.program_id(1) * steps
        return kb0, tl.minimum(kb0 + steps, total)
    return 0, total


@triton.jit
def _gate_up_step(acc_g, acc_u, wg, wu, a_even, a_odd, sa, qsum, zg, zu, sg, su, INTERPRET: tl.constexpr):
    """One gate-up K step added into (acc_g, acc_u), given its activations and small operands (`_gate_up_side`)."""
    dg = _int8_step(a_even, a_odd, wg, qsum, zg, INTERPRET).to(tl.float32)
    du = _int8_step(a_even, a_odd, wu, qsum, zu, INTERPRET).to(tl.float32)
    return acc_g + dg * sa[:, None] * sg[None, :], acc_u + du * sa[:, None] * su[None, :]


@triton.jit
def _down_step(acc, w, a_even, a_odd, sa, qsum, z, s, INTERPRET: tl.constexpr):
    """One down K step added into acc, as `_gate_up_step`."""
    d = _int8_step(a_even, a_odd, w, qsum, z, INTERPRET).to(tl.float32)
    return acc + d * sa[:, None] * s[None, :]


@triton.jit(do_not_specialize=["T", "top_k", "num_blocks_m", "GROUP_M", "steps"])
def _gate_up_int4_a8_kernel(
    a_ptr,
    as_ptr,
    aq_ptr,
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
    num_blocks_m,
    GROUP_M,
    group,
    stride_am,
    stride_asm,
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
    steps,
    stride_wsk,
    stride_wsm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZP: tl.constexpr,
    SPLIT: tl.constexpr,
    PAIRS: tl.constexpr,
    AHEAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """h[f, n] = silu(x_t . gate_slot[n]) * (x_t . up_slot[n]) for the rows f of one block, t = f // top_k, from
    the int8 activations a [M, 2, KH] (scale and sum of q per token and K step: as, aq [M, steps]). SPLIT: this
    program takes `steps` K steps from program_id(1) * steps and writes its fp32 gate | up sums to ws instead.
    PAIRS: a loop pass takes two K steps, both steps' weight tiles loaded before the first one's math. AHEAD
    (`_ahead`: the 16-row tiles without PAIRS): each step's scales, zero points and activation sums load a step
    ahead. The weight and activation tiles themselves the compiler stages `num_stages - 1` steps ahead through
    shared memory (LDGSTS in the sm_90 SASS of Triton 3.6 and 3.9)."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_pid_n = tl.cdiv(N, HALF_N)
    pid_m, pid_n = _tile_ids(num_blocks_m, num_pid_n, GROUP_M)
    slot, flat, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    row_ok = flat < T
    tok = (flat // top_k).to(tl.int64)
    offs_n = pid_n * HALF_N + tl.arange(0, HALF_N)
    n_ok = offs_n < N
    offs_up = offs_n + N
    kb0, kb1 = _k_range(KH, HALF_K, steps, SPLIT)
    offs_kh = tl.arange(0, HALF_K)
    a_ptrs = a_ptr + tok[:, None] * stride_am + offs_kh[None, :]
    as_ptrs = as_ptr + tok * stride_asm
    aq_ptrs = aq_ptr + tok * stride_asm
    wg_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    wu_ptrs = wg_ptrs + N * stride_wn
    sg_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    su_ptrs = s_ptr + slot * stride_ss + offs_up * stride_sn
    zg_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    zu_ptrs = z_ptr + slot * stride_zs + (offs_up // 8) * stride_zn
    acc_g = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    side = (as_ptrs, aq_ptrs)
    cols = (zg_ptrs, zu_ptrs, sg_ptrs, su_ptrs, offs_n, offs_up, n_ok)
    if AHEAD:  # the first step's small operands (`_gate_up_side`); the loop loads each next step's a step ahead
        p = _gate_up_side(
            *side, kb0, _live_rows(row_ok, kb0 < kb1), *cols,
            (tl.minimum(kb0, tl.cdiv(KH, HALF_K) - 1) * BLOCK_K) // group,  # in bounds for an empty split too
            stride_zk, stride_sk, HAS_ZP,
        )  # fmt: skip
    for kb in range(kb0, kb1, 2 if PAIRS else 1):
        k_left = KH - kb * HALF_K
        wg = _w_tile(wg_ptrs + kb * HALF_K, offs_kh, n_ok, k_left, kb < kb1)
        wu = _w_tile(wu_ptrs + kb * HALF_K, offs_kh, n_ok, k_left, kb < kb1)
        if PAIRS:  # the pair's second step (none past this program's last): its tiles load before the first's math
            live = kb + 1 < kb1
            wg2 = _w_tile(wg_ptrs + (kb + 1) * HALF_K, offs_kh, n_ok, k_left - HALF_K, live)
            wu2 = _w_tile(wu_ptrs + (kb + 1) * HALF_K, offs_kh, n_ok, k_left - HALF_K, live)
        a_even, a_odd = _a_tiles(a_ptrs + kb * HALF_K, _live_rows(row_ok, kb < kb1), offs_kh < k_left, KH)
        # this step's small operands: loaded a step ago (AHEAD; the next step's go out now), else now
        this = p if AHEAD else _gate_up_side(
            *side, kb, _live_rows(row_ok, kb < kb1), *cols, (kb * BLOCK_K) // group, stride_zk, stride_sk, HAS_ZP
        )  # fmt: skip
        if AHEAD:
            p = _gate_up_side(
                *side, kb + 1, _live_rows(row_ok, kb + 1 < kb1), *cols, ((kb + (kb + 1 < kb1)) * BLOCK_K) // group,
                stride_zk, stride_sk, HAS_ZP,
            )  # fmt: skip
        acc_g, acc_u = _gate_up_step(acc_g, acc_u, wg, wu, a_even, a_odd, *this, INTERPRET)
        if PAIRS:
            rows2 = _live_rows(row_ok, live)
            a_even, a_odd = _a_tiles(a_ptrs + (kb + 1) * HALF_K, rows2, offs_kh < k_left - HALF_K, KH)
            q = _gate_up_side(
                *side, kb + 1, rows2, *cols, ((kb + live) * BLOCK_K) // group, stride_zk, stride_sk, HAS_ZP
            )  # fmt: skip
            acc_g, acc_u = _gate_up_step(acc_g, acc_u, wg2, wu2, a_even, a_odd, *q, INTERPRET)
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT:
        ws = ws_ptr + tl.program_id(1) * stride_wsk + flat[:, None].to(tl.int64) * stride_wsm + offs_n[None, :]
        tl.store(ws, acc_g, mask=mask)
        tl.store(ws + N, acc_u, mask=mask)
    else:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        h_ptrs = h_ptr + flat[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, _to_bf16(h, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["T", "num_blocks_m", "GROUP_M", "steps"])
def _down_int4_a8_kernel(
    a_ptr,
    as_ptr,
    aq_ptr,
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
    num_blocks_m,
    GROUP_M,
    group,
    stride_am,
    stride_asm,
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
    steps,
    stride_wsk,
    stride_wsm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZP: tl.constexpr,
    SPLIT: tl.constexpr,
    PAIRS: tl.constexpr,
    AHEAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """partial[f, :] = topk_weight[f] * (h[f] . down_slot) for the rows f of one block, h as int8 [T, 2, NH].
    SPLIT: as in the gate-up kernel, the unweighted fp32 sums go to ws; PAIRS as there."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_pid_n = tl.cdiv(H, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_blocks_m, num_pid_n, GROUP_M)
    slot, flat, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    row_ok = flat < T
    rows = flat.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    kb0, kb1 = _k_range(NH, HALF_K, steps, SPLIT)
    offs_kh = tl.arange(0, HALF_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_kh[None, :]
    as_ptrs = as_ptr + rows * stride_asm
    aq_ptrs = aq_ptr + rows * stride_asm
    w_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    s_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    z_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    side = (as_ptrs, aq_ptrs)
    cols = (z_ptrs, s_ptrs, offs_n, n_ok)
    if AHEAD:  # as in the gate-up kernel
        p = _down_side(
            *side, kb0, _live_rows(row_ok, kb0 < kb1), *cols,
            (tl.minimum(kb0, tl.cdiv(NH, HALF_K) - 1) * BLOCK_K) // group,  # in bounds for an empty split too
            stride_zk, stride_sk, HAS_ZP,
        )  # fmt: skip
    for kb in range(kb0, kb1, 2 if PAIRS else 1):
        k_left = NH - kb * HALF_K
        w = _w_tile(w_ptrs + kb * HALF_K, offs_kh, n_ok, k_left, kb < kb1)
        if PAIRS:
            live = kb + 1 < kb1
            w2 = _w_tile(w_ptrs + (kb + 1) * HALF_K, offs_kh, n_ok, k_left - HALF_K, live)
        a_even, a_odd = _a_tiles(a_ptrs + kb * HALF_K, _live_rows(row_ok, kb < kb1), offs_kh < k_left, NH)
        this = p if AHEAD else _down_side(
            *side, kb, _live_rows(row_ok, kb < kb1), *cols, (kb * BLOCK_K) // group, stride_zk, stride_sk, HAS_ZP
        )  # fmt: skip
        if AHEAD:
            p = _down_side(
                *side, kb + 1, _live_rows(row_ok, kb + 1 < kb1), *cols, ((kb + (kb + 1 < kb1)) * BLOCK_K) // group,
                stride_zk, stride_sk, HAS_ZP,
            )  # fmt: skip
        acc = _down_step(acc, w, a_even, a_odd, *this, INTERPRET)
        if PAIRS:
            rows2 = _live_rows(row_ok, live)
            a_even, a_odd = _a_tiles(a_ptrs + (kb + 1) * HALF_K, rows2, offs_kh < k_left - HALF_K, NH)
            q = _down_side(
                *side, kb + 1, rows2, *cols, ((kb + live) * BLOCK_K) // group, stride_zk, stride_sk, HAS_ZP
            )  # fmt: skip
            acc = _down_step(acc, w2, a_even, a_odd, *q, INTERPRET)
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(ws_ptr + tl.program_id(1) * stride_wsk + rows[:, None] * stride_wsm + offs_n[None, :], acc, mask=mask)
    else:
        acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, _to_bf16(acc, INTERPRET), mask=mask)


def _ahead(config: dict) -> bool:
    """Whether a tile loads each K step's small operands a step ahead (`_gate_up_side`): by default the decode tiles
    (16 rows), whose few programs each wait out every step's round trip; config key AHEAD False keeps them in the step
    (the tuner times both). Never with PAIRS, whose pass issues both steps' loads together, nor the 32- and 64-row
    tiles, whose MMAs cover the wait: there the carried operands spill 8-104 bytes (sm_90 compile, Triton 3.6 and
    3.9; `fused_moe_int4.check_config` refuses them)."""
    return config.get("AHEAD", config["BLOCK_SIZE_M"] <= 16 and not config.get("PAIRS", False))


def _weight_strides(w: Int4Weight) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(zero-point tensor, the kernels' weight, scale and zero-point strides)."""
    z, zs = zero_strides(w)
    qw, s = w.qweight, w.scales
    return z, (qw.stride(0), qw.stride(1), s.stride(0), s.stride(1), s.stride(2), *zs)


def launch_gate_up_a8(
    hidden: torch.Tensor, w13: Int4Weight, h: torch.Tensor, align: MoEAlignment, top_k: int, config: dict, meta: dict
) -> None:
    """Gate-up with int8 activations: hidden [M, K] quantised per token and K step, then h [T, N]. `meta` as
    fused_moe_int4's `_meta` (BLOCK_* and launch options); the config's SPLIT_K shares each tile's K steps among
    that many programs, their fp32 sums added in a fixed order by a second pass."""
    K = hidden.shape[1]
    T, N = h.shape
    q, sa, qsum = per_token_group_quant_int8(hidden, meta["BLOCK_K"])
    z, strides = _weight_strides(w13)
    steps, splits, ws = split_k(config, K, (T, 2 * N), h.device)
    num_blocks_m = align.sorted_ids.numel() // meta["BLOCK_M"]
    grid = (num_blocks_m * triton.cdiv(N, meta["BLOCK_N"] // 2), splits)
    _gate_up_int4_a8_kernel[grid](
        q, sa, qsum, w13.qweight, w13.scales, z, h, align.sorted_ids, align.block_slot, align.num_padded,
        N, K // 2, T, top_k, num_blocks_m, config["GROUP_SIZE_M"], w13.group, q.stride(0), sa.stride(0), *strides,
        h.stride(0), ws, steps, *ws.stride()[:2], SPLIT=splits > 1, PAIRS=config.get("PAIRS", False),
        AHEAD=_ahead(config), **meta,
    )  # fmt: skip
    if splits > 1:
        split_k_sum(ws, h, h, align, meta["BLOCK_M"], splits, gated=True)


def launch_down_a8(
    h: torch.Tensor,
    w2: Int4Weight,
    partial: torch.Tensor,
    topk_weights: torch.Tensor,
    align: MoEAlignment,
    config: dict,
    meta: dict,
    token_sum: TokenSum | None = None,
) -> bool:
    """Down with int8 activations: h [T, N] quantised per route and K step, then partial [T, K]; SPLIT_K as in
    gate-up (the second pass applies the route weights). With `token_sum` a split's second pass writes the token sums
    instead (`split_k_topk_sum`) and this returns True."""
    T, N = h.shape
    H = partial.shape[1]
    q, sa, qsum = per_token_group_quant_int8(h, meta["BLOCK_K"])
    z, strides = _weight_strides(w2)
    steps, splits, ws = split_k(config, N, (T, H), h.device)
    num_blocks_m = align.sorted_ids.numel() // meta["BLOCK_M"]
    grid = (num_blocks_m * triton.cdiv(H, meta["BLOCK_N"]), splits)
    _down_int4_a8_kernel[grid](
        q, sa, qsum, w2.qweight, w2.scales, z, partial, topk_weights, align.sorted_ids, align.block_slot,
        align.num_padded, H, N // 2, T, num_blocks_m, config["GROUP_SIZE_M"], w2.group, q.stride(0), sa.stride(0),
        *strides, partial.stride(0), ws, steps, *ws.stride()[:2], SPLIT=splits > 1,
        PAIRS=config.get("PAIRS", False), AHEAD=_ahead(config), **meta,
    )  # fmt: skip
    if splits > 1 and token_sum is not None:
        split_k_topk_sum(ws, token_sum.out, topk_weights, token_sum.topk_ids, token_sum.expert_to_slot, splits)
        return True
    if splits > 1:
        split_k_sum(ws, partial, topk_weights, align, meta["BLOCK_M"], splits, gated=False)
    return False
