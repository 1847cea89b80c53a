"""Liveness: a stuck or dead serving loop stops the systemd watchdog and fails /health and /ready.

The registry and the task guard alone (daemon/liveness.py), then the daemon with each loop that
receives or sends made to stop: the ZMQ frontend wedged and crashing, the worker link's reader
blocked, the HTTP API wedged and dead, the whole event loop blocked; and `moed serve` as a process
exiting 1 (systemd restarts it) when a serving task keeps failing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config, metric_value, scrape, short_dir  # noqa: F401

from moed.client.api import Client
from moed.daemon import liveness, openai_api, server
from moed.daemon.sdnotify import Notifier
from moed.daemon.supervisor import WorkerSupervisor


class Recording(Notifier):
    """Records WATCHDOG=1 times; the daemon pets it every 50 ms while live."""

    def __init__(self):
        super().__init__(env={"WATCHDOG_USEC": "100000"})
        self.times: list[float] = []

    def watchdog(self):
        self.times.append(time.monotonic())

    def silent_between(self, start: float, end: float) -> bool:
        return not any(start <= t <= end for t in self.times)


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


# --- the registry and the guard ---------------------------------------------------------------


async def test_a_loop_is_live_while_it_beats_inactive_or_failed_otherwise():
    live = liveness.Liveness(on_fatal=lambda reason: None)
    active = True
    loop = live.register("link", 0.2, active=lambda: active)
    assert live.problems() == []
    await asyncio.sleep(0.3)
    problems = live.problems()
    assert len(problems) == 1 and problems[0].startswith("link: no progress for")
    loop.beat()
    assert live.problems() == []
    active = False
    await asyncio.sleep(0.3)
    assert live.problems() == []  # an inactive loop is never stale
    loop.fail("crash loop: gave up")
    assert live.problems() == ["link: crash loop: gave up"]  # a failure shows, active or not
    with pytest.raises(ValueError, match="registered already"):
        live.register("link", 1.0)


async def test_probes_keep_an_idle_loop_live_and_find_a_deaf_one():
    live = liveness.Liveness(on_fatal=lambda reason: None)
    deaf = asyncio.Event()
    probes = 0

    async def probe():
        nonlocal probes
        probes += 1
        if deaf.is_set():
            await asyncio.Event().wait()

    live.register("frontend", 0.3, probe=probe)  # never beats by itself: only its probe answers
    ticks: list[tuple[float, bool]] = []
    checker = asyncio.ensure_future(live.run(0.02, lambda now, ok: ticks.append((now, ok))))
    await asyncio.sleep(1.0)
    assert probes >= 3 and all(ok for _, ok in ticks)  # idle, but its probes answer: live throughout
    deaf.set()
    t_deaf = time.monotonic()
    await asyncio.sleep(1.0)
    checker.cancel()
    late = [ok for now, ok in ticks if now > t_deaf + 0.7]
    assert late and not any(late)
    assert "frontend: probe unanswered" in live.problems()[0] or "frontend: no progress" in live.problems()[0]


async def test_the_guard_restarts_a_failing_task_and_gives_up_on_one_that_keeps_failing(monkeypatch, caplog):
    monkeypatch.setattr(liveness, "RESTART_DELAY_S", 0.01)
    fatal: list[str] = []
    failed: list[str] = []
    live = liveness.Liveness(on_fatal=fatal.append, on_failure=failed.append)
    runs = 0

    async def flaky():
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"bug {runs}")
        await asyncio.Event().wait()

    async def broken():
        raise KeyError("always")

    steady = live.spawn("flaky", flaky)
    doomed = live.spawn("broken", broken)
    await asyncio.wait_for(doomed, 10)
    assert runs == 3 and not steady.done()  # restarted twice, then ran on
    assert failed.count("flaky") == 2 and failed.count("broken") == liveness.MAX_FAILURES
    assert len(fatal) == 1 and "serving task broken failed 5 times" in fatal[0] and "KeyError" in fatal[0]
    assert "serving task flaky failed; restarting it" in caplog.text and "RuntimeError: bug 1" in caplog.text
    steady.cancel()


# --- the daemon -------------------------------------------------------------------------------


class WedgedFrontend(server.Daemon):
    """The real frontend, until `wedge` is set: then it stops reading (not crashed, just stuck) until `release`."""

    wedge = threading.Event()
    release = threading.Event()

    async def _frontend(self) -> None:
        real = asyncio.ensure_future(super()._frontend())
        while not self.wedge.is_set():
            await asyncio.sleep(0.01)
        real.cancel()
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.wedge.clear()
        raise RuntimeError("released from the wedge")  # the guard restarts the real frontend


def test_a_wedged_frontend_stops_the_watchdog_and_fails_health(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(server, "Daemon", WedgedFrontend)
    WedgedFrontend.wedge.clear()
    WedgedFrontend.release.clear()
    notes = Recording()
    with DaemonThread(make_config(tiny_checkpoint), notifier=notes, loop_stale_s=0.6) as d:
        d.wait_ready(30)
        with Client(d.address, timeout=10) as c:
            assert c.generate("before", max_tokens=3).completion_tokens == 3
        assert scrape(d.metrics_url + "/health") == (200, "ok\n")
        WedgedFrontend.wedge.set()
        t_wedge = time.monotonic()
        wait_until(lambda: not d.call(lambda: d.daemon.health()[0]), 5, "frontend reported stuck")
        time.sleep(0.5)
        t_check = time.monotonic()
        status, body = scrape(d.metrics_url + "/health")
        assert status == 503 and "frontend:" in body
        status, body = scrape(d.metrics_url + "/ready")
        assert status == 503 and "frontend:" in body
        assert notes.silent_between(t_wedge + 1.2, t_check)  # the watchdog stopped: systemd would restart us
        WedgedFrontend.release.set()
        wait_until(lambda: d.call(lambda: d.daemon.health()[0]), 10, "frontend live again")
        with Client(d.address, timeout=10) as c:
            assert c.generate("after", max_tokens=3).completion_tokens == 3
        t_back = time.monotonic()
        wait_until(lambda: notes.times[-1] > t_back, 5, "watchdog resumed")
        _, text = scrape(d.metrics_url + "/metrics")
        assert metric_value(text, "moed_serving_task_failures_total", {"task": "frontend"}) == 1


class CrashingFrontend(server.Daemon):
    """The real frontend, until `crash` is set: then it raises, and again each time the guard restarts it."""

    crash = threading.Event()

    async def _frontend(self) -> None:
        real = asyncio.ensure_future(super()._frontend())
        while not self.crash.is_set():
            await asyncio.sleep(0.01)
        real.cancel()
        raise RuntimeError("injected frontend bug")


def test_a_frontend_that_keeps_crashing_ends_the_daemon_non_zero(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(server, "Daemon", CrashingFrontend)
    monkeypatch.setattr(liveness, "RESTART_DELAY_S", 0.01)
    CrashingFrontend.crash.clear()
    with DaemonThread(make_config(tiny_checkpoint)) as d:
        d.wait_ready(30)
        with Client(d.address, timeout=10) as c:
            stream = iter(c.stream("in flight", max_tokens=200))
            next(stream)
            CrashingFrontend.crash.set()
            assert sum(1 for _ in stream) > 0  # the drain lets it finish
        d.thread.join(30)  # the guard restarts it, it fails again, ... then the daemon drains and stops
        assert not d.thread.is_alive()
        assert d.daemon.exit_code == server.EXIT_SERVING_FAILED


def test_a_blocked_worker_link_stops_the_watchdog(tiny_checkpoint, monkeypatch):
    blocked = threading.Event()
    read = WorkerSupervisor._read

    async def blockable_read(self, pull, generation):
        reading = asyncio.ensure_future(read(self, pull, generation))
        while not blocked.is_set():
            if reading.done():
                return reading.result()
            await asyncio.sleep(0.01)
        reading.cancel()  # stop reading the worker's messages, without ending the incarnation
        await asyncio.Event().wait()

    monkeypatch.setattr(WorkerSupervisor, "_read", blockable_read)
    notes = Recording()
    cfg = make_config(tiny_checkpoint, stats_interval_s=0.05, engine_stall_timeout_s=60.0)
    with DaemonThread(cfg, notifier=notes) as d:
        d.wait_ready(30)
        wait_until(lambda: len(notes.times) > 5, 10, "watchdog")
        blocked.set()
        t_block = time.monotonic()
        wait_until(lambda: not d.call(lambda: d.daemon.health()[0]), 5, "worker link reported stuck")
        time.sleep(0.5)
        status, body = scrape(d.metrics_url + "/health")
        assert status == 503 and "worker-link: no progress" in body
        assert notes.silent_between(t_block + 1.2, time.monotonic())
        d.call(lambda: d.daemon.supervisor.kill_worker())  # what engine_stall_timeout_s would do, sooner
        blocked.clear()
        d.wait_ready(30)
        t_back = time.monotonic()
        wait_until(lambda: notes.times[-1] > t_back, 5, "watchdog resumed")


def test_a_wedged_or_dead_http_api_stops_the_watchdog(tiny_checkpoint, monkeypatch):
    """The HTTP API's own probe (GET /health on its port) keeps it live while idle; a server that stops answering
    (wedged) or accepting (its sockets closed) is reported by name and stops the watchdog."""
    wedge = threading.Event()
    counted = openai_api._counted

    def wedgeable(app, counter, beat):
        inner = counted(app, counter, beat)

        async def maybe_wedged(scope, receive, send):
            while wedge.is_set():  # requests are taken, never answered
                await asyncio.sleep(0.01)
            await inner(scope, receive, send)

        return maybe_wedged

    monkeypatch.setattr(openai_api, "_counted", wedgeable)
    notes = Recording()
    cfg = make_config(tiny_checkpoint, http_address="127.0.0.1:0")
    with DaemonThread(cfg, notifier=notes, loop_stale_s=0.6) as d:
        d.wait_ready(30)
        url = f"http://127.0.0.1:{d.daemon.http_port}"
        live = d.daemon.http.live
        assert d.call(lambda: d.daemon.liveness.loops.get("http")) is live
        time.sleep(1.5)  # idle for longer than loop_stale_s: the probe alone keeps it live
        assert d.call(lambda: d.daemon.health()) == (True, "")
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200 and r.read() == b"ok\n"

        # A request the server answers beats (probes stopped, so only the middleware can have moved the stamp).
        d.call(lambda: setattr(live, "probe", None))
        before = d.call(lambda: live.last_beat)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            assert r.status == 200
        assert d.call(lambda: live.last_beat) > before
        d.call(lambda: setattr(live, "probe", d.daemon.http._probe))

        wedge.set()
        t_wedge = time.monotonic()
        wait_until(lambda: not d.call(lambda: d.daemon.health()[0]), 5, "wedged HTTP API reported")
        time.sleep(0.5)
        status, body = scrape(d.metrics_url + "/health")
        assert status == 503 and "http: probe unanswered" in body
        assert notes.silent_between(t_wedge + 1.2, time.monotonic())
        wedge.clear()
        wait_until(lambda: d.call(lambda: d.daemon.health()[0]), 5, "HTTP API live again")
        t_back = time.monotonic()
        wait_until(lambda: notes.times[-1] > t_back, 5, "watchdog resumed")

        d.call(lambda: [s.close() for s in d.daemon.http._server.servers])  # the listening sockets are gone
        t_dead = time.monotonic()
        wait_until(lambda: not d.call(lambda: d.daemon.health()[0]), 5, "dead HTTP API reported")
        time.sleep(0.5)
        status, body = scrape(d.metrics_url + "/ready")
        assert status == 503 and "http: probe failed: ConnectionRefusedError" in body
        assert notes.silent_between(t_dead + 1.2, time.monotonic())
        with Client(d.address, timeout=10) as c:  # the ZMQ side still serves; systemd would restart the daemon
            assert c.generate("zmq still", max_tokens=2).completion_tokens == 2


def test_a_blocked_event_loop_stops_the_watchdog(tiny_checkpoint):
    notes = Recording()
    with DaemonThread(make_config(tiny_checkpoint), notifier=notes) as d:
        d.wait_ready(30)
        wait_until(lambda: len(notes.times) > 5, 10, "watchdog")
        t0 = time.monotonic()
        d.loop.call_soon_threadsafe(time.sleep, 1.0)  # a blocking call in the loop: nothing in it runs meanwhile
        time.sleep(1.2)
        assert notes.silent_between(t0 + 0.1, t0 + 0.9)
        wait_until(lambda: notes.times[-1] > t0 + 1.0, 5, "watchdog resumed")


def test_moed_serve_exits_1_when_a_serving_task_keeps_failing(tiny_checkpoint):
    d = short_dir()
    code = (
        "import sys; from moed.daemon import liveness, server, service\n"
        "async def broken(self): raise RuntimeError('injected frontend bug')\n"
        "server.Daemon._frontend = broken; liveness.RESTART_DELAY_S = 0.01\n"
        "sys.argv[0] = 'moed serve'; p = service.argparse.ArgumentParser(); service.add_serve_arguments(p)\n"
        "sys.exit(service.serve_main(p.parse_args()))\n"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        "--model",
        tiny_checkpoint,
        "--listen",
        f"ipc://{d}/c.sock",
        "--metrics-address",
        "",
        "--http-address",
        "",  # no fixed ports: a daemon the developer runs (README) holds the default ones
        "--runtime-dir",
        d,
        "--worker-command",
        " ".join(DOUBLE),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, env={**os.environ, "NOTIFY_SOCKET": ""})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "serving task frontend failed; restarting it" in done.stderr
    assert "serving task frontend failed 5 times" in done.stderr and "injected frontend bug" in done.stderr
