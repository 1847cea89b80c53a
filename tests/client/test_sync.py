"""The sync client: interleaved streams, timeouts, KeyboardInterrupt, reconnect, errors, CLI."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from daemon_harness import DOUBLE, DaemonThread, hang_guard, make_config  # noqa: F401

from moed.client.api import Client, DaemonUnavailable, MoedError, RequestTimeout
from moed.client.cli import add_client_arguments, client_main

SLOW = (*DOUBLE, "--double-step-s", "0.02")


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint):
    with DaemonThread(make_config(tiny_checkpoint, worker=SLOW)) as d:
        d.wait_ready(30)
        yield d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_interleaved_streams_in_one_client(daemon):
    tok = daemon.daemon.tokenizer
    with Client(daemon.address, timeout=20) as c:
        a, b = iter(c.stream("alpha α", max_tokens=12)), iter(c.stream("beta β", max_tokens=12))
        got_a, got_b = [], []
        for _ in range(12):
            got_a += next(a).token_ids
            got_b += next(b).token_ids
        ids_a, ids_b = tok.encode("alpha α"), tok.encode("beta β")
        assert got_a == [ids_a[i % len(ids_a)] for i in range(12)]
        assert got_b == [ids_b[i % len(ids_b)] for i in range(12)]
        assert c.stats().ready and c.health().state == "ready" and c.ready().ready
        c.wait_ready(5)


def test_timeout_becomes_the_deadline(daemon):
    with Client(daemon.address, timeout=0.4) as c:
        t0 = time.monotonic()
        r = c.generate("slow", max_tokens=3000)
        assert r.finish_reason == "deadline" and r.completion_tokens > 0 and time.monotonic() - t0 < 2
    daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "request gone")


def test_keyboard_interrupt_aborts_the_request(daemon):
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with Client(daemon.address, timeout=30) as c:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                for _ in c.stream("interrupt me", max_tokens=3000):
                    pass
            daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "stream aborted")
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                c.generate("interrupt me too", max_tokens=3000)
            daemon.wait_for(lambda: not daemon.daemon.by_engine_id, 5, "generate aborted")
            assert c.generate("fine", max_tokens=2).completion_tokens == 2  # the client is still usable
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_errors_and_argument_checks(daemon):
    with Client(daemon.address, timeout=20) as c:
        with pytest.raises(MoedError) as e:
            c.generate(token_ids=[1, 2, 10**6], max_tokens=2)
        assert e.value.code == "invalid_request" and e.value.field == "prompt_token_ids[2]"
        with pytest.raises(ValueError, match="temperature"):
            c.generate("x", temperature=-1)
        with pytest.raises(TypeError, match="max_new_tokens"):
            c.generate("x", max_new_tokens=3)


def test_no_daemon_raises_instead_of_hanging():
    with Client(f"tcp://127.0.0.1:{free_port()}", timeout=0.5, heartbeat_interval=0.1, daemon_timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            c.generate("anyone?", max_tokens=2)
        assert time.monotonic() - t0 < 2
    with Client(f"tcp://127.0.0.1:{free_port()}", timeout=30, heartbeat_interval=0.1, daemon_timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            c.generate("anyone?", max_tokens=2)
        assert time.monotonic() - t0 < 2


def test_reconnects_across_a_daemon_restart(tiny_checkpoint):
    port = free_port()
    cfg = make_config(tiny_checkpoint, worker=SLOW, listen=(f"tcp://127.0.0.1:{port}",))
    c = Client(f"tcp://127.0.0.1:{port}", timeout=30, heartbeat_interval=0.1, daemon_timeout=1.0)
    try:
        with DaemonThread(cfg) as d:
            d.wait_ready(30)
            assert c.generate("before", max_tokens=2).completion_tokens == 2
            stream = iter(c.stream("in flight", max_tokens=3000))
            next(stream)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):  # daemon gone: no Pong within daemon_timeout
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 3
        with DaemonThread(make_config(tiny_checkpoint, worker=SLOW, listen=(f"tcp://127.0.0.1:{port}",))) as d:
            d.wait_ready(30)
            assert c.generate("after", max_tokens=2).completion_tokens == 2
            # A request the new daemon never saw fails fast instead of waiting for its timeout.
            stream = iter(c.stream("lost", max_tokens=3000))
            next(stream)
            d.call(lambda: d.daemon._abort_client_requests(next(iter(d.daemon.clients.values())), reply=False))
            with pytest.raises(DaemonUnavailable, match="lost request"):
                for _ in stream:
                    pass
    finally:
        c.close()


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    p = argparse.ArgumentParser()
    add_client_arguments(p)
    rc = client_main(p.parse_args(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli(daemon, capsys):
    rc, out, err = _cli(["Hallo Welt", "--address", daemon.address, "--max-tokens", "4"], capsys)
    ids = daemon.daemon.tokenizer.encode("Hallo Welt")
    assert rc == 0 and out == daemon.daemon.tokenizer.decode([ids[i % len(ids)] for i in range(4)]) + "\n"
    assert "[length; " in err
    rc, out, _ = _cli(["x", "--address", daemon.address, "--max-tokens", "3", "--json"], capsys)
    assert rc == 0 and json.loads(out)["completion_tokens"] == 3
    rc, out, err = _cli(["hi", "--address", daemon.address, "--chat", "--system", "be brief", "--no-stream"], capsys)
    tok = daemon.daemon.tokenizer
    chat = tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    end = chat.index(tok.tokenizer.token_to_id("<|user|>"))  # an eos id: the echo stops there
    # The template opens <think>, so the echoed text is the reply's reasoning (stderr); its answer is empty.
    assert tok.decode(chat[: end + 1]) == "be brief"
    assert rc == 0 and out == "\n" and "be brief" in err
    rc, out, _ = _cli(["--health", "--address", daemon.address], capsys)
    assert rc == 0 and json.loads(out)["state"] == "ready"
    rc, _, err = _cli(["--address", daemon.address], capsys)
    assert rc == 2 and "give a prompt" in err
    rc, _, err = _cli(["x", "--address", daemon.address, "--temperature", "-3"], capsys)
    assert rc == 2 and "temperature" in err
    rc, _, err = _cli(["x", "--address", daemon.address, "--max-tokens", "99999"], capsys)
    assert rc == 1 and "max_tokens" in err


def test_cli_module_entry_point(daemon):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moed.client.cli",
            "abc",
            "--address",
            daemon.address,
            "--max-tokens",
            "3",
            "--no-stream",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ids = daemon.daemon.tokenizer.encode("abc")
    assert out.returncode == 0, out.stderr
    assert out.stdout == daemon.daemon.tokenizer.decode([ids[i % len(ids)] for i in range(3)]) + "\n"
