"""A slow client's outbox (daemon/clients.py): chunks waiting for it merge per choice, so n choices never
mix and reasoning and tool-call deltas survive the merge; an outbox past its limit drops the client."""

from __future__ import annotations

import concurrent.futures

import zmq

from moed.client import protocol as cp
from moed.daemon.clients import ClientState, Outboxes
from moed.daemon.metrics import Metrics


class FullRouter:
    """A ROUTER whose queue to the client is always full (the client does not read)."""

    def send_multipart(self, frames, flags=0) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_exception(zmq.Again())
        return fut


def outboxes(limit: int = 16) -> tuple[Outboxes, ClientState, list[str]]:
    lost: list[str] = []
    clients: dict[bytes, ClientState] = {}
    ob = Outboxes(limit, Metrics("tiny"), clients, lambda client, why: lost.append(why))
    ob.router = FullRouter()
    client = clients[b"c"] = ClientState(b"c", 0.0, 8)
    return ob, client, lost


def call(name: str, args: str) -> cp.ToolCallDelta:
    return cp.ToolCallDelta(index=0, id="call_0", name=name, arguments=args)


def test_queued_chunks_merge_per_choice_and_keep_reasoning_and_tool_calls():
    ob, client, lost = outboxes()
    ob.send(
        client,
        cp.Batch(
            items=[
                cp.Chunk(id="r", text="a", token_ids=[1], index=0),
                cp.Chunk(id="r", token_ids=[2], index=1, reasoning="think"),
            ]
        ),
    )
    ob.send(client, cp.Chunk(id="r", text="c", token_ids=[3], index=0, tool_calls=[call("f", "{")]))
    ob.send(client, cp.Chunk(id="r", token_ids=[4], index=1, reasoning="ing"))
    ob.send(client, cp.Final(id="r", finish_reason="stop", prompt_tokens=1, completion_tokens=2, e2e_s=0.0))
    ob.send(client, cp.Chunk(id="r", text="e", token_ids=[5], index=1))  # choice 1 goes on after choice 0 ended
    ob.send(client, cp.Chunk(id="q", text="other", token_ids=[9]))
    got = [
        (
            type(r).__name__,
            r.id,
            r.index,
            getattr(r, "text", None),
            getattr(r, "token_ids", None),
            getattr(r, "reasoning", None),
        )
        for r in client.outbox
    ]
    assert got == [
        ("Chunk", "r", 0, "ac", [1, 3], ""),
        ("Chunk", "r", 1, "e", [2, 4, 5], "thinking"),
        ("Final", "r", 0, "", [], ""),
        ("Chunk", "q", 0, "other", [9], ""),
    ]
    assert client.outbox[0].tool_calls == [call("f", "{")]
    assert not lost and ob.backlogged == {b"c"}


def test_an_error_ends_the_merging_of_every_choice():
    ob, client, _ = outboxes()
    ob.send(client, cp.Batch(items=[cp.Chunk(id="r", text="a", index=0), cp.Chunk(id="r", text="b", index=1)]))
    ob.send(client, cp.Error(id="r", code="engine_error", message="gone"))
    assert client.pending_chunks == {}
    ob.send(client, cp.Chunk(id="r", text="late", index=1))  # a new request under the same id starts afresh
    assert [getattr(r, "text", None) for r in client.outbox] == ["a", "b", None, "late"]


def test_an_outbox_past_its_limit_drops_the_client():
    ob, client, lost = outboxes(limit=16)
    for i in range(17):
        ob.send(client, cp.Pong(daemon_id=f"{i}"))
    assert lost == ["queue_overflow"]
