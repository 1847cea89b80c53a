"""The fuzz phase's client side: what the protocol says each fuzzed message must get (`Expectation`, `_check`),
and connections that send messages each followed by a Health fence and check every reply, so a wrong or missing
answer is found on the message that caused it."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from moed.client import protocol as cp
from moed.ops.bench.hostile_messages import hostile_frames

FENCE_TIMEOUT_S = 10.0  # a fence unanswered this long: the daemon is deaf
TERMINAL_TIMEOUT_S = 60.0  # an admitted fuzz generate must end (it is aborted after its fence)


@dataclass
class Expectation:
    """What the daemon must answer to one message, derived from the protocol's own decoder."""

    error: str | None = None  # the code of the one Error it must get
    # Nesting near the recursion limit: whether msgspec gives up depends on the decoding thread's stack depth, so
    # the daemon's thread may read what this one could not, and refuse it by its values instead.
    or_error: str | None = None
    msg: cp.Request | None = None
    waiting: set[str] = field(default_factory=set)  # reply kinds still due

    @classmethod
    def of(cls, frames: list[bytes], max_message_bytes: int) -> Expectation:
        if len(frames) != 2:
            return cls(error="malformed")
        try:
            cp.check_header(frames[0])
            if len(frames[1]) > max_message_bytes:
                return cls(error="message_too_large")
            msg = cp.decode_request(frames[1])
        except cp.ProtocolError as e:
            deep = e.code == "malformed" and "too deeply" in e.message
            return cls(error=e.code, or_error="invalid_request" if deep else None)
        return cls(msg=msg)


def _check(exp: Expectation, replies: list) -> tuple[list[str], bool]:
    """Problems with the replies seen so far, and whether the message still awaits replies (a generate's end,
    a placement answer) after its fence."""
    problems: list[str] = []
    bugs = [r.message for r in replies if isinstance(r, cp.Error) and r.code == "internal"]
    if bugs:  # answered, but by a daemon bug: a hostile message must meet a typed refusal, not an exception
        problems.append(f"internal errors: {bugs[:2]}")
    if exp.error is not None:
        codes = [r.code for r in replies if isinstance(r, cp.Error)]
        others = [r for r in replies if not isinstance(r, cp.Error)]
        if codes not in ([exp.error], [exp.or_error]) or others:
            problems.append(f"expected one Error {exp.error}, got {[type(r).__name__ for r in replies]} {codes}")
        return problems, False
    msg = exp.msg
    mine = [r for r in replies if getattr(r, "id", None) == getattr(msg, "id", None)]
    foreign = [r for r in replies if r not in mine and not isinstance(r, cp.Pong | cp.Error)]
    if foreign:
        problems.append(f"replies naming no request of this message: {foreign[:3]}")
    if isinstance(msg, cp.Abort):
        if replies:
            problems.append(f"an Abort got replies: {replies[:3]}")
        return problems, False
    if isinstance(msg, cp.Heartbeat):
        pongs = [r for r in replies if isinstance(r, cp.Pong)]
        unknown = [r for r in replies if isinstance(r, cp.Error) and r.code == "unknown_request"]
        if len(pongs) != 1 or len(unknown) != len(msg.ids) or len(pongs) + len(unknown) != len(replies):
            problems.append(f"heartbeat of {len(msg.ids)} ids got {[type(r).__name__ for r in replies]}")
        return problems, False
    kinds = {cp.Health: cp.HealthStatus, cp.Ready: cp.ReadyStatus, cp.Stats: cp.StatsReport, cp.Models: cp.ModelList}
    if type(msg) in kinds:
        if len(mine) != 1 or not isinstance(mine[0], kinds[type(msg)]):
            problems.append(f"{type(msg).__name__} got {mine}")
        return problems, False
    if isinstance(msg, cp.Placement):
        if len(mine) > 1 or (mine and not isinstance(mine[0], cp.PlacementResult | cp.Error)):
            problems.append(f"placement got {mine}")
        return problems, not mine
    # A Generate of n choices: each choice's chunks, then its Final; or one Error, last, which ends them all.
    finished: set[int] = set()
    errors = 0
    for r in mine:
        index = getattr(r, "index", None)
        if (
            errors
            or not isinstance(r, cp.Chunk | cp.Final | cp.Error)
            or (index is not None and (index in finished or not 0 <= index < msg.n))
        ):
            got = [(type(r).__name__, getattr(r, "index", None)) for r in mine]
            problems.append(f"generate of n={msg.n} got {got}")
            break
        if isinstance(r, cp.Final):
            finished.add(r.index)
        errors += isinstance(r, cp.Error)
    if any(isinstance(r, cp.Error) and r not in mine for r in replies):
        problems.append(f"Errors for other ids: {[r for r in replies if isinstance(r, cp.Error) and r not in mine]}")
    return problems, not errors and len(finished) < msg.n


@dataclass
class FuzzTally:
    sent: int = 0
    answered: int = 0  # every reply the protocol requires arrived, and nothing else
    wrong: list[str] = field(default_factory=list)  # first problems, for the report
    wrong_count: int = 0
    deaf: bool = False
    by_outcome: dict[str, int] = field(default_factory=dict)


class FuzzConnection:
    """One DEALER sending fuzzed messages, each followed by a Health fence, and checking the replies."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, max_message_bytes: int):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.limit = max_message_bytes
        self._fences = 0
        self._tag = secrets.token_hex(4)

    async def _recv(self, timeout: float) -> list:
        """The next reply's items; a reply that breaks the protocol is itself a finding (ProtocolError)."""
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        if len(frames) != 2:
            raise cp.ProtocolError("malformed", f"the daemon sent a reply of {len(frames)} frames")
        cp.check_header(frames[0])
        reply = cp.decode_reply(frames[1])
        return list(reply.items) if isinstance(reply, cp.Batch) else [reply]

    async def one(self, frames: list[bytes], tally: FuzzTally) -> None:
        """Send one message and a fence; check what came back for it."""
        exp = Expectation.of(frames, self.limit)
        self._fences += 1
        fence = f"fence-{self._tag}-{self._fences}"
        await self.sock.send_multipart(frames)
        await self.sock.send_multipart(cp.encode(cp.Health(id=fence)))
        tally.sent += 1
        replies: list = []
        try:
            while True:
                items = await self._recv(FENCE_TIMEOUT_S)
                is_fence = [isinstance(r, cp.HealthStatus) and r.id == fence for r in items]
                replies += [r for r, f in zip(items, is_fence, strict=True) if not f]
                if any(is_fence):
                    break
        except TimeoutError:
            tally.deaf = True
            problems = [f"the fence got no reply within {FENCE_TIMEOUT_S:.0f} s: a deaf daemon"]
        except cp.ProtocolError as e:
            problems = [f"a broken reply: {e.message}"]
        else:
            problems, pending = _check(exp, replies)
            if pending and not problems:  # an admitted generate, a placement the engine answers
                if isinstance(exp.msg, cp.Generate):
                    await self.sock.send_multipart(cp.encode(cp.Abort(id=exp.msg.id)))
                end = time.monotonic() + TERMINAL_TIMEOUT_S
                try:
                    while pending and not problems:
                        replies += await self._recv(max(0.01, end - time.monotonic()))
                        problems, pending = _check(exp, replies)
                except TimeoutError:
                    problems = [f"no final reply within {TERMINAL_TIMEOUT_S:.0f} s"]
                except cp.ProtocolError as e:
                    problems = [f"a broken reply: {e.message}"]
        outcome = exp.error or type(exp.msg).__name__
        tally.by_outcome[outcome] = tally.by_outcome.get(outcome, 0) + 1
        if problems:
            tally.wrong_count += 1
            if len(tally.wrong) < 20:
                tally.wrong.append(f"{outcome}: {'; '.join(problems)}"[:500])
        else:
            tally.answered += 1

    def close(self) -> None:
        self.sock.close(linger=0)


async def fuzz(address: str, n: int, seed: int, max_message_bytes: int, connections: int = 32) -> FuzzTally:
    """Send `n` fuzzed messages over `connections` sockets; stops at the first deaf fence."""
    ctx = zmq.asyncio.Context()
    tally = FuzzTally()
    conns = [FuzzConnection(ctx, address, max_message_bytes) for _ in range(connections)]

    async def run(i: int, conn: FuzzConnection) -> None:
        rng = random.Random(seed * 1000 + i)
        for _ in range(n // connections + (i < n % connections)):
            if tally.deaf:
                return
            await conn.one(hostile_frames(rng, max_message_bytes), tally)

    try:
        await asyncio.gather(*(run(i, c) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            c.close()
        ctx.term()
    return tally
