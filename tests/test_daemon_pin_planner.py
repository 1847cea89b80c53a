"""The pin planner: pins within a budget, operator pin/unpin, state file round trip, async loop."""

from __future__ import annotations

import asyncio
import json

import pytest

from moed.daemon.pin_planner import PinPlanner, PlacementError


def _manager(tmp_path, feed, applied, **kw):
    return PinPlanner(8, [1, 2], pin_budget=3, read_counts=lambda: feed.pop(0) if feed else {},
                            apply=applied.append, state_path=tmp_path / "placement.json", **kw)


def test_pin_planner_pins_hottest_within_budget_and_operator_pins(tmp_path):
    feed = [{1: [0, 9, 1, 7, 0, 0, 5, 0], 2: [1] * 8}]
    applied: list = []
    m = _manager(tmp_path, feed, applied, decay=0.5)
    pins = m.tick()
    assert pins[1] == {1, 3, 6} and pins[2] == {0, 1, 2}  # ties broken by the lower id
    assert applied[-1] == pins
    m.pin(1, 0)
    assert m.pins[1] == {0, 1, 3}
    m.unpin(1, 0)
    assert m.pins[1] == {1, 3, 6}
    with pytest.raises(PlacementError, match="not operator-pinned"):
        m.unpin(1, 5)
    with pytest.raises(PlacementError, match="out of range"):
        m.pin(1, 8)
    with pytest.raises(PlacementError, match="not an offloaded MoE layer"):
        m.pin(7, 0)
    for e in (4, 5, 7):
        m.pin(2, e)
    with pytest.raises(PlacementError, match="pin budget"):
        m.pin(2, 6)
    n = len(applied)
    m.tick()  # no new counts: same plan, nothing re-applied
    assert len(applied) == n


def test_pin_planner_state_round_trips_and_restart_is_warm(tmp_path):
    applied: list = []
    m = _manager(tmp_path, [{1: [5, 0, 0, 0, 0, 0, 0, 9], 2: [0] * 7 + [2]}], applied)
    m.pin(2, 3)
    m.tick()
    state = json.loads((tmp_path / "placement.json").read_text())
    assert state["version"] == 1 and state["operator_pins"]["2"] == [3]
    applied2: list = []
    m2 = _manager(tmp_path, [], applied2)
    assert m2.counts == m.counts and m2.operator_pins == m.operator_pins
    assert m2.replan() == m.pins and applied2 == [m.pins]  # warm: the first plan is the old one
    (tmp_path / "placement.json").write_text("{not json")
    with pytest.raises(PlacementError, match="not a placement state file"):
        _manager(tmp_path, [], [])
    (tmp_path / "placement.json").write_text(json.dumps({"version": 1, "decay": 0.5, "counts": {"1": [1.0]},
                                                         "operator_pins": {}}))
    with pytest.raises(PlacementError, match="has 1 counts"):
        _manager(tmp_path, [], [])


def test_pin_planner_async_loop_updates_and_stops(tmp_path):
    feed = [{1: [0, 0, 3, 0, 0, 0, 0, 0]}, {1: [0, 0, 0, 0, 0, 0, 0, 4]}]
    applied: list = []
    m = _manager(tmp_path, feed, applied, interval_s=0.01)

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(m.run(stop))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not feed:
                break
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(go())
    assert m.pins[1] == {2, 7} and (tmp_path / "placement.json").exists()
    with pytest.raises(PlacementError, match="pin budget"):
        PinPlanner(8, [1], pin_budget=-1, read_counts=dict, apply=print)
