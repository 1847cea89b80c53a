"""Hit-rate benchmark (CPU, minutes): the expert cache's eviction and placement policies on routing traces, at the
cache the whole GLM-5.1 would have on the GPU machine; expert bytes per accepted token; what a finer miss split and
prefetch could save.

    python -m moed.ops.bench.hitrate [--out hitrate.json] [--quick]

Nothing here re-implements the cache. One MoE layer's `LayerCache` (offload/expert_cache.py, 256 experts of a
tiny bf16 layout, so copies cost nothing) serves every step through `serve_round`, i.e. the claim kernel's torch
reference (kernels/expert_copy.py, checked against the kernel by tests/offload/test_expert_cache_kernels.py), in the
engine's rounds; steps the engine gives the hybrid miss service first run its split's reference
(kernels/miss_split.py) with the table the service builds from the CPU and copy rates (`--cpu-GBps`,
`--copy-GBps`): the CPU's misses never enter the cache. Pinned policies run the daemon's `PinPlanner`
(daemon/pin_planner.py) on the cache's own activation counts every `--pin-interval-tokens` and apply its plan
with `LayerCache.set_pins`, as the engine does between steps.

  deployment  slots per layer = (GPU memory - non-expert weights - KV for one `--context` sequence - reserve) /
              (75 MoE layers x expert bytes), non-expert weights counted from GLM-5.1's config as the FP8 release
              stores them; int4 experts (`--expert-dtype int4`: packed values, scales, zero points as the host
              store lays them out) in the same cache bytes.
  traces      skewed (offload/traces.py's calibrated generator), popular (its popularity law alone: no reuse
              beyond what popularity gives, the regime where published LRU results collapse) and uniform; their
              four DESIGN.md §4 statistics are printed beside the table.
  hit rate    per trace x cache (FP8 / int4 slots) x step shape (batch 1, 8, 32; MTP verify steps of 1 + 1
              tokens per sequence) x policy: hits / distinct experts a step needs, after `--warm-tokens` per chain
              (a warm cache: what a restart with persisted counts starts from), misses per step split into copied
              and CPU-computed. "oracle" knows every expert's next use (its victim is the one needed last, its CPU
              share the misses needed last): the ceiling for any policy with the same split.
  bytes       expert bytes per accepted token for the whole model (75 MoE layers): moved from host memory (copied
              or read by the CPU) and read from HBM (hits), at acceptance 0 and at the published MTP acceptance.
              Measured: the counts per step (the cache's own code on the traces). Derived: x expert bytes x 75
              layers (each layer taken to route like the simulated one) / accepted tokens (acceptance assumed:
              random weights accept nothing). The MTP layer's own experts (8 per draft token) are not counted.
  finer split what splitting inside experts (the CPU a share of each missed expert's columns) could save in split
              steps: the measured misses per step, each served by whole experts as the hybrid table splits them
              against both sides ending together, at --cpu-GBps and --copy-GBps.
  prefetch    what a next-layer prediction could hide at batch 1: the link's idle window per layer against one
              expert's copy time, and the step's misses.
Prints the tables last and writes every figure to --out (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from moed.daemon.config import ServeConfig
from moed.daemon.pin_planner import PinPlanner
from moed.daemon.placement import pin_budget
from moed.kernels.expert_copy import STATS
from moed.kernels.miss_split import split_misses_reference
from moed.model.checkpoint import _stored_bytes, make_config, tensor_specs
from moed.model.config import GlmMoeDsaConfig
from moed.offload.expert_cache import CacheConfig, ExpertCache, LayerCache
from moed.offload.host_store import ExpertLayout, HostExpertStore
from moed.offload.hybrid import HybridMissService
from moed.offload.routed_experts import _cpu_config
from moed.offload.traces import skewed_trace, trace_statistics, uniform_trace, verify_steps

log = logging.getLogger("bench.hitrate")

MOE_LAYERS = 75
E, K_TOP = 256, 8
LAYER = 3  # the simulated layer's id (any MoE layer: every layer's cache runs alone)
# MTP acceptance of the first draft token, published for the MTP module GLM-5.1 shares with DeepSeek-V3 (the rows
# at 0 are what random weights give).
PUBLISHED_MTP_ACCEPTANCE = 0.85
MTP_SOURCE = "DeepSeek-V3 Technical Report (arXiv:2412.19437) sec. 5.4.3: 85-90% for the 1st draft token"
# Top-k accuracy published for predicting a layer's experts from the previous layer's activations (~15 points below
# the 93-97% of same-layer pre-attention predictors: arXiv:2511.10676, on DeepSeek-V2-Lite and Qwen3-30B-A3B).
PREDICTOR_RECALL = 0.8


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    eviction: str = "lru"  # CacheConfig.policy: the claim kernel's victim key
    lfu_decay: float = 0.95
    pin_fraction: float = 0.0  # share of the slots the placement manager pins with its hottest experts
    oracle: bool = False  # next uses known: victims and CPU misses are the ones needed last


def shipped_policy() -> Policy:
    """What moed runs by default: the daemon's placement manager pinning `placement_pin_fraction` of each layer's
    slots (daemon/config.py) and the cache's default eviction among the rest (offload/expert_cache.py)."""
    fraction = next(f.default for f in dataclasses.fields(ServeConfig) if f.name == "placement_pin_fraction")
    cache = CacheConfig()
    name = f"pinned-{round(100 * fraction)}%+{cache.policy}" if fraction else cache.policy
    return Policy(name, cache.policy, lfu_decay=cache.lfu_decay, pin_fraction=fraction)


POLICIES = (
    Policy("lru"),
    Policy("lfu", "lfu"),
    Policy("lfu-0.99", "lfu", lfu_decay=0.99),
    Policy("pinned-50%+lru", pin_fraction=0.5),
    Policy("pinned-75%+lru", pin_fraction=0.75),
    Policy("pinned-75%+lfu", "lfu", pin_fraction=0.75),
    Policy("oracle", "lfu", lfu_decay=1.0, oracle=True),
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decode step: `batch` sequences, each with 1 + spec_steps tokens (MTP verify)."""

    batch: int
    spec_steps: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * (1 + self.spec_steps)

    @property
    def name(self) -> str:
        return f"b{self.batch}" + (f"+mtp{self.spec_steps}" if self.spec_steps else "")


SHAPES = (Shape(1), Shape(8), Shape(32), Shape(1, 1), Shape(8, 1), Shape(32, 1))


# ---------------------------------------------------------------------------------------------- the deployment


def glm51_config() -> GlmMoeDsaConfig:
    """GLM-5.1 whole, FP8 as released (model/checkpoint.py's GLM-5.1 values: 78 layers, the first 3 dense)."""
    raw = make_config("glm51-slice", fp8=True)
    raw.update(num_hidden_layers=78, first_k_dense_replace=3)
    return GlmMoeDsaConfig.from_dict(raw, source="GLM-5.1 (model/checkpoint.py)")


def deployment(gpu_gib: float, context: int, reserve_gib: float, config: str = "") -> dict:
    """The expert cache a deployment of the whole GLM-5.1 gets on one GPU (bytes, fraction, slots per layer)."""
    cfg = GlmMoeDsaConfig.from_file(config) if config else glm51_config()
    if cfg.quantization is None:
        raise ValueError(f"{cfg.source}: the deployment is sized for the FP8 release (quantization_config needed)")
    nonexpert_fp8 = nonexpert_bf16 = 0
    for spec in tensor_specs(cfg):
        if ".experts." in spec.name:
            continue
        nonexpert_fp8 += _stored_bytes(spec, cfg, torch.bfloat16)
        nonexpert_bf16 += math.prod(spec.shape) * (4 if spec.fp32 else 2)
    layout = ExpertLayout.for_config(cfg)
    int4 = ExpertLayout.for_config(cfg, "int4")  # --expert-dtype int4: the format's packed values, scales and zeros
    # KV per token and layer: the MLA latent + rope key in bf16, the indexer's key in FP8 with an fp32 scale.
    kv_token = cfg.num_hidden_layers * (2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.index_head_dim + 4)
    gpu, reserve = int(gpu_gib * 2**30), int(reserve_gib * 2**30)
    out = {
        "gpu_bytes": gpu,
        "kv_bytes": kv_token * context,
        "context": context,
        "reserve_bytes": reserve,
        "expert_bytes_fp8": layout.expert_bytes,
        "all_expert_bytes_fp8": layout.expert_bytes * E * MOE_LAYERS,
        "expert_bytes_int4": int4.expert_bytes,
        "all_expert_bytes_int4": int4.expert_bytes * E * MOE_LAYERS,
        "nonexpert_bytes_fp8": nonexpert_fp8,
        "nonexpert_bytes_bf16": nonexpert_bf16,
    }
    for name, nonexpert in (("fp8", nonexpert_fp8), ("bf16", nonexpert_bf16)):
        cache = gpu - nonexpert - out["kv_bytes"] - reserve
        out[f"cache_bytes_nonexpert_{name}"] = cache
        out[f"fraction_nonexpert_{name}"] = cache / out["all_expert_bytes_fp8"]
        out[f"slots_nonexpert_{name}"] = int(cache // (layout.expert_bytes * MOE_LAYERS))
    out["slots_fp8"] = out["slots_nonexpert_fp8"]
    # Non-expert weights stay as the checkpoint has them with int4 experts: the same bytes for the cache.
    out["slots_int4"] = int(out["cache_bytes_nonexpert_fp8"] // (int4.expert_bytes * MOE_LAYERS))
    return out


# ---------------------------------------------------------------------------------------------- the simulation


def _layer_cache(slots: int, policy: Policy) -> LayerCache:
    cfg = GlmMoeDsaConfig.from_dict(make_config("tiny", experts=E), source="hit-rate bench layer")
    layout = ExpertLayout.for_config(cfg)
    store = HostExpertStore(layout, [LAYER], pin=False)  # bytes never read: copies only move garbage here
    cache = ExpertCache(
        store, "cpu", CacheConfig(policy=policy.eviction, lfu_decay=policy.lfu_decay, use_kernels=False), slots=slots
    )
    return cache[LAYER]


def split_table(shape: Shape, cpu_rate: float, copy_rate: float) -> tuple[torch.Tensor, range]:
    """The hybrid service's table counts[M, n_miss] (CPU experts per step of M tokens with n_miss misses) as
    `HybridMissService` builds it from the two rates, and the step sizes the engine splits (routed_experts.py)."""
    settings = types.SimpleNamespace(miss_service="hybrid", spec_steps=shape.spec_steps, cpu_expert_threads=0)
    cpu = _cpu_config(settings, torch.device("cuda"))
    assert cpu is not None
    service = types.SimpleNamespace(cfg=cpu, copy_rate=copy_rate)
    table = np.stack(
        [
            HybridMissService._cpu_counts(service, cpu_rate, cpu.max_tokens * K_TOP)  # type: ignore
            for _ in range(cpu.max_tokens + 1)
        ]
    )
    return torch.from_numpy(table).to(torch.int32), range(cpu.min_tokens, cpu.max_tokens + 1)


def _next_use(steps: np.ndarray) -> np.ndarray:
    """[T, E] float: the step at which each expert is next needed after step t (inf: never)."""
    T = steps.shape[0]
    used = np.zeros((T, E), dtype=bool)
    for t in range(T):
        used[t, np.unique(steps[t])] = True
    nxt = np.full((T, E), np.inf)
    upcoming = np.full(E, np.inf)
    for t in range(T - 1, -1, -1):
        nxt[t] = upcoming
        upcoming = np.where(used[t], t, upcoming)
    return nxt


def simulate(
    steps: np.ndarray,
    slots: int,
    policy: Policy,
    shape: Shape,
    warm_steps: int,
    cpu_rate: float,
    copy_rate: float,
    pin_interval_tokens: int,
    state_path: Path | None = None,
    split: bool = True,
) -> dict:
    """Serve `steps` ([T, M, k] int32) through one layer's cache; counters over the steps after `warm_steps`.
    A pinned policy's planner starts from `state_path` when that file exists (a restart) and writes it at the end.
    `split=False` copies every miss (miss_service copy) where the engine would split."""
    lc = _layer_cache(slots, policy)
    T, M, k = steps.shape
    table, split_sizes = split_table(shape, cpu_rate, copy_rate)
    hybrid = split and M in split_sizes
    header = torch.zeros(6, dtype=torch.int32)
    mailbox = dict(
        cpu_experts=torch.zeros(M * k, dtype=torch.int32),
        ids_out=torch.zeros(M * k, dtype=torch.int32),
        w_out=torch.zeros(M * k),
        x_out=torch.zeros(M, 1),
        exclude=torch.zeros(E, dtype=torch.int8),
        gpu_weights=torch.zeros(M * k),
    )
    weights, hidden = torch.ones(M, k), torch.zeros(M, 1)
    planner = None
    if policy.pin_fraction > 0:

        def read_counts() -> dict[int, list[int]]:
            row = lc.tables.expert_count.tolist()
            lc.tables.expert_count.zero_()
            return {LAYER: row}

        planner = PinPlanner(
            E,
            [LAYER],
            pin_budget(slots, E, policy.pin_fraction),
            read_counts=read_counts,
            apply=lambda pins: lc.set_pins(pins[LAYER]),
            state_path=state_path,
        )
        planner.replan()  # the daemon's warm start: pins from the state file before the first step
        pin_every = max(1, round(pin_interval_tokens / shape.tokens))
    nxt = _next_use(steps) if policy.oracle else None
    round_ids, mask = torch.empty(M, k, dtype=torch.int32), torch.empty(M, k, dtype=torch.int8)
    cpu = distinct = 0
    miss_hist = np.zeros(M * k + 1, dtype=np.int64)  # measured split steps by their misses (the split's n_miss)
    base = None
    t0 = time.perf_counter()
    for t in range(T):
        if t == warm_steps:
            base, cpu, distinct = lc.tables.stats.clone(), 0, 0
            miss_hist[:] = 0
        if planner is not None and t and t % pin_every == 0:
            planner.tick()
        ids = torch.from_numpy(steps[t])
        if nxt is not None:  # victims, the miss order and the split read expert_freq: the nearness of the next use,
            # scaled so that the step's route counts (added by round 0) cannot reorder it
            lc.tables.expert_freq.copy_(torch.from_numpy(1e9 / (nxt[t] - t)).float())
        exclude = None
        if hybrid:
            split_misses_reference(
                ids,
                weights,
                hidden,
                lc.tables.expert_to_slot,
                lc.tables.expert_freq,
                table[M],
                header=header,
                layer_index=0,
                **mailbox,
            )
            exclude = mailbox["exclude"]
            cpu += int(header[1])
            miss_hist[int(header[2])] += 1
        for r in range(lc.rounds_for(min(E, M * k))):  # pins change the unpinned slots, so the rounds
            lc.serve_round(ids, r, round_ids, mask, exclude=exclude)
        distinct += len(np.unique(steps[t]))
    assert base is not None
    if planner is not None and state_path is not None:
        planner.update(planner.read_counts())
        planner.save(state_path)
    d = dict(zip(STATS, (lc.tables.stats - base).tolist()))
    d["copied"], n = d["misses"], T - warm_steps
    if d["hits"] + d["copied"] + cpu != distinct or d["steps"] != n:
        raise AssertionError(f"{policy.name} {shape.name}: hits + copies + CPU != distinct experts")
    return {
        "hit_rate": d["hits"] / distinct,
        "distinct": distinct / n,
        "hits": d["hits"] / n,
        "copied": d["copied"] / n,
        "cpu": cpu / n,
        "hybrid": hybrid,
        "steps": n,
        "pins": len(lc.pinned),
        "miss_hist": np.trim_zeros(miss_hist, "b").tolist() if hybrid else [],
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------- the tables


def make_trace(name: str, shape: Shape, steps: int, seed: int) -> np.ndarray:
    """[steps, shape.tokens, k]: `steps` verify steps of every chain of `shape.batch` chains."""
    n = 1 + shape.spec_steps
    chain_tokens = steps * n
    if name == "uniform":
        t = uniform_trace(chain_tokens, shape.batch, E, K_TOP, seed=seed)
    elif name == "skewed":
        t = skewed_trace(chain_tokens, shape.batch, E, K_TOP, seed=seed, ranking_seed=LAYER)
    elif name == "popular":
        t = skewed_trace(chain_tokens, shape.batch, E, K_TOP, seed=seed, ranking_seed=LAYER, p_prev=0.0, p_recent=0.0)
    else:
        raise ValueError(f"trace {name!r}: uniform, skewed or popular")
    return verify_steps(t, n)


def bytes_per_token(row: dict, expert_bytes: int, acceptance: float, shape: Shape) -> dict:
    """Whole-model expert bytes per accepted token: moved from host memory (copied or CPU-read) and read in HBM."""
    accepted = shape.batch * (1 + acceptance * shape.spec_steps)
    moved = (row["copied"] + row["cpu"]) * expert_bytes * MOE_LAYERS / accepted
    return {
        "acceptance": acceptance,
        "moved_GB": moved / 1e9,
        "hbm_GB": row["hits"] * expert_bytes * MOE_LAYERS / accepted / 1e9,
        "distinct_per_token": row["distinct"] / accepted,
    }


def prefetch_bound(row: dict, expert_bytes: int, idle_ms: float, copy_GBps: float, joint_GBps: float) -> dict:
    """Batch 1: what copies started in the link's idle window before a layer's miss service can move, and what the
    current prefetch design (the layer waits for its prefetch before splitting) costs for one predicted expert."""
    copy_ms = expert_bytes / copy_GBps / 1e6
    miss_ms = (row["copied"] + row["cpu"]) * expert_bytes / joint_GBps / 1e6
    capacity = idle_ms / copy_ms  # experts' worth of bytes the idle link moves
    saved_if_right = expert_bytes / joint_GBps / 1e6
    return {
        "misses": row["copied"] + row["cpu"],
        "miss_service_ms": miss_ms,
        "expert_copy_ms": copy_ms,
        "idle_ms": idle_ms,
        "idle_capacity_experts": capacity,
        "hideable_share": min(1.0, capacity / max(row["copied"] + row["cpu"], 1e-9)),
        "hideable_share_recall": min(capacity, PREDICTOR_RECALL * (row["copied"] + row["cpu"]))
        / max(row["copied"] + row["cpu"], 1e-9),
        "wired_wait_ms": max(0.0, copy_ms - idle_ms),
        "wired_saved_if_right_ms": saved_if_right,
        "wired_net_ms_at_precision_1": saved_if_right - max(0.0, copy_ms - idle_ms),
    }


def finer_split_bound(row: dict, expert_bytes: int, cpu_GBps: float, copy_GBps: float) -> dict:
    """A split step's miss service, from its measured distribution of misses per step: whole experts as the hybrid
    service splits them (its table at these rates: the slower side's time) against splitting inside experts (each
    side takes a share of the intermediate columns, so both end together: n experts at the joint rate). The second
    is the most a finer split could give: it leaves out the per-slice launches, the partial sums' join and the
    bytes of a slice rounded to the format's 128-column blocks."""
    hist = np.asarray(row["miss_hist"], dtype=np.float64)
    n = np.arange(len(hist))
    shape = next(s for s in SHAPES if s.name == row["shape"])
    table, _ = split_table(shape, cpu_GBps * 1e9, copy_GBps * 1e9)
    c = table[1, : len(hist)].numpy()  # every step size has the same table at one CPU rate
    ms = expert_bytes / 1e6  # bytes -> ms at GB/s
    whole = np.maximum(c / cpu_GBps, (n - c) / copy_GBps) * ms
    column = n / (cpu_GBps + copy_GBps) * ms
    steps = max(hist.sum(), 1.0)
    w, f = float(hist @ whole / steps), float(hist @ column / steps)
    per_token = MOE_LAYERS / shape.tokens
    return {
        "steps": int(hist.sum()),
        "misses": float(hist @ n / steps),
        "whole_ms": w,
        "column_ms": f,
        "saved_share": 1 - f / w if w else 0.0,
        "saved_ms_per_token": (w - f) * per_token,
        "by_misses": {
            int(i): {
                "share_of_steps": float(hist[i] / steps),
                "whole_ms": float(whole[i]),
                "column_ms": float(column[i]),
            }
            for i in range(1, len(hist))
            if hist[i]
        },
    }


def run(args) -> dict:
    dep = deployment(args.gpu_gib, args.context, args.reserve_gib, args.config)
    int4_slots = args.slots * dep["expert_bytes_fp8"] // dep["expert_bytes_int4"] if args.slots else 0
    caches = {"fp8": args.slots or dep["slots_fp8"], "int4": int4_slots or dep["slots_int4"]}
    out: dict = {
        "deployment": dep,
        "caches": caches,
        "rates_GBps": {"cpu": args.cpu_GBps, "copy": args.copy_GBps},
        "traces": {},
        "rows": [],
        "bytes": [],
        "prefetch": {},
        "finer_split": [],
    }
    policies = [p for p in POLICIES if p.name in args.policies.split(",")]
    shipped = shipped_policy()
    if shipped.name not in [p.name for p in policies]:
        policies.append(shipped)
    steps_b1: dict[str, np.ndarray] = {}
    shapes = [s for s in SHAPES if s.name in args.shapes.split(",")]
    for trace in args.traces.split(","):
        for shape in shapes:
            # Every step shape serves about the same number of tokens in all (batch 32: fewer, longer steps).
            measured = max(16, args.tokens // shape.tokens)
            warm = max(8, args.warm_tokens // shape.tokens)
            steps = make_trace(trace, shape, warm + measured, seed=args.seed + shape.batch)
            if shape == Shape(1) and trace != "uniform":
                steps_b1[trace] = steps
            if shape.spec_steps == 0:
                flat = steps.reshape(steps.shape[0], shape.batch, K_TOP)
                out["traces"].setdefault(trace, {})[shape.name] = trace_statistics(flat, E)
            for cache, slots in caches.items():
                for policy in policies:
                    if trace == "uniform" and policy.name not in [*args.uniform_policies.split(","), shipped.name]:
                        continue
                    r = simulate(
                        steps, slots, policy, shape, warm, args.cpu_GBps, args.copy_GBps, args.pin_interval_tokens
                    )
                    row = {
                        "trace": trace,
                        "cache": cache,
                        "slots": slots,
                        "shape": shape.name,
                        "tokens_per_step": shape.tokens,
                        "policy": policy.name,
                        **r,
                    }
                    out["rows"].append(row)
                    log.info(
                        "%s %s %s %-15s hit %.3f (%.1f s)",
                        trace,
                        cache,
                        shape.name,
                        policy.name,
                        r["hit_rate"],
                        r["wall_s"],
                    )
    out["copy_only"] = copy_only_runs(args, steps_b1, caches, shipped)
    out["restart"] = restart_runs(args, caches["fp8"], shipped, [t for t in args.traces.split(",") if t != "uniform"])
    return out


def copy_only_runs(args, steps: dict[str, np.ndarray], caches: dict[str, int], shipped: Policy) -> list[dict]:
    """Batch 1, the shipped policy with every miss copied: what the hybrid split's admission (the CPU's misses never
    enter the cache) costs in hit rate, against the rows above."""
    rows = []
    warm = max(8, args.warm_tokens)
    for trace, t in steps.items():
        for cache, slots in caches.items():
            r = simulate(
                t, slots, shipped, Shape(1), warm, args.cpu_GBps, args.copy_GBps, args.pin_interval_tokens, split=False
            )
            rows.append({"trace": trace, "cache": cache, "policy": shipped.name, "hit_rate": r["hit_rate"]})
    return rows


def restart_runs(args, slots: int, shipped: Policy, traces: list[str]) -> list[dict]:
    """Batch 1, the first `--restart-tokens` after a start: the shipped policy with the state file a previous run
    of the same layer wrote (other chains, the same popularity) against a cold start, and LRU (nothing to keep)."""
    rows = []
    shape = Shape(1)
    for trace in traces:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "placement.json"
            before = make_trace(trace, shape, args.tokens, seed=args.seed + 1000)
            simulate(
                before,
                slots,
                shipped,
                shape,
                0,
                args.cpu_GBps,
                args.copy_GBps,
                args.pin_interval_tokens,
                state_path=state,
            )
            after = make_trace(trace, shape, args.restart_tokens, seed=args.seed + 2000)
            for start, policy, path in (("warm", shipped, state), ("cold", shipped, None), ("cold", POLICIES[0], None)):
                r = simulate(
                    after,
                    slots,
                    policy,
                    shape,
                    0,
                    args.cpu_GBps,
                    args.copy_GBps,
                    args.pin_interval_tokens,
                    state_path=path,
                )
                rows.append(
                    {
                        "trace": trace,
                        "policy": policy.name,
                        "start": start,
                        "tokens": args.restart_tokens,
                        "hit_rate": r["hit_rate"],
                        "pins_at_end": r["pins"],
                    }
                )
                log.info("restart %s %s %s: hit %.3f", trace, policy.name, start, r["hit_rate"])
    return rows


def summarize(out: dict, default: str, args) -> None:
    """The best policy per case, bytes per accepted token and the prefetch bound, from the measured rows."""
    rows = out["rows"]
    dep = out["deployment"]
    eb = {"fp8": dep["expert_bytes_fp8"], "int4": dep["expert_bytes_int4"]}
    joint = args.cpu_GBps + args.copy_GBps
    for r in rows:
        if r["policy"] != default or r["trace"] == "popular":
            continue
        shape = next(s for s in SHAPES if s.name == r["shape"])
        for acc in (0.0, PUBLISHED_MTP_ACCEPTANCE) if shape.spec_steps else (0.0,):
            out["bytes"].append(
                {
                    "trace": r["trace"],
                    "cache": r["cache"],
                    "shape": r["shape"],
                    **bytes_per_token(r, eb[r["cache"]], acc, shape),
                }
            )
        if r["hybrid"]:
            out["finer_split"].append(
                {
                    "trace": r["trace"],
                    "cache": r["cache"],
                    "shape": r["shape"],
                    **finer_split_bound(r, eb[r["cache"]], args.cpu_GBps, args.copy_GBps),
                }
            )
        if r["shape"] == "b1":
            for idle in (float(x) for x in args.idle_ms.split(",")):
                out["prefetch"][f"{r['trace']}/{r['cache']}/{idle:g} ms"] = prefetch_bound(
                    r, eb[r["cache"]], idle, args.copy_GBps, joint
                )


def print_tables(out: dict, default: str) -> None:
    dep = out["deployment"]
    print(
        f"\nDeployment: {dep['gpu_bytes'] / 2**30:.1f} GiB GPU - non-expert weights "
        f"{dep['nonexpert_bytes_fp8'] / 1e9:.1f} GB (FP8 as released; bf16: {dep['nonexpert_bytes_bf16'] / 1e9:.1f}) "
        f"- KV {dep['kv_bytes'] / 1e9:.1f} GB ({dep['context']} tokens) - reserve {dep['reserve_bytes'] / 2**30:.0f} "
        f"GiB = {dep['cache_bytes_nonexpert_fp8'] / 1e9:.1f} GB for experts: "
        f"{100 * dep['fraction_nonexpert_fp8']:.2f}% of the {dep['all_expert_bytes_fp8'] / 1e9:.0f} GB of FP8 "
        f"experts ({dep['expert_bytes_fp8'] / 1e6:.2f} MB each), {out['caches']['fp8']} slots per layer (int4: "
        f"{dep['expert_bytes_int4'] / 1e6:.2f} MB an expert, {dep['all_expert_bytes_int4'] / 1e9:.0f} GB in host "
        f"memory, {out['caches']['int4']} slots; with bf16 non-expert weights "
        f"{100 * dep['fraction_nonexpert_bf16']:.2f}%, {dep['slots_nonexpert_bf16']} FP8 slots)"
    )
    print(
        "\nTraces (DESIGN.md §4 targets: 240-248 of 256 used in 512 tokens, top 4% ~46%, reuse prev ~45%, last 8 ~80%):"
    )
    print("| trace | chains x tokens | used in 512 tokens | top 4% share | reuse prev | reuse last 8 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for trace, by_shape in out["traces"].items():
        for shape, s in by_shape.items():
            print(
                f"| {trace} | {shape} | {s['distinct_in_512_tokens']:.1f} | {100 * s['top4pct_share']:.1f}% | "
                f"{100 * s['reuse_prev']:.1f}% | {100 * s['reuse_last8']:.1f}% |"
            )
    policies = list(dict.fromkeys(r["policy"] for r in out["rows"]))
    print(
        f"\nHit rate (% of the distinct experts a step needs; CPU: misses the hybrid split computed; default "
        f"policy: {default})"
    )
    print(
        "| trace | cache (slots) | step | distinct/step | " + " | ".join(policies) + " | misses/step copied + CPU "
        f"({default}) |"
    )
    print("| --- | --- | --- | ---: | " + " | ".join("---:" for _ in policies) + " | ---: |")
    keys = list(dict.fromkeys((r["trace"], r["cache"], r["shape"]) for r in out["rows"]))
    for key in keys:
        by = {r["policy"]: r for r in out["rows"] if (r["trace"], r["cache"], r["shape"]) == key}
        any_row = next(iter(by.values()))
        best = max((r["hit_rate"] for p, r in by.items() if p != "oracle"), default=0)
        cells = []
        for p in policies:
            r = by.get(p)
            if r is None:
                cells.append("")
                continue
            c = f"{100 * r['hit_rate']:.1f}"
            cells.append(f"**{c}**" if p != "oracle" and r["hit_rate"] == best else c)
        d = by.get(default)
        miss = f"{d['copied']:.1f} + {d['cpu']:.1f}" if d else ""
        print(
            f"| {key[0]} | {key[1]} ({any_row['slots']}) | {key[2]} | {any_row['distinct']:.1f} | "
            + " | ".join(cells)
            + f" | {miss} |"
        )
    if out.get("copy_only"):
        hybrid = {
            (r["trace"], r["cache"]): r["hit_rate"]
            for r in out["rows"]
            if r["shape"] == "b1" and r["policy"] == default
        }
        print(
            f"\nBatch 1, {default}: hit % with the hybrid split (its CPU misses never enter the cache) and with "
            "every miss copied"
        )
        print("| trace | cache | split | all copied |")
        print("| --- | --- | ---: | ---: |")
        for r in out["copy_only"]:
            print(
                f"| {r['trace']} | {r['cache']} | {100 * hybrid[(r['trace'], r['cache'])]:.1f} | "
                f"{100 * r['hit_rate']:.1f} |"
            )
    if out.get("restart"):
        print(
            f"\nRestart, batch 1, FP8 cache: hit rate over the first {out['restart'][0]['tokens']} tokens with the "
            "state file a previous run wrote (other chains of the same layer) and without it"
        )
        print("| trace | policy | start | hit % |")
        print("| --- | --- | --- | ---: |")
        for r in out["restart"]:
            print(f"| {r['trace']} | {r['policy']} | {r['start']} | {100 * r['hit_rate']:.1f} |")
    if out["bytes"]:
        print(
            f"\nExpert bytes per accepted token, whole model ({MOE_LAYERS} MoE layers), policy {default}: the "
            f"simulated layer's hits, copies and CPU misses per step x expert bytes x {MOE_LAYERS} / accepted tokens "
            f"(MTP acceptance {PUBLISHED_MTP_ACCEPTANCE}: {MTP_SOURCE})"
        )
        print(
            "| trace | cache | step | acceptance | distinct experts / token / layer | moved from host GB | "
            "read in HBM GB |"
        )
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for b in out["bytes"]:
            print(
                f"| {b['trace']} | {b['cache']} | {b['shape']} | {b['acceptance']:.2f} | "
                f"{b['distinct_per_token']:.2f} | {b['moved_GB']:.2f} | {b['hbm_GB']:.2f} |"
            )
    if out["finer_split"]:
        print(
            f"\nFiner miss split (split steps, policy {default}, CPU {out['rates_GBps']['cpu']:g} GB/s, copies "
            f"{out['rates_GBps']['copy']:g} GB/s): a layer's miss service with whole experts split as the hybrid "
            "service does vs each side taking a share of every expert's columns (the bound: no slice overheads)"
        )
        print("| trace | cache | step | misses/step | whole experts ms | column split ms | saved | saved ms/token |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for f in out["finer_split"]:
            print(
                f"| {f['trace']} | {f['cache']} | {f['shape']} | {f['misses']:.2f} | {f['whole_ms']:.3f} | "
                f"{f['column_ms']:.3f} | {100 * f['saved_share']:.0f}% | {f['saved_ms_per_token']:.1f} |"
            )
    if out["prefetch"]:
        print(
            "\nPrefetch at batch 1 (per MoE layer): link idle window vs one expert's copy; the wired design's "
            "wait for its copy vs what a right prediction saves"
        )
        print(
            f"| trace/cache/window | misses | miss service ms | idle window ms | experts it could move | share of "
            f"misses, exact prediction | recall {PREDICTOR_RECALL} | wired: wait ms | saved if right ms |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for key, p in out["prefetch"].items():
            print(
                f"| {key} | {p['misses']:.2f} | {p['miss_service_ms']:.2f} | {p['idle_ms']:.2f} | "
                f"{p['idle_capacity_experts']:.2f} | {100 * p['hideable_share']:.0f}% | "
                f"{100 * p['hideable_share_recall']:.0f}% | {p['wired_wait_ms']:.2f} | "
                f"{p['wired_saved_if_right_ms']:.2f} |"
            )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.hitrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="", help="a config.json to size the deployment for (default: GLM-5.1)")
    p.add_argument("--gpu-gib", type=float, default=79.6, help="GPU memory (H100 80GB HBM3: 79.6 GiB)")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV the deployment keeps room for")
    p.add_argument("--reserve-gib", type=float, default=4.0, help="activations, CUDA graphs, context")
    p.add_argument("--slots", type=int, default=0, help="FP8 slots per layer (0: from the deployment)")
    p.add_argument("--traces", default="skewed,popular,uniform")
    p.add_argument("--shapes", default=",".join(s.name for s in SHAPES))
    p.add_argument("--policies", default=",".join(p.name for p in POLICIES))
    p.add_argument(
        "--uniform-policies",
        default="lru,lfu,pinned-50%+lru,oracle",
        help="policies run on the uniform trace (where no policy can beat slots / experts)",
    )
    p.add_argument("--tokens", type=int, default=2048, help="tokens measured per step shape (all chains together)")
    p.add_argument("--warm-tokens", type=int, default=512, help="tokens served before counting (all chains)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart-tokens", type=int, default=256, help="tokens measured after a restart (batch 1)")
    p.add_argument(
        "--pin-interval-tokens",
        type=int,
        default=256,
        help="tokens between pin recomputations (the daemon's 30 s interval at ~8 tok/s)",
    )
    p.add_argument("--cpu-GBps", type=float, default=80.0, help="CPU experts' rate (docs/benchmarks.md, Offload)")
    p.add_argument("--copy-GBps", type=float, default=50.0, help="UVA copy rate (docs/benchmarks.md, Offload)")
    p.add_argument(
        "--idle-ms",
        default="0.09,0.6",
        help="link idle windows per layer at batch 1 (ms, comma-separated): the non-MoE time per layer "
        "(7 ms of the 2026-12-06 full-depth step over 78 layers), and that plus the idle head and "
        "tail inside a hybrid layer (docs/benchmarks.md, Offload: the fourth session's timeline)",
    )
    p.add_argument("--quick", action="store_true", help="a few hundred tokens, two policies: a smoke test")
    p.add_argument("--out", default="", help="write every figure here (JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.warm_tokens, args.restart_tokens = 96, 32, 32
        args.policies = args.uniform_policies = "lru,oracle"
        args.shapes, args.traces = "b1,b8+mtp1", "skewed,uniform"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("moed").setLevel(logging.WARNING)
    out = run(args)
    default = shipped_policy().name
    out["default_policy"] = default
    summarize(out, default, args)
    print_tables(out, default)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
