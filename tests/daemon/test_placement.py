"""The placement manager in the daemon with the real CPU engine worker on the tiny checkpoint.

The engine runs the offload MoE runner (`--moe offload`, an expert cache of 8 of the 16 experts per
layer; its kernels run under TRITON_INTERPRET on CPU), the only runner that takes pins. Checked:
expert counts flow from EngineStats into the planner; its pin plan reaches the engine (read back
with a placement get, which the engine answers from its own pin state); operator pins survive the
periodic recomputation; the state file is written, and a restarted daemon starts from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from daemon_harness import (  # noqa: F401
    HAVE_REAL_WORKER,
    NO_REAL_WORKER,
    REAL_WORKER,
    DaemonThread,
    hang_guard,
    make_config,
    metric_value,
    scrape,
)

from moed.client.api import Client
from moed.daemon.pin_planner import PinPlanner

pytestmark = pytest.mark.skipif(not HAVE_REAL_WORKER, reason=NO_REAL_WORKER)

CACHE_GB = 3 * 8 * 49152 / 2**30  # 8 of the tiny model's 16 experts (bf16, 49152 bytes each) in each of 3 layers
BUDGET = 3  # placement_pin_fraction 0.375 of 8 slots


def _daemon(model: str, state: Path, interval_s: float) -> DaemonThread:
    cfg = make_config(
        model,
        worker=REAL_WORKER,
        stats_interval_s=0.1,
        placement="on",
        placement_pin_fraction=0.375,
        placement_interval_s=interval_s,
        placement_state_file=str(state),
        moe="offload",
        expert_cache_gb=CACHE_GB,
    )
    d = DaemonThread(cfg)
    d.wait_ready(120)
    d.wait_for(lambda: d.daemon.placement_manager.planner is not None, 30, "placement manager attached")
    return d


def _engine_pins(d: DaemonThread) -> dict[str, list[int]]:
    """The engine's own pins, asked directly (not through the manager)."""
    import asyncio

    return asyncio.run_coroutine_threadsafe(d.daemon.placement.request("get"), d.loop).result(30).pinned


def test_daemon_placement_counts_pins_and_state_file(tiny_checkpoint, tmp_path):
    state = tmp_path / "placement.json"
    with _daemon(tiny_checkpoint, state, interval_s=0.3) as d, Client(d.address, timeout=60) as c:
        planner = d.daemon.placement_manager.planner
        assert planner.layers == [1, 2, 3]
        r = c.placement("pin", 1, 15)  # an operator pin: kept by every recomputation
        assert r.ok and 15 in r.pinned["1"], r
        c.generate("placement follows the counts", max_tokens=12, ignore_eos=True)
        d.wait_for(lambda: all(sum(planner.counts[lay]) > 0 for lay in planner.layers), 10, "counts in the planner")

        def settled() -> bool:  # full budget planned in every layer, and the engine holds exactly that plan
            return all(len(p) == BUDGET for p in planner.pins.values())

        d.wait_for(settled, 10, "pin plans filled")
        end = time.monotonic() + 10
        while True:
            want = d.call(lambda: {str(k): sorted(v) for k, v in planner.plan().items()})
            if _engine_pins(d) == want or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert _engine_pins(d) == want
        assert 15 in want["1"]
        # The manager's syncs are exported: pins per layer and the pins/unpins it applied.
        end = time.monotonic() + 10  # scraped from this thread: the metrics server runs on the daemon's loop
        while (
            metric_value(scrape(d.metrics_url + "/metrics")[1], "moed_expert_pinned", {"layer": "2"}) != len(want["2"])
            and time.monotonic() < end
        ):
            time.sleep(0.1)
        text = scrape(d.metrics_url + "/metrics")[1]
        assert all(metric_value(text, "moed_expert_pinned", {"layer": k}) == len(v) for k, v in want.items())
        assert metric_value(text, "moed_placement_pin_changes_total") >= sum(len(v) for v in want.values())
        assert metric_value(text, "moed_placement_syncs_total") >= 1
        hottest = max(range(16), key=lambda e: (planner.counts[2][e], -e))
        assert hottest in want["2"]
        r = c.placement("get")
        assert r.ok and r.pinned == _engine_pins(d) and "operator pins {'1': [15]}" in r.message
        auto = next(e for e in want["2"])
        r = c.placement("unpin", 2, auto)  # not an operator pin: refused, nothing changes
        assert not r.ok and "not operator-pinned" in r.message
        r = c.placement("pin", 7, 1)
        assert not r.ok and "layer 7" in r.message
        d.wait_for(lambda: state.exists(), 5, "state file written")
    saved = json.loads(state.read_text())  # written again on stop
    assert saved["operator_pins"]["1"] == [15] and sum(saved["counts"]["2"]) > 0

    # Restart: the planner starts from the file; with a long interval no recomputation happens, so the
    # engine's pins are exactly the plan of the saved counts and operator pins.
    offline = PinPlanner(16, [1, 2, 3], BUDGET, read_counts=dict, apply=lambda pins: None, state_path=state)
    expected = {str(k): sorted(v) for k, v in offline.plan().items()}
    assert 15 in expected["1"] and all(len(p) == BUDGET for p in expected.values())
    with _daemon(tiny_checkpoint, state, interval_s=600) as d, Client(d.address, timeout=60) as c:
        planner = d.daemon.placement_manager.planner
        assert d.call(lambda: planner.counts) == {int(k): v for k, v in saved["counts"].items()}
        end = time.monotonic() + 10
        while _engine_pins(d) != expected and time.monotonic() < end:
            time.sleep(0.1)
        assert _engine_pins(d) == expected
        r = c.placement("reset", 1)  # drops layer 1's operator pins and counts
        assert r.ok and r.pinned["1"] == [] and r.pinned["2"] == expected["2"], r
    assert json.loads(state.read_text())["operator_pins"]["1"] == []


def test_daemon_placement_config(tmp_path, monkeypatch):
    from moed.daemon.config import ConfigError, load_config

    model = str(tmp_path)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    cfg, _ = load_config(
        None,
        {"MOED_PLACEMENT": "on", "MOED_PLACEMENT_PIN_FRACTION": "0.25", "MOED_MOE": "offload"},
        {"model": model, "placement_interval_s": "5"},
        check_files=False,
    )
    assert (cfg.placement, cfg.placement_pin_fraction, cfg.placement_interval_s) == ("on", 0.25, 5.0)
    assert cfg.placement_state_path == tmp_path / "state" / f"placement-{tmp_path.name}.json"
    cfg, _ = load_config(None, {}, {"model": model, "placement_state_file": "none"}, check_files=False)
    assert (cfg.placement, cfg.placement_pin_fraction) == ("auto", 0.5) and cfg.placement_state_path is None
    with pytest.raises(ConfigError, match="placement from flag --placement: must be one of auto, on, off"):
        load_config(None, {}, {"model": model, "placement": "yes"}, check_files=False)
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="placement_pin_fraction from environment MOED_PLACEMENT_PIN_FRACTION"):
            load_config(None, {"MOED_PLACEMENT_PIN_FRACTION": bad}, {"model": model}, check_files=False)
