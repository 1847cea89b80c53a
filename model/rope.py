"""Rotary position embedding as GLM-5.1 applies it: interleaved pairs, default rope type.

The pairs (x0, x1), (x2, x3), ... rotate by one frequency each; the rotated result is laid out
de-interleaved (all even lanes, then all odd lanes), exactly as transformers'
`apply_rotary_pos_emb_interleave` returns it. Queries and keys go through the same permutation, so
dot products are unchanged and the cached keys keep that layout.
"""

from __future__ import annotations

import torch


def rope_inv_freq(rope_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """inv_freq: [rope_dim // 2] fp32."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float, device=device) / rope_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [tokens] -> cos, sin: [tokens, rope_dim // 2] in `dtype` (rounded like the reference)."""
    freqs = positions[:, None].float() * inv_freq[None, :].to(positions.device)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, rope_dim]; cos, sin: [tokens, rope_dim // 2] -> [tokens, heads, rope_dim]."""
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
