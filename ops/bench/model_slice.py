"""Whole-model bench, stage `slice`: GLM-5.1's MoE layers with all 256 experts and the expert cache a deployment of
the whole model would have on this GPU.

The experts are random FP8 drawn on the device straight into the pinned store (9.7 GB per layer; no checkpoint staged
in host memory), as many layers as the host holds; with `--expert-dtype int4`, random int4 experts in moed's int4
layout instead (5.0 GB per layer; the same cache arithmetic at int4's expert bytes; written to slice_int4.json).
The cache gets the slots per layer a real deployment leaves them: fraction = (GPU memory - resident non-expert bytes
- KV for one `--context` sequence - `--reserve-gib`) / (75 x 256 experts' bytes). In the order the headline needs
them, each part written as soon as it is measured:
  decode   per batch x trace {uniform, skewed (offload/traces.py, its four DESIGN.md section 4 statistics
           printed)}: per-layer time of a step over all slice layers replayed from one CUDA graph, hit rate,
           misses, and the bound misses x expert bytes / joint miss-service rate + resident bytes / HBM; batch 1
           first (the headline), then the rest;
  prefill  one layer at prefill step sizes, every expert streamed through the cache's rounds: bytes/s against the
           copy-engine and host-read ceilings of this run, now (each round computes only the routes it serves) and
           as before (every route in every round: the old loop, emulated), compute with every expert resident, and
           whether copies overlap compute;
  depth    (last) where the ~0.9 ms per MoE layer that a 78-layer model lost against the one-layer bench went:
           batch-1 steps with nothing cached over 1 layer and over 75, host slabs as transparent huge pages
           (MOED_HOST_ALLOC=huge) and/or torch's allocator, 8 slots (one round) and 1 (8 rounds); per layer the CPU
           job time, the time between jobs, and eagerly the GPU's split / hand-off / rounds / end phases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from moed.daemon.pin_planner import PinPlanner
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig
from moed.offload.expert_cache import CacheConfig
from moed.offload.host_store import ExpertLayout, HostExpertStore, thp_status
from moed.offload.hybrid import CpuConfig
from moed.offload.pins import pin_budget
from moed.offload.routed_experts import hybrid_max_tokens
from moed.offload.runner import OffloadMoERunner
from moed.offload.stats import summarize
from moed.offload.traces import skewed_trace, trace_statistics, uniform_trace, verify_steps
from moed.ops.bench.hitrate_sim import shipped_policy
from moed.ops.bench.model_projection import MOE_LAYERS, VERIFY_TRACE, Deployment, decode_bound_ms, joint_rate_GBps
from moed.ops.bench.model_timing import (
    Span,
    ceilings,
    graphed,
    job_breakdown,
    mem_available,
    peak_bytes,
    release_pinned,
    sync,
    time_ms,
)

log = logging.getLogger("bench.model.slice")
ZERO_POINTS_0 = int.from_bytes(bytes([0x88] * 4), "little", signed=True)  # eight stored nibbles z + 8 = 8: z = 0
INT4_STD = (255 / 12) ** 0.5  # spread of a value uniform over the 16 integers -8..7


def slice_cfg(preset: str, experts: int) -> GlmMoeDsaConfig:
    return GlmMoeDsaConfig.from_dict(make_config(preset, experts=experts, fp8=True), source=f"{preset} x{experts}")


def fill_random(store: HostExpertStore, layer: int, seed: int, device: torch.device) -> None:
    """Random experts drawn on `device` straight into `layer`'s slab: FP8 weights with block scales 1/sqrt(fan-in);
    int4 nibbles uniform over [-8, 7], zero points 0, bf16 group scales that give the same 1/sqrt(fan-in) spread."""
    g = torch.Generator(device=device).manual_seed(seed)
    L = store.layout
    for name, sec in store.sections(layer).items():
        fan_in = L.hidden if name.startswith("w13") else L.inter
        if name.endswith("zeros"):
            sec.fill_(ZERO_POINTS_0)
            continue
        if name.endswith("scale"):
            sec.fill_(fan_in**-0.5 / (INT4_STD if L.is_int4 else 1.0))
            continue
        step = max(1, (1 << 30) // sec[0].numel())
        for e0 in range(0, L.num_experts, step):
            e1 = min(L.num_experts, e0 + step)
            shape = (e1 - e0, *sec.shape[1:])
            if L.is_int4:  # two uniform nibbles a byte
                sec[e0:e1].copy_(torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8))
            else:
                sec[e0:e1].copy_(torch.randn(shape, generator=g, device=device).to(sec.dtype))
    store.mark_loaded(layer)
    sync(device)


class OneLayer:
    """A store restricted to one of its layers (a runner checks its store's layers equal its own)."""

    def __init__(self, store: HostExpertStore, layer: int) -> None:
        self._s, self.layout, self.layers, self.pinned = store, store.layout, [layer], store.pinned

    def __getattr__(self, name: str):
        return getattr(self._s, name)

    def finish_loading(self) -> None:
        pass


def steps_timed(
    runner: OffloadMoERunner,
    layers: list[int],
    ids: list[torch.Tensor],
    batch: int,
    steps: int,
    warm: int,
    device: torch.device,
) -> dict:
    """Steps over `layers` (ids[i]: [warm + steps, batch, k] int32 for layers[i]) replayed from one CUDA graph (eager
    on a CPU): ms per layer, hits / misses / CPU experts per layer-step, the CPU server's job breakdown."""
    K, k = runner.cfg.hidden_size, runner.cfg.num_experts_per_tok
    g = torch.Generator(device=device).manual_seed(batch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = {layer: torch.randn(batch, K, device=device, generator=g).to(dtype) for layer in layers}
    weights = torch.rand(batch, k, device=device, generator=g)
    static = {layer: ids[i][0].clone() for i, layer in enumerate(layers)}

    def step() -> None:
        for layer in layers:
            runner.run(layer, hidden[layer], static[layer], weights)

    def load(s: int) -> None:
        for i, layer in enumerate(layers):
            static[layer].copy_(ids[i][s])

    load(0)
    replay, release = graphed(step, device)
    for s in range(1, warm):
        load(s)
        replay()
    sync(device)
    before = summarize(runner.stats())
    hybrid = runner.hybrid
    if hybrid is not None:
        hybrid.split_log.clear()
    span = Span(device).start()
    for s in range(warm, warm + steps):
        load(s)
        replay()
    elapsed = span.stop().ms()
    after = summarize(runner.stats())  # takes in the server's job records too
    release()
    n = steps * len(layers)
    return {
        "ms_per_layer": elapsed / n,
        "hits": (after["hits"] - before["hits"]) / n,
        "misses": (after["misses"] - before["misses"]) / n,
        "cpu_experts": (after["cpu_experts"] - before["cpu_experts"]) / n,
        "jobs": job_breakdown(list(hybrid.split_log)) if hybrid is not None else None,
    }


def warm_with_placement(
    runner: OffloadMoERunner, layers: list[int], ids: list[torch.Tensor], pin_fraction: float, every: int
) -> int:
    """Run the steps of ids[i] ([prefix, tokens, k] for layers[i]) eagerly, so the cache and its counts reach a steady
    state; with `pin_fraction` > 0 the daemon's PinPlanner reads the runner's counts and applies pins every `every`
    steps and once at the end, as daemon/placement.py does between engine steps. Returns the pins per layer."""
    if not len(ids) or not ids[0].shape[0]:
        return 0
    K, k = runner.cfg.hidden_size, runner.cfg.num_experts_per_tok
    M = ids[0].shape[1]
    dtype = torch.bfloat16 if runner.device.type == "cuda" else torch.float32
    hidden = torch.randn(M, K, device=runner.device).to(dtype)
    weights = torch.rand(M, k, device=runner.device)
    planner = None
    if pin_fraction > 0:
        assert runner.cache is not None
        budget = pin_budget(runner.cache[layers[0]].num_slots, runner.layout.num_experts, pin_fraction)

        def apply(pins: dict[int, set[int]]) -> None:
            assert runner.cache is not None
            for layer, experts in pins.items():
                runner.cache[layer].set_pins(experts)

        planner = PinPlanner(
            runner.layout.num_experts, list(runner.layers), budget, read_counts=runner.read_counts, apply=apply
        )
    for s in range(ids[0].shape[0]):
        for i, layer in enumerate(layers):
            runner.run(layer, hidden, ids[i][s], weights)
        if planner is not None and (s + 1) % every == 0:
            planner.tick()
    sync(runner.device)
    if planner is None:
        return 0
    pins = planner.tick()
    return len(pins[layers[0]])


def eager_timeline(runner: OffloadMoERunner, layers: list[int], ids: list[torch.Tensor], steps: int) -> dict | None:
    """Batch-1 steps run eagerly with the GPU idle at each start (CUDA only): per layer, ms from the layer's start to
    the split kernel's end (GPU), the CPU job's start and end (host clock), the GPU rounds' end (claim, copy, fused
    MoE) and the layer's end; medians over layers and steps. Hand-off latency = job start - split end."""
    hybrid = runner.hybrid
    if runner.device.type != "cuda" or hybrid is None:
        return None
    K, k = runner.cfg.hidden_size, runner.cfg.num_experts_per_tok
    h = torch.randn(1, K, device="cuda").bfloat16()
    w = torch.rand(1, k, device="cuda")
    events: dict[str, torch.cuda.Event] = {}

    def mark(name: str) -> None:
        events[name] = torch.cuda.Event(enable_timing=True)
        events[name].record()

    split = hybrid.split

    def split_marked(*a, **kw):
        split(*a, **kw)
        mark("split_done")

    hybrid.split = split_marked
    runner.after_gpu_rounds = lambda: mark("gpu_rounds_done")
    rows = []
    try:
        for s in range(steps):
            for i, layer in enumerate(layers):
                torch.cuda.synchronize()
                runner.stats()
                n_jobs = len(hybrid.split_log)  # a deque of the last 1024 jobs: it grows by one per layer below
                events.clear()
                t0 = time.perf_counter()
                mark("start")
                runner.run(layer, h, ids[i][s], w)
                mark("end")
                torch.cuda.synchronize()
                row = {n: events["start"].elapsed_time(e) for n, e in events.items() if n != "start"}
                runner.stats()
                if len(hybrid.split_log) > n_jobs:
                    job = hybrid.split_log[-1]
                    row.update(cpu_start=(job["t_start"] - t0) * 1e3, cpu_end=(job["t_end"] - t0) * 1e3)
                    if "split_done" in row:
                        row["handoff"] = row["cpu_start"] - row["split_done"]
                if s > 0:
                    rows.append(row)
    finally:
        hybrid.split = split
        runner.after_gpu_rounds = None
    keys = sorted({key for r in rows for key in r})
    return {key: float(np.median([r[key] for r in rows if key in r])) for key in keys}


@contextlib.contextmanager
def every_route_every_round(runner: OffloadMoERunner, lc) -> Iterator[None]:
    """The cache's rounds as they were before each round computed only its own routes: every round computes every
    route of the step (the others against the dummy slot, from an [M*k, K] copy of the hidden states) and a select
    keeps this round's. Same outputs; the cost the old loop paid, to print beside the new one."""
    real, table = runner.moe_fn, lc.tables.expert_to_slot  # the whole table: dummy id E -> slot 0
    E = runner.layout.num_experts

    def old(hidden, w13, w2, ids, route_weights, expert_to_slot, *, out, **kw):
        M, k = ids.shape
        rep = hidden[:, None, :].expand(M, k, hidden.shape[1]).reshape(M * k, -1)
        y = real(rep, w13, w2, ids.view(-1, 1), route_weights, table, **kw)  # kw: the same tiles as the new loop
        out.copy_(torch.where((ids.view(-1, 1) < E), y, out))
        return out

    runner.moe_fn = old
    try:
        yield
    finally:
        runner.moe_fn = real


def prefill_layer(
    cfg: GlmMoeDsaConfig, store: HostExpertStore, layer: int, slots: int, ceil: dict, args, device: torch.device
) -> list[dict]:
    """One MoE layer at prefill step sizes: every expert streamed through `slots` slots in rounds (what the engine
    does), now and as before, against the copy ceiling (all experts' bytes / copy-engine rate) and the host-read
    one, and the same layer with every expert resident (compute alone)."""
    E, k, K = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    L = store.layout
    xd = args.expert_dtype
    resident = OffloadMoERunner(
        cfg, layers=[layer], device=device, slots=E, store=OneLayer(store, layer), expert_dtype=xd
    )
    resident.finish_loading()
    streamed = OffloadMoERunner(
        cfg,
        layers=[layer],
        device=device,
        slots=min(slots, E),
        store=OneLayer(store, layer),
        cache=CacheConfig(copy_path="sm"),
        expert_dtype=xd,
    )
    streamed.finish_loading()
    lc = streamed.cache[layer]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for M in args.prefill_tokens:
        ids = torch.from_numpy(uniform_trace(1, M, E, k, seed=M)[0]).to(device)
        w = torch.rand(M, k, device=device)
        h = torch.randn(M, K, device=device).to(dtype)
        t_res = time_ms(lambda h=h, ids=ids, w=w: resident.run(layer, h, ids, w), device)
        t_str = time_ms(lambda h=h, ids=ids, w=w: streamed.run(layer, h, ids, w), device)
        with every_route_every_round(streamed, lc):
            t_old = time_ms(lambda h=h, ids=ids, w=w: streamed.run(layer, h, ids, w), device, reps=2)
        _, peak = peak_bytes(lambda h=h, ids=ids, w=w: streamed.run(layer, h, ids, w), device)
        distinct = int(torch.unique(ids).numel())
        rounds = lc.rounds_for(min(E, M * k))
        nbytes = distinct * L.expert_bytes
        copy_ms = nbytes / (ceil["ce_GBps"] * 1e9) * 1e3
        read_ms = nbytes / (ceil["host_read_GBps"] * 1e9) * 1e3
        row = {
            "tokens": M,
            "distinct_experts": distinct,
            "rounds": rounds,
            "bytes": nbytes,
            "ms_resident": t_res,
            "ms_streamed": t_str,
            "ms_streamed_before": t_old,
            "copy_ceiling_ms": copy_ms,
            "GBps": nbytes / (t_str / 1e3) / 1e9,
            "GBps_before": nbytes / (t_old / 1e3) / 1e9,
            "vs_ce": copy_ms / t_str,
            "vs_ce_before": copy_ms / t_old,
            "vs_host_read": read_ms / t_str,
            "vs_host_read_before": read_ms / t_old,
            "overlap_bound_ms": max(copy_ms, t_res),
            "serial_ms": copy_ms + t_res,
            # copies and compute overlap when the step takes clearly less than their sum
            "compute_hidden": t_str < copy_ms + 0.5 * t_res,
            "repeated_compute_ms": max(0.0, t_old - t_str),
            "peak_activation_bytes": peak,
        }
        rows.append(row)
        log.info(
            "prefill %d tokens: streamed %.1f ms (before: %.1f, %d rounds), resident %.1f ms, copy ceiling "
            "%.1f ms: %.1f GB/s (before %.1f)",
            M,
            t_str,
            t_old,
            rounds,
            t_res,
            copy_ms,
            row["GBps"],
            row["GBps_before"],
        )
    resident.close()
    streamed.close()
    return rows


def depth_cases(args, ceil: dict, device: torch.device) -> list[dict]:
    """The ~0.9 ms per layer: one layer vs many, host slab allocations, 8 slots (one round) vs 1 (8 rounds)."""
    E = 16
    cfg = slice_cfg(args.preset, E)
    k = cfg.num_experts_per_tok
    layout = ExpertLayout.for_config(cfg, args.expert_dtype)
    deep = list(range(cfg.first_k_dense_replace, cfg.first_k_dense_replace + args.depth_layers))
    steps, warm = args.steps, 4
    # Two disjoint sets of k experts alternate: with k slots (LRU) every routed expert is a miss, every step.
    sets = np.stack([np.arange(k), np.arange(k, 2 * k)]).astype(np.int32)
    trace = torch.from_numpy(np.stack([sets[s % 2][None] for s in range(steps + warm)])).to(device)  # [S, 1, k]
    allocs = args.depth_allocs.split(",")
    rows: list[dict] = []
    for alloc in allocs:
        need = layout.slab_bytes * len(deep) * (1.8 if alloc == "torch" else 1.0)
        if device.type == "cuda" and need > mem_available() - (8 << 30):
            log.warning(
                "depth case %s skipped: needs %.1f GB of host memory, %.1f GB available",
                alloc,
                need / 1e9,
                mem_available() / 1e9,
            )
            rows.append({"alloc": alloc, "skipped": f"needs {need / 1e9:.1f} GB"})
            continue
        t = time.perf_counter()
        store = HostExpertStore(layout, deep, pin=device.type == "cuda", alloc=alloc)  # type: ignore[arg-type]
        alloc_s = time.perf_counter() - t
        for i, layer in enumerate(deep):
            fill_random(store, layer, seed=i, device=device)
        fill_s = time.perf_counter() - t - alloc_s
        thp = thp_status()
        log.info(
            "depth store %s: %d layers x %d experts, allocated in %.1f s, filled in %.1f s, THP %s",
            alloc,
            len(deep),
            E,
            alloc_s,
            fill_s,
            thp,
        )
        for n_layers, slots in ((1, k), (len(deep), k), (len(deep), 1)):
            if slots == 1 and alloc != allocs[0]:
                continue  # the rounds effect is shown once
            layers = deep[:n_layers]
            r = OffloadMoERunner(
                cfg,
                layers=deep,
                device=device,
                slots=slots,
                store=store,
                cache=CacheConfig(),
                expert_dtype=args.expert_dtype,
                cpu=CpuConfig(threads=args.cpu_threads, max_tokens=8, fallback_to_copy=True),
            )
            r.finish_loading()
            ids = [trace] * len(layers)
            res = steps_timed(r, layers, ids, 1, steps, warm, device)
            res["timeline_ms"] = eager_timeline(r, layers[: min(8, n_layers)], ids, 3)
            hybrid = r.hybrid
            miss_bytes = res["misses"] * layout.expert_bytes
            res.update(
                alloc=alloc,
                layers=n_layers,
                slots=slots,
                store_GB=layout.slab_bytes * len(deep) / 1e9,
                alloc_s=alloc_s,
                fill_s=fill_s,
                thp=thp,
                miss_service=r.miss_service,
                runner_cpu_GBps=hybrid.cpu_rate / 1e9 if hybrid else 0.0,
                runner_copy_GBps=hybrid.copy_rate / 1e9 if hybrid else 0.0,
                bound_ms=decode_bound_ms(
                    res["misses"], res["hits"], layout.expert_bytes, ceil["joint_GBps"], ceil["hbm_GBps"]
                ),
                miss_GBps=miss_bytes / (res["ms_per_layer"] / 1e3) / 1e9,
            )
            log.info(
                "depth %s layers=%d slots=%d: %.3f ms/layer (bound %.3f), jobs %s, timeline %s",
                alloc,
                n_layers,
                slots,
                res["ms_per_layer"],
                res["bound_ms"],
                res["jobs"],
                res["timeline_ms"],
            )
            rows.append(res)
            r.close()
            del r
        del store
        release_pinned()
    return rows


def stage_slice(args, save: Callable[[dict], None]) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    deep_path = Path(args.work, "deep.json")
    deep = json.loads(deep_path.read_text()) if deep_path.exists() else {}
    cfg = slice_cfg(args.preset, args.experts)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    xd = args.expert_dtype
    layout = ExpertLayout.for_config(cfg, xd)
    gpu = torch.cuda.get_device_properties(device).total_memory if cuda else int(args.gpu_gib * 2**30)
    nonexpert = deep.get("nonexpert_resident_bytes") or int(args.nonexpert_gib * 2**30)
    kv_tok = deep.get("kv_bytes_per_token") or 78 * 1284
    dep = Deployment(gpu, nonexpert, kv_tok * args.context, int(args.reserve_gib * 2**30), layout.expert_bytes)
    fp8_nonexpert = (deep.get("checkpoint_bytes") or {}).get("other")
    dep_fp8 = dataclasses.replace(dep, nonexpert_bytes=fp8_nonexpert) if fp8_nonexpert else None
    out: dict = {
        "deployment": dataclasses.asdict(dep)
        | {"fraction": dep.fraction, "slots": dep.slots_per_layer, "cache_bytes": dep.cache_bytes},
        "deployment_fp8_nonexpert": None
        if dep_fp8 is None
        else {"fraction": dep_fp8.fraction, "slots": dep_fp8.slots_per_layer},
        "context": args.context,
        "thp": thp_status(),
        "experts": E,
        "moe_layers_projected": MOE_LAYERS,
        "expert_format": layout.format,
    }
    slots = args.slots or min(E, max(k, dep.slots_per_layer))
    log.info(
        "deployment: cache %.1f GB of %.1f GB GPU -> %.2f%% of the model's experts, %d slots per layer",
        dep.cache_bytes / 1e9,
        gpu / 1e9,
        100 * dep.fraction,
        slots,
    )

    # As many 256-expert layers as the host holds (pinned), leaving room for the process and the OS.
    avail = mem_available() - int(args.host_margin_gib * 2**30)
    n = max(1, min(args.max_slice_layers, avail // layout.slab_bytes))
    layers = list(range(cfg.first_k_dense_replace, cfg.first_k_dense_replace + n))
    t = time.perf_counter()
    store = HostExpertStore(layout, layers, pin=cuda, alloc=args.slice_alloc)
    out["store"] = {
        "layers": n,
        "bytes": layout.slab_bytes * n,
        "alloc": args.slice_alloc,
        "alloc_s": time.perf_counter() - t,
        "mem_available_before": avail,
    }
    t = time.perf_counter()
    for i, layer in enumerate(layers):
        fill_random(store, layer, seed=100 + i, device=device)
    out["store"]["fill_s"] = time.perf_counter() - t
    log.info("slice store: %s", out["store"])

    # Ceilings (on the first slab) and the CPU experts' own rate, as the runner measures it.
    probe = OffloadMoERunner(
        cfg,
        layers=layers,
        device=device,
        slots=slots,
        store=store,
        expert_dtype=xd,
        cpu=CpuConfig(threads=args.cpu_threads, fallback_to_copy=True),
    )
    probe.finish_loading()
    cpu_GBps = probe.hybrid.cpu_rate / 1e9 if probe.hybrid is not None else 0.0
    probe.close()
    del probe
    ceil = ceilings(store, layers[0], device, host_read_numel=(1 << 30) if cuda else (1 << 22))
    ceil["cpu_experts_GBps"] = cpu_GBps
    ceil["joint_GBps"] = joint_rate_GBps(cpu_GBps, ceil["uva_GBps"], ceil["host_read_GBps"])
    out["ceilings"] = ceil
    log.info("ceilings: %s", ceil)
    out["trace_stats"] = {
        "uniform": trace_statistics(uniform_trace(1024, 2, E, k, seed=1), E),
        "skewed": trace_statistics(skewed_trace(1024, 2, E, k, seed=1), E),
    }
    out["decode"] = []
    save(out)

    warm = args.warm_steps

    def measure(
        store: HostExpertStore,
        trace_name: str,
        policy: str,
        ids: list[torch.Tensor],
        seqs: int,
        spec_steps: int,
        pin_fraction: float = 0.0,
    ) -> None:
        """One decode row: `seqs` sequences of 1 + spec_steps tokens a step (ids[i]: [prefix + warm + steps, tokens,
        k]; steps of the first args.pin_prefix tokens run eagerly first, where the daemon's pin planner, with
        `pin_fraction` > 0, re-plans every args.pin_every tokens as its placement loop would)."""
        tokens = seqs * (1 + spec_steps)
        r = OffloadMoERunner(
            cfg,
            layers=layers,
            device=device,
            slots=slots,
            store=store,
            cache=CacheConfig(policy=policy, pin_fraction=pin_fraction),
            expert_dtype=xd,
            # the engine's rule for an engine that runs `seqs` sequences (routed_experts.py)
            cpu=CpuConfig(
                threads=args.cpu_threads,
                max_tokens=args.hybrid_max_tokens or hybrid_max_tokens(seqs, spec_steps),
                fallback_to_copy=True,
            ),
        )
        r.finish_loading()
        prefix = -(-args.pin_prefix // tokens)  # --pin-prefix and --pin-every count tokens: batch 64 warms in 2 steps
        every = max(1, args.pin_every // tokens)
        pins = warm_with_placement(r, layers, [t[:prefix] for t in ids], pin_fraction, every)
        ids = [t[prefix:] for t in ids]
        res = steps_timed(r, layers, ids, tokens, args.steps, warm, device)
        res["pins_per_layer"] = pins
        distinct = res["hits"] + res["misses"]
        # CPU experts share decode steps' misses; a step above HYBRID_MAX_TOKENS only copies (UVA kernel)
        hybrid = r.hybrid is not None and r.hybrid.takes(tokens)
        rate = ceil["joint_GBps"] if hybrid else ceil["uva_GBps"]
        res.update(
            trace=trace_name,
            policy=f"pinned-{round(100 * pin_fraction)}%+{policy}" if pin_fraction else policy,
            batch=seqs,
            step_tokens=tokens,
            slots=slots,
            miss_service=r.miss_service,
            hit_rate=res["hits"] / distinct if distinct else None,
            miss_rate_GBps=rate,
            bound_ms=decode_bound_ms(res["misses"], res["hits"], layout.expert_bytes, rate, ceil["hbm_GBps"]),
        )
        res["vs_bound"] = res["ms_per_layer"] / res["bound_ms"] if res["bound_ms"] else None
        log.info(
            "slice %s %s batch %d (%d tokens a step): %.3f ms/layer, hit %.3f, misses %.2f, bound %.3f",
            trace_name,
            policy,
            seqs,
            tokens,
            res["ms_per_layer"],
            res["hit_rate"] or 0,
            res["misses"],
            res["bound_ms"],
        )
        out["decode"].append(res)
        r.close()
        del r
        save(out)

    first = [b for b in args.batches if b == 1]
    for batch in first + [b for b in args.batches if b != 1]:  # batch 1 first: the headline
        for trace_name in ("skewed", "uniform"):
            if trace_name == "uniform" and batch not in (1, 8, 32):
                continue
            gen = uniform_trace if trace_name == "uniform" else skewed_trace
            ids = [
                torch.from_numpy(gen(args.pin_prefix + warm + args.steps, batch, E, k, seed=1000 * i + batch)).to(
                    device
                )
                for i in range(n)
            ]
            for policy in ("lru", "lfu") if trace_name == "skewed" and batch == 1 else ("lru",):
                measure(store, trace_name, policy, ids, batch, 0)
            if trace_name == "skewed" and batch == 1:  # what moed runs by default: the daemon pins the hottest
                shipped = shipped_policy()
                measure(store, trace_name, shipped.eviction, ids, batch, 0, shipped.pin_fraction)
        if batch in (1, 8):
            # MTP verify steps: each sequence's token and its draft are consecutive tokens of one chain, which share
            # experts (the skewed trace's reuse), unlike two sequences' tokens (the batch-2 row)
            ids = [
                torch.from_numpy(
                    verify_steps(skewed_trace(2 * (args.pin_prefix + warm + args.steps), batch, E, k, seed=7000 + i), 2)
                )
                .contiguous()
                .to(device)
                for i in range(n)
            ]
            measure(store, VERIFY_TRACE, "lru", ids, batch, 1)
    out["prefill"] = prefill_layer(cfg, store, layers[0], slots, ceil, args, device) if args.prefill_tokens else []
    save(out)
    del store
    gc.collect()
    release_pinned()
    out["depth"] = depth_cases(args, ceil, device) if args.depth_layers > 0 else []
    return out
