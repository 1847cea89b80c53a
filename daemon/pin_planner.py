"""The pin planner: which experts to pin (resident, never evicted), from activation counts over time.

`PinPlanner` keeps a decayed activation count per (layer, expert), recomputes pins within each layer's pin
budget (one number for every layer, or one per layer: the daemon gives each a share of its cache slots), and
persists the counts and operator pins to a JSON state file (written atomically) so a restart starts warm. It runs
in the daemon (daemon/placement.py drives it and imports no torch) and talks to the engine only through two
callables: `read_counts()` -> {layer: [count per expert]} (activations since the last read) and `apply(pins)` ->
None, which hands {layer: set(experts)} on; the engine's expert offload applies pins between steps. Operator pins
are always kept and count against the budget; the hottest other experts fill the rest. Eviction among unpinned
experts is the claim kernel's (kernels/expert_claim.py).

State file (JSON): {"version": 1, "decay": float, "counts": {"<layer>": [float, ...]},
                    "operator_pins": {"<layer>": [int, ...]}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STATE_VERSION = 1


class PlacementError(ValueError):
    """A bad pin request or state file; the message names the value and what is accepted."""


class PinPlanner:
    def __init__(
        self,
        num_experts: int,
        layers: list[int],
        pin_budget: int | dict[int, int],
        *,
        read_counts: Callable[[], dict[int, list[int]]],
        apply: Callable[[dict[int, set[int]]], None],
        interval_s: float = 30.0,
        decay: float = 0.5,
        state_path: str | Path | None = None,
    ) -> None:
        budgets = pin_budget if isinstance(pin_budget, dict) else dict.fromkeys(layers, pin_budget)
        bad = {layer: b for layer, b in budgets.items() if b < 0}
        if bad or set(budgets) != set(layers):
            raise PlacementError(f"pin budgets {bad or budgets} must be >= 0 experts for each of layers {layers}")
        if not 0.0 <= decay <= 1.0:
            raise PlacementError(f"decay {decay} must be in [0, 1] (weight of the older counts at each update)")
        self.num_experts, self.layers, self.budgets = num_experts, list(layers), budgets
        self.read_counts, self.apply = read_counts, apply
        self.interval_s, self.decay = interval_s, decay
        self.state_path = Path(state_path) if state_path is not None else None
        self.counts: dict[int, list[float]] = {layer: [0.0] * num_experts for layer in self.layers}
        self.operator_pins: dict[int, set[int]] = {layer: set() for layer in self.layers}
        self.pins: dict[int, set[int]] = {layer: set() for layer in self.layers}
        if self.state_path is not None and self.state_path.exists():
            self.load(self.state_path)

    # ------------------------------------------------------------------ operator commands

    def _check(self, layer: int, expert: int) -> None:
        if layer not in self.counts:
            raise PlacementError(f"layer {layer} is not an offloaded MoE layer (layers {self.layers})")
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert {expert} out of range [0, {self.num_experts})")

    def pin(self, layer: int, expert: int) -> dict[int, set[int]]:
        self._check(layer, expert)
        if expert not in self.operator_pins[layer] and len(self.operator_pins[layer]) >= self.budgets[layer]:
            raise PlacementError(
                f"layer {layer}: {len(self.operator_pins[layer])} operator pins already fill the "
                f"pin budget of {self.budgets[layer]}; unpin one first"
            )
        self.operator_pins[layer].add(expert)
        return self.replan()

    def unpin(self, layer: int, expert: int) -> dict[int, set[int]]:
        self._check(layer, expert)
        if expert not in self.operator_pins[layer]:
            raise PlacementError(
                f"layer {layer}: expert {expert} is not operator-pinned "
                f"(operator pins: {sorted(self.operator_pins[layer])})"
            )
        self.operator_pins[layer].discard(expert)
        return self.replan()

    # ------------------------------------------------------------------ planning

    def update(self, fresh: dict[int, list[int]]) -> None:
        """Fold activation counts since the last read into the decayed counts."""
        for layer, row in fresh.items():
            if layer not in self.counts:
                continue
            if len(row) != self.num_experts:
                raise PlacementError(f"layer {layer}: {len(row)} counts, expected {self.num_experts}")
            old = self.counts[layer]
            self.counts[layer] = [self.decay * o + c for o, c in zip(old, row)]

    def plan(self) -> dict[int, set[int]]:
        """Pins per layer: operator pins, then the hottest experts up to the budget (ties: lower id)."""
        out = {}
        for layer in self.layers:
            pins = set(self.operator_pins[layer])
            ranked = sorted(range(self.num_experts), key=lambda e: (-self.counts[layer][e], e))
            for e in ranked:
                if len(pins) >= self.budgets[layer]:
                    break
                if self.counts[layer][e] > 0:
                    pins.add(e)
            out[layer] = pins
        return out

    def replan(self) -> dict[int, set[int]]:
        new = self.plan()
        if new != self.pins:
            self.pins = new
            self.apply(new)
        return new

    def tick(self) -> dict[int, set[int]]:
        """One iteration of the loop: read, fold, replan, persist."""
        self.update(self.read_counts())
        pins = self.replan()
        if self.state_path is not None:
            self.save(self.state_path)
        return pins

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Recompute pins every interval_s until `stop` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        self.replan()  # warm start: pins from the persisted counts before the first interval
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            try:
                self.tick()
            except Exception:  # a failed read must not end placement; the next tick retries
                log.exception("placement update failed")

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        path = Path(path)
        state = {
            "version": STATE_VERSION,
            "decay": self.decay,
            "counts": {str(k): v for k, v in self.counts.items()},
            "operator_pins": {str(k): sorted(v) for k, v in self.operator_pins.items()},
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data (a power cut would leave it empty)
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        path = Path(path)
        try:
            state = json.loads(path.read_bytes())
            if state.get("version") != STATE_VERSION:
                raise PlacementError(f"{path}: state version {state.get('version')!r}, expected {STATE_VERSION}")
            counts = {int(k): [float(x) for x in v] for k, v in state["counts"].items()}
            op = {int(k): {int(x) for x in v} for k, v in state["operator_pins"].items()}
        except OSError as e:
            raise PlacementError(f"{path}: cannot read the placement state file ({e})") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON and Unicode errors are ValueErrors
            if isinstance(e, PlacementError):
                raise
            raise PlacementError(f"{path}: not a placement state file ({e!r})") from None
        # Check everything before taking anything: a bad file leaves the planner cold, not half loaded.
        counts = {layer: row for layer, row in counts.items() if layer in self.counts}
        op = {layer: pins for layer, pins in op.items() if layer in self.operator_pins}
        for layer, row in counts.items():
            if len(row) != self.num_experts:
                raise PlacementError(
                    f"{path}: layer {layer} has {len(row)} counts, model has {self.num_experts} experts"
                )
            if not all(0.0 <= x < math.inf for x in row):
                raise PlacementError(f"{path}: layer {layer} has counts that are negative or not finite")
        for layer, pins in op.items():
            bad = sorted(e for e in pins if not 0 <= e < self.num_experts)
            if bad:
                raise PlacementError(f"{path}: layer {layer} pins experts {bad}, model has {self.num_experts}")
        self.counts.update(counts)
        for layer, pins in op.items():
            self.operator_pins[layer] = set(sorted(pins)[: self.budgets[layer]])
        log.info("placement state loaded from %s (%d layers)", path, len(counts))
