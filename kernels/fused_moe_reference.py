"""The plain-PyTorch reference of the fused-MoE kernels (`fused_moe`, `fused_moe_routes` and their int4 twins).

One reference for every expert layout: bf16, FP8 block-quantised and int4 group-quantised weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moed.formats.fp8 import dequantize_block_fp8
from moed.formats.int4 import Int4Weight, dequantize_int4
from moed.kernels.act_quant import (
    dequantize_groups_fp8,
    dequantize_groups_int8,
    per_token_group_quant_fp8_reference,
    per_token_group_quant_int8_reference,
)


def fused_moe_reference(
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
    quantize_activations: bool = False,
    w13_zeros: torch.Tensor | None = None,
    w2_zeros: torch.Tensor | None = None,
    group: int = 128,
    int8_steps: tuple[int | None, int | None] = (None, None),
) -> torch.Tensor:
    """Plain torch: out[t] = sum_j w[t, j] * down(silu(gate(x_t)) * up(x_t)), fp32 math on dequantised weights.

    The reference of both fused-MoE kernels, for every expert layout: bf16; FP8 block (`block_shape`, scales);
    int4 (uint8 `w13 [S, 2N, K/2]`, `w2 [S, K, N/2]` with `group`-wide scales and, when asymmetric, zero points,
    as `moed.kernels.fused_moe_int4` takes them). The SiLU * up product is rounded to the activation dtype (bf16)
    as the kernels store it. With quantize_activations (FP8 only), x and that product pass through
    per-token-group FP8 quantisation first, as the w8a8 kernel computes; without it, this is the
    unquantised-activation answer the w8a8 result approximates. int8_steps (int4 only): the K-step widths in which
    the int8 tiles (config key A8) quantise x for gate-up and that product for down, None where a GEMM takes bf16.
    """
    M, K = hidden.shape
    out = torch.zeros((M, K), dtype=torch.float32, device=hidden.device)
    ids = topk_ids.long()
    experts = torch.unique(ids)
    bad = experts[(experts < 0) | (experts >= expert_to_slot.numel())]
    if bad.numel():
        raise ValueError(f"fused_moe_reference: expert id {int(bad[0])} outside [0, {expert_to_slot.numel()})")
    for tok, j, y in _expert_outputs(
        hidden,
        w13,
        w2,
        ids,
        experts,
        expert_to_slot,
        w13_scale,
        w2_scale,
        block_shape,
        quantize_activations,
        w13_zeros,
        w2_zeros,
        group,
        int8_steps,
    ):
        out.index_add_(0, tok, y * topk_weights[tok, j, None].float())
    return out.to(hidden.dtype)


def fused_moe_routes_reference(
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
    quantize_activations: bool = False,
    w13_zeros: torch.Tensor | None = None,
    w2_zeros: torch.Tensor | None = None,
    group: int = 128,
    int8_steps: tuple[int | None, int | None] = (None, None),
) -> torch.Tensor:
    """Plain-torch `fused_moe_routes` (and `fused_moe_int4_routes`): row t * k + j = bf16(route_weights[t * k + j] *
    expert(topk_ids[t, j])(x_t)) in fp32 math; rows of ids outside [0, num_ids) are left as they are (config_*: no
    tiles here). Weights of every layout, as `fused_moe_reference` takes them."""
    M, K = hidden.shape
    k = topk_ids.shape[1]
    if out is None:
        out = torch.empty((M * k, K), dtype=hidden.dtype, device=hidden.device)
    ids = topk_ids.long()
    experts = torch.unique(ids)
    experts = experts[(experts >= 0) & (experts < expert_to_slot.numel())]
    w = route_weights.view(M, k)
    for tok, j, y in _expert_outputs(
        hidden,
        w13,
        w2,
        ids,
        experts,
        expert_to_slot,
        w13_scale,
        w2_scale,
        block_shape,
        quantize_activations,
        w13_zeros,
        w2_zeros,
        group,
        int8_steps,
    ):
        out[tok * k + j] = (y * w[tok, j, None].float()).to(hidden.dtype)
    return out


def _expert_outputs(
    hidden,
    w13,
    w2,
    ids,
    experts,
    expert_to_slot,
    w13_scale,
    w2_scale,
    block_shape,
    quantize_activations,
    w13_zeros,
    w2_zeros,
    group,
    int8_steps,
):
    """(tokens, their top-k positions, fp32 expert outputs [rows, K]) for each expert of `experts`, in id order."""
    int4 = w13.dtype == torch.uint8
    if quantize_activations and w13.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fused_moe_reference: quantize_activations is for FP8 weights, not {w13.dtype}")
    if any(int8_steps) and not int4:
        raise ValueError(f"fused_moe_reference: int8_steps is for int4 weights, not {w13.dtype}")
    act_group = block_shape[1] if block_shape else 128

    def act(x: torch.Tensor, step: int | None) -> torch.Tensor:
        if step:
            q, scale, _ = per_token_group_quant_int8_reference(x, step)
            return dequantize_groups_int8(q, scale, step)
        if not quantize_activations:
            return x.float()
        return dequantize_groups_fp8(*per_token_group_quant_fp8_reference(x, act_group), act_group)

    def slot_weights(slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        if int4:
            return (
                dequantize_int4(
                    Int4Weight(w13[slot], w13_scale[slot], None if w13_zeros is None else w13_zeros[slot], group)
                ),
                dequantize_int4(
                    Int4Weight(w2[slot], w2_scale[slot], None if w2_zeros is None else w2_zeros[slot], group)
                ),
            )
        if w13.dtype == torch.float8_e4m3fn:
            return (
                dequantize_block_fp8(w13[slot], w13_scale[slot], *block_shape),
                dequantize_block_fp8(w2[slot], w2_scale[slot], *block_shape),
            )
        return w13[slot].float(), w2[slot].float()

    for e, slot in zip(experts.tolist(), expert_to_slot[experts].tolist()):  # one read of the table
        if slot < 0:
            raise ValueError(f"fused_moe_reference: routed expert {e} has no slot (expert_to_slot[{e}] == -1)")
        tok, j = torch.where(ids == e)
        w_gu, w_d = slot_weights(slot)
        N = w_gu.shape[0] // 2
        x = act(hidden[tok], int8_steps[0])
        h = (F.silu(x @ w_gu[:N].T) * (x @ w_gu[N:].T)).to(hidden.dtype)
        yield tok, j, act(h, int8_steps[1]) @ w_d.T
