"""Fused-MoE benchmark: one GLM-5.1 MoE layer's experts for M = 1..8192 tokens, as ratios to ceilings measured here.

Ceilings (measured first, in this run): device copy bandwidth (bytes read + written), dense bf16 GEMM and FP8
GEMM (`torch._scaled_mm`) at 8192^3. Per M and variant: time per layer (CUDA-graph replay over rotating
routings and activations), bytes of the experts actually touched (weights + scales), GB/s and its ratio to
the copy bandwidth, TFLOP/s (2 * M * k * 3 * N * K) and its ratio to the GEMM ceiling of the weights' dtype.
Variants: moed fused MoE with the tuned tables (`moed-tuned`), with the built-in defaults (`moed-default`),
`torch._grouped_mm` in bf16 where the device's torch has it, and a per-expert torch loop in bf16.
Run: `python -m moed.ops.bench.moe_kernel [--dtypes fp8_w8a8 bf16] [--batch-sizes 1,2,...]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
import torch.nn.functional as F

from moed.kernels.fused_moe_tuner import make_experts, make_routing, precompile, time_graph

DEFAULT_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def measure_ceilings() -> dict[str, float]:
    n = 1 << 29  # 2 GiB of fp32: 16-byte accesses (a uint8 copy measured 20% lower here)
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_graph([lambda: dst.copy_(src)], reps=20)
    copy_gbs = 2 * 4 * n / ms / 1e6
    read_gbs = 4 * n / time_graph([lambda: src.sum()], reps=20) / 1e6
    src = dst = None
    a = torch.randn(8192, 8192, device="cuda").bfloat16()
    b = torch.randn(8192, 8192, device="cuda").bfloat16()
    ms = time_graph([lambda: a @ b], reps=10)
    bf16_tflops = 2 * 8192**3 / ms / 1e9
    fp8_tflops = float("nan")
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device="cuda")
        ms = time_graph([lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)], reps=10)
        fp8_tflops = 2 * 8192**3 / ms / 1e9
    except (RuntimeError, AttributeError) as e:
        print(f"FP8 GEMM ceiling unavailable: {e}", file=sys.stderr)
    return {"copy_GBps": copy_gbs, "read_GBps": read_gbs, "bf16_TFLOPs": bf16_tflops, "fp8_TFLOPs": fp8_tflops}


def grouped_mm_moe(hidden, w13_t, w2_t, ids, weights, E):
    """bf16 MoE through torch._grouped_mm: sort assignments by expert, two grouped GEMMs, scatter-add."""
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=hidden.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    gu = torch._grouped_mm(hidden[tok], w13_t, offs=offs)
    N = gu.shape[1] // 2
    h = F.silu(gu[:, :N]) * gu[:, N:]
    y = torch._grouped_mm(h, w2_t, offs=offs) * weights.reshape(-1)[order, None].to(h.dtype)
    return torch.zeros_like(hidden).index_add_(0, tok, y)


def torch_loop_moe(hidden, w13, w2, ids, weights):
    """The naive baseline: a bf16 per-expert loop in torch (host sync for the expert list)."""
    out = torch.zeros_like(hidden)
    N = w2.shape[2]
    for e in torch.unique(ids).tolist():
        tok, j = torch.where(ids == e)
        x = hidden[tok]
        gu = x @ w13[e].T
        y = (F.silu(gu[:, :N]) * gu[:, N:]) @ w2[e].T
        out.index_add_(0, tok, y * weights[tok, j, None].to(y.dtype))
    return out


def time_eager(fns: list, reps: int = 5) -> float:
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for fn in fns:
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return sorted(times)[len(times) // 2]


def bench_dtype(dtype: str, args, ceil: dict, Ms: list[int], variants: list[str]) -> list[dict]:
    """All variants at every M for one weight dtype; returns table rows."""
    import triton

    from moed.kernels import fused_moe as fm
    from moed.moe_configs import lookup

    fp8 = dtype == "fp8_w8a8"
    dname = "fp8_w8a8" if fp8 else None
    e2s = torch.arange(args.E, dtype=torch.int32, device="cuda")
    k_all = args.topk + (1 if args.E == 257 else 0)
    w13, w2, s13, s2 = make_experts(args.E, args.N, args.K, dtype, "cuda")
    block = (128, 128) if fp8 else None
    tables = lookup.get_tables(
        args.E, args.N, dname, list(block) if block else None, torch.cuda.get_device_name(), triton.__version__
    )
    print(f"[{dtype}] tuned table: {tables.source or 'none (defaults)'}; down: {tables.down_source}", flush=True)
    items = []
    for m in Ms:
        up, down = tables.pick(m)
        mode = {"A_QUANT_IN_GEMM": m <= fm.QUANT_IN_KERNEL_MAX_TOKENS}
        d = {**lookup.default_config(m, dname, block), **mode}
        items += [("gate_up", {**mode, **up}), ("down", {**mode, **down}), ("gate_up", d), ("down", d)]
    precompile(dtype, args.N, args.K, items, args.workers)
    scales = (s13, s2) if fp8 else ()
    bytes_per_expert = sum(t[0].numel() * t.element_size() for t in (w13, w2, *scales))
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=block)
    gemm_ceiling = ceil["fp8_TFLOPs"] if fp8 else ceil["bf16_TFLOPs"]
    rows = []
    for m in Ms:
        gen = torch.Generator(device="cuda").manual_seed(m)
        rot = 8 if m <= 64 else 4 if m <= 1024 else 2
        sets = []
        for _ in range(rot):
            ids, wts = make_routing(m, args.E, args.topk, "cuda", gen)
            sets.append((torch.randn((m, args.K), device="cuda", generator=gen).bfloat16(), ids, wts))
        touched = sum(int(torch.unique(s[1]).numel()) for s in sets) / rot * bytes_per_expert
        flops = 2 * m * k_all * 3 * args.N * args.K
        outs = [torch.empty((m, args.K), dtype=torch.bfloat16, device="cuda") for _ in sets]
        default = lookup.default_config(m, dname, block)
        for var in variants:
            if var in ("grouped_mm", "torch-loop") and fp8:
                continue  # bf16 baselines: measured once, in the bf16 pass
            try:
                if var == "moed-tuned":
                    fns = [
                        lambda s=s, o=o: fm.fused_moe(s[0], w13, w2, s[1], s[2], e2s, out=o, **kw)
                        for s, o in zip(sets, outs)
                    ]
                    ms = time_graph(fns)
                elif var == "moed-default":
                    fns = [
                        lambda s=s, o=o, d=default: fm.fused_moe(
                            s[0], w13, w2, s[1], s[2], e2s, out=o, config=d, down_config=d, **kw
                        )
                        for s, o in zip(sets, outs)
                    ]
                    ms = time_graph(fns)
                elif var == "grouped_mm":
                    if not hasattr(torch, "_grouped_mm"):
                        continue
                    fns = [
                        lambda s=s: grouped_mm_moe(s[0], w13.transpose(1, 2), w2.transpose(1, 2), s[1], s[2], args.E)
                        for s in sets
                    ]
                    try:
                        ms = time_graph(fns)
                    except RuntimeError:
                        torch.cuda.synchronize()
                        ms = time_eager(fns)
                elif var == "torch-loop":
                    fns = [lambda s=s: torch_loop_moe(s[0], w13, w2, s[1], s[2]) for s in sets]
                    ms = time_eager(fns, reps=3 if m >= 2048 else 5)
                else:
                    raise ValueError(f"unknown variant {var!r}")
            except Exception as e:
                print(f"  M={m} {dtype} {var}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                torch.cuda.synchronize()
                continue
            row = {
                "M": m,
                "dtype": dtype,
                "variant": var,
                "ms": ms,
                "touched_GB": touched / 1e9,
                "GBps": touched / ms / 1e6,
                "TFLOPs": flops / ms / 1e9,
            }
            row["hbm_ratio"] = row["GBps"] / ceil["copy_GBps"]
            row["gemm_ratio"] = row["TFLOPs"] / gemm_ceiling
            rows.append(row)
            print(
                f"  M={m:5d} {dtype:8s} {var:12s} {ms * 1e3:9.1f} us  {row['GBps']:7.0f} GB/s "
                f"({row['hbm_ratio']:5.1%})  {row['TFLOPs']:6.1f} TFLOP/s ({row['gemm_ratio']:5.1%})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.moe_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--E", type=int, default=257, help="expert ids (257: 256 routed + fused shared)")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--K", type=int, default=6144)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", default=["fp8_w8a8", "bf16"], choices=["fp8_w8a8", "bf16"])
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_M)))
    p.add_argument("--variants", default="moed-tuned,moed-default,grouped_mm,torch-loop")
    p.add_argument("--json", default=None, help="also write all figures here")
    p.add_argument("--workers", type=int, default=16)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_kernel bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    Ms = [int(v) for v in args.batch_sizes.split(",")]
    variants = args.variants.split(",")
    dev = torch.cuda.get_device_name()
    info = {
        "device": dev,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "E": args.E,
        "N": args.N,
        "K": args.K,
        "topk": args.topk,
    }
    print(json.dumps(info), flush=True)
    ceil = measure_ceilings()
    print(
        f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read-only sum {ceil['read_GBps']:.0f}), "
        f"bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
        f"FP8 GEMM {ceil['fp8_TFLOPs']:.0f} TFLOP/s",
        flush=True,
    )
    rows = []
    for dtype in args.dtypes:
        rows += bench_dtype(dtype, args, ceil, Ms, variants)
        torch.cuda.empty_cache()
    summary = _summary(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "ceilings": ceil, "rows": rows, "summary": summary}, f, indent=1)
    print()
    print(_markdown(info, ceil, rows))
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


def _summary(rows: list[dict]) -> dict:
    def get(m, dtype, var):
        return next((r for r in rows if r["M"] == m and r["dtype"] == dtype and r["variant"] == var), None)

    s = {}
    r = get(1, "fp8_w8a8", "moed-tuned")
    if r:
        s["M=1 FP8 layer ms (target <= 0.15)"] = round(r["ms"], 4)
    small = [r for r in rows if r["dtype"] == "fp8_w8a8" and r["variant"] == "moed-tuned" and r["M"] <= 64]
    if small:
        s["FP8 M<=64 min HBM ratio (target >= 0.80)"] = round(min(r["hbm_ratio"] for r in small), 3)
    big = [r for r in rows if r["dtype"] == "fp8_w8a8" and r["variant"] == "moed-tuned" and r["M"] >= 4096]
    if big:
        s["FP8 M>=4096 min GEMM ratio (target >= 0.60)"] = round(min(r["gemm_ratio"] for r in big), 3)
    ratios = []
    for r in rows:
        if r["variant"] == "moed-tuned":
            d = get(r["M"], r["dtype"], "moed-default")
            if d:
                ratios.append((d["ms"] / r["ms"], r["M"], r["dtype"]))
    if ratios:
        best = max(ratios)
        s["tuned vs default, best speedup (target >= 1.3)"] = f"{best[0]:.2f}x at M={best[1]} {best[2]}"
    vs = []
    for r in small:
        g = get(r["M"], "bf16", "grouped_mm")
        if g:
            vs.append((g["ms"] / r["ms"], r["M"]))
    if vs:
        s["FP8 vs grouped_mm bf16 at M<=64, worst (target >= 1.5)"] = f"{min(vs)[0]:.2f}x at M={min(vs)[1]}"
    return s


def _markdown(info: dict, ceil: dict, rows: list[dict]) -> str:
    out = [
        f"Device {info['device']}, {info['date']}, torch {info['torch']}, Triton {info['triton']}; "
        f"E={info['E']}, N={info['N']}, K={info['K']}, top-k {info['topk']}"
        f"{' + fused shared' if info['E'] == 257 else ''}. Ceilings measured in the same run: copy "
        f"{ceil['copy_GBps']:.0f} GB/s, bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s, FP8 GEMM "
        f"{ceil['fp8_TFLOPs']:.0f} TFLOP/s.",
        "",
        "| M | dtype | variant | us/layer | touched GB | GB/s | % HBM | TFLOP/s | % GEMM |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['M']} | {r['dtype']} | {r['variant']} | {r['ms'] * 1e3:.1f} | {r['touched_GB']:.2f} | "
            f"{r['GBps']:.0f} | {r['hbm_ratio']:.0%} | {r['TFLOPs']:.1f} | {r['gemm_ratio']:.0%} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"bench wall time {time.time() - t0:.0f}s")
    raise SystemExit(rc)
