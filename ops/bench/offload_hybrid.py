"""The offload benchmark's CPU-expert and hybrid entries (ops/bench/offload.py --only cpu,hybrid,split):
cpu     the CPU expert kernel alone per MoE layer at batch 1 and 8 against host read; its error against the FP8
        (or exact int4) reference; torch `_weight_int8pack_mm` as the candidate it replaces;
hybrid  the batch-1 layer with nothing cached: all-copy vs all-CPU vs the device-side split (rates fixed from this
        run, and as the runner measures them), eager and replayed from a CUDA graph, against the bound
        miss bytes / min(CPU + copy rate, host read);
split   the hybrid step with and without the column split of its boundary expert (CpuConfig.column_split) at
        batch 1, 2, 4 on the uniform trace with the cache holding --split-cache percent of the experts (steps of a
        few misses), replayed from a CUDA graph, rates as the engine measures them; against the miss-service
        ceiling (CPU alone + copies alone, this run) and against what the runner's own rates predict for whole
        experts and for columns (ops/bench/hitrate_arithmetic.py's finer_split_bound, from this run's misses).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from moed.formats.fp8 import dequantize_block_fp8
from moed.offload.cpu_experts import CpuExpertKernel, expert_forward_reference
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.hybrid import CpuConfig
from moed.offload.stats import summarize
from moed.offload.traces import uniform_trace
from moed.ops.bench.offload_common import LAYER, make_runner, runner_rates, server_jobs, uva_copier, wall

log = logging.getLogger("bench.offload")


def cpu_runs(cfg, store, ceil: dict, threads: int, fp8_store: HostExpertStore | None = None) -> dict:
    """The CPU kernel alone per MoE layer at batch 1 and 8; its error. For an int4 store: against the exact int4
    answer (what int8 activations cost) and against the FP8 experts it was quantised from (`fp8_store`)."""
    L = store.layout
    kern = CpuExpertKernel(L, threads=threads)
    out = {}
    K = L.hidden
    for batch in (1, 8):
        # One MoE layer: batch tokens x 8 experts; at batch 8 the union of experts (uniform routing) is computed.
        ids = uniform_trace(1, batch, L.num_experts, cfg.num_experts_per_tok, seed=3)[0]
        experts = np.unique(ids).tolist()
        x = torch.randn(batch, K)
        routes = {e: np.nonzero((ids == e).any(axis=1))[0].tolist() for e in experts}
        kern.forward(store.expert(LAYER, experts[0]), x[:1].contiguous())
        views = [store.expert(LAYER, e) for e in experts]
        xs = [x[routes[e]].contiguous() for e in experts]

        def layer(views=views, xs=xs):
            kern.forward_many(views, xs)

        t = min(wall(layer) for _ in range(5))
        nbytes = len(experts) * L.expert_bytes
        out[f"batch{batch}"] = {
            "experts": len(experts),
            "ms": t * 1e3,
            "GBps": nbytes / t / 1e9,
            "vs_host_read": nbytes / t / 1e9 / ceil["host_read_GBps"],
        }
    # Error vs the reference (float64 from the stored weights) on one expert, batch 8.
    x = torch.randn(8, K)
    ex = store.expert(LAYER, 5)
    y = kern.forward(ex, x).double()
    ref = expert_forward_reference(ex, x, L)
    if L.is_int4:
        out["rel_error_vs_exact_int4"] = float((y - ref).norm() / ref.norm())
        if fp8_store is not None:
            ref8 = expert_forward_reference(fp8_store.expert(LAYER, 5), x, fp8_store.layout)
            out["rel_error_vs_fp8"] = float((y - ref8).norm() / ref8.norm())
        return out
    out["rel_error_vs_fp8"] = float((y - ref).norm() / ref.norm())
    # Candidate: torch _weight_int8pack_mm (per-channel int8 weights re-quantised from FP8, bf16 activations).
    try:
        out["int8pack"] = _int8pack_candidate(store, L, ceil)
    except Exception as e:  # older torch: report, do not fail the benchmark
        out["int8pack"] = {"error": repr(e)}
    return out


def _int8pack_candidate(store, L: ExpertLayout, ceil: dict) -> dict:
    bn, bk = L.block
    mats = []
    for e in range(8):
        ex = store.expert(LAYER, e)
        for w, s in ((ex["w13"], ex["w13_scale"]), (ex["w2"], ex["w2_scale"])):
            wf = dequantize_block_fp8(w, s, bn, bk)
            scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127
            q = (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            mats.append((q, scale.to(torch.bfloat16), wf))
    x = torch.randn(1, L.hidden).bfloat16()
    N = L.inter

    def layer():
        for i in range(0, len(mats), 2):
            (q13, s13, _), (q2, s2, _) = mats[i], mats[i + 1]
            gu = torch._weight_int8pack_mm(x, q13, s13)
            h = (torch.nn.functional.silu(gu[:, :N].float()) * gu[:, N:].float()).bfloat16()
            torch._weight_int8pack_mm(h, q2, s2)

    layer()
    t = min(wall(layer) for _ in range(3))
    (q13, s13, w13), (q2, s2, w2) = mats[0], mats[1]
    gu = torch._weight_int8pack_mm(x, q13, s13).float()
    y = torch._weight_int8pack_mm((torch.nn.functional.silu(gu[:, :N]) * gu[:, N:]).bfloat16(), q2, s2).float()
    gr = x.double() @ w13.double().T
    yr = (torch.nn.functional.silu(gr[:, :N]) * gr[:, N:]) @ w2.double().T
    nbytes = 8 * (q13.numel() + q2.numel())
    return {
        "ms": t * 1e3,
        "GBps": nbytes / t / 1e9,
        "vs_host_read": nbytes / t / 1e9 / ceil["host_read_GBps"],
        "rel_error_vs_fp8": float((y.double() - yr).norm() / yr.norm()),
    }


def joint_ceiling(store: HostExpertStore, threads: int, k: int, seconds: float = 0.5) -> dict:
    """Both miss paths flat out at once: the CPU kernel over k experts (a batch-1 layer's) again and again while the
    UVA copy kernel moves 16 other experts to the GPU again and again; each side's bytes over its own time. Host
    memory serves both, so their sum is what misses can reach together, which the two rates measured apart (their
    sum) overstate when host memory is the limit. The copies run on the GPU's stream while the host runs the CPU
    kernel; the loop stops at the first CPU pass after the copies end."""
    L = store.layout
    n_copy = 16
    if L.num_experts < n_copy + k:
        raise ValueError(f"joint ceiling: needs >= {n_copy + k} experts in the layer, the store has {L.num_experts}")
    kern = CpuExpertKernel(L, threads=threads)
    views = [store.expert(LAYER, e) for e in range(n_copy, n_copy + k)]
    xs = [torch.randn(1, L.hidden) for _ in views]
    kern.forward_many(views, xs)
    copy = uva_copier(store, n_copy)
    copy(32)
    torch.cuda.synchronize()
    t_one = wall(lambda: (copy(32), torch.cuda.synchronize()))
    reps = max(2, int(seconds / max(t_one, 1e-4)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        copy(32)
    end.record()
    t0, passes = time.perf_counter(), 0
    while not end.query() or passes == 0:
        kern.forward_many(views, xs)
        passes += 1
    t_cpu = time.perf_counter() - t0
    end.synchronize()
    t_copy = start.elapsed_time(end) / 1e3
    cpu = passes * k * L.expert_bytes / t_cpu
    copy = reps * n_copy * L.expert_bytes / t_copy
    return {"joint_GBps": (cpu + copy) / 1e9, "cpu_GBps": cpu / 1e9, "copy_GBps": copy / 1e9, "cpu_passes": passes}


def hybrid_runs(cfg, store, ceil: dict, cpu_measure: dict, args) -> dict:
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    L = store.layout
    steps = args.steps
    trace = torch.from_numpy(uniform_trace(steps + 2, 1, E, k, seed=11)).cuda()
    w = torch.rand(1, k, device="cuda")
    h = torch.randn(1, K, device="cuda").bfloat16()
    cpu_rate = cpu_measure["batch1"]["GBps"] * 1e9
    copy_rate = ceil["uva_GBps"] * 1e9
    service = cpu_rate + copy_rate  # the CPU kernel alone plus the copies alone: an upper bound, not measured
    joint = joint_ceiling(store, args.cpu_threads, k)  # both at once: the measured miss-service ceiling
    log.info("joint miss-service ceiling %s", joint)
    modes = {
        "all_copy": None,
        "all_cpu": CpuConfig(threads=args.cpu_threads, cpu_rate=1.0, copy_rate=1e-12),
        "hybrid": CpuConfig(threads=args.cpu_threads, cpu_rate=cpu_rate, copy_rate=copy_rate),
        # The copies' rate as measured beside the busy CPU (the joint ceiling's), the CPU's alone: what the engine's
        # start-up measurement now gives the split, fixed here so the two rows differ only in the copy rate.
        "hybrid_copy_beside_cpu": CpuConfig(
            threads=args.cpu_threads, cpu_rate=cpu_rate, copy_rate=joint["copy_GBps"] * 1e9
        ),
        # Rates as the engine gets them: measured by the runner at start-up, the CPU's re-measured under load.
        "hybrid_measured_rates": CpuConfig(threads=args.cpu_threads),
    }
    out = {}
    for name, cpu in modes.items():
        r = make_runner(cfg, store, k, cpu=cpu)  # k slots: every step's experts are new (no cache)
        for s in range(2):
            r.run(LAYER, h, trace[s], w)
        torch.cuda.synchronize()
        before = summarize(r.stats())
        t0 = time.perf_counter()
        for s in range(2, steps + 2):
            r.run(LAYER, h, trace[s], w)
        torch.cuda.synchronize()
        t = (time.perf_counter() - t0) / steps
        after = summarize(r.stats())
        jobs = server_jobs(r, steps)  # the eager steps' CPU jobs, as the server timed them
        miss = (after["misses"] - before["misses"]) / steps
        miss_bytes = miss * L.expert_bytes
        rate = min(cpu_rate + copy_rate, ceil["host_read_GBps"] * 1e9) if cpu is not None else copy_rate
        if name == "all_cpu":
            rate = cpu_rate
        # The same steps replayed from one CUDA graph (the engine's decode): no host launch cost per op.
        static_ids = trace[0].clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            r.run(LAYER, h, static_ids, w)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(2, steps + 2):
            static_ids.copy_(trace[s])
            graph.replay()
        torch.cuda.synchronize()
        t_graph = (time.perf_counter() - t0) / steps
        out[name] = {
            "ms": t * 1e3,
            "graph_ms": t_graph * 1e3,
            "graph_miss_GBps": miss_bytes / t_graph / 1e9,
            "graph_vs_host_read": miss_bytes / t_graph / 1e9 / ceil["host_read_GBps"],
            "graph_vs_service": miss_bytes / t_graph / service,
            "graph_vs_joint": miss_bytes / t_graph / (joint["joint_GBps"] * 1e9),
            "misses_per_step": miss,
            "miss_GBps": miss_bytes / t / 1e9,
            "vs_host_read": miss_bytes / t / 1e9 / ceil["host_read_GBps"],
            "bound_ms": miss_bytes / rate * 1e3,
            "cpu_experts_per_step": (after["cpu_experts"] - before["cpu_experts"]) / steps,
            **runner_rates(r),
            **jobs,
        }
        log.info("%s %s", name, out[name])
        r.close()
    out["bound_joint_ms"] = k * L.expert_bytes / min(cpu_rate + copy_rate, ceil["host_read_GBps"] * 1e9) * 1e3
    out["service_GBps"] = service / 1e9
    out["joint_ceiling"] = joint
    return out


def split_runs(cfg, store, ceil: dict, cpu_measure: dict, args) -> dict:
    """Per-layer time of hybrid steps with and without the column split (module docstring, `split`)."""
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    L = store.layout
    service = cpu_measure["batch1"]["GBps"] * 1e9 + ceil["uva_GBps"] * 1e9
    out: dict = {"service_GBps": service / 1e9, "rows": []}
    for pct in (int(p) for p in args.split_cache.split(",")):
        slots = max(k, E * pct // 100)
        for M in (1, 2, 4):
            trace = torch.from_numpy(uniform_trace(args.warm_steps + args.steps, M, E, k, seed=M + pct)).cuda()
            w = torch.rand(M, k, device="cuda")
            h = torch.randn(M, K, device="cuda").bfloat16()
            for on in (False, True):
                r = make_runner(cfg, store, slots, cpu=CpuConfig(threads=args.cpu_threads, column_split=on))
                hy = r.hybrid
                assert hy is not None and hy.column_split == on, "column split did not apply to this layout"
                for s in range(args.warm_steps):  # the cache fills, the CPU's rates settle under load
                    r.run(LAYER, h, trace[s], w)
                torch.cuda.synchronize()
                static_ids = trace[0].clone()
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                    r.run(LAYER, h, static_ids, w)
                torch.cuda.current_stream().wait_stream(stream)
                torch.cuda.synchronize()
                hy.refresh()
                hy.split_log.clear()
                before = summarize(r.stats())
                t0 = time.perf_counter()
                for s in range(args.warm_steps, args.warm_steps + args.steps):
                    static_ids.copy_(trace[s])
                    graph.replay()
                torch.cuda.synchronize()
                t = (time.perf_counter() - t0) / args.steps
                after = summarize(r.stats())
                hy.refresh()
                jobs = list(hy.split_log)
                n = np.array([j["misses"] for j in jobs] or [0], dtype=np.int64)
                rc, rg = float(hy._cpu_rates[M]), hy.copy_rate  # bytes/s the tables were built from
                c = hy._cpu_counts(rc, int(n.max()))[n]  # the whole-expert split at these rates
                eb = L.expert_bytes
                whole = np.maximum(c / rc, (n - c) / rg) * eb
                column = n / (rc + rg) * eb
                hits = after["hits"] - before["hits"]
                routed = hits + (after["misses"] - before["misses"])
                row = {
                    "cache_pct": pct,
                    "tokens": M,
                    "column_split": on,
                    "ms": t * 1e3,
                    "misses_per_step": float(n.mean()),
                    "split_share": float(np.mean([j["split"] > 0 for j in jobs])) if jobs else 0.0,
                    "hit_rate": hits / routed if routed else 0.0,
                    "vs_service": float(n.mean()) * eb / t / service,
                    "predicted_whole_ms": float(whole.mean()) * 1e3,
                    "predicted_column_ms": float(column.mean()) * 1e3,
                    "runner_cpu_GBps": rc / 1e9,
                    "runner_copy_GBps": rg / 1e9,
                }
                out["rows"].append(row)
                log.info("split %s", row)
                r.close()
    return out


def print_split(res: dict) -> None:
    print(f"\n== column split of the boundary expert (miss-service ceiling {res['service_GBps']:.1f} GB/s) ==")
    print("cache%  M  split   ms/layer  misses/step  split steps  hit rate  vs ceiling  predicted whole / column ms")
    base: dict = {}
    for r in res["rows"]:
        key = (r["cache_pct"], r["tokens"])
        if not r["column_split"]:
            base[key] = r["ms"]
        gain = f" ({base[key] / r['ms']:.3f}x)" if r["column_split"] and key in base else ""
        print(
            f"{r['cache_pct']:5d} {r['tokens']:2d}  {'on ' if r['column_split'] else 'off'}  {r['ms']:8.3f}"
            f"{gain:10s} {r['misses_per_step']:6.2f}  {r['split_share']:10.2f}  {r['hit_rate']:8.3f}  "
            f"{r['vs_service']:9.2f}  {r['predicted_whole_ms']:.3f} / {r['predicted_column_ms']:.3f}"
        )
