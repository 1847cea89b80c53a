"""FP8 e4m3 block quantisation as the GLM-5.1-FP8 release stores it (plain torch).

A quantised linear weight `w: [out, in]` is stored as `weight: float8_e4m3fn [out, in]` plus
`weight_scale_inv: fp32 [ceil(out / block_n), ceil(in / block_k)]`; the real value of element (i, j)
is `weight[i, j] * weight_scale_inv[i // block_n, j // block_k]`, computed in fp32 (edge blocks
are partial). This is the reference dequantisation; kernels compare against it.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0


def scale_shape(out_features: int, in_features: int, block_n: int, block_k: int) -> tuple[int, int]:
    return (-(-out_features // block_n), -(-in_features // block_k))


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_n: int, block_k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """weight: [..., out, in] fp8; scale_inv: [..., ceil(out/bn), ceil(in/bk)] -> [..., out, in] `dtype`."""
    out_f, in_f = weight.shape[-2:]
    s = scale_inv.float().repeat_interleave(block_n, dim=-2)[..., :out_f, :]
    s = s.repeat_interleave(block_k, dim=-1)[..., :in_f]
    return (weight.float() * s).to(dtype)


def quantize_block_fp8(w: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (fp8 [out, in], scale_inv fp32 [ceil(out/bn), ceil(in/bk)]); amax / 448 per block."""
    out_f, in_f = w.shape
    rows, cols = scale_shape(out_f, in_f, block_n, block_k)
    padded = w.float().new_zeros(rows * block_n, cols * block_k)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(rows, block_n, cols, block_k)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_E4M3_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.view(rows * block_n, cols * block_k)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def linear_dequantized(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """x [..., in] @ the block-scaled FP8 weight [out, in], dequantised into x's dtype for the product."""
    return torch.nn.functional.linear(x, dequantize_block_fp8(weight, scale_inv, *block, dtype=x.dtype))
