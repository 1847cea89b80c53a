"""Index-K gather: copy every sequence's rows out of a paged pool into one ragged, contiguous buffer.

`src` is a pool view [pages, page_size, D] (e4m3, bf16 or fp32; rows may be strided, elements
contiguous) with an optional per-row fp32 `scale` [pages, page_size]; row p of sequence b lives at
`src[page_table[b, p // page_size], p % page_size]`. The output row `out_start[b] + p` receives it,
dequantised (`src * scale`) into `out`'s dtype, for p < seq_lens[b].

Used for the index keys and, with the same kernel, for the latents that the dense prefill path
expands. The page-table row stride and every per-batch size are runtime arguments that Triton is
told not to specialise (`do_not_specialize`): batches of any shape reuse one compiled kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moed.kernels.launch import vec
from moed.kernels.tl_helpers import cast_rne


@triton.jit(do_not_specialize=["stride_pt", "stride_sp", "stride_so", "stride_ss", "stride_sr", "stride_out"])
def _gather_kernel(
    src_ptr,
    scale_ptr,
    page_table_ptr,
    seq_lens_ptr,
    out_start_ptr,
    out_ptr,
    stride_sp,
    stride_so,
    stride_ss,
    stride_sr,
    stride_pt,
    stride_out,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    INTERP: tl.constexpr,
    VEC_S: tl.constexpr,
    VEC_O: tl.constexpr,
):
    # VEC_*: the row strides (elements) are multiples of these, so rows move as 16-byte vectors.
    b = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    length = tl.load(seq_lens_ptr + b)
    if n0 < length:
        j = n0 + tl.arange(0, BLOCK_N)
        jmask = j < length
        d = tl.arange(0, BLOCK_D)
        page = tl.load(page_table_ptr + b * stride_pt + j // PAGE, mask=jmask, other=0).to(tl.int64)
        row = tl.multiple_of(page * stride_sp + (j % PAGE) * stride_so, VEC_S)
        if BLOCK_D == D:
            m2 = jmask[:, None] & (d[None, :] < BLOCK_D)
        else:
            m2 = jmask[:, None] & (d[None, :] < D)
        x = tl.load(src_ptr + row[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + page * stride_ss + (j % PAGE) * stride_sr, mask=jmask, other=0.0)
            x = x * s[:, None]
        dst = tl.multiple_of((tl.load(out_start_ptr + b) + j).to(tl.int64) * stride_out, VEC_O)
        tl.store(out_ptr + dst[:, None] + d[None, :], cast_rne(x, out_ptr.dtype.element_ty, INTERP), mask=m2)


def gather_paged_rows(
    src: torch.Tensor,
    scale: torch.Tensor | None,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out_start: torch.Tensor,
    max_len: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """src: [pages, page, D]; scale: [pages, page] fp32 or None; page_table: [batch, max_pages] int32;
    seq_lens: [batch] int32; out_start: [batch] int32; out: [rows, D] -> out (rows >= sum of seq_lens).

    `max_len` is a host bound on seq_lens that sizes the grid; lengths are read on the device.
    """
    _, page, D = src.shape
    if src.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError(
            f"gather_paged_rows: rows must have contiguous elements (src strides {src.stride()}, "
            f"out strides {out.stride()})"
        )
    if out.shape[1] != D:
        raise ValueError(f"gather_paged_rows: out has {out.shape[1]} columns, the pool rows have {D}")
    if page_table.dtype != torch.int32 or page_table.stride(1) != 1:
        raise ValueError(
            f"page_table must be int32 with contiguous rows, got {page_table.dtype} strides {page_table.stride()}"
        )
    batch = page_table.shape[0]
    if batch == 0 or max_len <= 0:
        return out
    block_n = 32
    s = scale if scale is not None else src  # unused pointer when there is no scale
    ss = scale.stride() if scale is not None else (0, 0)
    grid = (batch, triton.cdiv(max_len, block_n))
    _gather_kernel[grid](
        src,
        s,
        page_table,
        seq_lens,
        out_start,
        out,
        src.stride(0),
        src.stride(1),
        ss[0],
        ss[1],
        page_table.stride(0),
        out.stride(0),
        D=D,
        PAGE=page,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(D),
        HAS_SCALE=scale is not None,
        INTERP=os.environ.get("TRITON_INTERPRET") == "1",
        VEC_S=vec(src, src.stride(0), src.stride(1)),
        VEC_O=vec(out, out.stride(0)),
    )
    return out


def gather_paged_rows_reference(
    src: torch.Tensor,
    scale: torch.Tensor | None,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out_start: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """The same gather in plain torch (host loop over sequences)."""
    page = src.shape[1]
    for b in range(page_table.shape[0]):
        n = int(seq_lens[b])
        pos = torch.arange(n, device=src.device)
        pg = page_table[b, pos // page].long()
        x = src[pg, pos % page].float()
        if scale is not None:
            x = x * scale[pg, pos % page][:, None]
        o = int(out_start[b])
        out[o : o + n] = x.to(out.dtype)
    return out
