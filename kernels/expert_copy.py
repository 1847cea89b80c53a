"""Expert-cache copies on the GPU without a host round trip: SM loads from pinned host memory read through UVA.

Three Triton kernels and their plain-torch references:

- `copy_experts`: many programs. Copies the experts on a `SlotTables` copy list (written by kernels/expert_claim.py's
  `claim_slots`) from the host slab into their slots; the count is read on the device, so neither kernel needs a
  host sync and both can be captured in a CUDA graph.
- `copy_expert_columns`: many programs. Copies the first `cols` of N intermediate columns of one expert (id and
  cols read on the device, from the miss split) into a one-expert scratch: each section is seen as rows of `stride`
  bytes (2 halves for w13 and its scales and zero points: gate rows, then up rows; K rows for w2 and its), of
  which the first stride * cols / N bytes belong to those columns; one section's rest of each row (w13's scales, or
  w13 itself without scales) is zeroed so the other columns compute 0 (the GPU's part of a column split).
- `upload_no_ce`: copies a small pinned buffer to the device by SM loads, so per-step metadata
  never queues behind bulk copies on the copy engine.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moed.kernels.expert_claim import SlotTables

# ---------------------------------------------------------------------------------------------- copy


@triton.jit
def _copy_section(n, copy_e_ptr, copy_s_ptr, src, dst, nbytes, pid, nprog, CHUNK: tl.constexpr):
    chunks = tl.cdiv(nbytes, CHUNK)
    for c in range(pid, n * chunks, nprog):
        j = c // chunks
        off = (c % chunks) * CHUNK + tl.arange(0, CHUNK)
        e = tl.load(copy_e_ptr + j).to(tl.int64)
        s = tl.load(copy_s_ptr + j).to(tl.int64)
        m = off < nbytes
        v = tl.load(src + e * nbytes + off, mask=m)
        tl.store(dst + s * nbytes + off, v, mask=m)


@triton.jit
def _copy_kernel(
    n_copy_ptr,
    copy_e_ptr,
    copy_s_ptr,
    src0,
    dst0,
    bytes0,
    src1,
    dst1,
    bytes1,
    src2,
    dst2,
    bytes2,
    src3,
    dst3,
    bytes3,
    src4,
    dst4,
    bytes4,
    src5,
    dst5,
    bytes5,
    NSEC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n = tl.load(n_copy_ptr)
    _copy_section(n, copy_e_ptr, copy_s_ptr, src0, dst0, bytes0, pid, nprog, CHUNK)
    _copy_section(n, copy_e_ptr, copy_s_ptr, src1, dst1, bytes1, pid, nprog, CHUNK)
    if NSEC > 2:
        _copy_section(n, copy_e_ptr, copy_s_ptr, src2, dst2, bytes2, pid, nprog, CHUNK)
        _copy_section(n, copy_e_ptr, copy_s_ptr, src3, dst3, bytes3, pid, nprog, CHUNK)
    if NSEC > 4:
        _copy_section(n, copy_e_ptr, copy_s_ptr, src4, dst4, bytes4, pid, nprog, CHUNK)
        _copy_section(n, copy_e_ptr, copy_s_ptr, src5, dst5, bytes5, pid, nprog, CHUNK)


def copy_experts(
    t: SlotTables, src: list[torch.Tensor], dst: list[torch.Tensor], num_programs: int = 32, chunk: int = 8192
) -> None:
    """Copy the experts of `t`'s copy list: section i of expert e (`src[i]`: [E, bytes_i] uint8, pinned
    host memory read through UVA) into slot s (`dst[i]`: [S, bytes_i] uint8 on the device)."""
    if len(src) != len(dst) or len(src) not in (2, 4, 6):
        raise ValueError(
            f"copy_experts takes 2, 4 or 6 sections (bf16, FP8 or int4), got {len(src)} src, {len(dst)} dst"
        )
    args = []
    for s, d in zip(src, dst):
        if s.dtype != torch.uint8 or d.dtype != torch.uint8 or s.shape[1] != d.shape[1]:
            raise ValueError(
                f"section views must be uint8 with equal row bytes, got {s.dtype}{list(s.shape)} -> "
                f"{d.dtype}{list(d.shape)}"
            )
        args += [s, d, s.shape[1]]
    while len(args) < 18:
        args += [src[0], dst[0], 0]
    if dst[0].device.type == "cpu":
        num_programs = min(num_programs, 2)  # the interpreter pays per program, not per byte
    _copy_kernel[(num_programs,)](t.n_copy, t.copy_expert, t.copy_slot, *args, NSEC=len(src), CHUNK=chunk, num_warps=8)


def copy_experts_reference(t: SlotTables, src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    n = int(t.n_copy.item())
    for j in range(n):
        e, s = int(t.copy_expert[j]), int(t.copy_slot[j])
        for a, b in zip(src, dst):
            b[s].copy_(a[e])


# ---------------------------------------------------------------------------------------------- column slice


@triton.jit
def _copy_cols_section(
    e, cols, N, src, dst, n_rows, stride, zero_tail, pid, nprog, CHUNK: tl.constexpr, VEC: tl.constexpr
):
    width = cols.to(tl.int64) * stride // N
    span = tl.where(zero_tail != 0, stride, width)
    chunks = tl.cdiv(span, CHUNK)
    total = tl.where(e >= 0, n_rows * chunks, 0)
    for c in range(pid, total, nprog):
        base = (c // chunks) * stride
        off = (c % chunks) * CHUNK + tl.arange(0, CHUNK)
        # width and span are multiples of VEC: masks constant over VEC bytes let the copies be VEC bytes wide (the
        # widths come from the device, so Triton cannot prove that itself and would move single bytes)
        at = (off // VEC) * VEC
        v = tl.load(src + e * n_rows * stride + base + off, mask=at < width, other=0)
        tl.store(dst + base + off, v, mask=at < span)  # past width: zeros (zero_tail only)


@triton.jit
def _copy_cols_kernel(
    info_ptr,
    N,
    src0,
    dst0,
    rows0,
    stride0,
    zero0,
    src1,
    dst1,
    rows1,
    stride1,
    zero1,
    src2,
    dst2,
    rows2,
    stride2,
    zero2,
    src3,
    dst3,
    rows3,
    stride3,
    zero3,
    src4,
    dst4,
    rows4,
    stride4,
    zero4,
    src5,
    dst5,
    rows5,
    stride5,
    zero5,
    NSEC: tl.constexpr,
    CH0: tl.constexpr,
    CH1: tl.constexpr,
    CH2: tl.constexpr,
    CH3: tl.constexpr,
    CH4: tl.constexpr,
    CH5: tl.constexpr,
    V0: tl.constexpr,
    V1: tl.constexpr,
    V2: tl.constexpr,
    V3: tl.constexpr,
    V4: tl.constexpr,
    V5: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    e = tl.load(info_ptr).to(tl.int64)
    cols = tl.load(info_ptr + 1)
    _copy_cols_section(e, cols, N, src0, dst0, rows0, stride0, zero0, pid, nprog, CH0, V0)
    _copy_cols_section(e, cols, N, src1, dst1, rows1, stride1, zero1, pid, nprog, CH1, V1)
    if NSEC > 2:
        _copy_cols_section(e, cols, N, src2, dst2, rows2, stride2, zero2, pid, nprog, CH2, V2)
        _copy_cols_section(e, cols, N, src3, dst3, rows3, stride3, zero3, pid, nprog, CH3, V3)
    if NSEC > 4:
        _copy_cols_section(e, cols, N, src4, dst4, rows4, stride4, zero4, pid, nprog, CH4, V4)
        _copy_cols_section(e, cols, N, src5, dst5, rows5, stride5, zero5, pid, nprog, CH5, V5)


def _check_columns(src: list[torch.Tensor], dst: list[torch.Tensor], rows: list[int], zero: list[bool]) -> None:
    if not len(src) == len(dst) == len(rows) == len(zero) or len(src) not in (2, 4, 6):
        raise ValueError(f"copy_expert_columns takes 2, 4 or 6 sections, got {len(src)} src, {len(dst)} dst")
    for s, d, r in zip(src, dst, rows):
        if s.dtype != torch.uint8 or d.dtype != torch.uint8 or d.shape[0] != 1 or s.shape[1] != d.shape[1]:
            raise ValueError(
                f"sections must be uint8 [E, bytes] -> [1, bytes], got {s.dtype}{list(s.shape)} -> "
                f"{d.dtype}{list(d.shape)}"
            )
        if r < 1 or s.shape[1] % r:
            raise ValueError(f"a section of {s.shape[1]} bytes does not split into {r} rows")


def copy_expert_columns(
    split_info: torch.Tensor,
    src: list[torch.Tensor],
    dst: list[torch.Tensor],
    rows: list[int],
    zero: list[bool],
    N: int,
    granule: int = 1,
    num_programs: int = 32,
) -> None:
    """Copy the intermediate columns [0, cols) of expert e (split_info [2] int32 on the device: e, or -1 for
    nothing, and cols) from `src[i]` ([E, bytes_i] uint8, host memory read through UVA) into `dst[i]` ([1,
    bytes_i] uint8 on the device), section i seen as `rows[i]` rows of bytes_i / rows[i] bytes, of which the first
    bytes * cols / N are those columns'; `zero[i]`: write zeros over the rest of each row. cols must be a multiple
    of `granule` (the layout's column granule, `offload.cpu_experts.column_granule`), which must make every width
    whole; the copies are as wide (up to 16 bytes) as that granule's widths and the rows allow. No host sync."""
    _check_columns(src, dst, rows, zero)
    args: list = []
    chunks, vecs = [], []
    for s, d, r, z in zip(src, dst, rows, zero):
        stride = s.shape[1] // r
        if granule > 1 and stride * granule % N:
            raise ValueError(f"a granule of {granule} of {N} columns is not whole bytes of a {stride}-byte row")
        unit = stride * granule // N if granule > 1 else 1
        args += [s, d, r, stride, int(z)]
        chunks.append(min(8192, triton.next_power_of_2(stride)))
        vecs.append(math.gcd(stride, unit, 16))
    while len(args) < 30:
        args += [src[0], dst[0], 1, 0, 0]
        chunks.append(16)
        vecs.append(1)
    if dst[0].device.type == "cpu":
        num_programs = min(num_programs, 2)  # the interpreter pays per program, not per byte
    consts = {f"CH{i}": c for i, c in enumerate(chunks)} | {f"V{i}": v for i, v in enumerate(vecs)}
    _copy_cols_kernel[(num_programs,)](split_info, N, *args, NSEC=len(src), **consts, num_warps=4)


def copy_expert_columns_reference(
    split_info: torch.Tensor,
    src: list[torch.Tensor],
    dst: list[torch.Tensor],
    rows: list[int],
    zero: list[bool],
    N: int,
) -> None:
    """Plain-torch `copy_expert_columns` (reads split_info on the host)."""
    _check_columns(src, dst, rows, zero)
    e, cols = (int(v) for v in split_info.tolist()[:2])
    if e < 0:
        return
    for s, d, r, z in zip(src, dst, rows, zero):
        stride = s.shape[1] // r
        width = stride * cols // N
        a, b = s[e].view(r, stride), d[0].view(r, stride)
        b[:, :width].copy_(a[:, :width])
        if z:
            b[:, width:].zero_()


# ---------------------------------------------------------------------------------------------- small upload


@triton.jit
def _upload_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


def upload_no_ce(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src for a small pinned host tensor, by SM loads through UVA (never the copy engine)."""
    if src.numel() != dst.numel() or src.dtype != dst.dtype:
        raise ValueError(f"upload_no_ce: {src.dtype}{list(src.shape)} -> {dst.dtype}{list(dst.shape)} mismatch")
    n = src.numel()
    BLOCK = 1024
    _upload_kernel[(triton.cdiv(n, BLOCK),)](src, dst, n, BLOCK=BLOCK)
