"""The asyncio client: the same calls as the sync Client, as coroutines and async iterators.

A reader task routes replies to per-request queues; a heartbeat task runs while requests are in
flight (same rules as the sync client: Pongs, unknown-request Errors, `daemon_timeout` ->
DaemonUnavailable and a fresh socket). Cancelling a task that awaits a call or iterates a stream
sends an Abort for its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from moed.client import protocol as cp
from moed.client.calls import (
    DEFAULT_ADDRESS,
    Choices,
    Completion,
    DaemonUnavailable,
    Delta,
    MoedError,
    RequestIds,
    RequestTimeout,
    StreamState,
    build_generate,
)
from moed.client.connection import Failed, auth_refused, decode, open_dealer, restart_error, routed, timeout_grace
from moed.client.keys import CurveKeys


class AsyncClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 600.0,
        heartbeat_interval: float = 2.0,
        daemon_timeout: float = 10.0,
        curve: CurveKeys | None = None,
        context: zmq.asyncio.Context | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.daemon_timeout = daemon_timeout
        self.curve = curve
        self.daemon_id: str | None = None
        self._ctx = context or zmq.asyncio.Context.instance()
        self._ids = RequestIds()
        self._queues: dict[str, asyncio.Queue] = {}
        self._generating: set[str] = set()
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._last_heard = self._last_sent = time.monotonic()

    def _ensure_connected(self) -> None:
        if self._closed:
            raise DaemonUnavailable("client is closed")
        if self._sock is not None:
            return
        sock, monitor = self._sock, self._monitor = open_dealer(self._ctx, self.address, self.curve)
        self._last_heard = self._last_sent = time.monotonic()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader(sock)), loop.create_task(self._heartbeats(sock))]
        if monitor is not None:
            self._tasks.append(loop.create_task(self._watch_auth(sock, monitor)))

    def _disconnect(self, exc: BaseException | None) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        if self._sock is not None:
            if self._monitor is not None:  # stop the monitor before its PAIR socket closes (libzmq would block)
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None
        self.daemon_id = None  # whoever answers a new socket is this client's daemon from then on
        if exc is not None:
            for q in self._queues.values():
                q.put_nowait(Failed(exc))

    async def close(self) -> None:
        if self._sock is not None:
            for rid in list(self._generating):
                await self.abort(rid)
        self._disconnect(DaemonUnavailable("client closed"))
        self._closed = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, msg: cp.Request, required: bool = True) -> None:
        """As the sync client: never waits on ZMQ; a refused send gets one fresh socket, heartbeats none."""
        self._ensure_connected()
        frames = cp.encode(msg)
        if self._sock.send_multipart(frames, flags=zmq.DONTWAIT).exception() is not None:
            if not required:
                return
            self._disconnect(DaemonUnavailable(f"lost the connection to the daemon at {self.address}"))
            self._ensure_connected()
            if self._sock.send_multipart(frames, flags=zmq.DONTWAIT).exception() is not None:
                raise DaemonUnavailable(f"cannot queue a message for the daemon at {self.address}")
        self._last_sent = time.monotonic()

    async def _reader(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            self._last_heard = time.monotonic()
            reply = decode(frames)
            if reply is None:
                continue
            if isinstance(reply, cp.Pong):
                if self.daemon_id is not None and reply.daemon_id != self.daemon_id:
                    lost = restart_error(self.address)
                    for rid in list(self._generating):
                        if rid in self._queues:
                            self._queues[rid].put_nowait(Failed(lost))
                self.daemon_id = reply.daemon_id
                continue
            for rid, item in routed(reply):
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(item)

    async def _heartbeats(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval / 4)
            if not self._queues:
                continue
            now = time.monotonic()
            if now - self._last_sent >= self.heartbeat_interval:
                await self._send(cp.Heartbeat(ids=list(self._generating)), required=False)
            if now - self._last_heard > self.daemon_timeout:
                self._disconnect(
                    DaemonUnavailable(f"no answer from the daemon at {self.address} for {self.daemon_timeout:.1f} s")
                )
                return

    async def _watch_auth(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        # The monitor is subscribed to the refused-handshake events only.
        while (exc := auth_refused(self.address, await monitor.recv_multipart())) is None:
            pass
        self._disconnect(exc)

    async def _next(self, rid: str, deadline: float | None) -> Any:
        q = self._queues[rid]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that races a reply.
            async with asyncio.timeout(timeout):
                item = await q.get()
        except TimeoutError:
            raise RequestTimeout(f"request {rid} got no reply before its timeout") from None
        if isinstance(item, Failed):
            raise item.exc
        return item

    async def _call(self, msg: cp.Request, timeout: float | None) -> Any:
        await self._send(msg)  # never suspends: the queue below exists before any reply can be read
        self._queues[msg.id] = asyncio.Queue()
        try:
            reply = await self._next(msg.id, None if timeout is None else time.monotonic() + timeout)
        finally:
            self._queues.pop(msg.id, None)
        if isinstance(reply, cp.Error):
            raise MoedError.from_reply(reply)
        return reply

    def _finished(self, rid: str) -> None:
        self._queues.pop(rid, None)
        self._generating.discard(rid)

    async def abort(self, request_id: str) -> None:
        self._finished(request_id)
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                await self._send(cp.Abort(id=request_id))

    def _abort_soon(self, request_id: str) -> None:
        """Abort from a cancelled task: the Abort is sent without waiting (it must not be cancelled too)."""
        self._finished(request_id)
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(cp.encode(cp.Abort(id=request_id)), flags=zmq.DONTWAIT)

    async def _begin(self, prompt: str | None, kwargs: dict[str, Any], stream: bool) -> tuple[str, float | None, int]:
        timeout = kwargs.pop("timeout", self.timeout)
        if timeout is not None and kwargs.get("deadline_s") is None:
            kwargs["deadline_s"] = timeout
        rid = self._ids.next()
        msg = build_generate(rid, prompt, stream=stream, **kwargs)
        await self._send(msg)  # never suspends: the queue below exists before any reply can be read
        self._queues[rid] = asyncio.Queue()
        self._generating.add(rid)
        return rid, None if timeout is None else time.monotonic() + timeout + timeout_grace(timeout), msg.n

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """As Client.generate."""
        rid, deadline, n = await self._begin(prompt, kwargs, stream=False)
        choices = Choices(n)
        try:
            while not choices.complete:
                reply = await self._next(rid, deadline)
                if isinstance(reply, cp.Error):
                    break
                if isinstance(reply, cp.Final | cp.Chunk):
                    choices.add(reply)
        except BaseException:
            self._abort_soon(rid)
            raise
        self._finished(rid)
        if isinstance(reply, cp.Error):
            raise MoedError.from_reply(reply)
        return choices.completion()

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncStream:
        rid, deadline, n = await self._begin(prompt, kwargs, stream=True)
        return AsyncStream(self, rid, deadline, n)

    async def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Completion:
        return await self.generate(messages=messages, **kwargs)

    async def chat_stream(self, messages: list[dict[str, str]], **kwargs: Any) -> AsyncStream:
        return await self.stream(messages=messages, **kwargs)

    async def health(self, timeout: float = 10.0) -> cp.HealthStatus:
        return await self._call(cp.Health(id=self._ids.next()), timeout)

    async def ready(self, timeout: float = 10.0) -> cp.ReadyStatus:
        return await self._call(cp.Ready(id=self._ids.next()), timeout)

    async def stats(self, timeout: float = 10.0) -> cp.StatsReport:
        return await self._call(cp.Stats(id=self._ids.next()), timeout)

    async def models(self, timeout: float = 10.0) -> list[cp.ModelInfo]:
        return (await self._call(cp.Models(id=self._ids.next()), timeout)).models

    async def placement(
        self, op: str, layer: int | None = None, expert: int | None = None, timeout: float = 60.0
    ) -> cp.PlacementResult:
        return await self._call(
            cp.Placement(id=self._ids.next(), op=op, layer=layer, expert=expert),  # type: ignore[arg-type]
            timeout,
        )

    async def wait_ready(self, timeout: float = 600.0, poll: float = 0.2) -> None:
        end = time.monotonic() + timeout
        reason = "no answer"
        while time.monotonic() < end:
            try:
                status = await self.ready(timeout=max(0.1, min(5.0, end - time.monotonic())))
            except (RequestTimeout, DaemonUnavailable) as e:
                reason = str(e)
                continue
            if status.ready:
                return
            reason = status.reason
            await asyncio.sleep(poll)
        raise RequestTimeout(f"daemon at {self.address} not ready within {timeout:.0f} s: {reason}")


class AsyncStream(StreamState):
    """`async for delta in stream`; cancelling or leaving early aborts the request."""

    client: AsyncClient

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while self._open:
                reply = await self.client._next(self.id, self._deadline)
                delta = self._advance(reply)
                if delta is not None:
                    yield delta
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.client._abort_soon(self.id)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
