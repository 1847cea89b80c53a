"""Fused MoE for GLM-5.1's routed (and fused shared) experts: Triton GEMMs over expert slots.

`fused_moe(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, ...)` computes, for every token t,
`sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))` with `e = topk_ids[t, j]`, in four steps and no host sync
(CUDA-graph capturable):
1. `moe_align_block_size`: flat assignments `f = t * k + j` grouped by expert, padded to BLOCK_SIZE_M; each block
   carries the weight slot `expert_to_slot[e]`, read on the device.
2. gate+up GEMM: a program owns BLOCK_SIZE_M rows of one expert and BLOCK_SIZE_N / 2 gate columns with the
   matching up columns (BLOCK_SIZE_N counts rows of `w13`, as sglang's tables do), so SiLU(gate) * up happens in
   registers and writes `h: bf16 [T, N]` once.
3. down GEMM: rows of `h` times `w2[slot]`, scaled by the router weight, to `partial: bf16 [T, K]`.
4. top-k sum: `out[t] = sum_j partial[t * k + j]` in fp32 (assignments whose id has no slot add nothing).
`fused_moe_routes` stops after step 3 and returns `partial` itself: each route's output, computed only for ids in
the table (the expert cache's rounds: offload/runner.py).

Weights (`S` slots; gate rows [0, N), up rows [N, 2N) of `w13`):
- bf16: `w13 [S, 2N, K]`, `w2 [S, K, N]`.
- FP8 w8a8 block (GLM-5.1-FP8): float8_e4m3fn weights and fp32 block scales `w13_scale [S, 2N/bn, cdiv(K, bk)]`,
  `w2_scale [S, cdiv(K, bn), N/bk]` (checkpoint `weight_scale_inv`, gate blocks then up blocks), dequantised
  exactly as `moed.formats.fp8.dequantize_block_fp8`. Activations are quantised per token and 128-wide group
  (`act_quant`): for small batches inside the GEMMs while loading A (one launch less each, and re-quantising
  a few rows per tile is free next to streaming weights); for large batches by a separate pass, so the
  compute-bound GEMMs see FP8 A tiles. Each K step of 128 adds `dot(a_q, w_q) * a_scale * w_scale` in fp32.
- int4 w4a16 (`moed.formats.int4`, group-wise along K): computed by `moed.kernels.fused_moe_int4`. The torch
  reference of all three layouts is `moed.kernels.fused_moe_reference`.

Tile configs come from `moed.moe_configs` through `fused_moe_config` (tuned JSON per E, N, dtype, device, nearest
M) unless passed in. A config may carry `"A_QUANT_IN_GEMM": true|false` (moed's tuner writes it for FP8) to choose
where activations are quantised; without it the GEMMs quantise up to QUANT_IN_KERNEL_MAX_TOKENS tokens themselves.
M, N, K and strides are runtime arguments, so one compiled kernel per config serves every shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moed.kernels.act_quant import interpreting, per_token_group_quant_fp8, quantize_groups_fp8
from moed.kernels.fused_moe_config import check_config, get_moe_config
from moed.kernels.moe_align import moe_align_block_size

# A modes of the GEMMs: bf16 activations x bf16 weights; FP8 activations already quantised; bf16 activations
# quantised per 128-group inside the kernel (FP8 weights in the last two).
A_BF16, A_FP8, A_QUANT_IN_KERNEL = 0, 1, 2
QUANT_IN_KERNEL_MAX_TOKENS = 256  # at or below this many tokens, FP8 GEMMs quantise activations themselves


@triton.jit
def _tile_ids(num_blocks_m, num_pid_n, GROUP_M):
    """Grouped launch order: GROUP_M row blocks share each column sweep so their weight tiles stay in L2."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M: tl.constexpr):
    """(expert slot int64, the block's route ids, whether the block has work) with the three loads issued together:
    one after another they were three L2 round trips a program waited out before its first weight load (sm_90
    SASS), which a decode tile walking a few K steps pays on every program. Every block the grid covers is within
    both tables (sized for the most padded rows), so the loads are in bounds even past the padded count."""
    padded = tl.load(num_padded_ptr)
    slot = tl.load(block_slot_ptr + pid_m)
    flat = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return slot.to(tl.int64), flat, (pid_m * BLOCK_M < padded) & (slot >= 0)


@triton.jit
def _a_tile(a_ptrs, a_scale_ptrs, row_ok, k_ok, A_MODE: tl.constexpr, EXACT_CAST: tl.constexpr):
    """One [BLOCK_M, BLOCK_K] activation tile ready for tl.dot, with its per-row scale (1.0 for bf16)."""
    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if A_MODE == 1:
        return a, tl.load(a_scale_ptrs, mask=row_ok, other=0.0)
    elif A_MODE == 2:
        return quantize_groups_fp8(a.to(tl.float32), EXACT_CAST)
    else:
        return a, tl.full((a.shape[0],), 1.0, tl.float32)


@triton.jit
def _dot_bf16(a, b, acc, INTERPRET: tl.constexpr):
    # The Triton interpreter (3.9) multiplies bf16 tiles wrongly; it gets fp32 copies instead.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _to_bf16(v, INTERPRET: tl.constexpr):
    # The interpreter's fp32 -> bf16 cast truncates; round to nearest even on the bits first there.
    if INTERPRET:
        bits = v.to(tl.int32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16)


@triton.jit(do_not_specialize=["T", "top_k", "num_blocks_m", "GROUP_M"])
def _gate_up_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    h_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    N,
    K,
    T,
    top_k,
    num_blocks_m,
    GROUP_M,
    stride_am,
    stride_asm,
    stride_ws,
    stride_wn,
    stride_wss,
    stride_wsn,
    stride_wsk,
    stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_N: tl.constexpr,
    A_MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """h[f, n] = silu(x_t . gate_slot[n]) * (x_t . up_slot[n]) for the rows f of one block; t = f // top_k."""
    HALF: tl.constexpr = BLOCK_N // 2
    num_pid_n = tl.cdiv(N, HALF)
    pid_m, pid_n = _tile_ids(num_blocks_m, num_pid_n, GROUP_M)
    slot, flat, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    row_ok = flat < T
    tok = (flat // top_k).to(tl.int64)
    offs_n = pid_n * HALF + tl.arange(0, HALF)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + tok[:, None] * stride_am + offs_k[None, :]
    a_scale_ptrs = a_scale_ptr + tok * stride_asm
    wg_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + N * stride_wn
    sg_ptrs = w_scale_ptr + slot * stride_wss + (offs_n // SCALE_N) * stride_wsn
    su_ptrs = w_scale_ptr + slot * stride_wss + ((offs_n + N) // SCALE_N) * stride_wsn
    acc_g = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a, a_scale = _a_tile(a_ptrs, a_scale_ptrs, row_ok, k_ok, A_MODE, INTERPRET)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if A_MODE == 0:
            acc_g = _dot_bf16(a, wg, acc_g, INTERPRET)
            acc_u = _dot_bf16(a, wu, acc_u, INTERPRET)
        else:
            sg = tl.load(sg_ptrs + kb * stride_wsk, mask=n_ok, other=0.0)
            su = tl.load(su_ptrs + kb * stride_wsk, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, wg) * (a_scale[:, None] * sg[None, :])
            acc_u += tl.dot(a, wu) * (a_scale[:, None] * su[None, :])
        a_ptrs += BLOCK_K
        a_scale_ptrs += 1
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h_ptr + flat[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, _to_bf16(h, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T", "num_blocks_m", "GROUP_M"])
def _down_kernel(
    h_ptr,
    h_scale_ptr,
    w_ptr,
    w_scale_ptr,
    out_ptr,
    topk_w_ptr,
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    H,
    N,
    T,
    num_blocks_m,
    GROUP_M,
    stride_hm,
    stride_hsm,
    stride_ws,
    stride_wn,
    stride_wss,
    stride_wsn,
    stride_wsk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_N: tl.constexpr,
    A_MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """partial[f, :] = topk_weight[f] * (h[f] . down_slot) for the rows f of one block; H = hidden size."""
    num_pid_n = tl.cdiv(H, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_blocks_m, num_pid_n, GROUP_M)
    slot, flat, live = _route_block(pid_m, num_padded_ptr, block_slot_ptr, sorted_ptr, BLOCK_M)
    if not live:
        return
    row_ok = flat < T
    rows = flat.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :]
    a_scale_ptrs = h_scale_ptr + rows * stride_hsm
    w_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    s_ptrs = w_scale_ptr + slot * stride_wss + (offs_n // SCALE_N) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(N, BLOCK_K)):
        k_ok = offs_k < N - kb * BLOCK_K
        a, a_scale = _a_tile(a_ptrs, a_scale_ptrs, row_ok, k_ok, A_MODE, INTERPRET)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if A_MODE == 0:
            acc = _dot_bf16(a, w, acc, INTERPRET)
        else:
            s = tl.load(s_ptrs + kb * stride_wsk, mask=n_ok, other=0.0)
            acc += tl.dot(a, w) * (a_scale[:, None] * s[None, :])
        a_ptrs += BLOCK_K
        a_scale_ptrs += 1
        w_ptrs += BLOCK_K
    acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, _to_bf16(acc, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _topk_sum_kernel(
    partial_ptr,
    ids_ptr,
    e2s_ptr,
    out_ptr,
    H,
    top_k,
    num_ids,
    stride_pm,
    stride_om,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, top_k):
        e = tl.load(ids_ptr + t * top_k + j)
        in_range = (e >= 0) & (e < num_ids)
        slot = tl.load(e2s_ptr + e, mask=in_range, other=-1)
        # An id without a slot was never computed: its partial row is unwritten, so it must not be read.
        ok = col_ok & (tl.zeros_like(cols) + slot >= 0)
        v = tl.load(partial_ptr + (t * top_k + j) * stride_pm + cols, mask=ok, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * stride_om + cols, _to_bf16(acc, INTERPRET), mask=col_ok)


def topk_sum(
    partial: torch.Tensor, topk_ids: torch.Tensor, expert_to_slot: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum over j of partial[t * top_k + j], skipping routes whose expert has no slot (never computed)."""
    M, top_k = topk_ids.shape
    K = out.shape[1]
    block = 1024
    _topk_sum_kernel[(M, triton.cdiv(K, block))](
        partial,
        topk_ids,
        expert_to_slot,
        out,
        K,
        top_k,
        expert_to_slot.numel(),
        partial.stride(0),
        out.stride(0),
        BLOCK=block,
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return out


def routes_out(name: str, hidden: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The per-route output [M * k, K] of a routes kernel: `out` checked, or a new tensor."""
    T, K = topk_ids.numel(), hidden.shape[1]
    if out is None:
        return torch.empty((T, K), dtype=hidden.dtype, device=hidden.device)
    if out.shape != (T, K) or out.dtype != hidden.dtype or out.stride(1) != 1:
        raise ValueError(
            f"{name}: out must be {hidden.dtype} {(T, K)} with unit last stride, got {out.dtype} {tuple(out.shape)}"
        )
    return out


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_to_slot: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    config: dict | None = None,
    down_config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden bf16 [M, K] -> bf16 [M, K]: sum_j topk_weights[t, j] * expert(topk_ids[t, j])(hidden[t]).

    w13 [S, 2N, K], w2 [S, K, N] (bf16, or float8_e4m3fn with w13_scale / w2_scale and block_shape (128, 128));
    topk_ids int32 [M, k]; topk_weights fp32 [M, k]; expert_to_slot int32 [num_ids] on the device.
    config: a tuned-table entry (fused_moe_config.CONFIG_KEYS); down_config (optional) for the down GEMM, its
    BLOCK_SIZE_M forced to config's because both GEMMs share one alignment. Without config both come from moe_configs.
    """
    fp8 = _check(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, block_shape, out)
    M, K = hidden.shape
    if out is None:
        out = torch.empty((M, K), dtype=hidden.dtype, device=hidden.device)
    if M == 0:
        return out
    partial = _routes(
        hidden,
        w13,
        w2,
        topk_ids,
        topk_weights.view(-1),
        expert_to_slot,
        w13_scale,
        w2_scale,
        block_shape,
        config,
        down_config,
        None,
        M,
        fp8,
    )
    return topk_sum(partial, topk_ids, expert_to_slot, out)


def fused_moe_routes(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    route_weights: torch.Tensor,
    expert_to_slot: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    config_tokens: int | None = None,
    config_ids: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Each route's expert output, not summed: out [M * k, K] bf16, row t * k + j = route_weights[t * k + j] *
    expert(topk_ids[t, j])(hidden[t]) (route_weights fp32 [M * k]).

    Only routes whose id is in [0, num_ids) (num_ids = expert_to_slot.numel()) are computed and written; the other
    rows of `out` keep what they held. So an expert cache that serves a step's experts in rounds passes one `out` to
    every round, each round's other routes carrying an id outside the table, and computes each route once.
    `config_tokens`, `config_ids`: the M and E the tuned tables are looked up by (activation quantisation is chosen by
    that M; default M and num_ids); `config`: a tuned-table entry instead (both GEMMs).
    """
    M = hidden.shape[0]
    fp8 = _check(
        hidden,
        w13,
        w2,
        topk_ids,
        route_weights.view(topk_ids.shape),
        expert_to_slot,
        w13_scale,
        w2_scale,
        block_shape,
        None,
    )
    out = routes_out("fused_moe_routes", hidden, topk_ids, out)
    if out.shape[0] == 0:
        return out
    return _routes(
        hidden,
        w13,
        w2,
        topk_ids,
        route_weights,
        expert_to_slot,
        w13_scale,
        w2_scale,
        block_shape,
        config,
        None,
        out,
        config_tokens or M,
        fp8,
        config_ids,
    )


def _routes(
    hidden,
    w13,
    w2,
    topk_ids,
    route_weights,
    expert_to_slot,
    w13_scale,
    w2_scale,
    block_shape,
    config,
    down_config,
    partial,
    config_tokens: int,
    fp8: bool,
    config_ids: int | None = None,
) -> torch.Tensor:
    """Steps 1-3: partial [M * k, K] = route weight * expert output for every route with an id in the table."""
    K = hidden.shape[1]
    N = w2.shape[2]
    top_k = topk_ids.shape[1]
    if config is None:
        config, looked_up_down = get_moe_config(
            config_ids or expert_to_slot.numel(), N, config_tokens, fp8, block_shape, hidden.device
        )
        down_config = down_config or looked_up_down
    check_config(config, fp8, block_shape, "config")
    down_config = dict(down_config or config)
    down_config["BLOCK_SIZE_M"] = config["BLOCK_SIZE_M"]
    check_config(down_config, fp8, block_shape, "down_config")

    T = topk_ids.numel()
    align = moe_align_block_size(topk_ids, expert_to_slot, config["BLOCK_SIZE_M"])
    in_gemm = config_tokens <= QUANT_IN_KERNEL_MAX_TOKENS  # unless the tuned table says which was faster
    h = torch.empty((T, N), dtype=hidden.dtype, device=hidden.device)
    launch_gate_up(
        hidden,
        w13,
        w13_scale,
        h,
        align,
        top_k,
        config,
        fp8,
        config.get("A_QUANT_IN_GEMM", in_gemm),
        block_shape[0] if fp8 else 128,
    )
    if partial is None:
        partial = torch.empty((T, K), dtype=hidden.dtype, device=hidden.device)
    launch_down(
        h,
        w2,
        w2_scale,
        partial,
        route_weights,
        align,
        down_config,
        fp8,
        down_config.get("A_QUANT_IN_GEMM", in_gemm),
        block_shape[0] if fp8 else 128,
    )
    return partial


def _gemm_input(
    x: torch.Tensor, fp8: bool, quant_in_kernel: bool, block_k: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A operand, its scales, A_MODE): bf16 as is; FP8 quantised in the GEMM or by a separate pass first."""
    if not fp8:
        return x, x, A_BF16
    if quant_in_kernel:
        return x, x, A_QUANT_IN_KERNEL
    a, a_scale = per_token_group_quant_fp8(x, block_k)
    return a, a_scale, A_FP8


def launch_gate_up(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor | None,
    h: torch.Tensor,
    align,
    top_k: int,
    config: dict,
    fp8: bool,
    quant_in_kernel: bool,
    scale_n: int,
) -> None:
    """Step 2 alone (the tuner times it by itself): h [T, N] from hidden [M, K] and w13 [S, 2N, K]."""
    K = hidden.shape[1]
    N = h.shape[1]
    a, a_scale, mode = _gemm_input(hidden, fp8, quant_in_kernel, config["BLOCK_SIZE_K"])
    ws = w13_scale if fp8 else w13
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    num_blocks_m = align.sorted_ids.numel() // bm
    grid = (num_blocks_m * triton.cdiv(N, bn // 2),)
    _gate_up_kernel[grid](
        a,
        a_scale,
        w13,
        ws,
        h,
        align.sorted_ids,
        align.block_slot,
        align.num_padded,
        N,
        K,
        h.shape[0],
        top_k,
        num_blocks_m,
        config["GROUP_SIZE_M"],
        a.stride(0),
        a_scale.stride(0),
        w13.stride(0),
        w13.stride(1),
        ws.stride(0),
        ws.stride(1),
        ws.stride(2),
        h.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=config["BLOCK_SIZE_K"],
        SCALE_N=scale_n,
        A_MODE=mode,
        INTERPRET=interpreting(),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )


def launch_down(
    h: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    partial: torch.Tensor,
    topk_weights: torch.Tensor,
    align,
    config: dict,
    fp8: bool,
    quant_in_kernel: bool,
    scale_n: int,
) -> None:
    """Step 3 alone: partial [T, K] = router weight * (h [T, N] . w2[slot] [K, N]^T)."""
    T, N = h.shape
    H = partial.shape[1]
    a, a_scale, mode = _gemm_input(h, fp8, quant_in_kernel, config["BLOCK_SIZE_K"])
    ws = w2_scale if fp8 else w2
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    num_blocks_m = align.sorted_ids.numel() // bm
    grid = (num_blocks_m * triton.cdiv(H, bn),)
    _down_kernel[grid](
        a,
        a_scale,
        w2,
        ws,
        partial,
        topk_weights,
        align.sorted_ids,
        align.block_slot,
        align.num_padded,
        H,
        N,
        T,
        num_blocks_m,
        config["GROUP_SIZE_M"],
        a.stride(0),
        a_scale.stride(0),
        w2.stride(0),
        w2.stride(1),
        ws.stride(0),
        ws.stride(1),
        ws.stride(2),
        partial.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=config["BLOCK_SIZE_K"],
        SCALE_N=scale_n,
        A_MODE=mode,
        INTERPRET=interpreting(),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )


def _check(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale, w2_scale, block_shape, out) -> bool:
    """Validate shapes, dtypes and devices (no device reads); return True for FP8 weights."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"fused_moe: {msg}")

    if hidden.dim() != 2 or hidden.dtype != torch.bfloat16:
        raise bad(f"hidden must be bf16 [M, K], got {hidden.dtype} {tuple(hidden.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise bad(f"w13 must be [S, 2N, K] and w2 [S, K, N], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    S, two_n, K = w13.shape
    N = w2.shape[2]
    if w2.shape != (S, K, N) or two_n != 2 * N or K != hidden.shape[1]:
        raise bad(
            f"shapes disagree: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)} (want [S, 2N, K]), "
            f"w2 {tuple(w2.shape)} (want [S, K, N])"
        )
    if w13.dtype != w2.dtype or w13.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        raise bad(f"w13/w2 dtypes {w13.dtype}/{w2.dtype}; both bf16 or both float8_e4m3fn")
    if w13.stride(2) != 1 or w2.stride(2) != 1 or hidden.stride(1) != 1:
        raise bad("hidden, w13 and w2 need unit stride along their last dimension")
    if topk_ids.dtype != torch.int32 or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise bad(f"topk_ids must be int32 [M={hidden.shape[0]}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape:
        raise bad(
            f"topk_weights must be fp32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if not (topk_ids.is_contiguous() and topk_weights.is_contiguous()):
        raise bad("topk_ids and topk_weights must be contiguous")
    if expert_to_slot.dtype != torch.int32 or expert_to_slot.dim() != 1:
        raise bad(f"expert_to_slot must be int32 [num_ids], got {expert_to_slot.dtype} {tuple(expert_to_slot.shape)}")
    for name, t in (
        ("w13", w13),
        ("w2", w2),
        ("topk_ids", topk_ids),
        ("topk_weights", topk_weights),
        ("expert_to_slot", expert_to_slot),
    ):
        if t.device != hidden.device:
            raise bad(f"{name} is on {t.device} but hidden on {hidden.device}")
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype or out.stride(1) != 1):
        raise bad(f"out must be bf16 {tuple(hidden.shape)} with unit last stride, got {out.dtype} {tuple(out.shape)}")
    fp8 = w13.dtype == torch.float8_e4m3fn
    if not fp8:
        if w13_scale is not None or w2_scale is not None or block_shape is not None:
            raise bad("w13_scale / w2_scale / block_shape are for FP8 weights; these weights are bf16")
        return False
    if block_shape is None or len(block_shape) != 2 or block_shape[1] != 128 or block_shape[0] % 16:
        raise bad(
            f"FP8 weights need block_shape (bn, 128) with bn a multiple of 16 (GLM-5.1: (128, 128)), got {block_shape}"
        )
    bn, bk = block_shape
    if N % bn:
        raise bad(f"FP8: N = {N} must be a multiple of block_n = {bn} so gate and up blocks do not share scales")
    want13 = (S, 2 * N // bn, triton.cdiv(K, bk))
    want2 = (S, triton.cdiv(K, bn), triton.cdiv(N, bk))
    if w13_scale is None or w13_scale.shape != want13 or w13_scale.dtype != torch.float32:
        raise bad(
            f"w13_scale must be fp32 {want13}, got "
            f"{None if w13_scale is None else (w13_scale.dtype, tuple(w13_scale.shape))}"
        )
    if w2_scale is None or w2_scale.shape != want2 or w2_scale.dtype != torch.float32:
        raise bad(
            f"w2_scale must be fp32 {want2}, got "
            f"{None if w2_scale is None else (w2_scale.dtype, tuple(w2_scale.shape))}"
        )
    return True
