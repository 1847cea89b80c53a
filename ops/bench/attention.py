"""Attention benchmark: DSA decode (indexer scores + top-k + sparse MLA) and prefill at GLM-5.1 dims.

Ceilings measured first, in this run: device copy bandwidth (bytes read + written, 2 GiB fp32), a read-only
pass (torch sum), and the bf16 GEMM rate (8192^3).
Decode, for 64 heads (TP1) and 8 heads (a TP8 shard, padded to the kernel's 16-row head tile in-kernel), at
batch {1, 16, 64} x context {4k, 32k, 128k} where memory allows; bf16 latent cache (1152 B/token) and FP8
index keys (132 B/token), page size 64, pages shuffled. Per point: the time of each kernel and of the
chain, each a CUDA-graph replay timed by `triton.testing.do_bench` (median, L2 flushed between reps); the
bytes that must be read, index K of every position + latent rows of the top-2048; GB/s and the ratio to
the copy bandwidth; the indexer's (scores + top-k) share of the chain.
Prefill: 4096 new tokens on an empty and on a 28k-token context (indexer and sparse MLA TFLOP/s, ratio to the
GEMM rate), and the dense short-context MHA path at 2048 tokens.
Tile configs: a sweep first times the candidates below (scores at batch 16 x 32k, sparse MLA summed over
batch 16 and 64, top-k programs per SM for the record) and the decode rows use its picks; every decode point
spot-checks its first and last sequence against torch.
Run: `python -m moed.ops.bench.attention [--quick] [--no-sweep] [--no-fp8] [--no-prefill] [--out DIR]`
(needs a CUDA device).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

from moed.attention.dense import mha_prefill
from moed.attention.paged_kv import PagedKVPool
from moed.kernels import index_k_gather, indexer, sparse_mla
from moed.kernels.indexer import ScoresConfig, indexer_scores, topk_from_scores
from moed.kernels.sparse_mla import MLAConfig
from moed.model.attention_interface import MLAInputs, PagedStep, SequenceStep
from moed.model.checkpoint import make_config
from moed.model.config import GlmMoeDsaConfig

PAGE = 64
DEVICE = "cuda"


def time_graph(fn, rep_ms: int = 40) -> float:
    """Median ms of one replay of fn captured in a CUDA graph (compiled and warmed up first)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")


def measure_ceilings() -> dict[str, float]:
    n = 1 << 29
    bufs = [torch.empty(n, dtype=torch.float32, device=DEVICE).normal_(), torch.empty(n, device=DEVICE)]
    total = torch.empty((), device=DEVICE)
    copy = 2 * 4 * n / time_graph(lambda: bufs[1].copy_(bufs[0])) / 1e6
    read = 4 * n / time_graph(lambda: torch.sum(bufs[0], dim=0, out=total)) / 1e6
    bufs.clear()
    a = torch.randn(8192, 8192, device=DEVICE).bfloat16()
    b = torch.randn(8192, 8192, device=DEVICE).bfloat16()
    out = torch.empty_like(a)
    tflops = 2 * 8192**3 / time_graph(lambda: torch.matmul(a, b, out=out)) / 1e9
    return {"copy_GBps": copy, "read_GBps": read, "bf16_TFLOPs": tflops}


@dataclasses.dataclass
class Point:
    """One sequence batch in a fresh one-layer pool: every sequence has `context` positions cached."""

    pool: PagedKVPool
    paged: PagedStep
    positions: torch.Tensor


def make_point(cfg: GlmMoeDsaConfig, batch: int, context: int, latent_dtype: str, new: int = 1) -> Point:
    pages_per_seq = triton.cdiv(context, PAGE)
    pool = PagedKVPool(cfg, batch * pages_per_seq + 1, PAGE, latent_dtype, "fp8", DEVICE, layers=[0])
    _fill_random(pool)
    table = (torch.randperm(pool.num_pages - 1, device=DEVICE) + 1)[: batch * pages_per_seq]
    table = table.view(batch, pages_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    start = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=DEVICE)
    token_seq = torch.arange(batch, dtype=torch.int32, device=DEVICE).repeat_interleave(new)
    positions = torch.arange(context - new, context, device=DEVICE).repeat(batch)
    paged = PagedStep(table, lens, start, token_seq, max_context=context, max_new=new)
    return Point(pool, paged, positions)


def _fill_random(pool: PagedKVPool) -> None:
    """Random finite contents (e4m3 bytes without the NaN codes, bf16 normals, positive scales)."""
    g = pool.latent
    if pool.latent_dtype == "fp8":
        g.copy_(_fp8_bytes(g.shape))
        lv = pool.latent_view(0)
        lv.rope.normal_()
        lv.scale.uniform_(1e-3, 2e-3)
    else:
        g.normal_()
    pool.index_k.copy_(_fp8_bytes(pool.index_k.shape))
    pool.index_view(0).scale.uniform_(1e-3, 2e-3)


def _fp8_bytes(shape) -> torch.Tensor:
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE)
    return torch.where((x & 0x7F) == 0x7F, x ^ 1, x)  # 0x7F / 0xFF are NaN in e4m3fn


def decode_fns(
    cfg: GlmMoeDsaConfig,
    pt: Point,
    heads: int,
    scores_cfg: ScoresConfig,
    mla_cfg: MLAConfig,
    topk_chunks: int | None = None,
):
    B, K = pt.paged.page_table.shape[0], cfg.index_topk
    HI, D, C, R = cfg.index_n_heads, cfg.index_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = torch.randn(B, HI, D, device=DEVICE).bfloat16()
    w = torch.randn(B, HI, device=DEVICE) * HI**-0.5
    q_lat = (torch.randn(B, heads, C, device=DEVICE) * C**-0.5).bfloat16()
    q_rope = (torch.randn(B, heads, R, device=DEVICE) * R**-0.5).bfloat16()
    width = triton.cdiv(pt.paged.max_context, 16) * 16
    scores = torch.empty(B, width, device=DEVICE)
    scratch = torch.empty(B, width, dtype=torch.int32, device=DEVICE)
    topk = torch.empty(B, K, dtype=torch.int32, device=DEVICE)
    o_lat = torch.empty(B, heads, C, dtype=torch.bfloat16, device=DEVICE)
    iv, lv = pt.pool.index_view(0), pt.pool.latent_view(0)

    def f_scores():
        indexer_scores(
            q,
            w,
            iv.k,
            iv.scale,
            pt.paged.page_table,
            pt.paged.query_start,
            pt.positions,
            1,
            pt.paged.max_context,
            scores,
            config=scores_cfg,
        )

    def f_topk():
        topk_from_scores(scores, pt.positions, K, topk, scratch, chunks=topk_chunks)

    def f_mla():
        sparse_mla.sparse_mla(
            q_lat,
            q_rope,
            lv.nope,
            lv.rope,
            lv.scale,
            pt.paged.page_table,
            pt.paged.token_seq,
            pt.positions,
            topk,
            cfg.softmax_scale,
            config=mla_cfg,
            out=o_lat,
        )

    def f_all():
        f_scores()
        f_topk()
        f_mla()

    return {
        "scores": f_scores,
        "topk": f_topk,
        "mla": f_mla,
        "chain": f_all,
        "vars": {"q": q, "w": w, "q_lat": q_lat, "q_rope": q_rope, "topk": topk, "o_lat": o_lat},
    }


def check_decode(cfg, pt: Point, fns, heads: int) -> dict:
    """Spot check of the timed kernels on this data: the first and last rows' top-k and sparse MLA vs torch."""
    fns["chain"]()
    v = fns["vars"]
    iv, lv = pt.pool.index_view(0), pt.pool.latent_view(0)
    topk_ok, err = True, 0.0
    for b in sorted({0, pt.paged.page_table.shape[0] - 1}):
        L = int(pt.paged.seq_lens[b])
        pos = torch.arange(L, device=pt.positions.device)
        page = pt.paged.page_table[b, pos // PAGE].long()
        keys = iv.k[page, pos % PAGE].float() * iv.scale[page, pos % PAGE][:, None]
        scores = indexer.indexer_scores_reference(v["q"][b : b + 1], v["w"][b : b + 1], keys)[0]
        want = scores.topk(min(L, cfg.index_topk)).values
        sel = v["topk"][b].long()
        got = scores[sel[sel >= 0]].sort(descending=True).values
        topk_ok &= got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        lat = lv.nope[page, pos % PAGE].float()
        if lv.scale is not None:
            lat = lat * lv.scale[page, pos % PAGE][:, None]
        ref = sparse_mla.sparse_mla_reference(
            v["q_lat"][b : b + 1],
            v["q_rope"][b : b + 1],
            lat,
            lv.rope[page, pos % PAGE].float(),
            pt.positions[b : b + 1],
            v["topk"][b : b + 1],
            cfg.softmax_scale,
        )
        err = max(err, ((v["o_lat"][b : b + 1].float() - ref).norm() / ref.norm()).item())
    return {"topk_ok": bool(topk_ok), "mla_rel_err": err}


def bench_decode(cfg, ceil, batches, contexts, heads_list, latent_dtype, scores_cfg, mla_cfgs, log) -> list[dict]:
    rows = []
    lat_row = PagedKVPool.bytes_per_token(cfg, latent_dtype, "fp8")[0]
    for context in contexts:
        for batch in batches:
            need = batch * context * (lat_row + 132) * 1.1
            if need > 0.8 * torch.cuda.mem_get_info()[1]:
                log(f"skip batch {batch} x context {context}: {need / 1e9:.1f} GB of cache")
                continue
            pt = make_point(cfg, batch, context, latent_dtype)
            for heads in heads_list:
                fns = decode_fns(cfg, pt, heads, scores_cfg, mla_cfgs[heads])
                check = check_decode(cfg, pt, fns, heads)
                ms = {name: time_graph(fn, 25) for name, fn in fns.items() if name != "vars"}
                idx_bytes = batch * context * 132
                lat_bytes = batch * min(context, cfg.index_topk) * lat_row
                total = idx_bytes + lat_bytes
                row = {
                    "heads": heads,
                    "batch": batch,
                    "context": context,
                    "latent": latent_dtype,
                    **{f"{k}_us": v * 1e3 for k, v in ms.items()},
                    "index_bytes": idx_bytes,
                    "latent_bytes": lat_bytes,
                    "score_buffer_bytes": batch * context * 4,
                    "chain_GBps": total / ms["chain"] / 1e6,
                    "chain_vs_copy": total / ms["chain"] / 1e6 / ceil["copy_GBps"],
                    "scores_vs_copy": idx_bytes / ms["scores"] / 1e6 / ceil["copy_GBps"],
                    "mla_vs_copy": lat_bytes / ms["mla"] / 1e6 / ceil["copy_GBps"],
                    "indexer_share": (ms["scores"] + ms["topk"]) / ms["chain"],
                    **check,
                }
                rows.append(row)
                log(
                    f"decode H={heads:2d} B={batch:2d} ctx={context // 1024:3d}k: chain {row['chain_us']:8.1f} us "
                    f"({row['chain_vs_copy']:.0%} of copy BW over {total / 1e6:.1f} MB) | scores "
                    f"{row['scores_us']:7.1f} us ({row['scores_vs_copy']:.0%}) topk {row['topk_us']:6.1f} us | mla "
                    f"{row['mla_us']:6.1f} us ({row['mla_vs_copy']:.0%}) | indexer share {row['indexer_share']:.0%}"
                    + (f" | check: top-k {check['topk_ok']}, mla err {check['mla_rel_err']:.1e}" if check else "")
                )
            del pt
            torch.cuda.empty_cache()
    return rows


SCORES_CANDIDATES = [
    ScoresConfig(64, 4, 5, programs_per_sm=8),
    ScoresConfig(64, 4, 3, programs_per_sm=4),
    ScoresConfig(64, 4, 5, programs_per_sm=16),
]
MLA_CANDIDATES = {
    64: [
        MLAConfig(64, 32, 8, 4),
        MLAConfig(64, 32, 8, 4, programs_per_sm=4),
        MLAConfig(64, 32, 8, 2),
        MLAConfig(32, 64, 8, 2),
    ],
    8: [
        MLAConfig(16, 32, 4, 2),
        MLAConfig(16, 32, 4, 2, programs_per_sm=4),
        MLAConfig(16, 16, 4, 2),
        MLAConfig(16, 16, 4, 2, programs_per_sm=4),
        MLAConfig(16, 64, 8, 3, swap=True),
    ],
}
TOPK_PROGRAMS_PER_SM = (1, 2, 4, 8)


def sweep(cfg, ceil, log) -> tuple[ScoresConfig, dict[int, MLAConfig], list[dict]]:
    """Pick tile configs by measurement: scores at batch 16 x 32k; sparse MLA by its summed time at batch 16 and 64
    (4k contexts); the top-k's programs per SM are timed for the record (the default stays unless changed)."""
    out = []

    def timed(name, fn, config) -> float:
        try:
            ms = time_graph(fn, 25)
        except Exception as e:  # a config the device cannot run (shared memory, registers) is skipped
            log(f"sweep {name} {config}: FAILED {type(e).__name__}: {str(e)[:200]}")
            return float("inf")
        out.append(
            {
                "kernel": name,
                "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
                "us": ms * 1e3,
            }
        )
        log(f"sweep {name} {config}: {ms * 1e3:.1f} us")
        return ms

    pt = make_point(cfg, 16, 32768, "bf16")
    best_s = min(
        SCORES_CANDIDATES,
        key=lambda c: timed("scores B=16 32k", decode_fns(cfg, pt, 64, c, MLAConfig(32, 32, 8, 2))["scores"], c),
    )
    fns = decode_fns(cfg, pt, 64, best_s, MLAConfig(32, 32, 8, 2))
    fns["scores"]()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for pps in TOPK_PROGRAMS_PER_SM:
        chunks = triton.cdiv(pps * sms, 16)
        timed(
            "topk B=16 32k",
            decode_fns(cfg, pt, 64, best_s, MLAConfig(), topk_chunks=chunks)["topk"],
            {"programs_per_sm": pps, "chunks": chunks},
        )
    del pt, fns
    pt1 = make_point(cfg, 1, 131072, "bf16")
    for pps in TOPK_PROGRAMS_PER_SM:
        chunks = pps * sms
        f = decode_fns(cfg, pt1, 64, best_s, MLAConfig(), topk_chunks=chunks)
        f["scores"]()
        timed("topk B=1 128k", f["topk"], {"programs_per_sm": pps, "chunks": chunks})
    del pt1
    torch.cuda.empty_cache()
    points = [make_point(cfg, b, 4096, "bf16") for b in (16, 64)]
    best_m = {}
    for heads, configs in MLA_CANDIDATES.items():
        best_ms = float("inf")
        for c in configs:
            total = 0.0
            for b, pt in zip((16, 64), points):
                fns = decode_fns(cfg, pt, heads, best_s, c)
                fns["scores"]()
                fns["topk"]()
                total += timed(f"mla H={heads} B={b}", fns["mla"], c)
            if total < best_ms:
                best_m[heads], best_ms = c, total
    del points
    torch.cuda.empty_cache()
    return best_s, best_m, out


def bench_prefill(cfg, ceil, mla_cfg: MLAConfig, log, sizes=((0, 4096), (28672, 4096))) -> list[dict]:
    rows = []
    H, HI, D, C, R, K = (
        cfg.num_attention_heads,
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.kv_lora_rank,
        cfg.qk_rope_head_dim,
        cfg.index_topk,
    )
    for cached, new in sizes:
        pt = make_point(cfg, 1, cached + new, "bf16", new=new)
        q = torch.randn(new, HI, D, device=DEVICE).bfloat16()
        w = torch.randn(new, HI, device=DEVICE) * HI**-0.5
        topk = torch.empty(new, K, dtype=torch.int32, device=DEVICE)
        q_lat = (torch.randn(new, H, C, device=DEVICE) * C**-0.5).bfloat16()
        q_rope = (torch.randn(new, H, R, device=DEVICE) * R**-0.5).bfloat16()
        iv, lv = pt.pool.index_view(0), pt.pool.latent_view(0)
        ix_args = (q, w, iv.k, iv.scale, pt.paged.page_table, pt.paged.query_start, pt.positions, new, cached + new, K)
        mla_args = (
            q_lat,
            q_rope,
            lv.nope,
            lv.rope,
            lv.scale,
            pt.paged.page_table,
            pt.paged.token_seq,
            pt.positions,
            topk,
            cfg.softmax_scale,
        )
        ms_ix = time_graph(lambda a=ix_args, o=topk: indexer.indexer_topk(*a, out=o), 200)
        ms_mla = time_graph(lambda a=mla_args: sparse_mla.sparse_mla(*a, config=mla_cfg), 200)
        n = torch.arange(cached + 1, cached + new + 1, dtype=torch.float64)
        fl_ix = float((n * HI * D * 2).sum())
        fl_mla = float((n.clamp(max=K) * H * (2 * (C + R) + 2 * C)).sum())
        row = {
            "kind": "sparse prefill",
            "cached": cached,
            "new": new,
            "indexer_ms": ms_ix,
            "mla_ms": ms_mla,
            "indexer_TFLOPs": fl_ix / ms_ix / 1e9,
            "mla_TFLOPs": fl_mla / ms_mla / 1e9,
            "mla_vs_gemm": fl_mla / ms_mla / 1e9 / ceil["bf16_TFLOPs"],
            "indexer_share": ms_ix / (ms_ix + ms_mla),
        }
        rows.append(row)
        log(
            f"prefill {new} new on {cached} cached: indexer {ms_ix:.2f} ms ({row['indexer_TFLOPs']:.0f} TFLOP/s), "
            f"sparse MLA {ms_mla:.2f} ms ({row['mla_TFLOPs']:.0f} TFLOP/s, {row['mla_vs_gemm']:.0%} of GEMM), "
            f"indexer share {row['indexer_share']:.0%}"
        )
        del pt
    # The dense short-context path: one-shot MHA over 2048 tokens (gather, kv_b expansion, fused attention).
    new = cfg.index_topk
    pt = make_point(cfg, 1, new, "bf16", new=new)
    dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
    mla = MLAInputs(
        (torch.randn(new, H, dn, device=DEVICE) * 0.1).bfloat16(),
        (torch.randn(new, H, R, device=DEVICE) * 0.1).bfloat16(),
        None,
        None,
    )  # type: ignore[arg-type]
    kv_b = (torch.randn(H * (dn + dv), C, device=DEVICE) * C**-0.5).bfloat16()
    seqs = [SequenceStep(0, new, None)]
    f = lambda: mha_prefill(cfg, kv_b, mla, pt.pool.latent_view(0), pt.paged, seqs)  # noqa: E731
    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 10 * 1e3
    fl = 2 * new * C * H * (dn + dv) + new * (new + 1) / 2 * H * 2 * ((dn + R) + dv)
    rows.append(
        {
            "kind": "dense MHA prefill",
            "cached": 0,
            "new": new,
            "ms": ms,
            "TFLOPs": fl / ms / 1e9,
            "vs_gemm": fl / ms / 1e9 / ceil["bf16_TFLOPs"],
        }
    )
    log(f"dense MHA prefill {new} tokens: {ms:.2f} ms ({fl / ms / 1e9:.0f} TFLOP/s; eager, host loop included)")
    return rows


def kernel_resources() -> dict[str, list]:
    """Registers / spills of every compiled variant (occupancy evidence)."""
    out = {}
    for name, fn in [
        ("scores", indexer._scores_kernel),
        ("topk hist", indexer._topk_hist_kernel),
        ("topk select", indexer._topk_select_kernel),
        ("mla", sparse_mla._sparse_mla_kernel),
        ("combine", sparse_mla._combine_kernel),
        ("gather", index_k_gather._gather_kernel),
    ]:
        found = []
        for cache in getattr(fn, "device_caches", {}).values():
            for k in cache[0].values():
                with contextlib.suppress(AttributeError):
                    found.append(
                        {
                            "regs": k.n_regs,
                            "spills": k.n_spills,
                            "warps": k.metadata.num_warps,
                            "shared": k.metadata.shared,
                        }
                    )
        out[name] = found
    return out


@contextlib.contextmanager
def _section(name: str, log):
    """Report a failing section and go on with the next (the figures gathered so far are saved)."""
    try:
        yield
    except Exception as e:
        log(f"SECTION {name} FAILED: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch {1,16} x context {4k, 32k} only")
    ap.add_argument("--out", default=None, help="directory for attention.json and attention.md")
    ap.add_argument("--no-sweep", action="store_true", help="use the built-in tile configs")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill section")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8-latent decode rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else None
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    cfg = GlmMoeDsaConfig.from_dict(make_config("glm51-slice"))
    info = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    log(json.dumps(info))
    ceil = measure_ceilings()
    log(
        f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, read {ceil['read_GBps']:.0f} GB/s, "
        f"bf16 GEMM {ceil['bf16_TFLOPs']:.0f} TFLOP/s"
    )
    results: dict = {"info": info, "ceilings": ceil}

    def save() -> None:
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "attention.json").write_text(json.dumps(results, indent=1))
            (out_dir / "attention.log").write_text("\n".join(log_lines) + "\n")

    scores_cfg = ScoresConfig()
    mla_cfgs = {64: sparse_mla.default_config(64, 64), 8: sparse_mla.default_config(8, 64)}
    if not args.no_sweep:
        with _section("sweep", log):
            scores_cfg, mla_cfgs, results["sweep"] = sweep(cfg, ceil, log)
    results["chosen"] = {
        "scores": dataclasses.asdict(scores_cfg),
        "mla": {h: dataclasses.asdict(c) for h, c in mla_cfgs.items()},
    }
    save()
    batches = (1, 16) if args.quick else (1, 16, 64)
    contexts = (4096, 32768) if args.quick else (4096, 32768, 131072)
    results["decode"] = []
    with _section("decode bf16 latent", log):
        results["decode"] = bench_decode(cfg, ceil, batches, contexts, (64, 8), "bf16", scores_cfg, mla_cfgs, log)
    save()
    if not args.no_fp8:
        # The swapped layout converts FP8 latents in registers and spills: FP8 pools keep the default layout.
        fp8_cfgs = {h: c if not c.swap else sparse_mla.default_config(h, 64, fp8=True) for h, c in mla_cfgs.items()}
        with _section("decode fp8 latent", log):
            results["decode_fp8_latent"] = bench_decode(
                cfg, ceil, (16, 64), (32768,), (64,), "fp8", scores_cfg, fp8_cfgs, log
            )
        save()
    if not args.no_prefill:
        with _section("prefill", log):
            results["prefill"] = bench_prefill(cfg, ceil, mla_cfgs[64], log)
    results["kernels"] = kernel_resources()
    save()
    log(
        "\n| heads | batch | context | chain us | MB read | % copy BW | scores us (% copy) | topk us | mla us (% copy) "
        "| indexer share |"
    )
    for r in results["decode"] + results.get("decode_fp8_latent", []):
        log(
            f"| {r['heads']}{' fp8' if r['latent'] == 'fp8' else ''} | {r['batch']} | {r['context'] // 1024}k | "
            f"{r['chain_us']:.1f} | {(r['index_bytes'] + r['latent_bytes']) / 1e6:.1f} | {r['chain_vs_copy']:.0%} | "
            f"{r['scores_us']:.1f} ({r['scores_vs_copy']:.0%}) | {r['topk_us']:.1f} | {r['mla_us']:.1f} "
            f"({r['mla_vs_copy']:.0%}) | {r['indexer_share']:.0%} |"
        )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
