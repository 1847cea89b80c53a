"""Fused MoE with int4 experts (w4a16): `moed.kernels.fused_moe`'s four steps, the weights read as 4-bit groups.

`fused_moe_int4(hidden, w13, w2, topk_ids, topk_weights, expert_to_slot, w13_scale=..., w2_scale=..., ...)` computes
what `fused_moe` computes, with the same alignment (`moe_align_block_size`: weights addressed by slot through
`expert_to_slot`, read on the device, no host sync, CUDA-graph capturable), the same grouped launch order and the
same top-k sum; only the two GEMMs differ. Activations stay bf16 (w4a16). `fused_moe_int4_routes` stops before the sum
and returns each route's output, as `fused_moe_routes` does (the expert cache's rounds: offload/runner.py).

Weights: `moed.formats.int4`'s layout (compressed-tensors pack-quantized) stacked over `S` slots, gate rows [0, N)
and up rows [N, 2N) of w13, `group` inputs per scale (`G13 = ceil(K / group)`, `G2 = ceil(N / group)`):
- `w13: uint8 [S, 2N, K / 2]`, `w13_scale: [S, 2N, G13]` (bf16, fp16 or fp32), `w13_zeros: int32 [S, 2N / 8, G13]`
  or None (symmetric);
- `w2: uint8 [S, K, N / 2]`, `w2_scale: [S, K, G2]`, `w2_zeros: int32 [S, K / 8, G2]` or None.
A K step of BLOCK_SIZE_K (which divides `group`, so one scale and zero point per column) loads the packed bytes
`[BLOCK_K / 2, columns]` once, splits them into the even-k (low nibble) and odd-k (high nibble) halves, subtracts
the zero point and multiplies both by the matching even and odd activation columns: two bf16 dots of depth
BLOCK_K / 2 into fp32, then one multiply by the group scale per output column (not per weight).

Tile configs come from `moed.moe_configs` under `dtype=int4_w4a16` (no block_shape in the name, as vLLM and sglang
name their int4 tables; N is the intermediate size, not its packed width), else built-in defaults.
Its torch reference is `moed.kernels.fused_moe_reference.fused_moe_reference` (one reference for every expert layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moed.formats.int4 import Int4Weight, num_groups
from moed.kernels.act_quant import interpreting
from moed.kernels.fused_moe import _route_block, _tile_ids, _to_bf16, routes_out, topk_sum
from moed.kernels.fused_moe_config import check_config, device_name
from moed.kernels.int4_gemv import (
    TokenSum,
    down_int4_gemv_kernel,
    gate_up_int4_gemv_kernel,
    split_k,
    split_k_sum,
    split_k_topk_sum,
    word_major,
    zero_points,
    zero_strides,
)
from moed.kernels.int4_w4a8 import A8_MIN_BLOCK_K, launch_down_a8, launch_gate_up_a8
from moed.kernels.moe_align import MoEAlignment, moe_align_block_size
from moed.moe_configs import lookup

DTYPE_NAME = "int4_w4a16"  # the config files' dtype string


@triton.jit
def _int4_dot(a_even, a_odd, packed, uz, acc, UNPACK_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a . (w - z) for a K step: packed uint8 [BK/2, BN] holds even k in its low and odd k in its high nibble.
    UNPACK_BF16 (config key): each nibble w becomes the bf16 128 + w by OR-ing it into 128.0's mantissa (its ulp is
    1) and 128 + z comes off in bf16, exact for these small integers, with no int-to-float conversion a weight (a
    quarter-rate instruction on Hopper's CUDA cores); otherwise w - z goes through int32 and fp32 to bf16."""
    if UNPACK_BF16:
        p = packed.to(tl.int16)
        lo_b = ((p & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
        hi_b = ((p >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        zc = (uz + 128).to(tl.float32)[None, :]
        if INTERPRET:  # bf16 arithmetic is wrong in the interpreter (as below): the same exact values in fp32
            acc = tl.dot(a_even.to(tl.float32), lo_b.to(tl.float32) - zc, acc)
            return tl.dot(a_odd.to(tl.float32), hi_b.to(tl.float32) - zc, acc)
        zb = zc.to(tl.bfloat16)
        acc = tl.dot(a_even, lo_b - zb, acc)
        return tl.dot(a_odd, hi_b - zb, acc)
    lo = ((packed & 0xF).to(tl.int32) - uz[None, :]).to(tl.float32)
    hi = ((packed >> 4).to(tl.int32) - uz[None, :]).to(tl.float32)
    if INTERPRET:  # the interpreter multiplies bf16 tiles wrongly; these values are exact in fp32 anyway
        acc = tl.dot(a_even.to(tl.float32), lo, acc)
        return tl.dot(a_odd.to(tl.float32), hi, acc)
    acc = tl.dot(a_even, lo.to(tl.bfloat16), acc)
    return tl.dot(a_odd, hi.to(tl.bfloat16), acc)


@triton.jit(do_not_specialize=["T", "top_k", "num_blocks_m", "GROUP_M"])
def _gate_up_int4_kernel(
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
    num_blocks_m,
    GROUP_M,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZP: tl.constexpr,
    UNPACK_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """h[f, n] = silu(x_t . gate_slot[n]) * (x_t . up_slot[n]) for the rows f of one block; t = f // top_k.
    KH = K / 2, the packed bytes of a weight row: bounds in bytes keep the divisibility Triton infers for KH, so
    the weight tiles load 16 bytes a thread (with `(K - k0) // 2` it proves only 8)."""
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
    offs_kh = tl.arange(0, HALF_K)
    a_ptrs = a_ptr + tok[:, None] * stride_am + 2 * offs_kh[None, :]
    wg_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    wu_ptrs = wg_ptrs + N * stride_wn
    sg_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    su_ptrs = s_ptr + slot * stride_ss + offs_up * stride_sn
    zg_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    zu_ptrs = z_ptr + slot * stride_zs + (offs_up // 8) * stride_zn
    acc_g = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(KH, HALF_K)):
        k_ok = offs_kh < KH - kb * HALF_K  # K is even: an even k is in range iff its odd partner is
        a_even = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_odd = tl.load(a_ptrs + 1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        g = (kb * BLOCK_K) // group
        zg = zero_points(zg_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
        zu = zero_points(zu_ptrs + g * stride_zk, offs_up, n_ok, HAS_ZP)
        sg = tl.load(sg_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
        su = tl.load(su_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
        acc_g += _int4_dot(a_even, a_odd, wg, zg, zero, UNPACK_BF16, INTERPRET) * sg[None, :]
        acc_u += _int4_dot(a_even, a_odd, wu, zu, zero, UNPACK_BF16, INTERPRET) * su[None, :]
        a_ptrs += BLOCK_K
        wg_ptrs += HALF_K
        wu_ptrs += HALF_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h_ptr + flat[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, _to_bf16(h, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T", "num_blocks_m", "GROUP_M"])
def _down_int4_kernel(
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
    num_blocks_m,
    GROUP_M,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ZP: tl.constexpr,
    UNPACK_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """partial[f, :] = topk_weight[f] * (h[f] . down_slot) for the rows f of one block; H = hidden size, NH = N / 2
    (packed bytes of a weight row, as KH in the gate-up kernel)."""
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
    offs_kh = tl.arange(0, HALF_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + 2 * offs_kh[None, :]
    w_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_kh[:, None]
    s_ptrs = s_ptr + slot * stride_ss + offs_n * stride_sn
    z_ptrs = z_ptr + slot * stride_zs + (offs_n // 8) * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(NH, HALF_K)):
        k_ok = offs_kh < NH - kb * HALF_K
        a_even = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_odd = tl.load(a_ptrs + 1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        g = (kb * BLOCK_K) // group
        z = zero_points(z_ptrs + g * stride_zk, offs_n, n_ok, HAS_ZP)
        s = tl.load(s_ptrs + g * stride_sk, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc += _int4_dot(a_even, a_odd, w, z, zero, UNPACK_BF16, INTERPRET) * s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += HALF_K
    acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, _to_bf16(acc, INTERPRET), mask=row_ok[:, None] & n_ok[None, :])


def get_moe_config(num_ids: int, N: int, M: int, device: torch.device) -> tuple[dict, dict]:
    """(gate-up config, down config) for M tokens from the int4_w4a16 tables, else built-in defaults."""
    dev = device_name(device.index or 0) if device.type == "cuda" else "cpu"
    return lookup.get_tables(num_ids, N, DTYPE_NAME, None, dev, triton.__version__).pick(M)


def fused_moe_int4(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_to_slot: torch.Tensor,
    *,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    w13_zeros: torch.Tensor | None = None,
    w2_zeros: torch.Tensor | None = None,
    group: int = 128,
    config: dict | None = None,
    down_config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden bf16 [M, K] -> bf16 [M, K]: sum_j topk_weights[t, j] * expert(topk_ids[t, j])(hidden[t]).

    Weights as the module docstring lays them out; topk_ids int32 [M, k]; topk_weights fp32 [M, k];
    expert_to_slot int32 [num_ids] on the device. config / down_config as for `fused_moe`.
    """
    _check(
        hidden, w13, w2, w13_scale, w2_scale, w13_zeros, w2_zeros, group, topk_ids, topk_weights, expert_to_slot, out
    )
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
        w13_zeros,
        w2_zeros,
        group,
        config,
        down_config,
        None,
        M,
        None,
        TokenSum(out, topk_ids, expert_to_slot),
    )
    # a split down tile has written the token sums already (None)
    return out if partial is None else topk_sum(partial, topk_ids, expert_to_slot, out)


def fused_moe_int4_routes(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    route_weights: torch.Tensor,
    expert_to_slot: torch.Tensor,
    *,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    w13_zeros: torch.Tensor | None = None,
    w2_zeros: torch.Tensor | None = None,
    group: int = 128,
    out: torch.Tensor | None = None,
    config_tokens: int | None = None,
    config_ids: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """`fused_moe_routes` for int4 experts: each route's output, not summed (out [M * k, K] bf16, route_weights fp32
    [M * k]); only routes whose id is in [0, num_ids) are computed and written, the other rows keep what they held.
    `config_tokens`, `config_ids`: the M and E the tuned tables are looked up by (default M and num_ids)."""
    M = hidden.shape[0]
    _check(
        hidden,
        w13,
        w2,
        w13_scale,
        w2_scale,
        w13_zeros,
        w2_zeros,
        group,
        topk_ids,
        route_weights.view(topk_ids.shape),
        expert_to_slot,
        None,
    )
    out = routes_out("fused_moe_int4_routes", hidden, topk_ids, out)
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
        w13_zeros,
        w2_zeros,
        group,
        config,
        None,
        out,
        config_tokens or M,
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
    w13_zeros,
    w2_zeros,
    group,
    config,
    down_config,
    partial,
    config_tokens: int,
    config_ids: int | None,
    token_sum: TokenSum | None = None,
) -> torch.Tensor | None:
    """Steps 1-3: partial [M * k, K] = route weight * expert output for every route with an id in the table; None
    when `token_sum` is given and the down tile's split pass wrote the token sums there instead."""
    K = hidden.shape[1]
    N = 2 * w2.shape[2]
    top_k = topk_ids.shape[1]
    if config is None:
        config, looked_up_down = get_moe_config(config_ids or expert_to_slot.numel(), N, config_tokens, hidden.device)
        down_config = down_config or looked_up_down
        # Tables are tuned for group 128; a finer-grouped checkpoint (32, 64) takes K steps of one group.
        config, down_config = (_for_group(c, group) for c in (config, down_config))
    check_int4_config(config, group, "config")
    down_config = dict(down_config or config)
    down_config["BLOCK_SIZE_M"] = config["BLOCK_SIZE_M"]
    check_int4_config(down_config, group, "down_config")

    T = topk_ids.numel()
    align = moe_align_block_size(topk_ids, expert_to_slot, config["BLOCK_SIZE_M"])
    h = torch.empty((T, N), dtype=hidden.dtype, device=hidden.device)
    launch_gate_up(hidden, Int4Weight(w13, w13_scale, w13_zeros, group), h, align, top_k, config)
    if partial is None:
        partial = torch.empty((T, K), dtype=hidden.dtype, device=hidden.device)
    summed = launch_down(
        h, Int4Weight(w2, w2_scale, w2_zeros, group), partial, route_weights, align, down_config, token_sum
    )
    return None if summed else partial


def _for_group(config: dict, group: int) -> dict:
    """A table's entry for a checkpoint's quantisation group: K steps of at most one group, and the int8 tiles (A8)
    only where such a step still holds two int8 MMA depths (group 32 takes the w4a16 tile of the same shape)."""
    c = {**config, "BLOCK_SIZE_K": min(config["BLOCK_SIZE_K"], group)}
    if c.get("A8") and c["BLOCK_SIZE_K"] < A8_MIN_BLOCK_K:
        del c["A8"]
    return c


def launch_gate_up(
    hidden: torch.Tensor, w13: Int4Weight, h: torch.Tensor, align: MoEAlignment, top_k: int, config: dict
) -> None:
    """Step 2 alone (the tuner times it by itself): h [T, N] from hidden [M, K] and w13 [S, 2N, K / 2]."""
    if config.get("A8"):
        launch_gate_up_a8(hidden, w13, h, align, top_k, config, _meta(config, w13))
        return
    K = hidden.shape[1]
    N = h.shape[1]
    qw, s = w13.qweight, w13.scales
    z, zs = zero_strides(w13)
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    num_blocks_m = align.sorted_ids.numel() // bm
    grid = (num_blocks_m * triton.cdiv(N, bn // 2),)
    rows = config.get("GEMV_ROWS", 0)
    T = h.shape[0]
    strides = (hidden.stride(0), qw.stride(0), qw.stride(1), s.stride(0), s.stride(1), s.stride(2), *zs, h.stride(0))
    meta = _meta(config, w13)
    common = (hidden, qw, s, z, h, align.sorted_ids, align.block_slot, align.num_padded, N, K // 2, T, top_k)
    words = bool(rows) and _words(config, qw)
    if words:
        a = word_major(hidden)
        common = (a, *common[1:])
        strides = (a.stride(0), *strides[1:])
    if rows:
        steps, splits, ws = split_k(config, K, (T, 2 * N), h.device)
        gate_up_int4_gemv_kernel[(*grid, splits)](
            *common, w13.group, *strides, ws, steps, *ws.stride()[:2], ROWS=rows, SPLIT=splits > 1,
            WORDS=words, **meta,
        )  # fmt: skip
        if splits > 1:
            split_k_sum(ws, h, h, align, bm, splits, gated=True)
    else:
        meta["UNPACK_BF16"] = config.get("UNPACK_BF16", False)
        _gate_up_int4_kernel[grid](*common, num_blocks_m, config["GROUP_SIZE_M"], w13.group, *strides, **meta)


def _words(config: dict, qweight: torch.Tensor) -> bool:
    """GEMV_WORDS (config key): the CUDA-core tiles read 32-bit words of eight nibbles; rows of whole words only."""
    words = config.get("GEMV_WORDS", False)
    aligned = all(v % 4 == 0 for v in (qweight.shape[-1], qweight.stride(0), qweight.stride(1), qweight.data_ptr()))
    if words and not aligned:
        raise ValueError(
            f"fused_moe_int4: GEMV_WORDS needs packed rows of whole 32-bit words on 4-byte bases, got "
            f"{qweight.shape[-1]} bytes a row (strides {qweight.stride()[:2]})"
        )
    return words


def _meta(config: dict, w: Int4Weight) -> dict:
    """The compile-time tile sizes and launch options both int4 GEMMs take from a config."""
    return {
        "BLOCK_M": config["BLOCK_SIZE_M"],
        "BLOCK_N": config["BLOCK_SIZE_N"],
        "BLOCK_K": config["BLOCK_SIZE_K"],
        "HAS_ZP": w.zeros is not None,
        "INTERPRET": interpreting(),
        "num_warps": config["num_warps"],
        "num_stages": config["num_stages"],
    }


def launch_down(
    h: torch.Tensor,
    w2: Int4Weight,
    partial: torch.Tensor,
    topk_weights: torch.Tensor,
    align: MoEAlignment,
    config: dict,
    token_sum: TokenSum | None = None,
) -> bool:
    """Step 3 alone: partial [T, K] = router weight * (h [T, N] . w2[slot] [K, N / 2]^T). With `token_sum`, a split
    tile's second pass writes the token sums instead of partial, and this returns True (the top-k sum is done)."""
    if config.get("A8"):
        return launch_down_a8(h, w2, partial, topk_weights, align, config, _meta(config, w2), token_sum)
    T, N = h.shape
    H = partial.shape[1]
    qw, s = w2.qweight, w2.scales
    z, zs = zero_strides(w2)
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    num_blocks_m = align.sorted_ids.numel() // bm
    grid = (num_blocks_m * triton.cdiv(H, bn),)
    rows = config.get("GEMV_ROWS", 0)
    strides = (h.stride(0), qw.stride(0), qw.stride(1), s.stride(0), s.stride(1), s.stride(2), *zs, partial.stride(0))
    meta = _meta(config, w2)
    common = (h, qw, s, z, partial, topk_weights, align.sorted_ids, align.block_slot, align.num_padded, H, N // 2, T)
    words = bool(rows) and _words(config, qw)
    if words:
        a = word_major(h)
        common = (a, *common[1:])
        strides = (a.stride(0), *strides[1:])
    if rows:
        steps, splits, ws = split_k(config, N, (T, H), h.device)
        down_int4_gemv_kernel[(*grid, splits)](
            *common, w2.group, *strides, ws, steps, *ws.stride()[:2], ROWS=rows, SPLIT=splits > 1,
            WORDS=words, **meta,
        )  # fmt: skip
        if splits > 1 and token_sum is not None:
            split_k_topk_sum(ws, token_sum.out, topk_weights, token_sum.topk_ids, token_sum.expert_to_slot, splits)
            return True
        if splits > 1:
            split_k_sum(ws, partial, topk_weights, align, bm, splits, gated=False)
    else:
        meta["UNPACK_BF16"] = config.get("UNPACK_BF16", False)
        _down_int4_kernel[grid](*common, num_blocks_m, config["GROUP_SIZE_M"], w2.group, *strides, **meta)
    return False


def check_int4_config(config: dict, group: int, name: str) -> None:
    check_config(config, False, None, name)
    bk = config["BLOCK_SIZE_K"]
    if bk < 32 or group % bk:
        raise ValueError(
            f"fused_moe_int4: {name}['BLOCK_SIZE_K'] = {bk}; int4 needs a power of two >= 32 that "
            f"divides the quantisation group {group}"
        )
    rows = config.get("GEMV_ROWS", 0)
    if (
        not isinstance(rows, int)
        or isinstance(rows, bool)
        or rows < 0
        or rows & (rows - 1)
        or rows > config["BLOCK_SIZE_M"]
    ):
        raise ValueError(
            f"fused_moe_int4: {name}['GEMV_ROWS'] = {rows!r}; must be 0 (tensor-core tiles) or a power of two "
            f"<= BLOCK_SIZE_M = {config['BLOCK_SIZE_M']} (routes per CUDA-core pass)"
        )
    split = config.get("SPLIT_K", 1)
    if not isinstance(split, int) or isinstance(split, bool) or split < 1 or split & (split - 1):
        raise ValueError(f"fused_moe_int4: {name}['SPLIT_K'] = {split!r}; must be a power of two >= 1")
    if split > 1 and not (rows or config.get("A8")):
        raise ValueError(
            f"fused_moe_int4: {name}['SPLIT_K'] = {split} needs GEMV_ROWS > 0 or A8 (the CUDA-core and int8 tiles "
            "split K)"
        )
    if not isinstance(config.get("GEMV_WORDS", False), bool) or (config.get("GEMV_WORDS") and not rows):
        raise ValueError(
            f"fused_moe_int4: {name}['GEMV_WORDS'] = {config['GEMV_WORDS']!r}; a bool, for the CUDA-core tiles only "
            "(GEMV_ROWS > 0)"
        )
    if config.get("GEMV_WORDS") and config["BLOCK_SIZE_K"] < 64:
        raise ValueError(f"fused_moe_int4: {name}['GEMV_WORDS'] needs BLOCK_SIZE_K >= 64 (eight words a K step)")
    if not isinstance(config.get("UNPACK_BF16", False), bool) or (config.get("UNPACK_BF16") and rows):
        raise ValueError(
            f"fused_moe_int4: {name}['UNPACK_BF16'] = {config['UNPACK_BF16']!r}; a bool, for the tensor-core tiles "
            "only (GEMV_ROWS 0)"
        )
    a8 = config.get("A8", False)
    if not isinstance(a8, bool) or (
        a8 and (rows or config.get("UNPACK_BF16") or config["BLOCK_SIZE_K"] < A8_MIN_BLOCK_K)
    ):
        raise ValueError(
            f"fused_moe_int4: {name}['A8'] = {a8!r}; a bool, for the tensor-core tiles without UNPACK_BF16 (int8 "
            f"activations) and BLOCK_SIZE_K >= {A8_MIN_BLOCK_K} (got GEMV_ROWS {rows}, BLOCK_SIZE_K "
            f"{config['BLOCK_SIZE_K']})"
        )
    pairs = config.get("PAIRS", False)
    if not isinstance(pairs, bool) or (pairs and not a8):
        raise ValueError(
            f"fused_moe_int4: {name}['PAIRS'] = {pairs!r}; a bool, for the int8 tiles only (A8: two K steps' weights "
            "loaded a pass)"
        )
    ahead = config.get("AHEAD")
    if ahead is not None and (
        not isinstance(ahead, bool) or not a8 or (ahead and (pairs or config["BLOCK_SIZE_M"] > 16))
    ):
        raise ValueError(
            f"fused_moe_int4: {name}['AHEAD'] = {ahead!r}; a bool, for the int8 tiles only (A8), and True only for "
            f"16-row tiles without PAIRS (got BLOCK_SIZE_M {config['BLOCK_SIZE_M']}, PAIRS {pairs}): each K step's "
            "scales and sums loaded a step ahead, the default there"
        )


def _check(hidden, w13, w2, s13, s2, z13, z2, group, topk_ids, topk_weights, expert_to_slot, out) -> None:
    """Validate shapes, dtypes and devices (no device reads)."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"fused_moe_int4: {msg}")

    if hidden.dim() != 2 or hidden.dtype != torch.bfloat16 or hidden.stride(1) != 1:
        raise bad(f"hidden must be bf16 [M, K] with unit last stride, got {hidden.dtype} {tuple(hidden.shape)}")
    if w13.dtype != torch.uint8 or w2.dtype != torch.uint8 or w13.dim() != 3 or w2.dim() != 3:
        raise bad(
            f"w13 / w2 must be packed uint8 [S, 2N, K/2] / [S, K, N/2], got {w13.dtype} {tuple(w13.shape)} "
            f"and {w2.dtype} {tuple(w2.shape)}"
        )
    S, two_n, half_k = w13.shape
    M, K = hidden.shape
    N = 2 * w2.shape[2]
    if K % 8 or N % 8 or 2 * half_k != K or two_n != 2 * N or w2.shape != (S, K, N // 2):
        raise bad(
            f"shapes disagree: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)} (want [S, 2N, K/2]), "
            f"w2 {tuple(w2.shape)} (want [S, K, N/2]); K and N must be multiples of 8"
        )
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise bad("w13 and w2 need unit stride along their last dimension")
    if group < 32 or group & (group - 1):
        raise bad(f"group {group} must be a power of two >= 32")
    for name, s, want in (
        ("w13_scale", s13, (S, 2 * N, num_groups(K, group))),
        ("w2_scale", s2, (S, K, num_groups(N, group))),
    ):
        if s is None or not s.is_floating_point() or tuple(s.shape) != want:
            raise bad(
                f"{name} must be float {want} for group {group}, got {None if s is None else (s.dtype, tuple(s.shape))}"
            )
    if (z13 is None) != (z2 is None):
        raise bad("pass zero points for both w13 and w2, or for neither (symmetric)")
    if z13 is not None:
        for name, z, want in (
            ("w13_zeros", z13, (S, 2 * N // 8, num_groups(K, group))),
            ("w2_zeros", z2, (S, K // 8, num_groups(N, group))),
        ):
            if z.dtype != torch.int32 or tuple(z.shape) != want:
                raise bad(f"{name} must be int32 {want} (packed along the output rows), got {z.dtype} {tuple(z.shape)}")
    if topk_ids.dtype != torch.int32 or topk_ids.dim() != 2 or topk_ids.shape[0] != M or not topk_ids.is_contiguous():
        raise bad(f"topk_ids must be contiguous int32 [M={M}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape or not topk_weights.is_contiguous():
        raise bad(
            f"topk_weights must be contiguous fp32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
            f"{tuple(topk_weights.shape)}"
        )
    if expert_to_slot.dtype != torch.int32 or expert_to_slot.dim() != 1:
        raise bad(f"expert_to_slot must be int32 [num_ids], got {expert_to_slot.dtype} {tuple(expert_to_slot.shape)}")
    for name, t in (
        ("w13", w13),
        ("w2", w2),
        ("w13_scale", s13),
        ("w2_scale", s2),
        ("w13_zeros", z13),
        ("w2_zeros", z2),
        ("topk_ids", topk_ids),
        ("topk_weights", topk_weights),
        ("expert_to_slot", expert_to_slot),
    ):
        if t is not None and t.device != hidden.device:
            raise bad(f"{name} is on {t.device} but hidden on {hidden.device}")
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype or out.stride(1) != 1):
        raise bad(f"out must be bf16 {tuple(hidden.shape)} with unit last stride, got {out.dtype} {tuple(out.shape)}")
