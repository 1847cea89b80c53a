"""Whole-model benchmark (GPU): GLM-5.1 decode and time to first token at its real depth, beside llama.cpp.

    python -m moed.ops.bench.model --ckpt /dev/shm/glm51-deep --work $OUT/model [--llama llama.json]

No host here holds GLM-5.1 (~750 GB in FP8), so the whole-model figure is assembled from two measured parts,
each taken where it can be taken faithfully, and printed with every input and its bound:

  deep   (`--stage deep`) the `glm51` preset checkpoint (78 layers, 3 dense, the MTP layer, the real vocabulary and
         widths; few experts per layer) served by the engine. With the routed experts replaced by a runner that
         returns zeros, a decode step's time is everything that is not routed experts: attention with the DSA
         indexer, dense layers, shared experts, norms, routers, the 154,880-way head and sampling (`nonmoe_ms`, in
         CUDA graphs, batch 1..64); a prompt's prefill likewise (`nonmoe_prefill_s`, 1k/8k/32k tokens). Then the
         real offload runner at that depth: step time, hits, misses and the CPU server's job log, per MoE layer
         in situ = (step - non-MoE step) / 75. Also the resident non-expert bytes (what the expert cache cannot
         have) and the KV bytes per token.
  slice  (`--stage slice`) MoE layers with all 256 experts (9.7 GB each in FP8, random, drawn on the GPU straight into
         the pinned store: no checkpoint staged in host memory), as many as the host holds, with the expert cache a
         deployment of the whole model on this GPU would have per layer: fraction = (GPU memory - resident
         non-expert bytes - KV for one `--context` sequence - `--reserve-gib`) / (75 x 256 experts' bytes).
         Per batch {1, 2, 8, 16, 32, 64} x trace {uniform, skewed (offload/traces.py, its four DESIGN.md §4
         statistics printed)}: per-layer time of a step over all slice layers replayed from one CUDA graph, hit
         rate, misses, and the bound misses x expert bytes / joint miss-service rate + resident bytes / HBM;
         prefill per layer at 2k/8k/32k-token steps (every expert streamed: bytes/s against the copy-engine and
         host-read ceilings of this run, compute with every expert resident, and what the cache's rounds cost:
         offload/runner.py computes every route in every round); ceilings measured here.
  depth  (part of `slice`) where the ~0.9 ms per MoE layer that a 78-layer model lost against the one-layer bench
         went: batch-1 steps with nothing cached (16 experts per layer, two disjoint sets of 8 alternating, so every
         expert misses) over 1 layer and over 75 layers, host slabs allocated by torch (rounded up to a power of two,
         4 KiB pages) and as transparent huge pages (`MOED_HOST_ALLOC=huge`), with 8 cache slots per layer (one
         round) and with 1 (what a 4 GB cache gives 75 layers: 8 rounds per step); per layer the CPU job time, the
         time between one layer's job end and the next one's start (graph replay: the GPU's share and hand-off),
         and eagerly the GPU's split / hand-off / copy-and-compute / wait phases.
  report (`--stage report`) whole-model decode per token = non-MoE step + 75 x MoE layer, at batch 1, 8, 32 on both
         traces; MTP rows (1 draft token) at acceptance 0 and at the published MTP acceptance; time to first token
         = non-MoE prefill + 75 x MoE prefill per layer; projected host memory, GPU memory and PCIe bytes per
         token; llama.cpp's figures by the same per-layer method (ops/bench/llama_peer.py); the moed / llama.cpp
         ratio as the headline.

Without `--stage` all stages run, each in its own process (the deep checkpoint's engine and the 256-expert store do
not fit the host together); `--stage` runs one. Every stage writes its JSON into `--work`; the report reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.model")

MOE_LAYERS = 75  # GLM-5.1: 78 layers, the first 3 dense
REAL_EXPERTS = 256
BATCHES = (1, 2, 8, 16, 32, 64)
PROMPTS = (1024, 8192, 32768)
CHUNK = 2048  # the engine's default max_tokens_per_step
# MTP acceptance of the first draft token published for the MTP module GLM-5.1 shares with DeepSeek-V3: "the
# acceptance rate of the second token prediction ranges between 85% and 90%" (DeepSeek-V3 Technical Report,
# arXiv:2412.19437, section 5.4.3). Random weights accept nothing, hence also the rows at 0. One draft token: for
# GLM-4.6 a second draft token was reported accepted almost never (vllm-project/vllm issue 25993).
PUBLISHED_MTP_ACCEPTANCE = 0.85
MTP_SOURCE = "DeepSeek-V3 Technical Report (arXiv:2412.19437) sec. 5.4.3: 85-90% for the 1st draft token"


# ---------------------------------------------------------------------------------------------- the arithmetic


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What one GPU of `gpu_bytes` leaves the routed experts of the whole model (all figures in bytes)."""

    gpu_bytes: int
    nonexpert_bytes: int  # resident non-expert weights (as the engine holds them)
    kv_bytes: int  # KV + index-K for the context the deployment plans for
    reserve_bytes: int  # activations, graph pools, CUDA context
    expert_bytes: int  # one routed expert as stored (FP8 + scales)
    moe_layers: int = MOE_LAYERS
    experts: int = REAL_EXPERTS

    @property
    def cache_bytes(self) -> int:
        return max(0, self.gpu_bytes - self.nonexpert_bytes - self.kv_bytes - self.reserve_bytes)

    @property
    def all_expert_bytes(self) -> int:
        return self.expert_bytes * self.experts * self.moe_layers

    @property
    def fraction(self) -> float:
        return self.cache_bytes / self.all_expert_bytes

    @property
    def slots_per_layer(self) -> int:
        return min(self.experts, self.cache_bytes // (self.expert_bytes * self.moe_layers))


def decode_bound_ms(misses: float, hits: float, expert_bytes: int, joint_GBps: float, hbm_GBps: float,
                    nonmoe_ms: float = 0.0) -> float:
    """DESIGN.md's decode bound: miss bytes / the joint CPU + copy miss-service rate + resident bytes / HBM + the
    measured non-MoE time (per MoE layer, misses and hits per step of that layer)."""
    return 1e3 * (misses * expert_bytes / (joint_GBps * 1e9) + hits * expert_bytes / (hbm_GBps * 1e9)) + nonmoe_ms


def joint_rate_GBps(cpu_GBps: float, copy_GBps: float, host_read_GBps: float) -> float:
    """Misses are served by the CPU and by copies at once until both meet the host-read ceiling."""
    return min(cpu_GBps + copy_GBps, host_read_GBps)


def whole_decode_ms(nonmoe_ms: float, moe_layer_ms: float, moe_layers: int = MOE_LAYERS) -> float:
    return nonmoe_ms + moe_layers * moe_layer_ms


def mtp_tokens_per_s(verify_ms: float, draft_ms: float, acceptance: float, batch: int) -> float:
    """One draft token per sequence: a step verifies it (2 tokens per sequence) and drafts the next one; each
    sequence gains 1 + acceptance tokens per step."""
    return batch * (1.0 + acceptance) / ((verify_ms + draft_ms) / 1e3)


def ttft_s(nonmoe_prefill_s: float, moe_prefill_layer_s: float, moe_layers: int = MOE_LAYERS) -> float:
    return nonmoe_prefill_s + moe_layers * moe_prefill_layer_s


def interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear in x between measured points (flat beyond the ends)."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    hi = next(i for i, v in enumerate(xs) if v >= x)
    a, b = xs[hi - 1], xs[hi]
    return points[a] + (points[b] - points[a]) * (x - a) / (b - a)


def llama_per_layer(deep_gpu_ms: float, deep_cpu_ms: float, slice_gpu_ms: float, slice_cpu_ms: float,
                    slice_moe_layers: int, moe_layers: int = MOE_LAYERS, gpu_layers: int = 0) -> dict[str, float]:
    """llama.cpp by the same per-layer method as moed: its full-depth all-GPU step (which holds every layer but
    the experts of few) plus 75 x (CPU-experts layer - GPU-experts layer), the difference taken on the 256-expert
    slice; `gpu_layers` of the 75 keep their experts on the GPU (--n-cpu-moe 75 - gpu_layers)."""
    per_layer_cpu_extra = (slice_cpu_ms - slice_gpu_ms) / slice_moe_layers
    return {"cpu_extra_per_layer_ms": per_layer_cpu_extra,
            "whole_ms": deep_gpu_ms + (moe_layers - gpu_layers) * per_layer_cpu_extra,
            "deep_direct_cpu_ms": deep_cpu_ms}


def llama_gpu_layers(gpu_bytes: int, nonexpert_bytes: int, kv_bytes: int, reserve_bytes: int,
                     layer_expert_bytes: int, moe_layers: int = MOE_LAYERS) -> int:
    """How many MoE layers' experts fit the GPU beside llama.cpp's non-expert weights, KV and buffers."""
    free = gpu_bytes - nonexpert_bytes - kv_bytes - reserve_bytes
    return max(0, min(moe_layers, free // layer_expert_bytes))


# ---------------------------------------------------------------------------------------------- shared helpers


def _cuda_ms(fn, reps: int = 3) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _release_pinned() -> None:
    """torch keeps freed pinned blocks cached: give them back before the next store is pinned."""
    import torch

    gc.collect()
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class ZeroExperts:
    """A MoE runner whose routed experts contribute nothing: a step then costs exactly what is not routed experts
    (the router still runs, the shared expert too). Capturable in CUDA graphs."""

    supports_cuda_graphs = True

    def run(self, layer, hidden, topk_ids, topk_weights):
        import torch

        return torch.zeros_like(hidden)


# ---------------------------------------------------------------------------------------------- stage: deep


def stage_deep(args) -> dict:
    import torch

    from moed.engine.llm_engine import EngineConfig, LLMEngine
    from moed.model.checkpoint import checkpoint_bytes
    from moed.offload.host_store import thp_status
    from moed.ops.bench.engine import run_load

    ckpt = Path(args.ckpt)
    out: dict = {"ckpt": str(ckpt), "thp": thp_status(), "host_alloc": os.environ.get("MOED_HOST_ALLOC", "torch")}
    t0 = time.perf_counter()
    # KV for what this stage runs (the longest prompt, or the largest batch), not 90% of what is free: an 8192-token
    # prefill step at this depth needs a few GB of activations beside the graphs' pool.
    page = 64
    kv_pages = (max(PROMPTS) + max(BATCHES) * (args.deep_prompt + args.deep_gen + 8)) // page + 2 * max(BATCHES)
    engine = LLMEngine(EngineConfig(
        model=str(ckpt), device="cuda", dtype="bf16", max_running=max(BATCHES), max_tokens_per_step=8192,
        max_model_len=max(PROMPTS) + 128, kv_pages=kv_pages, page_size=page, moe="offload",
        expert_cache_gb=args.deep_cache_gb, graph_max_batch=max(BATCHES), seed=0, miss_service=args.miss_service))
    out["load_s"] = time.perf_counter() - t0
    runner = engine.runner.moe
    store = runner.store
    out["store"] = {"bytes": store.layout.slab_bytes * len(store.layers), "reserved_bytes": store.reserved_bytes,
                    "alloc_s": store.alloc_s, "alloc": store.alloc, "layers": len(store.layers),
                    "experts": store.layout.num_experts, "slots": runner.cache[runner.layers[0]].num_slots}
    cfg = engine.cfg
    nonexpert = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    out["nonexpert_resident_bytes"] = nonexpert
    out["nonexpert_resident_no_embed_bytes"] = sum(p.numel() * p.element_size() for n, p in
                                                   engine.model.named_parameters() if "embed_tokens" not in n)
    from moed.attention.paged_kv import PagedKVPool

    lat, idx = PagedKVPool.bytes_per_token(cfg, "bf16", "fp8")
    out["kv_bytes_per_token"] = cfg.num_hidden_layers * (lat + idx)
    out["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    out["expert_bytes"] = store.layout.expert_bytes
    out["checkpoint_bytes"] = checkpoint_bytes(cfg)
    log.info("deep engine loaded in %.0f s: %s", out["load_s"], out["store"])
    if args.delete_ckpt_after_load:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)  # everything is in memory now; frees /dev/shm for what follows
        log.info("deleted %s after loading", ckpt)

    def decode_rows(label: str, batches: tuple[int, ...]) -> list[dict]:
        rows = []
        for b in batches:
            run_load(engine, b, args.deep_prompt, 3, seed=b)  # first use of this batch's shapes, untimed
            row = run_load(engine, b, args.deep_prompt, args.deep_gen, seed=b)
            row.update(batch=b, runner=label)
            log_ = getattr(engine.runner.moe, "split_log", None)  # this row's CPU jobs (run_load cleared it)
            row["jobs"] = job_breakdown(list(log_)) if log_ is not None else None
            rows.append(row)
            log.info("deep %s batch %d: step %.2f ms, hit %s", label, b, row["step_ms"], row["hit_rate"])
        return rows

    def recapture(moe) -> None:
        engine.runner.moe = moe
        engine.runner.graphs = None
        gc.collect()
        torch.cuda.empty_cache()
        t = time.perf_counter()
        engine._capture_graphs()  # the engine's own capture and its check against an eager step
        log.info("graphs for %s captured in %.1f s: %s", type(moe).__name__, time.perf_counter() - t,
                 engine.runner.graphs is not None)

    # 1. Everything but routed experts.
    recapture(ZeroExperts())
    out["graphs_nonmoe"] = engine.runner.graphs is not None
    out["nonmoe"] = decode_rows("zero", BATCHES)
    g = torch.Generator().manual_seed(1)
    prefill = {}
    from moed.ops.bench.engine import _timed_prefill

    for n in PROMPTS:
        prompt = torch.randint(10, cfg.vocab_size, (n,), generator=g).tolist()
        _timed_prefill(engine, prompt[: min(n, 2048)])
        prefill[n] = _timed_prefill(engine, prompt)[0]
        log.info("deep non-MoE prefill %d tokens: %.2f s", n, prefill[n])
    out["nonmoe_prefill_s"] = prefill
    # The head alone: the 154,880-way projection of the final hidden states (part of every step above).
    head = engine.model.lm_head.weight
    out["head_ms"] = {b: _cuda_ms(lambda b=b: torch.nn.functional.linear(
        torch.randn(b, cfg.hidden_size, device="cuda", dtype=head.dtype), head)) for b in (1, 2, 8, 32)}

    # 2. The real offload runner at this depth.
    recapture(runner)
    out["graphs_offload"] = engine.runner.graphs is not None
    out["offload"] = decode_rows("offload", (1, 8, 32))
    out["miss_service"] = runner.miss_service
    out["runner_rates_GBps"] = {"cpu": runner.cpu_rate / 1e9, "copy": runner.copy_rate / 1e9}
    zero = {r["batch"]: r for r in out["nonmoe"]}
    for r1 in out["offload"]:
        r1["moe_per_layer_ms"] = (r1["step_ms"] - zero[r1["batch"]]["step_ms"]) / cfg.num_moe_layers
    runner.close()
    return out


def job_breakdown(jobs: list[dict]) -> dict | None:
    """Per MoE layer from the CPU expert server's job log (CLOCK_MONOTONIC): the CPU job's time and the time from one
    job's end to the next job's start (the GPU's work between two CPU jobs and the hand-over), within a step
    (consecutive layers) and overall."""
    if not jobs:
        return None
    busy = [j["cpu_s"] for j in jobs]
    gaps = [b["t_start"] - a["t_end"] for a, b in itertools.pairwise(jobs) if b["layer"] > a["layer"]]
    return {"jobs": len(jobs), "cpu_job_ms": 1e3 * float(np.mean(busy)), "cpu_job_p90_ms": 1e3 * float(
        np.percentile(busy, 90)), "gap_ms": 1e3 * float(np.mean(gaps)) if gaps else None,
        "gap_p90_ms": 1e3 * float(np.percentile(gaps, 90)) if gaps else None,
        "cpu_experts_per_job": float(np.mean([j["cpu"] for j in jobs])),
        "copied_per_job": float(np.mean([j["copy"] for j in jobs]))}


# ---------------------------------------------------------------------------------------------- stage: slice


def _fill_random(store, layer: int, seed: int) -> None:
    """Random FP8 experts drawn on the GPU straight into `layer`'s pinned slab (scales 1/sqrt(fan-in))."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    L = store.layout
    for name, sec in store.sections(layer).items():
        if name.endswith("scale"):
            fan_in = L.hidden if name == "w13_scale" else L.inter
            sec.fill_(fan_in ** -0.5)
            continue
        step = max(1, (1 << 30) // (sec[0].numel()))
        for e0 in range(0, L.num_experts, step):
            e1 = min(L.num_experts, e0 + step)
            draw = torch.randn((e1 - e0, *sec.shape[1:]), generator=g, device="cuda").to(sec.dtype)
            sec[e0:e1].copy_(draw)
    store._loaded[layer].fill_(True)
    torch.cuda.synchronize()


def _slice_cfg(experts: int):
    from moed.model.checkpoint import make_config
    from moed.model.config import GlmMoeDsaConfig

    return GlmMoeDsaConfig.from_dict(make_config("glm51", experts=experts, fp8=True), source=f"glm51 x{experts}")


def _steps_in_graph(runner, layers: list[int], ids: list, batch: int, steps: int, warm: int) -> dict:
    """Time steps over `layers` (per layer ids[layer]: [steps + warm, batch, k] int32 on the GPU) replayed from one CUDA
    graph; returns ms per layer, hits/misses per layer-step and the CPU server's job breakdown."""
    import torch

    from moed.offload.stats import summarize

    K, k = runner.cfg.hidden_size, runner.cfg.num_experts_per_tok
    g = torch.Generator(device="cuda").manual_seed(batch)
    hidden = {layer: torch.randn(batch, K, device="cuda", generator=g).bfloat16() for layer in layers}
    weights = torch.rand(batch, k, device="cuda", generator=g)
    static = {layer: ids[i][0].clone() for i, layer in enumerate(layers)}

    def step() -> None:
        for layer in layers:
            runner.run(layer, hidden[layer], static[layer], weights)

    def load(s: int) -> None:
        for i, layer in enumerate(layers):
            static[layer].copy_(ids[i][s])

    for s in range(2):  # eager warm-up: Triton specialisation, server threads awake
        load(s)
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for s in range(2, warm):
        load(s)
        graph.replay()
    torch.cuda.synchronize()
    before = summarize(runner.stats())
    if getattr(runner, "split_log", None) is not None:
        runner.split_log.clear()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for s in range(warm, warm + steps):
        load(s)
        graph.replay()
    b.record()
    b.synchronize()
    after = summarize(runner.stats())
    n = steps * len(layers)
    del graph
    return {"ms_per_layer": a.elapsed_time(b) / n, "hits": (after["hits"] - before["hits"]) / n,
            "misses": (after["misses"] - before["misses"]) / n,
            "cpu_experts": (after["cpu_experts"] - before["cpu_experts"]) / n,
            "jobs": job_breakdown(list(runner.split_log)) if runner.split_log is not None else None}


def _eager_timeline(runner, layers: list[int], ids: list, steps: int) -> dict:
    """Batch-1 steps run eagerly with the GPU idle at each start: per layer, ms from the layer's start to the split
    kernel's end (GPU), the CPU job's start and end (host clock), the GPU rounds' end (claim, copy, fused MoE, its sum)
    and the layer's end; medians over layers and steps. Hand-off latency = job start - split end."""
    import torch

    from moed.offload import runner as runner_mod

    K, k = runner.cfg.hidden_size, runner.cfg.num_experts_per_tok
    h = torch.randn(1, K, device="cuda").bfloat16()
    w = torch.rand(1, k, device="cuda")
    events: dict[str, torch.cuda.Event] = {}

    def mark(name: str) -> None:
        events[name] = torch.cuda.Event(enable_timing=True)
        events[name].record()

    serve, split = runner._serve_gpu, runner_mod.split_misses

    def serve_w(*a, **kw):
        y = serve(*a, **kw)
        mark("gpu_rounds_done")
        return y

    def split_w(*a, **kw):
        split(*a, **kw)
        mark("split_done")

    runner._serve_gpu = serve_w
    runner_mod.split_misses = split_w
    runner.stats()
    runner.split_log.clear()  # a deque of the last 1024 jobs: its length must grow with each job below
    if runner._hybrid is not None:
        runner._hybrid.split = split_w
    rows = []
    try:
        for s in range(steps):
            for i, layer in enumerate(layers):
                torch.cuda.synchronize()
                runner.stats()
                n_jobs = len(runner.split_log)
                events.clear()
                t0 = time.perf_counter()
                mark("start")
                runner.run(layer, h, ids[i][s], w)
                mark("end")
                torch.cuda.synchronize()
                row = {n: events["start"].elapsed_time(e) for n, e in events.items() if n != "start"}
                runner.stats()
                if len(runner.split_log) > n_jobs:
                    job = runner.split_log[-1]
                    row.update(cpu_start=(job["t_start"] - t0) * 1e3, cpu_end=(job["t_end"] - t0) * 1e3)
                    if "split_done" in row:
                        row["handoff"] = row["cpu_start"] - row["split_done"]
                if s > 0:
                    rows.append(row)
    finally:
        runner._serve_gpu = serve
        runner_mod.split_misses = split
        if runner._hybrid is not None:
            runner._hybrid.split = split
    keys = sorted({key for r in rows for key in r})
    return {key: float(np.median([r[key] for r in rows if key in r])) for key in keys}


def depth_cases(args, ceil: dict) -> list[dict]:
    """The ~0.9 ms per layer: one layer vs many, torch vs huge-page slabs, 8 slots (one round) vs 1 (8 rounds)."""
    import torch

    from moed.offload.expert_cache import CacheConfig
    from moed.offload.host_store import ExpertLayout, HostExpertStore, thp_status
    from moed.offload.runner import CpuConfig, OffloadMoERunner

    E = 16
    cfg = _slice_cfg(E)
    k = cfg.num_experts_per_tok
    layout = ExpertLayout.for_config(cfg, fp8=True)
    deep = list(range(3, 3 + args.depth_layers))
    steps, warm = args.steps, 4
    # Two disjoint sets of k experts alternate: with k slots (LRU) every routed expert is a miss, every step.
    sets = np.stack([np.arange(k), np.arange(k, 2 * k)]).astype(np.int32)
    trace = torch.from_numpy(np.stack([sets[s % 2][None] for s in range(steps + warm)])).cuda()  # [S, 1, k]
    rows = []
    for alloc in args.depth_allocs.split(","):
        need = layout.slab_bytes * len(deep) * (1.8 if alloc == "torch" else 1.0)
        if need > _mem_available() - (8 << 30):
            log.warning("depth case %s skipped: needs %.1f GB of host memory, %.1f GB available", alloc, need / 1e9,
                        _mem_available() / 1e9)
            rows.append({"alloc": alloc, "skipped": f"needs {need / 1e9:.1f} GB"})
            continue
        t = time.perf_counter()
        store = HostExpertStore(layout, deep, pin=True, alloc=alloc)
        alloc_s = time.perf_counter() - t
        for i, layer in enumerate(deep):
            _fill_random(store, layer, seed=i)
        fill_s = time.perf_counter() - t - alloc_s
        thp = thp_status()
        log.info("depth store %s: %d layers x %d experts, allocated and pinned in %.1f s, filled in %.1f s, THP %s",
                 alloc, len(deep), E, alloc_s, fill_s, thp)
        for n_layers, slots in ((1, k), (len(deep), k), (len(deep), 1)):
            if slots == 1 and alloc != args.depth_allocs.split(",")[0]:
                continue  # the rounds effect is shown once
            layers = deep[:n_layers]
            r = OffloadMoERunner(cfg, layers=deep, device="cuda", slots=slots, store=store,
                                 cache=CacheConfig(), cpu=CpuConfig(threads=args.cpu_threads, max_tokens=8))
            r.finish_loading()
            ids = [trace] * len(layers)
            res = _steps_in_graph(r, layers, ids, 1, steps, warm)
            res["timeline_ms"] = _eager_timeline(r, layers[: min(8, n_layers)], ids, 3) if r.miss_service != "copy" \
                else None
            miss_bytes = res["misses"] * layout.expert_bytes
            res.update(alloc=alloc, layers=n_layers, slots=slots, store_GB=layout.slab_bytes * len(deep) / 1e9,
                       alloc_s=alloc_s, fill_s=fill_s, thp=thp, miss_service=r.miss_service,
                       runner_cpu_GBps=r.cpu_rate / 1e9, runner_copy_GBps=r.copy_rate / 1e9,
                       bound_ms=decode_bound_ms(res["misses"], res["hits"], layout.expert_bytes, ceil["joint_GBps"],
                                                ceil["hbm_GBps"]),
                       miss_GBps=miss_bytes / (res["ms_per_layer"] / 1e3) / 1e9)
            log.info("depth %s layers=%d slots=%d: %.3f ms/layer (bound %.3f), jobs %s, timeline %s", alloc, n_layers,
                     slots, res["ms_per_layer"], res["bound_ms"], res["jobs"], res["timeline_ms"])
            rows.append(res)
            r.close()
            del r
            torch.cuda.empty_cache()
        del store
        gc.collect()
        _release_pinned()
    return rows


def stage_slice(args) -> dict:
    import torch

    from moed.offload.expert_cache import CacheConfig
    from moed.offload.host_store import ExpertLayout, HostExpertStore, thp_status
    from moed.offload.runner import CpuConfig, OffloadMoERunner
    from moed.offload.traces import skewed_trace, trace_statistics, uniform_trace

    deep = json.loads(Path(args.work, "deep.json").read_text()) if Path(args.work, "deep.json").exists() else {}
    cfg = _slice_cfg(REAL_EXPERTS)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    layout = ExpertLayout.for_config(cfg, fp8=True)
    gpu = torch.cuda.get_device_properties(0).total_memory
    nonexpert = deep.get("nonexpert_resident_bytes") or int(args.nonexpert_gib * 2**30)
    kv_tok = deep.get("kv_bytes_per_token") or 78 * 1284
    dep = Deployment(gpu, nonexpert, kv_tok * args.context, int(args.reserve_gib * 2**30), layout.expert_bytes)
    fp8_nonexpert = (deep.get("checkpoint_bytes") or {}).get("other")
    dep_fp8 = dataclasses.replace(dep, nonexpert_bytes=fp8_nonexpert) if fp8_nonexpert else None
    out: dict = {"deployment": dataclasses.asdict(dep) | {"fraction": dep.fraction, "slots": dep.slots_per_layer,
                                                          "cache_bytes": dep.cache_bytes},
                 "deployment_fp8_nonexpert": None if dep_fp8 is None else {
                     "fraction": dep_fp8.fraction, "slots": dep_fp8.slots_per_layer},
                 "context": args.context, "thp": thp_status()}
    slots = max(k, dep.slots_per_layer)
    log.info("deployment: cache %.1f GB of %.1f GB GPU -> %.2f%% of the model's experts, %d slots per layer",
             dep.cache_bytes / 1e9, gpu / 1e9, 100 * dep.fraction, slots)

    # The host holds this many 256-expert layers (pinned), leaving room for the process and the OS.
    avail = _mem_available() - int(args.host_margin_gib * 2**30)
    n = max(1, min(args.max_slice_layers, avail // layout.slab_bytes))
    layers = list(range(3, 3 + n))
    t = time.perf_counter()
    store = HostExpertStore(layout, layers, pin=True, alloc=args.slice_alloc)
    out["store"] = {"layers": n, "bytes": layout.slab_bytes * n, "alloc": args.slice_alloc,
                    "alloc_s": time.perf_counter() - t, "mem_available_before": avail}
    t = time.perf_counter()
    for i, layer in enumerate(layers):
        _fill_random(store, layer, seed=100 + i)
    out["store"]["fill_s"] = time.perf_counter() - t
    log.info("slice store: %s", out["store"])

    # Ceilings (on the first slab) and the CPU experts' own rate, as the runner measures it.
    probe = OffloadMoERunner(cfg, layers=layers, device="cuda", slots=slots, store=store,
                             cpu=CpuConfig(threads=args.cpu_threads))
    probe.finish_loading()
    cpu_GBps = probe.cpu_rate / 1e9
    probe.close()
    del probe
    from moed.ops.bench.offload import ceilings as offload_ceilings

    ceil = offload_ceilings(_FirstLayerView(store, layers[0]))
    ceil["cpu_experts_GBps"] = cpu_GBps
    ceil["joint_GBps"] = joint_rate_GBps(cpu_GBps, ceil["uva_GBps"], ceil["host_read_GBps"])
    out["ceilings"] = ceil
    log.info("ceilings: %s", ceil)

    out["trace_stats"] = {"uniform": trace_statistics(uniform_trace(1024, 2, E, k, seed=1), E),
                          "skewed": trace_statistics(skewed_trace(1024, 2, E, k, seed=1), E)}
    rows = []
    warm = args.warm_steps
    for trace_name in ("uniform", "skewed"):
        gen = uniform_trace if trace_name == "uniform" else skewed_trace
        for batch in args.batches:
            if trace_name == "uniform" and batch not in (1, 8, 32):
                continue
            ids = [torch.from_numpy(gen(warm + args.steps, batch, E, k, seed=1000 * i + batch)).cuda()
                   for i in range(n)]
            policies = ("lru", "lfu") if trace_name == "skewed" and batch == 1 else ("lru",)
            for policy in policies:
                r = OffloadMoERunner(cfg, layers=layers, device="cuda", slots=slots, store=store,
                                     cache=CacheConfig(policy=policy),
                                     cpu=CpuConfig(threads=args.cpu_threads, max_tokens=8,
                                                   fallback_to_copy=True))
                r.finish_loading()
                res = _steps_in_graph(r, layers, ids, batch, args.steps, warm)
                distinct = res["hits"] + res["misses"]
                # CPU experts serve steps of up to 8 tokens; larger ones only copy (UVA kernel)
                hybrid = r.miss_service != "copy" and batch <= r.cpu_cfg.max_tokens
                rate = ceil["joint_GBps"] if hybrid else ceil["uva_GBps"]
                res.update(trace=trace_name, policy=policy, batch=batch, slots=slots, miss_service=r.miss_service,
                           hit_rate=res["hits"] / distinct if distinct else None, miss_rate_GBps=rate,
                           bound_ms=decode_bound_ms(res["misses"], res["hits"], layout.expert_bytes, rate,
                                                    ceil["hbm_GBps"]))
                res["vs_bound"] = res["ms_per_layer"] / res["bound_ms"] if res["bound_ms"] else None
                log.info("slice %s %s batch %d: %.3f ms/layer, hit %.3f, misses %.2f, bound %.3f", trace_name, policy,
                         batch, res["ms_per_layer"], res["hit_rate"] or 0, res["misses"], res["bound_ms"])
                rows.append(res)
                r.close()
                del r
                torch.cuda.empty_cache()
    out["decode"] = rows
    out["prefill"] = prefill_layer(cfg, store, layers[0], slots, ceil, args)
    del store
    _release_pinned()
    out["depth"] = depth_cases(args, ceil) if args.depth_layers > 0 else []
    return out


class _FirstLayerView:
    """offload.py's ceilings() read `store.slabs[1]` and `section_bytes_of(1)`: give it this store's first layer."""

    def __init__(self, store, layer: int) -> None:
        self.layout, self.slabs = store.layout, {1: store.slabs[layer]}
        self._store, self._layer = store, layer

    def section_bytes_of(self, layer: int):
        return self._store.section_bytes_of(self._layer)


def prefill_layer(cfg, store, layer: int, slots: int, ceil: dict, args) -> list[dict]:
    """One MoE layer at prefill sizes: every expert is streamed through `slots` slots in rounds (what the engine
    does), against the copy ceiling (all experts' bytes / copy-engine rate), the same layer with every expert resident
    (compute alone), and the rounds' repeated compute (offload/runner.py computes every route in every round)."""
    import torch

    from moed.offload.expert_cache import CacheConfig
    from moed.offload.runner import OffloadMoERunner
    from moed.offload.traces import uniform_trace

    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    L = store.layout
    resident = OffloadMoERunner(cfg, layers=[layer], device="cuda", slots=E, store=_OneLayer(store, layer))
    resident.finish_loading()
    streamed = OffloadMoERunner(cfg, layers=[layer], device="cuda", slots=slots, store=_OneLayer(store, layer),
                                cache=CacheConfig(copy_path="sm"))
    streamed.finish_loading()
    rows = []
    for M in args.prefill_tokens:
        ids = torch.from_numpy(uniform_trace(1, M, E, k, seed=M)[0]).cuda()
        w = torch.rand(M, k, device="cuda")
        h = torch.randn(M, K, device="cuda").bfloat16()
        t_res = _cuda_ms(lambda h=h, ids=ids, w=w: resident.run(layer, h, ids, w))
        t_str = _cuda_ms(lambda h=h, ids=ids, w=w: streamed.run(layer, h, ids, w))
        # the cache's rounds for this step: every distinct expert once, `unpinned` slots at a time
        lc = streamed.cache[layer]
        rounds = max(1, math.ceil(min(E, M * k) / (lc.num_slots - len(lc.pinned))))
        nbytes = E * L.expert_bytes
        copy_ms = nbytes / (ceil["ce_GBps"] * 1e9) * 1e3
        rows.append({"tokens": M, "ms_streamed": t_str, "ms_resident": t_res, "rounds": rounds,
                     "copy_ceiling_ms": copy_ms, "bytes": nbytes, "GBps": nbytes / (t_str / 1e3) / 1e9,
                     "vs_ce": copy_ms / t_str, "vs_host_read": nbytes / (ceil["host_read_GBps"] * 1e9) * 1e3 / t_str,
                     "overlap_bound_ms": max(copy_ms, t_res),
                     "repeated_compute_ms": (rounds - 1) * t_res,
                     "hidden_compute": t_str <= copy_ms * 1.1})
        log.info("prefill layer %d tokens: streamed %.1f ms (%d rounds), resident %.1f ms, copy ceiling %.1f ms", M,
                 t_str, rounds, t_res, copy_ms)
    resident.close()
    streamed.close()
    torch.cuda.empty_cache()
    return rows


class _OneLayer:
    """A store restricted to one of its layers (a runner checks its store's layers equal its own)."""

    def __init__(self, store, layer: int) -> None:
        self._s, self.layout, self.layers, self.pinned = store, store.layout, [layer], store.pinned

    def __getattr__(self, name):
        return getattr(self._s, name)

    def finish_loading(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- stage: report


def build_report(parts: dict) -> dict:
    """Whole-model figures from the stages' JSON (pure arithmetic: tested on CPU with small numbers)."""
    deep, sl, llama = parts.get("deep") or {}, parts.get("slice") or {}, parts.get("llama") or {}
    rep: dict = {"mtp_acceptance_source": MTP_SOURCE}
    nonmoe = {r["batch"]: r["step_ms"] for r in deep.get("nonmoe", [])}
    moe: dict[tuple[str, int], dict] = {}
    for r in sl.get("decode", []):
        key = (r["trace"], r["batch"])
        if key not in moe or r["ms_per_layer"] < moe[key]["ms_per_layer"]:  # the better policy
            moe[key] = r
    rows = []
    for (trace, b), r in sorted(moe.items()):
        if b not in nonmoe:
            continue
        whole = whole_decode_ms(nonmoe[b], r["ms_per_layer"])
        bound = whole_decode_ms(nonmoe[b], r["bound_ms"])
        rows.append({"trace": trace, "batch": b, "policy": r["policy"], "nonmoe_ms": nonmoe[b],
                     "moe_layer_ms": r["ms_per_layer"], "hit_rate": r["hit_rate"], "misses_per_layer": r["misses"],
                     "whole_ms": whole, "tok_s": b * 1e3 / whole, "bound_ms": bound, "vs_bound": whole / bound,
                     "pcie_bytes_per_token": MOE_LAYERS * r["misses"] * (sl["deployment"]["expert_bytes"]) / b
                     * (1 - (r.get("cpu_experts", 0) / r["misses"] if r["misses"] else 0))})
    rep["decode"] = rows
    # MTP, one draft token: verify = a step at 2 tokens per sequence; draft = one MTP layer's step at the batch.
    mtp = []
    head = {int(b): v for b, v in (deep.get("head_ms") or {}).items()}
    for (trace, b), r in sorted(moe.items()):
        if b not in nonmoe or 2 * b not in nonmoe or (trace, 2 * b) not in moe:
            continue
        verify = whole_decode_ms(nonmoe[2 * b], moe[(trace, 2 * b)]["ms_per_layer"])
        draft = nonmoe[b] / 78 + (interpolate(head, b) if head else 0.0) + r["ms_per_layer"]
        for acc in (0.0, PUBLISHED_MTP_ACCEPTANCE):
            mtp.append({"trace": trace, "batch": b, "acceptance": acc, "verify_ms": verify, "draft_ms": draft,
                        "tok_s": mtp_tokens_per_s(verify, draft, acc, b)})
    rep["mtp"] = mtp
    pre = {int(n): s for n, s in (deep.get("nonmoe_prefill_s") or {}).items()}
    ttft = []
    prefill_pts = {p["tokens"]: p for p in sl.get("prefill", [])}
    for n, s in sorted(pre.items()):
        # Two step sizes: the whole prompt in one step (each layer's experts stream once) and the engine's default
        # chunk (max_tokens_per_step 2048: they stream once per chunk).
        for label, step in (("one step", n), ("2048-token chunks", CHUNK)):
            if step not in prefill_pts:
                continue
            p = prefill_pts[step]
            chunks = math.ceil(n / step)
            per_layer_s = chunks * p["ms_streamed"] / 1e3
            ttft.append({"prompt": n, "steps": label, "step_tokens": step, "chunks": chunks, "nonmoe_s": s,
                         "moe_per_layer_s": per_layer_s, "ttft_s": ttft_s(s, per_layer_s),
                         "ttft_bound_s": ttft_s(s, chunks * p["overlap_bound_ms"] / 1e3), "GBps": p["GBps"],
                         "vs_ce": p["vs_ce"],
                         "repeated_compute_s": MOE_LAYERS * chunks * p["repeated_compute_ms"] / 1e3})
    rep["ttft"] = ttft
    dep = sl.get("deployment") or {}
    if dep:
        rep["memory"] = {"host_bytes_experts": dep["expert_bytes"] * REAL_EXPERTS * MOE_LAYERS,
                         "gpu_bytes": dep["gpu_bytes"], "gpu_nonexpert_bytes": dep["nonexpert_bytes"],
                         "gpu_kv_bytes": dep["kv_bytes"], "gpu_cache_bytes": dep["cache_bytes"],
                         "cache_fraction": dep["fraction"], "slots_per_layer": dep["slots"]}
    if llama:
        rep["llama"] = llama
        head_rows = []
        for r in rows:
            if r["batch"] != 1:
                continue
            for variant in ("cpu_experts", "n_cpu_moe"):
                lm = (llama.get("whole") or {}).get(variant)
                if lm:
                    head_rows.append({"trace": r["trace"], "llama_variant": variant, "moed_ms": r["whole_ms"],
                                      "llama_ms": lm["whole_ms"], "ratio": lm["whole_ms"] / r["whole_ms"]})
        rep["headline"] = head_rows
    return rep


def print_report(rep: dict, parts: dict) -> None:
    """The tables; a part missing because its stage failed leaves its lines out (named), never the rest."""
    deep, sl = parts.get("deep") or {}, parts.get("slice") or {}

    def f(v, fmt=".2f"):
        return "-" if v is None else format(v, fmt)

    print("\n== whole GLM-5.1 (78 layers, 75 MoE x 256 experts), assembled from measured parts ==")
    def block0() -> None:
        if deep:
            st = deep["store"]
            print(f"deep checkpoint: engine load {deep['load_s']:.0f} s, host store {st['bytes'] / 1e9:.1f} GB "
                  f"({st['alloc']}, {st['reserved_bytes'] / 1e9:.1f} GB reserved, pinned in {st['alloc_s']:.1f} s), "
                  f"resident non-expert {deep['nonexpert_resident_bytes'] / 1e9:.1f} GB (checkpoint's non-expert "
                  f"bytes {deep['checkpoint_bytes']['other'] / 1e9:.1f} GB), KV "
                  f"{deep['kv_bytes_per_token'] / 1e3:.0f} kB/token")

    _guarded(block0)

    def block2() -> None:
        d = sl.get("deployment")
        if d:
            print(f"expert cache of a real deployment on this GPU: ({d['gpu_bytes'] / 1e9:.1f} GB - non-expert "
                  f"{d['nonexpert_bytes'] / 1e9:.1f} - KV {d['kv_bytes'] / 1e9:.1f} ({sl['context']} tokens) - "
                  f"reserve {d['reserve_bytes'] / 1e9:.1f}) = {d['cache_bytes'] / 1e9:.1f} GB = "
                  f"{100 * d['fraction']:.2f}% of the "
                  f"experts ({d['slots']} slots per layer); with FP8 non-expert weights: "
                  f"{f((sl.get('deployment_fp8_nonexpert') or {}).get('fraction', None), '.3f')}")
            c = sl["ceilings"]
            print(f"ceilings: host read {c['host_read_GBps']:.1f} GB/s, copy engine {c['ce_GBps']:.1f}, UVA "
                  f"{c['uva_GBps']:.1f}, CPU experts {c['cpu_experts_GBps']:.1f}, joint miss service "
                  f"{c['joint_GBps']:.1f}, HBM "
                  f"{c['hbm_GBps']:.0f}; slice {sl['store']['layers']} layers x 256 experts")
            for name, s in sl["trace_stats"].items():
                print(f"  {name} trace: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))

    _guarded(block2)

    def block3() -> None:
        print(f"\n{'trace':8} {'batch':>5} {'non-MoE ms':>10} {'MoE/layer ms':>12} {'hit':>5} {'miss/layer':>10} "
              f"{'ms/step':>13} {'tok/s':>7} {'bound ms':>8} {'x bound':>7}")

    _guarded(block3)

    def block4() -> None:
        for r in rep["decode"]:
            print(f"{r['trace']:8} {r['batch']:>5} {r['nonmoe_ms']:>10.2f} {r['moe_layer_ms']:>12.3f} "
                  f"{f(r['hit_rate']):>5} {r['misses_per_layer']:>10.2f} {r['whole_ms']:>13.1f} {r['tok_s']:>7.2f} "
                  f"{r['bound_ms']:>8.1f} {r['vs_bound']:>7.2f}")

    _guarded(block4)

    def block5() -> None:
        if rep["mtp"]:
            print(f"\nMTP, 1 draft token (acceptance {PUBLISHED_MTP_ACCEPTANCE}: {MTP_SOURCE})")
            for r in rep["mtp"]:
                print(f"  {r['trace']:8} batch {r['batch']:>3} acceptance {r['acceptance']:.2f}: verify "
                      f"{r['verify_ms']:.1f} ms + draft {r['draft_ms']:.1f} ms -> {r['tok_s']:.2f} tok/s")

    _guarded(block5)

    def block6() -> None:
        if rep["ttft"]:
            print("\ntime to first token (uniform routing over all 256 experts: prefill streams every layer's experts)")
            for r in rep["ttft"]:
                print(f"  {r['prompt']:>6} tokens, {r['steps']:17s}: {r['ttft_s']:.1f} s (non-MoE "
                      f"{r['nonmoe_s']:.1f} s "
                      f"+ 75 x "
                      f"{r['moe_per_layer_s']:.2f} s in {r['chunks']} steps of {r['step_tokens']}); bound "
                      f"{r['ttft_bound_s']:.1f} s; experts at {r['GBps']:.1f} GB/s = {100 * r['vs_ce']:.0f}% of the "
                      f"copy engine; repeated compute of the cache's rounds {r['repeated_compute_s']:.1f} s")

    _guarded(block6)

    def block8() -> None:
        m = rep.get("memory")
        if m:
            print(f"\nneeds: host {m['host_bytes_experts'] / 1e9:.0f} GB for the experts (FP8, pinned); GPU "
                  f"{m['gpu_nonexpert_bytes'] / 1e9:.1f} GB non-expert + {m['gpu_kv_bytes'] / 1e9:.1f} GB KV + "
                  f"{m['gpu_cache_bytes'] / 1e9:.1f} GB expert cache")
            for r in rep["decode"]:
                print(f"  PCIe per token ({r['trace']}, batch {r['batch']}): {r['pcie_bytes_per_token'] / 1e9:.2f} GB")

    _guarded(block8)

    def block9() -> None:
        for r in sl.get("depth", []):
            if "skipped" in r:
                print(f"depth {r['alloc']}: skipped ({r['skipped']})")
                continue
            j = r.get("jobs") or {}
            tl = r.get("timeline_ms") or {}
            print(f"depth {r['alloc']:5} layers {r['layers']:>3} slots {r['slots']}: {r['ms_per_layer']:.3f} ms/layer "
                  f"(bound {r['bound_ms']:.3f}), CPU job {f(j.get('cpu_job_ms'), '.3f')} ms, gap "
                  f"{f(j.get('gap_ms'), '.3f')} ms; eager, ms from the layer's start: split done "
                  f"{f(tl.get('split_done'), '.3f')}, CPU job {f(tl.get('cpu_start'), '.3f')}-"
                  f"{f(tl.get('cpu_end'), '.3f')} (hand-off {f(tl.get('handoff'), '.3f')}), GPU claim+copy+MoE done "
                  f"{f(tl.get('gpu_rounds_done'), '.3f')}, layer done {f(tl.get('end'), '.3f')}; pinned in "
                  f"{r['alloc_s']:.1f} s; THP {r['thp']}")

    _guarded(block9)

    def block10() -> None:
        for r in deep.get("offload", []):
            j = r.get("jobs") or {}
            print(f"deep engine, offload runner, batch {r['batch']}: step {r['step_ms']:.1f} ms, MoE in situ "
                  f"{r['moe_per_layer_ms']:.3f} ms/layer, hit {f(r['hit_rate'])}, misses/step "
                  f"{r['misses_per_step']:.1f}, graphed steps {r['graph_steps']}, CPU job "
                  f"{f(j.get('cpu_job_ms'), '.3f')} ms, gap between layers' jobs {f(j.get('gap_ms'), '.3f')} ms")

    _guarded(block10)

    def block11() -> None:
        for n, t in ((rep.get("llama") or {}).get("ttft_s") or {}).items():
            print(f"llama.cpp time to first token, {n} tokens: experts on the CPU {t['cpu_experts']:.1f} s, "
                  f"--n-cpu-moe {t['n_cpu_moe']:.1f} s (per-layer method)")
        for h in rep.get("headline", []):
            print(f"HEADLINE batch 1 {h['trace']}: moed {h['moed_ms']:.1f} ms/token vs llama.cpp "
                  f"({h['llama_variant']}) "
                  f"{h['llama_ms']:.1f} ms/token -> moed is {h['ratio']:.2f}x llama.cpp")

    _guarded(block11)


def _guarded(fn) -> None:
    try:
        fn()
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        print(f"  (a part is missing or incomplete: {e!r})")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("all", "deep", "slice", "report"), default="all")
    p.add_argument("--ckpt", default="/dev/shm/glm51-deep", help="the glm51 preset checkpoint (deep stage)")
    p.add_argument("--work", default="model-bench", help="folder for each stage's JSON")
    p.add_argument("--out", default=None, help="the report's JSON (default WORK/results.json)")
    p.add_argument("--llama", default=None, help="llama.cpp figures (ops/bench/llama_peer.py's JSON)")
    p.add_argument("--deep-cache-gb", type=float, default=4.0, help="deep engine's expert cache (the issue's 4 GB)")
    p.add_argument("--deep-prompt", type=int, default=256)
    p.add_argument("--deep-gen", type=int, default=16)
    p.add_argument("--delete-ckpt-after-load", action="store_true")
    p.add_argument("--miss-service", default="auto")
    p.add_argument("--cpu-threads", type=int, default=0)
    p.add_argument("--context", type=int, default=32768, help="KV the deployment keeps room for (tokens)")
    p.add_argument("--reserve-gib", type=float, default=4.0, help="activations, graph pools, CUDA context")
    p.add_argument("--nonexpert-gib", type=float, default=38.0, help="without a deep stage: resident non-expert")
    p.add_argument("--host-margin-gib", type=float, default=12.0)
    p.add_argument("--max-slice-layers", type=int, default=8)
    p.add_argument("--slice-alloc", default="huge", help="host slabs of the 256-expert slice: torch, mmap, huge")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(BATCHES))
    p.add_argument("--prefill-tokens", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1024, CHUNK, 8192, 32768])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warm-steps", type=int, default=8)
    p.add_argument("--depth-layers", type=int, default=75, help="0: skip the one-layer vs deep cases")
    p.add_argument("--depth-allocs", default="huge,torch")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--stage")]
        for stage in ("deep", "slice", "report"):
            if stage == "deep" and not Path(args.ckpt, "config.json").exists():
                log.warning("no checkpoint at %s: deep stage skipped", args.ckpt)
                continue
            rc = subprocess.call([sys.executable, "-m", "moed.ops.bench.model", "--stage", stage, *rest])
            log.info("stage %s exited with %d", stage, rc)
        return 0
    t0 = time.perf_counter()
    if args.stage == "deep":
        res = stage_deep(args)
    elif args.stage == "slice":
        res = stage_slice(args)
    else:
        parts = {name: json.loads(Path(work, f"{name}.json").read_text()) for name in ("deep", "slice")
                 if Path(work, f"{name}.json").exists()}
        if args.llama and Path(args.llama).exists():
            parts["llama"] = json.loads(Path(args.llama).read_text())
        rep = build_report(parts)
        _write(Path(args.out or work / "results.json"), {"report": rep, **parts})
        print_report(rep, parts)
        return 0
    import torch

    res.update(stage=args.stage, seconds=time.perf_counter() - t0, device=torch.cuda.get_device_name(),
               date=time.strftime("%Y-%m-%d"), torch=torch.__version__, args=vars(args))
    _write(work / f"{args.stage}.json", res)
    log.info("stage %s done in %.0f s", args.stage, res["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
