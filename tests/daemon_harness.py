"""Helpers for the daemon, client and protocol tests: run a Daemon in a thread, build configs.

`DaemonThread` runs `moed.daemon.server.Daemon` in its own event loop on a background thread, so
the sync client can be used from the test. Every wait has a timeout and `close()` always stops
the daemon and its worker process, so a failing test cannot hang the suite or leak processes.
Workers: `DOUBLE` is the echoing test double (tests/daemon_worker_double.py); `REAL_WORKER` is
the real engine (`python -m moed.engine.worker`), available when that module exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from moed.daemon.config import ServeConfig

HERE = Path(__file__).resolve().parent
DOUBLE = (sys.executable, str(HERE / "daemon_worker_double.py"))
REAL_WORKER = (sys.executable, "-m", "moed.engine.worker")
HAVE_REAL_WORKER = importlib.util.find_spec("moed.engine.worker") is not None
NO_REAL_WORKER = "the real engine worker (moed.engine.worker, issue 7) is not in the tree yet"


HANG_LOG = Path(tempfile.gettempdir()) / f"moed-test-hang-{os.getpid()}.log"
_hang_log = None


@pytest.fixture(autouse=True)
def hang_guard():
    """No test may hang CI: after 120 s every thread's stack goes to HANG_LOG (pytest captures stderr)
    and the run exits with status 1."""
    global _hang_log
    if _hang_log is None:
        _hang_log = open(HANG_LOG, "w")  # noqa: SIM115 (kept open for faulthandler)
    faulthandler.dump_traceback_later(120, exit=True, file=_hang_log)
    yield
    faulthandler.cancel_dump_traceback_later()


def short_dir() -> str:
    """A short temporary directory: ipc socket paths must stay under ~100 bytes."""
    return tempfile.mkdtemp(prefix="moed", dir="/tmp")


def make_config(model_dir: str, worker: tuple[str, ...] = DOUBLE, **overrides) -> ServeConfig:
    base = dict(
        model=model_dir,
        listen=("tcp://127.0.0.1:*",),
        metrics_address="127.0.0.1:0",
        http_address="",
        worker_command=worker,
        runtime_dir=short_dir(),
        stats_interval_s=0.2,
        restart_backoff_s=0.1,
        restart_backoff_max_s=0.5,
        worker_start_timeout_s=120.0,
        client_timeout_s=30.0,
        drain_timeout_s=5.0,
    )
    if worker == REAL_WORKER:
        base["device"] = "cpu"
    base.update(overrides)
    return ServeConfig(**base)


class DaemonThread:
    def __init__(self, cfg: ServeConfig, model_dir: str | None = None, **daemon_kwargs):
        from moed.daemon.server import Daemon

        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.daemon = Daemon(cfg, model_dir or cfg.model, **daemon_kwargs)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._started.wait(30):
            raise TimeoutError("daemon did not start within 30 s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.daemon.start())
        except BaseException as e:
            self._error = e
            self._started.set()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(self.daemon.stop())
            return
        self._started.set()
        self.loop.run_until_complete(self.daemon.wait_stopped())

    @property
    def address(self) -> str:
        return self.daemon.endpoints[0]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.metrics_port}"

    def call(self, fn, timeout: float = 30.0):
        """Run fn() in the daemon's loop (thread-safe access to its state) and return the result."""

        async def wrap():
            return fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.call(lambda: self.daemon.readiness()[0]):
                return
            state = self.call(lambda: self.daemon.supervisor.state)
            if state in ("crash_loop", "failed"):
                raise RuntimeError(f"engine {state}: {self.daemon.supervisor.reason}")
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready within {timeout} s: {self.call(self.daemon.readiness)}")

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.call(predicate):
                return
            time.sleep(0.02)
        raise TimeoutError(f"{what} not reached within {timeout} s")

    def drain(self, timeout: float = 30.0) -> None:
        self.loop.call_soon_threadsafe(self.daemon.request_drain)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("daemon did not finish draining")

    def close(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop).result(20)
            self.thread.join(20)
        sup = self.daemon.supervisor
        if sup is not None:
            sup.kill_worker()
        if not self.thread.is_alive():
            self.loop.close()
        shutil.rmtree(self.cfg.runtime_dir, ignore_errors=True)

    def __enter__(self) -> DaemonThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scrape(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text exposition (None when absent); the model_name label every
    sample carries is not compared."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        if "{" in key:
            metric, _, lab = key.partition("{")
            lab = ",".join(sorted(p for p in lab.rstrip("}").split(",") if not p.startswith("model_name=")))
        else:
            metric, lab = key, ""
        if metric == name and lab == want:
            return float(value)
    return None


def tiny_vocab_text_ids(model_dir: str, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def model_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
