"""Whole-model bench, stage `report`: whole GLM-5.1 figures assembled from the stages' JSON, and their tables.

Decode per token = non-MoE step (deep) + 75 x MoE layer (slice), at each batch on both traces; MTP rows (1 draft
token) at acceptance 0 and at the published MTP acceptance; time to first token = non-MoE prefill + 75 x the MoE
layer's prefill, now and with every route computed in every round (as before); projected host memory, GPU memory and
PCIe bytes per token; llama.cpp's figures by the same per-layer method (ops/bench/llama_peer.py) and, measured
directly, its full-depth run with the experts on the CPU. The moed / llama.cpp ratio is the headline, printed first:
moed FP8 vs llama.cpp Q8_0, then moed int4 (slice_int4) vs llama.cpp Q4_0 (its Q4_0 slice, `whole_q4`).
Whatever parts exist are used: a stage that failed or was cut off leaves its lines out, named.
"""

from __future__ import annotations

import collections
import math

from moed.ops.bench.model_projection import (
    CHUNK,
    MOE_LAYERS,
    MTP_SOURCE,
    PUBLISHED_MTP_ACCEPTANCE,
    REAL_EXPERTS,
    VERIFY_TRACE,
    interpolate,
    mtp_tokens_per_s,
    ttft_s,
    whole_decode_ms,
)


def decode_rows(nonmoe: dict[int, float], sl: dict) -> tuple[dict[tuple[str, int], dict], list[dict]]:
    """The slice's decode rows by (trace, batch), and whole-model decode rows from them. Where the slice measured
    the shipped placement (the daemon's pins, "pinned-..."), that row counts: it is what moed runs by default;
    otherwise the better of the policies measured."""

    def preference(r: dict) -> tuple[bool, float]:  # the shipped placement first, then the faster
        return not r["policy"].startswith("pinned-"), r["ms_per_layer"]

    moe: dict[tuple[str, int], dict] = {}
    for r in sl.get("decode", []):
        key = (r["trace"], int(r["batch"]))
        if key not in moe or preference(r) < preference(moe[key]):
            moe[key] = r
    expert_bytes = (sl.get("deployment") or {}).get("expert_bytes", 0)
    rows = []
    for (trace, b), r in sorted(moe.items()):
        if b not in nonmoe or trace == VERIFY_TRACE:  # verify steps are MTP's (below), not a decode batch
            continue
        whole = whole_decode_ms(nonmoe[b], r["ms_per_layer"])
        bound = whole_decode_ms(nonmoe[b], r["bound_ms"])
        copied = r["misses"] - r.get("cpu_experts", 0.0)
        rows.append(
            {
                "trace": trace,
                "batch": b,
                "policy": r["policy"],
                "nonmoe_ms": nonmoe[b],
                "moe_layer_ms": r["ms_per_layer"],
                "hit_rate": r["hit_rate"],
                "misses_per_layer": r["misses"],
                "whole_ms": whole,
                "tok_s": b * 1e3 / whole,
                "bound_ms": bound,
                "vs_bound": whole / bound,
                "pcie_bytes_per_token": MOE_LAYERS * copied * expert_bytes / b,
            }
        )
    return moe, rows


def build_report(parts: dict) -> dict:
    """Whole-model figures from the stages' JSON (pure arithmetic: tested on CPU with small numbers)."""
    deep, sl, llama = parts.get("deep") or {}, parts.get("slice") or {}, parts.get("llama") or {}
    rep: dict = {"mtp_acceptance_source": MTP_SOURCE}
    # the engine's default decode graphs: compiled layers (compile_decode) where the deep stage measured them
    compiled = bool(deep.get("nonmoe_compiled"))
    nonmoe = {int(r["batch"]): r["step_ms"] for r in deep.get("nonmoe_compiled" if compiled else "nonmoe", [])}
    rep["nonmoe_graphs"] = "compiled" if compiled else "eager"
    moe, rows = decode_rows(nonmoe, sl)
    rep["decode"] = rows
    measured = collections.Counter((r["trace"], int(r["batch"])) for r in sl.get("decode", []))
    rep["policies"] = [  # issue 18: each cache policy's hit rate where the slice measured several
        {k: r.get(k) for k in ("trace", "batch", "policy", "ms_per_layer", "hit_rate", "misses", "pins_per_layer")}
        for r in sl.get("decode", [])
        if measured[(r["trace"], int(r["batch"]))] > 1
    ]
    sl4 = parts.get("slice_int4") or {}
    rep["decode_int4"] = decode_rows(nonmoe, sl4)[1] if sl4 else []
    if sl4.get("deployment"):
        d4 = sl4["deployment"]
        rep["memory_int4"] = {
            "host_bytes_experts": d4["expert_bytes"] * REAL_EXPERTS * MOE_LAYERS,
            "gpu_cache_bytes": d4["cache_bytes"],
            "cache_fraction": d4["fraction"],
            "slots_per_layer": d4["slots"],
        }

    # MTP, one draft token: verify = a step at 2 tokens per sequence; draft = one MTP layer's step at the batch. The
    # verify step's MoE layer: measured on verify steps (a token and its draft: consecutive tokens of one skewed
    # chain) where the slice has them, else the step of 2 x batch sequences (independent tokens: an upper bound).
    mtp = []
    head = {int(b): v for b, v in (deep.get("head_ms") or {}).items()}
    for (trace, b), r in sorted(moe.items()):
        if trace == VERIFY_TRACE or b not in nonmoe or 2 * b not in nonmoe:
            continue
        steps = moe.get((VERIFY_TRACE, b)) if trace == "skewed" else None
        verify_from = "verify steps" if steps else f"{2 * b} sequences"
        steps = steps or moe.get((trace, 2 * b))
        if steps is None:
            continue
        verify = whole_decode_ms(nonmoe[2 * b], steps["ms_per_layer"])
        draft = nonmoe[b] / 78 + (interpolate(head, b) if head else 0.0) + r["ms_per_layer"]
        for acc in (0.0, PUBLISHED_MTP_ACCEPTANCE):
            mtp.append(
                {
                    "trace": trace,
                    "batch": b,
                    "acceptance": acc,
                    "verify_ms": verify,
                    "verify_from": verify_from,
                    "draft_ms": draft,
                    "tok_s": mtp_tokens_per_s(verify, draft, acc, b),
                }
            )
    rep["mtp"] = mtp

    pre = {int(n): s for n, s in (deep.get("nonmoe_prefill_s") or {}).items()}
    points = {int(p["tokens"]): p for p in sl.get("prefill", [])}
    ttft = []
    for n, s in sorted(pre.items()):
        # Two step sizes: the whole prompt in one step (each layer's experts stream once) and the engine's default
        # chunk (max_tokens_per_step 2048: they stream once per chunk).
        for label, step in (("one step", n), (f"{CHUNK}-token chunks", CHUNK)):
            if step not in points or (label != "one step" and step >= n):
                continue
            p = points[step]
            chunks = math.ceil(n / step)
            per_layer_s = chunks * p["ms_streamed"] / 1e3
            before_s = chunks * p.get("ms_streamed_before", p["ms_streamed"]) / 1e3
            ttft.append(
                {
                    "prompt": n,
                    "steps": label,
                    "step_tokens": step,
                    "chunks": chunks,
                    "nonmoe_s": s,
                    "moe_per_layer_s": per_layer_s,
                    "ttft_s": ttft_s(s, per_layer_s),
                    "ttft_before_s": ttft_s(s, before_s),
                    "ttft_bound_s": ttft_s(s, chunks * p["overlap_bound_ms"] / 1e3),
                    "GBps": p["GBps"],
                    "vs_ce": p["vs_ce"],
                    "vs_host_read": p.get("vs_host_read"),
                    "GBps_before": p.get("GBps_before"),
                    "vs_ce_before": p.get("vs_ce_before"),
                }
            )
    rep["ttft"] = ttft

    dep = sl.get("deployment") or {}
    if dep:
        rep["memory"] = {
            "host_bytes_experts": dep["expert_bytes"] * REAL_EXPERTS * MOE_LAYERS,
            "gpu_bytes": dep["gpu_bytes"],
            "gpu_nonexpert_bytes": dep["nonexpert_bytes"],
            "gpu_kv_bytes": dep["kv_bytes"],
            "gpu_cache_bytes": dep["cache_bytes"],
            "cache_fraction": dep["fraction"],
            "slots_per_layer": dep["slots"],
        }

    variants: dict[str, float] = {}
    if llama:
        rep["llama"] = llama
        variants = {name: w["whole_ms"] for name, w in (llama.get("whole") or {}).items()}
        direct = (llama.get("decode_ms") or {}).get("deep_cpu")
        if direct:
            variants["deep_cpu_direct"] = direct  # full depth, 8 experts per layer, experts on the CPU: measured
    # moed's batch-1 figure heads the report even when llama.cpp's stages gave nothing (llama_variant None)
    rep["headline"] = [
        {
            "trace": r["trace"],
            "llama_variant": v,
            "moed_ms": r["whole_ms"],
            "llama_ms": ms,
            "ratio": None if ms is None else ms / r["whole_ms"],
        }
        for r in rows
        if r["batch"] == 1
        for v, ms in (variants.items() if variants else [(None, None)])
    ]
    q4 = {name: w["whole_ms"] for name, w in ((llama or {}).get("whole_q4") or {}).items()}
    rep["headline_int4"] = [
        {
            "trace": r["trace"],
            "llama_variant": v,
            "moed_ms": r["whole_ms"],
            "llama_ms": ms,
            "ratio": None if ms is None else ms / r["whole_ms"],
        }
        for r in rep["decode_int4"]
        if r["batch"] == 1
        for v, ms in (q4.items() if q4 else [(None, None)])
    ]
    return rep


LLAMA_VARIANTS = {
    "cpu_experts": "-ot exps=CPU, per-layer method",
    "n_cpu_moe": "--n-cpu-moe, as many layers' experts on the GPU as fit, per-layer method",
    "deep_cpu_direct": "-ot exps=CPU on the full-depth GGUF (8 experts/layer), measured directly",
}
LLAMA_Q4_VARIANTS = {
    "cpu_experts": "-ot exps=CPU, per-layer method on the Q4_0 slice",
    "n_cpu_moe": "--n-cpu-moe, as many Q4_0 layers' experts on the GPU as fit, per-layer method",
}


def print_report(rep: dict, parts: dict) -> None:
    """The tables, headline first; a part missing because its stage failed leaves its lines out (named)."""
    deep, sl = parts.get("deep") or {}, parts.get("slice") or {}
    print("\n== whole GLM-5.1 (78 layers, 75 MoE x 256 experts), assembled from measured parts ==")
    missing = [name for name in ("deep", "slice", "llama") if not parts.get(name)]
    if missing:
        print(f"  (missing parts: {', '.join(missing)}: their figures are left out)")
    for section in (_headline, _setup, _decode, _policies, _mtp, _ttft, _memory, _deep_offload, _depth, _llama):
        try:
            section(rep, deep, sl)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            print(f"  ({section.__name__.strip('_')}: a part is missing or incomplete: {e!r})")


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _headline(rep: dict, deep: dict, sl: dict) -> None:
    for h in rep.get("headline", []):
        if h["llama_variant"] is None:
            print(
                f"HEADLINE batch 1 {h['trace']:8}: moed {h['moed_ms']:.1f} ms/token "
                f"({1e3 / h['moed_ms']:.2f} tok/s); llama.cpp Q8_0: no figures (its stages failed or were skipped)"
            )
            continue
        print(
            f"HEADLINE batch 1 {h['trace']:8}: moed {h['moed_ms']:.1f} ms/token vs llama.cpp Q8_0 "
            f"{h['llama_ms']:.1f} ms/token ({LLAMA_VARIANTS.get(h['llama_variant'], h['llama_variant'])}) -> "
            f"moed is {h['ratio']:.2f}x llama.cpp"
        )
    for h in rep.get("headline_int4", []):
        if h.get("llama_variant") is None:
            print(
                f"HEADLINE int4 batch 1 {h['trace']:8}: moed int4 {h['moed_ms']:.1f} ms/token "
                f"({1e3 / h['moed_ms']:.2f} tok/s); llama.cpp Q4_0: no figures (llama_slice_q4, or the full-depth "
                f"Q8_0 run it builds on, failed or was skipped)"
            )
            continue
        print(
            f"HEADLINE int4 batch 1 {h['trace']:8}: moed int4 {h['moed_ms']:.1f} ms/token vs llama.cpp Q4_0 "
            f"{h['llama_ms']:.1f} ms/token ({LLAMA_Q4_VARIANTS.get(h['llama_variant'], h['llama_variant'])}) -> "
            f"moed is {h['ratio']:.2f}x llama.cpp"
        )


def _setup(rep: dict, deep: dict, sl: dict) -> None:
    if deep:
        st = deep["store"]
        print(
            f"deep checkpoint: engine load {deep['load_s']:.0f} s, host store {st['bytes'] / 1e9:.1f} GB "
            f"({st['alloc']}, {st['reserved_bytes'] / 1e9:.1f} GB reserved, pinned in {st['alloc_s']:.1f} s), "
            f"resident non-expert {deep['nonexpert_resident_bytes'] / 1e9:.1f} GB (checkpoint's non-expert bytes "
            f"{deep['checkpoint_bytes']['other'] / 1e9:.1f} GB), KV {deep['kv_bytes_per_token'] / 1e3:.0f} kB/token"
        )
    d = sl.get("deployment")
    if d:
        fp8 = (sl.get("deployment_fp8_nonexpert") or {}).get("fraction")
        print(
            f"expert cache of a real deployment on this GPU: ({d['gpu_bytes'] / 1e9:.1f} GB - non-expert "
            f"{d['nonexpert_bytes'] / 1e9:.1f} - KV {d['kv_bytes'] / 1e9:.1f} ({sl['context']} tokens) - reserve "
            f"{d['reserve_bytes'] / 1e9:.1f}) = {d['cache_bytes'] / 1e9:.1f} GB = {100 * d['fraction']:.2f}% of the "
            f"experts ({d['slots']} slots per layer); with FP8 non-expert weights: {_f(fp8, '.3f')}"
        )
    c = sl.get("ceilings")
    if c:
        print(
            f"ceilings: host read {c['host_read_GBps']:.1f} GB/s, copy engine {c['ce_GBps']:.1f}, UVA "
            f"{c['uva_GBps']:.1f}, CPU experts {c['cpu_experts_GBps']:.1f}, joint miss service "
            f"{c['joint_GBps']:.1f}, HBM {c['hbm_GBps']:.0f}; slice {sl['store']['layers']} layers x "
            f"{sl.get('experts', 256)} experts"
        )
        for name, s in sl.get("trace_stats", {}).items():
            print(f"  {name} trace: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))


def _decode(rep: dict, deep: dict, sl: dict) -> None:
    graphs = rep.get("nonmoe_graphs", "eager")
    for title, rows in (("FP8 experts", rep["decode"]), ("int4 experts", rep.get("decode_int4") or [])):
        if rows:
            print(f"\n{title} (non-MoE step from {graphs} decode graphs):")
            _decode_table(rows)


def _policies(rep: dict, deep: dict, sl: dict) -> None:
    rows = rep.get("policies") or []
    if rows:
        print("\ncache policies where the slice measured several (the whole-model rows use the shipped one, pinned-*):")
        for r in rows:
            print(
                f"  {r['trace']:8} batch {r['batch']:>3} {r['policy']:16} {r['ms_per_layer']:.3f} ms/layer, hit "
                f"{_f(r['hit_rate'], '.3f')}, misses {r['misses']:.2f}, pins/layer {r.get('pins_per_layer') or 0}"
            )


def _decode_table(rows: list[dict]) -> None:
    print(
        f"{'trace':8} {'batch':>5} {'non-MoE ms':>10} {'MoE/layer ms':>12} {'hit':>5} {'miss/layer':>10} "
        f"{'ms/step':>9} {'tok/s':>7} {'bound ms':>8} {'x bound':>7}"
    )
    for r in rows:
        print(
            f"{r['trace']:8} {r['batch']:>5} {r['nonmoe_ms']:>10.2f} {r['moe_layer_ms']:>12.3f} "
            f"{_f(r['hit_rate']):>5} {r['misses_per_layer']:>10.2f} {r['whole_ms']:>9.1f} {r['tok_s']:>7.2f} "
            f"{r['bound_ms']:>8.1f} {r['vs_bound']:>7.2f}"
        )


def _mtp(rep: dict, deep: dict, sl: dict) -> None:
    if rep["mtp"]:
        print(f"\nMTP, 1 draft token (acceptance {PUBLISHED_MTP_ACCEPTANCE}: {MTP_SOURCE})")
        for r in rep["mtp"]:
            print(
                f"  {r['trace']:8} batch {r['batch']:>3} acceptance {r['acceptance']:.2f}: verify "
                f"{r['verify_ms']:.1f} ms ({r.get('verify_from', '2 x batch sequences')}) + draft "
                f"{r['draft_ms']:.1f} ms -> {r['tok_s']:.2f} tok/s"
            )


def _ttft(rep: dict, deep: dict, sl: dict) -> None:
    if rep["ttft"]:
        print("\ntime to first token (uniform routing over all 256 experts: prefill streams every layer's experts)")
        for r in rep["ttft"]:
            print(
                f"  {r['prompt']:>6} tokens, {r['steps']:18s}: {r['ttft_s']:.1f} s (non-MoE {r['nonmoe_s']:.1f} s + "
                f"75 x {r['moe_per_layer_s']:.2f} s in {r['chunks']} steps of {r['step_tokens']}); bound "
                f"{r['ttft_bound_s']:.1f} s; before (every route in every round) {r['ttft_before_s']:.1f} s"
            )
    for p in sl.get("prefill", []):
        print(
            f"  prefill step {p['tokens']:>6} tokens, one layer: {p['ms_streamed']:.1f} ms streamed in {p['rounds']} "
            f"rounds = {p['GBps']:.1f} GB/s of experts ({100 * p['vs_ce']:.0f}% of the copy engine, "
            f"{100 * p['vs_host_read']:.0f}% of host read); before {p['ms_streamed_before']:.1f} ms = "
            f"{p['GBps_before']:.1f} GB/s ({100 * p['vs_ce_before']:.0f}% / {100 * p['vs_host_read_before']:.0f}%); "
            f"compute alone {p['ms_resident']:.1f} ms, the experts' bytes at the copy engine's rate "
            f"{p['copy_ceiling_ms']:.1f} ms: compute "
            f"{'hidden under the copies' if p['compute_hidden'] else 'serial with the copies'}"
            + (
                f"; activation peak {p['peak_activation_bytes'] / 1e9:.2f} GB"
                if p.get("peak_activation_bytes") is not None
                else ""
            )
        )
    peaks = {int(n): b for n, b in (deep.get("nonmoe_prefill_peak_bytes") or {}).items() if b is not None}
    if peaks:
        print(
            "  non-MoE prefill activation peak at full depth (steps of the deep engine's max_tokens_per_step): "
            + ", ".join(f"{n} tokens {b / 1e9:.2f} GB" for n, b in sorted(peaks.items()))
        )


def _memory(rep: dict, deep: dict, sl: dict) -> None:
    m = rep.get("memory")
    if m:
        print(
            f"\nneeds: host {m['host_bytes_experts'] / 1e9:.0f} GB for the experts (FP8, pinned); GPU "
            f"{m['gpu_nonexpert_bytes'] / 1e9:.1f} GB non-expert + {m['gpu_kv_bytes'] / 1e9:.1f} GB KV + "
            f"{m['gpu_cache_bytes'] / 1e9:.1f} GB expert cache"
        )
        for r in rep["decode"]:
            print(f"  PCIe per token ({r['trace']}, batch {r['batch']}): {r['pcie_bytes_per_token'] / 1e9:.2f} GB")
    m4 = rep.get("memory_int4")
    if m4:
        print(
            f"int4 experts: host {m4['host_bytes_experts'] / 1e9:.0f} GB for the experts; the same GPU cache holds "
            f"{100 * m4['cache_fraction']:.2f}% of them ({m4['slots_per_layer']} slots per layer)"
        )
        for r in rep.get("decode_int4") or []:
            print(
                f"  PCIe per token at int4 ({r['trace']}, batch {r['batch']}): {r['pcie_bytes_per_token'] / 1e9:.2f} GB"
            )


def _deep_offload(rep: dict, deep: dict, sl: dict) -> None:
    eager = {r["batch"]: r["step_ms"] for r in deep.get("nonmoe", [])}
    for r in deep.get("nonmoe_compiled", []):
        b = r["batch"]
        print(
            f"deep engine, non-MoE step from compiled decode graphs (compile_decode), batch {b}: {r['step_ms']:.2f} ms"
            + (f" (eager graphs {eager[b]:.2f} ms: x{eager[b] / r['step_ms']:.2f})" if b in eager else "")
        )
    for key, what in (("nonmoe_fp8", "eager graphs"), ("nonmoe_fp8_compiled", "compiled graphs")):
        for r in deep.get(key, []):
            b = r["batch"]
            than = f" (bf16 projections, eager graphs {eager[b]:.2f} ms)" if b in eager else ""
            print(
                f"deep engine, non-MoE step with FP8 projections (fp8_projections), {what}, batch {b}: "
                f"{r['step_ms']:.2f} ms{than}"
            )
    if "nonexpert_resident_bytes_fp8" in deep:
        print(
            f"non-expert weights resident: {deep['nonexpert_resident_bytes_fp8'] / 1e9:.2f} GB with FP8 projections, "
            f"{deep.get('nonexpert_resident_bytes', 0) / 1e9:.2f} GB dequantised"
        )
    if "graphs_nonmoe_compiled" in deep and not deep["graphs_nonmoe_compiled"]:
        print("deep engine, compiled decode graphs: not captured (see the stage's log)")
    for r in deep.get("offload", []):
        j = r.get("jobs") or {}
        print(
            f"deep engine, offload runner, batch {r['batch']}: step {r['step_ms']:.1f} ms, MoE in situ "
            f"{_f(r.get('moe_per_layer_ms'), '.3f')} ms/layer, hit {_f(r['hit_rate'])}, misses/step "
            f"{r['misses_per_step']:.1f}, graphed steps {r['graph_steps']}, CPU job {_f(j.get('cpu_job_ms'), '.3f')} "
            f"ms, gap between layers' jobs {_f(j.get('gap_ms'), '.3f')} ms"
        )


def _depth(rep: dict, deep: dict, sl: dict) -> None:
    for r in sl.get("depth", []):
        if "skipped" in r:
            print(f"depth {r['alloc']}: skipped ({r['skipped']})")
            continue
        j, tl = r.get("jobs") or {}, r.get("timeline_ms") or {}
        print(
            f"depth {r['alloc']:5} layers {r['layers']:>3} slots {r['slots']}: {r['ms_per_layer']:.3f} ms/layer "
            f"(bound {r['bound_ms']:.3f}), CPU job {_f(j.get('cpu_job_ms'), '.3f')} ms, gap "
            f"{_f(j.get('gap_ms'), '.3f')} ms; eager, ms from the layer's start: split done "
            f"{_f(tl.get('split_done'), '.3f')}, CPU job {_f(tl.get('cpu_start'), '.3f')}-"
            f"{_f(tl.get('cpu_end'), '.3f')} (hand-off {_f(tl.get('handoff'), '.3f')}), GPU rounds done "
            f"{_f(tl.get('gpu_rounds_done'), '.3f')}, layer done {_f(tl.get('end'), '.3f')}; pinned in "
            f"{r['alloc_s']:.1f} s; THP {r['thp']}"
        )


def _llama(rep: dict, deep: dict, sl: dict) -> None:
    llama = rep.get("llama") or {}
    for name, ms in (llama.get("decode_ms") or {}).items():
        print(f"llama.cpp {name}: {_f(ms)} ms/token decode")
    for name, w in (llama.get("whole_q4") or {}).items():
        saved = w.get("gpu_saved_per_layer_ms")
        print(
            f"llama.cpp Q4_0 whole model ({LLAMA_Q4_VARIANTS.get(name, name)}): {w['whole_ms']:.1f} ms/token = "
            f"all-GPU step {w['deep_gpu_ms']:.1f} ms (full-depth Q8_0 file's"
            + (", no Q8_0 slice to correct it)" if saved is None else f" less 78 x {saved:.3f} ms Q4_0 saves)")
            + f" + CPU experts {w['cpu_extra_per_layer_ms']:.2f} ms per MoE layer"
            + (f", {w['gpu_layers']} layers' experts on the GPU" if "gpu_layers" in w else "")
        )
    for n, t in (llama.get("ttft_s") or {}).items():
        print(
            f"llama.cpp time to first token, {n} tokens: experts on the CPU {t['cpu_experts']:.1f} s, "
            f"--n-cpu-moe {t['n_cpu_moe']:.1f} s (per-layer method)"
        )
