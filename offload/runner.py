"""`OffloadMoERunner`: the MoE runner (model.moe.MoERunner) for one role's layers over a host store and a GPU cache.

Per MoE layer and step (hidden: [M, K], topk_ids / topk_weights: [M, k]):
  1. rounds = ceil(min(E, M*k) / unpinned slots) (known on the host, no sync; 1 when all fit);
  2. each round: the claim kernel maps ids to slots and claims victims, the copy kernel (or the
     copy engine) brings the missing experts in, and the fused-MoE kernel computes the routes this
     round serves into their rows of route_out [M*k, K] (the claim gives the others the dummy id E,
     which lies outside the table the kernel is handed, expert_to_slot[:E]: they are not computed),
     so a step computes each route once however many rounds its experts take;
  3. out[m] = sum_j topk_weights[m, j] * route_out[m*k + j] in fp32, j in order, cast to hidden's dtype.
Every route's output depends only on its token and its expert's weights, and each expert is served
whole in one round, so the result is bit-identical whatever the cache size, pins, policy or copy
path. Small steps may instead split their misses with the CPU (hybrid.py). Each role (the target, the
MTP draft) has its own runner, store, cache and budget; routed_experts.py builds them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from moed.kernels.expert_claim import STATS
from moed.kernels.fused_moe import fused_moe_routes
from moed.kernels.fused_moe_int4 import fused_moe_int4_routes
from moed.kernels.fused_moe_reference import fused_moe_routes_reference
from moed.model.config import ExpertDtype, GlmMoeDsaConfig
from moed.model.moe import ExpertWeights
from moed.offload.expert_cache import CacheConfig, ExpertCache, LayerCache
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.hybrid import CpuConfig, HybridMissService, start_hybrid
from moed.offload.stats import OffloadLayerStats

log = logging.getLogger(__name__)

# Per-route expert outputs, as kernels.fused_moe.fused_moe_routes: (hidden [M, K], w13, w2, ids [M, k], route weights
# [M * k], expert_to_slot, *, w13_scale, w2_scale, block_shape, out [M * k, K], config_tokens) -> out.
MoEFn = Callable[..., torch.Tensor]


# Tokens whose routes are weighed and summed at once: the fp32 products of a whole step would be 2 x M*k*K*4 bytes
# (12.9 GB at a 32k-token prefill of GLM-5.1), beyond the memory an automatic cache budget leaves for activations.
WEIGHTED_SUM_TOKENS = 2048


def _weighted_sum(route_out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_j weights[t, j] * route_out[t, j] in fp32 for route_out [M, k, K], WEIGHTED_SUM_TOKENS tokens at a time
    (the same bits as in one go: each token's sum is its own)."""
    M = route_out.shape[0]
    if M <= WEIGHTED_SUM_TOKENS:
        return (route_out.float() * weights.float()[..., None]).sum(dim=1).to(dtype)
    out = torch.empty((M, route_out.shape[2]), dtype=dtype, device=route_out.device)
    for m0 in range(0, M, WEIGHTED_SUM_TOKENS):
        r, w = route_out[m0 : m0 + WEIGHTED_SUM_TOKENS], weights[m0 : m0 + WEIGHTED_SUM_TOKENS]
        out[m0 : m0 + WEIGHTED_SUM_TOKENS] = (r.float() * w.float()[..., None]).sum(dim=1)
    return out


def default_moe_fn(device: torch.device, layout: ExpertLayout) -> MoEFn:
    """The Triton per-route fused-MoE kernel of the layout's format on CUDA (w4a16 for int4 experts); the one torch
    reference of both elsewhere."""
    if device.type != "cuda":
        return fused_moe_routes_reference
    return fused_moe_int4_routes if layout.is_int4 else fused_moe_routes


class OffloadMoERunner:
    """Routed experts of `layers` held in pinned host slabs and served through a GPU slot cache."""

    @property
    def supports_cuda_graphs(self) -> bool:
        """Capturable when a step reads no host state: misses served by the SM copy kernel (copy-engine misses wait on
        host events). CPU experts are: their hand-over is stream memory operations, captured as graph nodes."""
        return self.cache_cfg.copy_path == "sm"

    def __init__(
        self,
        cfg: GlmMoeDsaConfig,
        layers: list[int] | None = None,
        *,
        device: torch.device | str = "cuda",
        expert_dtype: ExpertDtype = "checkpoint",
        slots: int | dict[int, int] | None = None,
        budget_bytes: int | None = None,
        cache: CacheConfig | None = None,
        cpu: CpuConfig | None = None,
        moe_fn: MoEFn | None = None,
        pin_host: bool | None = None,
        name: str = "target",
        initial: dict[int, list[int]] | None = None,
        store: HostExpertStore | None = None,
    ) -> None:
        self.cfg, self.name = cfg, name
        self.device = torch.device(device)
        if layers is None:
            layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
        bad = [layer for layer in layers if not cfg.is_moe_layer(layer)]
        if bad:
            raise ValueError(
                f"{name} runner: layers {bad} are not MoE layers (first_k_dense_replace={cfg.first_k_dense_replace})"
            )
        self.layers = list(layers)
        self.layout = ExpertLayout.for_config(cfg, expert_dtype)
        if store is not None and (store.layout != self.layout or store.layers != self.layers):
            raise ValueError(
                f"{name} runner: the given host store holds layers {store.layers} as {store.layout}, "
                f"this runner needs layers {self.layers} as {self.layout}"
            )
        # A shared, already filled store (benchmarks comparing caches over one slab set).
        self.store = store if store is not None else HostExpertStore(self.layout, self.layers, pin=pin_host)
        self.cache_cfg = cache or CacheConfig()
        self.cpu_cfg = cpu  # None: every miss is copied
        self._slots, self._initial = slots, initial
        # the cache's budget; may be set until finish_loading (routed_experts.py sizes it after the weights load)
        self.budget_bytes = budget_bytes
        self.moe_fn = moe_fn or default_moe_fn(self.device, self.layout)
        self.cache: ExpertCache | None = None
        self.hybrid: HybridMissService | None = None
        self._ones: dict[int, torch.Tensor] = {}
        # Benchmarks: called on the host once a step's GPU rounds are queued (to record an event there).
        self.after_gpu_rounds: Callable[[], None] | None = None
        self._layer_index = {layer: i for i, layer in enumerate(self.layers)}

    # ------------------------------------------------------------------ loading (MoERunner)

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        self.store.load_expert(layer, expert, weights)

    def finish_loading(self) -> None:
        """Post-init of this runner only: validate the store, build its cache, start the hybrid service."""
        self.store.finish_loading()
        self.cache = ExpertCache(
            self.store,
            self.device,
            self.cache_cfg,
            slots=self._slots,
            budget_bytes=self.budget_bytes,
            initial=self._initial,
        )
        if self.cpu_cfg is not None:
            use = self.cache_cfg.kernels_on(self.device)
            self.hybrid = start_hybrid(
                self.cpu_cfg, self.store, self.cache, self.cfg.num_experts_per_tok, use, self.name, self.moe_fn
            )
        if self.hybrid is None:
            log.info("%s: miss service copy (every miss copied to the GPU; results exact)", self.name)

    @property
    def miss_service(self) -> str:
        """copy, hybrid or cpu: how this runner serves a step's misses (prefill steps always copy)."""
        return self.hybrid.policy if self.hybrid is not None else "copy"

    # ------------------------------------------------------------------ counters (between steps)

    def read_counts(self) -> dict[int, list[int]]:
        """Per-(layer, expert) activations since the last read (a sync; off the step path)."""
        assert self.cache is not None
        out = {}
        for layer, lc in self.cache.layers.items():
            out[layer] = lc.tables.expert_count.tolist()
            lc.tables.expert_count.zero_()
        return out

    def stats(self) -> list[OffloadLayerStats]:
        """Per-layer counters (a sync: off the step path). The CPU's come from the expert server's own counts, so
        they may trail steps still in flight."""
        assert self.cache is not None
        if self.hybrid is not None:
            self.hybrid.refresh()
        out = []
        eb = self.layout.expert_bytes
        cpu = self.hybrid.server.layer_stats if self.hybrid is not None else None
        for layer, lc in self.cache.layers.items():
            s = dict(zip(STATS, lc.tables.stats.tolist()))
            sm_bytes = s["misses"] * eb if self.cache_cfg.copy_path == "sm" else 0
            n_cpu, cpu_s = (
                (0, 0.0)
                if cpu is None
                else (int(cpu[self._layer_index[layer], 1]), float(cpu[self._layer_index[layer], 3]))
            )
            out.append(
                OffloadLayerStats(
                    layer=layer,
                    hits=s["hits"],
                    misses=s["misses"] + n_cpu,
                    bytes_copied_sm=sm_bytes,
                    bytes_copied_ce=lc.bytes_ce,
                    bytes_cpu=n_cpu * eb,
                    evictions=s["evictions"],
                    stall_s=cpu_s,
                    cpu_experts=n_cpu,
                    steps=s["steps"],
                )
            )
        return out

    # ------------------------------------------------------------------ the step

    def _ones_for(self, n: int) -> torch.Tensor:
        t = self._ones.get(n)
        if t is None:
            t = self._ones[n] = torch.ones(n, dtype=torch.float32, device=self.device)
        return t

    def _route_outputs(
        self, lc: LayerCache, hidden: torch.Tensor, ids: torch.Tensor, route_out: torch.Tensor
    ) -> torch.Tensor:
        """Write the rows of route_out [M*k, K] whose ids [M, k] are real experts (< E); the dummy id E is outside the
        table handed to the kernel, so those routes are not computed. Tiles are looked up as when each route was a row
        of its own against the whole table (M*k tokens, E + 1 ids), so outputs are the same bits as then."""
        L = self.layout
        table = lc.tables.expert_to_slot
        return self.moe_fn(
            hidden,
            lc.w13,
            lc.w2,
            ids,
            self._ones_for(ids.numel()),
            table[: L.num_experts],
            out=route_out,
            config_tokens=ids.numel(),
            config_ids=table.numel(),
            **lc.moe_kwargs,
        )

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError(f"{self.name} runner: run() before finish_loading()")
        if layer not in self.cache.layers:
            raise KeyError(f"{self.name} runner does not serve MoE layer {layer} (serves {self.layers})")
        lc = self.cache[layer]
        M, k = topk_ids.shape
        ids = topk_ids.to(torch.int32).contiguous()
        if lc.static:
            route_out = self._route_outputs(lc, hidden, ids, self._route_buffer(hidden, ids, zero=False))
        elif self.hybrid is not None and self.hybrid.takes(M):
            return self.hybrid.run(self._layer_index[layer], lc, hidden, ids, topk_weights, self._serve_gpu)
        else:
            route_out = self._serve_gpu(lc, hidden, ids, None)
        return _weighted_sum(route_out.view(M, k, -1), topk_weights, hidden.dtype)

    def _route_buffer(self, hidden: torch.Tensor, ids: torch.Tensor, zero: bool) -> torch.Tensor:
        """route_out [M*k, K]; zeroed when some routes are served elsewhere (their rows are then never written and
        are weighed 0, which must not meet a NaN of uninitialised memory)."""
        shape = (ids.numel(), hidden.shape[1])
        return (torch.zeros if zero else torch.empty)(shape, dtype=hidden.dtype, device=hidden.device)

    def _serve_gpu(
        self, lc: LayerCache, hidden: torch.Tensor, ids: torch.Tensor, exclude: torch.Tensor | None
    ) -> torch.Tensor:
        """Every route's expert output [M*k, K] on the GPU, in rounds of what fits the cache; each round computes only
        the routes it serves (routes of `exclude`d experts: left 0, to be weighed 0)."""
        M, k = ids.shape
        round_ids = torch.empty_like(ids)
        mask = torch.empty(M, k, dtype=torch.int8, device=self.device)
        route_out = self._route_buffer(hidden, ids, zero=exclude is not None)
        for r in range(lc.rounds_for(min(self.layout.num_experts, M * k))):
            lc.serve_round(ids, r, round_ids, mask, exclude=exclude)
            self._route_outputs(lc, hidden, round_ids, route_out)
        if self.after_gpu_rounds is not None:
            self.after_gpu_rounds()
        return route_out

    def close(self) -> None:
        """Stop the CPU expert server (once the device has drained)."""
        if self.hybrid is not None:
            self.hybrid.close()
            self.hybrid = None
