"""A worker that cannot start ends the daemon with its error, instead of a daemon that stays up unready.

A worker that was never ready and fails twice the same way, or crash-loops, will not start by being
retried: the supervisor's state becomes "failed" and `moed serve` exits 1 with the worker's own error.
A worker that was ready once is restarted as before (test_daemon_serving.py's crash-loop test).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config, metric_value, scrape, short_dir  # noqa: F401

# Fails before it is ready with a different last line each time (a random number).
FLAKY = (
    sys.executable,
    "-c",
    "import random, sys; print('worker flake', random.random(), file=sys.stderr); sys.exit(4)",
)


def test_same_failure_twice_before_ready_fails_the_daemon(tiny_checkpoint):
    cfg = make_config(tiny_checkpoint, worker=(*DOUBLE, "--double-fail"), crash_loop_restarts=5)
    with DaemonThread(cfg) as d:
        d.wait_for(lambda: d.daemon.supervisor.failed.is_set(), 30, "failed")
        sup = d.daemon.supervisor
        assert sup.state == "failed" and sup.restarts == 1 and not sup.ever_ready
        assert "failed 2 times before it was ever ready, the last two the same way" in sup.reason
        assert "exited with code 3: worker double: failing on purpose before ready" in sup.reason
        status, body = scrape(d.metrics_url + "/ready")
        assert status == 503 and "cannot start" in body
        _, text = scrape(d.metrics_url + "/metrics")
        assert metric_value(text, "moed_engine_state", {"state": "failed"}) == 1


def test_different_failures_before_ready_fail_the_daemon_at_the_crash_loop_limit(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=FLAKY, crash_loop_restarts=3)) as d:
        d.wait_for(lambda: d.daemon.supervisor.failed.is_set(), 30, "failed")
        sup = d.daemon.supervisor
        assert sup.restarts == 2 and "failed 3 times before it was ever ready, the last time:" in sup.reason
        assert "exited with code 4: worker flake" in sup.reason


def _serve(args: list[str], timeout: float) -> tuple[int, str, float]:
    d = short_dir()
    env = {  # no fixed ports: a daemon the developer runs (README) holds the default ones
        **os.environ,
        "MOED_RUNTIME_DIR": d,
        "MOED_METRICS_ADDRESS": "",
        "MOED_HTTP_ADDRESS": "",
        "MOED_LISTEN": f"ipc://{d}/c.sock",
    }
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "moed.daemon.cli", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stderr, time.monotonic() - t0


def test_serve_exits_1_with_the_workers_error(tiny_checkpoint):
    rc, err, took = _serve(
        [
            "--model",
            tiny_checkpoint,
            "--worker-command",
            f"{DOUBLE[0]} {DOUBLE[1]} --double-fail",
            "--restart-backoff-s",
            "0.1",
        ],
        60,
    )
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moed serve: the engine worker cannot start") and "failing on purpose" in last, err
    assert took < 30


def test_serve_offload_on_a_cpu_without_a_cache_size_exits_with_the_engine_error(tiny_checkpoint):
    """The start-up failure of issue 14: `moed serve --model tiny --moe offload` on a CPU (no device memory to size
    the expert cache from) used to retry five times over ~25 s and stay up unready."""
    rc, err, _ = _serve(["--model", tiny_checkpoint, "--device", "cpu", "--moe", "offload"], 120)
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert "the last two the same way" in last and "expert_cache_gb must be given off CUDA" in last, err
    assert err.count("moed.engine.worker: engine start failed\n") == 2  # two attempts, not five
