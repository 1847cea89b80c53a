"""The whole-model bench's projection arithmetic and llama.cpp's per-layer method, at small sizes on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moed.ops.bench import llama_peer
from moed.ops.bench.engine import bound_ms, miss_rate_gbs
from moed.ops.bench.model_projection import (
    MOE_LAYERS,
    PUBLISHED_MTP_ACCEPTANCE,
    Deployment,
    decode_bound_ms,
    interpolate,
    joint_rate_GBps,
    llama_gpu_layers,
    mtp_tokens_per_s,
)
from moed.ops.bench.model_report import build_report, print_report

GB = 10**9


def test_deployment_cache_fraction_and_slots():
    # 80 GB GPU, 38 GB of weights, 3 GB KV, 4 GB reserve -> 35 GB of cache over 75 x 256 experts of 37.7 MB
    d = Deployment(80 * GB, 38 * GB, 3 * GB, 4 * GB, int(37.7e6))
    assert d.cache_bytes == 35 * GB
    assert d.all_expert_bytes == int(37.7e6) * 256 * 75
    assert d.fraction == pytest.approx(35e9 / (37.7e6 * 256 * 75))
    assert d.slots_per_layer == int(35e9 // (37.7e6 * 75))  # 12 slots: whole experts per layer
    full = Deployment(80 * GB, 90 * GB, 0, 0, int(37.7e6))
    assert full.cache_bytes == 0 and full.slots_per_layer == 0
    assert Deployment(10**15, 0, 0, 0, 10).slots_per_layer == 256  # never more slots than experts


def test_decode_bound_uses_the_joint_miss_rate():
    assert joint_rate_GBps(45, 50, 90) == 90  # CPU + copies meet the host-read ceiling
    assert joint_rate_GBps(20, 30, 90) == 50
    # 7 misses of 37.7 MB at 100 GB/s + 1 hit from HBM at 3000 GB/s + 10 ms of non-MoE time
    assert decode_bound_ms(7, 1, int(37.7e6), 100, 3000, 10.0) == pytest.approx(7 * 0.377 + 0.0377 / 3 + 10.0)


def test_engine_bench_bound_is_joint_when_cpu_experts_serve_misses():
    ceil = {"hbm_gbs": 3000.0, "h2d_ce_gbs": 50.0, "host_read_gbs": 90.0}
    assert miss_rate_gbs(ceil, 0.0) == 50.0
    assert miss_rate_gbs(ceil, 60.0) == 90.0
    assert miss_rate_gbs(ceil, 20.0) == 70.0
    row = {"hit_rate": 0.125, "misses_per_step": 7.0 * 75, "hits_per_step": 75.0}
    copy_only = bound_ms(row, int(37.7e6), 0, ceil)
    joint = bound_ms(row, int(37.7e6), 0, ceil, cpu_gbs=60.0)
    assert copy_only is not None and joint is not None
    assert copy_only / joint == pytest.approx(
        (525 * 37.7e6 / 50e9 + 75 * 37.7e6 / 3e12) / (525 * 37.7e6 / 90e9 + 75 * 37.7e6 / 3e12)
    )


def test_interpolate_and_mtp_rate():
    pts = {1: 1.0, 8: 2.0, 32: 5.0}
    assert interpolate(pts, 1) == 1.0 and interpolate(pts, 64) == 5.0 and interpolate(pts, 20) == pytest.approx(3.5)
    # one sequence, verify 100 ms + draft 20 ms: 1 token per step at acceptance 0, 1.85 at the published acceptance
    assert mtp_tokens_per_s(100, 20, 0.0, 1) == pytest.approx(1 / 0.12)
    assert mtp_tokens_per_s(100, 20, PUBLISHED_MTP_ACCEPTANCE, 1) == pytest.approx(1.85 / 0.12)


def _parts() -> dict:
    deep = {
        "nonmoe": [{"batch": b, "step_ms": 10.0 + b} for b in (1, 2, 8, 16)],
        "graphs_nonmoe_compiled": True,
        "nonmoe_compiled": [{"batch": 1, "step_ms": 5.5}],
        "nonmoe_fp8": [{"batch": 1, "step_ms": 8.0}],
        "nonexpert_resident_bytes": 38e9,
        "nonexpert_resident_bytes_fp8": 21e9,
        "head_ms": {"1": 0.5, "8": 0.6},
        "nonmoe_prefill_s": {"1024": 0.5, "8192": 3.0},
    }
    dep = {
        "gpu_bytes": 80 * GB,
        "nonexpert_bytes": 38 * GB,
        "kv_bytes": 3 * GB,
        "reserve_bytes": 4 * GB,
        "expert_bytes": 40_000_000,
        "cache_bytes": 35 * GB,
        "fraction": 0.05,
        "slots": 12,
    }
    decode = []
    for b, ms in ((1, 2.0), (2, 2.5), (8, 4.0), (16, 6.0)):
        decode.append(
            {
                "trace": "skewed",
                "policy": "lru",
                "batch": b,
                "ms_per_layer": ms,
                "bound_ms": ms / 2,
                "hits": 1.0,
                "misses": 4.0,
                "cpu_experts": 1.0,
                "hit_rate": 0.2,
            }
        )
        decode.append(
            {
                "trace": "skewed",
                "policy": "lfu",
                "batch": b,
                "ms_per_layer": ms + 1,
                "bound_ms": ms / 2,
                "hits": 1.0,
                "misses": 4.0,
                "cpu_experts": 1.0,
                "hit_rate": 0.2,
            }
        )
    prefill = [
        {
            "tokens": 1024,
            "ms_streamed": 190.0,
            "ms_streamed_before": 200.0,
            "overlap_bound_ms": 180.0,
            "GBps": 50.0,
            "vs_ce": 0.95,
        },
        {
            "tokens": 2048,
            "ms_streamed": 200.0,
            "ms_streamed_before": 220.0,
            "overlap_bound_ms": 180.0,
            "GBps": 48.0,
            "vs_ce": 0.9,
        },
        {
            "tokens": 8192,
            "ms_streamed": 400.0,
            "ms_streamed_before": 600.0,
            "overlap_bound_ms": 190.0,
            "GBps": 24.0,
            "vs_ce": 0.45,
        },
    ]
    sl = {"decode": decode, "deployment": dep, "prefill": prefill}
    llama = {"whole": {"cpu_experts": {"whole_ms": 330.0}, "n_cpu_moe": {"whole_ms": 310.0}}}
    return {"deep": deep, "slice": sl, "llama": llama}


def test_report_assembles_whole_model_figures():
    parts = _parts()
    # the engine's default decode graphs are compiled: their non-MoE rows are the ones a whole step adds
    compiled = build_report(parts)
    assert compiled["nonmoe_graphs"] == "compiled" and [r["batch"] for r in compiled["decode"]] == [1]
    assert compiled["decode"][0]["whole_ms"] == pytest.approx(5.5 + MOE_LAYERS * 2.0)
    del parts["deep"]["nonmoe_compiled"]  # eager rows only (--no-deep-compiled): every batch the slice measured
    rep = build_report(parts)
    assert rep["nonmoe_graphs"] == "eager"
    rows = {r["batch"]: r for r in rep["decode"]}
    assert rows[1]["whole_ms"] == pytest.approx(11.0 + MOE_LAYERS * 2.0)  # LRU beat LFU: the better policy counts
    assert rows[1]["policy"] == "lru"
    assert rows[8]["tok_s"] == pytest.approx(8e3 / (18.0 + 75 * 4.0))
    assert rows[1]["vs_bound"] == pytest.approx((11 + 150) / (11 + 75))
    # PCIe per token: 75 layers x (4 misses - 1 on the CPU) x 40 MB / batch
    assert rows[8]["pcie_bytes_per_token"] == pytest.approx(75 * 3 * 40e6 / 8)
    mtp = {(r["batch"], r["acceptance"]): r for r in rep["mtp"]}
    verify = 12.0 + 75 * 2.5  # batch 1 verifies 2 tokens: the batch-2 step
    draft = 11.0 / 78 + 0.5 + 2.0
    assert mtp[(1, 0.0)]["tok_s"] == pytest.approx(1e3 / (verify + draft))
    assert mtp[(8, PUBLISHED_MTP_ACCEPTANCE)]["verify_ms"] == pytest.approx(26.0 + 75 * 6.0)
    assert mtp[(1, 0.0)]["verify_from"] == "2 sequences"
    # the shipped placement's row counts where measured, even when another policy measured faster: it is the default
    shipped = {**parts["slice"]["decode"][0], "policy": "pinned-50%+lru", "ms_per_layer": 2.4, "pins_per_layer": 6}
    with_pins = build_report({**parts, "slice": {**parts["slice"], "decode": [*parts["slice"]["decode"], shipped]}})
    row = next(r for r in with_pins["decode"] if r["batch"] == 1)
    assert row["policy"] == "pinned-50%+lru" and row["whole_ms"] == pytest.approx(11.0 + MOE_LAYERS * 2.4)
    assert {p["policy"] for p in with_pins["policies"]} == {"lru", "lfu", "pinned-50%+lru"}
    # measured verify steps (a token and its draft from one chain) replace the two-sequence step for MTP, and are
    # no decode row of their own
    verify_row = {**parts["slice"]["decode"][0], "trace": "skewed-verify", "ms_per_layer": 2.2, "step_tokens": 2}
    parts["slice"]["decode"].append(verify_row)
    rep = build_report(parts)
    assert "skewed-verify" not in {r["trace"] for r in rep["decode"]}
    mtp = {(r["batch"], r["acceptance"]): r for r in rep["mtp"]}
    assert mtp[(1, 0.0)]["verify_ms"] == pytest.approx(12.0 + 75 * 2.2)
    assert mtp[(1, 0.0)]["verify_from"] == "verify steps"
    assert mtp[(8, 0.0)]["verify_from"] == "16 sequences"  # no verify row at batch 8 here
    ttft = {(r["prompt"], r["step_tokens"]): r for r in rep["ttft"]}
    assert ttft[(1024, 1024)]["chunks"] == 1 and ttft[(1024, 1024)]["ttft_s"] == pytest.approx(0.5 + 75 * 0.19)
    assert (1024, 2048) not in ttft  # a prompt within one engine chunk is the one-step row
    assert ttft[(8192, 8192)]["ttft_s"] == pytest.approx(3.0 + 75 * 0.4)
    assert ttft[(8192, 8192)]["ttft_before_s"] == pytest.approx(3.0 + 75 * 0.6)  # every route in every round
    chunked = ttft[(8192, 2048)]  # four chunks: every layer's experts stream four times
    assert chunked["chunks"] == 4 and chunked["ttft_s"] == pytest.approx(3.0 + 75 * 4 * 0.2)
    head = {h["llama_variant"]: h for h in rep["headline"]}
    assert head["cpu_experts"]["ratio"] == pytest.approx(330.0 / rows[1]["whole_ms"])
    assert rep["memory"]["cache_fraction"] == 0.05


def test_report_prints_whatever_parts_there_are(capsys):
    parts = _parts()
    print_report(build_report(parts), parts)
    out = capsys.readouterr().out
    assert "HEADLINE batch 1 skewed" in out
    assert "compiled decode graphs (compile_decode), batch 1: 5.50 ms (eager graphs 11.00 ms: x2.00)" in out
    assert "FP8 projections (fp8_projections), eager graphs, batch 1: 8.00 ms (bf16 projections" in out
    assert "21.00 GB with FP8 projections, 38.00 GB dequantised" in out
    print_report(build_report({}), {})  # every stage failed: the header, no traceback
    assert "assembled from measured parts" in capsys.readouterr().out
    no_llama = {"deep": parts["deep"], "slice": parts["slice"]}  # llama.cpp's stages gave nothing: moed's line stays
    print_report(build_report(no_llama), no_llama)
    out = capsys.readouterr().out
    assert "HEADLINE batch 1 skewed  : moed 155.5 ms/token" in out  # 5.5 ms compiled non-MoE + 75 x 2.0
    assert "FP8 experts (non-MoE step from compiled decode graphs):" in out


def test_every_stage_runs_on_cpu_at_tiny_sizes(tiny_fp8_checkpoint, tmp_path, capsys):
    """The GPU run's stages, same code, on the CPU with the tiny preset: deep (the engine with zero experts, then its
    offload runner), slice (decode with misses, prefill in rounds now and as before, the depth cases) and the
    report, so no stage meets the GPU machine untried."""
    import json

    from moed.ops.bench.model import main

    work = tmp_path / "work"
    common = ["--device", "cpu", "--work", str(work), "--cpu-threads", "1"]
    assert (
        main(
            [
                "--stage",
                "deep",
                "--ckpt",
                tiny_fp8_checkpoint,
                "--deep-batches",
                "1,2",
                "--deep-offload-batches",
                "1",
                "--prompts",
                "32",
                "--deep-prompt",
                "8",
                "--deep-gen",
                "3",
                "--deep-cache-gb",
                "0.001",
                "--deep-step-tokens",
                "32",
                *common,
            ]
        )
        == 0
    )
    deep = json.loads((work / "deep.json").read_text())
    assert [r["batch"] for r in deep["nonmoe"]] == [1, 2] and deep["nonmoe"][0]["step_ms"] > 0
    assert deep["offload"][0]["misses_per_step"] > 0 and "moe_per_layer_ms" in deep["offload"][0]
    assert set(deep["nonmoe_prefill_s"]) == {"32"} and deep["kv_bytes_per_token"] > 0
    assert deep["store"]["slots"] < deep["store"]["experts"]
    assert (
        main(
            [
                "--stage",
                "slice",
                "--preset",
                "tiny",
                "--experts",
                "16",
                "--slots",
                "5",
                "--batches",
                "1",
                "--prefill-tokens",
                "16",
                "--depth-layers",
                "2",
                "--steps",
                "2",
                "--pin-prefix",
                "4",
                "--pin-every",
                "2",
                "--warm-steps",
                "2",
                "--max-slice-layers",
                "2",
                *common,
            ]
        )
        == 0
    )
    sl = json.loads((work / "slice.json").read_text())
    assert {(r["trace"], r["policy"]) for r in sl["decode"]} == {
        ("skewed", "lru"),
        ("skewed", "lfu"),
        ("uniform", "lru"),
        ("skewed-verify", "lru"),  # MTP verify steps: a token and its draft, consecutive in one chain
        ("skewed", "pinned-50%+lru"),  # the shipped placement: the daemon's pin planner over the warm-up's counts
    }
    pinned = next(r for r in sl["decode"] if r["policy"].startswith("pinned-"))
    assert pinned["pins_per_layer"] == 2  # half of the 5 slots
    assert {r["trace"]: r["step_tokens"] for r in sl["decode"]}["skewed-verify"] == 2
    assert all(r["misses"] > 0 and r["bound_ms"] > 0 for r in sl["decode"])
    pre = sl["prefill"][0]
    assert pre["rounds"] > 1 and pre["ms_streamed_before"] > 0 and pre["distinct_experts"] <= 16
    assert [(r["layers"], r["slots"]) for r in sl["depth"]] == [(1, 4), (2, 4), (2, 1)]
    # a second slice run for other batches keeps batch 1's rows (the pipeline measures batch 1 first)
    assert (
        main(
            [
                "--stage",
                "slice",
                "--preset",
                "tiny",
                "--experts",
                "16",
                "--slots",
                "5",
                "--batches",
                "2",
                "--keep-decode",
                "--prefill-tokens",
                "",
                "--depth-layers",
                "0",
                "--steps",
                "2",
                "--pin-prefix",
                "4",
                "--pin-every",
                "2",
                "--warm-steps",
                "2",
                "--max-slice-layers",
                "1",
                *common,
            ]
        )
        == 0
    )
    sl = json.loads((work / "slice.json").read_text())
    assert sorted({r["batch"] for r in sl["decode"]}) == [1, 2]
    # int4 experts: every part of the stage at int4's layout, its own JSON, fewer bytes per expert
    assert (
        main(
            [
                "--stage",
                "slice",
                "--expert-dtype",
                "int4",
                "--preset",
                "tiny",
                "--experts",
                "16",
                "--slots",
                "5",
                "--batches",
                "1",
                "--prefill-tokens",
                "16",
                "--depth-layers",
                "2",
                "--steps",
                "2",
                "--pin-prefix",
                "4",
                "--pin-every",
                "2",
                "--warm-steps",
                "2",
                "--max-slice-layers",
                "1",
                *common,
            ]
        )
        == 0
    )
    s4 = json.loads((work / "slice_int4.json").read_text())
    assert s4["expert_format"] == "int4" and sl["expert_format"] == "fp8"
    assert s4["deployment"]["expert_bytes"] < sl["deployment"]["expert_bytes"]
    assert all(r["misses"] > 0 for r in s4["decode"]) and s4["prefill"][0]["rounds"] >= 1 and s4["depth"]
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"decode_ms": {"deep_cpu": 300.0}}))
    capsys.readouterr()
    assert main(["--stage", "report", "--work", str(work), "--llama", str(llama)]) == 0
    out = capsys.readouterr().out
    assert "HEADLINE batch 1 skewed" in out and "measured directly" in out and "a part is missing" not in out
    assert "HEADLINE int4 batch 1 skewed" in out and "llama.cpp Q4_0: no figures" in out  # its stage gave nothing
    assert out.index("HEADLINE batch 1") < out.index("HEADLINE int4")  # FP8 vs Q8_0 stays the first figure
    rep = json.loads((work / "results.json").read_text())["report"]
    assert rep["decode"] and rep["decode_int4"]


def test_serve_depth_runs_on_cpu_at_tiny_sizes(tiny_fp8_checkpoint, tmp_path, capsys):
    """ops/bench/serve_depth.py as on the GPU machine (the daemon in a subprocess, clients over ZMQ, MTP off then
    on), on the tiny checkpoint: every token delivered, greedy identical with MTP on and off."""
    import json

    from moed.ops.bench import serve_depth

    out = tmp_path / "serve.json"
    assert (
        serve_depth.main(
            [
                "--model",
                tiny_fp8_checkpoint,
                "--device",
                "cpu",
                "--batches",
                "1,3",
                "--prompts",
                "32",
                "--repeat-prompts",
                "32",
                "--prompt-len",
                "8",
                "--gen",
                "3",
                "--prefill-gen",
                "2",
                "--chunk",
                "32",
                "--slots",
                "4",
                "--mtp",
                "0,1",
                "--ready-timeout",
                "300",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    for run in res["runs"].values():
        assert run.get("error") is None and run["exit_code"] == 0
        assert all(c["all_delivered"] and c["nan_logprobs"] == 0 for c in run["cases"].values())
    assert all(c["identical"] for c in res["greedy_mtp_on_vs_off"].values())
    assert all(c["min_margin"] >= 0 for run in res["runs"].values() for c in run["cases"].values())
    assert all("prompt_32_again" in run["cases"] for run in res["runs"].values())
    assert set(res["batch_control"]["0"]) == {"b3_vs_b1"}  # stream 0 of 3 against the 1-stream run
    off, on = res["runs"]["0"]["spec"], res["runs"]["1"]["spec"]  # from each daemon's /metrics
    assert off["draft_tokens"] == 0 and off["acceptance"] is None
    assert on["draft_tokens"] > 0 and 0 <= on["acceptance"] <= 1


def test_serve_depth_compare_names_near_ties():
    """A divergence where both runs' top-2 margins are small is a near-tie; one where either run was sure is not."""
    from moed.ops.bench.serve_depth import compare

    def run(outputs, margins):
        return {"cases": {"c": {"outputs": outputs, "margins": margins, "all_delivered": True}}}

    off = run([[1, 2, 3], [4, 5, 6]], [[1.0, 1.0, 1.0], [1.0, 0.01, 1.0]])
    tie = compare(off, run([[1, 2, 3], [4, 7, 6]], [[1.0, 1.0, 1.0], [1.0, 0.02, 1.0]]), 0.05)["c"]
    assert not tie["identical"] and tie["first_difference"] == {
        "stream": 1,
        "position": 1,
        "margins": [0.01, 0.02],
        "near_tie": True,
    }
    assert tie["near_tie_share"] == 1 / 6
    real = compare(off, run([[1, 2, 3], [4, 7, 6]], [[1.0, 1.0, 1.0], [1.0, 0.9, 1.0]]), 0.05)["c"]
    assert real["first_difference"]["near_tie"] is False
    assert compare(off, off, 0.05)["c"]["identical"]
    # NaN logits (margins NaN) at the divergence are a fault, whatever the other run's margin
    nan = float("nan")
    broken = run([[1, 2, 3], [4, 0, 0]], [[1.0, 1.0, 1.0], [1.0, nan, nan]])
    broken["cases"]["c"]["nan_logprobs"] = 2
    fault = compare(off, broken, 0.05)["c"]
    assert fault["first_difference"]["near_tie"] is False and fault["nan_logprobs"] == [0, 2]


def test_serve_depth_batch_control_compares_shared_prompts():
    """Stream i of every decode case shares its prompt: each larger batch is compared with the smallest."""
    from moed.ops.bench.serve_depth import batch_control

    run = {
        "cases": {
            "decode_b1": {"outputs": [[1, 2, 3]]},
            "decode_b4": {"outputs": [[1, 2, 9], [5, 5, 5], [6], [7]]},
            "decode_b2": {"outputs": [[1, 2, 3], [4, 4, 4]]},
            "prompt_8": {"outputs": [[0]]},
        }
    }
    assert batch_control(run) == {"b2_vs_b1": [None], "b4_vs_b1": [2]}
    assert batch_control({"cases": {"decode_b1": {"outputs": [[1]]}}}) == {}


def _rows(tg_ms: float, pp: dict[int, float]) -> list[dict]:
    rows = [{"n_prompt": 0, "n_gen": 16, "avg_ms": 16 * tg_ms, "stddev_ms": 0.0, "tok_s": 1e3 / tg_ms, "extra": []}]
    rows += [
        {"n_prompt": n, "n_gen": 0, "avg_ms": 1e3 * s, "stddev_ms": 0.0, "tok_s": n / s, "extra": []}
        for n, s in pp.items()
    ]
    return rows


def test_llama_per_layer_method():
    runs = {
        "deep_gpu": _rows(30.0, {512: 0.4}),
        "deep_cpu": _rows(320.0, {512: 3.0}),
        "slice_gpu": _rows(2.0, {512: 0.05}),
        "slice_cpu": _rows(10.0, {512: 0.25}),
    }
    layer = 256 * 3 * 2048 * 6144 * 34 // 32
    deep_bytes = 21 * GB + 75 * 8 * layer // 256
    res = llama_peer.derive(runs, {"deep_gguf": deep_bytes}, gpu_bytes=80 * GB, kv_bytes=3 * GB, reserve_bytes=4 * GB)
    per = (10.0 - 2.0) / 2
    assert res["whole"]["cpu_experts"]["whole_ms"] == pytest.approx(30.0 + 75 * per)
    gpu_layers = (80 - 21 - 3 - 4) * GB // layer
    assert (
        res["whole"]["n_cpu_moe"]["gpu_layers"]
        == gpu_layers
        == llama_gpu_layers(80 * GB, 21 * GB, 3 * GB, 4 * GB, layer)
    )
    assert res["whole"]["n_cpu_moe"]["whole_ms"] == pytest.approx(30.0 + (75 - gpu_layers) * per)
    assert res["ttft_s"][512]["cpu_experts"] == pytest.approx(0.4 + 75 * 0.1)
    assert llama_peer.derive({"deep_gpu": runs["deep_gpu"]}, {}).get("whole") is None  # incomplete: no figure
    assert "whole_q4" not in res  # no Q4_0 slice ran


def test_llama_q4_0_per_layer_method():
    """Q4_0 from its slice: the full-depth Q8_0 all-GPU step less 78 x what Q4_0 saves per slice layer, plus 75 x the
    Q4_0 slice's CPU-experts difference; more layers' experts fit the GPU at Q4_0's bytes."""
    runs = {
        "deep_gpu": _rows(30.0, {}),
        "slice_gpu": _rows(2.0, {}),
        "slice_q4_gpu": _rows(1.7, {}),
        "slice_q4_cpu": _rows(6.7, {}),
    }
    layer = 256 * 3 * 2048 * 6144 * 34 // 32
    head = 154880 * 6144 * 34 // 32
    deep_bytes = 21 * GB + 75 * 8 * layer // 256
    res = llama_peer.derive(runs, {"deep_gguf": deep_bytes}, gpu_bytes=80 * GB, kv_bytes=3 * GB, reserve_bytes=4 * GB)
    assert "whole" not in res  # the Q8_0 figures need deep_cpu and the Q8_0 slice's CPU run
    cpu = res["whole_q4"]["cpu_experts"]
    assert cpu["gpu_saved_per_layer_ms"] == pytest.approx(0.1)
    assert cpu["deep_gpu_ms"] == pytest.approx(30.0 - 78 * 0.1)
    assert cpu["whole_ms"] == pytest.approx(30.0 - 7.8 + 75 * (6.7 - 1.7) / 2)
    nonexpert_q4 = head + (21 * GB - head) * 18 // 34
    gpu_layers = llama_gpu_layers(80 * GB, nonexpert_q4, 3 * GB, 4 * GB, layer * 18 // 34)
    assert res["whole_q4"]["n_cpu_moe"]["gpu_layers"] == gpu_layers > (80 - 21 - 3 - 4) * GB // layer
    assert res["whole_q4"]["n_cpu_moe"]["whole_ms"] == pytest.approx(30.0 - 7.8 + (75 - gpu_layers) * 2.5)
    del runs["slice_gpu"]  # no Q8_0 slice: the full-depth step is taken as the Q8_0 file's, said so
    uncorrected = llama_peer.derive(runs, {"deep_gguf": deep_bytes})["whole_q4"]["cpu_experts"]
    assert uncorrected["gpu_saved_per_layer_ms"] is None and uncorrected["deep_gpu_ms"] == pytest.approx(30.0)


def test_report_puts_int4_beside_llama_q4_0(capsys):
    parts = _parts()
    parts["slice_int4"] = {
        "decode": [dict(r, ms_per_layer=r["ms_per_layer"] / 2) for r in parts["slice"]["decode"]],
        "deployment": dict(parts["slice"]["deployment"], expert_bytes=20_000_000),
    }
    parts["llama"]["whole_q4"] = {
        "cpu_experts": {
            "whole_ms": 200.0,
            "deep_gpu_ms": 25.0,
            "gpu_saved_per_layer_ms": 0.1,
            "cpu_extra_per_layer_ms": 2.3,
        }
    }
    rep = build_report(parts)
    int4 = {r["batch"]: r for r in rep["decode_int4"]}
    (head,) = [h for h in rep["headline_int4"] if h["trace"] == int4[1]["trace"]]
    assert head["llama_variant"] == "cpu_experts" and head["ratio"] == pytest.approx(200.0 / int4[1]["whole_ms"])
    print_report(rep, parts)
    out = capsys.readouterr().out
    assert f"moed int4 {int4[1]['whole_ms']:.1f} ms/token vs llama.cpp Q4_0 200.0 ms/token" in out
    assert "less 78 x 0.100 ms Q4_0 saves" in out
    assert out.index("HEADLINE batch 1") < out.index("HEADLINE int4")


def test_llama_bench_runs_and_merge_with_a_stand_in_binary(tmp_path):
    """llama_peer's bench and merge commands as the pipeline calls them, over a stand-in llama-bench that answers in
    llama-bench's JSON (the real one runs on the GPU machine): per-variant prompts ("" = decode only, `-p 0`), each
    run saved as it ends, the merged figures."""
    import json

    fake = tmp_path / "llama-bench"
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "opt = dict(zip(a[::2], a[1::2]))\n"
        "cpu = 'exps=CPU' in a\n"
        "rows = [{'n_prompt': int(p), 'n_gen': 0, 'avg_ns': int(p) * (5e5 if cpu else 1e5), 'stddev_ns': 0,"
        " 'avg_ts': 1.0} for p in opt['-p'].split(',') if int(p) > 0]\n"
        "ms = 300.0 if cpu else 30.0\n"
        "rows.append({'n_prompt': 0, 'n_gen': int(opt['-n']), 'avg_ns': 0, 'stddev_ns': 0,"
        " 'avg_ts': 1e3 / ms})\n"
        "print(json.dumps(rows))\n"
    )
    fake.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"0" * 1000)
    deep = tmp_path / "llama_deep.json"
    assert (
        llama_peer.main(
            [
                "bench",
                "--llama-bench",
                str(fake),
                "--deep",
                str(gguf),
                "--prompts",
                "1024",
                "--cpu-prompts",
                "",
                "--out",
                str(deep),
            ]
        )
        == 0
    )
    runs = json.loads(deep.read_text())["runs"]
    assert [r["n_prompt"] for r in runs["deep_gpu"]] == [1024, 0] and [r["n_prompt"] for r in runs["deep_cpu"]] == [0]
    merged = tmp_path / "llama.json"
    assert llama_peer.main(["merge", str(deep), str(tmp_path / "llama_slice.json"), "--out", str(merged)]) == 0
    res = json.loads(merged.read_text())
    assert res["decode_ms"]["deep_cpu"] == pytest.approx(300.0) and "whole" not in res  # the slice is not there yet
    q4 = tmp_path / "llama_slice_q4.json"  # the Q4_0 slice as the pipeline's llama_slice_q4 runs it: decode only
    bench = ["bench", "--llama-bench", str(fake), "--slice-q4", str(gguf), "--prompts", "", "--out", str(q4)]
    assert llama_peer.main(bench) == 0
    assert set(json.loads(q4.read_text())["runs"]) == {"slice_q4_gpu", "slice_q4_cpu"}
    assert llama_peer.main(["merge", str(deep), str(q4), "--out", str(merged)]) == 0
    whole_q4 = json.loads(merged.read_text())["whole_q4"]["cpu_experts"]
    assert whole_q4["whole_ms"] == pytest.approx(30.0 + 75 * (300.0 - 30.0) / 2)


def test_q8_0_bytes_match_ggml_reference_layout():
    x = torch.randn(3, 64) * 0.1
    x[1, :32] = 0.0  # an all-zero block: d = 0, q = 0
    out = llama_peer.q8_0_bytes(x, "cpu")
    assert out.shape == (3, 2 * 34)
    blocks = torch.from_numpy(out.reshape(-1, 34).copy())
    d = blocks[:, :2].contiguous().view(torch.float16).float().flatten()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    ref = x.reshape(-1, 32)
    assert torch.allclose(d, (ref.abs().amax(dim=1) / 127).half().float())
    assert d[2] == 0 and torch.all(q[2] == 0)
    # half a step, plus |q| <= 127 times d's fp16 rounding (2^-11 relative): the bound was 0.51 steps, ~6% flaky
    err = (q * d[:, None] - ref).abs().amax(dim=1)
    assert torch.all(err <= ref.abs().amax(dim=1) / 127 * (0.5 + 127 * 2**-11) + 1e-7)


def _gguf_py():
    """llama.cpp's gguf-py: from LLAMA_CPP_DIR when set, else an installed `gguf`; the test skips without either."""
    if os.environ.get("LLAMA_CPP_DIR"):
        sys.path.insert(0, str(Path(os.environ["LLAMA_CPP_DIR"], "gguf-py")))
    return pytest.importorskip("gguf")


def _random_blocks(gen: torch.Generator) -> torch.Tensor:
    """[3, 8, 128]: random rows at scales from 1e-8 (fp16-subnormal d) to 1e3, with the blocks that test the rules."""
    x = torch.randn(3, 8, 128, generator=gen) * torch.logspace(-8, 3, 8)[None, :, None]
    x[0, 0, :32] = 0.0  # all zeros: d = -0.0, every nibble 8
    x[0, 1, :32] = -x[0, 1, :32].abs()  # the largest magnitude negative: d > 0
    x[0, 2, 32:64] = 0.5
    x[0, 2, 40], x[0, 2, 41] = -3.0, 3.0  # equal magnitudes: the first one's sign
    x[1, 0, :32] = torch.randint(-8, 9, (32,), generator=gen).float() * 0.25  # exact halves: x / d + 8.5 on integers
    return x


def test_q4_0_bytes_are_gguf_py_reference_bytes():
    """Byte for byte what gguf-py's reference Q4_0 (and Q8_0) quantiser writes, on fresh random inputs."""
    gguf = _gguf_py()
    gen = torch.Generator()
    seed = gen.seed()
    for x in (_random_blocks(gen), _random_blocks(gen).bfloat16()):
        ref = x.float().numpy()
        q4 = llama_peer.q4_0_bytes(x, "cpu")
        assert q4.shape == (3, 8, 4 * 18)
        assert (q4 == gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q4_0)).all(), f"seed {seed}"
        q8 = llama_peer.q8_0_bytes(x, "cpu")
        assert (q8 == gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q8_0)).all(), f"seed {seed}"
    zero = llama_peer.q4_0_bytes(torch.zeros(32), "cpu")
    assert zero[:2].view("<f2")[0] == 0 and (zero[2:] == 0x88).all()


def test_q4_0_tensor_follows_llama_quantize():
    for name in (
        "blk.3.ffn_up_exps.weight",
        "blk.3.ffn_down_shexp.weight",
        "blk.0.attn_k_b.weight",
        "token_embd.weight",
    ):
        assert llama_peer.q4_0_tensor(name, 3 if "exps" in name else 2)
    for name, dims in (
        ("output.weight", 2),  # Q6_K in llama-quantize's mix; Q8_0 here
        ("blk.3.ffn_gate_inp.weight", 2),
        ("blk.3.attn_kv_a_norm.weight", 1),
        ("blk.3.indexer.proj.weight", 2),
        ("blk.3.exp_probs_b.bias", 1),
    ):
        assert not llama_peer.q4_0_tensor(name, dims)


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_DIR"), reason="needs llama.cpp's source (LLAMA_CPP_DIR)")
def test_q4_0_conversion_is_llama_quantize_arithmetic_over_llama_cpp_f32(tmp_path):
    """--qtype q4_0 writes what gguf-py's Q4_0 (Q8_0 for output.weight) makes of the stock converter's F32 file,
    tensor by tensor, with the header's file type MOSTLY_Q4_0."""
    gguf = _gguf_py()
    import numpy as np

    from moed.model.checkpoint import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "tiny", dtype="fp8", seed=1, device="cpu")
    fast = tmp_path / "q4.gguf"
    res = llama_peer.convert(ck, fast, Path(os.environ["LLAMA_CPP_DIR"]), "q4_0")
    stock = tmp_path / "f32.gguf"
    _stock_convert(ck, stock, "f32")
    a, b = gguf.GGUFReader(str(fast)), gguf.GGUFReader(str(stock))
    assert a.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q4_0
    Q = gguf.GGMLQuantizationType
    ta = {t.name: t for t in a.tensors}
    assert set(ta) == {t.name for t in b.tensors}
    for t in b.tensors:
        want = Q.F32 if len(t.shape) < 2 or not llama_peer.q4_0_tensor(t.name, len(t.shape)) else Q.Q4_0
        if t.name == "output.weight":
            want = Q.Q8_0
        data = np.asarray(t.data)
        assert ta[t.name].tensor_type == want, t.name
        expect = data if want == Q.F32 else gguf.quants.quantize(data, want)
        assert np.array_equal(np.asarray(ta[t.name].data), expect), t.name
    assert res["tensor_types"]["Q4_0"] > 0 and res["tensor_types"]["Q8_0"] == 1
    shutil.rmtree(tmp_path / "ck")


def _stock_convert(ck: Path, out: Path, outtype: str) -> None:
    """llama.cpp's own convert_hf_to_gguf.py (the tokenizer's pre-tokenizer taken as "glm4", as convert does)."""
    script = (
        "import sys; sys.path[:0] = [sys.argv[1] + '/gguf-py', sys.argv[1]]\n"
        "import convert_hf_to_gguf as C\nfrom conversion import base\n"
        "o = base.TextModel.get_vocab_base_pre\n"
        "def pre(self, t):\n    try:\n        return o(self, t)\n    except NotImplementedError:\n"
        "        return 'glm4'\nbase.TextModel.get_vocab_base_pre = pre\nsys.argv = sys.argv[1:]\nC.main()\n"
    )
    cmd = [sys.executable, "-c", script, os.environ["LLAMA_CPP_DIR"], str(ck), "--outtype", outtype]
    subprocess.run([*cmd, "--outfile", str(out), "--no-mtp"], check=True, capture_output=True)


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_DIR"), reason="needs llama.cpp's source (LLAMA_CPP_DIR)")
def test_fast_gguf_conversion_is_byte_identical_to_llama_cpp(tmp_path):
    """The GPU path through llama.cpp's converter writes the file its stock path writes (tiny FP8 checkpoint)."""
    sys.path.insert(0, str(Path(os.environ["LLAMA_CPP_DIR"], "gguf-py")))
    import gguf
    import numpy as np

    from moed.model.checkpoint import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "tiny", dtype="fp8", seed=0, device="cpu")
    fast = tmp_path / "fast.gguf"
    llama_peer.convert(ck, fast, Path(os.environ["LLAMA_CPP_DIR"]))
    stock = tmp_path / "stock.gguf"
    _stock_convert(ck, stock, "q8_0")
    a, b = gguf.GGUFReader(str(fast)), gguf.GGUFReader(str(stock))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type and np.array_equal(np.asarray(ta[name].data), np.asarray(t.data))
    shutil.rmtree(tmp_path / "ck")


def test_spec_check_runs_on_cpu_at_tiny_sizes(tiny_fp8_checkpoint, tmp_path, capsys):
    """ops/bench/spec_check.py on the tiny checkpoint: staggered streams, MTP on in each mode, the same greedy
    tokens as MTP off and no NaN logprobs (on a CPU the graph modes run eagerly, so this checks the driver)."""
    import json

    from moed.ops.bench import spec_check

    out = tmp_path / "spec.json"
    args = ["--model", tiny_fp8_checkpoint, "--device", "cpu", "--streams", "3", "--prompt-len", "8", "--gen", "5"]
    assert spec_check.main([*args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"off", "graphs", "eager-graphs", "no-graphs"}
    for name, run in res["runs"].items():
        assert run["nan_logprobs"] == 0 and run["numerical_faults"] == 0 and run["errors"] == []
        assert run["replays"]["problems"] == []
        assert name == "off" or (run["first_difference_from_off"] is None and 0 <= run["acceptance"] <= 1)
    assert [len(t) for t in res["runs"]["off"]["tokens_head"]] == [5, 4, 3]
    assert "MTP check" in capsys.readouterr().out
