"""`TorchMoERunner`: every routed expert resident on the device, computed by the fused-MoE kernel's torch reference.

The `moe="torch"` runner (and the plain runner the model tests use). Per MoE layer it holds
w13 [E, 2I, K] (gate rows, then up rows) and w2 [E, K, I] in the model dtype, FP8 experts dequantised at
load; a step is `kernels.fused_moe.fused_moe_reference` over them with the identity slot table.
"""

from __future__ import annotations

import torch

from moed.kernels.fused_moe import fused_moe_reference
from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import ExpertWeights


class TorchMoERunner:
    def __init__(self, cfg: GlmMoeDsaConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        q = cfg.quantization
        self.block = (q.block_n, q.block_k) if q is not None else None
        self.w13: dict[int, torch.Tensor] = {}  # layer -> [E, 2I, K]
        self.w2: dict[int, torch.Tensor] = {}  # layer -> [E, K, I]
        self._loaded: dict[int, torch.Tensor] = {}  # layer -> [E] bool
        self.expert_to_slot = torch.arange(cfg.n_routed_experts, dtype=torch.int32, device=self.device)

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        E, K, I = self.cfg.n_routed_experts, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        if layer not in self.w13:
            self.w13[layer] = torch.empty(E, 2 * I, K, dtype=self.dtype, device=self.device)
            self.w2[layer] = torch.empty(E, K, I, dtype=self.dtype, device=self.device)
            self._loaded[layer] = torch.zeros(E, dtype=torch.bool)
        gate, up, down = weights.dequantized(self.block, self.dtype)
        self.w13[layer][expert, :I] = gate
        self.w13[layer][expert, I:] = up
        self.w2[layer][expert] = down
        self._loaded[layer][expert] = True

    def finish_loading(self) -> None:
        for layer, loaded in self._loaded.items():
            missing = (~loaded).nonzero().flatten().tolist()
            if missing:
                raise ValueError(f"MoE layer {layer}: experts {missing[:8]} were never loaded")

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor) -> torch.Tensor:
        return fused_moe_reference(hidden, self.w13[layer], self.w2[layer], topk_ids, topk_weights,
                                   self.expert_to_slot)
