"""ops/bench/hitrate*.py at small sizes: the deployment arithmetic, the simulation's bookkeeping, the oracle as a
ceiling, the split as the engine builds it, a warm restart, and the quick command end to end."""

from __future__ import annotations

import numpy as np

from moed.offload.traces import skewed_trace, trace_statistics
from moed.ops.bench import hitrate
from moed.ops.bench import hitrate_arithmetic as arith
from moed.ops.bench import hitrate_sim as sim


def test_hitrate_deployment_of_glm51_on_an_80gb_gpu():
    dep = arith.deployment(79.6, 32768, 4.0)
    # 75 MoE layers x 256 experts x 37.76 MB (FP8 + block scales) = 725 GB; the rest ~22 GB as released in FP8.
    assert 724e9 < dep["all_expert_bytes_fp8"] < 726e9 and 20e9 < dep["nonexpert_bytes_fp8"] < 23e9
    assert 0.06 < dep["fraction_nonexpert_fp8"] < 0.09 and dep["slots_fp8"] == 19 and dep["slots_int4"] == 38
    # int4 as the host store lays it out: half of FP8's weight bytes plus bf16 scales and 4-bit zeros per 128 inputs,
    # so the whole model's experts fit in under 400 GB of host memory (issue 18's target).
    w = 3 * 2048 * 6144  # gate, up and down of one expert
    assert dep["expert_bytes_int4"] == w // 2 + w // 128 * 2 + w // 128 // 2
    assert 370e9 < dep["all_expert_bytes_int4"] < 400e9
    assert dep["slots_nonexpert_bf16"] < dep["slots_fp8"]
    assert dep["kv_bytes"] == 32768 * 78 * 1284  # MLA latent + rope key (bf16) and the indexer's FP8 key + scale


def test_hitrate_split_table_is_the_engines():
    table, sizes = sim.split_table(sim.Shape(1), cpu_rate=80e9, copy_rate=50e9)
    assert list(sizes) == list(range(1, 9))  # routed_experts.py splits steps of at least 1..8 tokens
    assert int(table[1, 1]) == 1 and int(table[1, 8]) == 5  # a lone miss to the CPU; 8 misses: 5 CPU, 3 copied
    # every decode step of the engine's batch shares its misses with the CPU: 8 sequences with MTP are 16 tokens
    assert list(sim.split_table(sim.Shape(8, 1), 80e9, 50e9)[1]) == list(range(1, 17))
    table, sizes = sim.split_table(sim.Shape(64), 80e9, 50e9)
    assert sizes[-1] == 64 and int(table[64, 161]) == 99  # batch 64: 161 misses, 99 to the CPU as 80 : 50 says


def test_hitrate_simulation_counts_every_needed_expert_and_the_oracle_bounds_it():
    shape = sim.Shape(1)
    steps = sim.make_trace("skewed", shape, 160, seed=0)
    rows = {p.name: sim.simulate(steps, 12, p, shape, 40, 80e9, 50e9, 32) for p in sim.POLICIES}
    for name, r in rows.items():
        assert r["steps"] == 120 and abs(r["hits"] + r["copied"] + r["cpu"] - r["distinct"]) < 1e-9, name
        assert r["cpu"] > 0 and r["hybrid"]  # batch 1: the split gives the CPU some misses
        hist = np.asarray(r["miss_hist"])  # the split's misses per step are the cache's copies + the CPU's
        assert hist.sum() == 120 and np.isclose(hist @ np.arange(len(hist)) / 120, r["copied"] + r["cpu"]), name
    assert rows["oracle"]["hit_rate"] >= max(r["hit_rate"] for r in rows.values())
    assert rows["pinned-50%+lru"]["pins"] == 6 and rows["lru"]["pins"] == 0
    # Batch 8 with MTP (16 tokens a step): a decode step, so the CPU shares its misses.
    shape = sim.Shape(8, 1)
    r = sim.simulate(sim.make_trace("uniform", shape, 12, seed=1), 12, sim.POLICIES[0], shape, 4, 80e9, 50e9, 256)
    assert r["hybrid"] and r["cpu"] > 0 and r["distinct"] > 12
    # 150 sequences with MTP (300 tokens a step, above HYBRID_MAX_TOKENS): no split, rounds over the 12 slots.
    shape = sim.Shape(150, 1)
    r = sim.simulate(sim.make_trace("uniform", shape, 6, seed=1), 12, sim.POLICIES[0], shape, 2, 80e9, 50e9, 256)
    assert not r["hybrid"] and r["cpu"] == 0 and r["distinct"] > 12


def test_hitrate_restart_from_the_state_file_starts_with_pins(tmp_path):
    shape = sim.Shape(1)
    policy = sim.shipped_policy()
    assert policy.pin_fraction > 0  # the shipped default pins
    state = tmp_path / "placement.json"
    sim.simulate(sim.make_trace("popular", shape, 200, seed=3), 12, policy, shape, 0, 80e9, 50e9, 64, state_path=state)
    assert state.exists()
    after = sim.make_trace("popular", shape, 24, seed=4)
    warm = sim.simulate(after, 12, policy, shape, 0, 80e9, 50e9, 64, state_path=state)
    cold = sim.simulate(after, 12, policy, shape, 0, 80e9, 50e9, 64)
    assert warm["pins"] == 6 and cold["pins"] == 0  # no interval passed: only the state file can have pinned
    assert warm["hit_rate"] > cold["hit_rate"]


def test_hitrate_bytes_per_accepted_token():
    row = {"copied": 2.0, "cpu": 1.0, "hits": 5.0, "distinct": 8.0}
    b = arith.bytes_per_token(row, 10**9, 0.5, sim.Shape(4, 1))  # 4 sequences x 1.5 accepted tokens a step
    assert abs(b["moved_GB"] - 3 * 75 / 6) < 1e-9 and abs(b["hbm_GB"] - 5 * 75 / 6) < 1e-9


def test_hitrate_finer_split_bound_against_the_whole_expert_split():
    # Two steps with one miss and one with three, 1 GB experts, CPU 80 GB/s and copies 50 GB/s: one miss goes to the
    # CPU (12.5 ms; both sides together 1000/130 ms); three split 2 CPU + 1 copied (25 ms against 3000/130).
    f = arith.finer_split_bound({"miss_hist": [0, 2, 0, 1], "shape": "b1"}, 10**9, 80.0, 50.0)
    assert f["steps"] == 3 and np.isclose(f["misses"], 5 / 3)
    assert np.isclose(f["whole_ms"], (2 * 12.5 + 25) / 3) and np.isclose(f["column_ms"], 5000 / 130 / 3)
    assert np.isclose(f["saved_ms_per_token"], (f["whole_ms"] - f["column_ms"]) * sim.MOE_LAYERS)
    assert f["by_misses"][1]["share_of_steps"] == 2 / 3 and 2 not in f["by_misses"]


def test_hitrate_quick_command_prints_the_tables(capsys):
    out = hitrate.main(["--quick"])
    text = capsys.readouterr().out
    assert "Hit rate" in text and "Expert bytes per accepted token" in text and "Prefetch" in text
    assert {r["shape"] for r in out["rows"]} == {"b1", "b8+mtp1"} and out["restart"]
    assert out["default_policy"] in {r["policy"] for r in out["rows"]}
    dep = out["deployment"]
    assert (
        out["caches"]["int4"]
        == dep["slots_int4"]
        == dep["cache_bytes_nonexpert_fp8"] // (dep["expert_bytes_int4"] * sim.MOE_LAYERS)
    )
    assert "Finer miss split" in text and {f["shape"] for f in out["finer_split"]} == {"b1", "b8+mtp1"}  # both split
    s = out["traces"]["skewed"]["b1"]
    assert s.keys() == trace_statistics(skewed_trace(10, 1, 256, 8), 256).keys()
