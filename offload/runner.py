"""`OffloadMoERunner`: the MoE runner (model.moe.MoERunner) on top of the host store and the GPU cache.

Per MoE layer and step (hidden: [M, K], topk_ids / topk_weights: [M, k]):
  1. rounds = ceil(min(E, M*k) / unpinned slots) (known on the host, no sync; 1 when all fit);
  2. each round: the claim kernel maps ids to slots and claims victims, the copy kernel (or the
     copy engine) brings the missing experts in, and the fused-MoE kernel computes every route
     [M*k, K] (routes not served this round compute against the dummy id E -> slot 0 and are
     discarded by a select);
  3. out[m] = sum_j topk_weights[m, j] * route_out[m*k + j] in fp32, j in order, cast to hidden's dtype.
Every route's output depends only on its token and its expert's weights, and each expert is served
whole in one round, so the result is bit-identical whatever the cache size, pins, policy or copy
path (the all-resident runner computes the same function).

Hybrid miss service (`cpu=CpuConfig(...)`, eager mode only): the host reads the step's ids, the
table, the use counts and the activations in one sync, splits the missing experts (whole experts)
between the CPU kernel and copies by rates measured at start-up (the CPU's refreshed from each job's
own time, i.e. under load) so the slower side ends first; the least-used misses go to the CPU (only
copied experts enter the cache). It marks those experts served-elsewhere for the claim kernel,
queues the GPU rounds, computes the CPU experts on the calling thread while the GPU copies and computes
the rest, and joins the CPU's route outputs (one upload) before the weighted sum.

The draft (MTP) worker builds its own runner over the MTP layers (`layers=cfg.mtp_layer_ids`) with
its own store, cache and budget; `LayerSplitRunner` hands each layer's experts to the runner that
owns it at load, so neither runner's post-init (cache build, pins) ever touches the other's state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moed.kernels.expert_copy import STATS
from moed.model.config import GlmMoeDsaConfig
from moed.model.fp8 import dequantize_block_fp8
from moed.model.moe import ExpertWeights
from moed.offload.cpu_experts import CpuExpertKernel, CpuKernelUnavailable
from moed.offload.expert_cache import CacheConfig, ExpertCache, LayerCache
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.stats import OffloadLayerStats

log = logging.getLogger(__name__)

MoEFn = Callable[..., torch.Tensor]


def slot_moe_torch(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, expert_to_slot: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
                   w2_scale: torch.Tensor | None = None, block_shape: tuple[int, int] | None = None,
                   config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch MoE over slot-addressed weights, same signature as kernels.fused_moe.fused_moe.

    hidden [M, K]; w13 [S, 2N, K]; w2 [S, K, N]; topk_ids/weights [M, k]; expert_to_slot [num_ids].
    fp32 compute per expert (FP8 dequantised by the reference), routes summed in k order.
    """
    M, k = topk_ids.shape
    N = w2.shape[2]
    acc = torch.zeros(M, k, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    x = hidden.float()
    for e in torch.unique(topk_ids).tolist():  # grouped by expert id, as the fused kernel sorts routes
        s = int(expert_to_slot[e])
        if s < 0:
            raise ValueError(f"routed expert {e} has no slot (expert_to_slot[{e}] == -1)")
        tok, j = torch.where(topk_ids == e)
        if w13.dtype == torch.float8_e4m3fn:
            assert w13_scale is not None and w2_scale is not None and block_shape is not None
            a = dequantize_block_fp8(w13[s], w13_scale[s], *block_shape)
            b = dequantize_block_fp8(w2[s], w2_scale[s], *block_shape)
        else:
            a, b = w13[s].float(), w2[s].float()
        gu = F.linear(x[tok], a)
        acc[tok, j] = F.linear(F.silu(gu[:, :N]) * gu[:, N:], b) * topk_weights[tok, j, None].float()
    res = acc.sum(dim=1).to(hidden.dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res


def default_moe_fn(device: torch.device) -> MoEFn:
    """The Triton fused-MoE kernel on CUDA; the plain-torch slot MoE elsewhere."""
    if device.type == "cuda":
        try:
            from moed.kernels.fused_moe import fused_moe

            return fused_moe
        except ImportError:
            log.warning("moed.kernels.fused_moe is not available: offloaded experts run through the torch slot MoE")
    return slot_moe_torch


class _HostStaging:
    """Host buffers of the hybrid path, reused every layer: pinned on CUDA so the copies are asynchronous.
    ids [R] int32 (R = tokens x k routes), x [R, K] fp32 activations, e2s [E] int32 slot table, freq [E] fp32
    use counts, flags [E] int8 CPU-served marks, xr [R, K] fp32 the CPU routes' rows grouped by expert (never
    copied, not pinned), y [R, K] fp32 their outputs, rows [R] int64 their route indices."""

    def __init__(self, routes: int, num_experts: int, hidden: int, pin: bool) -> None:
        def buf(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=pin)

        self.ids = buf((routes,), torch.int32)
        self.x = buf((routes, hidden), torch.float32)
        self.e2s = buf((num_experts,), torch.int32)
        self.freq = buf((num_experts,), torch.float32)
        self.flags = buf((num_experts,), torch.int8)
        self.xr = torch.empty((routes, hidden), dtype=torch.float32)  # the CPU routes' rows, grouped by expert
        self.y = buf((routes, hidden), torch.float32)
        self.rows = buf((routes,), torch.int64)


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """Hybrid miss service: CPU experts next to copies. `enabled=False` keeps results exact FP8."""

    def __post_init__(self) -> None:
        if self.policy not in ("hybrid", "cpu"):
            raise ValueError(f"CPU miss-service policy {self.policy!r}: expected hybrid or cpu")

    enabled: bool = True
    policy: str = "hybrid"  # hybrid: misses split between CPU and copies; cpu: every miss on the CPU
    threads: int = 0  # 0: every core this process may use
    fallback_to_copy: bool = False  # without a C compiler: copy every miss (logged) instead of failing at load
    max_tokens: int = 8  # above this many tokens a step copies and computes on the GPU (prefill)
    # Below this many tokens a step copies too, so those steps stay capturable in CUDA graphs: at batch 1 the
    # hybrid path's per-layer host sync costs more than the CPU saves (docs/benchmarks.md, Engine).
    min_tokens: int = 2
    cpu_rate: float | None = None  # bytes/s; None: measured at start-up
    copy_rate: float | None = None  # bytes/s; None: measured at start-up


class OffloadMoERunner:
    """Routed experts of `layers` held in pinned host slabs and served through a GPU slot cache."""

    @property
    def supports_cuda_graphs(self) -> bool:
        """Capturable when a step reads no host state: misses served by the SM copy kernel (copy-engine misses
        wait on host events) and no CPU experts (they sync once per layer), which holds for steps of fewer
        than `cpu.min_tokens` tokens: see `graph_max_tokens`."""
        return self.cache_cfg.copy_path == "sm" and (self.graph_max_tokens is None or self.graph_max_tokens > 0)

    @property
    def graph_max_tokens(self) -> int | None:
        """The most tokens a captured step may have (None: no limit): with CPU experts, steps below
        `cpu.min_tokens` never take the CPU path."""
        return None if self.cpu_kernel is None else self.cpu_cfg.min_tokens - 1

    def __init__(self, cfg: GlmMoeDsaConfig, layers: list[int] | None = None, *, device: torch.device | str = "cuda",
                 fp8: bool | None = None, slots: int | dict[int, int] | None = None,
                 budget_bytes: int | None = None, cache: CacheConfig | None = None, cpu: CpuConfig | None = None,
                 moe_fn: MoEFn | None = None, pin_host: bool | None = None, name: str = "target",
                 initial: dict[int, list[int]] | None = None, store: HostExpertStore | None = None) -> None:
        self.cfg, self.name = cfg, name
        self.device = torch.device(device)
        if layers is None:
            layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
        bad = [layer for layer in layers if not cfg.is_moe_layer(layer)]
        if bad:
            raise ValueError(f"{name} runner: layers {bad} are not MoE layers (first_k_dense_replace="
                             f"{cfg.first_k_dense_replace})")
        self.layers = list(layers)
        fp8 = cfg.quantization is not None if fp8 is None else fp8
        self.layout = ExpertLayout.for_config(cfg, fp8)
        if store is not None and (store.layout != self.layout or store.layers != self.layers):
            raise ValueError(f"{name} runner: the given host store holds layers {store.layers} as {store.layout}, "
                             f"this runner needs layers {self.layers} as {self.layout}")
        # A shared, already filled store (benchmarks comparing caches over one slab set).
        self.store = store if store is not None else HostExpertStore(self.layout, self.layers, pin=pin_host)
        self.cache_cfg = cache or CacheConfig()
        self.cpu_cfg = cpu or CpuConfig(enabled=False)
        self._slots, self._budget, self._initial = slots, budget_bytes, initial
        self.moe_fn = moe_fn or default_moe_fn(self.device)
        self.cache: ExpertCache | None = None
        self.cpu_kernel: CpuExpertKernel | None = None
        self._pending_pins: dict[int, set[int]] | None = None
        self._ones: dict[int, torch.Tensor] = {}
        self._stage: _HostStaging | None = None
        self.host_stats = {layer: {"cpu_experts": 0, "bytes_cpu": 0, "stall_s": 0.0} for layer in self.layers}
        self.split_log: list[dict] = []
        self.cpu_rate = self.copy_rate = 0.0

    # ------------------------------------------------------------------ loading (MoERunner)

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        self.store.load_expert(layer, expert, weights)

    def finish_loading(self) -> None:
        """Post-init of this runner only: validate the store, build its cache, measure miss-service rates."""
        self.store.finish_loading()
        self.cache = ExpertCache(self.store, self.device, self.cache_cfg, slots=self._slots,
                                 budget_bytes=self._budget, initial=self._initial)
        if self.cpu_cfg.enabled:
            try:
                self.cpu_kernel = CpuExpertKernel(self.layout, threads=self.cpu_cfg.threads)
            except CpuKernelUnavailable as e:
                if not self.cpu_cfg.fallback_to_copy:
                    raise
                log.warning("%s: CPU experts unavailable (%s); every miss is copied", self.name, e)
        if self.cpu_kernel is not None:
            self.cpu_rate = self.cpu_cfg.cpu_rate or self._measure_cpu_rate()
            self.copy_rate = self.cpu_cfg.copy_rate or self._measure_copy_rate()
            log.info("%s: miss service %s, rates measured at start-up: CPU experts %.1f GB/s, copies %.1f GB/s -> "
                     "%.0f%% of missed bytes on the CPU in steps of %d to %d tokens (other steps copy)", self.name,
                     self.cpu_cfg.policy, self.cpu_rate / 1e9, self.copy_rate / 1e9,
                     100 * (1.0 if self.cpu_cfg.policy == "cpu" else self.cpu_share), self.cpu_cfg.min_tokens,
                     self.cpu_cfg.max_tokens)
        else:
            log.info("%s: miss service copy (every miss copied to the GPU; results exact)", self.name)

    @property
    def cpu_share(self) -> float:
        """Fraction of missed bytes given to the CPU so that CPU and copies finish together."""
        if self.cpu_kernel is None or self.cpu_rate <= 0:
            return 0.0
        return self.cpu_rate / (self.cpu_rate + self.copy_rate)

    def _cpu_count(self, misses: int) -> int:
        """How many of `misses` experts the CPU computes: the split (whole experts) whose slower side ends first."""
        if self.cpu_kernel is None:
            return 0
        if self.cpu_cfg.policy == "cpu" or self.copy_rate <= 0:
            return misses
        if self.cpu_rate <= 0:
            return 0
        ideal = misses * self.cpu_share
        return min({math.floor(ideal), math.ceil(ideal)},
                   key=lambda c: (max(c / self.cpu_rate, (misses - c) / self.copy_rate), -c))

    @property
    def miss_service(self) -> str:
        """copy, hybrid or cpu: how this runner serves a step's misses (prefill steps always copy)."""
        return self.cpu_cfg.policy if self.cpu_kernel is not None else "copy"

    def _measure_cpu_rate(self) -> float:
        assert self.cpu_kernel is not None
        layer = self.layers[0]
        n = min(8, self.layout.num_experts)  # a batch-1 layer's worth of experts
        experts = [self.store.expert(layer, e) for e in range(n)]
        xs = [torch.randn(1, self.layout.hidden) for _ in range(n)]
        self.cpu_kernel.forward_many(experts[:1], xs[:1])
        best = float("inf")
        for _ in range(3):  # best of three: the first runs can meet threads still waking up
            t0 = time.perf_counter()
            self.cpu_kernel.forward_many(experts, xs)
            best = min(best, time.perf_counter() - t0)
        return n * self.layout.expert_bytes / best

    def _measure_copy_rate(self) -> float:
        if self.device.type != "cuda":
            return 1e9  # no copies to measure without a GPU; the CPU tests pass rates explicitly
        lc = self.cache[self.layers[0]]  # type: ignore[index]
        scratch = [torch.empty_like(d[:1]) for d in lc.dst]
        n = min(4, self.layout.num_experts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for e in range(n):
            for a, b in zip(lc.src, scratch):
                b[0].copy_(a[e], non_blocking=True)
        torch.cuda.synchronize()
        return n * self.layout.expert_bytes / (time.perf_counter() - t0)

    # ------------------------------------------------------------------ placement (between steps)

    def request_pins(self, pins: dict[int, set[int]]) -> None:
        """Queue a pin set per layer; applied by `apply_pending` between steps."""
        self._pending_pins = {layer: set(p) for layer, p in pins.items() if layer in self.layers}

    def apply_pending(self) -> bool:
        if self._pending_pins is None or self.cache is None:
            return False
        for layer, pins in self._pending_pins.items():
            self.cache[layer].set_pins(pins)
        self._pending_pins = None
        return True

    def read_counts(self) -> dict[int, list[int]]:
        """Per-(layer, expert) activations since the last read (a sync; off the step path)."""
        assert self.cache is not None
        out = {}
        for layer, lc in self.cache.layers.items():
            out[layer] = lc.tables.expert_count.tolist()
            lc.tables.expert_count.zero_()
        return out

    def stats(self) -> list[OffloadLayerStats]:
        assert self.cache is not None
        out = []
        for layer, lc in self.cache.layers.items():
            s = dict(zip(STATS, lc.tables.stats.tolist()))
            eb = self.layout.expert_bytes
            sm_bytes = (s["misses"] + s["prefetch_copies"]) * eb if self.cache_cfg.copy_path == "sm" else 0
            h = self.host_stats[layer]
            out.append(OffloadLayerStats(
                layer=layer, hits=s["hits"], misses=s["misses"] + h["cpu_experts"], bytes_copied_sm=sm_bytes,
                bytes_copied_ce=lc.bytes_ce, bytes_cpu=h["bytes_cpu"], evictions=s["evictions"],
                stall_s=h["stall_s"], cpu_experts=h["cpu_experts"], prefetch_tp=s["prefetch_tp"],
                prefetch_predicted=s["prefetch_predicted"], prefetch_actual=s["prefetch_actual"], steps=s["steps"]))
        return out

    # ------------------------------------------------------------------ the step

    def prefetch(self, layer: int, predicted_ids: torch.Tensor, path: str = "sm") -> None:
        """Start copies of a coming step's predicted experts of `layer` on the side stream."""
        assert self.cache is not None
        self.cache[layer].prefetch(predicted_ids, path)

    def _ones_for(self, n: int) -> torch.Tensor:
        t = self._ones.get(n)
        if t is None:
            t = self._ones[n] = torch.ones(n, 1, dtype=torch.float32, device=self.device)
        return t

    def _route_outputs(self, lc: LayerCache, hidden_rep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        L = self.layout
        return self.moe_fn(hidden_rep, lc.w13, lc.w2, ids.view(-1, 1), self._ones_for(ids.numel()),
                           lc.tables.expert_to_slot, w13_scale=lc.w13_scale, w2_scale=lc.w2_scale,
                           block_shape=L.block)

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError(f"{self.name} runner: run() before finish_loading()")
        if layer not in self.cache.layers:
            raise KeyError(f"{self.name} runner does not serve MoE layer {layer} (serves {self.layers})")
        lc = self.cache[layer]
        M, k = topk_ids.shape
        ids = topk_ids.to(torch.int32).contiguous()
        hidden_rep = hidden[:, None, :].expand(M, k, hidden.shape[1]).reshape(M * k, -1)  # route r = m * k + j
        if lc.static:
            route_out = self._route_outputs(lc, hidden_rep, ids)
        else:
            lc.wait_prefetch()
            cpu_job = exclude = None
            if self.cpu_kernel is not None and self.cpu_cfg.min_tokens <= M <= self.cpu_cfg.max_tokens:
                cpu_job, exclude = self._start_cpu(layer, lc, hidden, ids)
            distinct = min(self.layout.num_experts, M * k)
            round_ids = torch.empty_like(ids)
            mask = torch.empty(M, k, dtype=torch.int8, device=self.device)
            route_out = None
            for r in range(lc.rounds_for(distinct)):
                lc.serve_round(ids, r, round_ids, mask, exclude=exclude)
                y = self._route_outputs(lc, hidden_rep, round_ids)
                route_out = y if route_out is None else torch.where(mask.view(-1, 1) != 0, y, route_out)
            assert route_out is not None
            if cpu_job is not None:
                route_out = self._join_cpu(layer, cpu_job, route_out)
        y = route_out.view(M, k, -1).float() * topk_weights.float()[..., None]
        return y.sum(dim=1).to(hidden.dtype)

    # ------------------------------------------------------------------ hybrid CPU service

    def _staging(self, M: int, k: int) -> _HostStaging:
        st = self._stage
        if st is None or st.ids.shape[0] < M * k:
            st = self._stage = _HostStaging(M * k, self.layout.num_experts, self.layout.hidden,
                                            pin=self.device.type == "cuda")
        return st

    def _start_cpu(self, layer: int, lc: LayerCache, hidden: torch.Tensor, ids: torch.Tensor):
        """Read the step's ids, the slot table, the use counts and the activations in one sync; pick the CPU's
        experts; mark them for the claim kernel; gather their routes' rows. Returns (job, exclude) or
        (None, None). Vectorised: the host work does not grow with the number of CPU experts."""
        t0 = time.perf_counter()
        M, k = ids.shape
        E = self.layout.num_experts
        st = self._staging(M, k)
        # Every earlier copy out of the staging buffers (the previous layer's CPU results) was queued before
        # these on the same stream, so the one sync below also makes the buffers free to overwrite.
        ids_h, x_h = st.ids[: M * k].view(M, k), st.x[:M]
        ids_h.copy_(ids, non_blocking=True)
        st.e2s.copy_(lc.tables.expert_to_slot[:E], non_blocking=True)
        st.freq.copy_(lc.tables.expert_freq[:E], non_blocking=True)
        x_h.copy_(hidden, non_blocking=True)  # bf16 -> fp32 on the way
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the one host sync of this layer
        flat, e2s = st.ids[: M * k].numpy(), st.e2s.numpy()
        needed = np.unique(flat)
        misses = needed[e2s[needed] < 0]
        n_cpu = self._cpu_count(len(misses))
        if n_cpu == 0:
            self.host_stats[layer]["stall_s"] += time.perf_counter() - t0
            return None, None
        # Only copied experts enter the cache: send the least-used ones to the CPU.
        cpu_experts = misses[np.lexsort((misses, st.freq.numpy()[misses]))][:n_cpu]
        flags = st.flags.numpy()
        flags[:] = 0
        flags[cpu_experts] = 1
        exclude = torch.empty(E, dtype=torch.int8, device=self.device)
        # A copy-engine upload: on the lent H100 a small copy did not queue behind a bulk one (docs/benchmarks.md).
        exclude.copy_(st.flags, non_blocking=True)
        rank = np.full(E, n_cpu, dtype=np.int64)
        rank[cpu_experts] = np.arange(n_cpu)
        sel = np.nonzero(rank[flat] < n_cpu)[0]  # routes r = token * k + j served here
        sel = sel[np.argsort(rank[flat[sel]], kind="stable")]  # grouped by expert, in cpu_experts order
        counts = np.bincount(rank[flat[sel]], minlength=n_cpu)
        R = len(sel)
        st.rows.numpy()[:R] = sel
        np.take(x_h.numpy(), sel // k, axis=0, out=st.xr.numpy()[:R])
        self.split_log.append({"layer": layer, "misses": len(misses), "cpu": n_cpu, "copy": len(misses) - n_cpu,
                               "cpu_share": self.cpu_share})
        h = self.host_stats[layer]
        h["cpu_experts"] += n_cpu
        h["bytes_cpu"] += n_cpu * self.layout.expert_bytes
        h["stall_s"] += time.perf_counter() - t0
        return (cpu_experts, counts, R), exclude

    def _join_cpu(self, layer: int, job: tuple, route_out: torch.Tensor) -> torch.Tensor:
        """Compute the CPU's experts on this thread (the GPU rounds are already queued and run meanwhile; a worker
        thread started before the launches measured no faster), then copy their rows into the route outputs:
        one upload of results, one of row indices."""
        experts, counts, R = job
        st = self._stage
        assert self.cpu_kernel is not None and st is not None
        t0 = time.perf_counter()
        # Releases the GIL while it runs.
        self.cpu_kernel.forward_grouped(self.store.sections(layer), experts, counts, st.xr[:R], st.y[:R])
        busy_s = time.perf_counter() - t0
        self.host_stats[layer]["stall_s"] += busy_s
        if self.cpu_cfg.cpu_rate is None and busy_s > 0:
            # Re-measured under load: the CPU shares memory bandwidth with the copies running beside it.
            self.cpu_rate = 0.8 * self.cpu_rate + 0.2 * len(experts) * self.layout.expert_bytes / busy_s
        y = st.y[:R].to(self.device, non_blocking=True)
        idx = st.rows[:R].to(self.device, non_blocking=True)
        route_out.index_copy_(0, idx, y.to(route_out.dtype))  # route_out is this step's own tensor
        return route_out

    def close(self) -> None:
        self.cpu_kernel = None


class LayerSplitRunner:
    """Hands each MoE layer to the runner that owns it (target or draft); each finishes on its own."""

    def __init__(self, runners: list[OffloadMoERunner]) -> None:
        self.by_layer: dict[int, OffloadMoERunner] = {}
        for r in runners:
            for layer in r.layers:
                if layer in self.by_layer:
                    raise ValueError(f"MoE layer {layer} is claimed by both the {self.by_layer[layer].name} and the "
                                     f"{r.name} runner")
                self.by_layer[layer] = r
        self.runners = runners

    def load_expert(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        if layer not in self.by_layer:
            raise KeyError(f"no runner serves MoE layer {layer} (served: {sorted(self.by_layer)})")
        self.by_layer[layer].load_expert(layer, expert, weights)

    def finish_loading(self) -> None:
        for r in self.runners:
            r.finish_loading()

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor) -> torch.Tensor:
        return self.by_layer[layer].run(layer, hidden, topk_ids, topk_weights)


def rounds_bound(num_experts: int, tokens: int, k: int, unpinned: int) -> int:
    return max(1, math.ceil(min(num_experts, tokens * k) / unpinned))

