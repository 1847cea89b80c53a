"""Hit-rate benchmark (CPU, minutes): the expert cache's eviction and placement policies on routing traces, at the
cache the whole GLM-5.1 would have on the GPU machine; expert bytes per accepted token; what a finer miss split and
prefetch could save.

    python -m moed.ops.bench.hitrate [--out hitrate.json] [--quick]

The cases run through hitrate_sim.py (the cache's own code on the traces); hitrate_arithmetic.py sizes the
deployment and turns the measured counts into whole-model figures; hitrate_tables.py prints them. Prints the tables
last and writes every figure to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from moed.offload.traces import trace_statistics
from moed.ops.bench.hitrate_arithmetic import (
    PUBLISHED_MTP_ACCEPTANCE,
    bytes_per_token,
    deployment,
    finer_split_bound,
    prefetch_bound,
)
from moed.ops.bench.hitrate_sim import K_TOP, POLICIES, SHAPES, E, Policy, Shape, make_trace, shipped_policy, simulate
from moed.ops.bench.hitrate_tables import print_tables

log = logging.getLogger("bench.hitrate")


def run(args) -> dict:
    """Every trace x cache (FP8 / int4 slots) x step shape x policy, then the copy-only and restart cases."""
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
