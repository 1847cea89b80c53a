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

Mailbox header (int32): layer index, n_cpu, n_miss, M, R = M * k, k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moed.kernels.expert_copy import _route_counts

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
    R,
    M,
    K,
    E,
    k,
    layer,
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
    # Misses ordered by (decayed frequency, id): a non-negative fp32's bits order like its value.
    f = tl.load(freq_ptr + offs_e, mask=emask, other=0.0)
    key = (f.to(tl.int32, bitcast=True).to(tl.int64) << 16) | offs_e.to(tl.int64)
    key = tl.where(miss, key, _NOT_MISS)
    tl.store(sort_ptr + offs_e, tl.sort(key))
    tl.store(excl_ptr + offs_e, tl.zeros([BLOCK_E], dtype=tl.int8), mask=emask)
    tl.debug_barrier()
    sel = offs_e < c
    cpu_e = (tl.load(sort_ptr + offs_e) & 0xFFFF).to(tl.int32)
    tl.store(cpu_e_ptr + offs_e, cpu_e, mask=sel)
    tl.store(excl_ptr + cpu_e, tl.full([BLOCK_E], 1, dtype=tl.int8), mask=sel)
    tl.debug_barrier()
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        ids = tl.load(ids_ptr + offs_r, mask=rmask, other=0)
        w = tl.load(w_ptr + offs_r, mask=rmask, other=0.0).to(tl.float32)
        on_cpu = tl.load(excl_ptr + ids, mask=rmask, other=0) != 0
        tl.store(gw_ptr + offs_r, tl.where(on_cpu, 0.0, w), mask=rmask)
        tl.store(ids_out + offs_r, ids, mask=rmask)
        tl.store(w_out + offs_r, w, mask=rmask)
    if c > 0:  # the activations cross PCIe only when the CPU has work
        for m in range(0, M):
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                tl.store(x_out + m * K + offs_k, v, mask=offs_k < K)
    tl.store(hdr_ptr + 0, layer)
    tl.store(hdr_ptr + 1, c)
    tl.store(hdr_ptr + 2, n_miss)
    tl.store(hdr_ptr + 3, M)
    tl.store(hdr_ptr + 4, R)
    tl.store(hdr_ptr + 5, k)


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
    if header.dtype != torch.int32 or header.numel() < 6:
        problems.append("header must be int32 [6]")
    if cpu_experts.numel() < min(num_experts, R) or ids_out.numel() < R or w_out.numel() < R:
        problems.append(f"mailbox arrays hold fewer than the step's {R} routes")
    if x_out.dtype != torch.float32 or x_out.dim() != 2 or x_out.shape[0] < M or x_out.shape[1] != hidden.shape[1]:
        problems.append(f"x_out must be fp32 [>= {M}, {hidden.shape[1]}]")
    if exclude.dtype != torch.int8 or exclude.numel() < num_experts:
        problems.append(f"exclude must be int8 [{num_experts}]")
    if gpu_weights.dtype != torch.float32 or gpu_weights.numel() < R:
        problems.append(f"gpu_weights must be fp32 with >= {R} entries")
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
) -> None:
    """Split the misses of one step (topk_ids [M, k] int32, topk_weights [M, k], hidden [M, K]) against the slot
    table `expert_to_slot` [E + 1]; see the module docstring for what is written where. `sort_scratch`: int64
    [next_power_of_2(E)] on the device."""
    E = expert_freq.numel()
    _check(
        topk_ids, topk_weights, hidden, cpu_counts, header, cpu_experts, ids_out, w_out, x_out, exclude, gpu_weights, E
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
        R,
        M,
        hidden.shape[1],
        E,
        k,
        layer_index,
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
) -> None:
    """Plain-torch `split_misses`: the same outputs, the same order of the CPU's experts."""
    E = expert_freq.numel()
    _check(
        topk_ids, topk_weights, hidden, cpu_counts, header, cpu_experts, ids_out, w_out, x_out, exclude, gpu_weights, E
    )
    M, k = topk_ids.shape
    R = M * k
    ids = topk_ids.reshape(-1).long().cpu()
    counts = torch.bincount(ids, minlength=E)
    miss = (counts > 0) & (expert_to_slot[:E].cpu() < 0)
    misses = miss.nonzero().flatten().tolist()
    c = min(max(int(cpu_counts[len(misses)]), 0), len(misses))
    freq = expert_freq.cpu()
    chosen = sorted(misses, key=lambda e: (float(freq[e]), e))[:c]
    flags = torch.zeros(E, dtype=torch.int8)
    flags[chosen] = 1
    w = topk_weights.reshape(-1).float().cpu()
    exclude[:E].copy_(flags.to(exclude.device))
    gpu_weights.view(-1)[:R].copy_(torch.where(flags[ids] != 0, 0.0, w).to(gpu_weights.device))
    cpu_experts[:c].copy_(torch.tensor(chosen, dtype=torch.int32).to(cpu_experts.device))
    ids_out[:R].copy_(ids.to(torch.int32).to(ids_out.device))
    w_out[:R].copy_(w.to(w_out.device))
    if c > 0:
        x_out[:M].copy_(hidden.float().to(x_out.device))
    header[:6].copy_(torch.tensor([layer_index, c, len(misses), M, R, k], dtype=torch.int32).to(header.device))
