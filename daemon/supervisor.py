"""Supervision of the engine worker process: start, readiness, liveness, restart with back-off.

One worker per daemon (one GPU rank). Each incarnation ("generation") gets fresh ipc sockets
bound here, `<runtime_dir>/w<pid>-<generation>-{to,from}.sock`: the daemon PUSHes `ToWorker`
messages on the first and PULLs `FromWorker` messages from the second; the worker connects both.
The worker is ready when it sends WorkerReady (after model load and warm-up). It is responsive
while its messages (EngineStats at least every stats interval) keep arriving: the link's reader
stamps the "worker-link" loop of the daemon's liveness registry (daemon/liveness.py) per message,
and the sender stamps "worker-send" while messages wait for the worker. One silent for
`engine_stall_timeout_s`, or not ready after `worker_start_timeout_s`, is killed. Whenever an
incarnation ends, `on_lost` fails everything it held; the next one starts after a back-off that
doubles per crash; `crash_loop_restarts` crashes within `crash_loop_window_s` stop restarting and
leave the daemon unready with the reason (state "crash_loop"). A worker that was never ready and fails
twice the same way (the same reported error, or the same exit and last stderr line), or crash-loops, will
not start by being retried: state "failed", `failed` is set, and `moed serve` exits non-zero with its error.
The worker's stderr passes through to the daemon's, and its last lines go into the crash reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from moed.daemon.config import ServeConfig
from moed.daemon.liveness import Liveness
from moed.engine import protocol as ep
from moed.engine.config import engine_argv

log = logging.getLogger(__name__)

IPC_PATH_MAX = 100  # sun_path is 108 bytes on Linux, with a terminating NUL
STDERR_TAIL_LINES = 20
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+ ")  # the worker's log line prefix
_PID = re.compile(r"\[\d+\]")  # worker[1234]


def default_runtime_dir() -> Path:
    return Path(os.environ.get("RUNTIME_DIRECTORY") or f"/tmp/moed-{os.getuid()}")


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class _LinkEnd(Exception):
    """The worker broke the link's protocol: the incarnation ends with this reason."""


class WorkerSupervisor:
    def __init__(
        self,
        cfg: ServeConfig,
        model_dir: str,
        ctx: zmq.asyncio.Context,
        *,
        on_message: Callable[[ep.FromWorker, int], None],
        on_ready: Callable[[ep.WorkerReady], None],
        on_lost: Callable[[str], None],
        on_state: Callable[[str, str], None],
        on_restart: Callable[[], None],
        liveness: Liveness | None = None,
    ):
        self.cfg = cfg
        self.model_dir = model_dir
        self.ctx = ctx
        self._on_message, self._on_ready, self._on_lost = on_message, on_ready, on_lost
        self._on_state, self._on_restart = on_state, on_restart
        self.runtime_dir = Path(cfg.runtime_dir) if cfg.runtime_dir else default_runtime_dir()
        self.state = "starting"
        self.reason = "starting the engine worker"
        self.generation = 0
        self.info: ep.WorkerReady | None = None
        self.pid: int | None = None
        self.last_message_at = 0.0
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._push: zmq.asyncio.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._out_backlog: collections.deque[bytes] = collections.deque()
        self._flush_task: asyncio.Task | None = None
        self._stopping = False
        self._fatal = ""
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._task: asyncio.Task | None = None
        self.ever_ready = False
        self.failed = asyncio.Event()  # set with state "failed": a worker that cannot start; `reason` says why
        # The link must carry a message every three stats periods (at least 1 s) while the worker is ready: a
        # stall stops the watchdog at once, well before engine_stall_timeout_s kills the worker (WatchdogSec
        # must exceed the longest engine step). Loading and restarting have their own timeouts.
        liveness = liveness or Liveness(on_fatal=lambda reason: None)
        stale_s = max(3 * cfg.stats_interval_s, 1.0)
        self.link = liveness.register("worker-link", stale_s, active=lambda: self.state == "ready")
        self.link_send = liveness.register(
            "worker-send", stale_s, active=lambda: bool(self._out_backlog) and self.state == "ready"
        )

    # --- public -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="moed-supervisor")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def send(self, msg: ep.ToWorker) -> bool:
        """Queue a message for the current worker; False when there is none ready to take it."""
        if self._push is None or self.state not in ("ready", "stopping"):
            return False
        frame = ep.encode(msg)
        if not self._out_backlog:
            fut = self._push.send(frame, flags=zmq.DONTWAIT)
            if fut.exception() is None:
                return True
            self.link_send.beat()  # not connected yet or queue full: the backlog starts now
        self._out_backlog.append(frame)  # keeps the order: sent when possible
        if self._flush_task is None or self._flush_task.done():  # also after a flush that failed
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_backlog(self._push))
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to shut down, kill it after `timeout`, and stop supervising."""
        self._stopping = True
        self._set_state("stopping", "daemon stopping")
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if self._push is not None:
                with contextlib.suppress(zmq.ZMQError):
                    await asyncio.wait_for(self._push.send(ep.encode(ep.Shutdown())), 1.0)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("worker %d did not exit within %.0f s of Shutdown; killing it", proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set_state("stopped", "daemon stopped")

    def kill_worker(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    # --- internals --------------------------------------------------------------------------

    def _set_state(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        if state == "crash_loop":  # restarts have ended: the daemon must not look alive to systemd
            self.link.fail(reason)
        self._on_state(state, reason)

    async def _flush_backlog(self, push: zmq.asyncio.Socket) -> None:
        try:
            while self._out_backlog and push is self._push:
                await push.send(self._out_backlog[0])
                self._out_backlog.popleft()
                self.link_send.beat()
        except zmq.ZMQError as e:
            log.warning("sending to the worker failed: %s", e)

    def _worker_argv(self, to_ep: str, from_ep: str) -> list[str]:
        cfg = self.cfg
        argv = list(cfg.worker_command) or [sys.executable, "-m", "moed.engine.worker"]
        return [
            *argv,
            "--model",
            self.model_dir,
            "--to-worker",
            to_ep,
            "--from-worker",
            from_ep,
            "--stats-interval",
            str(cfg.stats_interval_s),
            *engine_argv(cfg),
        ]

    def _open_sockets(self) -> tuple[str, str]:
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        base = self.runtime_dir / f"w{os.getpid()}-{self.generation}"
        paths = [f"{base}-to.sock", f"{base}-from.sock"]
        for p in paths:
            if len(p) > IPC_PATH_MAX:
                raise RuntimeError(
                    f"ipc socket path {p!r} is longer than {IPC_PATH_MAX} bytes; set a shorter runtime_dir"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)  # the daemon bounds what it sends; never drop
        self._push.bind(f"ipc://{paths[0]}")
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(f"ipc://{paths[1]}")
        return f"ipc://{paths[0]}", f"ipc://{paths[1]}"

    def _close_sockets(self) -> None:
        for sock in (self._push, self._pull):
            if sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    for endpoint in sock.getsockopt(zmq.LAST_ENDPOINT).decode().split(","):
                        if endpoint.startswith("ipc://"):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(endpoint[6:])
                sock.close(linger=0)
        self._push = self._pull = None
        self._out_backlog.clear()

    async def _run(self) -> None:
        crashes: collections.deque[float] = collections.deque()
        delay = self.cfg.restart_backoff_s
        last_start_failure = ""
        try:
            while not self._stopping:
                self.generation += 1
                started = time.monotonic()
                reason = await self._run_once()
                if self._stopping:
                    break
                now = time.monotonic()
                ran_for = now - started
                self._on_lost(reason)
                crashes.append(now)
                while crashes and now - crashes[0] > self.cfg.crash_loop_window_s:
                    crashes.popleft()
                if not self.ever_ready:
                    failure = self._start_failure(reason)
                    if failure == last_start_failure or len(crashes) >= self.cfg.crash_loop_restarts:
                        why = (
                            f"the engine worker cannot start: it failed {len(crashes)} times before it was ever "
                            f"ready, the last {'two the same way' if failure == last_start_failure else 'time'}:"
                            f" {failure}"
                        )
                        log.error("%s", why)
                        self._set_state("failed", why)
                        self.failed.set()
                        return
                    last_start_failure = failure
                if len(crashes) >= self.cfg.crash_loop_restarts:
                    why = (
                        f"crash loop: the engine worker failed {len(crashes)} times within "
                        f"{self.cfg.crash_loop_window_s:.0f} s; not restarting. Last failure: {reason}"
                    )
                    log.error("%s", why)
                    self._set_state("crash_loop", why)
                    return
                if ran_for > self.cfg.crash_loop_window_s:  # it had been healthy for a while
                    delay = self.cfg.restart_backoff_s
                self.restarts += 1
                self._on_restart()
                self._set_state("restarting", f"engine worker failed ({reason}); restarting in {delay:.1f} s")
                log.warning("engine worker failed (%s); restart %d in %.1f s", reason, self.restarts, delay)
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, 0.1), self.cfg.restart_backoff_max_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a supervisor bug must not leave the daemon looking healthy
            log.exception("supervisor failed")
            self._set_state("crash_loop", f"supervisor error: {e}")
        finally:
            self._close_sockets()

    def _start_failure(self, reason: str) -> str:
        """What a failed start said, without what changes between attempts (time stamps, pids): the error the
        worker reported, else how it ended and its last line of stderr."""
        if self._fatal:
            return self._fatal
        lines = [_TIMESTAMP.sub("", _PID.sub("", line)).strip() for line in self._stderr_tail if line.strip()]
        return f"{reason.split(';')[0]}: {lines[-1]}" if lines else reason

    async def _run_once(self) -> str:
        """Run one worker incarnation until it ends; returns why it ended."""
        self.info = None
        self._fatal = ""
        self._stderr_tail.clear()
        try:
            to_ep, from_ep = self._open_sockets()
        except (RuntimeError, OSError, zmq.ZMQError) as e:
            return f"cannot bind worker sockets: {e}"
        argv = self._worker_argv(to_ep, from_ep)
        self._set_state("loading", f"loading {self.model_dir} (worker generation {self.generation})")
        log.info("starting engine worker: %s", " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except OSError as e:
            self._close_sockets()
            return f"cannot start worker {argv[0]!r}: {e}"
        self._proc, self.pid = proc, proc.pid
        self.last_message_at = started = time.monotonic()
        reader = asyncio.get_running_loop().create_task(self._read(self._pull, self.generation))
        stderr = asyncio.get_running_loop().create_task(self._pump_stderr(proc))
        waiter = asyncio.get_running_loop().create_task(proc.wait())
        reason = ""
        try:
            while True:
                done, _ = await asyncio.wait({waiter, reader}, timeout=0.25)
                if waiter in done:
                    await asyncio.wait({stderr}, timeout=1.0)  # let the last stderr lines arrive
                    reason = _exit_text(proc.returncode)
                    break
                if reader in done:  # a protocol violation, a daemon bug handling a message, a socket error
                    exc = reader.exception()
                    reason = reader.result() if exc is None else f"reading the worker link failed: {exc!r}"
                    proc.kill()
                    await waiter
                    break
                now = time.monotonic()
                if self.state == "loading" and now - started > self.cfg.worker_start_timeout_s:
                    reason = f"not ready within worker_start_timeout_s={self.cfg.worker_start_timeout_s:.0f} s"
                elif self.state == "ready" and now - self.last_message_at > self.cfg.engine_stall_timeout_s:
                    reason = (
                        f"stalled: no message for {now - self.last_message_at:.1f} s "
                        f"(engine_stall_timeout_s={self.cfg.engine_stall_timeout_s:.0f})"
                    )
                if reason:
                    log.error("killing engine worker %d: %s", proc.pid, reason)
                    proc.kill()
                    await waiter
                    break
        finally:
            for t in (reader, stderr, waiter):
                t.cancel()
            await asyncio.gather(reader, stderr, waiter, return_exceptions=True)
            self._proc = None
            self._close_sockets()
        if self._fatal:
            reason = f"{reason}; worker reported: {self._fatal}"
        tail = " | ".join(line for line in self._stderr_tail if line.strip())
        if tail and not self._stopping:
            reason = f"{reason}; stderr: {tail[-2000:]}"
        return reason

    async def _read(self, pull: zmq.asyncio.Socket, generation: int) -> str:
        """Read the worker's messages until the link must end; returns why."""
        while True:
            frame = await pull.recv(copy=False)
            self.last_message_at = time.monotonic()
            self.link.beat()
            try:
                msg = ep.decode_from_worker(frame.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
                return f"worker sent an undecodable message ({e})"
            try:
                self._on_worker_message(msg, generation)
            except _LinkEnd as e:
                return str(e)
            except Exception as e:  # a daemon bug: a fresh worker fails its requests with errors instead of hanging
                log.exception("handling the worker's %s failed", type(msg).__name__)
                return f"the daemon failed handling a worker message ({type(e).__name__}: {e})"

    def _on_worker_message(self, msg: ep.FromWorker, generation: int) -> None:
        if isinstance(msg, ep.WorkerReady):
            if msg.protocol_version != ep.PROTOCOL_VERSION:
                raise _LinkEnd(
                    f"worker speaks engine protocol {msg.protocol_version}, daemon speaks {ep.PROTOCOL_VERSION}"
                )
            self.info = msg
            self.ever_ready = True
            self._on_ready(msg)
            self._set_state("ready", "")
        elif isinstance(msg, ep.WorkerFatal):
            log.error("engine worker reported a fatal error: %s", msg.message)
            self._fatal = msg.message
        else:
            self._on_message(msg, generation)

    async def _pump_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        out = sys.stderr
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:  # a line longer than the stream's limit: take it in pieces
                line = await proc.stderr.read(1 << 16)
            if not line:
                return
            text = line.decode(errors="replace")
            self._stderr_tail.append(text.rstrip("\n"))
            with contextlib.suppress(OSError, ValueError):
                out.write(text)
                out.flush()
