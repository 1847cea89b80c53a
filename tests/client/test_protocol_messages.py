"""The client protocol: round trips, field-naming validation errors, headers, broken bodies."""

from __future__ import annotations

import msgspec
import pytest

from moed.client import protocol as cp
from moed.client.calls import build_generate

enc = msgspec.msgpack.Encoder()


def test_every_message_round_trips():
    requests = [
        cp.Generate(
            id="a",
            prompt="hi",
            sampling=cp.SamplingParams(temperature=0.7, stop=["x"], logprobs=2),
            stream=False,
            deadline_s=3.5,
        ),
        cp.Generate(id="b", prompt_token_ids=[1, 2, 3]),
        cp.Generate(id="c", messages=[cp.ChatMessage("user", "hello")]),
        cp.Abort(id="a"),
        cp.Heartbeat(ids=["a", "b"]),
        cp.Health(id="h"),
        cp.Ready(id="r"),
        cp.Stats(id="s"),
        cp.Models(id="m"),
        cp.Placement(id="p", op="pin", layer=3, expert=7),
    ]
    for msg in requests:
        head, body = cp.encode(msg)
        cp.check_header(head)
        assert cp.decode_request(body) == msg
    replies = [
        cp.Chunk(id="a", text="é", token_ids=[5], logprobs=[cp.TokenLogprob(5, -0.1, [(5, -0.1), (6, -2.0)])]),
        cp.Final(
            id="a",
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=2,
            e2e_s=0.5,
            ttft_s=0.1,
            text="x",
            token_ids=[1],
            stop="\n",
        ),
        cp.Error(id="a", code="invalid_request", message="bad", field="sampling.top_p"),
        cp.Pong(daemon_id="d"),
        cp.HealthStatus(id="h", ok=True, state="ready", uptime_s=1.0),
        cp.ReadyStatus(id="r", ready=False, reason="loading"),
        cp.ModelList(id="m", models=[cp.ModelInfo("tiny", "/x", 4096, 1024)]),
        cp.PlacementResult(id="p", ok=True, pinned={"3": [7]}),
    ]
    for msg in replies:
        head, body = cp.encode(msg)
        assert cp.decode_reply(body) == msg


@pytest.mark.parametrize(
    "body, field",
    [
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"temperature": -1}}, "sampling.temperature"),
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"top_p": float("nan")}}, "sampling.top_p"),
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"max_tokens": "ten"}}, "sampling.max_tokens"),
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"nucleus": 0.9}}, "sampling.nucleus"),
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"stop": [""]}}, "sampling.stop[0]"),
        ({"type": "generate", "id": "x", "prompt": "p", "sampling": {"stop": ["a"] * 17}}, "sampling.stop"),
        ({"type": "generate", "id": "x", "prompt_token_ids": [1, -2]}, "prompt_token_ids[1]"),
        ({"type": "generate", "id": "x", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"type": "generate", "prompt": "p"}, "id"),
        ({"type": "generate", "id": "", "prompt": "p"}, "id"),
        ({"type": "generate", "id": "x", "prompt": 5}, "prompt"),
        ({"type": "generate", "id": "x", "prompt": "p", "deadline_s": 0}, "deadline_s"),
        ({"type": "generate", "id": "x"}, "prompt"),
        ({"type": "generate", "id": "x", "prompt": "p", "messages": [{"role": "u", "content": "c"}]}, "messages"),
        ({"type": "generate", "id": "x", "prompt_token_ids": []}, "prompt_token_ids"),
        ({"type": "placement", "id": "x", "op": "move"}, "op"),
        ({"type": "launch", "id": "x"}, "type"),
        ({"id": "x"}, "type"),
    ],
)
def test_invalid_field_is_named(body, field):
    with pytest.raises(cp.ProtocolError) as e:
        cp.decode_request(enc.encode(body))
    assert e.value.code == "invalid_request"
    assert e.value.field == field, e.value.message
    if body.get("id"):
        assert e.value.request_id == body["id"]  # the reply can still be matched to the request
    reply = e.value.to_reply()
    assert reply.field == field and reply.code == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        enc.encode({"type": "health", "id": "x"})[:-1],  # truncated
        enc.encode({"type": "health", "id": "x"}) + b"\x00",  # trailing bytes
        b"\xc1",  # a msgpack opcode that is never valid
        b"",
    ],
)
def test_broken_bodies_are_malformed(body):
    with pytest.raises(cp.ProtocolError) as e:
        cp.decode_request(body)
    assert e.value.code == "malformed"


def test_not_a_map_is_invalid():
    with pytest.raises(cp.ProtocolError) as e:
        cp.decode_request(enc.encode([1, 2, 3]))
    assert e.value.code == "invalid_request"


def test_headers():
    cp.check_header(b"moed:1")
    with pytest.raises(cp.ProtocolError) as e:
        cp.check_header(b"moed:2")
    assert e.value.code == "unsupported_version" and "'2'" in e.value.message
    for bad in (b"", b"MOED:1", b"\x00" * 4, b"moed:" + b"9" * 40):
        with pytest.raises(cp.ProtocolError) as e:
            cp.check_header(bad)
        assert e.value.code == "malformed"


def test_build_generate_checks_before_sending():
    msg = build_generate("r1", "hello", stream=True, max_tokens=5, stop="\n", temperature=0.5, deadline_s=2.0)
    assert msg.sampling.stop == ["\n"] and msg.sampling.max_tokens == 5 and msg.deadline_s == 2.0
    with pytest.raises(ValueError, match=r"sampling\.top_p"):
        build_generate("r1", "x", stream=True, top_p=1.5)
    with pytest.raises(ValueError, match="prompt"):
        build_generate("r1", None, stream=True)
    with pytest.raises(TypeError, match="nucleus"):
        build_generate("r1", "x", stream=True, nucleus=0.9)
