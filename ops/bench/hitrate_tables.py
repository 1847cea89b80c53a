"""The hit-rate benchmark's printed tables (markdown), from the figures `hitrate.run` and `hitrate.summarize`
collect."""

from __future__ import annotations

from moed.ops.bench.hitrate_arithmetic import MTP_SOURCE, PREDICTOR_RECALL, PUBLISHED_MTP_ACCEPTANCE
from moed.ops.bench.hitrate_sim import MOE_LAYERS


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
