"""Clients of the daemon: per-client state, and the outboxes that send replies without blocking.

Per client (ROUTER routing id) the daemon keeps its in-flight requests, the time it was last heard
from, and an outbox. Replies are handed to ZMQ without blocking; when a client's ZMQ queue is full
(it reads slowly) replies wait in its outbox, where consecutive chunks of one choice merge into
one, so the outbox is bounded by the client's requests, not by its tokens. An outbox past
`client_queue_limit` drops the client. Nothing a slow or broken client does can delay replies to
others. A local client (the HTTP API, daemon/openai_api.py) has a `deliver` callback instead of a
socket: its replies are handed to it at once and never queue here.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from moed.client import protocol as cp
from moed.daemon.metrics import Metrics
from moed.daemon.request import GenerateRequest

log = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
FLUSH_INTERVAL_S = 0.002  # retry period for outboxes of slow clients


def merge_chunks(into: cp.Chunk, more: cp.Chunk) -> None:
    """Append a later chunk of the same choice to one not sent yet."""
    into.text += more.text
    into.reasoning += more.reasoning
    into.token_ids = [*into.token_ids, *more.token_ids]
    if more.logprobs:
        into.logprobs = (into.logprobs or []) + more.logprobs
    if more.tool_calls:
        into.tool_calls = (into.tool_calls or []) + more.tool_calls


class ClientState:
    __slots__ = (
        "cancelled",
        "deliver",
        "gone",
        "identity",
        "last_seen",
        "limit",
        "outbox",
        "pending_chunks",
        "requests",
    )

    def __init__(self, identity: bytes, now: float, limit: int, deliver: Callable[[cp.Reply], None] | None = None):
        self.identity = identity
        self.limit = limit  # choices in flight
        self.deliver = deliver  # a local client's reply sink (None: a ZMQ peer)
        # request id -> its choices still running; None: admission in progress (tokenising)
        self.requests: dict[str, list[GenerateRequest] | None] = {}
        self.cancelled: set[str] = set()  # aborted while tokenising
        self.last_seen = now
        self.outbox: collections.deque[cp.Reply] = collections.deque()
        # (request id, choice) -> its chunk waiting in the outbox
        self.pending_chunks: dict[tuple[str, int], cp.Chunk] = {}
        self.gone = False


class Outboxes:
    """Sends replies to clients over the ROUTER; queues them per client while ZMQ's queue is full.

    `on_lost(client, reason)` is called when a client is found gone ("disconnected") or its outbox
    overflows ("queue_overflow"); it must end the client's requests and call `forget`.
    """

    def __init__(
        self,
        queue_limit: int,
        metrics: Metrics,
        clients: dict[bytes, ClientState],
        on_lost: Callable[[ClientState, str], None],
    ):
        self.queue_limit = queue_limit
        self.metrics = metrics
        self.clients = clients
        self.on_lost = on_lost
        self.router: zmq.asyncio.Socket | None = None  # set once the socket is bound
        self.backlogged: set[bytes] = set()
        self._backlog_event = asyncio.Event()

    def send(self, client: ClientState, reply: cp.Reply) -> None:
        if client.gone:
            return
        if client.deliver is not None:
            client.deliver(reply)
            return
        if client.outbox:
            self._enqueue(client, reply)
            return
        fut = self.router.send_multipart([client.identity, cp.HEADER, _encoder.encode(reply)], flags=zmq.DONTWAIT)
        exc = fut.exception()
        if exc is None:
            return
        if isinstance(exc, zmq.Again):
            self._enqueue(client, reply)
        elif isinstance(exc, zmq.ZMQError) and exc.errno == errno.EHOSTUNREACH:
            self.on_lost(client, "disconnected")
        else:
            log.error("sending to client %s failed: %s", client.identity.hex(), exc)

    def forget(self, client: ClientState) -> None:
        """Drop what is queued for a client that is gone."""
        client.outbox.clear()
        client.pending_chunks.clear()
        self.backlogged.discard(client.identity)

    def _enqueue(self, client: ClientState, reply: cp.Reply) -> None:
        if isinstance(reply, cp.Batch):  # queued item by item, so its chunks can merge with later ones
            for item in reply.items:
                if not client.gone:
                    self._enqueue(client, item)
            return
        if isinstance(reply, cp.Chunk):
            pending = client.pending_chunks.get((reply.id, reply.index))
            if pending is not None:  # merge into the chunk still waiting: the outbox does not grow
                merge_chunks(pending, reply)
                return
            client.pending_chunks[reply.id, reply.index] = reply
        elif isinstance(reply, cp.Final):
            client.pending_chunks.pop((reply.id, reply.index), None)
        elif isinstance(reply, cp.Error):  # ends every choice of the request
            for key in [k for k in client.pending_chunks if k[0] == reply.id]:
                del client.pending_chunks[key]
        client.outbox.append(reply)
        if len(client.outbox) > self.queue_limit:
            self.on_lost(client, "queue_overflow")
            return
        if client.identity not in self.backlogged:
            self.backlogged.add(client.identity)
            self._backlog_event.set()
        self.metrics.backlog.inc()

    def _flush(self, client: ClientState) -> None:
        # Sends go through the asyncio socket (DONTWAIT completes at once): a send on the raw shadow could
        # consume the edge that wakes the frontend's pending receive.
        router = self.router
        while client.outbox:
            reply = client.outbox[0]
            exc = router.send_multipart(
                [client.identity, cp.HEADER, _encoder.encode(reply)], flags=zmq.DONTWAIT
            ).exception()
            if isinstance(exc, zmq.Again):
                return
            if exc is not None:
                if isinstance(exc, zmq.ZMQError) and exc.errno == errno.EHOSTUNREACH:
                    self.on_lost(client, "disconnected")
                    return
                raise exc
            client.outbox.popleft()
            self.metrics.backlog.dec()
            if isinstance(reply, cp.Chunk) and client.pending_chunks.get((reply.id, reply.index)) is reply:
                del client.pending_chunks[reply.id, reply.index]
        self.backlogged.discard(client.identity)

    async def run(self) -> None:
        """Retry backlogged outboxes every FLUSH_INTERVAL_S until they are empty."""
        while True:
            await self._backlog_event.wait()
            for identity in list(self.backlogged):
                client = self.clients.get(identity)
                if client is None:
                    self.backlogged.discard(identity)
                else:
                    self._flush(client)
            if not self.backlogged:
                self._backlog_event.clear()
                self.metrics.backlog.set(0)
            else:
                await asyncio.sleep(FLUSH_INTERVAL_S)
