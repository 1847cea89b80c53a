"""GPU check and bench of the int4 (w4a16) fused MoE at GLM-5.1's widths, FP8 beside it, against measured ceilings.

One command does it all: measure the device's copy and read bandwidth; quantise random experts to int4
(`moed.formats.int4`, asymmetric, group 128) on the GPU; check `fused_moe_int4` against its torch reference at
M = 1, 64, 300 and inside a CUDA graph; with `--tune`, run `moed tune-moe --dtype int4_w4a16` for these E and N
(tables into `<--tune-out>/triton_<version>/`, default this checkout's moe_configs/, which the timing then reads);
then time M = 1..64 with the tuned tables (and the built-in defaults), and the FP8 kernel on FP8 experts of the
same shape for comparison.
Per row: us per layer, bytes of the experts touched (weights, scales, zero points), GB/s and its share of the
measured copy and read bandwidth. Summary: M=1 against the 0.09 ms per layer target, int4 over FP8.
Writes `$OUT/int4_kernel.json` (or `--json`) with every figure.
Run: `python -m moed.ops.bench.int4_kernel [--tune] [--E 257] [--N 2048] [--batch-sizes 1,2,4,8,16,32,64]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

TARGET_M1_MS = 0.09


def check(experts, E: int, K: int, topk: int) -> list[str]:
    """fused_moe_int4 against its reference (eager and in a CUDA graph); returns failure messages."""
    from moed.kernels import fused_moe_int4 as fi
    from moed.kernels.fused_moe_reference import fused_moe_reference
    from moed.kernels.fused_moe_tuner import make_routing

    w13, w2 = experts
    kw = dict(w13_scale=w13.scales, w2_scale=w2.scales, w13_zeros=w13.zeros, w2_zeros=w2.zeros, group=w13.group)
    e2s = torch.arange(E, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    failures = []
    for M in (1, 64, 300):
        ids, wts = make_routing(M, E, topk, "cuda", gen)
        x = torch.randn((M, K), device="cuda", generator=gen).bfloat16()
        out = fi.fused_moe_int4(x, w13.qweight, w2.qweight, ids, wts, e2s, **kw)
        ref = fused_moe_reference(x, w13.qweight, w2.qweight, ids, wts, e2s, **kw)
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        print(f"  check M={M:4d}: rel err {err:.2e} vs torch", flush=True)
        if not err < 1e-2:
            failures.append(f"M={M}: rel err {err:.2e}")
    M = 4
    ids, wts = make_routing(M, E, topk, "cuda", gen)
    x = torch.randn((M, K), device="cuda", generator=gen).bfloat16()
    out = torch.empty_like(x)
    fi.fused_moe_int4(x, w13.qweight, w2.qweight, ids, wts, e2s, out=out, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fi.fused_moe_int4(x, w13.qweight, w2.qweight, ids, wts, e2s, out=out, **kw)
    ids2, wts2 = make_routing(M, E, topk, "cuda", gen)
    ids.copy_(ids2)
    wts.copy_(wts2)
    x.copy_(torch.randn((M, K), device="cuda", generator=gen).bfloat16())
    graph.replay()
    ref = fused_moe_reference(x, w13.qweight, w2.qweight, ids, wts, e2s, **kw)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    print(f"  check CUDA graph replay with new routing: rel err {err:.2e}", flush=True)
    if not err < 1e-2:
        failures.append(f"graph replay: rel err {err:.2e}")
    return failures


def bench(args, ceil: dict, Ms: list[int], int4_experts, fp8_experts) -> list[dict]:
    import triton

    from moed.kernels import fused_moe as fm
    from moed.kernels import fused_moe_int4 as fi
    from moed.kernels.fused_moe_tuner import make_routing, time_graph
    from moed.moe_configs import lookup

    w13, w2 = int4_experts
    q13, q2, s13, s2 = fp8_experts
    e2s = torch.arange(args.E, dtype=torch.int32, device="cuda")
    dev = torch.cuda.get_device_name()
    tables = lookup.get_tables(args.E, args.N, fi.DTYPE_NAME, None, dev, triton.__version__)
    print(f"[int4] tuned table: {tables.source or 'none (built-in defaults)'}", flush=True)
    int4_bytes = sum(t[0].numel() * t.element_size() for w in (w13, w2) for t in (w.qweight, w.scales, w.zeros))
    fp8_bytes = sum(t[0].numel() * t.element_size() for t in (q13, q2, s13, s2))
    kw4 = dict(w13_scale=w13.scales, w2_scale=w2.scales, w13_zeros=w13.zeros, w2_zeros=w2.zeros, group=w13.group)
    kw8 = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128))
    rows = []
    for m in Ms:
        gen = torch.Generator(device="cuda").manual_seed(m)
        sets = []
        for _ in range(8):  # rotating routings and activations: the touched weights exceed L2
            ids, wts = make_routing(m, args.E, args.topk, "cuda", gen)
            sets.append((torch.randn((m, args.K), device="cuda", generator=gen).bfloat16(), ids, wts))
        touched = sum(int(torch.unique(s[1]).numel()) for s in sets) / len(sets)
        outs = [torch.empty((m, args.K), dtype=torch.bfloat16, device="cuda") for _ in sets]
        default = lookup.default_config(m, fi.DTYPE_NAME, None)
        variants = {
            "int4-tuned": (
                [
                    lambda s=s, o=o: fi.fused_moe_int4(s[0], w13.qweight, w2.qweight, s[1], s[2], e2s, out=o, **kw4)
                    for s, o in zip(sets, outs)
                ],
                int4_bytes,
            ),
            "int4-default": (
                [
                    lambda s=s, o=o, d=default: fi.fused_moe_int4(
                        s[0], w13.qweight, w2.qweight, s[1], s[2], e2s, out=o, config=d, down_config=d, **kw4
                    )
                    for s, o in zip(sets, outs)
                ],
                int4_bytes,
            ),
            "fp8-tuned": (
                [
                    lambda s=s, o=o: fm.fused_moe(s[0], q13, q2, s[1], s[2], e2s, out=o, **kw8)
                    for s, o in zip(sets, outs)
                ],
                fp8_bytes,
            ),
        }
        for name, (fns, per_expert) in variants.items():
            try:
                ms = time_graph(fns)
            except Exception as e:
                print(f"  M={m} {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                torch.cuda.synchronize()
                continue
            nbytes = touched * per_expert
            row = {"M": m, "variant": name, "ms": ms, "touched_MB": nbytes / 1e6, "GBps": nbytes / ms / 1e6}
            row["copy_ratio"] = row["GBps"] / ceil["copy_GBps"]
            row["read_ratio"] = row["GBps"] / ceil["read_GBps"]
            rows.append(row)
            print(
                f"  M={m:3d} {name:13s} {ms * 1e3:8.1f} us  {row['touched_MB']:7.1f} MB  {row['GBps']:6.0f} GB/s "
                f"({row['copy_ratio']:5.1%} of copy, {row['read_ratio']:5.1%} of read)",
                flush=True,
            )
    return rows


def run(
    E: int = 257,
    N: int = 2048,
    K: int = 6144,
    topk: int = 8,
    Ms: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    tune: bool = False,
    tune_out: str | None = None,
    tune_budget: float = 360.0,
    tune_batch_sizes: str | None = None,
) -> dict:
    """Check, optionally tune, and time the int4 kernel (FP8 beside it) with this run's device ceilings; every
    figure in a dict (info, ceilings, rows, summary, failures). `ops/bench/offload.py --only int4` calls this too."""
    import triton

    from moed.kernels.fused_moe_tuner import main as tune_main
    from moed.kernels.fused_moe_tuner import make_experts, make_int4_experts
    from moed.moe_configs import lookup
    from moed.ops.bench.moe_kernel import measure_ceilings

    t0 = time.time()
    info = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "E": E,
        "N": N,
        "K": K,
        "topk": topk,
    }
    print(json.dumps(info), flush=True)
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, read {ceil['read_GBps']:.0f} GB/s", flush=True)
    if tune:
        tune_argv = [
            "--dtype",
            "int4_w4a16",
            "--E",
            str(E),
            "--N",
            str(N),
            "--K",
            str(K),
            "--topk",
            str(topk),
            "--time-budget",
            str(tune_budget),
        ]
        if tune_out:
            tune_argv += ["--out-dir", str(Path(tune_out) / lookup.triton_dir_name(triton.__version__))]
            os.environ[lookup.ENV_DIR] = tune_out  # the timing below (and the caller's runners) look there first
        if tune_batch_sizes:
            tune_argv += ["--batch-sizes", tune_batch_sizes]
        rc = tune_main(tune_argv)
        lookup.clear_cache()
        print(f"tuner exit code {rc} after {time.time() - t0:.0f}s", flush=True)
    int4_experts = make_int4_experts(E, N, K, "cuda")
    failures = check(int4_experts, E, K, topk)
    fp8_experts = make_experts(E, N, K, "fp8_w8a8", "cuda")
    args = argparse.Namespace(E=E, N=N, K=K, topk=topk)
    rows = bench(args, ceil, list(Ms), int4_experts, fp8_experts)
    del int4_experts, fp8_experts
    torch.cuda.empty_cache()

    def get(m, var):
        return next((r for r in rows if r["M"] == m and r["variant"] == var), None)

    summary: dict = {}
    r1, f1 = get(1, "int4-tuned"), get(1, "fp8-tuned")
    if r1:
        summary[f"int4 M=1 ms per layer (target <= {TARGET_M1_MS})"] = round(r1["ms"], 4)
        summary["int4 M=1 share of measured copy bandwidth"] = round(r1["copy_ratio"], 3)
    if r1 and f1:
        summary["FP8 / int4 time at M=1"] = round(f1["ms"] / r1["ms"], 2)
    small = [r for r in rows if r["variant"] == "int4-tuned"]
    if small:
        summary["int4 M<=64 min share of copy bandwidth"] = round(min(r["copy_ratio"] for r in small), 3)
    summary["check"] = "ok" if not failures else "; ".join(failures)
    return {
        "info": info,
        "ceilings": ceil,
        "rows": rows,
        "summary": summary,
        "failures": failures,
        "wall_s": time.time() - t0,
    }


def print_report(res: dict) -> None:
    info, ceil = res["info"], res["ceilings"]
    print(
        f"{info['device']}, Triton {info['triton']}, E={info['E']} N={info['N']} K={info['K']} top-k "
        f"{info['topk']}; copy {ceil['copy_GBps']:.0f} GB/s, read {ceil['read_GBps']:.0f} GB/s (this run)"
    )
    print("| M | variant | us/layer | touched MB | GB/s | % copy | % read |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in res["rows"]:
        print(
            f"| {r['M']} | {r['variant']} | {r['ms'] * 1e3:.1f} | {r['touched_MB']:.0f} | {r['GBps']:.0f} | "
            f"{r['copy_ratio']:.0%} | {r['read_ratio']:.0%} |"
        )
    for k, v in res["summary"].items():
        print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.int4_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--E", type=int, default=257, help="expert ids (257: 256 routed + fused shared)")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--K", type=int, default=6144)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--tune", action="store_true", help="run the int4_w4a16 tuner for this E and N first")
    p.add_argument(
        "--tune-out",
        default=None,
        help="root for --tune's tables: <root>/triton_<version>/ (default: "
        "this checkout's moe_configs/); it is searched first by the timing",
    )
    p.add_argument("--tune-batch-sizes", default=None, help="default: the tuner's (1 .. 8192)")
    p.add_argument("--tune-budget", type=float, default=360.0, help="seconds; the tuner starts no new size after")
    p.add_argument("--json", default=None, help="default: $OUT/int4_kernel.json when $OUT is set")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("int4_kernel bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    res = run(
        args.E,
        args.N,
        args.K,
        args.topk,
        tuple(int(v) for v in args.batch_sizes.split(",")),
        args.tune,
        args.tune_out,
        args.tune_budget,
        args.tune_batch_sizes,
    )
    out_json = args.json or (str(Path(os.environ["OUT"]) / "int4_kernel.json") if os.environ.get("OUT") else None)
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=1))
    print()
    print_report(res)
    print(f"wall time {res['wall_s']:.0f}s")
    return 0 if not res["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
