"""The hybrid miss service's split, decided on the device: which of a step's missing experts the CPU computes.

`split_misses` (one Triton program) runs right after routing, before the claim kernel. It counts the step's
misses (routed experts with no slot), looks up how many the CPU takes for that many misses in a table the
host keeps current from measured rates (`cpu_counts[n_miss]`, host memory read through UVA, so a new table
needs no upload and applies to captured CUDA graphs too), and gives the CPU the least-used ones (decayed
frequency, then id: only copied experts enter the cache, so the ones least likely to come back stay out).
It writes the job into the CPU's mailbox (host memory, through UVA): the header, the CPU's experts in the
order their routes are grouped, every route's id and weight, and the step's activations in fp32; and on the
device the flags that make the claim kernel skip the CPU's experts and the GPU's routing weights (0 on the
CPU's routes). No host sync: the host never reads any of it.

Column split (optional, `split_cols` given): a second table row gives, per miss count, how many intermediate columns
of one more expert (the next least used after the CPU's) the GPU computes, 0 for none. That expert goes last in the
CPU's list with header word 6 = that column count (the CPU computes the columns from there on); exclude = 2 keeps it
out of the claim (it never enters the cache: its slot would hold part of it), its routes keep their GPU weights, and
`split_info` [2] (expert or -1, columns) and `split_ids` [R] (0 on its routes, 1 elsewhere: ids for a one-expert
table) tell the partial copy and the GPU's pass over it what to do.

Mailbox header (int32): layer index, n_cpu, n_miss, M, R = M * k, k, split column (0: none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moed.kernels.expert_claim import _route_counts

_NOT_MISS = tl.constexpr((1 << 63) - 1)  # sorts after every miss


@triton.jit(do_not_specialize=["R", "M", "layer"])
def _split_kernel(
    ids_ptr,
    w_ptr,
    x_ptr,
    stride_xm,
    e2s_ptr,
    freq_ptr,
    table_ptr,
    hdr_ptr,
    cpu_e_ptr,
    ids_out,
    w_out,
    x_out,
    excl_ptr,
    gw_ptr,
    sort_ptr,
    split_tab_ptr,
    split_info_ptr,
    split_ids_ptr,
    R,
    M,
    K,
    E,
    k,
    layer,
    SPLIT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < E
    counts = _route_counts(ids_ptr, R, offs_e, BLOCK_E, BLOCK_R)
    slot = tl.load(e2s_ptr + offs_e, mask=emask, other=0)
    miss = (counts > 0) & (slot < 0) & emask
    n_miss = tl.sum(miss.to(tl.int32))
    c = tl.load(table_ptr + n_miss)
    c = tl.minimum(tl.maximum(c, 0), n_miss)
    cols = 0
    if SPLIT:
        cols = tl.load(split_tab_ptr + n_miss)
        cols = tl.where(c < n_miss, tl.maximum(cols, 0), 0)
    n_cpu = c + (cols > 0).to(tl.int32)
    # Misses ordered by (decayed frequency, id): a non-negative fp32's bits order like its value.
    f = tl.load(freq_ptr + offs_e, mask=emask, other=0.0)
    key = (f.to(tl.int32, bitcast=True).to(tl.int64) << 16) | offs_e.to(tl.int64)
    key = tl.where(miss, key, _NOT_MISS)
    tl.store(sort_ptr + offs_e, tl.sort(key))
    tl.store(excl_ptr + offs_e, tl.zeros([BLOCK_E], dtype=tl.int8), mask=emask)
    tl.debug_barrier()
    sel = offs_e < n_cpu
    cpu_e = (tl.load(sort_ptr + offs_e) & 0xFFFF).to(tl.int32)
    tl.store(cpu_e_ptr + offs_e, cpu_e, mask=sel)
    tl.store(excl_ptr + cpu_e, tl.where(offs_e < c, 1, 2).to(tl.int8), mask=sel)
    if SPLIT:
        split_e = tl.sum(tl.where((offs_e == c) & (cols > 0), cpu_e + 1, 0)) - 1  # -1: no split this step
        tl.store(split_info_ptr, split_e)
        tl.store(split_info_ptr + 1, cols)
    tl.debug_barrier()
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        ids = tl.load(ids_ptr + offs_r, mask=rmask, other=0)
        w = tl.load(w_ptr + offs_r, mask=rmask, other=0.0).to(tl.float32)
        where = tl.load(excl_ptr + ids, mask=rmask, other=0)
        tl.store(gw_ptr + offs_r, tl.where(where == 1, 0.0, w), mask=rmask)
        if SPLIT:
            tl.store(split_ids_ptr + offs_r, tl.where(where == 2, 0, 1), mask=rmask)
        tl.store(ids_out + offs_r, ids, mask=rmask)
        tl.store(w_out + offs_r, w, mask=rmask)
    if n_cpu > 0:  # the activations cross PCIe only when the CPU has work
        for m in range(0, M):
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                tl.store(x_out + m * K + offs_k, v, mask=offs_k < K)
    tl.store(hdr_ptr + 0, layer)
    tl.store(hdr_ptr + 1, n_cpu)
    tl.store(hdr_ptr + 2, n_miss)
    tl.store(hdr_ptr + 3, M)
    tl.store(hdr_ptr + 4, R)
    tl.store(hdr_ptr + 5, k)
    tl.store(hdr_ptr + 6, cols)


def _check(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    hidden: torch.Tensor,
    cpu_counts: torch.Tensor,
    header: torch.Tensor,
    cpu_experts: torch.Tensor,
    ids_out: torch.Tensor,
    w_out: torch.Tensor,
    x_out: torch.Tensor,
    exclude: torch.Tensor,
    gpu_weights: torch.Tensor,
    num_experts: int,
    split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> None:
    M, k = topk_ids.shape
    R = M * k
    problems = []
    if topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
        problems.append(f"topk_ids must be contiguous int32, got {topk_ids.dtype}")
    if topk_weights.shape != (M, k) or not topk_weights.is_contiguous():
        problems.append(f"topk_weights must be contiguous [{M}, {k}], got {list(topk_weights.shape)}")
    if hidden.dim() != 2 or hidden.shape[0] != M or hidden.stride(1) != 1:
        problems.append(f"hidden must be [{M}, K] with unit column stride, got {list(hidden.shape)}")
    if cpu_counts.dtype != torch.int32 or cpu_counts.numel() < min(num_experts, R) + 1:
        problems.append(f"cpu_counts must be int32 with >= {min(num_experts, R) + 1} entries")
    if header.dtype != torch.int32 or header.numel() < 7:
        problems.append("header must be int32 [7]")
    if cpu_experts.numel() < min(num_experts, R) or ids_out.numel() < R or w_out.numel() < R:
        problems.append(f"mailbox arrays hold fewer than the step's {R} routes")
    if x_out.dtype != torch.float32 or x_out.dim() != 2 or x_out.shape[0] < M or x_out.shape[1] != hidden.shape[1]:
        problems.append(f"x_out must be fp32 [>= {M}, {hidden.shape[1]}]")
    if exclude.dtype != torch.int8 or exclude.numel() < num_experts:
        problems.append(f"exclude must be int8 [{num_experts}]")
    if gpu_weights.dtype != torch.float32 or gpu_weights.numel() < R:
        problems.append(f"gpu_weights must be fp32 with >= {R} entries")
    if split is not None:
        tab, info, sids = split
        if tab.dtype != torch.int32 or tab.numel() != cpu_counts.numel():
            problems.append(f"split_cols must be int32 like cpu_counts ({cpu_counts.numel()} entries)")
        if info.dtype != torch.int32 or info.numel() < 2 or sids.dtype != torch.int32 or sids.numel() < R:
            problems.append(f"split_info must be int32 [2] and split_ids int32 [>= {R}]")
    if problems:
        raise ValueError("split_misses: " + "; ".join(problems))


def split_misses(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    hidden: torch.Tensor,
    expert_to_slot: torch.Tensor,
    expert_freq: torch.Tensor,
    cpu_counts: torch.Tensor,
    *,
    header: torch.Tensor,
    cpu_experts: torch.Tensor,
    ids_out: torch.Tensor,
    w_out: torch.Tensor,
    x_out: torch.Tensor,
    exclude: torch.Tensor,
    gpu_weights: torch.Tensor,
    sort_scratch: torch.Tensor,
    layer_index: int,
    split_cols: torch.Tensor | None = None,
    split_info: torch.Tensor | None = None,
    split_ids: torch.Tensor | None = None,
) -> None:
    """Split the misses of one step (topk_ids [M, k] int32, topk_weights [M, k], hidden [M, K]) against the slot
    table `expert_to_slot` [E + 1]; see the module docstring for what is written where. `sort_scratch`: int64
    [next_power_of_2(E)] on the device. `split_cols`, `split_info`, `split_ids`: the column split (all or none)."""
    E = expert_freq.numel()
    split = _split_args(split_cols, split_info, split_ids)
    _check(
        topk_ids,
        topk_weights,
        hidden,
        cpu_counts,
        header,
        cpu_experts,
        ids_out,
        w_out,
        x_out,
        exclude,
        gpu_weights,
        E,
        split,
    )
    M, k = topk_ids.shape
    R = M * k
    _split_kernel[(1,)](
        topk_ids,
        topk_weights,
        hidden,
        hidden.stride(0),
        expert_to_slot,
        expert_freq,
        cpu_counts,
        header,
        cpu_experts,
        ids_out,
        w_out,
        x_out,
        exclude,
        gpu_weights,
        sort_scratch,
        *(split or (cpu_counts, cpu_counts, cpu_counts)),
        R,
        M,
        hidden.shape[1],
        E,
        k,
        layer_index,
        SPLIT=split is not None,
        BLOCK_E=triton.next_power_of_2(E),
        BLOCK_R=max(16, min(64, triton.next_power_of_2(R))),
        BLOCK_K=1024,
        num_warps=4,
    )


def split_misses_reference(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    hidden: torch.Tensor,
    expert_to_slot: torch.Tensor,
    expert_freq: torch.Tensor,
    cpu_counts: torch.Tensor,
    *,
    header: torch.Tensor,
    cpu_experts: torch.Tensor,
    ids_out: torch.Tensor,
    w_out: torch.Tensor,
    x_out: torch.Tensor,
    exclude: torch.Tensor,
    gpu_weights: torch.Tensor,
    sort_scratch: torch.Tensor | None = None,
    layer_index: int,
    split_cols: torch.Tensor | None = None,
    split_info: torch.Tensor | None = None,
    split_ids: torch.Tensor | None = None,
) -> None:
    """Plain-torch `split_misses`: the same outputs, the same order of the CPU's experts."""
    E = expert_freq.numel()
    split = _split_args(split_cols, split_info, split_ids)
    _check(
        topk_ids,
        topk_weights,
        hidden,
        cpu_counts,
        header,
        cpu_experts,
        ids_out,
        w_out,
        x_out,
        exclude,
        gpu_weights,
        E,
        split,
    )
    M, k = topk_ids.shape
    R = M * k
    ids = topk_ids.reshape(-1).long().cpu()
    counts = torch.bincount(ids, minlength=E)
    miss = (counts > 0) & (expert_to_slot[:E].cpu() < 0)
    misses = miss.nonzero().flatten().tolist()
    c = min(max(int(cpu_counts[len(misses)]), 0), len(misses))
    cols = max(int(split[0][len(misses)]), 0) if split is not None and c < len(misses) else 0
    n_cpu = c + (cols > 0)
    freq = expert_freq.cpu()
    chosen = sorted(misses, key=lambda e: (float(freq[e]), e))[:n_cpu]
    flags = torch.zeros(E, dtype=torch.int8)
    flags[chosen[:c]] = 1
    flags[chosen[c:]] = 2
    w = topk_weights.reshape(-1).float().cpu()
    exclude[:E].copy_(flags.to(exclude.device))
    gpu_weights.view(-1)[:R].copy_(torch.where(flags[ids] == 1, 0.0, w).to(gpu_weights.device))
    cpu_experts[:n_cpu].copy_(torch.tensor(chosen, dtype=torch.int32).to(cpu_experts.device))
    ids_out[:R].copy_(ids.to(torch.int32).to(ids_out.device))
    w_out[:R].copy_(w.to(w_out.device))
    if n_cpu > 0:
        x_out[:M].copy_(hidden.float().to(x_out.device))
    if split is not None:
        info = [chosen[c] if cols > 0 else -1, cols]
        split[1][:2].copy_(torch.tensor(info, dtype=torch.int32).to(split[1].device))
        split[2].view(-1)[:R].copy_(torch.where(flags[ids] == 2, 0, 1).to(torch.int32).to(split[2].device))
    hdr = [layer_index, n_cpu, len(misses), M, R, k, cols]
    header[:7].copy_(torch.tensor(hdr, dtype=torch.int32).to(header.device))


def _split_args(
    split_cols: torch.Tensor | None, split_info: torch.Tensor | None, split_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    given = [t is not None for t in (split_cols, split_info, split_ids)]
    if any(given) and not all(given):
        raise ValueError("split_misses: a column split needs split_cols, split_info and split_ids together")
    return (split_cols, split_info, split_ids) if all(given) else None  # type: ignore[return-value]
