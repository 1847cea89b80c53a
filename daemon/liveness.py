"""Liveness: the loops that receive and send stamp their progress here, and the systemd watchdog,
/ready and /health believe only those stamps.

A loop registers once (`Liveness.register`) and calls `Loop.beat()` whenever it has done work. A
loop with nothing to do must not look stale, so it may come with a probe: an end-to-end request
through the loop (the ZMQ frontend's is a Health message from an in-process socket), run every
third of `stale_after_s` whatever the traffic; its answer passing through the loop makes it beat,
and a probe unanswered for `stale_after_s` marks the loop stuck. A loop is live unless it failed
for good (`Loop.fail`: a component that gave up, e.g. a worker crash loop) or, while `active()`
(the worker link only while the worker is ready), its last probe went unanswered or it has not beat
for `stale_after_s`. `run()` checks every loop each tick; the daemon pets the watchdog only on
ticks where all are live, and a blocked event loop runs no tick, so it stops the watchdog too.

A front end in the daemon's loop (an HTTP server, say) joins with:
    live = daemon.liveness.register("http", daemon.loop_stale_s, probe=get_health_through_my_socket)
    live.beat()  # whenever it has received or answered something
    daemon.liveness.spawn("http", serve_forever)  # its own loop, if it has one, as a guarded task

Serving tasks run under `spawn`: an exception (or a return) is logged with its traceback and the
task restarts after a short pause; `MAX_FAILURES` within `FAILURE_WINDOW_S` call `on_fatal`, which
must end the process with a non-zero status so that systemd restarts it. No serving task ends
silently.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_FAILURES = 5  # failures of one serving task within FAILURE_WINDOW_S that end the daemon
FAILURE_WINDOW_S = 60.0
RESTART_DELAY_S = 0.1  # first pause before a failed task restarts; doubles per failure, at most 5 s


class Loop:
    """One registered loop. `beat()` is cheap (one clock read): call it per batch of work."""

    __slots__ = (
        "active",
        "failed",
        "last_beat",
        "last_probe",
        "name",
        "probe",
        "probe_error",
        "probing",
        "stale_after_s",
    )

    def __init__(
        self,
        name: str,
        stale_after_s: float,
        probe: Callable[[], Awaitable[None]] | None,
        active: Callable[[], bool] | None,
    ):
        self.name = name
        self.stale_after_s = stale_after_s
        self.probe = probe
        self.active = active
        self.last_beat = time.monotonic()
        self.probe_error: str | None = None
        self.probing: asyncio.Task | None = None
        self.last_probe = 0.0
        self.failed: str | None = None

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def fail(self, reason: str) -> None:
        """The component behind this loop gave up for good (e.g. a worker crash loop): never live again."""
        self.failed = reason

    def problem(self, now: float) -> str | None:
        """Why this loop is not live, or None."""
        if self.failed is not None:
            return f"{self.name}: {self.failed}"
        if self.active is not None and not self.active():
            return None
        if self.probe_error is not None:
            return f"{self.name}: {self.probe_error}"
        silent = now - self.last_beat
        if silent > self.stale_after_s:
            return f"{self.name}: no progress for {silent:.1f} s (limit {self.stale_after_s:g} s)"
        return None


class Liveness:
    def __init__(self, on_fatal: Callable[[str], None], on_failure: Callable[[str], None] = lambda name: None):
        """`on_fatal(reason)`: a serving task keeps failing; `on_failure(task)`: one failed (for a metric)."""
        self.on_fatal = on_fatal
        self.on_failure = on_failure
        self.loops: dict[str, Loop] = {}
        self.lag_s = 0.0  # how late the last tick ran: the event loop's lag
        self.failures: collections.Counter[str] = collections.Counter()  # serving task -> failures so far
        self._recent: dict[str, collections.deque[float]] = {}
        self._stuck: set[str] = set()  # names of the loops found not live at the last check
        self._tasks: set[asyncio.Task] = set()

    def register(
        self,
        name: str,
        stale_after_s: float,
        *,
        probe: Callable[[], Awaitable[None]] | None = None,
        active: Callable[[], bool] | None = None,
    ) -> Loop:
        """A loop that must make progress every `stale_after_s` while `active()` (default: always).
        `probe`: an async end-to-end check through the loop, for loops that may sit idle."""
        if name in self.loops:
            raise ValueError(f"a loop named {name!r} is registered already")
        loop = self.loops[name] = Loop(name, stale_after_s, probe, active)
        return loop

    def unregister(self, loop: Loop) -> None:
        if self.loops.get(loop.name) is loop:
            del self.loops[loop.name]
        if loop.probing is not None:
            loop.probing.cancel()

    def problems(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [p for p in (loop.problem(now) for loop in self.loops.values()) if p is not None]

    # --- guarded serving tasks ------------------------------------------------------------------

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """Run `run()` as a serving task: restarted when it fails or returns, fatal when it keeps failing."""
        task = asyncio.get_running_loop().create_task(self._guard(name, run), name=f"moed-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        recent = self._recent.setdefault(name, collections.deque())
        delay = RESTART_DELAY_S
        while True:
            started = time.monotonic()
            try:
                await run()
                why = "returned"
                log.error("serving task %s returned; restarting it", name)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any bug: logged with its traceback, then the task restarts
                why = f"{type(e).__name__}: {e}"
                log.exception("serving task %s failed; restarting it", name)
            self.failures[name] += 1
            self.on_failure(name)
            now = time.monotonic()
            if now - started > FAILURE_WINDOW_S:  # it had run well for a while: restart at once again
                delay = RESTART_DELAY_S
            recent.append(now)
            while recent and now - recent[0] > FAILURE_WINDOW_S:
                recent.popleft()
            if len(recent) >= MAX_FAILURES:
                reason = f"serving task {name} failed {len(recent)} times within {FAILURE_WINDOW_S:.0f} s (last: {why})"
                log.critical("%s; stopping the daemon", reason)
                self.on_fatal(reason)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # --- the checker ----------------------------------------------------------------------------

    async def run(self, tick_s: float, on_tick: Callable[[float, bool], None]) -> None:
        """Every `tick_s`: start due probes, check every loop, call `on_tick(now, every loop is live)`."""
        try:
            await self._check_every(tick_s, on_tick)
        finally:  # stopping: no probe may outlive the checker (or the daemon's sockets)
            for lp in self.loops.values():
                if lp.probing is not None:
                    lp.probing.cancel()

    async def _check_every(self, tick_s: float, on_tick: Callable[[float, bool], None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(tick_s)
            self.lag_s = max(0.0, loop.time() - t0 - tick_s)
            now = time.monotonic()
            for lp in list(self.loops.values()):
                # Probes run whatever the traffic: receiving alone does not show that replies still leave.
                if (
                    lp.probe is not None
                    and lp.probing is None
                    and now - lp.last_probe >= lp.stale_after_s / 3
                    and (lp.active is None or lp.active())
                ):
                    lp.last_probe = now
                    lp.probing = loop.create_task(self._probe(lp), name=f"moed-probe-{lp.name}")
            problems = self.problems(now)
            stuck = {p.split(":")[0] for p in problems}
            if stuck != self._stuck:  # logged when the set of stuck loops changes, not every tick
                if stuck - self._stuck:
                    log.warning("not live: %s", "; ".join(problems))
                if self._stuck - stuck:
                    log.warning("live again: %s", ", ".join(sorted(self._stuck - stuck)))
                self._stuck = stuck
            on_tick(now, not problems)

    async def _probe(self, lp: Loop) -> None:
        try:
            await asyncio.wait_for(lp.probe(), lp.stale_after_s)
        except TimeoutError:
            lp.probe_error = f"probe unanswered for {lp.stale_after_s:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            lp.probe_error = f"probe failed: {type(e).__name__}: {e}"
        else:
            lp.probe_error = None
            lp.beat()
        finally:
            lp.probing = None
