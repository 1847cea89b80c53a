"""Expert placement requests: the channel to the engine, and where a placement manager plugs in.

Clients send Placement requests (get, pin, unpin, reset). Without a placement manager they are
forwarded to the engine as `engine.protocol.Placement` and answered from its PlacementReply,
matched by token. The offload placement manager (DESIGN.md §4; its code belongs to offload/) runs
inside the daemon as an asyncio task: pass a factory to `Daemon(placement_factory=...)`. The
factory receives the `PlacementChannel` (to apply plans to the engine); the manager then gets every
EngineStats (per-expert counts) and answers clients' placement requests itself.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Protocol

from moed.engine import protocol as ep


class PlacementUnavailable(Exception):
    pass


class PlacementChannel:
    """Sends Placement commands to the engine and resolves each reply by its token."""

    def __init__(self, send: Callable[[ep.ToWorker], bool], timeout_s: float = 30.0):
        self._send = send
        self.timeout_s = timeout_s
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[ep.PlacementReply]] = {}

    async def request(self, op: str, layer: int | None = None, expert: int | None = None) -> ep.PlacementReply:
        token = next(self._tokens)
        fut: asyncio.Future[ep.PlacementReply] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        try:
            if not self._send(ep.Placement(op=op, layer=layer, expert=expert, token=token)):  # type: ignore[arg-type]
                raise PlacementUnavailable("engine is not ready")
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise PlacementUnavailable(f"engine did not answer the placement request within {self.timeout_s:.0f} s"
                                       ) from None
        finally:
            self._waiting.pop(token, None)

    def on_reply(self, reply: ep.PlacementReply) -> None:
        fut = self._waiting.get(reply.token)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def fail_all(self, reason: str) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(PlacementUnavailable(reason))


class PlacementManager(Protocol):
    """What a placement manager implements to run inside the daemon."""

    async def run(self) -> None:
        """The manager's long-running task (persist counts, compute and apply pin plans)."""

    def on_engine_stats(self, stats: ep.EngineStats) -> None:
        """Called for every EngineStats the worker sends (expert_counts since the previous one)."""

    async def handle(self, op: str, layer: int | None, expert: int | None) -> ep.PlacementReply:
        """Answer a client's placement request (the token of the reply is not used)."""


PlacementFactory = Callable[[PlacementChannel], PlacementManager]
