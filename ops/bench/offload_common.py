"""What every entry of the offload benchmark (ops/bench/offload.py) times with and measures against: CUDA-event and
wall-clock timers, the ceilings a miss's bytes meet (host read, pinned->GPU copy engine, UVA copy kernel, HBM), and
the one-MoE-layer runner each entry builds."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch

from moed.kernels.expert_claim import SlotTables
from moed.kernels.expert_copy import copy_experts
from moed.offload.cpu_experts import host_read_GBps
from moed.offload.expert_cache import CacheConfig
from moed.offload.host_store import HostExpertStore
from moed.offload.runner import OffloadMoERunner

LAYER = 1  # the slice checkpoint's MoE layer


def cuda_time(fn, reps: int = 5) -> float:
    """Median seconds of fn() timed with CUDA events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


def ceilings(store: HostExpertStore) -> dict:
    out = {}
    slab = store.slabs[LAYER]
    # Host read ceiling: the best of torch's sum over a fresh 4 GiB (DESIGN.md's method) and wide loads streaming the
    # expert slab itself (pinned, where the misses are read) with every core and with the expert kernel's team.
    cores = len(os.sched_getaffinity(0))
    reads = {"torch_sum_4GiB": _host_read_GBps(1 << 30)}
    for threads in sorted({cores, max(1, cores - 1)}):
        reads[f"slab_stream_{threads}thr"] = host_read_GBps(slab[: min(slab.numel(), 2 << 30)], threads)
    out["host_read_methods_GBps"] = reads
    out["host_read_GBps"] = max(reads.values())
    blk = 38 << 20
    nblk = min(32, slab.numel() // blk)
    src = slab[: nblk * blk].view(nblk, blk)
    dst = torch.empty(nblk, blk, dtype=torch.uint8, device="cuda")

    def ce_blocks():
        for i in range(nblk):
            dst[i].copy_(src[i], non_blocking=True)

    ce_blocks()
    t = cuda_time(ce_blocks)
    out["ce_GBps"] = src.numel() / t / 1e9
    out["hbm_GBps"] = _hbm_copy_GBps(2 << 30)
    out.update(uva_ceiling(store))
    return out


def uva_copier(store: HostExpertStore, n: int = 16) -> Callable[[int], None]:
    """copy(num_programs): the UVA copy kernel moving the layer's experts [0, n) (their real sections: 4 for FP8, 6
    for int4) into n device slots, queued on the current stream."""
    L = store.layout
    tables = SlotTables.allocate(L.num_experts, n, "cuda")
    secs = list(store.section_bytes_of(LAYER).values())
    dsts = [torch.empty(n, s.shape[1], dtype=torch.uint8, device="cuda") for s in secs]
    tables.copy_expert[:n] = torch.arange(n, dtype=torch.int32, device="cuda")
    tables.copy_slot[:n] = torch.arange(n, dtype=torch.int32, device="cuda")
    tables.n_copy.fill_(n)
    return lambda num_programs: copy_experts(tables, secs, dsts, num_programs=num_programs)


def uva_ceiling(store: HostExpertStore) -> dict:
    """The UVA copy kernel over the store's real expert sections (4 for FP8, 6 for int4), 16 experts."""
    out = {}
    copy = uva_copier(store)
    for progs in (16, 32, 64):
        copy(progs)
        t = cuda_time(lambda p=progs: copy(p))
        out[f"uva_{progs}cta_GBps"] = 16 * store.layout.expert_bytes / t / 1e9
    out["uva_GBps"] = max(out[f"uva_{p}cta_GBps"] for p in (16, 32, 64))
    return out


def _host_read_GBps(numel: int) -> float:
    host = torch.ones(numel, dtype=torch.float32)  # 4 GiB, as DESIGN.md's figure was taken: torch sum, all threads
    host.sum()
    return host.numel() * 4 / min(wall(lambda: host.sum()) for _ in range(3)) / 1e9


def _hbm_copy_GBps(nbytes: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a))
    return 2 * nbytes / t / 1e9


def wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def runner_rates(r: OffloadMoERunner) -> dict:
    """The hybrid service's split as the runner has it (zeros for a copy-only runner)."""
    h = r.hybrid
    return {
        "cpu_share": h.cpu_share if h else 0.0,
        "runner_cpu_GBps": h.cpu_rate / 1e9 if h else 0.0,
        "runner_copy_GBps": h.copy_rate / 1e9 if h else 0.0,  # what the split uses: beside the CPU, unless fixed
        "runner_copy_alone_GBps": h.copy_rate_alone / 1e9 if h else 0.0,
    }


def server_jobs(r: OffloadMoERunner, n: int) -> dict:
    """What the CPU expert server measured over its last `n` jobs (after the device drained): time a job, experts a
    job, their read rate, and the period between job starts (a step as the CPU sees it). Empty for a copy-only
    runner."""
    h = r.hybrid
    if h is None:
        return {}
    h.refresh()
    jobs = [j for j in list(h.split_log)[-n:] if j["cpu"] + j["split"] > 0]
    if not jobs:
        return {"server_jobs": 0}
    busy = sum(j["cpu_s"] for j in jobs)
    experts = sum(j["cpu"] + j["split"] for j in jobs)
    starts = [j["t_start"] for j in jobs]
    return {
        "server_jobs": len(jobs),
        "server_job_ms": busy / len(jobs) * 1e3,
        "server_experts_per_job": experts / len(jobs),
        "server_GBps": experts * r.layout.expert_bytes / busy / 1e9 if busy > 0 else 0.0,
        "server_period_ms": (starts[-1] - starts[0]) / (len(starts) - 1) * 1e3 if len(starts) > 1 else 0.0,
    }


def make_runner(cfg, store, slots, cache_cfg=None, cpu=None) -> OffloadMoERunner:
    """One layer's runner with `slots` cache slots. By default no slot may be pinned: the bench's caches are a layer's
    k experts (nothing cached), where the engine's pin budget (half the slots) would split a step's misses into two
    rounds that an engine cache of the real model's size (~18 slots a layer) serves in one."""
    r = OffloadMoERunner(
        cfg,
        layers=[LAYER],
        device="cuda",
        slots=slots,
        store=store,
        expert_dtype="int4" if store.layout.is_int4 else "checkpoint",
        cache=cache_cfg or CacheConfig(pin_fraction=0.0),
        cpu=cpu,
    )
    r.finish_loading()
    return r
