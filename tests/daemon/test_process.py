"""The daemon as a process: sd_notify on a test NOTIFY_SOCKET, SIGTERM drain, exit status, cleanup."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import DOUBLE, hang_guard, short_dir  # noqa: F401

from moed.client.api import Client, MoedError


def _toml(**kv) -> str:
    def val(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    return "".join(f"{k} = {val(v)}\n" for k, v in kv.items())


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.seen: list[str] = []

    def collect(self) -> list[str]:
        while True:
            try:
                self.seen += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                return self.seen

    def wait_for(self, line: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(s.startswith(line) for s in self.collect()):
                return
        raise TimeoutError(f"no {line!r} notification within {timeout} s; got {self.seen}")


@pytest.fixture
def served(tiny_checkpoint, request):
    """Start `python -m moed.daemon.service` (= `moed serve`) with a notify socket; kill it afterwards."""
    procs = []

    def start(**overrides):
        d = short_dir()
        cfg = dict(
            model=tiny_checkpoint,
            listen=[f"ipc://{d}/c.sock"],
            metrics_address="",
            http_address="",  # no fixed ports: a daemon the developer runs (README) holds the default ones
            runtime_dir=d,
            worker_command=[*DOUBLE, "--double-step-s", "0.02"],
            stats_interval_s=0.2,
            drain_timeout_s=5.0,
        )
        cfg.update(overrides)
        Path(d, "moed.toml").write_text(_toml(**cfg))
        notes = Notifications(f"{d}/notify")
        env = {**os.environ, "NOTIFY_SOCKET": notes.path, "WATCHDOG_USEC": "300000"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "moed.daemon.service", "--config", f"{d}/moed.toml"],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        procs.append((proc, d))
        return proc, notes, cfg["listen"][0], d

    yield start
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _workers_of(runtime_dir: str) -> list[int]:
    """Pids of processes whose command line names this daemon's runtime directory (its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{runtime_dir}/w".encode() in (entry / "cmdline").read_bytes():  # the worker's socket path
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_sd_notify_and_sigterm_drain_completes_in_flight(served):
    proc, notes, address, d = served()
    notes.wait_for("READY=1")
    assert any(s.startswith("STATUS=") for s in notes.seen)
    notes.wait_for("WATCHDOG=1")
    n_before = sum(s == "WATCHDOG=1" for s in notes.collect())
    time.sleep(0.5)
    assert sum(s == "WATCHDOG=1" for s in notes.collect()) >= n_before + 2  # every ~150 ms while responsive
    assert len(_workers_of(d)) == 1
    with Client(address, timeout=30) as c:
        streams = [c.stream(f"drain me {i}", max_tokens=40) for i in range(3)]
        its = [iter(s) for s in streams]
        for it in its:
            next(it)
        proc.send_signal(signal.SIGTERM)
        notes.wait_for("STOPPING=1", 5)
        with pytest.raises(MoedError) as e:
            c.generate("too late", max_tokens=2)
        assert e.value.code == "unavailable" and "draining" in e.value.message
        for it in its:
            for _ in it:
                pass
        for s in streams:
            assert s.completion.finish_reason == "length" and s.completion.completion_tokens == 40
    assert proc.wait(15) == 0
    assert _workers_of(d) == []  # the worker went with it
    assert not Path(address[6:]).exists()  # ipc socket file removed


def test_drain_timeout_aborts_the_rest_and_exits_zero(served):
    proc, notes, address, d = served(drain_timeout_s=0.3)
    notes.wait_for("READY=1")
    with Client(address, timeout=30) as c:
        stream = c.stream("long", max_tokens=3000)
        it = iter(stream)
        next(it)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for _ in it:
            pass
        assert stream.completion.finish_reason == "abort" and time.monotonic() - t0 < 5
    assert proc.wait(15) == 0
    assert _workers_of(d) == []


def test_bad_config_exits_2_with_the_problem(served, tiny_checkpoint):
    proc, *_ = served(client_concurrency=0)
    assert proc.wait(20) == 2


def test_watchdog_only_while_the_engine_responds(tiny_checkpoint):
    from daemon_harness import DaemonThread, make_config

    from moed.daemon.sdnotify import Notifier

    class Recording(Notifier):
        def __init__(self):
            super().__init__(env={"WATCHDOG_USEC": "100000"})
            self.times: list[float] = []

        def watchdog(self):
            self.times.append(time.monotonic())

    notes = Recording()
    worker = (*DOUBLE, "--double-stall-after", "3", "--double-step-s", "0.01")
    cfg = make_config(tiny_checkpoint, worker=worker, engine_stall_timeout_s=2.5, stats_interval_s=0.05)
    with DaemonThread(cfg, notifier=notes) as d:
        d.wait_ready(30)
        time.sleep(0.3)
        with Client(d.address, timeout=30) as c:
            t_stall = time.monotonic()
            with pytest.raises(MoedError, match="stalled"):
                c.generate("stall", max_tokens=50)
            t_killed = time.monotonic()
        d.wait_ready(30)
        time.sleep(0.3)
    before = [t for t in notes.times if t < t_stall]
    assert len(before) >= 4 and max(b - a for a, b in itertools.pairwise(before)) < 0.2  # steady while responsive
    gaps = [(a, b) for a, b in itertools.pairwise(notes.times) if b - a > 0.6]
    assert len(gaps) == 1  # silent while the engine was stalled ...
    a, b = gaps[0]
    assert t_stall <= a + 0.2 and a < t_stall + 1.5 and b <= t_killed + 0.3  # ... from ~1 s in, until the kill
    assert notes.times[-1] > t_killed  # and back after the restart


def test_second_sigterm_aborts_at_once(served):
    proc, notes, address, _ = served(drain_timeout_s=60.0)
    notes.wait_for("READY=1")
    with Client(address, timeout=30) as c:
        stream = c.stream("long", max_tokens=3000)
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        notes.wait_for("STOPPING=1", 5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for _ in it:
            pass
        assert stream.completion.finish_reason == "abort" and time.monotonic() - t0 < 5
    assert proc.wait(15) == 0


def test_listen_failure_exits_1(served):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, *_ = served(listen=[f"tcp://127.0.0.1:{port}"])
        assert proc.wait(30) == 1
