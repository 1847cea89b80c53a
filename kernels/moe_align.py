"""Token -> expert sort and block alignment for the fused-MoE GEMMs (Triton, no host sync), and its torch twin.

Input: `topk_ids: int32 [M, k]` (expert ids in [0, num_ids); id E may be a fused shared expert) and
`expert_to_slot: int32 [num_ids]` on the device. Flat assignment index `f = t * k + j`, `T = M * k`.

Output buffers (all int32, on the device, sized from shapes alone so nothing waits for the GPU):
- `sorted_ids [max_padded]`: flat indices grouped by expert id in ascending id order; each expert's run is
  padded up to a multiple of `block_m` with the value `T` (a row the GEMMs skip). Positions past the used
  length also hold `T`. `max_padded = cdiv(T + min(T, num_ids) * (block_m - 1), block_m) * block_m`.
- `block_slot [max_padded / block_m]`: the weight slot (`expert_to_slot[id]`) of each block of `block_m`
  rows, -1 past the used length.
- `num_padded [1]`: the used length (a multiple of `block_m`).
Ids outside [0, num_ids) are dropped (never computed) instead of read out of bounds; the caller must
guarantee every routed id has a slot.

Order inside one expert's run: by flat index when one program does everything (T <= SINGLE_PROGRAM_MAX);
for larger T, chunks of 128 assignments claim their places with atomics, so the run holds the same set in
an order that may vary between calls. Every GEMM row depends only on its own data, so results do not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

CHUNK = 128  # assignments per program; the rank inside a chunk is a CHUNK x CHUNK comparison
SINGLE_PROGRAM_MAX = 4 * CHUNK  # up to this many assignments one launch does everything


class MoEAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # int32 [max_padded]
    block_slot: torch.Tensor  # int32 [max_padded // block_m]
    num_padded: torch.Tensor  # int32 [1]
    block_m: int


def max_padded_rows(num_assignments: int, num_ids: int, block_m: int) -> int:
    rows = num_assignments + min(num_assignments, num_ids) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


@triton.jit
def _buckets(ids_ptr, offs, T, num_ids):
    """Expert id of each flat assignment; invalid ids and lanes past T go to the spare bin `num_ids`."""
    ids = tl.load(ids_ptr + offs, mask=offs < T, other=-1)
    valid = (offs < T) & (ids >= 0) & (ids < num_ids)
    return tl.where(valid, ids, num_ids), valid


@triton.jit
def _rank_in_chunk(bucket, CHUNK: tl.constexpr):
    """Number of earlier lanes of the chunk with the same bucket."""
    lane = tl.arange(0, CHUNK)
    same = (bucket[:, None] == bucket[None, :]) & (lane[None, :] < lane[:, None])
    return tl.sum(same.to(tl.int32), axis=1)


@triton.jit
def _offsets_and_blocks(
    counts,
    e2s_ptr,
    cursor_ptr,
    block_slot_ptr,
    num_padded_ptr,
    num_ids,
    max_blocks,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """counts [NUM_BINS] per expert id -> cursor[id] = start of its run; block_slot; num_padded."""
    bins = tl.arange(0, NUM_BINS)
    counts = tl.where(bins < num_ids, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(cursor_ptr + bins, end - padded)
    tl.store(num_padded_ptr, total)
    for b0 in range(0, max_blocks, 64):
        blocks = b0 + tl.arange(0, 64)
        first_row = blocks * BLOCK_M
        # The block's expert is the number of runs that end at or before its first row.
        expert = tl.sum((end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        used = first_row < total
        slot = tl.load(e2s_ptr + expert, mask=used, other=-1)
        tl.store(block_slot_ptr + blocks, tl.where(used, slot, -1), mask=blocks < max_blocks)


@triton.jit
def _fill(ptr, start, stop, value):
    for i in range(start, stop, 256):
        offs = i + tl.arange(0, 256)
        tl.store(ptr + offs, tl.zeros((256,), tl.int32) + value, mask=offs < stop)


# Sizes that change with the batch are not specialised on, so a batch size never triggers a recompile.
@triton.jit(do_not_specialize=["T", "max_padded", "max_blocks"])
def _align_single_program_kernel(
    ids_ptr,
    e2s_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    cursor_ptr,
    T,
    num_ids,
    max_padded,
    max_blocks,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    counts = tl.zeros((NUM_BINS,), tl.int32)
    for c0 in range(0, T, CHUNK):
        bucket, _ = _buckets(ids_ptr, c0 + tl.arange(0, CHUNK), T, num_ids)
        counts += tl.histogram(bucket, NUM_BINS)
    _offsets_and_blocks(
        counts, e2s_ptr, cursor_ptr, block_slot_ptr, num_padded_ptr, num_ids, max_blocks, BLOCK_M, NUM_BINS
    )
    _fill(sorted_ptr, 0, max_padded, T)
    tl.debug_barrier()  # the fill and the cursor must land before the scatter below reads/overwrites them
    bins = tl.arange(0, NUM_BINS)
    for c0 in range(0, T, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        bucket, valid = _buckets(ids_ptr, offs, T, num_ids)
        base = tl.load(cursor_ptr + bucket, mask=valid, other=0)
        tl.store(sorted_ptr + base + _rank_in_chunk(bucket, CHUNK), offs, mask=valid)
        tl.debug_barrier()
        tl.store(cursor_ptr + bins, tl.load(cursor_ptr + bins) + tl.histogram(bucket, NUM_BINS))
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "max_padded", "fill_per_program"])
def _align_count_kernel(
    ids_ptr,
    totals_ptr,
    chunk_base_ptr,
    sorted_ptr,
    T,
    num_ids,
    max_padded,
    fill_per_program,
    CHUNK: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    pid = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    bucket, _ = _buckets(ids_ptr, pid * CHUNK + tl.arange(0, CHUNK), T, num_ids)
    # The running total before this chunk's add is where the chunk's rows start inside each run.
    before = tl.atomic_add(totals_ptr + bins, tl.histogram(bucket, NUM_BINS))
    tl.store(chunk_base_ptr + pid * NUM_BINS + bins, before)
    start = pid * fill_per_program
    _fill(sorted_ptr, start, tl.minimum(start + fill_per_program, max_padded), T)


@triton.jit(do_not_specialize=["max_blocks"])
def _align_offsets_kernel(
    totals_ptr,
    e2s_ptr,
    cursor_ptr,
    block_slot_ptr,
    num_padded_ptr,
    num_ids,
    max_blocks,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    counts = tl.load(totals_ptr + tl.arange(0, NUM_BINS))
    _offsets_and_blocks(
        counts, e2s_ptr, cursor_ptr, block_slot_ptr, num_padded_ptr, num_ids, max_blocks, BLOCK_M, NUM_BINS
    )


@triton.jit(do_not_specialize=["T"])
def _align_scatter_kernel(
    ids_ptr, cursor_ptr, chunk_base_ptr, sorted_ptr, T, num_ids, CHUNK: tl.constexpr, NUM_BINS: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    bucket, valid = _buckets(ids_ptr, offs, T, num_ids)
    base = tl.load(cursor_ptr + bucket, mask=valid, other=0)
    base += tl.load(chunk_base_ptr + pid * NUM_BINS + bucket, mask=valid, other=0)
    tl.store(sorted_ptr + base + _rank_in_chunk(bucket, CHUNK), offs, mask=valid)


def moe_align_block_size(topk_ids: torch.Tensor, expert_to_slot: torch.Tensor, block_m: int) -> MoEAlignment:
    """topk_ids int32 [M, k], expert_to_slot int32 [num_ids] -> MoEAlignment (see the module docstring)."""
    _check_inputs(topk_ids, expert_to_slot, block_m)
    device = topk_ids.device
    T, num_ids = topk_ids.numel(), expert_to_slot.numel()
    max_padded = max_padded_rows(T, num_ids, block_m)
    max_blocks = max_padded // block_m
    num_bins = triton.next_power_of_2(num_ids + 1)  # + the spare bin for dropped ids
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_slot = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    if T == 0:
        num_padded.zero_()
        return MoEAlignment(sorted_ids, block_slot, num_padded, block_m)
    ids = topk_ids.reshape(-1)
    cursor = torch.empty(num_bins, dtype=torch.int32, device=device)
    if T <= SINGLE_PROGRAM_MAX:
        _align_single_program_kernel[(1,)](
            ids,
            expert_to_slot,
            sorted_ids,
            block_slot,
            num_padded,
            cursor,
            T,
            num_ids,
            max_padded,
            max_blocks,
            BLOCK_M=block_m,
            CHUNK=CHUNK,
            NUM_BINS=num_bins,
            num_warps=4,
        )
        return MoEAlignment(sorted_ids, block_slot, num_padded, block_m)
    chunks = triton.cdiv(T, CHUNK)
    totals = torch.zeros(num_bins, dtype=torch.int32, device=device)
    chunk_base = torch.empty((chunks, num_bins), dtype=torch.int32, device=device)
    _align_count_kernel[(chunks,)](
        ids,
        totals,
        chunk_base,
        sorted_ids,
        T,
        num_ids,
        max_padded,
        triton.cdiv(max_padded, chunks),
        CHUNK=CHUNK,
        NUM_BINS=num_bins,
        num_warps=4,
    )
    _align_offsets_kernel[(1,)](
        totals,
        expert_to_slot,
        cursor,
        block_slot,
        num_padded,
        num_ids,
        max_blocks,
        BLOCK_M=block_m,
        NUM_BINS=num_bins,
        num_warps=8,
    )
    _align_scatter_kernel[(chunks,)](
        ids, cursor, chunk_base, sorted_ids, T, num_ids, CHUNK=CHUNK, NUM_BINS=num_bins, num_warps=4
    )
    return MoEAlignment(sorted_ids, block_slot, num_padded, block_m)


def _check_inputs(topk_ids: torch.Tensor, expert_to_slot: torch.Tensor, block_m: int) -> None:
    if topk_ids.dtype != torch.int32 or topk_ids.dim() != 2:
        raise ValueError(
            f"moe_align_block_size: topk_ids must be int32 [M, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    if expert_to_slot.dtype != torch.int32 or expert_to_slot.dim() != 1 or expert_to_slot.numel() == 0:
        raise ValueError(
            f"moe_align_block_size: expert_to_slot must be a non-empty int32 [num_ids] table, got "
            f"{expert_to_slot.dtype} {tuple(expert_to_slot.shape)}"
        )
    if expert_to_slot.device != topk_ids.device:
        raise ValueError(
            f"moe_align_block_size: expert_to_slot is on {expert_to_slot.device} but topk_ids on "
            f"{topk_ids.device}; the table must live on the device (it is read by the kernel)"
        )
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: block_m {block_m} must be a power of two >= 16")
    if not topk_ids.is_contiguous():
        raise ValueError("moe_align_block_size: topk_ids must be contiguous")


def moe_align_block_size_reference(topk_ids: torch.Tensor, expert_to_slot: torch.Tensor, block_m: int) -> MoEAlignment:
    """Plain-torch twin: same buffers, runs in flat-index order inside each expert."""
    _check_inputs(topk_ids, expert_to_slot, block_m)
    T, num_ids = topk_ids.numel(), expert_to_slot.numel()
    max_padded = max_padded_rows(T, num_ids, block_m)
    ids = topk_ids.reshape(-1).long().cpu()
    table = expert_to_slot.cpu()
    sorted_ids = torch.full((max_padded,), T, dtype=torch.int32)
    block_slot = torch.full((max_padded // block_m,), -1, dtype=torch.int32)
    pos = 0
    for e in range(num_ids):
        rows = torch.nonzero(ids == e).flatten().to(torch.int32)
        if rows.numel() == 0:
            continue
        sorted_ids[pos : pos + rows.numel()] = rows
        n_blocks = -(-rows.numel() // block_m)
        block_slot[pos // block_m : pos // block_m + n_blocks] = table[e]
        pos += n_blocks * block_m
    dev = topk_ids.device
    return MoEAlignment(
        sorted_ids.to(dev), block_slot.to(dev), torch.tensor([pos], dtype=torch.int32, device=dev), block_m
    )
