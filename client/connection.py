"""What the sync and asyncio clients do alike on the wire: open the DEALER socket, read a reply's frames, route
its items to the requests they name, and say why a Curve handshake failed. Each client keeps only its own way of
waiting (poll loop or reader task)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from moed.client import protocol as cp
from moed.client.calls import AuthenticationError, DaemonUnavailable
from moed.client.keys import CurveKeys

AUTH_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Failed:
    """Put in a request's inbox in place of a reply: waiting on it raises `exc`."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def timeout_grace(timeout: float) -> float:
    """The daemon ends a request at its deadline (= the call's timeout) with a Final; the client waits this
    much longer for it before giving up on the daemon."""
    return min(2.0, max(0.2, 0.25 * timeout))


def open_dealer(ctx: zmq.Context, address: str, curve: CurveKeys | None) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A connected DEALER socket (ZMTP heartbeats on, never lingering at close) and, with Curve keys, the monitor
    socket that reports a refused handshake (ZMQ itself only retries silently)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
    monitor = None
    if curve is not None:
        curve.apply(sock)
        monitor = sock.get_monitor_socket(AUTH_EVENTS)
    sock.connect(address)
    return sock, monitor


def auth_refused(address: str, monitor_frames: list[bytes]) -> AuthenticationError | None:
    """The error a monitor event means, or None for an event that is not a refused handshake."""
    event = parse_monitor_message(monitor_frames)["event"]
    if not event & AUTH_EVENTS:
        return None
    return AuthenticationError(
        f"the daemon at {address} refused the Curve handshake (event {zmq.Event(event).name}): "
        "this client's key is not allowed, or the server key is wrong"
    )


def decode(frames: list[bytes]) -> cp.Reply | None:
    """The reply these frames carry, or None for frames of another shape or protocol version (a daemon of another
    version still names the request in its Errors, which the caller's timeout then covers)."""
    if len(frames) != 2:
        return None
    try:
        cp.check_header(frames[0])
        return cp.decode_reply(frames[1])
    except cp.ProtocolError:
        return None


def restart_error(address: str) -> DaemonUnavailable:
    return DaemonUnavailable(f"the daemon at {address} restarted; in-flight requests were lost")


def routed(reply: cp.Reply) -> Iterator[tuple[str, Any]]:
    """(request id, what its inbox gets) for each item of a non-Pong reply; the daemon's `unknown_request` Error
    (it no longer holds the request, e.g. after a restart) becomes a Failed DaemonUnavailable."""
    for item in reply.items if isinstance(reply, cp.Batch) else (reply,):
        if isinstance(item, cp.Error) and item.code == "unknown_request":
            yield item.id, Failed(DaemonUnavailable(f"the daemon lost request {item.id}: {item.message}"))
        else:
            yield item.id, item
