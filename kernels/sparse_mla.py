"""Sparse MLA over selected positions, with kv_b absorbed: decode and prefill share one kernel.

With kv_b_proj split per head into W_UK [H, dn, C] and W_UV [H, dv, C], attention over latents is
    q_lat = q_nope @ W_UK          [tokens, H, C]          (done by the caller, a batched GEMM)
    s_j   = (q_lat . c_j + q_rope . r_j) * softmax_scale    c_j: latent, r_j: roped key of position j
    o_lat = sum_j softmax(s)_j c_j                          [tokens, H, C]
    out   = o_lat @ W_UV^T                                  [tokens, H, dv]  (caller)
which equals MLA with K and V expanded (the reference), up to rounding.

Positions come from `indices` [tokens, k] (positions in the sequence, -1 = unused) or, in dense mode,
are every position <= the token's own. Latent rows are read through the page table from the latent
pool (bf16/fp32, or e4m3 with a per-token fp32 scale that multiplies scores and probabilities).

Grid: (token, head block, split). A program keeps [BLOCK_H, C] fp32 accumulators for BLOCK_H heads
(heads beyond H are masked rows: the in-kernel form of padding a TP shard's 8 heads to 16) and walks
its split's share of the positions in tiles of BLOCK_N with an online softmax. With several splits,
each writes a normalised partial output and its base-2 log-sum-exp; `_combine_kernel` merges them.
`MLAConfig.swap` computes the score tile transposed ([positions, heads]), so that 64 positions fill the
rows of a Hopper wgmma when a shard has few heads (measured slower on the H100 than the default layout;
kept selectable and tested).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from moed.kernels.launch import sm_count, vec
from moed.kernels.tl_helpers import cast_rne, dot

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    block_h: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2  # the selection is split until the grid has about this many programs per SM
    swap: bool = False  # scores as [positions, heads]: positions fill the MMA's rows (Hopper's wgmma needs 64)


def default_config(heads: int, tokens: int, fp8: bool = False) -> MLAConfig:
    # Measured on the H100 (ops/bench/attention.py sweep, batch 16 and 64): 64-head tiles use Hopper's wgmma and
    # double-buffer the latents (247 registers, no spills); 16-head tiles run best at 4 warps with more splits
    # for bf16 latents (FP8 latents spill there: 8 warps, not timed). No spills in the ptxas reports (sm_90,
    # Triton 3.6) for bf16 and FP8 pools.
    if heads <= 16:
        return MLAConfig(block_h=16, block_n=32, num_warps=8 if fp8 else 4, num_stages=2, programs_per_sm=4)
    return MLAConfig(block_h=64, block_n=32, num_warps=8, num_stages=4)


@triton.jit(
    do_not_specialize=[
        "stride_qt",
        "stride_qh",
        "stride_rt",
        "stride_rh",
        "stride_np",
        "stride_no",
        "stride_rp",
        "stride_ro",
        "stride_sp",
        "stride_so",
        "stride_it",
        "stride_pt",
        "stride_ot",
        "stride_oh",
        "stride_xt",
        "stride_xs",
        "stride_xh",
        "stride_lt",
        "stride_ls",
        "K",
        "chunk",
        "num_splits",
    ]
)
def _sparse_mla_kernel(
    q_ptr,
    qr_ptr,
    nope_ptr,
    rope_ptr,
    scale_ptr,
    idx_ptr,
    token_seq_ptr,
    positions_ptr,
    page_table_ptr,
    o_ptr,
    part_ptr,
    lse_ptr,
    stride_qt,
    stride_qh,
    stride_rt,
    stride_rh,
    stride_np,
    stride_no,
    stride_rp,
    stride_ro,
    stride_sp,
    stride_so,
    stride_it,
    stride_pt,
    stride_ot,
    stride_oh,
    stride_xt,
    stride_xs,
    stride_xh,
    stride_lt,
    stride_ls,
    K,
    chunk,
    num_splits,
    sm_scale_log2,
    H: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
    DENSE: tl.constexpr,
    SWAP: tl.constexpr,
    IEEE: tl.constexpr,
    F32DOT: tl.constexpr,
    INTERP: tl.constexpr,
    VEC_Q: tl.constexpr,
    VEC_QR: tl.constexpr,
    VEC_KV: tl.constexpr,
    VEC_KR: tl.constexpr,
    VEC_O: tl.constexpr,
    VEC_X: tl.constexpr,
):
    # VEC_*: the row strides (elements) are multiples of these, so rows move as 16-byte vectors.
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    hmask = heads < H
    b = tl.load(token_seq_ptr + t)
    pos = tl.load(positions_ptr + t).to(tl.int32)
    if DENSE:
        n_slots = pos + 1
    else:
        n_slots = K
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_slots)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    # Masks along the contiguous dims only where the block is wider than the data (else loads vectorise).
    if BLOCK_C == C:
        cmask = c < BLOCK_C
    else:
        cmask = c < C
    if BLOCK_R == R:
        rmask = r < BLOCK_R
    else:
        rmask = r < R
    t64 = t.to(tl.int64)
    q_row = tl.multiple_of(t64 * stride_qt + heads * stride_qh, VEC_Q)
    q = tl.load(q_ptr + q_row[:, None] + c[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0)
    qr_row = tl.multiple_of(t64 * stride_rt + heads * stride_rh, VEC_QR)
    qr = tl.load(qr_ptr + qr_row[:, None] + r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
        qr = qr.to(tl.float32)
    else:
        q = cast_rne(q, tl.bfloat16, INTERP)
        qr = cast_rne(qr, tl.bfloat16, INTERP)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    if SWAP:
        acc = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    PA: tl.constexpr = 0 if SWAP else 1
    for n0 in range(lo, hi, BLOCK_N):
        slot = n0 + tl.arange(0, BLOCK_N)
        smask = slot < hi
        if DENSE:
            j = slot
        else:
            j = tl.load(idx_ptr + t64 * stride_it + slot, mask=smask, other=-1)
        valid = smask & (j >= 0) & (j <= pos)
        j = tl.where(valid, j, 0)
        page = tl.load(page_table_ptr + b * stride_pt + j // PAGE, mask=valid, other=0).to(tl.int64)
        off = j % PAGE
        kv_row = tl.multiple_of(page * stride_np + off * stride_no, VEC_KV)
        kv = tl.load(nope_ptr + kv_row[:, None] + c[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        kr_row = tl.multiple_of(page * stride_rp + off * stride_ro, VEC_KR)
        kr = tl.load(rope_ptr + kr_row[:, None] + r[None, :], mask=valid[:, None] & rmask[None, :], other=0.0)
        if IEEE:
            kv = kv.to(tl.float32)
            kr = kr.to(tl.float32)
        else:
            kv = kv.to(tl.bfloat16)
            kr = kr.to(tl.bfloat16)
        # PA: the axis of the score tile that runs over positions (SWAP: scores^T [BLOCK_N, BLOCK_H]).
        if SWAP:
            s = dot(kv, tl.trans(q), F32DOT)
            s_rope = dot(kr, tl.trans(qr), F32DOT)
        else:
            s = dot(q, tl.trans(kv), F32DOT)
            s_rope = dot(qr, tl.trans(kr), F32DOT)
        if FP8:
            ks = tl.load(scale_ptr + page * stride_sp + off * stride_so, mask=valid, other=0.0)
            s = s * tl.expand_dims(ks, 1 - PA)
        s = (s + s_rope) * sm_scale_log2
        s = tl.where(tl.expand_dims(valid, 1 - PA), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=PA))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - tl.expand_dims(m_use, PA))
        l = l * alpha + tl.sum(p, axis=PA)
        if FP8:
            p = p * tl.expand_dims(ks, 1 - PA)
        if SWAP:
            acc = acc * alpha[None, :] + dot(tl.trans(kv), cast_rne(p, kv.dtype, INTERP), F32DOT)
        else:
            acc = acc * alpha[:, None] + dot(cast_rne(p, kv.dtype, INTERP), kv, F32DOT)
        m = m_new
    if SWAP:
        acc = tl.trans(acc)
    o = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    omask = hmask[:, None] & cmask[None, :]
    if num_splits > 1:  # a runtime branch: batch sizes that split and that do not share one compiled kernel
        part_row = tl.multiple_of(t64 * stride_xt + split * stride_xs + heads * stride_xh, VEC_X)
        tl.store(part_ptr + part_row[:, None] + c[None, :], o, mask=omask)
        lse = tl.where(l > 0.0, m + tl.log2(tl.where(l > 0.0, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + t64 * stride_lt + split * stride_ls + heads, lse, mask=hmask)
    else:
        out_row = tl.multiple_of(t64 * stride_ot + heads * stride_oh, VEC_O)
        tl.store(o_ptr + out_row[:, None] + c[None, :], cast_rne(o, o_ptr.dtype.element_ty, INTERP), mask=omask)


@triton.jit(
    do_not_specialize=[
        "stride_pt",
        "stride_ps",
        "stride_ph",
        "stride_lt",
        "stride_ls",
        "stride_ot",
        "stride_oh",
        "S",
        "C",
    ]
)
def _combine_kernel(
    part_ptr,
    lse_ptr,
    o_ptr,
    stride_pt,
    stride_ps,
    stride_ph,
    stride_lt,
    stride_ls,
    stride_ot,
    stride_oh,
    S,
    C,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + t * stride_lt + s * stride_ls + h, mask=s < S, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    part = tl.load(
        part_ptr + t * stride_pt + s[:, None] * stride_ps + h * stride_ph + c[None, :],
        mask=(s[:, None] < S) & (c[None, :] < C),
        other=0.0,
    )
    o = tl.sum(part * w[:, None], axis=0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + c, cast_rne(o, o_ptr.dtype.element_ty, INTERP), mask=c < C)


def sparse_mla(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    nope: torch.Tensor,
    rope: torch.Tensor,
    scale: torch.Tensor | None,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    indices: torch.Tensor | None,
    softmax_scale: float,
    max_context: int = 0,
    num_splits: int | None = None,
    config: MLAConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA over selected (or, with indices=None, all causal) positions.

    q_lat: [tokens, H, C]; q_rope: [tokens, H, R]; nope/rope/scale: the layer's latent pool views
    ([pages, page, C], [pages, page, R], [pages, page] fp32 or None); page_table: [batch, max_pages]
    int32; token_seq: [tokens] int32; positions: [tokens] int; indices: [tokens, k] int32 or None
    (dense: needs `max_context`, a host bound on positions + 1). Returns o_lat [tokens, H, C] in
    q_lat's dtype.
    """
    T, H, C = q_lat.shape
    R = q_rope.shape[2]
    out = out if out is not None else torch.empty(T, H, C, dtype=q_lat.dtype, device=q_lat.device)
    if T == 0:
        return out
    if q_lat.stride(2) != 1 or q_rope.stride(2) != 1 or nope.stride(2) != 1 or rope.stride(2) != 1:
        raise ValueError("sparse_mla: the last dims of q_lat, q_rope and the latent views must be contiguous")
    if page_table.dtype != torch.int32 or page_table.stride(1) != 1:
        raise ValueError(f"sparse_mla: page_table must be int32 with contiguous rows, got {page_table.dtype}")
    if indices is not None and (indices.dtype != torch.int32 or indices.stride(1) != 1):
        raise ValueError(f"sparse_mla: indices must be int32 [tokens, k] with contiguous rows, got {indices.dtype}")
    if indices is None and max_context <= 0:
        raise ValueError("sparse_mla: dense mode (indices=None) needs max_context > 0")
    cfg = config or default_config(H, T, fp8=scale is not None)
    slots = indices.shape[1] if indices is not None else max_context
    head_blocks = triton.cdiv(H, cfg.block_h)
    if num_splits is None:
        want = triton.cdiv(cfg.programs_per_sm * sm_count(q_lat.device), T * head_blocks)
        num_splits = max(1, min(want, triton.cdiv(slots, 128)))
    num_splits = min(num_splits, 16)  # the combine kernel merges up to 16
    chunk = triton.cdiv(triton.cdiv(slots, num_splits), cfg.block_n) * cfg.block_n
    num_splits = triton.cdiv(slots, chunk)
    fp8 = scale is not None
    sc = scale if fp8 else nope
    sc_stride = scale.stride() if fp8 else (0, 0)
    idx = indices if indices is not None else page_table
    idx_stride = indices.stride(0) if indices is not None else 0
    ieee = q_lat.dtype == torch.float32 and nope.dtype == torch.float32
    page = nope.shape[1]
    common = dict(
        PAGE=page,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        BLOCK_C=triton.next_power_of_2(C),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        FP8=fp8,
        DENSE=indices is None,
        SWAP=cfg.swap,
        IEEE=ieee,
        F32DOT=ieee or INTERPRET,
        INTERP=INTERPRET,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    # Partials [T, splits, H, C] fp32 and base-2 LSE [T, splits, H]; a 1-element dummy when nothing splits.
    shape = (T, num_splits, H) if num_splits > 1 else (1, 1, 1)
    part = torch.empty(*shape, C if num_splits > 1 else 4, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(*shape, dtype=torch.float32, device=q_lat.device)
    _sparse_mla_kernel[(T, head_blocks, num_splits)](
        q_lat,
        q_rope,
        nope,
        rope,
        sc,
        idx,
        token_seq,
        positions,
        page_table,
        out,
        part,
        lse,
        q_lat.stride(0),
        q_lat.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        nope.stride(0),
        nope.stride(1),
        rope.stride(0),
        rope.stride(1),
        *sc_stride,
        idx_stride,
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        slots,
        chunk,
        num_splits,
        softmax_scale * LOG2E,
        H=H,
        C=C,
        R=R,
        VEC_Q=vec(q_lat, q_lat.stride(0), q_lat.stride(1)),
        VEC_QR=vec(q_rope, q_rope.stride(0), q_rope.stride(1)),
        VEC_KV=vec(nope, nope.stride(0), nope.stride(1)),
        VEC_KR=vec(rope, rope.stride(0), rope.stride(1)),
        VEC_O=vec(out, out.stride(0), out.stride(1)),
        VEC_X=vec(part, C),
        **common,
    )
    if num_splits > 1:
        _combine_kernel[(T, H)](
            part,
            lse,
            out,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            num_splits,
            C,
            BLOCK_S=16,
            BLOCK_C=triton.next_power_of_2(C),
            INTERP=INTERPRET,
            num_warps=4,
        )
    return out


# -- torch reference ------------------------------------------------------------------------------------------


def sparse_mla_reference(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    q_pos: torch.Tensor,
    indices: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """One sequence in fp32: q_lat [n, H, C], q_rope [n, H, R], latent [L, C], k_rope [L, R] (dequantised),
    q_pos [n], indices [n, k] or None (all causal positions) -> o_lat [n, H, C] fp32."""
    L = latent.shape[0]
    s = (
        torch.einsum("nhc,lc->nhl", q_lat.float(), latent.float())
        + torch.einsum("nhr,lr->nhl", q_rope.float(), k_rope.float())
    ) * softmax_scale
    allowed = torch.arange(L, device=latent.device)[None, :] <= q_pos[:, None]
    if indices is not None:
        chosen = torch.zeros(indices.shape[0], L + 1, dtype=torch.bool, device=latent.device)
        chosen.scatter_(1, torch.where(indices >= 0, indices, L).long(), True)
        allowed = allowed & chosen[:, :L]
    s = s.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("nhl,lc->nhc", torch.softmax(s, dim=-1), latent.float())
