"""DSA indexer: scores of every causal position for each query token, and the top-`index_topk` of them.

For query token t (at position p, in sequence b) and every position j <= p,
    score[t, j] = sum_h w[t, h] * relu(q[t, h] . k[j] * index_head_dim**-0.5)
as transformers computes it, with k read through the page table from the paged index-K pool (FP8
e4m3 times a per-token fp32 scale, or bf16/fp32). Scores are fp32.

Kernels:
- `_scores_kernel`: grid (sequence, tile of BLOCK_T new tokens, run of `tiles_per_prog` tiles of
  BLOCK_N positions). Each tile multiplies the [BLOCK_T * heads, D] queries with [BLOCK_N, D] keys
  read once for all of them (decode: BLOCK_T = 1), reduces over heads and writes [BLOCK_T, BLOCK_N]
  scores; the loop over a program's tiles is software-pipelined.
- top-k: a radix select on the order-preserving int32 key of each fp32 score, split over many programs
  per row (decode has few rows; one program per row was latency-bound), in three launches over grid
  (row, chunk of the row):
  1. `_topk_hist_kernel` LEVEL 1: a 256-bin histogram of key bits 31..24, added into the row's work;
  2. LEVEL 2: a histogram of bits 23..16 among the keys in the chosen top bin;
  3. `_topk_select_kernel`: from the two histograms every program knows the threshold's top 16 bits,
     and from the lower chunks' level-2 counts where its own keys go: it writes keys above that prefix
     to the output and keys at it to a candidate list, both in position order. The row's last program
     to finish (a done counter) picks bits 15..0 among the candidates and writes those above the
     threshold, then the lowest positions equal to it.
  A row whose prefix holds <= k positions gets them all (0..p), -1 after: exact, like the reference.
  Output order: positions above the threshold's top 16 bits ascending, then the rest; the same on
  every run and every split (no order depends on atomics).
  Buffers (int32): work, zeroed per call, `_TOPK_WORK_ROW` words per row: [0:256) level-1 histogram,
  [256:512) level-2 histogram, [512] programs done. counts [rows, chunks * 272]: per chunk, words
  [0:256) hold G[b] = keys above the chosen top byte + keys in it whose byte 2 is >= b, [256] the
  keys above the top byte. scratch [rows, >= width]: the candidate lists.

Both read only device tensors; host ints only size grids and buffers (no sync).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from moed.kernels.launch import sm_count, vec
from moed.kernels.tl_helpers import dot

_SCORE_BUFFER_BYTES = 512 << 20
# Top-k launch shape: keys per loop step, the smallest chunk worth a program, chunks per row at most (the
# per-row counts a program reads as one vector), programs wanted per SM, int32 words of work per row.
_TOPK_BLOCK = 1024
_TOPK_MIN_CHUNK = 1024
_TOPK_MAX_CHUNKS = 64
_TOPK_PROGRAMS_PER_SM = 4
_TOPK_WORK_ROW = 528
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(
    do_not_specialize=[
        "stride_qt",
        "stride_qh",
        "stride_wt",
        "stride_kp",
        "stride_ko",
        "stride_sp",
        "stride_so",
        "stride_pt",
        "stride_ot",
        "t_begin",
        "t_end",
        "tiles_per_prog",
    ]
)
def _scores_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    ks_ptr,
    page_table_ptr,
    query_start_ptr,
    positions_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_wt,
    stride_kp,
    stride_ko,
    stride_sp,
    stride_so,
    stride_pt,
    stride_ot,
    t_begin,
    t_end,
    sm_scale,
    tiles_per_prog,
    HI: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_HI: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8: tl.constexpr,
    IEEE: tl.constexpr,
    F32DOT: tl.constexpr,
    VEC_Q: tl.constexpr,
    VEC_K: tl.constexpr,
    VEC_O: tl.constexpr,
):
    # VEC_*: the row strides (elements) are multiples of these, so rows load as 16-byte vectors.
    b = tl.program_id(0)
    q_lo = tl.maximum(tl.load(query_start_ptr + b), t_begin)
    q_hi = tl.minimum(tl.load(query_start_ptr + b + 1), t_end)
    t0 = tl.load(query_start_ptr + b) + tl.program_id(1) * BLOCK_T
    t_first = tl.maximum(t0, q_lo)
    t_last = tl.minimum(t0 + BLOCK_T, q_hi) - 1
    if t_first <= t_last:
        p_last = tl.load(positions_ptr + t_last).to(tl.int32)
        n_begin = tl.program_id(2) * tiles_per_prog * BLOCK_N
        n_end = tl.minimum(n_begin + tiles_per_prog * BLOCK_N, p_last + 1)
        rows = tl.arange(0, BLOCK_T * BLOCK_HI)
        tok = t0 + rows // BLOCK_HI
        head = rows % BLOCK_HI
        rmask = (tok >= t_first) & (tok <= t_last) & (head < HI)
        d = tl.arange(0, BLOCK_D)
        if BLOCK_D == D:
            dmask = d < BLOCK_D  # all true: no mask along the contiguous dim, so loads vectorise
        else:
            dmask = d < D
        q_row = tl.multiple_of(tok.to(tl.int64) * stride_qt + head * stride_qh, VEC_Q)
        q = tl.load(q_ptr + q_row[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        else:
            q = q.to(tl.bfloat16)  # bf16 models pass bf16 queries: no rounding here
        w = tl.load(w_ptr + tok.to(tl.int64) * stride_wt + head, mask=rmask, other=0.0)
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = (tt >= t_first) & (tt <= t_last)
        pos = tl.load(positions_ptr + tt, mask=tmask, other=-1).to(tl.int32)
        out_rows = out_ptr + tl.multiple_of((tt - t_begin).to(tl.int64) * stride_ot, VEC_O)[:, None]
        for n0 in range(n_begin, n_end, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            jmask = j < n_end
            if PAGE % BLOCK_N == 0:  # the tile lies in one page: one page-table entry, not one per position
                page = tl.load(page_table_ptr + b * stride_pt + n0 // PAGE).to(tl.int64)
            else:
                page = tl.load(page_table_ptr + b * stride_pt + j // PAGE, mask=jmask, other=0).to(tl.int64)
            k_row = tl.multiple_of(page * stride_kp + (j % PAGE) * stride_ko, VEC_K)
            k = tl.load(k_ptr + k_row[:, None] + d[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
            s = dot(q, tl.trans(k.to(q.dtype)), F32DOT)
            if FP8:
                ks = tl.load(ks_ptr + page * stride_sp + (j % PAGE) * stride_so, mask=jmask, other=0.0)
                s = s * ks[None, :]
            s = tl.maximum(s * sm_scale, 0.0) * w[:, None]
            score = tl.sum(tl.reshape(s, (BLOCK_T, BLOCK_HI, BLOCK_N)), axis=1)  # [BLOCK_T, BLOCK_N]
            tl.store(out_rows + j[None, :], score, mask=tmask[:, None] & (j[None, :] <= pos[:, None]))


@triton.jit
def _score_key(s):
    # int32 key with the order of the fp32 score (-0.0 folded into +0.0, as topk treats them equal).
    s = tl.where(s == 0.0, 0.0, s)
    i = s.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def _pick_bin(hist, need, BINS: tl.constexpr):
    # The bin holding the need-th largest element, and how many elements lie in higher bins.
    bins = tl.arange(0, BINS)
    suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # elements in bins >= b
    sel = tl.sum((suffix >= need).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(bins == sel, suffix - hist, 0), axis=0)
    return sel, above


@triton.jit
def _row_len(positions_ptr, t_begin, r):
    return (tl.load(positions_ptr + t_begin + r) + 1).to(tl.int32)  # causal prefix of score row r


@triton.jit(do_not_specialize=["stride_s", "stride_g", "t_begin", "chunk"])
def _topk_hist_kernel(
    scores_ptr,
    positions_ptr,
    work_ptr,
    counts_ptr,
    stride_s,
    stride_g,
    t_begin,
    chunk,
    K: tl.constexpr,
    LEVEL: tl.constexpr,
    BLOCK: tl.constexpr,
    WORK_ROW: tl.constexpr,
):
    # Grid (row, chunk). LEVEL 1: histogram of key bits 31..24; LEVEL 2: of bits 23..16 among the keys whose
    # top byte is the one level 1 chose. Added into the row's work histograms (zeroed by the caller). LEVEL 2
    # also keeps this chunk's counts: G[b] = keys above the chosen top byte + keys in it with byte 2 >= b.
    r = tl.program_id(0)
    c = tl.program_id(1)
    lo = c * chunk
    n = _row_len(positions_ptr, t_begin, r)
    if (n > K) & (lo < n):
        hi = tl.minimum(lo + chunk, n)
        row = scores_ptr + r.to(tl.int64) * stride_s
        work = work_ptr + r.to(tl.int64) * WORK_ROW
        bins = tl.arange(0, 256)
        sel1 = 0
        if LEVEL == 2:
            sel1, _ = _pick_bin(tl.load(work + bins), K, 256)
        hist = tl.zeros([256], dtype=tl.int32)
        n_above = 0
        for j0 in range(lo, hi, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < hi
            key = _score_key(tl.load(row + j, mask=m, other=0.0))
            if LEVEL == 1:
                hist += tl.histogram((key >> 24) + 128, 256, mask=m)
            else:
                top = (key >> 24) + 128
                hist += tl.histogram((key >> 16) & 0xFF, 256, mask=m & (top == sel1))
                n_above += tl.sum((m & (top > sel1)).to(tl.int32), axis=0)
        tl.atomic_add(work + (LEVEL - 1) * 256 + bins, hist, mask=hist > 0, sem="relaxed")
        if LEVEL == 2:
            g = counts_ptr + r.to(tl.int64) * stride_g + c * 272
            tl.store(g + bins, n_above + tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist)
            tl.store(g + 256, n_above)


@triton.jit
def _cand_keys(row, cand, c0, n_cand, BLOCK: tl.constexpr):
    # Candidates were written by other programs of this launch: read them from L2 (.cg), not a stale L1.
    c = c0 + tl.arange(0, BLOCK)
    ok = c < n_cand
    j = tl.load(cand + c, mask=ok, other=0, cache_modifier=".cg")
    return ok, j, _score_key(tl.load(row + j, mask=ok, other=0.0))


@triton.jit(do_not_specialize=["stride_s", "stride_o", "stride_c", "stride_g", "t_begin", "chunk"])
def _topk_select_kernel(
    scores_ptr,
    positions_ptr,
    out_ptr,
    cand_ptr,
    work_ptr,
    counts_ptr,
    stride_s,
    stride_o,
    stride_c,
    stride_g,
    t_begin,
    chunk,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    WORK_ROW: tl.constexpr,
):
    # Grid (row, chunk). The lower chunks' counts (level 2) give this chunk's write offsets.
    r = tl.program_id(0)
    c = tl.program_id(1)
    n = _row_len(positions_ptr, t_begin, r)
    out = out_ptr + (t_begin + r).to(tl.int64) * stride_o
    lo = c * chunk
    if n <= K:
        if c == 0:  # the whole prefix, -1 after: exact
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                tl.store(out + kk, tl.where(kk < n, kk, -1), mask=kk < K)
    elif lo < n:
        row = scores_ptr + r.to(tl.int64) * stride_s
        cand = cand_ptr + r.to(tl.int64) * stride_c
        work = work_ptr + r.to(tl.int64) * WORK_ROW
        bins = tl.arange(0, 256)
        sel1, above1 = _pick_bin(tl.load(work + bins), K, 256)
        sel2, above2 = _pick_bin(tl.load(work + 256 + bins), K - above1, 256)
        prefix = (sel1 << 8) | sel2  # the threshold's top 16 key bits, biased to 0..65535
        g = counts_ptr + r.to(tl.int64) * stride_g + tl.arange(0, MAX_CHUNKS) * 272
        lower = tl.arange(0, MAX_CHUNKS) < c
        g_at = tl.load(g + sel2, mask=lower, other=0)  # per lower chunk: keys above the prefix or at it
        g_above = tl.load(g + sel2 + 1, mask=lower, other=0)  # keys above it
        o_gt = tl.sum(g_above, axis=0)
        o_eq = tl.sum(g_at - g_above, axis=0)
        # Keys above the prefix are selected (in position order); keys at it become candidates.
        hi = tl.minimum(lo + chunk, n)
        for j0 in range(lo, hi, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < hi
            top = (_score_key(tl.load(row + j, mask=m, other=0.0)) >> 16) + 32768
            gt = ((top > prefix) & m).to(tl.int32)
            eq = ((top == prefix) & m).to(tl.int32)
            tl.store(out + o_gt + tl.cumsum(gt, axis=0) - gt, j, mask=gt != 0)
            tl.store(cand + o_eq + tl.cumsum(eq, axis=0) - eq, j, mask=eq != 0)
            o_gt += tl.sum(gt, axis=0)
            o_eq += tl.sum(eq, axis=0)
        # The row's last program to finish resolves the low 16 bits among the candidates.
        n_chunks = (n + chunk - 1) // chunk
        tl.debug_barrier()
        done = tl.atomic_add(work + 512, 1, sem="acq_rel")
        if done == n_chunks - 1:
            every = tl.arange(0, MAX_CHUNKS) < n_chunks
            n_cand = tl.sum(tl.load(g + sel2, mask=every, other=0) - tl.load(g + sel2 + 1, mask=every, other=0), axis=0)
            n_out = above1 + above2
            need = K - n_out
            hist = tl.zeros([256], dtype=tl.int32)
            for c0 in range(0, n_cand, BLOCK):
                ok, j, key = _cand_keys(row, cand, c0, n_cand, BLOCK)
                hist += tl.histogram((key >> 8) & 0xFF, 256, mask=ok)
            sel3, above = _pick_bin(hist, need, 256)
            need -= above
            hist = tl.zeros([256], dtype=tl.int32)
            for c0 in range(0, n_cand, BLOCK):
                ok, j, key = _cand_keys(row, cand, c0, n_cand, BLOCK)
                hist += tl.histogram(key & 0xFF, 256, mask=ok & (((key >> 8) & 0xFF) == sel3))
            sel4, above = _pick_bin(hist, need, 256)
            need -= above
            low = (sel3 << 8) | sel4
            # Candidates above the threshold key, then the first `need` equal to it (lowest positions).
            n_eq = 0
            for c0 in range(0, n_cand, BLOCK):
                ok, j, key = _cand_keys(row, cand, c0, n_cand, BLOCK)
                gt = (((key & 0xFFFF) > low) & ok).to(tl.int32)
                eq = (((key & 0xFFFF) == low) & ok).to(tl.int32)
                eq_rank = n_eq + tl.cumsum(eq, axis=0) - eq
                tl.store(out + n_out + tl.cumsum(gt, axis=0) - gt, j, mask=gt != 0)
                n_out += tl.sum(gt, axis=0)
                n_eq += tl.sum(eq, axis=0)
                tl.store(out + (K - need) + eq_rank, j, mask=(eq != 0) & (eq_rank < need))


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    query_start: torch.Tensor,
    positions: torch.Tensor,
    max_new: int,
    max_context: int,
    topk: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-`topk` positions per query token.

    q: [tokens, index_n_heads, D] (bf16/fp32); weights: [tokens, index_n_heads] fp32 (already times
    index_n_heads**-0.5); k: index-K pool view [pages, page, D]; k_scale: [pages, page] fp32 or None;
    page_table: [batch, max_pages] int32; query_start: [batch + 1] int32; positions: [tokens] int.
    Returns [tokens, topk] int32: positions in the sequence (in no particular order), -1 = unused.
    Prefill steps with many tokens are scored in row chunks so the fp32 score buffer stays bounded.
    """
    T = q.shape[0]
    out = out if out is not None else torch.empty(T, topk, dtype=torch.int32, device=q.device)
    if T == 0:
        return out
    width = triton.cdiv(max_context, 16) * 16
    rows = max(1, min(T, _SCORE_BUFFER_BYTES // (width * 4)))
    scores = torch.empty(rows, width, dtype=torch.float32, device=q.device)
    scratch = torch.empty(rows, width, dtype=torch.int32, device=q.device)
    for t_begin in range(0, T, rows):
        t_end = min(T, t_begin + rows)
        indexer_scores(
            q, weights, k, k_scale, page_table, query_start, positions, max_new, max_context, scores, t_begin, t_end
        )
        topk_from_scores(scores, positions, topk, out, scratch, t_begin, t_end)
    return out


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 5  # Triton 3.6 double-buffers the key tile only from 5 stages (the page lookup takes one)
    tokens_per_tile: int = 0  # prefill: new tokens sharing one key tile (0: 64 query rows per tile)
    programs_per_sm: int = 8  # tiles are grouped into runs until the grid has about this many programs per SM


def indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    query_start: torch.Tensor,
    positions: torch.Tensor,
    max_new: int,
    max_context: int,
    scores: torch.Tensor,
    t_begin: int = 0,
    t_end: int | None = None,
    config: ScoresConfig | None = None,
) -> torch.Tensor:
    """Scores of tokens [t_begin, t_end) into scores[0 : t_end - t_begin, :max_context] (fp32); entries past a
    token's own position are left unwritten."""
    T, HI, D = q.shape
    t_end = T if t_end is None else t_end
    _check(q, weights, k, page_table)
    if scores.shape[0] < t_end - t_begin or scores.shape[1] < max_context or scores.stride(1) != 1:
        raise ValueError(
            f"indexer_scores: score buffer {tuple(scores.shape)} is smaller than "
            f"[{t_end - t_begin}, {max_context}] or has strided rows"
        )
    cfg = config or ScoresConfig()
    page = k.shape[1]
    block_hi = max(16, triton.next_power_of_2(HI))
    block_t = 1 if max_new == 1 else (cfg.tokens_per_tile or max(1, 64 // block_hi))
    block_n = cfg.block_n
    n_tiles = triton.cdiv(max_context, block_n)
    t_tiles = triton.cdiv(max_new, block_t)
    batch = page_table.shape[0]
    tiles_per_prog = max(1, min(16, batch * t_tiles * n_tiles // (cfg.programs_per_sm * sm_count(q.device))))
    fp8 = k_scale is not None
    ks = k_scale if fp8 else k
    ks_stride = k_scale.stride() if fp8 else (0, 0)
    ieee = k.dtype == torch.float32
    grid = (batch, t_tiles, triton.cdiv(n_tiles, tiles_per_prog))
    _scores_kernel[grid](
        q,
        weights,
        k,
        ks,
        page_table,
        query_start,
        positions,
        scores,
        q.stride(0),
        q.stride(1),
        weights.stride(0),
        k.stride(0),
        k.stride(1),
        *ks_stride,
        page_table.stride(0),
        scores.stride(0),
        t_begin,
        t_end,
        D**-0.5,
        tiles_per_prog,
        HI=HI,
        D=D,
        PAGE=page,
        BLOCK_HI=block_hi,
        BLOCK_D=triton.next_power_of_2(D),
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        FP8=fp8,
        IEEE=ieee,
        F32DOT=ieee or INTERPRET,
        VEC_Q=vec(q, q.stride(0), q.stride(1)),
        VEC_K=vec(k, k.stride(0), k.stride(1)),
        VEC_O=vec(scores, scores.stride(0)),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return scores


def topk_from_scores(
    scores: torch.Tensor,
    positions: torch.Tensor,
    topk: int,
    out: torch.Tensor,
    scratch: torch.Tensor,
    t_begin: int = 0,
    t_end: int | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """Rows [t_begin, t_end) of `out` [tokens, topk] from score rows [0, t_end - t_begin) of `scores`; row r
    considers positions 0..positions[t_begin + r] (< scores.shape[1]). scratch: int32, at least the shape of the
    rows used (the candidate lists). chunks: programs per row (default: enough to fill the device)."""
    t_end = positions.shape[0] if t_end is None else t_end
    rows = t_end - t_begin
    if rows <= 0:
        return out
    if scratch.dtype != torch.int32 or scratch.shape[0] < rows or scratch.shape[1] < scores.shape[1]:
        raise ValueError(
            f"topk_from_scores: scratch {tuple(scratch.shape)} {scratch.dtype} must be int32 and "
            f"cover scores {tuple(scores.shape)}"
        )
    if scores.stride(1) != 1 or out.stride(1) != 1 or scratch.stride(1) != 1:
        raise ValueError("topk_from_scores: scores, out and scratch need contiguous rows")
    width = scores.shape[1]
    if chunks is None:
        chunks = triton.cdiv(_TOPK_PROGRAMS_PER_SM * sm_count(scores.device), rows)
    chunks = max(1, min(chunks, _TOPK_MAX_CHUNKS, triton.cdiv(width, _TOPK_MIN_CHUNK)))
    chunk = triton.cdiv(width, chunks)
    chunks = triton.cdiv(width, chunk)
    # Per row: two 256-bin histograms and a done counter (zeroed); per row and chunk: the level-2 counts.
    work = torch.zeros(rows * _TOPK_WORK_ROW, dtype=torch.int32, device=scores.device)
    counts = torch.empty(rows, chunks * 272, dtype=torch.int32, device=scores.device)
    common = dict(K=topk, BLOCK=_TOPK_BLOCK, WORK_ROW=_TOPK_WORK_ROW, num_warps=4)
    for level in (1, 2):
        _topk_hist_kernel[(rows, chunks)](
            scores, positions, work, counts, scores.stride(0), counts.stride(0), t_begin, chunk, LEVEL=level, **common
        )
    _topk_select_kernel[(rows, chunks)](
        scores,
        positions,
        out,
        scratch,
        work,
        counts,
        scores.stride(0),
        out.stride(0),
        scratch.stride(0),
        counts.stride(0),
        t_begin,
        chunk,
        BLOCK_K=min(1024, triton.next_power_of_2(topk)),
        MAX_CHUNKS=_TOPK_MAX_CHUNKS,
        **common,
    )
    return out


def _check(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, page_table: torch.Tensor) -> None:
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"indexer: q and k need contiguous head dims (strides {q.stride()}, {k.stride()})")
    if weights.dtype != torch.float32 or weights.stride(1) != 1:
        raise ValueError(
            f"indexer: weights must be fp32 [tokens, heads] with contiguous rows, got {weights.dtype} "
            f"strides {weights.stride()}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"indexer: q head dim {q.shape[2]} != index-K dim {k.shape[2]}")
    if page_table.dtype != torch.int32 or page_table.stride(1) != 1:
        raise ValueError(f"indexer: page_table must be int32 with contiguous rows, got {page_table.dtype}")


# -- torch reference ------------------------------------------------------------------------------------------


def indexer_scores_reference(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q: [n, heads, D], weights: [n, heads], keys: [L, D] (dequantised) -> scores [n, L] fp32."""
    s = torch.einsum("nhd,ld->nhl", q.float(), keys.float()) * q.shape[-1] ** -0.5
    return torch.einsum("nh,nhl->nl", weights.float(), torch.relu(s))


def indexer_topk_reference(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, topk: int
) -> torch.Tensor:
    """One sequence: keys [L, D], q_pos [n] -> [n, topk] int32 (sorted by score, -1 = unused)."""
    scores = indexer_scores_reference(q, weights, keys)
    causal = torch.arange(keys.shape[0], device=keys.device)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    k = min(topk, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1)
    idx = torch.where(torch.isinf(vals), -1, idx).to(torch.int32)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], topk - k), -1)], dim=1)
    return idx
