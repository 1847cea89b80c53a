"""The daemon over real ZMQ sockets, with the echoing worker double (tests/daemon_worker_double.py).

The double returns each request's prompt tokens cyclically, so every stream's exact text is
known: these tests check the daemon's routing, streaming, limits, error handling and cleanup.
The same behaviours against the real CPU engine are in test_daemon_engine.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec
import pytest
import zmq
from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config, metric_value, scrape, short_dir  # noqa: F401

from moed.client import protocol as cp
from moed.client.api import AsyncClient, Client, MoedError

SLOW = (*DOUBLE, "--double-step-s", "0.02")
enc = msgspec.msgpack.Encoder()


def echo(tok_ids: list[int], n: int) -> list[int]:
    return [tok_ids[i % len(tok_ids)] for i in range(n)]


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint):
    with DaemonThread(
        make_config(tiny_checkpoint, worker=SLOW, max_message_bytes=64 * 1024, client_concurrency=300)
    ) as d:
        d.wait_ready(30)
        yield d


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from moed.daemon.tokenizer import TextTokenizer

    return TextTokenizer(tiny_checkpoint)


class Raw:
    """A bare DEALER for sending arbitrary frames."""

    def __init__(self, address: str, opts: dict[int, int] | None = None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for k, v in (opts or {}).items():
            self.sock.setsockopt(k, v)
        self.sock.connect(address)
        self.pending: list = []
        self.batches = 0

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def request(self, msg) -> None:
        self.sock.send_multipart(cp.encode(msg))

    def recv(self, timeout: float = 5.0):
        """The next reply; the items of a Batch come one by one."""
        if self.pending:
            return self.pending.pop(0)
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        head, body = self.sock.recv_multipart()
        assert head == cp.HEADER
        reply = cp.decode_reply(body)
        if isinstance(reply, cp.Batch):
            self.batches += 1
            self.pending = list(reply.items)
            return self.pending.pop(0)
        return reply

    def recv_until(self, pred, timeout: float = 5.0):
        end = time.monotonic() + timeout
        while True:
            r = self.recv(max(0.01, end - time.monotonic()))
            if pred(r):
                return r

    def close(self) -> None:
        self.sock.close(linger=0)


def test_stream_delivers_incremental_text(daemon, tok):
    prompt = "Grüße aus München, 你好 🙂"
    ids = tok.encode(prompt)
    with Client(daemon.address, timeout=20) as c:
        stream = c.stream(prompt, max_tokens=3 * len(ids))
        deltas = list(stream)
        comp = stream.completion
    assert len(deltas) >= len(ids)  # one chunk per engine step, not one blob
    assert comp.finish_reason == "length" and comp.completion_tokens == 3 * len(ids)
    assert comp.token_ids == echo(ids, 3 * len(ids))
    assert comp.text == prompt * 3 == "".join(d.text for d in deltas)
    assert comp.prompt_tokens == len(ids) and 0 < comp.ttft_s <= comp.e2e_s


def test_generate_chat_and_token_ids(daemon, tok):
    with Client(daemon.address, timeout=20) as c:
        ids = tok.encode("hello world")
        r = c.generate(token_ids=ids, max_tokens=4, logprobs=2)
        assert r.token_ids == echo(ids, 4) and r.finish_reason == "length"
        assert len(r.logprobs) == 4 and r.logprobs[0].token_id == ids[0] and len(r.logprobs[0].top) == 2
        msgs = [{"role": "user", "content": "hi"}]
        r = c.chat(msgs, max_tokens=50, ignore_eos=False)
        chat_ids = tok.encode_chat(msgs)
        # The rendered prompt begins with [gMASK]<sop><|user|>; echoing reaches <|user|>, an eos id: "stop".
        assert r.finish_reason == "stop" and r.token_ids == chat_ids[:3]
        assert r.prompt_tokens == len(chat_ids)
        assert [m.name for m in c.models()] == [daemon.cfg.served_name]


async def test_100_concurrent_streams_get_their_own_tokens(daemon, tok):
    prompts = [f"stream {i}: " + "abcdefghij"[i % 10] * (1 + i % 7) + f" {i * 7919}" for i in range(100)]
    client = AsyncClient(daemon.address, timeout=60)

    async def one(p: str):
        s = await client.stream(p, max_tokens=12)
        got = [d async for d in s]
        return s.completion, got

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 60)
    finally:
        await client.close()
    for p, (comp, deltas) in zip(prompts, results):
        ids = tok.encode(p)
        assert comp.token_ids == echo(ids, 12), p
        assert comp.text == tok.decode(echo(ids, 12)) == "".join(d.text for d in deltas)


def test_abort_frees_the_request(daemon):
    with Client(daemon.address, timeout=20) as c:
        stream = c.stream("abort me please", max_tokens=2000)
        it = iter(stream)
        next(it), next(it)
        stream.abort()
        daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "request gone from the daemon")
        daemon.wait_for(
            lambda: (
                daemon.daemon.last_stats is not None
                and daemon.daemon.last_stats.running == 0
                and time.monotonic() - daemon.daemon.last_stats_at < 0.1
            ),
            5,
            "engine running count 0",
        )
        # Leaving a loop early aborts too.
        for n, _ in enumerate(c.stream("break out", max_tokens=2000)):
            if n == 2:
                break
        daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "request gone after break")
        assert c.generate("still fine", max_tokens=2).completion_tokens == 2


def test_deadline_ends_request_with_partial_output(daemon):
    with Client(daemon.address, timeout=20) as c:
        t0 = time.monotonic()
        r = c.generate("deadline", max_tokens=3000, deadline_s=0.3)
        assert r.finish_reason == "deadline" and 0 < r.completion_tokens < 3000
        assert 0.25 < time.monotonic() - t0 < 3
        assert r.text  # what was generated before the deadline is returned
    daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "deadline request gone")


def test_malformed_messages_get_errors_while_others_are_served(daemon, tok):
    prompt = "unbothered"
    ids = tok.encode(prompt)
    good = Client(daemon.address, timeout=20)
    stream = iter(good.stream(prompt, max_tokens=60))
    first = [next(stream).token_ids[0]]
    bad = Raw(daemon.address)
    huge = enc.encode({"type": "generate", "id": "big", "prompt": "x" * (100 * 1024)})
    cases = [
        ((b"only one frame",), "malformed", None),
        ((cp.HEADER, b"a", b"b"), "malformed", None),
        ((b"nonsense", enc.encode({"type": "health", "id": "h"})), "malformed", None),
        ((b"moed:2", enc.encode({"type": "health", "id": "h"})), "unsupported_version", None),
        ((cp.HEADER, enc.encode({"type": "health", "id": "h"})[:-2]), "malformed", None),
        ((cp.HEADER, b"\xc1\xc1"), "malformed", None),
        (
            (cp.HEADER, enc.encode({"type": "generate", "id": "t", "prompt": "p", "sampling": {"max_tokens": "9"}})),
            "invalid_request",
            "sampling.max_tokens",
        ),
        (
            (cp.HEADER, enc.encode({"type": "generate", "id": "t", "prompt_token_ids": [5, 99999]})),
            "invalid_request",
            "prompt_token_ids[1]",
        ),
        (
            (cp.HEADER, enc.encode({"type": "generate", "id": "t", "prompt": "p", "model": "other"})),
            "invalid_request",
            "model",
        ),
        (
            (cp.HEADER, enc.encode({"type": "generate", "id": "t", "prompt": "p", "sampling": {"max_tokens": 10**6}})),
            "invalid_request",
            "sampling.max_tokens",
        ),
        ((cp.HEADER, huge), "message_too_large", None),
        (
            (cp.HEADER, enc.encode({"type": "placement", "id": "t", "op": "pin", "layer": 1})),
            "invalid_request",
            "expert",
        ),
    ]
    try:
        for frames, code, field in cases:
            bad.send(*frames)
            r = bad.recv()
            assert isinstance(r, cp.Error) and r.code == code and r.field == field, (frames[:1], r)
        bad.request(cp.Health(id="after"))  # the bad client itself is still served
        assert bad.recv().ok
        rest = [d.token_ids[0] for d in stream]
        assert first + rest == echo(ids, 60)  # the good stream never noticed
    finally:
        bad.close()
        good.close()
    _, text = scrape(daemon.metrics_url + "/metrics")
    assert metric_value(text, "moed_protocol_errors_total", {"code": "malformed"}) >= 5
    assert metric_value(text, "moed_protocol_errors_total", {"code": "message_too_large"}) >= 1
    assert metric_value(text, "moed_protocol_errors_total", {"code": "unsupported_version"}) >= 1


def test_duplicate_ids_and_heartbeat_unknown_ids(daemon):
    raw = Raw(daemon.address)
    try:
        raw.request(cp.Generate(id="same", prompt="long one", sampling=cp.SamplingParams(max_tokens=500)))
        raw.request(cp.Generate(id="same", prompt="again"))
        r = raw.recv_until(lambda r: isinstance(r, cp.Error))
        assert r.code == "duplicate_id" and r.id == "same"
        raw.request(cp.Heartbeat(ids=["same", "ghost"]))
        r = raw.recv_until(lambda r: isinstance(r, cp.Error | cp.Pong))
        assert isinstance(r, cp.Pong) and r.daemon_id == daemon.daemon.daemon_id
        r = raw.recv_until(lambda r: isinstance(r, cp.Error))
        assert r.code == "unknown_request" and r.id == "ghost"
        raw.request(cp.Abort(id="same"))
        r = raw.recv_until(lambda r: isinstance(r, cp.Final))
        assert r.finish_reason == "abort" and r.id == "same"
    finally:
        raw.close()


def test_disconnect_aborts_the_clients_requests(daemon):
    raw = Raw(daemon.address)
    for i in range(3):
        raw.request(cp.Generate(id=f"d{i}", prompt="disconnect", sampling=cp.SamplingParams(max_tokens=3000)))
    daemon.wait_for(lambda: len(daemon.daemon.by_engine_id) == 3, 5, "three requests in flight")
    t0 = time.monotonic()
    raw.close()
    daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "requests aborted after disconnect")
    assert time.monotonic() - t0 < 2.5  # found by the socket monitor and a probe, not the 30 s heartbeat timeout
    _, text = scrape(daemon.metrics_url + "/metrics")
    assert metric_value(text, "moed_clients_dropped_total", {"reason": "disconnected"}) >= 1


def test_silent_client_times_out(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=SLOW, client_timeout_s=0.5)) as d:
        d.wait_ready(30)
        raw = Raw(d.address)  # connected, but sends no heartbeats
        try:
            raw.request(cp.Generate(id="s", prompt="silent", sampling=cp.SamplingParams(max_tokens=3000)))
            d.wait_for(lambda: len(d.daemon.by_engine_id) == 1, 5, "request in flight")
            d.wait_for(lambda: not d.daemon.by_engine_id, 5, "request aborted by heartbeat timeout")
            # A client that heartbeats (the library does while it waits) keeps its request.
            with Client(d.address, heartbeat_interval=0.1, timeout=20) as c:
                r = c.generate("patient", max_tokens=60)  # 60 steps x 20 ms > 0.5 s
                assert r.finish_reason == "length"
        finally:
            raw.close()


def test_per_client_concurrency_limit(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=SLOW, client_concurrency=2)) as d:
        d.wait_ready(30)
        a, b = Raw(d.address), Client(d.address, timeout=20)
        try:
            for i in range(3):
                a.request(cp.Generate(id=f"a{i}", prompt="x", sampling=cp.SamplingParams(max_tokens=100)))
            r = a.recv_until(lambda r: isinstance(r, cp.Error))
            assert r.code == "too_many_requests" and r.id == "a2"
            assert b.generate("other client", max_tokens=3).completion_tokens == 3  # limits are per client
        finally:
            a.close()
            b.close()


def test_slow_reader_does_not_stall_others_and_loses_nothing(tiny_checkpoint, tok):
    ipc = f"ipc://{short_dir()}/c.sock"  # unix socket buffers are small: ZMQ's queue to the reader fills
    with DaemonThread(
        make_config(tiny_checkpoint, worker=DOUBLE, listen=("tcp://127.0.0.1:*", ipc), client_send_hwm=20)
    ) as d:
        d.wait_ready(30)
        slow = Raw(ipc, {zmq.RCVHWM: 4, zmq.RCVBUF: 4096})
        prompts = [f"slow reader {i} ünïcode" for i in range(20)]
        try:
            for i, p in enumerate(prompts):
                slow.request(cp.Generate(id=f"s{i}", prompt=p, sampling=cp.SamplingParams(max_tokens=400)))
            with Client(d.address, timeout=30) as fast:  # served at full speed meanwhile
                t0 = time.monotonic()
                r = fast.generate("fast", max_tokens=40)
                assert r.completion_tokens == 40 and time.monotonic() - t0 < 5
            d.wait_for(lambda: not d.daemon.by_engine_id, 30, "slow reader's requests done")
            backlogged = d.call(lambda: next(iter(d.daemon.outboxes.backlogged)))
            assert d.call(lambda: len(d.daemon.clients[backlogged].outbox)) <= 2 * len(prompts)
            texts: dict[str, list[str]] = {f"s{i}": [] for i in range(len(prompts))}
            ids: dict[str, list[int]] = {f"s{i}": [] for i in range(len(prompts))}
            done = 0
            while done < len(prompts):
                r = slow.recv(10)
                if isinstance(r, cp.Chunk | cp.Final):
                    texts[r.id].append(r.text)
                    ids[r.id] += r.token_ids
                    done += isinstance(r, cp.Final)
            assert slow.batches > 0  # one message per engine step carried all its streams' chunks
            for i, p in enumerate(prompts):
                assert ids[f"s{i}"] == echo(tok.encode(p), 400)  # merged chunks, nothing lost or reordered
                assert "".join(texts[f"s{i}"]) == tok.decode(echo(tok.encode(p), 400))
            d.wait_for(lambda: not d.daemon.outboxes.backlogged, 5, "outbox flushed")
        finally:
            slow.close()


def test_queue_overflow_drops_only_that_client(tiny_checkpoint):
    ipc = f"ipc://{short_dir()}/c.sock"
    with DaemonThread(
        make_config(tiny_checkpoint, worker=DOUBLE, client_queue_limit=16, listen=("tcp://127.0.0.1:*", ipc))
    ) as d:
        d.wait_ready(30)
        hog = Raw(ipc, {zmq.RCVHWM: 2, zmq.RCVBUF: 2048, zmq.SNDHWM: 100000})
        try:
            for i in range(20000):  # replies it never reads: ZMQ's queue fills, then its outbox
                hog.request(cp.Health(id=f"h{i}"))
            d.wait_for(
                lambda: d.daemon.metrics.clients_dropped.labels("queue_overflow")._value.get() >= 1, 20, "hog dropped"
            )
            with Client(d.address, timeout=20) as c:
                assert c.generate("unaffected", max_tokens=3).completion_tokens == 3
        finally:
            hog.close()


def test_killed_worker_fails_in_flight_then_recovers(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=SLOW)) as d:
        d.wait_ready(30)
        c = Client(d.address, timeout=30)
        try:
            streams = [iter(c.stream(f"victim {i}", max_tokens=3000)) for i in range(5)]
            for s in streams:
                next(s)
            pid = d.daemon.supervisor.pid
            os.kill(pid, signal.SIGKILL)
            for s in streams:
                with pytest.raises(MoedError) as e:
                    for _ in s:
                        pass
                assert e.value.code == "engine_error" and "SIGKILL" in e.value.message
            d.wait_ready(30)
            assert d.daemon.supervisor.pid != pid
            assert c.generate("after restart", max_tokens=3).completion_tokens == 3
            _, text = scrape(d.metrics_url + "/metrics")
            assert metric_value(text, "moed_worker_restarts_total") == 1
            assert metric_value(text, "moed_requests_total", {"finish_reason": "error"}) == 5
        finally:
            c.close()


def test_stalled_worker_is_killed_and_restarted(tiny_checkpoint):
    worker = (*DOUBLE, "--double-stall-after", "5", "--double-step-s", "0.01")
    with DaemonThread(
        make_config(tiny_checkpoint, worker=worker, engine_stall_timeout_s=0.6, crash_loop_restarts=10)
    ) as d:
        d.wait_ready(30)
        with Client(d.address, timeout=30) as c:
            with pytest.raises(MoedError, match="stalled"):
                c.generate("stall", max_tokens=100)
            d.wait_ready(30)
            assert d.daemon.supervisor.restarts >= 1


def test_crash_loop_ends_unready_with_reason(tiny_checkpoint):
    cfg = make_config(tiny_checkpoint, worker=(*DOUBLE, "--double-exit-after-s", "0.3"), crash_loop_restarts=3)
    with DaemonThread(cfg) as d:
        d.wait_for(lambda: d.daemon.supervisor.state == "crash_loop", 30, "crash loop")
        status, body = scrape(d.metrics_url + "/ready")
        assert status == 503 and "crash loop" in body and "failing on purpose" in body and "exited with code 3" in body
        _, text = scrape(d.metrics_url + "/metrics")
        assert metric_value(text, "moed_engine_state", {"state": "crash_loop"}) == 1
        assert metric_value(text, "moed_ready") == 0 and metric_value(text, "moed_worker_restarts_total") == 2
        status, body = scrape(d.metrics_url + "/health")  # no watchdog either: systemd restarts the service
        assert status == 503 and "worker-link: crash loop" in body
        with Client(d.address, timeout=10) as c:
            with pytest.raises(MoedError) as e:
                c.generate("anyone?", max_tokens=2)
            assert e.value.code == "unavailable" and "crash loop" in e.value.message
            assert not c.ready().ready and "crash loop" in c.ready().reason


def test_metrics_endpoint_has_real_values(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=DOUBLE)) as d:
        d.wait_ready(30)
        with Client(d.address, timeout=20) as c:
            for n in (3, 5, 7):
                c.generate("metrics please", max_tokens=n)
            with pytest.raises(MoedError):
                c.generate("x", max_tokens=2, model="nope")
        d.wait_for(lambda: d.daemon.last_stats is not None and d.daemon.last_stats.num_steps >= 7, 5, "stats")
        status, text = scrape(d.metrics_url + "/metrics")
        assert status == 200
        v = lambda name, **labels: metric_value(text, name, labels)  # noqa: E731
        assert v("moed_requests_total", finish_reason="length") == 3
        assert v("moed_generation_tokens_total") == 15
        assert v("moed_prompt_tokens_total") == 3 * len(d.daemon.tokenizer.encode("metrics please"))
        assert v("moed_time_to_first_token_seconds_count") == 3
        assert v("moed_e2e_request_latency_seconds_count") == 3
        assert v("moed_inter_token_latency_seconds_count") == 12
        assert v("moed_step_duration_seconds_count") >= 7
        assert v("moed_protocol_errors_total", code="invalid_request") == 1
        assert v("moed_expert_cache_hits_total", layer="1") >= 21  # the double reports 3 hits per step
        assert v("moed_expert_cache_misses_total", layer="1") >= 7
        assert v("moed_expert_miss_service", policy="hybrid") == 1 and v("moed_expert_miss_service", policy="copy") == 0
        assert v("moed_expert_miss_service_rate_bytes_per_second", path="cpu") == 7.5e10
        assert v("moed_ready") == 1 and v("moed_engine_state", state="ready") == 1
        assert v("moed_requests_in_flight") == 0
        assert scrape(d.metrics_url + "/health") == (200, "ok\n")
        assert scrape(d.metrics_url + "/ready") == (200, "ready\n")
        assert scrape(d.metrics_url + "/nope")[0] == 404


def test_placement_requests_reach_the_engine(daemon):
    with Client(daemon.address, timeout=20) as c:
        c.placement("reset")
        assert c.placement("pin", 2, 5).pinned == {"2": [5]}
        assert c.placement("pin", 2, 9).pinned == {"2": [5, 9]}
        r = c.placement("unpin", 3, 1)
        assert not r.ok and "not pinned" in r.message
        assert c.placement("get").pinned == {"2": [5, 9]}
        assert c.placement("reset").pinned == {}
        with pytest.raises(MoedError) as e:
            c.placement("unpin", layer=1)
        assert e.value.field == "expert"


def test_placement_manager_integration_point(tiny_checkpoint):
    from moed.engine import protocol as ep

    class Manager:
        def __init__(self, channel):
            self.channel, self.stats, self.ran = channel, 0, False

        async def run(self):
            self.ran = True
            await self.channel.request("pin", 0, 1)  # a manager applies its plan through the channel

        def on_engine_stats(self, stats):
            self.stats += 1

        async def handle(self, op, layer, expert):
            return ep.PlacementReply(token=0, ok=True, message=f"manager saw {op}", pinned={"9": [9]})

    made = []
    with DaemonThread(
        make_config(tiny_checkpoint, worker=DOUBLE), placement_factory=lambda ch: made.append(Manager(ch)) or made[-1]
    ) as d:
        d.wait_ready(30)
        d.wait_for(lambda: made[0].stats >= 2, 5, "manager fed with engine stats")
        with Client(d.address, timeout=20) as c:
            r = c.placement("get")
            assert r.message == "manager saw get" and r.pinned == {"9": [9]}
        assert made[0].ran
