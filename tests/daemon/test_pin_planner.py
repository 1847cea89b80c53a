"""The pin planner: pins within a budget, operator pin/unpin, state file round trip, async loop."""

from __future__ import annotations

import asyncio
import json

import pytest

from moed.daemon.pin_planner import PinPlanner, PlacementError


def _manager(tmp_path, feed, applied, **kw):
    return PinPlanner(
        8,
        [1, 2],
        pin_budget=3,
        read_counts=lambda: feed.pop(0) if feed else {},
        apply=applied.append,
        state_path=tmp_path / "placement.json",
        **kw,
    )


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
    (tmp_path / "placement.json").write_text(
        json.dumps({"version": 1, "decay": 0.5, "counts": {"1": [1.0]}, "operator_pins": {}})
    )
    with pytest.raises(PlacementError, match="has 1 counts"):
        _manager(tmp_path, [], [])
    good = {
        "version": 1,
        "decay": 0.5,
        "counts": {"1": [1.0] * 8, "2": [float("nan")] + [0.0] * 7},
        "operator_pins": {},
    }
    (tmp_path / "placement.json").write_text(json.dumps(good))
    with pytest.raises(PlacementError, match=r"placement\.json: layer 2 has counts that are negative or not finite"):
        _manager(tmp_path, [], [])
    good["counts"]["2"] = [0.0] * 8
    good["operator_pins"] = {"1": [2, 8]}
    (tmp_path / "placement.json").write_text(json.dumps(good))
    with pytest.raises(PlacementError, match=r"placement\.json: layer 1 pins experts \[8\], model has 8"):
        _manager(tmp_path, [], [])
    (tmp_path / "placement.json").write_text(json.dumps({**good, "version": 2}))
    with pytest.raises(PlacementError, match=r"placement\.json: state version 2, expected 1"):
        _manager(tmp_path, [], [])
    m3 = PinPlanner(8, [1, 2], 3, read_counts=dict, apply=print)
    with pytest.raises(PlacementError):
        m3.load(tmp_path / "placement.json")
    assert m3.counts[1] == [0.0] * 8  # nothing taken from a file that fails a check


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


class _FakeEngine:
    """Answers Placement requests as the engine does: pins per cached layer, a set checked against the slots."""

    def __init__(self, slots: dict[int, int]):
        self.slots, self.pinned = slots, {layer: set() for layer in slots}
        self.requests: list = []
        self.channel = None

    def send(self, msg) -> bool:
        from moed.engine import protocol as ep

        self.requests.append(msg)
        ok, text = True, ""
        if msg.op == "set":
            for key, experts in msg.pins.items():
                if len(experts) >= self.slots[int(key)] and self.slots[int(key)] < 16:
                    ok, text = False, f"layer {key}: no slot left"
            if ok:
                self.pinned.update({int(k): set(v) for k, v in msg.pins.items()})
        reply = ep.PlacementReply(
            token=msg.token,
            ok=ok,
            message=text,
            pinned={str(k): sorted(v) for k, v in self.pinned.items()},
            slots={str(k): v for k, v in self.slots.items()},
        )
        asyncio.get_running_loop().call_soon(self.channel.on_reply, reply)
        return True


def test_daemon_placement_budgets_from_slots_and_one_set_per_sync(tmp_path, caplog):
    from moed.daemon.placement import DaemonPlacement, PlacementChannel, pin_budget
    from moed.engine import protocol as ep

    async def go():
        engine = _FakeEngine({1: 8, 2: 8, 3: 16, 5: 3})  # layer 3 holds all 16 experts
        engine.channel = PlacementChannel(engine.send)
        m = DaemonPlacement(engine.channel, 16, 0.5, interval_s=0.01, state_path=tmp_path / "p.json")
        assert [pin_budget(s, 16, 0.5) for s in (1, 2, 8, 15, 16)] == [0, 1, 4, 7, 0]
        assert await m._attach() and m.budgets == {1: 4, 2: 4, 3: 0, 5: 1}
        m.on_engine_stats(
            ep.EngineStats(
                running=1,
                waiting=0,
                kv_usage=0,
                num_steps=1,
                prompt_tokens=0,
                generation_tokens=0,
                preemptions=0,
                expert_counts={"1": list(range(16)), "2": [1] * 16, "5": [0] * 15 + [9]},
            )
        )
        m.planner.update(m._read_counts())
        m.planner.replan()
        engine.requests.clear()
        reply = await m._sync()
        sets = [r for r in engine.requests if r.op == "set"]
        assert len(sets) == 1 and set(sets[0].pins) == {"1", "2", "5"}  # one message for every layer that differs
        assert reply.pinned["1"] == [12, 13, 14, 15] and reply.pinned["2"] == [0, 1, 2, 3] and reply.pinned["5"] == [15]
        engine.requests.clear()
        await m._sync()  # nothing differs now: a get, no set
        assert [r.op for r in engine.requests] == ["get"]
        r = await m.handle("pin", 5, 3)  # the operator's pin fills layer 5's budget of 1 ...
        assert r.ok and r.pinned["5"] == [3] and "50% of its cache slots" in r.message
        r = await m.handle("pin", 5, 4)  # ... so a second one is refused, naming the budget
        assert not r.ok and "pin budget of 1" in r.message
        with pytest.raises(PlacementError, match="pin fraction"):
            DaemonPlacement(engine.channel, 16, 1.5, 1.0, None)

        # An engine without an expert cache: idle, at info level under "auto", as a warning when required.
        def no_cache(msg) -> bool:
            asyncio.get_running_loop().call_soon(
                idle.channel.on_reply,
                ep.PlacementReply(token=msg.token, ok=False, message="expert placement is not available"),
            )
            return True

        for required, level in ((False, "INFO"), (True, "WARNING")):
            caplog.clear()
            idle = DaemonPlacement(PlacementChannel(no_cache), 16, 0.5, 1.0, None, required=required)
            assert not await idle._attach() and idle.planner is None
            assert [r.levelname for r in caplog.records if "placement manager idle" in r.message] == [level]

    with caplog.at_level("INFO", logger="moed.daemon.placement"):
        asyncio.run(go())


def test_daemon_placement_sets_a_corrupt_state_file_aside_and_keeps_persisting(tmp_path, caplog):
    from moed.daemon.placement import DaemonPlacement, PlacementChannel

    state = tmp_path / "placement-glm.json"
    state.write_text('{"version": 1, "counts": {"1": [1, 2')  # cut short, as by a full disk

    async def go():
        engine = _FakeEngine({1: 8, 2: 8})
        engine.channel = PlacementChannel(engine.send)
        m = DaemonPlacement(engine.channel, 16, 0.5, interval_s=0.01, state_path=state)
        assert await m._attach() and m.planner.counts[1] == [0.0] * 16  # cold
        m.planner.update({1: [0] * 15 + [4]})
        m._save()

    with caplog.at_level("ERROR", logger="moed.daemon.placement"):
        asyncio.run(go())
    aside = tmp_path / "placement-glm.json.corrupt"
    assert aside.read_text() == '{"version": 1, "counts": {"1": [1, 2'  # kept for inspection
    [msg] = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"placement: {state}: not a placement state file (JSONDecodeError(")
    assert msg.endswith(f"starting cold, the file kept as {aside}")
    assert json.loads(state.read_text())["counts"]["1"][15] == 4.0  # a new state file under the usual name
