"""Prefetch: predict layer l+1's experts from layer l's hidden state and start their copies early.

The prediction is layer l+1's own router (model.moe.route) applied to the hidden state available
at layer l (the residual stream before l+1's attention changes it); the copies run on the cache's
side stream (by the UVA copy kernel, or by the copy engine) while layer l+1's attention runs, and
layer l+1's miss service waits on them. Precision (predicted experts that were used) and recall
(used experts that were predicted) are counted on the device by the claim kernel (stats
prefetch_tp / prefetch_predicted / prefetch_actual).
"""

from __future__ import annotations

import torch

from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import route


class Prefetcher:
    def __init__(self, runner, cfg: GlmMoeDsaConfig, routers: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 path: str = "sm") -> None:
        """routers: layer -> (gate weight [E, hidden], e_score_correction_bias [E]) of that MoE layer."""
        if path not in ("sm", "ce"):
            raise ValueError(f"prefetch path '{path}' unknown (choose sm or ce)")
        self.runner, self.cfg, self.routers, self.path = runner, cfg, routers, path

    def predict(self, next_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [tokens, hidden_size] at the current layer -> predicted topk_ids [tokens, k] int32."""
        w, b = self.routers[next_layer]
        _, ids = route(hidden, w, b, self.cfg)
        return ids

    def __call__(self, next_layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if next_layer not in self.routers or next_layer not in self.runner.layers:
            return None
        ids = self.predict(next_layer, hidden)
        self.runner.prefetch(next_layer, ids, self.path)
        return ids
