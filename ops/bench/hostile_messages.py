"""Fuzzed client messages for the hostile-client benchmark: random frames, broken headers, random bytes and
msgpack trees, deeply nested bodies, requests with out-of-range or valid values, oversized bodies. Seeded, so a
failing message can be made again; tests/daemon/test_hostile.py draws the seeds with hypothesis."""

from __future__ import annotations

import random

import msgspec

from moed.client import protocol as cp

_enc = msgspec.msgpack.encode

_TAGS = ["generate", "abort", "heartbeat", "health", "ready", "stats", "models", "placement", "chunk", "launch", ""]


def wire_fields() -> list[str]:
    """Every field name of the protocol's messages (and the structs inside them), read from client/protocol.py so a
    new field is fuzzed without a list to keep in step."""
    structs = [v for v in vars(cp).values() if isinstance(v, type) and issubclass(v, msgspec.Struct)]
    return sorted({"type"} | {f for s in structs for f in s.__struct_fields__})


_FIELDS = wire_fields()
_SAMPLING = list(cp.SamplingParams.__struct_fields__)


def _text(rng: random.Random, n: int) -> str:
    alphabet = 'abc xyz\n\t"\\é你🙂\u0000\ud7ff'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def _number(rng: random.Random):
    return rng.choice(
        [
            0,
            -1,
            1,
            2**31,
            -(2**63),
            2**64 - 1,
            2**63 - 1,
            1e308,
            -1e308,
            float("nan"),
            float("inf"),
            -float("inf"),
            0.5,
            1e-300,
            rng.randint(-1000, 5000),
            rng.uniform(-10, 10),
        ]
    )


def _leaf(rng: random.Random):
    kind = rng.randrange(7)
    return [
        None,
        rng.random() < 0.5,
        _number(rng),
        _text(rng, 20),
        rng.randbytes(rng.randint(0, 20)),
        rng.randint(-(2**63), 2**64 - 1),
        msgspec.msgpack.Ext(rng.randint(-128, 127), rng.randbytes(4)),
    ][kind]


def _tree(rng: random.Random, depth: int = 0):
    if depth > 4 or rng.random() < 0.4:
        return _leaf(rng)
    if rng.random() < 0.5:
        return [_tree(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {
        rng.choice(_FIELDS) if rng.random() < 0.7 else _text(rng, 8): _tree(rng, depth + 1)
        for _ in range(rng.randint(0, 6))
    }


def _deep(rng: random.Random) -> bytes:
    depth = rng.randint(200, 20000)
    kind = rng.choice([b"\x91", b"\x81\xa1k"])
    value = kind * depth + b"\xc0"
    where = rng.choice(
        ["prompt", "messages", "ids", "junk", "id", "sampling", "top", "before_tag", "tools", "chat_template_kwargs"]
    )
    if where == "top":
        return value
    if where == "before_tag":  # the union's tag after the deep value: the decoder must skip it to find the tag
        return b"\x82" + _enc("prompt") + value + _enc("type") + _enc("generate")
    return (
        b"\x83"
        + _enc("type")
        + _enc("heartbeat" if where == "ids" else "generate")
        + _enc("id")
        + _enc("x")
        + _enc(where)
        + value
    )


def _request(rng: random.Random, valid: bool) -> dict:
    """A request with real field names; values in range when `valid`, else drawn far outside."""
    tag = rng.choice(["generate"] * 5 + ["abort", "heartbeat", "health", "ready", "stats", "models", "placement"])
    rid = f"f{rng.getrandbits(40):x}" if valid or rng.random() < 0.7 else rng.choice(["", "x" * 300, 7, None])
    msg: dict = {"type": tag, "id": rid}
    if tag == "generate":
        if valid:
            which = rng.choice(["prompt", "prompt_token_ids", "messages"])
            msg[which] = {
                "prompt": "hello " * rng.randint(1, 20),
                "prompt_token_ids": [rng.randint(0, 900) for _ in range(8)],
                "messages": [{"role": "user", "content": _text(rng, 30)}],
            }[which]
            msg["sampling"] = {"max_tokens": rng.randint(1, 8), "temperature": rng.choice([0.0, 0.7])}
            msg["stream"] = rng.random() < 0.7
            if rng.random() < 0.3:
                msg["n"] = rng.randint(1, 3)
            if which == "messages" and rng.random() < 0.3:
                msg["tools"] = [
                    {
                        "function": {
                            "name": "lookup",
                            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                        }
                    }
                ]
            if which == "messages" and rng.random() < 0.3:
                msg["chat_template_kwargs"] = {"enable_thinking": rng.random() < 0.5}
        else:
            for name in rng.sample(["prompt", "prompt_token_ids", "messages"], rng.randint(0, 2)):
                msg[name] = {
                    "prompt": _text(rng, 40),
                    "prompt_token_ids": [_number(rng) for _ in range(5)],
                    "messages": [{"role": _text(rng, 5), "content": _text(rng, 10)}],
                }[name]
            msg["sampling"] = {k: _number(rng) for k in rng.sample(_SAMPLING, rng.randint(1, 4))}
            if rng.random() < 0.3:
                msg["n"] = _number(rng)
            if rng.random() < 0.2:
                msg["tools"] = [{"function": {"name": _text(rng, 6), "parameters": _tree(rng)}}]
            if rng.random() < 0.2:
                msg["chat_template_kwargs"] = {_text(rng, 8): _tree(rng) for _ in range(2)}
            if rng.random() < 0.3:
                msg["deadline_s"] = _number(rng)
            if rng.random() < 0.2:
                msg["model"] = _text(rng, 10)
    elif tag == "heartbeat":
        msg = {"type": tag, "ids": [f"h{i}" if valid else _text(rng, 300) for i in range(rng.randint(0, 5))]}
    elif tag == "placement":
        msg["op"] = rng.choice(["get", "reset"] if valid else ["get", "pin", "unpin", "reset", "move"])
        if not valid:
            msg.update(layer=_number(rng), expert=_number(rng))
    return msg


def hostile_frames(rng: random.Random, max_message_bytes: int) -> list[bytes]:
    """One fuzzed client message (its ZMQ frames). Never over 2x max_message_bytes: past 4x, ZMQ itself cuts the
    peer off without a reply (documented), which is not what this measures."""
    family = rng.choices(range(9), weights=[8, 6, 10, 14, 12, 10, 20, 15, 0.05])[0]
    if family == 0:  # any number of frames of any bytes
        return [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.choice([1, 2, 3, 4]))]
    if family == 1:  # a broken or foreign header
        head = rng.choice([b"", b"moed:", b"moed:2", b"moed:1 ", b"MOED:1", rng.randbytes(20), b"moed:" + b"9" * 40])
        return [head, _enc({"type": "health", "id": "h"})]
    if family == 2:
        return [cp.HEADER, rng.randbytes(rng.randint(0, 300))]
    if family == 3:
        return [cp.HEADER, _enc(_tree(rng))]
    if family == 4:
        return [cp.HEADER, _deep(rng)]
    if family == 5:  # tagged like a message, fields of any type
        return [cp.HEADER, _enc({"type": rng.choice(_TAGS), **{rng.choice(_FIELDS): _tree(rng) for _ in range(3)}})]
    if family == 6:
        return [cp.HEADER, _enc(_request(rng, valid=False))]
    if family == 7:
        return [cp.HEADER, _enc(_request(rng, valid=True))]
    return [cp.HEADER, _enc({"type": "generate", "id": "big", "prompt": "x" * (max_message_bytes + 1)})]
