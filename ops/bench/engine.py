"""Engine benchmark (GPU): throughput and per-token latency of the whole engine, with ceilings measured in this run.

    python -m moed.ops.bench.engine --ckpt /dev/shm/moed-glm51-slice --out $OUT/engine.json

Builds (or reuses) a `glm51-slice` FP8 checkpoint (GLM-5.1's real layer widths, 2 MoE layers + the
MTP layer), serves it with the offload MoE runner (an expert cache of `--expert-cache-gb`, so
decode steps miss) and the paged attention backend, and measures:
  ceilings   device copy bandwidth (HBM, read + write) and pinned host -> GPU copy-engine bandwidth;
  load       for MTP off / on (`--spec-steps`) x CUDA graphs on / off x overlap on / off (`--overlap`; MTP
             steps never overlap) x concurrency {1, 8, 32, 128}:
             prefill time (until every request has its first token), decode throughput (generated
             tokens / decode wall time), per-token latency (decode wall time / tokens per request after
             the first), mean decode step (decode wall time / steps that delivered tokens), MTP
             acceptance, expert-cache hit rate and miss bytes per step, and the step time against the bound
             miss bytes / miss-service rate + (resident expert bytes touched + dense weight bytes) / HBM GB/s, where
             the miss-service rate is the copy engine's, or with CPU experts on (hybrid, cpu) the joint rate
             min(CPU experts' rate as the runner measured it + copy engine, host read) (DESIGN.md §1);
  overhead   batch 1 with graphs, overlap on and off: median host wall time of an engine decode step
             (steady state) against the GPU time of the step's device work (CUDA events from its first
             upload to the copy of its tokens: graph replay, logits, sampling), and of the graph replay
             alone (the figure earlier runs reported); CPU-side overhead = (wall - GPU) / wall, the time
             the GPU waits for the host (target < 5%). Also the host time per step phase (schedule,
             prepare, launch, wait for the device, commit; `EngineStats.step_time_s`).
  prefill compile  (`--prefill-compile`, instead of the above) one engine (MTP off, graphs off, max_tokens_per_step
             = the longest prompt so each prompt is one step) serving single prompts of `--prefill-lens` tokens
             for one output token, its decoder layers eager and then compiled (engine/compiled.py:
             `runner.compiled` set on the same loaded engine): median prefill time over `--reps` and tokens/s,
             the compiled/eager ratio, the first compiled call's wall time (dynamo + Inductor, at the shortest
             length) against the same length's steady time, and dynamo's graph and compile counts after every
             length (one per layer kind expected: no recompile per length or per layer). Whether the first
             token agreed is reported (bf16: Inductor's fused rounding may flip a near tie).
Each (MTP, graphs) setting first serves every concurrency for 3 tokens untimed, so no row is charged with
first-use compilation (Triton specialises on shapes such as the prefill's token count and context bounds).
Random weights route tokens with no learned structure and the MTP layer predicts nothing: acceptance
is ~0 here, so MTP rows measure its cost, not its benefit on GLM-5.1. Prints a table last and writes
every figure to --out (JSON). `--preset tiny --device cpu` runs the same code as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from moed.engine.config import EngineConfig, MissService, MoeMode
from moed.engine.llm_engine import LLMEngine
from moed.engine.protocol import SamplingParams
from moed.model.config import EXPERT_DTYPES

log = logging.getLogger("bench.engine")


def ceilings(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)

    def timed(fn, reps: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        return best

    hbm = 2 * n / timed(lambda: dst.copy_(src))
    h2d = host.numel() / timed(lambda: dev.copy_(host, non_blocking=True))
    big = torch.ones(1 << 30, dtype=torch.float32)  # host read as DESIGN.md takes it: torch sum over 4 GiB
    big.sum()
    t0 = time.perf_counter()
    big.sum()
    host_read = big.numel() * 4 / (time.perf_counter() - t0)
    return {"hbm_gbs": hbm / 1e9, "h2d_ce_gbs": h2d / 1e9, "host_read_gbs": host_read / 1e9}


def _offload_totals(engine: LLMEngine) -> dict[str, int]:
    runner = engine.experts.target
    if getattr(runner, "cache", None) is None:
        return {"hits": 0, "misses": 0}
    s = runner.stats()
    return {"hits": sum(x.hits for x in s), "misses": sum(x.misses for x in s)}


def _job_summary(jobs: list[dict], expert_bytes: int, others: list[dict] | None = None) -> dict | None:
    """The hybrid service's decode jobs (one per MoE layer and step): how many gave the CPU work, how many experts,
    and the CPU's time per job (its own clock), with and without work; the same by step size (tokens), with the
    CPU's rate in those jobs; and, given another service's jobs (the MTP draft's), how long the two services' CPU
    jobs ran at once (each job takes every core but one, so overlapping jobs share the cores)."""
    if not jobs:
        return None
    busy = [j for j in jobs if j["cpu"] > 0]
    idle = [j for j in jobs if j["cpu"] == 0]
    by_tokens = {}
    for m in sorted({j["tokens"] for j in busy}):
        js = [j for j in busy if j["tokens"] == m]
        seconds = sum(j["cpu_s"] for j in js)
        by_tokens[m] = {
            "jobs": len(js),
            "cpu_experts": float(np.mean([j["cpu"] for j in js])),
            "rows": float(np.mean([j.get("rows", 0) for j in js])),
            "busy_job_ms": 1e3 * seconds / len(js),
            "cpu_GBps": sum(j["cpu"] for j in js) * expert_bytes / seconds / 1e9 if seconds > 0 else None,
        }
    out = {
        "jobs": len(jobs),
        "with_cpu_work": len(busy),
        "cpu_experts_per_busy_job": float(np.mean([j["cpu"] for j in busy])) if busy else 0.0,
        "misses_per_job": float(np.mean([j["misses"] for j in jobs])),
        "busy_job_ms": float(np.mean([j["cpu_s"] for j in busy])) * 1e3 if busy else None,
        "idle_job_us": float(np.mean([j["cpu_s"] for j in idle])) * 1e6 if idle else None,
        "by_tokens": by_tokens,
    }
    if others is not None:
        out["overlap_with_other_ms"] = 1e3 * sum(
            max(0.0, min(a["t_end"], b["t_end"]) - max(a["t_start"], b["t_start"])) for a in busy for b in others
        )
    return out


def run_load(engine: LLMEngine, concurrency: int, prompt_len: int, gen_len: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    V = engine.cfg.vocab_size
    sp = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    ids = [f"c{concurrency}-{i}" for i in range(concurrency)]
    for rid in ids:
        engine.add_request(rid, torch.randint(10, V, (prompt_len,), generator=g).tolist(), sp)
    engine.stats()  # opens a fresh step-time window
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    produced = dict.fromkeys(ids, 0)
    delivered = [0]  # step() calls that returned tokens: decode steps as the caller sees them

    def step() -> None:
        outputs = engine.step()
        for o in outputs:
            if o.error is not None:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            produced[o.request_id] += len(o.new_token_ids)
        delivered[0] += bool(outputs)

    while min(produced.values()) == 0:  # prefill: until every request has its first token
        step()
    # No sync here: with overlap the first decode step is already queued, and its time belongs to decode.
    t1 = time.perf_counter()
    first, delivered[0] = sum(produced.values()), 0
    steps0, drafts0, acc0 = engine.num_steps, engine.spec_draft_tokens, engine.spec_accepted_tokens
    graph0 = engine.runner.graph_steps
    cache0 = _offload_totals(engine)
    hybrid = getattr(engine.experts.target, "hybrid", None)
    draft_hybrid = getattr(engine.experts.draft, "hybrid", None)
    for h in (hybrid, draft_hybrid):
        if h is not None:
            h.split_log.clear()
    while engine.has_unfinished:
        step()
    sync()
    t2 = time.perf_counter()
    cache1 = _offload_totals(engine)  # takes in the CPU server's job records too
    steps = engine.num_steps - steps0
    jobs = list(hybrid.split_log) if hybrid is not None else []
    if draft_hybrid is not None:
        draft_hybrid.refresh()  # takes in the draft server's job records
    draft_jobs = list(draft_hybrid.split_log) if draft_hybrid is not None else []
    eb = hybrid.layout.expert_bytes if hybrid is not None else 0
    decode_tokens = sum(produced.values()) - first
    drafts = engine.spec_draft_tokens - drafts0
    hits, misses = cache1["hits"] - cache0["hits"], cache1["misses"] - cache0["misses"]
    return {
        "concurrency": concurrency,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_steps": steps,
        "graph_steps": engine.runner.graph_steps - graph0,
        "decode_tok_s": decode_tokens / (t2 - t1),
        "ms_per_token": 1e3 * (t2 - t1) / max(gen_len - 1, 1),
        "step_ms": 1e3 * (t2 - t1) / max(delivered[0], 1),
        "acceptance": (engine.spec_accepted_tokens - acc0) / drafts if drafts else None,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "misses_per_step": misses / max(steps, 1),
        "hits_per_step": hits / max(steps, 1),
        "cpu_jobs": _job_summary(jobs, eb, [j for j in draft_jobs if j["cpu"] > 0] if draft_hybrid else None),
        "draft_cpu_jobs": _job_summary(draft_jobs, eb),
    }


def overhead_batch1(engine: LLMEngine, prompt_len: int, overlap: bool, steps: int = 40) -> dict | None:
    """Steady-state batch-1 graph decode steps: host wall time vs the GPU time of the step and of its replay."""
    graphs = engine.runner.graphs
    if graphs is None or engine.device.type != "cuda":
        return None
    engine.overlap = overlap
    replays: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    real_run = graphs.run

    def timed_run(input_ids, ctx):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = real_run(input_ids, ctx)
        b.record()
        if out is not None:
            replays.append((a, b))
        return out

    graphs.run = timed_run  # type: ignore[method-assign]
    try:
        engine.add_request(
            "overhead", list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=steps + 8, ignore_eos=True)
        )
        for _ in range(4):  # prefill, then decodes until the pipeline is full
            engine.step()
        engine.stats()  # opens a fresh step-time window
        replays.clear()
        engine.gpu_step_times = []
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
        phases = engine.stats().step_time_s
        marks, engine.gpu_step_times = engine.gpu_step_times, None
        engine.abort(["overhead"])
        engine.flush()
        torch.cuda.synchronize()
    finally:
        graphs.run = real_run  # type: ignore[method-assign]
    if not replays or not marks:
        return None

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    wall = median(walls)
    gpu = median([a.elapsed_time(b) / 1e3 for a, b in marks])
    replay = median([a.elapsed_time(b) / 1e3 for a, b in replays])
    return {
        "overlap": overlap,
        "step_wall_ms": 1e3 * wall,
        "step_gpu_ms": 1e3 * gpu,
        "replay_gpu_ms": 1e3 * replay,
        "cpu_overhead": (wall - gpu) / wall,
        "cpu_overhead_vs_replay": (wall - replay) / wall,
        "host_ms": {k: 1e3 * v for k, v in phases.items()},
    }


def _timed_prefill(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """Wall seconds from adding one prompt to its first token (device synced), and that token."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    rid = f"prefill-{time.perf_counter_ns()}"
    sync()
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    token = None
    while engine.has_unfinished:
        for o in engine.step():
            if o.error is not None:
                raise RuntimeError(f"prefill of {len(prompt)} tokens failed: {o.error}")
            token = o.new_token_ids[0] if o.new_token_ids else token
    engine.flush()
    sync()
    assert token is not None
    return time.perf_counter() - t0, token


def prefill_compile(engine: LLMEngine, lengths: list[int], reps: int, min_tokens: int) -> dict:
    """Prefill of single prompts, eager vs compiled decoder layers, on one loaded engine (module docstring)."""
    from torch._dynamo.utils import counters

    from moed.engine.compiled import CompiledPrefill, layer_kinds

    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(10, engine.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths}
    rows: dict[int, dict] = {n: {"tokens": n} for n in lengths}
    engine.runner.compiled = None
    for n in lengths:  # eager; the first pass specialises Triton kernels on the step's shapes
        _timed_prefill(engine, prompts[n])
        times, token = zip(*(_timed_prefill(engine, prompts[n]) for _ in range(reps)))
        rows[n].update(eager_s=sorted(times)[len(times) // 2], eager_token=token[0])
    torch._dynamo.reset()
    counters.clear()
    compiled = engine.runner.compiled = CompiledPrefill(min_tokens)
    first_s, _ = _timed_prefill(engine, prompts[lengths[0]])
    for n in lengths:
        _timed_prefill(engine, prompts[n])
        times, token = zip(*(_timed_prefill(engine, prompts[n]) for _ in range(reps)))
        r = rows[n]
        r.update(compiled_s=sorted(times)[len(times) // 2], compiled_token=token[0])
        r.update(
            eager_tok_s=n / r["eager_s"],
            compiled_tok_s=n / r["compiled_s"],
            speedup=r["eager_s"] / r["compiled_s"],
            same_token=r["eager_token"] == r["compiled_token"],
        )
    engine.runner.compiled = None
    return {
        "rows": list(rows.values()),
        "first_compiled_call_s": first_s,
        "compile_s": first_s - rows[lengths[0]]["compiled_s"],
        "compiled_failed": compiled.failed,
        "compiled_steps": compiled.steps,
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames_compiled": int(counters["frames"]["total"]),
        "layer_kinds": len(layer_kinds(engine.model)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def print_prefill_compile(res: dict, device: str, args) -> None:
    print(
        f"\ncompiled prefill on {device} ({args.preset}, experts {args.experts or 'preset'}, moe {args.moe}, "
        f"expert cache {args.expert_cache_gb} GB): first compiled call {res['first_compiled_call_s']:.1f} s "
        f"(compile ~{res['compile_s']:.1f} s), graphs {res['unique_graphs']}, compiles {res['frames_compiled']} "
        f"(layer kinds {res['layer_kinds']}), "
        f"graph breaks {res['graph_breaks']}, failed: {res['compiled_failed']}"
    )
    print(
        f"{'tokens':>6} {'eager ms':>9} {'compiled ms':>11} {'eager tok/s':>11} {'compiled tok/s':>14} "
        f"{'x eager':>7} {'same 1st token':>14}"
    )
    for r in res["rows"]:
        print(
            f"{r['tokens']:>6} {1e3 * r['eager_s']:>9.1f} {1e3 * r['compiled_s']:>11.1f} {r['eager_tok_s']:>11.0f} "
            f"{r['compiled_tok_s']:>14.0f} {r['speedup']:>7.3f} {r['same_token']!s:>14}"
        )


def miss_rate_gbs(ceil: dict, cpu_gbs: float) -> float:
    """The rate misses are served at: copies alone, or with CPU experts the CPU and the copies together until both
    meet the host-read ceiling (every missed byte crosses host memory once)."""
    if cpu_gbs <= 0:
        return ceil["h2d_ce_gbs"]
    return min(cpu_gbs + ceil["h2d_ce_gbs"], ceil.get("host_read_gbs", float("inf")))


def bound_ms(row: dict, expert_bytes: int, dense_bytes: int, ceil: dict, cpu_gbs: float = 0.0) -> float | None:
    if not ceil or row["hit_rate"] is None:
        return None
    miss = row["misses_per_step"] * expert_bytes / (miss_rate_gbs(ceil, cpu_gbs) * 1e9)
    resident = (row["hits_per_step"] * expert_bytes + dense_bytes) / (ceil["hbm_gbs"] * 1e9)
    return 1e3 * (miss + resident)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="/dev/shm/moed-glm51-slice", help="checkpoint dir (made if missing)")
    p.add_argument("--preset", default="glm51-slice")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="bf16 on cuda, fp32 on cpu")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--spec-steps", type=int, default=2)
    p.add_argument("--moe", choices=get_args(MoeMode), default="offload")
    p.add_argument("--expert-cache-gb", type=float, default=4.0)
    p.add_argument("--draft-expert-cache-gb", type=float, default=2.0)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument(
        "--overlap",
        choices=("both", "on", "off"),
        default="both",
        help="overlapped steps (plain decoding only): measure with, without, or both",
    )
    # copy, not the engine's auto: the rows in docs/benchmarks.md that name no miss service were measured so
    p.add_argument(
        "--miss-service",
        choices=get_args(MissService),
        default="copy",
        help="offload: how decode serves expert misses (moed.engine.config.MissService)",
    )
    p.add_argument("--cpu-threads", type=int, default=0, help="CPU expert threads (hybrid, cpu); 0 = cores - 1")
    p.add_argument(
        "--expert-dtype",
        choices=EXPERT_DTYPES,
        default="checkpoint",
        help="int4: the routed experts quantised to 4 bits at load",
    )
    p.add_argument(
        "--experts", type=int, default=None, help="routed experts per layer of a new checkpoint (default: the preset's)"
    )
    p.add_argument(
        "--compile-decode",
        choices=("on", "off"),
        default="on",
        help="decode graphs from compiled decoder layers (the engine's default) or eager ones (as before 2026-12-07)",
    )
    p.add_argument(
        "--prefill-compile",
        action="store_true",
        help="measure only prefill with compiled vs eager decoder layers (module docstring)",
    )
    p.add_argument("--prefill-lens", default="512,2048,8192")
    p.add_argument("--reps", type=int, default=3, help="--prefill-compile: timed prefills per length and mode")
    p.add_argument("--out", default=None, help="JSON file for every figure")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    conc = [int(c) for c in args.concurrency.split(",")]

    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        from moed.model.checkpoint import make_checkpoint

        t = time.perf_counter()
        make_checkpoint(
            ckpt,
            args.preset,
            dtype="fp8" if device.type == "cuda" else "bf16",
            seed=0,
            experts=args.experts,
            device=args.device,
        )
        log.info("made %s checkpoint in %.0f s", args.preset, time.perf_counter() - t)

    if args.prefill_compile:
        lengths = [int(n) for n in args.prefill_lens.split(",")]
        t = time.perf_counter()
        engine = LLMEngine(
            EngineConfig(
                model=str(ckpt),
                device=args.device,
                dtype=dtype,
                max_running=1,
                max_tokens_per_step=max(lengths),
                page_size=args.page_size,
                max_model_len=max(max(lengths) + 64, args.max_model_len),
                moe=args.moe,
                expert_cache_gb=args.expert_cache_gb if args.moe == "offload" else None,
                cuda_graphs=False,
                compile_prefill=False,
                seed=0,
                miss_service=args.miss_service if args.moe == "offload" else "copy",
                expert_dtype=args.expert_dtype,
            )
        )
        log.info("engine loaded in %.0f s", time.perf_counter() - t)
        res = prefill_compile(engine, lengths, args.reps, min(lengths))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if args.out:
            Path(args.out).write_text(
                json.dumps(
                    {
                        "device": name,
                        "date": time.strftime("%Y-%m-%d"),
                        "torch": torch.__version__,
                        "args": vars(args),
                        "prefill_compile": res,
                    },
                    indent=1,
                )
            )
        print_prefill_compile(res, name, args)
        return 0
    ceil = ceilings(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ceiling buffers are gone
    log.info("ceilings: %s", ceil)
    rows: list[dict] = []
    overhead: list[dict] = []
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.overlap]
    for spec in sorted({0, args.spec_steps}):
        cfg = EngineConfig(
            model=str(ckpt),
            device=args.device,
            dtype=dtype,
            max_running=max(conc),
            max_tokens_per_step=max(2048, max(conc) * (1 + spec)),
            page_size=args.page_size,
            spec_steps=spec,
            max_model_len=args.max_model_len,
            moe=args.moe,
            expert_cache_gb=args.expert_cache_gb if args.moe == "offload" else None,
            draft_expert_cache_gb=args.draft_expert_cache_gb if args.moe == "offload" else None,
            graph_max_batch=max(conc),
            compile_decode=args.compile_decode == "on",
            seed=0,
            miss_service=args.miss_service if args.moe == "offload" else "copy",
            cpu_expert_threads=args.cpu_threads,
            expert_dtype=args.expert_dtype,
        )
        t = time.perf_counter()
        engine = LLMEngine(cfg)
        engine.warmup()
        log.info(
            "engine (spec_steps=%d) loaded and warmed up in %.0f s; graphs: %s",
            spec,
            time.perf_counter() - t,
            engine.runner.graphs is not None,
        )
        layout = getattr(engine.experts.target, "layout", None)
        cpu_gbs = engine.experts.stats().rates_Bps.get("cpu", 0.0) / 1e9  # 0 when misses are only copied
        expert_bytes = layout.expert_bytes if layout is not None else 0
        dense_bytes = sum(
            p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n
        )
        graphs = engine.runner.graphs
        for use_graphs in [True, False] if graphs is not None else [False]:
            engine.runner.graphs = graphs if use_graphs else None
            for c in conc:  # first-use compilation of this mode's prefill and decode shapes, outside every row
                run_load(engine, c, args.prompt_len, 3, seed=c)
            for overlap in modes if spec == 0 else [False]:
                engine.overlap = overlap
                for c in conc:
                    row = run_load(engine, c, args.prompt_len, args.gen_len, seed=c)
                    row.update(spec_steps=spec, graphs=use_graphs, overlap=overlap)
                    row["bound_ms"] = bound_ms(row, expert_bytes, dense_bytes, ceil, cpu_gbs)
                    row["miss_rate_gbs"] = miss_rate_gbs(ceil, cpu_gbs) if ceil else None
                    row["step_vs_bound"] = row["step_ms"] / row["bound_ms"] if row["bound_ms"] else None
                    rows.append(row)
                    log.info("%s", row)
        engine.runner.graphs = graphs
        if spec == 0:
            for overlap in modes:
                o = overhead_batch1(engine, args.prompt_len, overlap)
                if o is not None:
                    overhead.append(o)
                    log.info("%s", o)
        del engine, graphs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "args": vars(args),
        "ceilings": ceil,
        "rows": rows,
        "overhead_batch1": overhead,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"\nengine benchmark on {result['device']} ({args.preset}, prompt {args.prompt_len}, "
        f"gen {args.gen_len}, expert cache {args.expert_cache_gb} GB, miss service {args.miss_service}); "
        f"ceilings {ceil}"
    )
    print(
        f"{'mtp':>3} {'graph':>5} {'ovl':>3} {'conc':>4} {'prefill s':>9} {'tok/s':>9} {'ms/tok':>8} {'step ms':>8} "
        f"{'bound ms':>8} {'x bound':>7} {'hit':>5} {'accept':>6} {'graphed':>7}"
    )
    for r in rows:

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        print(
            f"{r['spec_steps']:>3} {('on' if r['graphs'] else 'off'):>5} {('on' if r['overlap'] else 'off'):>3} "
            f"{r['concurrency']:>4} "
            f"{r['prefill_s']:>9.2f} {r['decode_tok_s']:>9.1f} {r['ms_per_token']:>8.2f} {r['step_ms']:>8.2f} "
            f"{f(r['bound_ms'], '8.2f'):>8} {f(r['step_vs_bound'], '7.2f'):>7} {f(r['hit_rate'], '5.2f'):>5} "
            f"{f(r['acceptance'], '6.2f'):>6} {r['graph_steps']:>7}"
        )
    for o in overhead:
        host = " ".join(f"{k} {v:.3f}" for k, v in o["host_ms"].items())
        print(
            f"batch-1 graph decode step, overlap {'on' if o['overlap'] else 'off'}: wall {o['step_wall_ms']:.3f} ms, "
            f"step GPU {o['step_gpu_ms']:.3f} ms (replay {o['replay_gpu_ms']:.3f}), CPU-side overhead "
            f"{100 * o['cpu_overhead']:.1f}% (vs replay only {100 * o['cpu_overhead_vs_replay']:.1f}%; target < 5%); "
            f"host ms per step: {host}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
