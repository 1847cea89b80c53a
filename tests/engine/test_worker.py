"""The worker process over real ZMQ ipc sockets: the daemon's side of the contract, played by the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq

from moed.engine import protocol as P
from moed.engine.llm_engine import EngineConfig, LLMEngine

ARGS = ["--device", "cpu", "--max-running", "4", "--max-tokens-per-step", "16", "--page-size", "4"]


class Daemon:
    """The daemon's two sockets: it binds, the worker connects."""

    def __init__(self, tmp: Path) -> None:
        self.ctx = zmq.Context()
        self.to_worker = f"ipc://{tmp}/to-worker"
        self.from_worker = f"ipc://{tmp}/from-worker"
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.bind(self.to_worker)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.from_worker)

    def argv(self, model: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "moed.engine.worker",
            "--model",
            model,
            "--to-worker",
            self.to_worker,
            "--from-worker",
            self.from_worker,
            *ARGS,
            *extra,
        ]

    def send(self, msg) -> None:
        self.push.send(P.encode(msg))

    def recv(self, timeout_s: float = 60.0):
        if not self.pull.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no message from the worker in {timeout_s} s")
        return P.decode_from_worker(self.pull.recv())

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.close()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 18, 9)]


def test_engine_worker_serves_over_ipc(tiny_checkpoint, daemon):
    proc = subprocess.Popen(daemon.argv(tiny_checkpoint, "--stats-interval", "0.2"))
    try:
        ready = daemon.recv()
        assert isinstance(ready, P.WorkerReady) and ready.protocol_version == P.PROTOCOL_VERSION
        assert ready.vocab_size == 1024 and 0 in ready.eos_token_ids
        prompts = _prompts()
        sp = P.SamplingParams(max_tokens=6, ignore_eos=True)
        for i, p in enumerate(prompts):
            daemon.send(
                P.AddRequest(f"r{i}", p, sp if i else P.SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
            )
        daemon.send(P.AddRequest("bad", [5000], sp))
        daemon.push.send(b"\x82\xaarequest_id\xa9malformed\xa4type\xa3add")  # a map, but no prompt or sampling
        daemon.push.send(b"\xc1garbage")
        daemon.send(P.Placement(op="pin", layer=1, expert=3, token=42))
        daemon.send(P.AddRequest("long", prompts[0], P.SamplingParams(max_tokens=4000, ignore_eos=True)))
        tokens: dict[str, list[int]] = {}
        logprobs: list[P.TokenLogprobs] = []
        finals: dict[str, P.RequestOutput] = {}
        placement = stats = None
        aborted = False
        deadline = time.monotonic() + 120
        while len(finals) < 5 and time.monotonic() < deadline:
            msg = daemon.recv()
            if isinstance(msg, P.StepOutputs):
                for o in msg.outputs:
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.request_id == "r0":
                        logprobs += o.logprobs or []
                    if o.finish_reason is not None:
                        finals[o.request_id] = o
                if not aborted and len(tokens.get("long", [])) >= 2:
                    daemon.send(P.Abort(["long"]))
                    aborted = True
            elif isinstance(msg, P.PlacementReply):
                placement = msg
            elif isinstance(msg, P.EngineStats):
                stats = msg
        assert finals["bad"].finish_reason == "error" and "prompt_token_ids" in finals["bad"].error
        assert finals["malformed"].finish_reason == "error" and "malformed" in finals["malformed"].error
        assert aborted and "long" not in finals  # an abort is not answered: the daemon retired it already
        assert placement is not None and placement.token == 42 and not placement.ok and placement.message
        t0, periodic = time.monotonic(), 0
        while periodic < 2 and time.monotonic() - t0 < 10:  # unasked stats keep coming every 0.2 s
            if isinstance(msg := daemon.recv(), P.EngineStats):
                periodic, stats = periodic + 1, msg
        # "long" (4000 tokens) is gone: the abort freed its slot and pages.
        assert periodic == 2 and stats.generation_tokens >= 18 and stats.running == 0 and stats.kv_usage == 0.0
        for i in range(3):
            assert finals[f"r{i}"].finish_reason == "length" and finals[f"r{i}"].num_output_tokens == 6
        assert [lp.token_id for lp in logprobs] == tokens["r0"] and all(len(lp.top) == 1 for lp in logprobs)
        daemon.send(P.Shutdown())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The worker's tokens are the in-process engine's tokens.
    engine = LLMEngine(EngineConfig(model=tiny_checkpoint, max_running=4, max_tokens_per_step=16, page_size=4))
    assert [tokens[f"r{i}"] for i in range(3)] == engine.generate(_prompts(), sp)


def test_engine_worker_reports_a_failed_load(tmp_path, daemon):
    (tmp_path / "empty").mkdir()
    proc = subprocess.Popen(daemon.argv(str(tmp_path / "empty")))
    try:
        msg = daemon.recv()
        assert isinstance(msg, P.WorkerFatal) and "config.json" in msg.message
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()


def test_engine_worker_exits_when_its_parent_dies(tiny_checkpoint, daemon):
    # A parent that starts the worker, reports its pid, and then is killed.
    code = "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); time.sleep(600)"
    argv = daemon.argv(tiny_checkpoint, "--stats-interval", "0")
    parent = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    try:
        assert isinstance(daemon.recv(), P.WorkerReady)
        daemon.send(P.GetStats())  # with no interval, stats come only when asked
        stats = daemon.recv()
        assert isinstance(stats, P.EngineStats) and stats.num_steps == 0 and stats.running == 0
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its parent"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        parent.stdout.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state
