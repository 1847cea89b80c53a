"""Whole-model bench, stage `deep`: the `glm51` preset checkpoint (78 layers, 3 dense, the MTP layer, the real
vocabulary and widths, few experts per layer) served by the engine, for what is not routed experts.

1. With the routed experts replaced by a runner that returns zeros (`ZeroExperts`), a decode step costs everything
   that is not routed experts: attention with the DSA indexer, dense layers, shared experts, norms, routers, the
   154,880-way head and sampling (`nonmoe`, in CUDA graphs, per batch); a prompt's prefill likewise
   (`nonmoe_prefill_s`); the head alone (`head_ms`).
2. The engine's own offload runner at this depth: step time, hits, misses and the CPU expert server's job log; per
   MoE layer in situ = (step - non-MoE step) / 75.
Also the resident non-expert bytes (what the expert cache cannot have) and the KV bytes per token. Results are
written after each part, so a run cut off keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moed.attention.paged_kv import PagedKVPool
from moed.engine.config import EngineConfig
from moed.engine.llm_engine import LLMEngine
from moed.model.checkpoint import checkpoint_bytes
from moed.offload.host_store import thp_status
from moed.ops.bench.engine import _timed_prefill, run_load
from moed.ops.bench.model_timing import job_breakdown, peak_bytes, time_ms

log = logging.getLogger("bench.model.deep")


class ZeroExperts:
    """A MoE runner whose routed experts contribute nothing: a step then costs exactly what is not routed experts
    (the router still runs, the shared expert too). Capturable in CUDA graphs."""

    supports_cuda_graphs = True

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


def switch_moe(engine: LLMEngine, moe) -> float:
    """Serve the engine's steps with `moe` and warm it up (decode graphs recaptured through the engine's own capture
    and its check against an eager step); returns the seconds that took."""
    engine.runner.moe = moe
    engine.runner.graphs = None  # the previous runner's graphs would replay its experts
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    t = time.perf_counter()
    engine.warmup()
    log.info(
        "%s warmed up in %.1f s, graphs %s",
        type(moe).__name__,
        time.perf_counter() - t,
        engine.runner.graphs is not None,
    )
    return time.perf_counter() - t


def stage_deep(args, save: Callable[[dict], None]) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ckpt = Path(args.ckpt)
    out: dict = {"ckpt": str(ckpt), "thp": thp_status(), "host_alloc": os.environ.get("MOED_HOST_ALLOC", "torch")}
    batches, prompts = sorted(args.deep_batches), sorted(args.prompts)
    t0 = time.perf_counter()
    # KV for what this stage runs (the longest prompt, or the largest batch), not 90% of what is free: an 8192-token
    # prefill step at this depth needs a few GB of activations beside the graphs' pool.
    page = 64
    kv_pages = (max(prompts) + max(batches) * (args.deep_prompt + args.deep_gen + 8)) // page + 2 * max(batches)

    def new_engine(fp8_projections: bool = False) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(ckpt),
                device=args.device,
                dtype="bf16" if cuda else "fp32",
                max_running=max(batches),
                max_tokens_per_step=args.deep_step_tokens,
                max_model_len=max(prompts) + 128,
                kv_pages=kv_pages,
                page_size=page,
                moe="offload",
                expert_cache_gb=args.deep_cache_gb,
                graph_max_batch=max(batches),
                seed=0,
                miss_service=args.miss_service,
                cpu_expert_threads=args.cpu_threads,
                fp8_projections=fp8_projections,
                compile_decode=False,  # eager graphs first; the compiled ones are measured beside them
            )
        )

    engine = new_engine()
    out["load_s"] = time.perf_counter() - t0
    target = engine.experts.target
    store = target.store
    out["store"] = {
        "bytes": store.layout.slab_bytes * len(store.layers),
        "reserved_bytes": store.reserved_bytes,
        "alloc_s": store.alloc_s,
        "alloc": store.alloc,
        "layers": len(store.layers),
        "experts": store.layout.num_experts,
        "slots": target.cache[target.layers[0]].num_slots,
    }
    cfg = engine.cfg
    out["nonexpert_resident_bytes"] = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    out["nonexpert_resident_no_embed_bytes"] = sum(
        p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n
    )
    lat, idx = PagedKVPool.bytes_per_token(cfg, "bf16", "fp8")
    out["kv_bytes_per_token"] = cfg.num_hidden_layers * (lat + idx)
    out["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    out["expert_bytes"] = store.layout.expert_bytes
    out["checkpoint_bytes"] = checkpoint_bytes(cfg)
    out["moe_layers"] = cfg.num_moe_layers
    log.info("deep engine loaded in %.0f s: %s", out["load_s"], out["store"])
    if args.delete_ckpt_after_load:
        shutil.rmtree(ckpt, ignore_errors=True)  # everything is in memory now; frees /dev/shm for what follows
        log.info("deleted %s after loading", ckpt)
    save(out)

    def decode_rows(label: str, rows_batches: list[int]) -> list[dict]:
        rows = []
        for b in rows_batches:
            run_load(engine, b, args.deep_prompt, 3, seed=b)  # first use of this batch's shapes, untimed
            row = run_load(engine, b, args.deep_prompt, args.deep_gen, seed=b)  # clears the job log first
            row.update(batch=b, runner=label)
            hybrid = engine.experts.target.hybrid
            zero = label.startswith("zero")
            row["jobs"] = job_breakdown(list(hybrid.split_log)) if hybrid is not None and not zero else None
            rows.append(row)
            log.info("deep %s batch %d: step %.2f ms, hit %s", label, b, row["step_ms"], row["hit_rate"])
        return rows

    # 1. Everything but routed experts: decode first (the headline needs batch 1), then prefill and the head.
    out["warmup_zero_s"] = switch_moe(engine, ZeroExperts())
    out["graphs_nonmoe"] = engine.runner.graphs is not None
    out["nonmoe"] = decode_rows("zero", batches)
    save(out)
    if cuda and args.deep_compiled:
        # The same steps from decode graphs of torch.compile'd layers (engine setting compile_decode, on by default):
        # what fusing the elementwise kernels between projections saves at this depth. Later parts run eager graphs.
        default = engine.config
        engine.config = dataclasses.replace(default, compile_decode=True)
        out["warmup_zero_compiled_s"] = switch_moe(engine, ZeroExperts())
        graphs = engine.runner.graphs
        out["graphs_nonmoe_compiled"] = graphs is not None and graphs.compiled is not None
        if out["graphs_nonmoe_compiled"]:
            out["nonmoe_compiled"] = decode_rows("zero-compiled", batches)
        engine.config = default
        save(out)
    head = engine.model.lm_head.weight
    out["head_ms"] = {
        b: time_ms(
            lambda b=b: torch.nn.functional.linear(
                torch.randn(b, cfg.hidden_size, device=device, dtype=head.dtype), head
            ),
            device,
        )
        for b in (1, 2, 8, 32)
    }
    g = torch.Generator().manual_seed(1)
    out["nonmoe_prefill_s"] = {}
    out[
        "nonmoe_prefill_peak_bytes"
    ] = {}  # activations of the prompt's steps (deep_step_tokens each), beyond the KV pool
    for n in prompts:
        prompt = torch.randint(10, cfg.vocab_size, (n,), generator=g).tolist()
        _timed_prefill(engine, prompt[: min(n, args.deep_step_tokens)])  # this step size's kernels, untimed
        (out["nonmoe_prefill_s"][n], _), out["nonmoe_prefill_peak_bytes"][n] = peak_bytes(
            lambda p=prompt: _timed_prefill(engine, p), device
        )
        log.info(
            "deep non-MoE prefill %d tokens: %.2f s, activation peak %s bytes",
            n,
            out["nonmoe_prefill_s"][n],
            out["nonmoe_prefill_peak_bytes"][n],
        )
        save(out)

    # 2. The engine's offload runner at this depth.
    out["warmup_offload_s"] = switch_moe(engine, target)
    out["graphs_offload"] = engine.runner.graphs is not None
    out["miss_service"] = engine.experts.miss_service
    out["runner_rates_GBps"] = {k: v / 1e9 for k, v in engine.experts.stats().rates_Bps.items()}
    zero = {r["batch"]: r for r in out["nonmoe"]}
    out["offload"] = []
    for b in sorted(args.deep_offload_batches):
        row = decode_rows("offload", [b])[0]
        if b in zero:
            row["moe_per_layer_ms"] = (row["step_ms"] - zero[b]["step_ms"]) / cfg.num_moe_layers
        out["offload"].append(row)
        save(out)
    engine.experts.close()

    # 3. The non-MoE step again with the projections kept FP8 (engine setting fp8_projections): half their bytes.
    if cuda and args.deep_fp8 and ckpt.exists():
        del engine, target, store
        gc.collect()
        torch.cuda.empty_cache()
        engine = new_engine(fp8_projections=True)
        out["nonexpert_resident_bytes_fp8"] = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        out["warmup_zero_fp8_s"] = switch_moe(engine, ZeroExperts())
        out["nonmoe_fp8"] = decode_rows("zero-fp8", batches)
        save(out)
        if args.deep_compiled:
            engine.config = dataclasses.replace(engine.config, compile_decode=True)
            switch_moe(engine, ZeroExperts())
            graphs = engine.runner.graphs
            if graphs is not None and graphs.compiled is not None:
                out["nonmoe_fp8_compiled"] = decode_rows("zero-fp8-compiled", batches)
            save(out)
        engine.experts.close()
    return out
