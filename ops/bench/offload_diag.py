"""The offload benchmark's diagnostics (ops/bench/offload.py --only diag,timeline,noce): where the CPU experts lose
speed inside the runner, the hybrid step as a timeline (GPU events, the CPU job's start and end, from run()'s call),
and the latency of a small per-step upload by SM loads vs by the copy engine while a large copy is in flight."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from moed.kernels.expert_claim import SlotTables
from moed.kernels.expert_copy import copy_experts, upload_no_ce
from moed.offload.cpu_experts import CpuExpertKernel
from moed.offload.hybrid import CpuConfig
from moed.offload.traces import uniform_trace
from moed.ops.bench.offload_common import LAYER, make_runner, runner_rates, wall


def cpu_diag(cfg, store, ceil: dict, args) -> dict:
    """Where the CPU experts lose speed inside the runner: the kernel back to back, after idle gaps (OpenMP
    threads asleep), after a small torch CPU op (torch's own thread pool), beside the UVA copy kernel (DRAM
    shared with PCIe), and the all-CPU runner step split into its host phases."""
    import re

    L = store.layout
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    out: dict = {
        "omp_libs": sorted({m for m in re.findall(r"\S*gomp\S*|\S*libiomp\S*", maps)}),
        "torch_threads": torch.get_num_threads(),
        "env": {
            v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND")
        },
    }
    experts = list(range(k))
    views = [store.expert(LAYER, e) for e in experts]
    xs = [torch.randn(1, K) for _ in experts]
    nbytes = len(experts) * L.expert_bytes

    def gbps(ts: list[float]) -> dict:
        return {
            "min_ms": min(ts) * 1e3,
            "median_ms": float(np.median(ts)) * 1e3,
            "median_GBps": nbytes / float(np.median(ts)) / 1e9,
        }

    cores = len(os.sched_getaffinity(0))
    for threads in sorted({cores, max(1, cores - 1), max(1, cores - 2), 8}):
        kern = CpuExpertKernel(L, threads=threads)
        kern.forward_many(views, xs)
        back = [wall(lambda kern=kern: kern.forward_many(views, xs)) for _ in range(10)]
        gaps = []
        for _ in range(10):
            time.sleep(0.003)
            gaps.append(wall(lambda kern=kern: kern.forward_many(views, xs)))
        after_op = []
        small = torch.randn(64, 64)
        for _ in range(10):
            torch.unique(torch.randint(0, E, (k,)))
            (small @ small).sum()
            after_op.append(wall(lambda kern=kern: kern.forward_many(views, xs)))
        out[f"threads{threads}"] = {
            "back_to_back": gbps(back),
            "after_3ms_idle": gbps(gaps),
            "after_torch_op": gbps(after_op),
        }
    # Beside the copy kernel: 16 other experts streamed by UVA loads while the CPU computes.
    kern = CpuExpertKernel(L, threads=args.cpu_threads)
    n_copy = min(16, L.num_experts - k)
    if n_copy > 0:
        tables = SlotTables.allocate(L.num_experts, n_copy, "cuda")
        secs = list(store.section_bytes_of(LAYER).values())
        dsts = [torch.empty(n_copy, s.shape[1], dtype=torch.uint8, device="cuda") for s in secs]
        tables.copy_expert[:n_copy] = torch.arange(k, k + n_copy, dtype=torch.int32, device="cuda")
        tables.copy_slot[:n_copy] = torch.arange(n_copy, dtype=torch.int32, device="cuda")
        tables.n_copy.fill_(n_copy)
        copy_experts(tables, secs, dsts)
        torch.cuda.synchronize()
        cpu_t, copy_t = [], []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            copy_experts(tables, secs, dsts)
            b.record()
            cpu_t.append(wall(lambda kern=kern: kern.forward_many(views, xs)))
            b.synchronize()
            copy_t.append(a.elapsed_time(b) / 1e3)
        out["beside_uva_copy"] = {
            **gbps(cpu_t),
            "copy_GBps": n_copy * L.expert_bytes / float(np.median(copy_t)) / 1e9,
            "copy_ms": float(np.median(copy_t)) * 1e3,
        }
    # The all-CPU runner step: the step time against the server's own job time.
    trace = torch.from_numpy(uniform_trace(args.steps + 2, 1, E, k, seed=11)).cuda()
    w = torch.rand(1, k, device="cuda")
    h = torch.randn(1, K, device="cuda").bfloat16()
    r = make_runner(cfg, store, k, cpu=CpuConfig(threads=args.cpu_threads, cpu_rate=1.0, copy_rate=1e-12))
    for s in range(2):
        r.run(LAYER, h, trace[s], w)
    torch.cuda.synchronize()
    r.stats()
    r.hybrid.split_log.clear()
    t0 = time.perf_counter()
    for s in range(2, args.steps + 2):
        r.run(LAYER, h, trace[s], w)
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / args.steps
    r.stats()
    jobs = list(r.hybrid.split_log)
    out["runner_all_cpu"] = {
        "step_ms": total * 1e3,
        "cpu_job_ms": float(np.mean([j["cpu_s"] for j in jobs])) * 1e3 if jobs else None,
        "cpu_experts_per_step": jobs[-1]["cpu"] if jobs else 0,
    }
    r.close()
    out.update(timelines(cfg, store, args))
    return out


def timelines(cfg, store, args) -> dict:
    cores = len(os.sched_getaffinity(0))
    out = {"copy_only_timeline": hybrid_timeline(cfg, store, None, args)}
    for threads in sorted({args.cpu_threads or cores, cores - 1}):
        out[f"runner_hybrid_timeline_threads{threads}"] = hybrid_timeline(cfg, store, threads, args)
    return out


def hybrid_timeline(cfg, store, threads: int | None, args) -> dict:
    """The runner step (batch 1, nothing cached) as a timeline, median over steps, in ms from run()'s call with the
    GPU idle: GPU events after the split kernel, after the GPU's rounds (claim, copy, fused MoE, its weighted sum),
    and at the step's end; the CPU job's start and end (the server's own clock, CLOCK_MONOTONIC like
    perf_counter); and when run() returned to the host. threads None: the copy-only runner, for comparison."""
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    trace = torch.from_numpy(uniform_trace(args.steps + 2, 1, E, k, seed=11)).cuda()
    w = torch.rand(1, k, device="cuda")
    h = torch.randn(1, K, device="cuda").bfloat16()
    r = make_runner(cfg, store, k, cpu=None if threads is None else CpuConfig(threads=threads))
    events: dict[str, torch.cuda.Event] = {}

    def mark(name: str) -> None:
        events[name] = torch.cuda.Event(enable_timing=True)
        events[name].record()

    serve = r._serve_gpu

    def serve_w(*a, **kw):
        y = serve(*a, **kw)
        mark("gpu_rounds_done")
        return y

    def split_w(*a, **kw):
        split(*a, **kw)
        mark("split_done")

    r._serve_gpu = serve_w
    if r.hybrid is not None:  # the service holds its split function: wrap that one
        split = r.hybrid.split
        r.hybrid.split = split_w
    rows = []
    try:
        for s in range(args.steps + 2):
            torch.cuda.synchronize()
            r.stats()
            events.clear()
            mark("start")
            t0 = time.perf_counter()
            r.run(LAYER, h, trace[s], w)
            t_ret = time.perf_counter()
            mark("end")
            torch.cuda.synchronize()
            row = {"run_returned": (t_ret - t0) * 1e3}
            row.update({n: events["start"].elapsed_time(e) for n, e in events.items() if n != "start"})
            jobs_log = r.hybrid.split_log if r.hybrid is not None else []
            before = len(jobs_log)
            r.stats()
            job = jobs_log[-1] if len(jobs_log) > before else None
            if job is not None:
                row.update(
                    cpu_start=(job["t_start"] - t0) * 1e3,
                    cpu_end=(job["t_end"] - t0) * 1e3,
                    cpu_experts=job["cpu"],
                    copied=job["copy"],
                )
            if s >= 2:
                rows.append(row)
    finally:
        rates = runner_rates(r)
        r.close()
    keys = rows[-1].keys()
    return {
        "ms_from_run_call": {m: float(np.median([row[m] for row in rows if m in row])) for m in keys},
        "threads": threads,
        **rates,
    }


def no_ce_upload(store) -> dict:
    slab = store.slabs[LAYER]
    n = min(1 << 30, slab.numel())
    big_dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    small = torch.randint(0, 100, (256,), dtype=torch.int32).pin_memory()
    small_dst = torch.empty(256, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    out = {}
    for name, fn in (
        ("sm_loads", lambda: upload_no_ce(small, small_dst)),
        ("copy_engine", lambda: small_dst.copy_(small, non_blocking=True)),
    ):
        fn()
        lat = []
        for _ in range(3):
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                big_dst.copy_(slab[:n], non_blocking=True)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            lat.append(a.elapsed_time(b) * 1e3)
        torch.cuda.synchronize()
        out[f"{name}_us"] = float(np.median(lat))
    return out
