"""A live daemon against hostile clients: it answers every message as the protocol says, keeps
serving everyone else, and admits no prompt whose cost exceeds its limits.

The fuzzing uses the benchmark's generator and checker (ops/bench/hostile_messages.py and
hostile_fuzz.py) with hypothesis choosing the seeds, a bounded number of examples here; the
benchmark sends 100,000.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest
import zmq
from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config, metric_value, scrape  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moed.client import protocol as cp
from moed.client.api import Client, MoedError
from moed.daemon.admission import message_bytes_for
from moed.ops.bench.hostile_fuzz import FuzzConnection, FuzzTally
from moed.ops.bench.hostile_load import filler_text
from moed.ops.bench.hostile_messages import hostile_frames

enc = msgspec.msgpack.Encoder()
LIMIT = 128 * 1024


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, max_message_bytes=LIMIT, client_concurrency=64)) as d:
        d.wait_ready(30)
        yield d


class Streamer:
    """Another client, streaming all along: every stream must end complete and unchanged."""

    def __init__(self, address: str):
        self.address = address
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with Client(self.address, timeout=30) as c:
            expected = None
            while not self.stop.is_set():
                try:
                    ids = [i for d in c.stream("steady as she goes", max_tokens=40) for i in d.token_ids]
                except Exception as e:
                    self.failures.append(repr(e))
                    continue
                expected = expected or ids
                if len(ids) != 40 or ids != expected:
                    self.failures.append(f"stream got {ids}")
                self.done += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_fuzzed_messages_are_answered_and_others_keep_streaming(daemon):
    loop = asyncio.new_event_loop()
    ctx = zmq.asyncio.Context()
    conn = loop.run_until_complete(_connect(ctx, daemon.address))
    tally = FuzzTally()
    others = Streamer(daemon.address)

    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def one(rng):
        frames = hostile_frames(rng, LIMIT)
        before = tally.wrong_count
        loop.run_until_complete(conn.one(frames, tally))
        assert not tally.deaf and tally.wrong_count == before, (frames[:1], tally.wrong[-1:])

    try:
        one()
        others.finish()
        assert tally.answered == tally.sent >= 250
        assert others.done >= 1 and not others.failures, others.failures[:3]
        assert daemon.call(lambda: daemon.daemon.liveness.problems()) == []
        assert daemon.call(lambda: sum(daemon.daemon.liveness.failures.values())) == 0  # no serving task died
        assert scrape(daemon.metrics_url + "/health") == (200, "ok\n")
    finally:
        others.finish()
        conn.close()
        ctx.term()
        loop.close()


async def _connect(ctx: zmq.asyncio.Context, address: str) -> FuzzConnection:
    return FuzzConnection(ctx, address, LIMIT)


class Raw:
    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 10.0) -> cp.Reply:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply: the daemon is deaf")
        head, body = self.sock.recv_multipart()
        assert head == cp.HEADER
        return cp.decode_reply(body)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.mark.parametrize("where", ["prompt", "messages", "ids", "unknown field", "before the tag", "top level"])
def test_a_1kb_message_nested_1000_deep_does_not_make_the_daemon_deaf(daemon, where):
    """Issue 15's first defect: such a message ended the frontend silently; nothing was read after it."""
    value = b"\x91" * 1000 + b"\xc0"
    body = {
        "prompt": b"\x83"
        + enc.encode("type")
        + enc.encode("generate")
        + enc.encode("id")
        + enc.encode("d")
        + enc.encode("prompt")
        + value,
        "messages": b"\x83"
        + enc.encode("type")
        + enc.encode("generate")
        + enc.encode("id")
        + enc.encode("d")
        + enc.encode("messages")
        + value,
        "ids": b"\x82" + enc.encode("type") + enc.encode("heartbeat") + enc.encode("ids") + value,
        "unknown field": b"\x83"
        + enc.encode("type")
        + enc.encode("health")
        + enc.encode("id")
        + enc.encode("d")
        + enc.encode("junk")
        + value,
        "before the tag": b"\x82" + enc.encode("prompt") + value + enc.encode("type") + enc.encode("generate"),
        "top level": value,
    }[where]
    raw = Raw(daemon.address)
    try:
        raw.send(cp.HEADER, body)
        r = raw.recv()
        assert isinstance(r, cp.Error) and r.code in ("malformed", "invalid_request")
        raw.send(*cp.encode(cp.Health(id="still-there")))
        assert raw.recv().id == "still-there"
    finally:
        raw.close()
    assert daemon.call(lambda: daemon.daemon.liveness.failures["frontend"]) == 0


def count_encoded(d: DaemonThread, monkeypatch) -> list[int]:
    """The characters of every text the daemon's tokenizer encodes from now on, one entry per call."""
    encoded: list[int] = []
    tok = d.daemon.tokenizer
    real = tok._encode_batch

    def counting(texts, **kw):
        encoded.append(sum(map(len, texts)))
        return real(texts, **kw)

    monkeypatch.setattr(tok, "_encode_batch", counting)
    return encoded


def test_limits_refuse_before_tokenising(daemon, monkeypatch):
    """A prompt that cannot fit is refused having tokenised at most one counting window of it, whatever its size;
    token ids, max_tokens and message counts are checked before any tokenising."""
    encoded = count_encoded(daemon, monkeypatch)
    max_len = daemon.daemon.supervisor.info.max_model_len
    with Client(daemon.address, timeout=30) as c:

        def refused(**kw) -> MoedError:
            with pytest.raises(MoedError) as e:
                c.generate(**{"max_tokens": 4, **kw})
            assert e.value.code == "invalid_request"
            return e.value

        e = refused(prompt=filler_text(LIMIT - 1024))  # within max_message_bytes: counted, and only until past
        assert "has more than" in e.message and f"at most {max_len}" in e.message and e.field == "prompt"
        assert sum(encoded) <= 2 * (1 << 16)
        encoded.clear()
        e = refused(token_ids=[1] * max_len)
        assert e.field == "prompt_token_ids" and str(max_len) in e.message
        e = refused(prompt="hi", max_tokens=max_len)
        assert e.field == "sampling.max_tokens" and "leaves no room" in e.message
        e = refused(messages=[{"role": "u", "content": ""}] * max_len)
        assert e.field == "messages"
        assert encoded == []
        with pytest.raises(MoedError) as big:
            c.generate(prompt="x" * (LIMIT + 1), max_tokens=4)
        assert big.value.code == "message_too_large" and str(LIMIT) in big.value.message
        assert c.generate("still serving", max_tokens=3).completion_tokens == 3


def test_max_message_bytes_defaults_to_what_max_model_len_can_use(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint)) as d:
        d.wait_ready(30)
        max_len = d.daemon.supervisor.info.max_model_len
        limit = d.call(lambda: d.daemon.admission.max_message_bytes)
        assert limit == message_bytes_for(max_len) == 16 * max_len + (64 << 10)
        with Client(d.address, timeout=30) as c:
            with pytest.raises(MoedError) as e:
                c.generate("x" * (8 << 20), max_tokens=4)  # the old default let this in: ~1 GB of encodings
            assert e.value.code == "message_too_large" and f"max_message_bytes={limit}" in e.value.message
            assert c.generate("fine", max_tokens=2).completion_tokens == 2


def test_tokenising_releases_the_gil(tiny_checkpoint):
    """The daemon tokenises long prompts in a thread; that only keeps its loop serving if the tokenizer lets go
    of the GIL meanwhile (the library's plain encode does not). The main thread must get to run during it."""
    from moed.daemon.tokenizer import TextTokenizer

    tok = TextTokenizer(tiny_checkpoint)
    text = filler_text(1 << 20)
    done = threading.Event()
    progress = []

    def encode() -> None:
        tok.encode(text)
        done.set()

    worker = threading.Thread(target=encode)
    worker.start()
    while not done.is_set():
        progress.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    assert len(progress) >= 20, (
        f"the main thread ran {len(progress)} times during a {progress[-1] - progress[0]:.2f} s encode"
    )


def test_a_long_prompt_counted_then_tokenised_off_the_loop_gets_its_exact_ids(tiny_checkpoint):
    """A prompt long enough to be counted first and tokenised in a thread is admitted with the ids of encoding it
    whole."""
    with DaemonThread(make_config(tiny_checkpoint, max_message_bytes=1 << 20)) as d:  # 54 bytes a token: over auto
        d.wait_ready(30)
        max_len = d.daemon.supervisor.info.max_model_len
        tok = d.daemon.tokenizer
        # 18 characters a token in the tiny vocabulary: over the in-loop limit (32768 characters) and over one
        # counting window (65536), under max_model_len tokens.
        text = "日本語のテキストも少し入れておきます" * (max_len - 200)
        assert len(text) > 65536 and len(tok.encode(text)) < max_len - 8
        with Client(d.address, timeout=60) as c:
            done = c.generate(text, max_tokens=2)
            assert done.prompt_tokens == len(tok.encode(text))
            assert done.token_ids == tok.encode(text)[:2]  # the double echoes the prompt's ids


def test_http_prompts_meet_the_same_limits_and_the_api_stays_live(tiny_checkpoint, monkeypatch):
    """The HTTP API admits through the same checks: a prompt past max_model_len is refused having tokenised at
    most one counting window of it, a body over max_message_bytes gets 413, and the API keeps answering."""
    import http.client
    import json

    def post(d: DaemonThread, path: str, body: bytes) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", d.daemon.http_port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    with DaemonThread(make_config(tiny_checkpoint, http_address="127.0.0.1:0", max_message_bytes=LIMIT)) as d:
        d.wait_ready(30)
        max_len = d.daemon.supervisor.info.max_model_len
        encoded = count_encoded(d, monkeypatch)
        code, body = post(
            d, "/v1/completions", json.dumps({"prompt": filler_text(LIMIT - 1024), "max_tokens": 4}).encode()
        )
        assert code == 400 and "has more than" in body["error"]["message"] and body["error"]["param"] == "prompt"
        assert sum(encoded) <= 2 * (1 << 16)
        encoded.clear()
        many = [{"role": "user", "content": "x"}] * max_len  # within the byte limit, too many to fit
        code, body = post(
            d, "/v1/chat/completions", json.dumps({"messages": many, "max_tokens": 4}, separators=(",", ":")).encode()
        )
        assert code == 400 and body["error"]["param"] == "messages" and encoded == []
        code, body = post(d, "/v1/completions", json.dumps({"prompt": "x" * LIMIT, "max_tokens": 4}).encode())
        assert code == 413 and f"max_message_bytes={LIMIT}" in body["error"]["message"]
        code, body = post(d, "/v1/completions", json.dumps({"prompt": "still serving", "max_tokens": 3}).encode())
        assert code == 200 and body["usage"]["completion_tokens"] == 3
        assert d.call(lambda: d.daemon.liveness.problems()) == []
