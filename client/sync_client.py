"""The synchronous client: one DEALER socket, any number of interleaved requests, no threads.

Replies are read only while a call waits, and routed to the request they name, so several streams
can be iterated in turns. While it waits the client sends a Heartbeat every `heartbeat_interval`
(naming its requests); the daemon answers with a Pong, and with an Error for any request it no
longer holds. A daemon silent for `daemon_timeout` fails the waiting requests with
DaemonUnavailable and the socket is replaced (reconnect). Leaving a call early — timeout,
KeyboardInterrupt, closing or abandoning a stream — sends an Abort, so the engine stops working
for nobody. Not thread-safe: use one Client per thread.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import zmq

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


class Client:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 600.0,
        heartbeat_interval: float = 2.0,
        daemon_timeout: float = 10.0,
        curve: CurveKeys | None = None,
        context: zmq.Context | None = None,
    ):
        """`timeout`: default per-call limit in seconds (None: none); it is also sent as the request's
        deadline, so the daemon stops the work too. `curve`: keys from moed.client.keys.curve_keys."""
        self.address = address
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.daemon_timeout = daemon_timeout
        self.curve = curve
        self.daemon_id: str | None = None
        self._ctx = context or zmq.Context.instance()
        self._ids = RequestIds()
        self._inbox: dict[str, collections.deque[Any]] = {}  # request id -> replies not yet read
        self._generating: set[str] = set()  # generate requests in flight: named in heartbeats
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._connect()

    # --- connection -----------------------------------------------------------------------------

    def _connect(self) -> None:
        self._sock, self._monitor = open_dealer(self._ctx, self.address, self.curve)
        self._last_heard = self._last_sent = time.monotonic()

    def _disconnect(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _reconnect(self, exc: BaseException) -> None:
        """Fail every waiting request with `exc` and start over on a fresh socket."""
        for box in self._inbox.values():
            box.append(Failed(exc))
        self._disconnect()
        self._connect()
        self.daemon_id = None  # whoever answers the new socket is this client's daemon from now on

    def close(self) -> None:
        """Abort in-flight requests and close the socket."""
        if self._sock is None:
            return
        for rid in list(self._inbox):
            self.abort(rid)
        self._disconnect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- message pump -----------------------------------------------------------------------------

    def _send(self, msg: cp.Request, required: bool = True) -> None:
        """Send without ever blocking. ZMQ refuses (EAGAIN) when it holds no connection to queue on, e.g.
        after a failed handshake: then a fresh socket is tried once; heartbeats are just skipped."""
        if self._sock is None:
            raise DaemonUnavailable("client is closed")
        frames = cp.encode(msg)
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            if not required:
                return
            self._reconnect(DaemonUnavailable(f"lost the connection to the daemon at {self.address}"))
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                raise DaemonUnavailable(f"cannot queue a message for the daemon at {self.address}") from None
        self._last_sent = time.monotonic()

    def _pump(self, until: float) -> None:
        """Read what arrives before `until` (at most one heartbeat period) and route it."""
        now = time.monotonic()
        if self._inbox and now - self._last_sent >= self.heartbeat_interval:
            self._send(cp.Heartbeat(ids=[rid for rid in self._generating if rid in self._inbox]), required=False)
        wait = max(0.0, min(until, self._last_sent + self.heartbeat_interval) - now)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        events = dict(poller.poll(int(wait * 1000) + 1))
        if self._monitor is not None and self._monitor in events:
            exc = auth_refused(self.address, self._monitor.recv_multipart())
            if exc is not None:
                self._reconnect(exc)
                raise exc
        if self._sock in events:
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._route(frames)
        elif self._inbox and time.monotonic() - self._last_heard > self.daemon_timeout:
            self._reconnect(
                DaemonUnavailable(f"no answer from the daemon at {self.address} for {self.daemon_timeout:.1f} s")
            )

    def _route(self, frames: list[bytes]) -> None:
        self._last_heard = time.monotonic()
        reply = decode(frames)
        if reply is None:
            return
        if isinstance(reply, cp.Pong):
            if self.daemon_id is not None and reply.daemon_id != self.daemon_id and self._inbox:
                lost = restart_error(self.address)
                for box in self._inbox.values():
                    box.append(Failed(lost))
            self.daemon_id = reply.daemon_id
            return
        for rid, item in routed(reply):
            box = self._inbox.get(rid)
            if box is not None:
                box.append(item)

    def _next(self, rid: str, deadline: float | None) -> Any:
        """The next reply for request `rid`; raises RequestTimeout after `deadline`."""
        box = self._inbox[rid]
        while not box:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise RequestTimeout(f"request {rid} got no reply before its timeout")
            self._pump(deadline if deadline is not None else now + self.heartbeat_interval)
        item = box.popleft()
        if isinstance(item, Failed):
            raise item.exc
        return item

    def _call(self, msg: cp.Request, timeout: float | None) -> Any:
        """Send a single-reply request and return its reply."""
        rid = msg.id
        self._send(msg)
        self._inbox[rid] = collections.deque()  # after sending: a reconnect while sending fails older requests only
        try:
            reply = self._next(rid, None if timeout is None else time.monotonic() + timeout)
        finally:
            self._inbox.pop(rid, None)
        if isinstance(reply, cp.Error):
            raise MoedError.from_reply(reply)
        return reply

    def _finished(self, rid: str) -> None:
        self._inbox.pop(rid, None)
        self._generating.discard(rid)

    # --- requests -----------------------------------------------------------------------------

    def abort(self, request_id: str) -> None:
        """Abort a request; replies that still arrive for it are dropped."""
        self._inbox.pop(request_id, None)
        self._generating.discard(request_id)
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._send(cp.Abort(id=request_id))

    def _begin(self, prompt: str | None, kwargs: dict[str, Any], stream: bool) -> tuple[str, float | None, int]:
        timeout = kwargs.pop("timeout", self.timeout)
        if timeout is not None and kwargs.get("deadline_s") is None:
            kwargs["deadline_s"] = timeout
        rid = self._ids.next()
        msg = build_generate(rid, prompt, stream=stream, **kwargs)
        self._send(msg)
        self._inbox[rid] = collections.deque()  # after sending: a reconnect while sending fails older requests only
        self._generating.add(rid)
        return rid, None if timeout is None else time.monotonic() + timeout + timeout_grace(timeout), msg.n

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate and wait for the whole completion.

        Keywords: token_ids or messages instead of prompt; sampling fields (max_tokens, temperature,
        top_k, top_p, min_p, seed, stop, stop_token_ids, ignore_eos, logprobs, penalties);
        timeout, deadline_s, model, skip_special_tokens, n (choices: the result's `choices`); chat:
        tools, tool_choice, chat_template_kwargs, parse_output.
        """
        rid, deadline, n = self._begin(prompt, kwargs, stream=False)
        choices = Choices(n)
        done = False
        try:
            while not choices.complete:
                reply = self._next(rid, deadline)
                if isinstance(reply, cp.Error):
                    done = True
                    raise MoedError.from_reply(reply)
                if isinstance(reply, cp.Final | cp.Chunk):
                    choices.add(reply)
            done = True
        finally:
            if not done:
                self.abort(rid)
            self._inbox.pop(rid, None)
            self._generating.discard(rid)
        return choices.completion()

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Stream:
        """Generate, yielding Deltas as they arrive; `stream.completion` is set at the end."""
        rid, deadline, n = self._begin(prompt, kwargs, stream=True)
        return Stream(self, rid, deadline, n)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Completion:
        return self.generate(messages=messages, **kwargs)

    def chat_stream(self, messages: list[dict[str, str]], **kwargs: Any) -> Stream:
        return self.stream(messages=messages, **kwargs)

    def health(self, timeout: float = 10.0) -> cp.HealthStatus:
        return self._call(cp.Health(id=self._ids.next()), timeout)

    def ready(self, timeout: float = 10.0) -> cp.ReadyStatus:
        return self._call(cp.Ready(id=self._ids.next()), timeout)

    def stats(self, timeout: float = 10.0) -> cp.StatsReport:
        return self._call(cp.Stats(id=self._ids.next()), timeout)

    def models(self, timeout: float = 10.0) -> list[cp.ModelInfo]:
        return self._call(cp.Models(id=self._ids.next()), timeout).models

    def placement(
        self, op: str, layer: int | None = None, expert: int | None = None, timeout: float = 60.0
    ) -> cp.PlacementResult:
        return self._call(cp.Placement(id=self._ids.next(), op=op, layer=layer, expert=expert), timeout)  # type: ignore[arg-type]

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.2) -> None:
        """Block until the daemon reports ready (model loaded); raises RequestTimeout."""
        end = time.monotonic() + timeout
        reason = "no answer"
        while time.monotonic() < end:
            try:
                status = self.ready(timeout=max(0.1, min(5.0, end - time.monotonic())))
            except (RequestTimeout, DaemonUnavailable) as e:
                reason = str(e)
                continue
            if status.ready:
                return
            reason = status.reason
            time.sleep(poll)
        raise RequestTimeout(f"daemon at {self.address} not ready within {timeout:.0f} s: {reason}")


class Stream(StreamState):
    """Iterate for Deltas. Closing it, or leaving the loop early, aborts the request."""

    client: Client

    def __iter__(self) -> Iterator[Delta]:
        try:
            while self._open:
                reply = self.client._next(self.id, self._deadline)
                delta = self._advance(reply)
                if delta is not None:
                    yield delta
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.client.abort(self.id)

    abort = close

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
