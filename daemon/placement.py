"""Expert placement requests: the channel to the engine, and the placement manager run in the daemon.

Clients send Placement requests (get, pin, unpin, reset). Without a placement manager they are
forwarded to the engine as `engine.protocol.Placement` and answered from its PlacementReply,
matched by token. A placement manager runs inside the daemon as an asyncio task: pass a factory to
`Daemon(placement_factory=...)`, or leave `placement` at "auto" (with moe = offload) or set "on" in the
configuration, which runs `DaemonPlacement`. The factory receives the `PlacementChannel` (to apply plans to the
engine); the manager then gets every EngineStats (per-expert counts) and answers clients' placement requests.

`DaemonPlacement` drives the `PinPlanner` (daemon/pin_planner.py: decayed counts, pins within a per-layer
budget, JSON state file) and makes the engine's pins the planner's: each interval it asks the engine for its
pins (`get`) and sends one `set` with the whole pin set of every layer that differs, so a restarted worker gets
its pins back within one interval and a plan for 75 layers costs one message. A layer's budget is
`pin_fraction` of the slots its cache reports (at most all but one; none where every expert is resident):
pinned-hot experts plus the cache's own eviction among the rest, the policy ops/bench/hitrate.py measured best.
Operator pins are the planner's `operator_pins`: kept by every recomputation, counted against the budget,
persisted in the state file. A state file that cannot be loaded (corrupt, another version, another model's shape)
is logged with its name and moved aside to NAME.corrupt; the manager starts cold and writes a new one. An operator
`unpin` only removes operator pins; `reset` (of a layer, or of all) drops that layer's operator pins and its
counts, so pins come back only as new counts arrive. When the engine reports no expert cache the manager stays
idle and forwards requests; with `required` ("on") it says so as a warning, else at info level.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from moed.daemon.pin_planner import PinPlanner, PlacementError
from moed.engine import protocol as ep
from moed.offload.pins import pin_budget

log = logging.getLogger(__name__)


class PlacementUnavailable(Exception):
    pass


class PlacementChannel:
    """Sends Placement commands to the engine and resolves each reply by its token."""

    def __init__(self, send: Callable[[ep.ToWorker], bool], timeout_s: float = 30.0):
        self._send = send
        self.timeout_s = timeout_s
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[ep.PlacementReply]] = {}

    async def request(
        self, op: str, layer: int | None = None, expert: int | None = None, pins: dict[str, list[int]] | None = None
    ) -> ep.PlacementReply:
        token = next(self._tokens)
        fut: asyncio.Future[ep.PlacementReply] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        try:
            if not self._send(
                ep.Placement(
                    op=op,
                    layer=layer,
                    expert=expert,
                    token=token,  # type: ignore[arg-type]
                    pins=pins,
                )
            ):
                raise PlacementUnavailable("engine is not ready")
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise PlacementUnavailable(
                f"engine did not answer the placement request within {self.timeout_s:.0f} s"
            ) from None
        finally:
            self._waiting.pop(token, None)

    def on_reply(self, reply: ep.PlacementReply) -> None:
        fut = self._waiting.get(reply.token)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def fail_all(self, reason: str) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(PlacementUnavailable(reason))


class PlacementManager(Protocol):
    """What a placement manager implements to run inside the daemon."""

    async def run(self) -> None:
        """The manager's long-running task (persist counts, compute and apply pin plans)."""

    def on_engine_stats(self, stats: ep.EngineStats) -> None:
        """Called for every EngineStats the worker sends (expert_counts since the previous one)."""

    async def handle(self, op: str, layer: int | None, expert: int | None) -> ep.PlacementReply:
        """Answer a client's placement request (the token of the reply is not used)."""


PlacementFactory = Callable[[PlacementChannel], PlacementManager]


class DaemonPlacement:
    """Runs the pin planner against the engine through a PlacementChannel.

    The planner is built once the engine first answers a `get` (which names its cached layers);
    until then, and when the engine has no expert cache (moe=torch), requests go to the engine as is.
    """

    def __init__(
        self,
        channel: PlacementChannel,
        num_experts: int,
        pin_fraction: float,
        interval_s: float,
        state_path: str | Path | None,
        decay: float = 0.5,
        attach_retry_s: float = 0.5,
        required: bool = True,
    ):
        if not 0.0 <= pin_fraction <= 1.0:
            raise PlacementError(f"pin fraction {pin_fraction} must be in [0, 1] (a share of each layer's slots)")
        self.channel = channel
        self.num_experts, self.pin_fraction, self.interval_s = num_experts, pin_fraction, interval_s
        self.state_path = Path(state_path) if state_path is not None else None
        self.decay, self.attach_retry_s, self.required = decay, attach_retry_s, required
        self.budgets: dict[int, int] = {}
        self.planner: PinPlanner | None = None
        self.unsupported = ""  # the engine's reason when it has no expert cache
        self._fresh: dict[int, list[int]] = {}  # counts since the planner's last read
        self._wanted: dict[int, set[int]] = {}
        self._sync_lock = asyncio.Lock()  # one pin/unpin sequence at a time (periodic and operator)
        self.on_synced: Callable[[dict[str, list[int]], int], None] | None = None  # (engine pins, changes): metrics

    # --- fed by the daemon ----------------------------------------------------------------------

    def on_engine_stats(self, stats: ep.EngineStats) -> None:
        for key, row in stats.expert_counts.items():
            layer = int(key)
            if len(row) != self.num_experts:
                log.warning(
                    "placement: layer %s reports %d expert counts, model has %d; ignored",
                    key,
                    len(row),
                    self.num_experts,
                )
                continue
            acc = self._fresh.get(layer)
            self._fresh[layer] = list(row) if acc is None else [a + c for a, c in zip(acc, row)]

    def _read_counts(self) -> dict[int, list[int]]:
        fresh, self._fresh = self._fresh, {}
        return fresh

    def _apply(self, pins: dict[int, set[int]]) -> None:
        self._wanted = {layer: set(p) for layer, p in pins.items()}  # sent by the next _sync

    # --- the task -------------------------------------------------------------------------------

    async def _attach(self) -> bool:
        """Build the planner from the engine's cached layers and their slots; False while the engine cannot say."""
        try:
            reply = await self.channel.request("get")
        except PlacementUnavailable:
            return False
        why = reply.message if not reply.ok else "" if reply.slots else "the engine reports no expert cache slots"
        if why:
            if not self.unsupported:
                (log.warning if self.required else log.info)("placement manager idle: %s", why)
            self.unsupported = why
            return False
        self.unsupported = ""
        layers = sorted(int(k) for k in reply.slots)
        self.budgets = {
            layer: pin_budget(reply.slots[str(layer)], self.num_experts, self.pin_fraction) for layer in layers
        }

        def planner(state_path: Path | None) -> PinPlanner:
            return PinPlanner(
                self.num_experts,
                layers,
                self.budgets,
                read_counts=self._read_counts,
                apply=self._apply,
                interval_s=self.interval_s,
                decay=self.decay,
                state_path=state_path,
            )

        try:
            self.planner = planner(self.state_path)
        except PlacementError as e:
            self.planner = planner(None)
            self._set_aside(e)
        self._wanted = {layer: set(p) for layer, p in self.planner.pins.items()}
        self.planner.replan()  # warm start from the state file
        log.info(
            "placement manager: layers %s, %d experts, pins %s per layer (%.0f%% of slots %s), every %.0f s, state %s",
            layers,
            self.num_experts,
            sorted(set(self.budgets.values())),
            100 * self.pin_fraction,
            sorted(set(reply.slots.values())),
            self.interval_s,
            self.state_path or "not kept",
        )
        return True

    def _set_aside(self, error: PlacementError) -> None:
        """A state file that cannot be loaded: start cold, keep the file for inspection under `.corrupt` and go on
        persisting to the usual name; where it cannot be moved, write nothing (the operator's file stays)."""
        assert self.state_path is not None
        aside = self.state_path.with_name(self.state_path.name + ".corrupt")
        try:
            os.replace(self.state_path, aside)
        except OSError as e:
            log.error(
                "placement: %s; starting cold and not writing the state file (cannot move it to %s: %s)",
                error,
                aside,
                e,
            )
            self.state_path = None
            return
        log.error("placement: %s; starting cold, the file kept as %s", error, aside)

    async def _sync(self) -> ep.PlacementReply:
        """Make the engine's pins the planner's: one `set` with every layer whose pins differ. Returns the
        engine's pins after the change."""
        async with self._sync_lock:
            have = await self.channel.request("get")
            if not have.ok:
                return have
            changes = 0
            differ = {
                str(layer): sorted(want)
                for layer, want in sorted(self._wanted.items())
                if set(have.pinned.get(str(layer), [])) != want
            }
            if differ:
                r = await self.channel.request("set", pins=differ)
                if not r.ok:
                    log.warning("placement: engine refused the pins of layers %s: %s", sorted(differ), r.message)
                else:
                    changes = sum(len(set(have.pinned.get(k, [])) ^ set(v)) for k, v in differ.items())
                    have = r
            if self.on_synced is not None:
                self.on_synced(have.pinned, changes)
            return have

    def _save(self) -> None:
        if self.planner is not None and self.state_path is not None:
            try:
                self.state_path.parent.mkdir(parents=True, exist_ok=True)
                self.planner.save(self.state_path)
            except OSError as e:
                log.warning("placement: cannot write state file %s: %s", self.state_path, e)

    async def run(self) -> None:
        try:
            while self.planner is None:
                if not await self._attach():
                    await asyncio.sleep(self.attach_retry_s if not self.unsupported else self.interval_s)
            while True:
                try:
                    await self._sync()
                except PlacementUnavailable as e:  # worker restarting: the next interval re-sends the pins
                    log.info("placement: engine unavailable (%s); retrying next interval", e)
                await asyncio.sleep(self.interval_s)
                try:
                    self.planner.update(self._read_counts())
                    self.planner.replan()
                except PlacementError:
                    log.exception("placement update failed")
                self._save()
        finally:
            self._save()

    # --- operator requests ----------------------------------------------------------------------

    async def handle(self, op: str, layer: int | None, expert: int | None) -> ep.PlacementReply:
        if self.planner is None and not await self._attach():
            return await self.channel.request(op, layer, expert)  # the engine says why (or it is starting)
        planner = self.planner
        assert planner is not None
        try:
            if op == "pin" or op == "unpin":
                if layer is None or expert is None:
                    raise PlacementError(f"placement {op} needs a layer and an expert")
                (planner.pin if op == "pin" else planner.unpin)(layer, expert)
            elif op == "reset":
                if layer is not None and layer not in planner.counts:
                    raise PlacementError(f"layer {layer} is not an offloaded MoE layer (layers {planner.layers})")
                for lay in [layer] if layer is not None else planner.layers:
                    planner.operator_pins[lay] = set()
                    planner.counts[lay] = [0.0] * self.num_experts
                planner.replan()
            elif op != "get":
                raise PlacementError(f"unknown placement op {op!r} (get, pin, unpin, reset)")
        except PlacementError as e:
            return ep.PlacementReply(token=0, ok=False, message=str(e), pinned=await self._pinned())
        if op != "get":
            self._save()
        reply = await self._sync() if op != "get" else await self.channel.request("get")
        ops = {str(k): sorted(v) for k, v in planner.operator_pins.items() if v}
        budgets = sorted(set(self.budgets.values()))
        note = (
            f"operator pins {ops}, budget {budgets[0] if len(budgets) == 1 else budgets} per layer "
            f"({100 * self.pin_fraction:.0f}% of its cache slots)"
        )
        return ep.PlacementReply(
            token=0, ok=reply.ok, pinned=reply.pinned, message=f"{reply.message}; {note}" if reply.message else note
        )

    async def _pinned(self) -> dict[str, list[int]]:
        with contextlib.suppress(PlacementUnavailable):
            return (await self.channel.request("get")).pinned
        return {}
