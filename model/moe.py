"""GLM-5.1's MoE block pieces: the router, an expert's weights as stored, and the MoE runner interface.

The router (sigmoid scores; `e_score_correction_bias` added for the choice only; grouped top-k over
n_group/topk_group; top-k weights normalised and scaled by routed_scaling_factor) runs in fp32
as the reference does. Routed-expert compute goes through a `MoERunner`: it receives each
(layer, expert)'s weights once at load, one at a time, so a runner can place them anywhere
(pinned host slab, GPU cache) without staging the layer anywhere else; then per step it maps
`hidden, topk_ids, topk_weights` to the weighted sum of the chosen experts' outputs. The runners live in
offload/ (routed_experts.py builds them: every expert resident, or offloaded).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F

from moed.formats.fp8 import dequantize_block_fp8
from moed.formats.int4 import Int4Weight, dequantize_int4
from moed.model.config import GlmMoeDsaConfig


@dataclasses.dataclass
class ExpertWeights:
    """One routed expert as stored: each projection in its checkpoint dtype, FP8 ones with block scales, int4 ones
    (`moed.formats.int4`: uint8 packed values) with group scales and, when asymmetric, packed zero points."""

    gate_proj: torch.Tensor  # [moe_intermediate_size, hidden_size] (int4: uint8 [I, H / 2])
    up_proj: torch.Tensor  # [moe_intermediate_size, hidden_size]
    down_proj: torch.Tensor  # [hidden_size, moe_intermediate_size] (int4: uint8 [H, I / 2])
    # Scales that multiply the weights: FP8: fp32 [ceil(I / bn), ceil(H / bk)] (`weight_scale_inv`);
    # int4: [I, ceil(H / group)] (`weight_scale`, bf16 when moed quantised).
    gate_scale_inv: torch.Tensor | None = None
    up_scale_inv: torch.Tensor | None = None
    down_scale_inv: torch.Tensor | None = None
    gate_zeros: torch.Tensor | None = None  # int4 asymmetric: int32 [I / 8, ceil(H / group)]
    up_zeros: torch.Tensor | None = None
    down_zeros: torch.Tensor | None = None
    group_size: int | None = None  # int4: inputs per scale

    @property
    def is_fp8(self) -> bool:
        return self.gate_proj.dtype == torch.float8_e4m3fn

    @property
    def is_int4(self) -> bool:
        return self.gate_proj.dtype == torch.uint8

    @property
    def nbytes(self) -> int:
        ts = [
            self.gate_proj,
            self.up_proj,
            self.down_proj,
            self.gate_scale_inv,
            self.up_scale_inv,
            self.down_scale_inv,
            self.gate_zeros,
            self.up_zeros,
            self.down_zeros,
        ]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def int4(self) -> tuple[Int4Weight, Int4Weight, Int4Weight]:
        """(gate, up, down) as Int4Weight views (no copies); only for int4 experts."""
        assert self.is_int4 and self.group_size is not None
        return (
            Int4Weight(self.gate_proj, self.gate_scale_inv, self.gate_zeros, self.group_size),
            Int4Weight(self.up_proj, self.up_scale_inv, self.up_zeros, self.group_size),
            Int4Weight(self.down_proj, self.down_scale_inv, self.down_zeros, self.group_size),
        )

    @classmethod
    def from_int4(cls, gate: Int4Weight, up: Int4Weight, down: Int4Weight) -> ExpertWeights:
        return cls(
            gate.qweight,
            up.qweight,
            down.qweight,
            gate.scales,
            up.scales,
            down.scales,
            gate.zeros,
            up.zeros,
            down.zeros,
            gate.group,
        )

    def dequantized(self, block: tuple[int, int] | None, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) in `dtype`, dequantised exactly as the reference does when FP8 or int4."""
        if self.is_int4:
            return tuple(dequantize_int4(w, dtype) for w in self.int4())
        out = []
        for w, s in (
            (self.gate_proj, self.gate_scale_inv),
            (self.up_proj, self.up_scale_inv),
            (self.down_proj, self.down_scale_inv),
        ):
            if w.dtype == torch.float8_e4m3fn:
                assert s is not None and block is not None
                out.append(dequantize_block_fp8(w, s, *block, dtype=dtype))
            else:
                out.append(w.to(dtype))
        return tuple(out)


def route(
    hidden: torch.Tensor, gate_weight: torch.Tensor, correction_bias: torch.Tensor, cfg: GlmMoeDsaConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [tokens, hidden_size] -> (topk_weights fp32 [tokens, k], topk_ids int32 [tokens, k])."""
    logits = F.linear(hidden.float(), gate_weight.float())  # [tokens, E]
    scores = logits.sigmoid()
    choice = scores + correction_bias.float()
    E, G = cfg.n_routed_experts, cfg.n_group
    if G > 1:
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # [tokens, G]
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask[:, :, None].expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    topk_ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_ids)
    if cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * cfg.routed_scaling_factor, topk_ids.to(torch.int32)


class MoERunner(Protocol):
    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        """Take one routed expert's weights (called once per (layer, expert) at load)."""
        ...

    def finish_loading(self) -> None:
        """Every expert has been handed over; raise if one is missing."""
        ...

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden: [tokens, hidden_size], topk_ids int32 / topk_weights fp32: [tokens, k] -> [tokens, hidden_size]."""
        ...
