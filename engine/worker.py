"""The engine worker process: one per GPU rank, driven by the daemon over ZMQ ipc with msgspec messages.

    python -m moed.engine.worker --model DIR --to-worker ipc://A --from-worker ipc://B [options]

It CONNECTS a PULL socket to A (the daemon's `ToWorker` messages) and a PUSH socket to B
(`FromWorker` messages), loads the model, warms up, sends `WorkerReady`, then loops:
- drain incoming messages (blocking briefly only while idle; never while requests run);
- run one engine step and send `StepOutputs` when it produced tokens or finished requests;
- send `EngineStats` every `--stats-interval` seconds and on `GetStats`.
`Abort` frees the requests at once (pages, caches, slots) and is not answered: the daemon has
already retired them ("stop" is how it reports a stop string it found in the text). `Placement` goes to
the MoE runner's expert cache when it has one, else gets `ok=False` and the reason. A message that
does not decode is logged and, when a request id can be read from it, answered with an error
output for that request; the worker keeps serving. A load failure sends `WorkerFatal` and exits 1;
`Shutdown` or SIGTERM exits 0; the death of the parent process (the daemon) exits 1.
Nothing is pickled: every frame is one msgspec-msgpack message of `moed.engine.protocol`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import msgspec
import zmq

from moed.engine.config import add_engine_arguments, engine_config_from_args
from moed.engine.llm_engine import LLMEngine, RequestError
from moed.engine.protocol import (
    PROTOCOL_VERSION,
    Abort,
    AddRequest,
    FromWorker,
    GetStats,
    Placement,
    PlacementReply,
    RequestOutput,
    Shutdown,
    StepOutputs,
    WorkerFatal,
    WorkerReady,
    decode_to_worker,
    encode,
)

log = logging.getLogger("moed.engine.worker")

IDLE_POLL_S = 0.1  # how long an idle worker blocks on its socket before checking its parent and stats
MAX_MESSAGES_PER_STEP = 1024  # a flood of messages must not starve running requests
MAX_CONSECUTIVE_STEP_ERRORS = 3  # then the worker reports itself fatal and exits (the daemon restarts it)


class Worker:
    def __init__(
        self, engine: LLMEngine, pull: zmq.Socket, push: zmq.Socket, stats_interval: float, parent_pid: int
    ) -> None:
        self.engine, self.pull, self.push = engine, pull, push
        self.stats_interval, self.parent_pid = stats_interval, parent_pid
        self.stopping = False
        self.exit_code = 0

    def send(self, msg: FromWorker) -> None:
        self.push.send(encode(msg))

    def loop(self) -> int:
        next_stats = time.monotonic() + self.stats_interval if self.stats_interval > 0 else float("inf")
        errors_before = self.engine.step_errors
        consecutive_errors = 0
        while not self.stopping:
            busy = self.engine.has_unfinished
            timeout_s = 0.0 if busy else min(IDLE_POLL_S, max(0.0, next_stats - time.monotonic()))
            handled = 0
            while handled < MAX_MESSAGES_PER_STEP and not self.stopping and self.pull.poll(int(timeout_s * 1000)):
                self.handle(self.pull.recv())
                handled += 1
                timeout_s = 0.0
            if self.stopping:
                break
            if os.getppid() != self.parent_pid:
                log.error("parent process %d is gone; exiting", self.parent_pid)
                return 1
            if self.engine.has_unfinished:
                t0 = time.perf_counter()
                outputs = self.engine.step()
                if outputs:
                    self.send(StepOutputs(outputs=outputs, step_time_s=time.perf_counter() - t0))
                failed = self.engine.step_errors != errors_before
                errors_before = self.engine.step_errors
                consecutive_errors = consecutive_errors + 1 if failed else 0
                if consecutive_errors >= MAX_CONSECUTIVE_STEP_ERRORS:
                    self.send(
                        WorkerFatal(
                            message=f"{consecutive_errors} engine steps failed in a row (see the "
                            "worker log); exiting so the daemon restarts the worker"
                        )
                    )
                    return 1
            if time.monotonic() >= next_stats:
                self.send(self.engine.stats())
                next_stats = time.monotonic() + self.stats_interval
        return self.exit_code

    def handle(self, frame: bytes) -> None:
        try:
            msg = decode_to_worker(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            rid = _request_id_of(frame)
            log.warning("undecodable message (%d bytes, request id %r): %s", len(frame), rid, e)
            if rid is not None:
                self._error(rid, f"malformed message from the daemon: {e}")
            return
        try:
            self._dispatch(msg)
        except Exception as e:  # a bad message never takes the worker down
            log.exception("handling %s failed", type(msg).__name__)
            if isinstance(msg, AddRequest):
                self._error(msg.request_id, f"{type(e).__name__}: {e}")

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.sampling)
            except RequestError as e:
                self._error(msg.request_id, str(e))
        elif isinstance(msg, Abort):
            # The daemon has already retired these requests: nothing is sent back.
            self.engine.abort(msg.request_ids, msg.reason)
        elif isinstance(msg, GetStats):
            self.send(self.engine.stats())
        elif isinstance(msg, Placement):
            ok, message, pinned = self.engine.placement(msg.op, msg.layer, msg.expert, msg.pins)
            self.send(
                PlacementReply(
                    token=msg.token, ok=ok, message=message, pinned=pinned, slots=self.engine.experts.cache_slots()
                )
            )
        elif isinstance(msg, Shutdown):
            log.info("shutdown requested")
            self.stopping = True

    def _error(self, request_id: str, message: str) -> None:
        self.send(
            StepOutputs(
                outputs=[RequestOutput(request_id=request_id, new_token_ids=[], finish_reason="error", error=message)],
                step_time_s=0.0,
            )
        )


def _request_id_of(frame: bytes) -> str | None:
    """The request id of a message that failed typed decoding, if one can be read at all."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    if isinstance(raw, dict):
        rid = raw.get("request_id")
        if isinstance(rid, str) and rid:
            return rid
        ids = raw.get("request_ids")
        if isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str):
            return ids[0]
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moed.engine.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--to-worker", required=True, help="endpoint the daemon sends on (PULL connects here)")
    p.add_argument("--from-worker", required=True, help="endpoint the daemon receives on (PUSH connects here)")
    p.add_argument(
        "--stats-interval",
        type=float,
        default=1.0,
        help="seconds between EngineStats (0: only on GetStats) (default: 1.0)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    add_engine_arguments(p.add_argument_group("engine settings (moed.engine.config)"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s"
    )
    parent_pid = os.getppid()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(args.to_worker)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)  # let the last replies (Fatal, final outputs) leave before exiting
    push.connect(args.from_worker)
    worker: Worker | None = None

    def on_term(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        if worker is None:
            raise SystemExit(0)
        worker.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        config = engine_config_from_args(args, args.model)
        engine = LLMEngine(config)
        engine.warmup()
    except Exception as e:
        log.exception("engine start failed")
        push.send(encode(WorkerFatal(message=f"engine start failed: {type(e).__name__}: {e}")))
        pull.close()
        push.close()
        ctx.term()
        return 1
    push.send(
        encode(
            WorkerReady(
                protocol_version=PROTOCOL_VERSION,
                model=Path(args.model).name,
                max_model_len=engine.max_model_len,
                vocab_size=engine.cfg.vocab_size,
                eos_token_ids=sorted(engine.eos_token_ids),
            )
        )
    )
    log.info(
        "ready: %s on %s (%s), max_running=%d, kv %d pages x %d, spec_steps=%d",
        args.model,
        config.device,
        config.dtype,
        config.max_running,
        engine.kv.num_pages,
        engine.kv.page_size,
        config.spec_steps,
    )
    worker = Worker(engine, pull, push, args.stats_interval, parent_pid)
    code = worker.loop()
    pull.close()
    push.close()
    ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
