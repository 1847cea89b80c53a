"""Host wall time per engine step phase, summed over a stats window (`EngineStats.step_time_s`)."""

from __future__ import annotations

import time


class StepTimes:
    """Host wall time per step phase: laps within a step, means over the steps of a stats window.

    Phases: schedule; prepare (host packing, sampling rows, the logits and sampler launches); launch (uploads,
    forward or graph replay, the token copy to the host); wait (blocked at the read-back); commit; with MTP,
    sample (sampling and verification, their waits included) and draft; total is the `step()` call."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self._current: dict[str, float] = {}
        self._t0 = self._t = 0.0

    def start(self) -> None:
        self._current = {}
        self._t0 = self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap (or the start) to `phase`."""
        now = time.perf_counter()
        self._current[phase] = self._current.get(phase, 0.0) + now - self._t
        self._t = now

    def end(self) -> None:
        self._current["total"] = time.perf_counter() - self._t0
        for k, v in self._current.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def take_means(self) -> dict[str, float]:
        out = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return out
