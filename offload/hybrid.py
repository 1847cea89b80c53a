"""The hybrid miss service: the CPU computes some of a step's missing experts while the GPU copies the rest.

Owns the CPU expert server (cpu_experts.ExpertServer) and its mailbox, the stream signals that hand a job over
(stream_signals.py), the table of CPU counts the split kernel reads (kernels/miss_split.py), and the rates that
table comes from: the copy rate measured at start-up by the path misses take while the CPU kernel computes beside it
(as in a step), the CPU's measured at start-up and re-measured per step size from every job (under load). Rates are
bytes/s of the store's format, so int4 experts (about half an FP8 expert's bytes, and the CPU kernel's int8 dot
products) are split by their own measured rates. The host takes no part in a hand-over, so a hybrid step needs no
host sync and can be captured in a CUDA graph.

Whole experts leave one side idle at the end of a step with few misses (one miss: all of it on one side). With
`column_split` the boundary expert is split by intermediate columns (the down projection is linear in them): the
GPU copies columns [0, c) of it into a one-expert scratch (kernels.expert_copy.copy_expert_columns) and computes
its routes there, the CPU computes columns [c, N) of the same routes, and the partial outputs add. c comes from a
second table built from the same rates, in steps of the format's blocks (cpu_experts.column_granule); the split
expert does not enter the cache. Buffers:

    counts       [max_tokens + 1, max_tokens * k + 1] int32, host memory read by the split kernel:
                 counts[M, n_miss] = how many of n_miss misses the CPU computes in a step of M tokens
    exclude      [E] int8 on the device: 1 = the CPU serves this expert (the claim kernel skips it)
    gpu_weights  [max_tokens * k] fp32 on the device: the routing weights, 0 on the CPU's routes
    sort         [next_power_of_2(E)] int64 on the device: the split kernel's scratch
    split_cols   [max_tokens + 1, max_tokens * k + 1] int32, host memory (column split): the GPU's columns of the
                 boundary expert for M tokens and n_miss misses, 0 = no split
    split_info   [2] int32 on the device: the step's split expert (-1: none) and its GPU columns
    split_ids    [max_tokens * k] int32 on the device: 0 on the split expert's routes, 1 elsewhere
    scratch      one expert's sections on the device (the layout's shapes, [1, ...]): the GPU's columns of it
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import triton

from moed.kernels.expert_claim import SlotTables
from moed.kernels.expert_copy import copy_expert_columns, copy_expert_columns_reference, copy_experts
from moed.kernels.miss_split import split_misses, split_misses_reference
from moed.offload.cpu_experts import CpuExpertKernel, CpuKernelUnavailable, column_granule
from moed.offload.expert_cache import ExpertCache, LayerCache
from moed.offload.host_store import HostExpertStore
from moed.offload.stream_signals import CudaStreamSignals, HostSignals, StreamSignals, StreamSignalsUnavailable

log = logging.getLogger(__name__)

# How a step serves every route on the GPU (OffloadMoERunner._serve_gpu): (layer cache, hidden [M, K], ids [M, k],
# experts to skip) -> route outputs [M * k, K] (0 on the skipped experts' routes).
ServeGpu = Callable[[LayerCache, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# The per-route fused-MoE kernel (runner.MoEFn): computes the GPU's columns of a split expert from the scratch.
MoEFn = Callable[..., torch.Tensor]
# A column split must save at least this share of the step's predicted miss time: it pays a partial copy launch and
# a second fused-MoE launch that whole experts do not.
SPLIT_MIN_GAIN = 0.02
# The largest step a service is built for: its counts table is (T + 1) x (T * k + 1) int32 in pinned memory and its
# mailbox holds T tokens' fp32 activations both ways (T = 256, k = 8, K = 6144: 2.1 MB and 12.6 MB).
HYBRID_MAX_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """CPU experts next to copies: policy hybrid (split by rates) or cpu (every miss on the CPU)."""

    policy: str = "hybrid"
    threads: int = 0  # 0: every core this process may use but one
    # without a C compiler or stream memory operations: copy every miss (logged) instead of failing at load
    fallback_to_copy: bool = False
    max_tokens: int = 8  # above this many tokens a step copies and computes on the GPU (prefill chunks)
    min_tokens: int = 1  # below this many tokens a step copies every miss
    spin_s: float = 0.05  # the server polls its mailbox without sleeping for this long after a job
    cpu_rate: float | None = None  # bytes/s; None: measured at start-up
    copy_rate: float | None = None  # bytes/s; None: measured at start-up
    # split the boundary expert by intermediate columns between the CPU and a GPU copy (module docstring)
    column_split: bool = False

    def __post_init__(self) -> None:
        if self.policy not in ("hybrid", "cpu"):
            raise ValueError(f"CPU miss-service policy {self.policy!r}: expected hybrid or cpu")
        if not 1 <= self.min_tokens <= self.max_tokens <= HYBRID_MAX_TOKENS:
            raise ValueError(
                f"CPU experts: need 1 <= min_tokens <= max_tokens <= {HYBRID_MAX_TOKENS}, "
                f"got {self.min_tokens}, {self.max_tokens}"
            )


def start_hybrid(
    cfg: CpuConfig,
    store: HostExpertStore,
    cache: ExpertCache,
    k: int,
    use_kernels: bool,
    name: str,
    moe_fn: MoEFn | None = None,
) -> HybridMissService | None:
    """The service for `store`'s layers, or None (logged) when the CPU kernel or the stream signals are unavailable
    here and `cfg.fallback_to_copy` allows copying every miss instead."""
    try:
        kernel = CpuExpertKernel(store.layout, threads=cfg.threads)
        signals: StreamSignals = (
            CudaStreamSignals(cache.device) if cache.device.type == "cuda" else HostSignals(kernel.lib.wait_u32)
        )
    except (CpuKernelUnavailable, StreamSignalsUnavailable) as e:
        if not cfg.fallback_to_copy:
            raise
        log.warning("%s: CPU experts unavailable (%s); every miss is copied", name, e)
        return None
    return HybridMissService(cfg, kernel, signals, store, cache, k, use_kernels, name, moe_fn)


class HybridMissService:
    """Splits each small step's misses between the CPU expert server and the GPU's copies (module docstring)."""

    def __init__(
        self,
        cfg: CpuConfig,
        kernel: CpuExpertKernel,
        signals: StreamSignals,
        store: HostExpertStore,
        cache: ExpertCache,
        k: int,
        use_kernels: bool,
        name: str,
        moe_fn: MoEFn | None = None,
    ) -> None:
        self.cfg, self.kernel, self.signals, self.name = cfg, kernel, signals, name
        self.layout, self.layers = store.layout, store.layers
        self.device = cache.device
        E, T = self.layout.num_experts, cfg.max_tokens
        cuda = self.device.type == "cuda"
        self.split_log: collections.deque[dict] = collections.deque(maxlen=1024)  # the last splits (tests, bench)
        self._cpu_rates = np.zeros(T + 1)  # bytes/s per step size, re-measured under load
        self._cpu_rates[:] = cfg.cpu_rate or self._measure_cpu_rate(store)
        self.copy_rate = self.copy_rate_alone = cfg.copy_rate or _measure_copy_rate(cache[self.layers[0]])
        if cfg.copy_rate is None and cfg.policy == "hybrid":
            # the copies' rate beside a busy CPU, as steps run them (measured before the server takes the cores)
            loaded = _measure_copy_rate_under_load(cache[self.layers[0]], kernel, store, self.layers[0], self.copy_rate)
            self.copy_rate = loaded or self.copy_rate
        self._table_rates: np.ndarray | None = None  # the rates the counts table was built from
        self._errors_seen = 0
        self.server = kernel.serve([store.sections(layer) for layer in self.layers], T, k, pin=cuda, spin_s=cfg.spin_s)
        d = self.device
        self.split = split_misses if use_kernels else split_misses_reference
        self.counts = torch.zeros(T + 1, T * k + 1, dtype=torch.int32, pin_memory=cuda)
        self.exclude = torch.zeros(E, dtype=torch.int8, device=d)
        self.gpu_weights = torch.zeros(T * k, dtype=torch.float32, device=d)
        self.sort = torch.zeros(triton.next_power_of_2(E), dtype=torch.int64, device=d)
        self.granule = column_granule(self.layout)
        self.column_split = cfg.column_split and cfg.policy == "hybrid" and self.layout.inter >= 2 * self.granule
        if cfg.column_split and not self.column_split:
            log.warning(
                "%s: column split off: needs policy hybrid and >= 2 column blocks of %d (N = %d)",
                name,
                self.granule,
                self.layout.inter,
            )
        if self.column_split:
            if moe_fn is None:
                raise ValueError(f"{name}: a column split needs the fused-MoE kernel that computes the GPU's part")
            self._init_column_split(moe_fn, use_kernels, cuda, T, k)
        self._build_counts()
        log.info(
            "%s: miss service %s, rates measured at start-up: CPU experts %.1f GB/s, copies %.1f GB/s (%.1f beside "
            "the CPU) -> %.0f%% of missed bytes on the CPU in steps of %d to %d tokens (other steps copy)",
            name,
            cfg.policy,
            self.cpu_rate / 1e9,
            self.copy_rate_alone / 1e9,
            self.copy_rate / 1e9,
            100 * (1.0 if cfg.policy == "cpu" else self.cpu_share),
            cfg.min_tokens,
            cfg.max_tokens,
        )

    def _init_column_split(self, moe_fn: MoEFn, use_kernels: bool, cuda: bool, T: int, k: int) -> None:
        L, d = self.layout, self.device
        self.moe_fn = moe_fn
        self.split_cols = torch.zeros(T + 1, T * k + 1, dtype=torch.int32, pin_memory=cuda)
        self.split_info = torch.full((2,), -1, dtype=torch.int32, device=d)
        self.split_ids = torch.ones(T * k, dtype=torch.int32, device=d)
        # zeros: the rows a partial copy does not write hold zeros or an earlier expert's (finite) bytes
        self.scratch = {n: torch.zeros(1, *shape, dtype=L.section_dtype(n), device=d) for n, shape in L.shapes.items()}
        self._scratch_kwargs = L.moe_kwargs(self.scratch)
        self._scratch_dst = [w.view(1, -1).view(torch.uint8) for w in self.scratch.values()]
        # w13 and its scales / zero points: 2 rows (gate, up halves); w2 and its: one row per output row
        self._split_rows = [2 if n.startswith("w13") else shape[0] for n, shape in L.shapes.items()]
        zeroed = "w13_scale" if "w13_scale" in L.shapes else "w13"  # a zero scale (bf16: weight) zeroes the rest
        self._split_zero = [n == zeroed for n in L.shapes]
        self._one_slot = torch.zeros(1, dtype=torch.int32, device=d)  # id 0 -> scratch slot 0; id 1: not computed
        self._ones = torch.ones(T * k, dtype=torch.float32, device=d)
        self._copy_columns = copy_expert_columns if use_kernels else copy_expert_columns_reference

    @property
    def policy(self) -> str:
        return self.cfg.policy

    def takes(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens splits its misses (other steps copy them all)."""
        return self.cfg.min_tokens <= tokens <= self.cfg.max_tokens

    # ------------------------------------------------------------------ rates and the counts table

    @property
    def cpu_rate(self) -> float:
        """The CPU experts' rate (bytes/s) in batch-1 steps, as last measured."""
        return float(self._cpu_rates[1])

    @cpu_rate.setter
    def cpu_rate(self, rate: float) -> None:
        """Set the CPU's rate for every step size (later jobs re-measure it unless CpuConfig.cpu_rate is set)."""
        self._cpu_rates[:] = rate
        self._build_counts()

    @property
    def cpu_share(self) -> float:
        """Fraction of missed bytes given to the CPU in batch-1 steps so that CPU and copies finish together."""
        if self.cpu_rate <= 0:
            return 0.0
        return self.cpu_rate / (self.cpu_rate + self.copy_rate)

    def _cpu_counts(self, rate: float, max_misses: int) -> np.ndarray:
        """For 0..max_misses misses, how many experts the CPU computes at `rate` bytes/s: the split (whole experts)
        whose slower side ends first (both sides start as soon as the split kernel has run); ties go to the CPU.

        The step time max(c / rate, (n - c) / copy_rate) falls until the sides cross at c* = n * rate / (rate +
        copy_rate) and rises after, so the best whole count is floor(c*) or the one above: O(n), where the table of
        a 256-token step (2,049 miss counts per row) would otherwise be rebuilt as n^2 candidates per row."""
        n = np.arange(max_misses + 1)
        if self.cfg.policy == "cpu" or self.copy_rate <= 0:
            return n
        if rate <= 0:
            return np.zeros_like(n)
        lo = np.minimum(np.floor(n * rate / (rate + self.copy_rate)).astype(n.dtype), n)
        hi = np.minimum(lo + 1, n)

        def t(c: np.ndarray) -> np.ndarray:
            return np.maximum(c / rate, (n - c) / self.copy_rate)

        return np.where(t(hi) <= t(lo), hi, lo)

    def _split_columns(self, rate: float, whole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For 0..len(whole)-1 misses and the whole-expert counts `whole`: the CPU's whole experts and the GPU's
        columns of one more (0: none) where splitting it by columns ends the step sooner by SPLIT_MIN_GAIN."""
        n = np.arange(len(whole))
        N, g = self.layout.inter, self.granule
        if rate <= 0 or self.copy_rate <= 0:
            return whole, np.zeros_like(n)
        x = n * rate / (rate + self.copy_rate)  # CPU experts so that both sides end together
        c = np.floor(x).astype(n.dtype)
        q = np.rint((x - c) * (N // g)).astype(n.dtype)  # the CPU's column blocks of expert c + 1
        f = q * g / N
        t_whole = np.maximum(whole / rate, (n - whole) / self.copy_rate)
        t_split = np.maximum((c + f) / rate, (n - c - f) / self.copy_rate)
        use = (q > 0) & (q * g < N) & (c < n) & (t_split < (1 - SPLIT_MIN_GAIN) * t_whole)
        return np.where(use, c, whole), np.where(use, N - q * g, 0)

    def _build_counts(self) -> None:
        """Refill the split kernel's tables from the current rates (host memory: the next split reads them)."""
        rates = self._cpu_rates.copy()
        table = self.counts.numpy()
        cols = self.split_cols.numpy() if self.column_split else None
        for M in range(table.shape[0]):
            table[M] = self._cpu_counts(float(rates[M]), table.shape[1] - 1)
            if cols is not None:
                table[M], cols[M] = self._split_columns(float(rates[M]), table[M])
        self._table_rates = rates

    def refresh(self) -> None:
        """Take in the server's new job records: the split log, and the CPU's rate per step size measured under load
        (an EMA); refill the counts table when a rate moved by more than 5%."""
        if self.server.errors != self._errors_seen:
            self._errors_seen = self.server.errors
            log.error(
                "%s: the CPU expert server got %d unreadable jobs (answered with zeros)", self.name, self._errors_seen
            )
        recs = self.server.new_records()
        if not len(recs):
            return
        eb = self.layout.expert_bytes
        for li, n_miss, n_cpu, M, rows, t0, t1, part in recs.tolist():
            whole = int(n_cpu) - (part > 0)
            self.split_log.append(
                {
                    "layer": self.layers[int(li)],
                    "tokens": int(M),
                    "misses": int(n_miss),
                    "cpu": whole,  # whole experts on the CPU
                    "split": part,  # the CPU's share of the column-split expert (0: none)
                    "copy": int(n_miss) - int(n_cpu),  # whole experts copied
                    "rows": int(rows),  # routes the CPU computed
                    "cpu_s": t1 - t0,
                    "t_start": t0,
                    "t_end": t1,
                }
            )
            if n_cpu > 0 and t1 > t0 and self.cfg.cpu_rate is None:
                m = int(M)
                self._cpu_rates[m] = 0.8 * self._cpu_rates[m] + 0.2 * (whole + part) * eb / (t1 - t0)
        assert self._table_rates is not None
        if np.any(np.abs(self._cpu_rates - self._table_rates) > 0.05 * self._table_rates):
            self._build_counts()

    def _measure_cpu_rate(self, store: HostExpertStore) -> float:
        layer = self.layers[0]
        n = min(8, self.layout.num_experts)  # a batch-1 layer's worth of experts
        experts = [store.expert(layer, e) for e in range(n)]
        xs = [torch.randn(1, self.layout.hidden) for _ in range(n)]
        self.kernel.forward_many(experts[:1], xs[:1])
        best = float("inf")
        for _ in range(3):  # best of three: the first runs can meet threads still waking up
            t0 = time.perf_counter()
            self.kernel.forward_many(experts, xs)
            best = min(best, time.perf_counter() - t0)
        return n * self.layout.expert_bytes / best

    # ------------------------------------------------------------------ the step

    def run(
        self,
        layer_index: int,
        lc: LayerCache,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        topk_weights: torch.Tensor,
        serve_gpu: ServeGpu,
    ) -> torch.Tensor:
        """One layer's step (hidden [M, K], ids [M, k] int32): split the misses on the device, hand the CPU its job
        through the mailbox, serve the rest on the GPU, and add the CPU's per-token sum after the stream has waited
        for it. Queues work only: no host sync. Returns [M, K] in hidden's dtype."""
        self.refresh()
        M, k = ids.shape
        mb, sig = self.server, self.signals
        split = (
            {"split_cols": self.split_cols[M], "split_info": self.split_info, "split_ids": self.split_ids}
            if self.column_split
            else {}
        )
        # A stale done (a job whose step failed between the hand-over and the wait) must not answer this one.
        sig.write(mb.done_addr, 0)
        self.split(
            ids,
            topk_weights.contiguous(),
            hidden,
            lc.tables.expert_to_slot,
            lc.tables.expert_freq,
            self.counts[M],
            header=mb.header,
            cpu_experts=mb.experts,
            ids_out=mb.ids,
            w_out=mb.w,
            x_out=mb.x,
            exclude=self.exclude,
            gpu_weights=self.gpu_weights,
            sort_scratch=self.sort,
            layer_index=layer_index,
            **split,
        )
        sig.write(mb.ready_addr, 1)
        try:
            route_out = serve_gpu(lc, hidden, ids, self.exclude)
            if self.column_split:  # the GPU's columns of the split expert, into its routes' rows
                self._serve_split_columns(lc, hidden, route_out, M, k)
            # The GPU's routes summed while the CPU computes (its routes weigh 0).
            gw = self.gpu_weights[: M * k].view(M, k, 1)
            gpu = (route_out.view(M, k, -1).float() * gw).sum(dim=1)
        finally:  # the stream waits for the server whatever happened above, so the mailbox stays in step
            sig.wait_eq(mb.done_addr, 1)
        return gpu.add_(mb.out[:M].to(self.device, non_blocking=True)).to(hidden.dtype)

    def _serve_split_columns(
        self, lc: LayerCache, hidden: torch.Tensor, route_out: torch.Tensor, M: int, k: int
    ) -> None:
        """Copy the split expert's GPU columns into the scratch and compute its routes from there (route_out rows of
        other routes untouched: their ids are 1, outside the one-entry table). A step without a split copies nothing
        and computes nothing, read on the device."""
        R = M * k
        self._copy_columns(
            self.split_info,
            lc.src,
            self._scratch_dst,
            self._split_rows,
            self._split_zero,
            self.layout.inter,
            **(
                {"granule": self.granule, "num_programs": lc.cfg.copy_programs}
                if self._copy_columns is copy_expert_columns
                else {}
            ),
        )
        self.moe_fn(
            hidden,
            self.scratch["w13"],
            self.scratch["w2"],
            self.split_ids[:R].view(M, k),
            self._ones[:R],
            self._one_slot,
            out=route_out,
            config_tokens=R,
            config_ids=self.layout.num_experts + 1,
            **self._scratch_kwargs,
        )

    def close(self) -> None:
        """Stop the expert server once the device has drained (a stream may still wait on it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.server.close()


def _copier(lc: LayerCache, n: int) -> Callable[[], None]:
    """Moves experts 0..n-1 of the layer from the host slab to device scratch by the path a step's misses take (the
    UVA copy kernel for copy path "sm", the copy engine for "ce"): the int4 layout's six sections, some of them small,
    cost the copy engine a launch each, which the kernel's one launch does not pay."""
    scratch = [torch.empty(n, d.shape[1], dtype=torch.uint8, device=lc.device) for d in lc.dst]
    if lc.cfg.copy_path == "sm":
        tables = SlotTables.allocate(lc.layout.num_experts, n, lc.device)
        tables.copy_expert.copy_(torch.arange(n, dtype=torch.int32))
        tables.copy_slot.copy_(torch.arange(n, dtype=torch.int32))
        tables.n_copy.fill_(n)

        def copy() -> None:
            copy_experts(tables, lc.src, scratch, num_programs=lc.cfg.copy_programs)
    else:

        def copy() -> None:
            for e in range(n):
                for a, b in zip(lc.src, scratch):
                    b[e].copy_(a[e], non_blocking=True)

    return copy


def _measure_copy_rate(lc: LayerCache) -> float:
    """Bytes/s of the copies alone, over a few experts of one layer."""
    if lc.device.type != "cuda":
        return 1e9  # no copies to measure without a GPU; the CPU tests pass rates explicitly
    n = min(4, lc.layout.num_experts)
    copy = _copier(lc, n)
    copy()  # the kernel's first launch compiles it
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n * lc.layout.expert_bytes / best


def _measure_copy_rate_under_load(
    lc: LayerCache, kernel: CpuExpertKernel, store: HostExpertStore, layer: int, alone: float, seconds: float = 0.1
) -> float | None:
    """Bytes/s of the copies while the CPU kernel computes other experts of the layer flat out, which is how the copy
    side of a hybrid step runs (the CPU takes the larger share and computes for as long as the copies last). Host
    memory serves both; what each loses to the other is not in the two rates measured apart (on 2026-12-07 19:40, H100
    host: CPU 145.9 + copies 34.3 GB/s apart, 165.6 together), and a split built from the copies' rate alone gives
    them more experts than they finish in time. None when the layer has too few experts to keep both sides busy."""
    if lc.device.type != "cuda" or lc.layout.num_experts < 2:
        return None
    E, eb = lc.layout.num_experts, lc.layout.expert_bytes
    n = min(4, E // 2)
    views = [store.expert(layer, e) for e in range(n, min(E, n + 8))]  # not the copied ones
    xs = [torch.randn(1, lc.layout.hidden) for _ in views]
    copy = _copier(lc, n)
    copy()
    kernel.forward_many(views, xs)
    torch.cuda.synchronize()
    reps = min(1000, max(2, int(seconds * alone / (n * eb))))  # small experts: launches, not bytes, would fill it
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        copy()
    end.record()
    passes = 0
    while passes == 0 or not end.query():  # the CPU computes until the last copy is done
        kernel.forward_many(views, xs)
        passes += 1
    end.synchronize()
    return reps * n * eb / (start.elapsed_time(end) / 1e3)
