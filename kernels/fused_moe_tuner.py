"""`moed tune-moe`: search fused-MoE tile configs on this GPU and write them as sglang-layout JSON tables.

For each (dtype, E, N) and batch size M it times the gate+up GEMM over candidate tiles, then the down GEMM with
the winner's BLOCK_SIZE_M (both GEMMs share one alignment), and writes
`<out-dir>/E=..,N=..,device_name=..[,dtype=..][,block_shape=[128, 128]].json` plus the `_down.json` twin.
Every candidate's output is first checked against plain torch on a few tokens; timing replays a CUDA graph
over rotating inputs (routings and activations) whose touched weights exceed L2. Candidates compile once in a
process pool (M, N, K are runtime arguments, so a compiled config serves every shape). Progress goes to
`<name>.json.partial` after each M; `--resume` continues from it; the final files appear when a table is done.
E=257 means 256 routed experts plus the shared expert fused as id 256 (every token routes to it).
`--dtype int4_w4a16` tunes `moed.kernels.fused_moe_int4` on experts quantised by `moed.formats.int4` (asymmetric,
group 128) and writes `...,dtype=int4_w4a16.json` (no block_shape in the name, as vLLM and sglang name int4 tables).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = ("fp8_w8a8", "bf16", "int4_w4a16")
INT4 = "int4_w4a16"


def config_name(dtype: str) -> tuple[str | None, list[int] | None]:
    """(dtype string, block_shape) of the config file names for a tuner dtype."""
    if dtype == "fp8_w8a8":
        return "fp8_w8a8", [128, 128]
    return (INT4, None) if dtype == INT4 else (None, None)


def make_int4_experts(E: int, N: int, K: int, device: str, seed: int = 0):
    """Random experts quantised to int4 on `device`: (w13 Int4Weight [E, 2N, K/2], w2 Int4Weight [E, K, N/2])."""
    from moed.formats import int4

    g = torch.Generator(device=device).manual_seed(seed)
    parts13, parts2 = [], []
    for _ in range(E):
        parts13.append(int4.quantize_int4(torch.randn((2 * N, K), generator=g, device=device) / K**0.5))
        parts2.append(int4.quantize_int4(torch.randn((K, N), generator=g, device=device) / N**0.5))

    def stack(parts):
        return int4.Int4Weight(
            *(torch.stack([getattr(p, f) for p in parts]) for f in ("qweight", "scales", "zeros")), parts[0].group
        )

    return stack(parts13), stack(parts2)


def launch_up(dtype: str, x, experts, h, align, top_k: int, cfg: dict) -> None:
    """The gate-up GEMM of `dtype`'s kernel (experts as make_experts returns them)."""
    from moed.kernels import fused_moe as fm
    from moed.kernels import fused_moe_int4 as fi

    w13, _, s13, _ = experts
    if dtype == INT4:
        fi.launch_gate_up(x, w13, h, align, top_k, cfg)
    else:
        fm.launch_gate_up(x, w13, s13, h, align, top_k, cfg, dtype == "fp8_w8a8", _in_gemm(cfg), 128)


def launch_down(dtype: str, h, experts, part, wts, align, cfg: dict) -> None:
    from moed.kernels import fused_moe as fm
    from moed.kernels import fused_moe_int4 as fi

    _, w2, _, s2 = experts
    if dtype == INT4:
        fi.launch_down(h, w2, part, wts, align, cfg)
    else:
        fm.launch_down(h, w2, s2, part, wts, align, cfg, dtype == "fp8_w8a8", _in_gemm(cfg), 128)


def make_experts(E: int, N: int, K: int, dtype: str, device: str, seed: int = 0):
    """Random experts of GLM-5.1's layout: (w13 [E, 2N, K], w2 [E, K, N], w13_scale, w2_scale) on `device`
    (int4_w4a16: (w13 Int4Weight, w2 Int4Weight, None, None), the scales inside)."""
    if dtype == INT4:
        return (*make_int4_experts(E, N, K, device, seed), None, None)
    g = torch.Generator(device=device).manual_seed(seed)
    if dtype == "bf16":
        w13 = torch.empty((E, 2 * N, K), dtype=torch.bfloat16, device=device)
        w2 = torch.empty((E, K, N), dtype=torch.bfloat16, device=device)
        for e in range(E):  # per expert: keeps the fp32 temporaries small
            w13[e] = torch.randn((2 * N, K), generator=g, device=device) / K**0.5
            w2[e] = torch.randn((K, N), generator=g, device=device) / N**0.5
        return w13, w2, None, None
    w13 = torch.empty((E, 2 * N, K), dtype=torch.float8_e4m3fn, device=device)
    w2 = torch.empty((E, K, N), dtype=torch.float8_e4m3fn, device=device)
    for e in range(E):
        w13[e] = (torch.randn((2 * N, K), generator=g, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        w2[e] = (torch.randn((K, N), generator=g, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    # Scales as a real checkpoint's: 1 / (64 * sqrt(fan_in)) with a spread per block.
    s13 = torch.rand((E, 2 * N // 128, -(-K // 128)), generator=g, device=device) + 0.5
    s2 = torch.rand((E, -(-K // 128), -(-N // 128)), generator=g, device=device) + 0.5
    return w13, w2, s13 / (64 * K**0.5), s2 / (64 * N**0.5)


def make_routing(M: int, E: int, topk: int, device: str, gen: torch.Generator):
    """(topk_ids int32 [M, k], topk_weights fp32 [M, k]): `topk` distinct routed ids per token, uniform; E=257
    adds the fused shared expert (id 256, weight 1) as the last column."""
    routed = E - 1 if E == 257 else E
    ids = torch.rand((M, routed), generator=gen, device=device).topk(topk, dim=1).indices
    w = torch.rand((M, topk), generator=gen, device=device)
    w = w / w.sum(dim=1, keepdim=True) * 2.5
    if E == 257:
        ids = torch.cat([ids, torch.full((M, 1), 256, device=device, dtype=ids.dtype)], dim=1)
        w = torch.cat([w, torch.ones((M, 1), device=device)], dim=1)
    return ids.to(torch.int32).contiguous(), w.float().contiguous()


def touched_experts(topk_ids: torch.Tensor) -> int:
    return int(torch.unique(topk_ids).numel())


def time_graph(launches: list, reps: int = 0, target_ms: float = 10.0) -> float:
    """Median ms per launch: capture all `launches` (callables) in one CUDA graph and replay it."""
    for fn in launches:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in launches:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = reps or max(3, min(200, int(target_ms / once)))
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] / len(launches)


# int4 tensor-core tiles are offered with both unpacks (fused_moe_int4's UNPACK_BF16) up to this many tokens: the
# 16-row tiles; 64-row tiles spill with it on sm_90 (520 bytes at 64x128, 4 warps)
UNPACK_BF16_MAX_TOKENS = 64


def candidates(M: int, dtype: str) -> list[dict]:
    """The search space for M tokens: small row blocks and many column tiles for decode, big tiles for prefill.
    FP8 entries up to QUANT_IN_KERNEL_MAX_TOKENS come twice: activations quantised in the GEMM or in a pass."""
    from moed.kernels.fused_moe import QUANT_IN_KERNEL_MAX_TOKENS

    bk = 64 if dtype == "bf16" else 128  # FP8: one 128-block a K step; int4: one 128-group
    if M <= 64:
        tiles = [(16, bn, w) for bn in (32, 64, 128) for w in (4, 8)]
        stages, groups = (3, 4), (1,)
    elif M <= 256:
        tiles = [(bm, bn, 4) for bm in (16, 32, 64) for bn in (64, 128)]
        stages, groups = (3, 4), (1,)
    else:
        tiles = [(64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8), (128, 256, 8)]
        stages, groups = (3, 4), (1, 16)
    modes = [None]
    if dtype == "fp8_w8a8":
        modes = [True, False] if M <= QUANT_IN_KERNEL_MAX_TOKENS else [False]
    # int4 unpacks: the default (None), UNPACK_BF16 (decode tiles), A8 (int8 activations on the int8 tensor cores)
    unpacks: tuple = (None,)
    if dtype == INT4:
        unpacks = (None, "UNPACK_BF16", "A8") if M <= UNPACK_BF16_MAX_TOKENS else (None, "A8")
    out = gemv_candidates(M) if dtype == INT4 else []
    for (bm, bn, w), st, g, q, unpack in itertools.product(tiles, stages, groups, modes, unpacks):
        if unpack == "A8" and bm * bn > A8_TILE_ELEMENTS * 32 * w:
            continue
        c = {
            "BLOCK_SIZE_M": bm,
            "BLOCK_SIZE_N": bn,
            "BLOCK_SIZE_K": bk,
            "GROUP_SIZE_M": g,
            "num_warps": w,
            "num_stages": st,
        }
        if q is not None:
            c["A_QUANT_IN_GEMM"] = q
        if unpack:
            c[unpack] = True
        out.append(c)
        if unpack == "A8" and M <= UNPACK_BF16_MAX_TOKENS:
            # decode: K steps shared by several programs (a down tile walks only 16 K steps, ~3 programs an SM at M=1),
            # and two K steps' weights loaded a pass (PAIRS: more bytes in flight a warp)
            out += [{**c, "SPLIT_K": split} for split in A8_SPLITS]
            out += [{**c, "PAIRS": True, **({"SPLIT_K": split} if split > 1 else {})} for split in (1, *A8_SPLITS)]
            if bm <= 16:  # the 16-row tiles load each step's scales a step ahead; also timed with them in the step
                splits = ({"SPLIT_K": split} if split > 1 else {} for split in (1, *A8_SPLITS))
                out += [{**c, "AHEAD": False, **sk} for sk in splits]
    return out


A8_SPLITS = (2, 4)  # SPLIT_K offered with the int8 tiles at decode sizes
# int8 tiles hold an int32 and an fp32 accumulator an output (two of each in gate-up): past this many outputs a thread
# the sm_90 compile spills (64x128 at 4 warps, 64x256 and 128x128 at 8: tests/kernels/test_sm90_compile.py)
A8_TILE_ELEMENTS = 32

# int4 decode on the CUDA cores (fused_moe_int4's GEMV_ROWS): routes per pass, tile columns and K step such that the
# fp32 partial products (rows x BK/2 x BN, the down GEMM's; gate-up holds two of BN/2) stay within 32 registers a
# thread at 4 warps: the sm_90 compile spills from twice that (tests/kernels/test_sm90_compile.py); and programs per
# output tile (SPLIT_K), since a decode step's few hundred tiles alone keep too few loads in flight to fill HBM; split
# at one route a pass only (the H100 tuner chose it there at M = 2-8; two routes a pass with a split spill 8 bytes)
GEMV_MAX_TOKENS = 8
GEMV_PRODUCTS = 4096
GEMV_SPLITS = (1, 2, 4, 8)


def gemv_candidates(M: int) -> list[dict]:
    """The CUDA-core tiles for M tokens; at one route a pass each also with GEMV_WORDS (32-bit word reads: 14-24%
    fewer sm_90 instructions a weight than the byte unpack in the compiler's output)."""
    if M > GEMV_MAX_TOKENS:
        return []
    return [
        {
            "BLOCK_SIZE_M": 16,
            "BLOCK_SIZE_N": bn,
            "BLOCK_SIZE_K": bk,
            "GROUP_SIZE_M": 1,
            "num_warps": 4,
            "num_stages": 3,
            "GEMV_ROWS": rows,
            **({"SPLIT_K": split} if split > 1 else {}),
            **({"GEMV_WORDS": True} if words else {}),
        }
        for rows in (1, 2, 4)
        for bk in (64, 128)
        for bn in (32, 64, 128)
        for split in (GEMV_SPLITS if rows == 1 else (1,))
        for words in ((False, True) if rows == 1 else (False,))
        if rows <= max(M, 1) and rows * bk // 2 * bn <= GEMV_PRODUCTS
    ]


def down_candidates(M: int, dtype: str, bm: int) -> list[dict]:
    seen, out = set(), []
    for c in candidates(M, dtype):
        c = {**c, "BLOCK_SIZE_M": bm}
        key = tuple(c.values())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _in_gemm(cfg: dict) -> bool:
    return cfg.get("A_QUANT_IN_GEMM", True)


def _compile_key(cfg: dict) -> tuple:
    keys = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")
    # one binary for any split count
    return (
        *(cfg[k] for k in keys),
        cfg.get("GEMV_ROWS", 0),
        cfg.get("SPLIT_K", 1) > 1,
        cfg.get("UNPACK_BF16", False),
        cfg.get("GEMV_WORDS", False),
        cfg.get("A8", False),
        cfg.get("PAIRS", False),
    )


def _compile_worker(task: tuple) -> list[tuple[str, tuple, bool, str]]:
    """Run in a fresh process: launch each (kernel, config) once on tiny inputs of the real N and K, which
    puts the compiled binary into Triton's on-disk cache for the parent. Returns (kernel, key, ok, error)."""
    from moed.kernels.moe_align import moe_align_block_size

    dtype, N, K, items = task
    torch.cuda.init()
    experts = make_experts(1, N, K, dtype, "cuda")
    results = []
    for kernel, cfg in items:
        quant_in_kernel = _in_gemm(cfg)
        M, top_k = 4, 2
        x = torch.randn((M, K), device="cuda").bfloat16()
        ids = torch.zeros((M, top_k), dtype=torch.int32, device="cuda")
        e2s = torch.zeros(1, dtype=torch.int32, device="cuda")
        align = moe_align_block_size(ids, e2s, cfg["BLOCK_SIZE_M"])
        h = torch.zeros((M * top_k, N), dtype=torch.bfloat16, device="cuda")
        try:
            if kernel == "gate_up":
                launch_up(dtype, x, experts, h, align, top_k, cfg)
            else:
                part = torch.empty((M * top_k, K), dtype=torch.bfloat16, device="cuda")
                w = torch.ones((M, top_k), device="cuda")
                launch_down(dtype, h, experts, part, w, align, cfg)
            torch.cuda.synchronize()
            results.append((kernel, _compile_key(cfg), quant_in_kernel, True, ""))
        except Exception as e:  # out of shared memory / registers: the candidate is unusable here
            results.append((kernel, _compile_key(cfg), quant_in_kernel, False, f"{type(e).__name__}: {e}"[:200]))
    return results


def precompile(dtype: str, N: int, K: int, items: list[tuple[str, dict]], workers: int) -> set[tuple]:
    """Compile (kernel, config) items in `workers` processes; return the (kernel, key, in-GEMM) that failed."""
    uniq = {}
    for kernel, cfg in items:
        uniq[(kernel, _compile_key(cfg), _in_gemm(cfg))] = (kernel, cfg)
    todo = list(uniq.values())
    if not todo:
        return set()
    workers = max(1, min(workers, len(todo)))
    chunks = [todo[i::workers] for i in range(workers)]
    failed = set()
    t0 = time.time()
    if workers == 1:
        results = [_compile_worker((dtype, N, K, chunks[0]))]
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_compile_worker, [(dtype, N, K, c) for c in chunks]))
    for res in results:
        for kernel, key, q, ok, err in res:
            if not ok:
                failed.add((kernel, key, q))
                print(f"  skip {kernel} {key} quant_in_kernel={q}: {err}", flush=True)
    print(
        f"  compiled {len(todo)} kernel variants in {time.time() - t0:.1f}s with {workers} processes "
        f"({len(failed)} unusable)",
        flush=True,
    )
    return failed


def _reference_rows(hidden, experts, ids, weights, dtype: str, tokens: int, h_in=None):
    """Torch h rows and down rows for the first `tokens` tokens (all their assignments), fp32."""
    from moed.formats.fp8 import dequantize_block_fp8
    from moed.formats.int4 import dequantize_int4
    from moed.kernels.act_quant import dequantize_groups_fp8, per_token_group_quant_fp8_reference

    w13, w2, s13, s2 = experts
    fp8 = dtype == "fp8_w8a8"
    N = (w13.qweight if dtype == INT4 else w13).shape[1] // 2
    top_k = ids.shape[1]
    h_rows, y_rows = [], []
    for f in range(tokens * top_k):
        t, e = f // top_k, int(ids.view(-1)[f])
        if fp8:
            wgu = dequantize_block_fp8(w13[e], s13[e], 128, 128)
            wd = dequantize_block_fp8(w2[e], s2[e], 128, 128)
            x = dequantize_groups_fp8(*per_token_group_quant_fp8_reference(hidden[t : t + 1]))
        elif dtype == INT4:
            wgu, wd = dequantize_int4(w13.slot(e)), dequantize_int4(w2.slot(e))
            x = hidden[t : t + 1].float()
        else:
            wgu, wd, x = w13[e].float(), w2[e].float(), hidden[t : t + 1].float()
        h = (F.silu(x @ wgu[:N].T) * (x @ wgu[N:].T)).bfloat16()
        h_rows.append(h.float())
        hh = h_in[f : f + 1] if h_in is not None else h
        a = dequantize_groups_fp8(*per_token_group_quant_fp8_reference(hh)) if fp8 else hh.float()
        y_rows.append((a @ wd.T) * weights.view(-1)[f])
    return torch.cat(h_rows), torch.cat(y_rows)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def tune_one(
    dtype: str,
    E: int,
    N: int,
    K: int,
    topk: int,
    M: int,
    experts,
    failed: set,
    seed: int,
    tol: float = 3e-2,
    device: str = "cuda",
) -> tuple[dict, dict, float, float]:
    """Best (up config, down config, up ms, down ms) for M tokens."""
    from moed.kernels.moe_align import moe_align_block_size

    gen = torch.Generator(device=device).manual_seed(seed + M)
    top_k = topk + (1 if E == 257 else 0)
    T = M * top_k
    rot = 8 if M <= 64 else 4 if M <= 1024 else 2
    sets = []
    for _ in range(rot):
        ids, wts = make_routing(M, E, topk, device, gen)
        x = torch.randn((M, K), device=device, generator=gen).bfloat16()
        sets.append((x, ids, wts))
    e2s = torch.arange(E, dtype=torch.int32, device=device)
    check_tokens = min(M, 2)
    ref_h, _ = _reference_rows(sets[0][0], experts, sets[0][1], sets[0][2], dtype, check_tokens)

    def run_up(cfg):
        aligns = [moe_align_block_size(ids, e2s, cfg["BLOCK_SIZE_M"]) for _, ids, _ in sets]
        hs = [torch.empty((T, N), dtype=torch.bfloat16, device=device) for _ in sets]
        launches = [lambda i=i: launch_up(dtype, sets[i][0], experts, hs[i], aligns[i], top_k, cfg) for i in range(rot)]
        launches[0]()
        err = _rel(hs[0][: check_tokens * top_k], ref_h)
        if not err < tol:
            return None, err, hs, aligns
        return time_graph(launches), err, hs, aligns

    best_up, best_t, up_out = None, float("inf"), None
    up_kinds: dict[str, float] = {}
    for cfg in candidates(M, dtype):
        if ("gate_up", _compile_key(cfg), _in_gemm(cfg)) in failed:
            continue
        ms, err, hs, aligns = run_up(cfg)
        if ms is None:
            print(f"    gate_up {cfg} rejected: rel err {err:.2e} vs torch", flush=True)
            continue
        up_kinds[_kind(cfg)] = min(ms, up_kinds.get(_kind(cfg), float("inf")))
        if ms < best_t:
            best_up, best_t, up_out = cfg, ms, (hs, aligns)
    if best_up is None:
        raise RuntimeError(f"tune-moe: no gate_up candidate passed the check at M={M} ({dtype}, E={E}, N={N})")
    hs, aligns = up_out
    _, ref_y = _reference_rows(sets[0][0], experts, sets[0][1], sets[0][2], dtype, check_tokens, h_in=hs[0])
    best_down, best_dt = None, float("inf")
    down_kinds: dict[str, float] = {}
    for cfg in down_candidates(M, dtype, best_up["BLOCK_SIZE_M"]):
        if ("down", _compile_key(cfg), _in_gemm(cfg)) in failed:
            continue
        parts = [torch.empty((T, K), dtype=torch.bfloat16, device=device) for _ in sets]
        launches = [
            lambda i=i, cfg=cfg, parts=parts: launch_down(dtype, hs[i], experts, parts[i], sets[i][2], aligns[i], cfg)
            for i in range(rot)
        ]
        launches[0]()
        err = _rel(parts[0][: check_tokens * top_k], ref_y)
        if not err < tol:
            print(f"    down {cfg} rejected: rel err {err:.2e} vs torch", flush=True)
            continue
        ms = time_graph(launches)
        down_kinds[_kind(cfg)] = min(ms, down_kinds.get(_kind(cfg), float("inf")))
        if ms < best_dt:
            best_down, best_dt = cfg, ms
    if best_down is None:
        raise RuntimeError(f"tune-moe: no down candidate passed the check at M={M} ({dtype}, E={E}, N={N})")
    for name, kinds in (("gate_up", up_kinds), ("down", down_kinds)):
        if len(kinds) > 1:  # what each option is worth at this M, not only which won
            best = sorted(kinds.items(), key=lambda kv: kv[1])
            print(f"    {name} best of each kind: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in best), flush=True)
    return best_up, best_down, best_t, best_dt


def _kind(cfg: dict) -> str:
    """A candidate's kind for the tuner's per-kind summary: its tile family and the options that change its loop."""
    family = "gemv" if cfg.get("GEMV_ROWS") else "a8" if cfg.get("A8") else "bf16" if cfg.get("UNPACK_BF16") else "mma"
    options = (
        ("quant-in-gemm", cfg.get("A_QUANT_IN_GEMM")),
        ("words", cfg.get("GEMV_WORDS")),
        ("pairs", cfg.get("PAIRS")),
        ("in-step", cfg.get("AHEAD") is False),
        ("split", cfg.get("SPLIT_K", 1) > 1),
    )
    return family + "".join(f" {name}" for name, on in options if on)


def main(argv: list[str] | None = None) -> int:
    from moed.moe_configs import lookup

    p = argparse.ArgumentParser(prog="moed tune-moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--E", type=int, nargs="+", default=[256], help="expert ids per layer (257: + fused shared)")
    p.add_argument("--N", type=int, nargs="+", default=[2048], help="per-shard intermediate size (w2.shape[2])")
    p.add_argument("--K", type=int, default=6144, help="hidden size")
    p.add_argument("--topk", type=int, default=8, help="routed experts per token")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["fp8_w8a8"])
    p.add_argument("--block", default="128,128", help="FP8 weight block (n,k); only 128,128 is supported")
    p.add_argument("--batch-sizes", default=",".join(map(str, lookup.DEFAULT_BATCH_SIZES)))
    p.add_argument("--out-dir", default=None, help="default: moe_configs/triton_<installed Triton>/")
    p.add_argument("--resume", action="store_true", help="continue from <name>.json.partial files")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; stop starting new sizes after this")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-log", metavar="LOG", help="write the tables a saved tuner log printed (no GPU needed)")
    args = p.parse_args(argv)
    if args.from_log:
        return _write_from_log(Path(args.from_log), args)

    if not torch.cuda.is_available():
        print("tune-moe: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        block = [int(v) for v in args.block.split(",")]
        batch_sizes = sorted({int(v) for v in args.batch_sizes.split(",") if v.strip()})
    except ValueError:
        print(
            f"tune-moe: --block {args.block!r} / --batch-sizes {args.batch_sizes!r} must be comma-separated ints",
            file=sys.stderr,
        )
        return 2
    if block != [128, 128]:
        print(f"tune-moe: --block {args.block} unsupported; the kernels take FP8 blocks of 128,128", file=sys.stderr)
        return 2
    if not batch_sizes or batch_sizes[0] < 1:
        print(f"tune-moe: --batch-sizes {args.batch_sizes!r} must be positive ints", file=sys.stderr)
        return 2
    for E in args.E:
        if E < args.topk + (1 if E == 257 else 0):
            print(f"tune-moe: --E {E} is smaller than --topk {args.topk}", file=sys.stderr)
            return 2
    import triton

    out_dir = Path(args.out_dir) if args.out_dir else lookup.PACKAGE_DIR / lookup.triton_dir_name(triton.__version__)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    t_start = time.time()
    print(
        f"tune-moe on {device_name}, Triton {triton.__version__}, torch {torch.__version__}; writing {out_dir}",
        flush=True,
    )
    jobs = [(d, E, N) for d in args.dtype for E in args.E for N in args.N]
    unfinished = []
    for dtype, E, N in jobs:
        dname, bshape = config_name(dtype)
        up_name = lookup.file_name(E, N, device_name, dname, bshape)
        down_name = lookup.file_name(E, N, device_name, dname, bshape, down=True)
        partial_path = out_dir / (up_name + ".partial")  # not *.json: lookups and table checks never see it
        done: dict = {}
        if args.resume and partial_path.is_file():
            done = json.loads(partial_path.read_text())
        todo = [m for m in batch_sizes if str(m) not in done]
        print(f"[{dtype} E={E} N={N} K={args.K}] {len(todo)} of {len(batch_sizes)} batch sizes to tune", flush=True)
        if todo:
            items = []
            for m in todo:
                items += [("gate_up", c) for c in candidates(m, dtype)]
                items += [
                    ("down", c)
                    for bm in {cc["BLOCK_SIZE_M"] for cc in candidates(m, dtype)}
                    for c in down_candidates(m, dtype, bm)
                ]
            failed = precompile(dtype, N, args.K, items, args.workers)
            experts = make_experts(E, N, args.K, dtype, "cuda", args.seed)
        for m in todo:
            if args.time_budget and time.time() - t_start > args.time_budget:
                break
            t0 = time.time()
            up, down, up_ms, down_ms = tune_one(dtype, E, N, args.K, args.topk, m, experts, failed, args.seed)
            done[str(m)] = {"up": up, "down": down, "up_ms": up_ms, "down_ms": down_ms}
            partial_path.write_text(json.dumps(done, indent=1))
            print(
                f"  M={m:5d}: gate_up {up_ms * 1e3:8.1f} us {_short(up)} | down {down_ms * 1e3:8.1f} us "
                f"{_short(down)}  ({time.time() - t0:.1f}s)",
                flush=True,
            )
        if todo:
            del experts
            torch.cuda.empty_cache()
        if all(str(m) in done for m in batch_sizes):
            order = sorted(done, key=int)
            (out_dir / up_name).write_text(_table_json({m: done[m]["up"] for m in order}))
            (out_dir / down_name).write_text(_table_json({m: done[m]["down"] for m in order}))
            partial_path.unlink(missing_ok=True)
            print(f"  wrote {out_dir / up_name} and its _down twin", flush=True)
        else:
            unfinished.append(up_name)
    if unfinished:
        print(f"tune-moe: time budget reached; unfinished (rerun with --resume): {unfinished}", flush=True)
        return 3
    return 0


def _write_from_log(path: Path, args: argparse.Namespace) -> int:
    from moed.moe_configs import lookup

    try:
        text = path.read_text()
    except OSError as e:
        print(f"tune-moe: cannot read --from-log {path}: {e}", file=sys.stderr)
        return 2
    device = re.search(r"^tune-moe on (.+?), Triton (\S+?),", text, re.M)
    if device is None:
        print(
            f"tune-moe: {path} is not a tune-moe log (no 'tune-moe on <device>, Triton <version>' line)",
            file=sys.stderr,
        )
        return 2
    device_name, triton_version = device.group(1), device.group(2)
    out_dir = Path(args.out_dir) if args.out_dir else lookup.PACKAGE_DIR / lookup.triton_dir_name(triton_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_sizes = {int(v) for v in args.batch_sizes.split(",") if v.strip()}
    written = 0
    for (dtype, E, N, _K), done in tables_from_log(text).items():
        missing = sorted(batch_sizes - {int(m) for m in done})
        if missing:
            print(f"tune-moe: {path}: {dtype} E={E} N={N} lacks M={missing}; not written", file=sys.stderr)
            continue
        dname, bshape = config_name(dtype)
        order = sorted(done, key=int)
        for down in (False, True):
            name = lookup.file_name(E, N, device_name, dname, bshape, down=down)
            (out_dir / name).write_text(_table_json({m: done[m]["down" if down else "up"] for m in order}))
        written += 1
        print(f"  wrote {out_dir / lookup.file_name(E, N, device_name, dname, bshape)} and its _down twin")
    return 0 if written else 3


def _short(cfg: dict) -> str:
    return (
        f"M{cfg['BLOCK_SIZE_M']} N{cfg['BLOCK_SIZE_N']} K{cfg['BLOCK_SIZE_K']} G{cfg['GROUP_SIZE_M']} "
        f"w{cfg['num_warps']} s{cfg['num_stages']}"
        + {True: " qGEMM", False: " qPass", None: ""}[cfg.get("A_QUANT_IN_GEMM")]
        + (f" gemv{cfg['GEMV_ROWS']}" if cfg.get("GEMV_ROWS") else "")
        + (f" split{cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else "")
        + (" bf16unpack" if cfg.get("UNPACK_BF16") else "")
        + (" words" if cfg.get("GEMV_WORDS") else "")
        + (" a8" if cfg.get("A8") else "")
        + (" pairs" if cfg.get("PAIRS") else "")
        + (" instep" if cfg.get("AHEAD") is False else "")
    )


_SHORT = re.compile(
    r"M(\d+) N(\d+) K(\d+) G(\d+) w(\d+) s(\d+)( qGEMM| qPass)?( gemv(\d+))?( split(\d+))?( bf16unpack)?( words)?( a8)?"
    r"( pairs)?( instep)?"
)
_HEADER = re.compile(r"^\[(\w+) E=(\d+) N=(\d+) K=(\d+)\]")
_ROW = re.compile(r"^\s+M=\s*(\d+): gate_up\s+[\d.]+ us (.+?) \| down\s+[\d.]+ us (.+?)\s+\(")


def _parse_short(text: str) -> dict:
    m = _SHORT.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a tuner config: {text!r}")
    keys = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
    cfg: dict = dict(zip(keys, map(int, m.groups()[:6])))
    if m.group(7):
        cfg["A_QUANT_IN_GEMM"] = m.group(7) == " qGEMM"
    if m.group(9):
        cfg["GEMV_ROWS"] = int(m.group(9))
    if m.group(11):
        cfg["SPLIT_K"] = int(m.group(11))
    if m.group(12):
        cfg["UNPACK_BF16"] = True
    if m.group(13):
        cfg["GEMV_WORDS"] = True
    if m.group(14):
        cfg["A8"] = True
    if m.group(15):
        cfg["PAIRS"] = True
    if m.group(16):
        cfg["AHEAD"] = False
    return cfg


def tables_from_log(text: str) -> dict[tuple[str, int, int, int], dict[str, dict]]:
    """The per-M winners a tuner run printed, keyed (dtype, E, N, K): rebuilds the tables when a run's output
    folder was lost but its log was kept (the log line carries every field the table stores)."""
    out: dict[tuple[str, int, int, int], dict[str, dict]] = {}
    job = None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            job = (h.group(1), int(h.group(2)), int(h.group(3)), int(h.group(4)))
            out.setdefault(job, {})
            continue
        r = _ROW.match(line)
        if r and job is not None:
            out[job][r.group(1)] = {"up": _parse_short(r.group(2)), "down": _parse_short(r.group(3))}
    return out


def _table_json(table: dict[str, dict]) -> str:
    lines = [f'  "{m}": {json.dumps(cfg)}' for m, cfg in table.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    raise SystemExit(main())
