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
table, the use counts, the routing weights and the activations in one sync, splits the missing experts
(whole experts) between the CPU kernel and copies by rates measured at start-up (the CPU's refreshed from
each job's own time, i.e. under load; the copies' late start, the host time to queue them, counted) so the
slower side ends first; the least-used misses go to the CPU (only copied experts enter the cache). One
upload sends the claim kernel the CPU's experts (served elsewhere) and the GPU its routing weights (0 on
the CPU's routes). The CPU job starts first, on the kernel's own worker thread (no GIL), computing its
routes and their weighted per-token sum; meanwhile this thread queues the GPU rounds and the GPU routes'
weighted sum; the CPU's sum is then uploaded and added (fp32) before the cast to the hidden dtype.

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
    Read back (one sync): ids [R] int32 (R = tokens x k routes), w [R] fp32 routing weights, x [M, K] fp32
    activations, e2s [E] int32 slot table, freq [E] fp32 use counts. Sent (one upload): up, bytes
    [4 R + E]: the GPU's routing weights fp32 [R] (0 on the CPU's routes), then the CPU-served flags int8 [E].
    The CPU's own: xr [R, K] fp32 its routes' rows grouped by expert, y [R, K] their outputs, tok [R] int64 and
    wr [R] fp32 their tokens and weights; out [M, K] fp32 the weighted per-token sum it returns (uploaded)."""

    def __init__(self, tokens: int, k: int, num_experts: int, hidden: int, pin: bool) -> None:
        def buf(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = pin) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=pinned)

        R = tokens * k
        self.tokens = tokens
        self.ids = buf((R,), torch.int32)
        self.w = buf((R,), torch.float32)
        self.x = buf((tokens, hidden), torch.float32)
        self.e2s = buf((num_experts,), torch.int32)
        self.freq = buf((num_experts,), torch.float32)
        self.up = buf((4 * R + num_experts,), torch.uint8)
        self.xr = buf((R, hidden), torch.float32, False)  # never copied: not pinned
        self.y = buf((R, hidden), torch.float32, False)
        self.tok = buf((R,), torch.int64, False)
        self.wr = buf((R,), torch.float32, False)
        self.out = buf((tokens, hidden), torch.float32)
        # numpy views made once: the split runs on these every layer
        self.np = {n: getattr(self, n).numpy() for n in ("ids", "w", "x", "e2s", "freq", "up", "xr", "tok", "wr")}


@dataclasses.dataclass
class _CpuPlan:
    """One layer's hybrid split (`OffloadMoERunner._plan_cpu`)."""

    experts: np.ndarray  # the CPU's experts, in the order their routes are grouped
    counts: np.ndarray  # routes per CPU expert (they fill rows 0..sum(counts) of the staging's xr / y / tok / wr)
    exclude: torch.Tensor  # [E] int8 on the device: 1 = served by the CPU (the claim kernel skips it)
    gpu_weights: torch.Tensor  # [M, k] fp32 on the device: the routing weights, 0 on the CPU's routes


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
        self.split_log: collections.deque[dict] = collections.deque(maxlen=1024)  # the last splits (tests, bench)
        self.cpu_rate = self.copy_rate = 0.0
        self.launch_delay_s = 0.0  # host time from the CPU's start to the copies' launch (EMA over hybrid steps)

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
        """How many of `misses` experts the CPU computes: the split (whole experts) whose slower side ends first.
        The copies start `launch_delay_s` after the CPU (the host queues the claim and copy kernels after handing
        the CPU its job), so that delay counts on the copy side."""
        if self.cpu_kernel is None:
            return 0
        if self.cpu_cfg.policy == "cpu" or self.copy_rate <= 0:
            return misses
        if self.cpu_rate <= 0:
            return 0
        eb = self.layout.expert_bytes
        return min(range(misses + 1), key=lambda c: (max(c * eb / self.cpu_rate,
                                                         self.launch_delay_s + (misses - c) * eb / self.copy_rate), -c))

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
            plan = None
            if self.cpu_kernel is not None and self.cpu_cfg.min_tokens <= M <= self.cpu_cfg.max_tokens:
                plan = self._plan_cpu(layer, lc, hidden, ids, topk_weights)
            distinct = min(self.layout.num_experts, M * k)
            round_ids = torch.empty_like(ids)
            mask = torch.empty(M, k, dtype=torch.int8, device=self.device)
            route_out = None
            if plan is not None:
                t0 = time.perf_counter()
                self._submit_cpu(layer, plan)  # first: the CPU computes while this thread queues the GPU's work
            for r in range(lc.rounds_for(distinct)):
                lc.serve_round(ids, r, round_ids, mask, exclude=None if plan is None else plan.exclude)
                if r == 0 and plan is not None:
                    self.launch_delay_s = 0.8 * self.launch_delay_s + 0.2 * (time.perf_counter() - t0)
                y = self._route_outputs(lc, hidden_rep, round_ids)
                route_out = y if route_out is None else torch.where(mask.view(-1, 1) != 0, y, route_out)
            assert route_out is not None
            if plan is not None:
                # The GPU's routes summed while the CPU computes (its routes weigh 0: their outputs were computed
                # against the dummy slot, finite), then the CPU's per-token sum added.
                gpu = (route_out.view(M, k, -1).float() * plan.gpu_weights[..., None]).sum(dim=1)
                return self._join_cpu(layer, plan, gpu).to(hidden.dtype)
        y = route_out.view(M, k, -1).float() * topk_weights.float()[..., None]
        return y.sum(dim=1).to(hidden.dtype)

    # ------------------------------------------------------------------ hybrid CPU service

    def _staging(self, M: int, k: int) -> _HostStaging:
        st = self._stage
        if st is None or st.tokens < M:  # k is the model's, fixed
            st = self._stage = _HostStaging(max(M, self.cpu_cfg.max_tokens), k, self.layout.num_experts,
                                            self.layout.hidden, pin=self.device.type == "cuda")
        return st

    def _plan_cpu(self, layer: int, lc: LayerCache, hidden: torch.Tensor, ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> _CpuPlan | None:
        """Read the step's ids, weights, activations, the slot table and the use counts in one sync; pick the
        CPU's experts; gather their routes' rows; send the claim kernel its flags and the GPU its weights in one
        upload. None when the CPU gets nothing. Vectorised: the host work does not grow with the CPU's experts."""
        t0 = time.perf_counter()
        M, k = ids.shape
        E = self.layout.num_experts
        R = M * k
        st = self._staging(M, k)
        # Every earlier copy out of or into the staging buffers (the previous layer's) was queued before these on
        # the same stream, so the one sync below also makes the buffers free to overwrite.
        ids_h, w_h, x_h = st.ids[:R], st.w[:R], st.x[:M]
        ids_h.copy_(ids.view(-1), non_blocking=True)
        w_h.copy_(topk_weights.reshape(-1).float(), non_blocking=True)
        x_h.copy_(hidden.float(), non_blocking=True)
        st.e2s.copy_(lc.tables.expert_to_slot[:E], non_blocking=True)
        st.freq.copy_(lc.tables.expert_freq[:E], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the one host sync of this layer
        a = st.np
        flat, e2s = a["ids"][:R], a["e2s"]
        needed = np.unique(flat)
        misses = needed[e2s[needed] < 0]
        n_cpu = self._cpu_count(len(misses))
        if n_cpu == 0:
            self.host_stats[layer]["stall_s"] += time.perf_counter() - t0
            return None
        # Only copied experts enter the cache: send the least-used ones to the CPU.
        cpu_experts = misses[np.lexsort((misses, a["freq"][misses]))][:n_cpu]
        rank = np.full(E, n_cpu, dtype=np.int64)
        rank[cpu_experts] = np.arange(n_cpu)
        route_rank = rank[flat]
        sel = np.nonzero(route_rank < n_cpu)[0]  # routes r = token * k + j served here
        sel = sel[np.argsort(route_rank[sel], kind="stable")]  # grouped by expert, in cpu_experts order
        counts = np.bincount(route_rank[sel], minlength=n_cpu)
        n = len(sel)
        w = a["w"][:R]
        tok = np.floor_divide(sel, k, out=a["tok"][:n])
        np.take(w, sel, out=a["wr"][:n])
        np.take(a["x"][:M], tok, axis=0, out=a["xr"][:n])
        gw = a["up"][: 4 * R].view(np.float32)
        gw[:] = w
        gw[sel] = 0.0
        flags = a["up"][4 * R: 4 * R + E]
        flags[:] = 0
        flags[cpu_experts] = 1
        # One copy-engine upload: on the lent H100 a small copy did not queue behind a bulk one (docs/benchmarks.md).
        dev = st.up[: 4 * R + E].to(self.device, non_blocking=True)
        plan = _CpuPlan(cpu_experts, counts, exclude=dev[4 * R:].view(torch.int8),
                        gpu_weights=dev[: 4 * R].view(torch.float32).view(M, k))
        self.split_log.append({"layer": layer, "misses": len(misses), "cpu": n_cpu, "copy": len(misses) - n_cpu,
                               "cpu_share": self.cpu_share})
        h = self.host_stats[layer]
        h["cpu_experts"] += n_cpu
        h["bytes_cpu"] += n_cpu * self.layout.expert_bytes
        h["stall_s"] += time.perf_counter() - t0
        return plan

    def _submit_cpu(self, layer: int, plan: _CpuPlan) -> None:
        """Start the CPU's experts on the kernel's worker thread (no GIL), weighted and summed per token there."""
        st = self._stage
        assert self.cpu_kernel is not None and st is not None
        R, M = int(plan.counts.sum()), plan.gpu_weights.shape[0]
        self.cpu_kernel.submit_grouped(self.store.sections(layer), plan.experts, plan.counts, st.xr[:R], st.y[:R],
                                       tok=st.tok[:R], w=st.wr[:R], out=st.out[:M])

    def _join_cpu(self, layer: int, plan: _CpuPlan, gpu: torch.Tensor) -> torch.Tensor:
        """Wait for the CPU's per-token sum (the GPU's work is queued and runs meanwhile), add it in: one upload."""
        assert self.cpu_kernel is not None and self._stage is not None
        t0 = time.perf_counter()
        busy_s = self.cpu_kernel.wait()
        self.host_stats[layer]["stall_s"] += time.perf_counter() - t0
        if self.cpu_cfg.cpu_rate is None and busy_s > 0:
            # Re-measured under load: the CPU shares memory bandwidth with the copies running beside it.
            self.cpu_rate = 0.8 * self.cpu_rate + 0.2 * len(plan.experts) * self.layout.expert_bytes / busy_s
        return gpu.add_(self._stage.out[: gpu.shape[0]].to(self.device, non_blocking=True))

    def close(self) -> None:
        if self.cpu_kernel is not None:
            self.cpu_kernel.close()
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

