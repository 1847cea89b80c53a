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

Hybrid miss service (`cpu=CpuConfig(...)`): the CPU computes some of a step's missing experts while the
rest are copied, and the host takes no part in the hand-over, so the step needs no host sync and can be
captured in a CUDA graph. Per layer, on the GPU stream: the split kernel (kernels/miss_split.py) counts the
misses, takes the CPU's share from a table of counts the host keeps current from measured rates (the CPU's
re-measured from each job, i.e. under load, per step size), gives the CPU the least-used misses (only copied
experts enter the cache) and writes the job into the CPU's host mailbox; a stream write sets `ready`; the
expert server (a C thread, cpu_experts.ExpertServer) sees it, computes its routes and their weighted sum
per token, and sets `done`; meanwhile the claim kernel skips the CPU's experts, the copies and the fused-MoE
kernel serve the rest and the GPU sums its routes (weights 0 on the CPU's routes); a stream wait on `done`
then lets the CPU's sum be uploaded and added (fp32) before the cast to the hidden dtype.

The draft (MTP) worker builds its own runner over the MTP layers (`layers=cfg.mtp_layer_ids`) with
its own store, cache and budget; `LayerSplitRunner` hands each layer's experts to the runner that
owns it at load, so neither runner's post-init (cache build, pins) ever touches the other's state.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import triton

from moed.formats.fp8 import dequantize_block_fp8
from moed.kernels.expert_copy import STATS
from moed.kernels.miss_split import split_misses, split_misses_reference
from moed.model.config import GlmMoeDsaConfig
from moed.model.moe import ExpertWeights
from moed.offload.cpu_experts import CpuExpertKernel, CpuKernelUnavailable, ExpertServer
from moed.offload.expert_cache import CacheConfig, ExpertCache, LayerCache
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.stats import OffloadLayerStats
from moed.offload.stream_signals import CudaStreamSignals, HostSignals, StreamSignals, StreamSignalsUnavailable

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


@dataclasses.dataclass
class _Hybrid:
    """The hybrid service's buffers: the server and its mailbox, the signals, the table of CPU counts
    (`counts[M, n_miss]`, host memory read by the split kernel), and the split's device outputs."""

    server: ExpertServer
    signals: StreamSignals
    split: Callable[..., None]  # kernels.miss_split.split_misses, or its reference (CacheConfig.use_kernels)
    counts: torch.Tensor  # [max_tokens + 1, R_max + 1] int32
    exclude: torch.Tensor  # [E] int8: 1 = served by the CPU (the claim kernel skips it)
    gpu_weights: torch.Tensor  # [R_max] fp32: the routing weights, 0 on the CPU's routes
    sort: torch.Tensor  # [next_pow2(E)] int64 scratch


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """Hybrid miss service: CPU experts next to copies. `enabled=False` keeps results exact FP8."""

    def __post_init__(self) -> None:
        if self.policy not in ("hybrid", "cpu"):
            raise ValueError(f"CPU miss-service policy {self.policy!r}: expected hybrid or cpu")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"CPU experts: need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, "
                             f"{self.max_tokens}")

    enabled: bool = True
    policy: str = "hybrid"  # hybrid: misses split between CPU and copies; cpu: every miss on the CPU
    threads: int = 0  # 0: every core this process may use
    # without a C compiler or stream memory operations: copy every miss (logged) instead of failing at load
    fallback_to_copy: bool = False
    max_tokens: int = 8  # above this many tokens a step copies and computes on the GPU (prefill)
    min_tokens: int = 1  # below this many tokens a step copies every miss
    spin_s: float = 0.05  # the server polls its mailbox without sleeping for this long after a job
    cpu_rate: float | None = None  # bytes/s; None: measured at start-up
    copy_rate: float | None = None  # bytes/s; None: measured at start-up


class OffloadMoERunner:
    """Routed experts of `layers` held in pinned host slabs and served through a GPU slot cache."""

    @property
    def supports_cuda_graphs(self) -> bool:
        """Capturable when a step reads no host state: misses served by the SM copy kernel (copy-engine misses wait on
        host events). CPU experts are: their hand-over is stream memory operations, captured as graph nodes."""
        return self.cache_cfg.copy_path == "sm"

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
        self._hybrid: _Hybrid | None = None
        self._layer_index = {layer: i for i, layer in enumerate(self.layers)}
        self.split_log: collections.deque[dict] = collections.deque(maxlen=1024)  # the last splits (tests, bench)
        self.copy_rate = 0.0
        self._cpu_rates = np.zeros(self.cpu_cfg.max_tokens + 1)  # bytes/s per step size, re-measured under load
        self._table_rates: np.ndarray | None = None  # the rates the counts table was built from
        self._errors_seen = 0

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
            try:
                signals: StreamSignals = (CudaStreamSignals(self.device) if self.device.type == "cuda"
                                          else HostSignals(self.cpu_kernel.lib.wait_u32))
            except StreamSignalsUnavailable as e:
                if not self.cpu_cfg.fallback_to_copy:
                    raise
                log.warning("%s: CPU experts need stream memory operations (%s); every miss is copied", self.name, e)
                self.cpu_kernel = None
        if self.cpu_kernel is not None:
            self._cpu_rates[:] = self.cpu_cfg.cpu_rate or self._measure_cpu_rate()
            self.copy_rate = self.cpu_cfg.copy_rate or self._measure_copy_rate()
            self._start_hybrid(signals)
            log.info("%s: miss service %s, rates measured at start-up: CPU experts %.1f GB/s, copies %.1f GB/s -> "
                     "%.0f%% of missed bytes on the CPU in steps of %d to %d tokens (other steps copy)", self.name,
                     self.cpu_cfg.policy, self.cpu_rate / 1e9, self.copy_rate / 1e9,
                     100 * (1.0 if self.cpu_cfg.policy == "cpu" else self.cpu_share), self.cpu_cfg.min_tokens,
                     self.cpu_cfg.max_tokens)
        else:
            log.info("%s: miss service copy (every miss copied to the GPU; results exact)", self.name)

    def _start_hybrid(self, signals: StreamSignals) -> None:
        assert self.cpu_kernel is not None
        k, E, T = self.cfg.num_experts_per_tok, self.layout.num_experts, self.cpu_cfg.max_tokens
        cuda = self.device.type == "cuda"
        server = self.cpu_kernel.serve([self.store.sections(layer) for layer in self.layers], T, k, pin=cuda,
                                       spin_s=self.cpu_cfg.spin_s)
        d = self.device
        use = self.cache_cfg.use_kernels if self.cache_cfg.use_kernels is not None else True
        self._hybrid = _Hybrid(server, signals, split=split_misses if use else split_misses_reference,
                               counts=torch.zeros(T + 1, T * k + 1, dtype=torch.int32, pin_memory=cuda),
                               exclude=torch.zeros(E, dtype=torch.int8, device=d),
                               gpu_weights=torch.zeros(T * k, dtype=torch.float32, device=d),
                               sort=torch.zeros(triton.next_power_of_2(E), dtype=torch.int64, device=d))
        self._build_counts()

    @property
    def cpu_rate(self) -> float:
        """The CPU experts' rate (bytes/s) in batch-1 steps, as last measured."""
        return float(self._cpu_rates[1]) if self.cpu_kernel is not None else 0.0

    @cpu_rate.setter
    def cpu_rate(self, rate: float) -> None:
        """Set the CPU's rate for every step size (later jobs re-measure it unless CpuConfig.cpu_rate is set)."""
        self._cpu_rates[:] = rate
        if self._hybrid is not None:
            self._build_counts()

    @property
    def cpu_share(self) -> float:
        """Fraction of missed bytes given to the CPU in batch-1 steps so that CPU and copies finish together."""
        if self.cpu_kernel is None or self.cpu_rate <= 0:
            return 0.0
        return self.cpu_rate / (self.cpu_rate + self.copy_rate)

    def _cpu_counts(self, rate: float, max_misses: int) -> np.ndarray:
        """For 0..max_misses misses, how many experts the CPU computes at `rate` bytes/s: the split (whole experts)
        whose slower side ends first (both sides start as soon as the split kernel has run); ties go to the CPU."""
        n = np.arange(max_misses + 1)
        if self.cpu_cfg.policy == "cpu" or self.copy_rate <= 0:
            return n
        if rate <= 0:
            return np.zeros_like(n)
        c = n[:, None]  # candidate CPU counts (rows) per miss count (columns)
        t = np.maximum(c / rate, (n[None, :] - c) / self.copy_rate)
        t = np.where(c <= n[None, :], t, np.inf)
        return c.shape[0] - 1 - np.argmin(t[::-1], axis=0)  # the largest c among the fastest

    def _build_counts(self) -> None:
        """Refill the split kernel's table from the current rates (host memory: the next split reads it)."""
        h = self._hybrid
        assert h is not None
        rates = self._cpu_rates.copy()
        table = h.counts.numpy()
        for M in range(table.shape[0]):
            table[M] = self._cpu_counts(float(rates[M]), table.shape[1] - 1)
        self._table_rates = rates

    def _refresh(self) -> None:
        """Take in the server's new job records: the split log, and the CPU's rate per step size measured under load
        (an EMA); refill the counts table when a rate moved by more than 5%."""
        h = self._hybrid
        if h is None:
            return
        if h.server.errors != self._errors_seen:
            self._errors_seen = h.server.errors
            log.error("%s: the CPU expert server got %d unreadable jobs (answered with zeros)", self.name,
                      self._errors_seen)
        recs = h.server.new_records()
        if not len(recs):
            return
        eb = self.layout.expert_bytes
        for li, n_miss, n_cpu, M, _rows, t0, t1 in recs.tolist():
            self.split_log.append({"layer": self.layers[int(li)], "tokens": int(M), "misses": int(n_miss),
                                   "cpu": int(n_cpu), "copy": int(n_miss - n_cpu), "cpu_s": t1 - t0,
                                   "t_start": t0, "t_end": t1})
            if n_cpu > 0 and t1 > t0 and self.cpu_cfg.cpu_rate is None:
                m = int(M)
                self._cpu_rates[m] = 0.8 * self._cpu_rates[m] + 0.2 * n_cpu * eb / (t1 - t0)
        assert self._table_rates is not None
        if np.any(np.abs(self._cpu_rates - self._table_rates) > 0.05 * self._table_rates):
            self._build_counts()

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
        """Per-layer counters (a sync: off the step path). The CPU's come from the expert server's own counts, so
        they may trail steps still in flight."""
        assert self.cache is not None
        self._refresh()
        out = []
        eb = self.layout.expert_bytes
        cpu = self._hybrid.server.layer_stats if self._hybrid is not None else None
        for layer, lc in self.cache.layers.items():
            s = dict(zip(STATS, lc.tables.stats.tolist()))
            sm_bytes = (s["misses"] + s["prefetch_copies"]) * eb if self.cache_cfg.copy_path == "sm" else 0
            n_cpu, cpu_s = (0, 0.0) if cpu is None else (int(cpu[self._layer_index[layer], 1]),
                                                          float(cpu[self._layer_index[layer], 3]))
            out.append(OffloadLayerStats(
                layer=layer, hits=s["hits"], misses=s["misses"] + n_cpu, bytes_copied_sm=sm_bytes,
                bytes_copied_ce=lc.bytes_ce, bytes_cpu=n_cpu * eb, evictions=s["evictions"], stall_s=cpu_s,
                cpu_experts=n_cpu, prefetch_tp=s["prefetch_tp"], prefetch_predicted=s["prefetch_predicted"],
                prefetch_actual=s["prefetch_actual"], steps=s["steps"]))
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
        elif self._hybrid is not None and self.cpu_cfg.min_tokens <= M <= self.cpu_cfg.max_tokens:
            return self._run_hybrid(layer, lc, hidden, hidden_rep, ids, topk_weights)
        else:
            lc.wait_prefetch()
            route_out = self._serve_gpu(lc, hidden_rep, ids, None)
        y = route_out.view(M, k, -1).float() * topk_weights.float()[..., None]
        return y.sum(dim=1).to(hidden.dtype)

    def _serve_gpu(self, lc: LayerCache, hidden_rep: torch.Tensor, ids: torch.Tensor,
                   exclude: torch.Tensor | None) -> torch.Tensor:
        """Every route's expert output on the GPU, in rounds of what fits the cache (routes of `exclude`d experts:
        computed against the dummy slot, finite, to be weighed 0)."""
        M, k = ids.shape
        round_ids = torch.empty_like(ids)
        mask = torch.empty(M, k, dtype=torch.int8, device=self.device)
        route_out = None
        for r in range(lc.rounds_for(min(self.layout.num_experts, M * k))):
            lc.serve_round(ids, r, round_ids, mask, exclude=exclude)
            y = self._route_outputs(lc, hidden_rep, round_ids)
            route_out = y if route_out is None else torch.where(mask.view(-1, 1) != 0, y, route_out)
        assert route_out is not None
        return route_out

    def _run_hybrid(self, layer: int, lc: LayerCache, hidden: torch.Tensor, hidden_rep: torch.Tensor,
                    ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Split the misses on the device, hand the CPU its job through the mailbox, serve the rest on the GPU, and
        add the CPU's per-token sum after the stream has waited for it. Queues work only: no host sync."""
        h = self._hybrid
        assert h is not None
        self._refresh()
        M, k = ids.shape
        mb, sig = h.server, h.signals
        lc.wait_prefetch()
        # A stale done (a job whose step failed between the hand-over and the wait) must not answer this one.
        sig.write(mb.done_addr, 0)
        h.split(ids, topk_weights.contiguous(), hidden, lc.tables.expert_to_slot, lc.tables.expert_freq, h.counts[M],
              header=mb.header, cpu_experts=mb.experts, ids_out=mb.ids, w_out=mb.w, x_out=mb.x, exclude=h.exclude,
              gpu_weights=h.gpu_weights, sort_scratch=h.sort, layer_index=self._layer_index[layer])
        sig.write(mb.ready_addr, 1)
        try:
            route_out = self._serve_gpu(lc, hidden_rep, ids, h.exclude)
            # The GPU's routes summed while the CPU computes (its routes weigh 0).
            gw = h.gpu_weights[: M * k].view(M, k, 1)
            gpu = (route_out.view(M, k, -1).float() * gw).sum(dim=1)
        finally:  # the stream waits for the server whatever happened above, so the mailbox stays in step
            sig.wait_eq(mb.done_addr, 1)
        return gpu.add_(mb.out[:M].to(self.device, non_blocking=True)).to(hidden.dtype)

    def close(self) -> None:
        """Stop the CPU expert server once the device has drained (a stream may still wait on it)."""
        if self._hybrid is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._hybrid.server.close()
            self._hybrid = None
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

