"""Offload benchmark (GPU): per-layer decode time with a GPU expert cache, against ceilings measured in this run.

    python -m moed.ops.bench.offload --ckpt /dev/shm/moed-offload --experts 128 --out results.json

Builds (or reuses) a `glm51-slice` FP8 checkpoint with GLM-5.1's real layer widths (one MoE layer, `--experts`
routed experts), fills the pinned host store from it once, measures the ceilings (offload_common.py), then the
entries named by --only:
  decode               per-layer time at batch x cache size x trace (offload/traces.py), hit rate, miss bytes, against
                       miss bytes / copy peak + resident bytes / HBM;
  graph                one decode step with misses captured in a CUDA graph, replayed with new ids;
  cpu, hybrid, split   the CPU expert kernel alone, the nothing-cached layer through each miss service, the column
                       split (offload_hybrid.py);
  int4                 the same experts at 4 bits beside FP8 (offload_int4.py);
  diag, timeline, noce where the CPU experts lose speed, the hybrid step's timeline, a small upload beside a large
                       copy (offload_diag.py).
Prints a table last and writes every figure to --out (JSON). The int4 comparison in one command:
    python -m moed.ops.bench.offload --only ceil,cpu,hybrid,int4 --int4-kernel --int4-tune --steps 16
The column split (FP8, then the same with --split-int4 for int4 experts):
    python -m moed.ops.bench.offload --only ceil,cpu,split --steps 64
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from moed.model.config import GlmMoeDsaConfig
from moed.offload.expert_cache import CacheConfig
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.stats import summarize
from moed.offload.traces import skewed_trace, trace_statistics, uniform_trace
from moed.ops.bench.offload_common import LAYER, ceilings, make_runner
from moed.ops.bench.offload_diag import cpu_diag, no_ce_upload, timelines
from moed.ops.bench.offload_hybrid import cpu_runs, hybrid_runs, print_split, split_runs
from moed.ops.bench.offload_int4 import int4_runs, int4_store, print_int4

log = logging.getLogger("bench.offload")


def decode_runs(cfg, store, ceil: dict, args) -> list[dict]:
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    L = store.layout
    rows = []
    timed = args.steps
    for trace_name in ("uniform", "skewed"):
        for batch in (1, 8, 32):
            warm = {1: 6, 8: 2, 32: 1}[batch] * args.warm_steps
            gen = uniform_trace if trace_name == "uniform" else skewed_trace
            trace = gen(warm + timed, batch, E, k, seed=batch)
            ids_all = torch.from_numpy(trace).cuda()
            w_all = torch.rand(warm + timed, batch, k, device="cuda")
            h = torch.randn(batch, K, device="cuda").bfloat16()
            policies = ("lru", "lfu") if trace_name == "skewed" else ("lru",)
            for frac, policy in [(f, p) for f in (100, 50, 25, 10) for p in policies if f < 100 or p == "lru"]:
                slots = max(k, round(E * frac / 100))
                r = make_runner(cfg, store, slots, CacheConfig(policy=policy))
                for s in range(warm):
                    r.run(LAYER, h, ids_all[s], w_all[s])
                torch.cuda.synchronize()
                before = summarize(r.stats())
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for s in range(warm, warm + timed):
                    r.run(LAYER, h, ids_all[s], w_all[s])
                b.record()
                b.synchronize()
                t = a.elapsed_time(b) / 1e3 / timed
                after = summarize(r.stats())
                miss = (after["misses"] - before["misses"]) / timed
                hits = (after["hits"] - before["hits"]) / timed
                distinct = (
                    miss + hits
                    if frac < 100
                    else float(np.mean([len(np.unique(trace[s])) for s in range(warm, warm + timed)]))
                )
                miss_bytes = miss * L.expert_bytes
                resident_bytes = (distinct - miss) * L.expert_bytes
                bound = miss_bytes / (ceil["ce_GBps"] * 1e9) + resident_bytes / (ceil["hbm_GBps"] * 1e9)
                rows.append(
                    {
                        "trace": trace_name,
                        "policy": policy,
                        "batch": batch,
                        "cache_pct": frac,
                        "slots": slots,
                        "ms": t * 1e3,
                        "hit_rate": 1.0 if frac == 100 else hits / distinct if distinct else None,
                        "distinct_experts": distinct,
                        "misses_per_step": miss,
                        "miss_GBps": miss_bytes / t / 1e9,
                        "miss_vs_ce_peak": miss_bytes / t / 1e9 / ceil["ce_GBps"],
                        "bound_ms": bound * 1e3,
                        "vs_bound": t / bound if bound > 0 else None,
                    }
                )
                log.info("%s", rows[-1])
                del r
                torch.cuda.empty_cache()
    return rows


def graph_run(cfg, store, args) -> dict:
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    r = make_runner(cfg, store, max(k, E // 10))
    trace = torch.from_numpy(uniform_trace(args.steps + 2, 1, E, k, seed=21)).cuda()
    w = torch.rand(1, k, device="cuda")
    static_ids = trace[0].clone()
    h = torch.randn(1, K, device="cuda").bfloat16()
    for _ in range(2):
        r.run(LAYER, h, static_ids, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        out = r.run(LAYER, h, static_ids, w)
    torch.cuda.current_stream().wait_stream(s)
    before = summarize(r.stats())
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(args.steps):
        static_ids.copy_(trace[i + 1])
        graph.replay()
    b.record()
    b.synchronize()
    after = summarize(r.stats())
    ref = make_runner(cfg, store, E) if E * store.layout.expert_bytes < 40e9 else None
    ok = None
    if ref is not None:
        static_ids.copy_(trace[args.steps + 1])
        graph.replay()
        ok = bool(torch.equal(out, ref.run(LAYER, h, trace[args.steps + 1], w)))
    miss = (after["misses"] - before["misses"]) / args.steps
    return {"ms": a.elapsed_time(b) / args.steps, "misses_per_step": miss, "equal_to_all_resident": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="/dev/shm/moed-offload")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warm-steps", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, default=0, help="CPU expert threads; 0 = every core")
    p.add_argument("--out", default="offload_bench.json")
    p.add_argument(
        "--only",
        default="ceil,cpu,hybrid,decode,noce,graph",
        help="comma list; add diag for the CPU-expert slowdown breakdown, timeline for the hybrid step's, "
        "int4 for the same experts at 4 bits beside FP8",
    )
    p.add_argument("--split-cache", default="75,90", help="split: cache sizes, percent of the layer's experts")
    p.add_argument("--split-int4", action="store_true", help="split: the same experts quantised to int4 instead")
    p.add_argument("--int4-kernel", action="store_true", help="with int4: also check and time the int4 fused MoE")
    p.add_argument("--int4-tune", action="store_true", help="with --int4-kernel: tune its tables first")
    p.add_argument("--int4-tune-out", default=None, help="root of the tuned tables (default: $OUT/moe_configs)")
    p.add_argument("--int4-tune-budget", type=float, default=150.0, help="seconds; the tuner starts no size after")
    p.add_argument(
        "--int4-tune-batch-sizes",
        default="1,2,4,8,16,32,64,128",
        help="the decode and hybrid sizes (the runner computes a batch-1 layer's 8 routes as M=8)",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it times the GPU expert cache and copies into it (no GPU is visible here)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpu_threads": args.cpu_threads,
        "experts": args.experts,
    }
    ckpt = Path(args.ckpt)
    t0 = time.perf_counter()
    if not (ckpt / "model.safetensors.index.json").exists():
        from moed.model.checkpoint import make_checkpoint

        # on the GPU: seconds, where the host's generator takes minutes at these sizes
        make_checkpoint(ckpt, "glm51-slice", dtype="fp8", layers=2, experts=args.experts, mtp_layers=0, device="cuda")
    results["checkpoint_s"] = time.perf_counter() - t0
    cfg = GlmMoeDsaConfig.from_file(ckpt / "config.json")
    layout = ExpertLayout.for_config(cfg)
    t0 = time.perf_counter()
    store = HostExpertStore(layout, [LAYER], pin=True)
    nbytes = store.fill_from_checkpoint(ckpt, cfg)
    results["store_fill_s"] = time.perf_counter() - t0
    results["store_fill_GBps"] = nbytes / results["store_fill_s"] / 1e9
    results["expert_MB"] = layout.expert_bytes / 1e6
    only = set(args.only.split(","))
    out_path = Path(args.out)

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1, default=float))

    results["ceilings"] = ceil = ceilings(store)
    save()
    log.info("ceilings %s", ceil)
    if "cpu" in only:
        results["cpu"] = cpu_runs(cfg, store, ceil, args.cpu_threads)
        save()
    if "hybrid" in only and "cpu" in results:
        results["hybrid"] = hybrid_runs(cfg, store, ceil, results["cpu"], args)
        save()
    if "split" in only and "cpu" in results:
        if args.split_int4:
            i4, _ = int4_store(cfg, ckpt)
            results["split"] = split_runs(cfg, i4, ceil, cpu_runs(cfg, i4, ceil, args.cpu_threads), args)
        else:
            results["split"] = split_runs(cfg, store, ceil, results["cpu"], args)
        save()
    if "timeline" in only:
        results["timelines"] = timelines(cfg, store, args)
        save()
        print(json.dumps(results["timelines"]))
    if "diag" in only:
        results["cpu_diag"] = cpu_diag(cfg, store, results["ceilings"], args)
        save()
        print(json.dumps(results["cpu_diag"], indent=1))
    if "noce" in only:
        results["no_ce_upload"] = no_ce_upload(store)
        save()
    if "graph" in only:
        results["graph"] = graph_run(cfg, store, args)
        save()
    if "int4" in only:
        results["int4"] = int4_runs(cfg, ckpt, store, ceil, args)
        save()
    if "decode" in only:
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        results["trace_stats"] = {
            "uniform": trace_statistics(uniform_trace(1024, 2, E, k, seed=1), E),
            "skewed": trace_statistics(skewed_trace(1024, 2, E, k, seed=1), E),
        }
        results["decode"] = decode_runs(cfg, store, ceil, args)
        save()
    print_table(results)
    if "split" in results:
        print_split(results["split"])


def print_table(res: dict) -> None:
    c = res["ceilings"]
    print(
        f"\n== offload benchmark: {res['device']}, {res['date']}, experts/layer {res['experts']}, expert "
        f"{res['expert_MB']:.1f} MB =="
    )
    print(
        f"ceilings: host read {c['host_read_GBps']:.1f} GB/s | copy engine {c['ce_GBps']:.1f} GB/s | UVA kernel "
        f"{c['uva_GBps']:.1f} GB/s ({c['uva_16cta_GBps']:.1f}/{c['uva_32cta_GBps']:.1f}/{c['uva_64cta_GBps']:.1f} "
        f"at 16/32/64 CTAs) | HBM {c['hbm_GBps']:.0f} GB/s | store fill {res['store_fill_GBps']:.1f} GB/s"
    )
    if "cpu" in res:
        cp = res["cpu"]
        for b in ("batch1", "batch8"):
            r = cp[b]
            print(
                f"cpu experts {b}: {r['experts']} experts {r['ms']:.2f} ms, {r['GBps']:.1f} GB/s = "
                f"{r['vs_host_read']:.0%} of host read"
            )
        print(f"cpu experts rel. error vs FP8: {cp['rel_error_vs_fp8']:.2e}; int8pack candidate: {cp['int8pack']}")
    if "hybrid" in res:
        hy = res["hybrid"]
        for m in [m for m in hy if isinstance(hy[m], dict) and "graph_ms" in hy[m]]:
            r = hy[m]
            print(
                f"no-cache batch-1 layer {m:22s}: eager {r['ms']:.2f} ms, graph {r['graph_ms']:.2f} ms, misses "
                f"{r['misses_per_step']:.1f} ({r['cpu_experts_per_step']:.1f} on the CPU), eager "
                f"{r['vs_host_read']:.0%} / graph {r['graph_vs_host_read']:.0%} of host read, graph "
                f"{r['graph_vs_joint']:.0%} of both paths at once, cpu share {r['cpu_share']:.2f}, bound "
                f"{r['bound_ms']:.2f} ms"
            )
        jc = hy["joint_ceiling"]
        print(
            f"miss service, both paths flat out at once: {jc['joint_GBps']:.1f} GB/s (CPU {jc['cpu_GBps']:.1f} + "
            f"copies {jc['copy_GBps']:.1f}); joint bound (min(CPU+copy, host read)): {hy['bound_joint_ms']:.2f} ms"
        )
    if "int4" in res:
        print_int4(res)
    if "no_ce_upload" in res:
        u = res["no_ce_upload"]
        print(
            f"1 KiB upload while a 1 GB CE copy runs: SM loads {u['sm_loads_us']:.0f} us, copy engine "
            f"{u['copy_engine_us']:.0f} us"
        )
    if "graph" in res:
        g = res["graph"]
        print(
            f"CUDA graph decode step (10% cache, batch 1): {g['ms']:.2f} ms, {g['misses_per_step']:.1f} misses/step, "
            f"equal to all-resident: {g['equal_to_all_resident']}"
        )
    if "decode" in res:
        print("\ntrace   policy batch cache% slots    ms  hit%  miss/step miss GB/s  vs CE  bound ms vs bound")
        for r in res["decode"]:
            hr = "  -  " if r["hit_rate"] is None else f"{100 * r['hit_rate']:5.1f}"
            vb = "-" if r["vs_bound"] is None else f"{r['vs_bound']:.2f}"
            print(
                f"{r['trace']:8s}{r['policy']:6s}{r['batch']:6d}{r['cache_pct']:6d}{r['slots']:6d}"
                f"{r['ms']:8.2f} {hr} "
                f"{r['misses_per_step']:9.1f}{r['miss_GBps']:10.1f}{r['miss_vs_ce_peak']:7.2f}"
                f"{r['bound_ms']:9.2f} {vb:>8s}"
            )
        for name, st in res["trace_stats"].items():
            text = ", ".join(f"{k} {v:.3f}" for k, v in st.items())
            print(f"{name} trace statistics (1024 tokens x 2 chains): {text}")


if __name__ == "__main__":
    main()
