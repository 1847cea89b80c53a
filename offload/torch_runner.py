"""`TorchMoERunner`: every routed expert resident on the device, computed by the fused-MoE kernel's torch reference.

The `moe="torch"` runner (and the plain runner the model tests use). Per MoE layer it holds
w13 [E, 2I, K] (gate rows, then up rows) and w2 [E, K, I] in the model dtype, FP8 experts dequantised at
load; int4 experts (`cfg.expert_format(expert_dtype) == "int4"`) stay int4, a quarter of bf16's bytes, in the host
store's int4 sections stacked over experts (offload/host_store.py: w13 uint8 [E, 2I, K/2], scales, zero points).
A step is `kernels.fused_moe_reference.fused_moe_reference` over them with the identity slot table.
"""

from __future__ import annotations

import torch

from moed.kernels.fused_moe_reference import fused_moe_reference
from moed.model.config import ExpertDtype, GlmMoeDsaConfig
from moed.model.moe import ExpertWeights
from moed.offload.host_store import ExpertLayout


class TorchMoERunner:
    def __init__(
        self,
        cfg: GlmMoeDsaConfig,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        expert_dtype: ExpertDtype = "checkpoint",
    ) -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        q = cfg.quantization
        self.block = (q.block_n, q.block_k) if q is not None else None
        # int4 experts are held as the int4 layout's sections; others dequantised to the model dtype.
        self.int4 = ExpertLayout.for_config(cfg, expert_dtype) if cfg.expert_format(expert_dtype) == "int4" else None
        self.weights: dict[int, dict[str, torch.Tensor]] = {}  # layer -> section name -> [E, ...]
        self._loaded: dict[int, torch.Tensor] = {}  # layer -> [E] bool
        self.expert_to_slot = torch.arange(cfg.n_routed_experts, dtype=torch.int32, device=self.device)

    def _allocate(self, layer: int) -> dict[str, torch.Tensor]:
        E, K, I = self.cfg.n_routed_experts, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        L = self.int4
        if L is not None:
            w = {
                n: torch.zeros(E, *shape, dtype=L.section_dtype(n), device=self.device) for n, shape in L.shapes.items()
            }
        else:
            w = {
                "w13": torch.empty(E, 2 * I, K, dtype=self.dtype, device=self.device),
                "w2": torch.empty(E, K, I, dtype=self.dtype, device=self.device),
            }
        self._loaded[layer] = torch.zeros(E, dtype=torch.bool)
        return w

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        if layer not in self.weights:
            self.weights[layer] = self._allocate(layer)
        w = self.weights[layer]
        if self.int4 is not None:
            self.int4.write_expert({n: t[expert] for n, t in w.items()}, weights, f"layer {layer} expert {expert}")
        else:
            I = self.cfg.moe_intermediate_size
            gate, up, down = weights.dequantized(self.block, self.dtype)
            w["w13"][expert, :I] = gate
            w["w13"][expert, I:] = up
            w["w2"][expert] = down
        self._loaded[layer][expert] = True

    def finish_loading(self) -> None:
        for layer, loaded in self._loaded.items():
            missing = (~loaded).nonzero().flatten().tolist()
            if missing:
                raise ValueError(f"MoE layer {layer}: experts {missing[:8]} were never loaded")

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        w = self.weights[layer]
        kwargs = self.int4.moe_kwargs(w) if self.int4 is not None else {}
        return fused_moe_reference(hidden, w["w13"], w["w2"], topk_ids, topk_weights, self.expert_to_slot, **kwargs)
