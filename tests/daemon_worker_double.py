"""TEST DOUBLE of the engine worker, for daemon tests only: no model, echoes prompt tokens back.

Speaks engine/protocol.py exactly as `python -m moed.engine.worker` must (same flags, same
sockets, same messages), so the daemon's serving logic can be tested deterministically and fast:
request i's k-th generated token is its prompt's (k mod len)-th token, so each stream's text is
predictable and two streams never produce the same tokens unless their prompts match. It stops on
max_tokens ("length"), a stop token id or an eos id ("stop"). Test-only flags: --double-step-s
(seconds per step), --double-fail (exit 3 before WorkerReady), --double-exit-after-s S (exit 3 S
seconds after WorkerReady), --double-stall-after N (stop answering after N steps), --double-load-s
(seconds before WorkerReady), --double-replay FILE (a JSON list of token ids every request generates
instead of its echo: a recorded model output, replayed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import zmq

from moed.engine import protocol as ep


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--to-worker", required=True)
    p.add_argument("--from-worker", required=True)
    p.add_argument("--stats-interval", type=float, default=1.0)
    p.add_argument("--double-step-s", type=float, default=0.002)
    p.add_argument("--double-fail", action="store_true")
    p.add_argument("--double-exit-after-s", type=float, default=-1.0)
    p.add_argument("--double-stall-after", type=int, default=-1)
    p.add_argument("--double-load-s", type=float, default=0.0)
    p.add_argument("--double-replay", default=None)
    args, _ = p.parse_known_args()
    parent = os.getppid()
    if args.double_fail:
        print("worker double: failing on purpose before ready", file=sys.stderr, flush=True)
        return 3
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    eos = cfg.get("eos_token_id") or []
    eos = [eos] if isinstance(eos, int) else list(eos)
    replay = json.loads(Path(args.double_replay).read_text()) if args.double_replay else None
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)  # exiting must never wait on messages for a daemon that is gone
    pull = ctx.socket(zmq.PULL)
    pull.connect(args.to_worker)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 5000)  # a send never blocks for long: the daemon may be gone
    push.connect(args.from_worker)
    time.sleep(args.double_load_s)
    push.send(
        ep.encode(
            ep.WorkerReady(
                protocol_version=ep.PROTOCOL_VERSION,
                model=args.model,
                max_model_len=cfg["max_position_embeddings"],
                vocab_size=cfg["vocab_size"],
                eos_token_ids=eos,
            )
        )
    )
    running: dict[str, tuple[ep.AddRequest, list[int]]] = {}
    pinned: dict[str, list[int]] = {}
    steps = prompt_tokens = gen_tokens = 0
    last_stats = time.monotonic()
    next_step = time.monotonic()

    def stats() -> ep.EngineStats:
        return ep.EngineStats(
            running=len(running),
            waiting=0,
            kv_usage=min(1.0, len(running) / 64),
            num_steps=steps,
            prompt_tokens=prompt_tokens,
            generation_tokens=gen_tokens,
            preemptions=0,
            step_time_s={"forward": args.double_step_s},
            experts=[
                ep.LayerExpertStats(
                    layer=1,
                    hits=3 * steps,
                    misses=steps,
                    bytes_copied=1000 * steps,
                    bytes_cpu=0,
                    evictions=steps,
                    stall_s=0.0,
                    cpu_experts=0,
                )
            ],
            miss_service="hybrid",
            miss_service_rates_Bps={"cpu": 7.5e10, "copy": 5.0e10},
        )

    ready_at = time.monotonic()
    while True:
        if os.getppid() != parent:
            os._exit(1)  # the daemon died: leave at once
        if 0 <= args.double_exit_after_s <= time.monotonic() - ready_at:
            print("worker double: failing on purpose after ready", file=sys.stderr, flush=True)
            os._exit(3)
        if 0 <= args.double_stall_after <= steps:
            time.sleep(0.05)
            continue
        timeout = max(0.0, next_step - time.monotonic()) if running else 0.05
        if pull.poll(int(timeout * 1000)):
            while True:
                try:
                    msg = ep.decode_to_worker(pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, ep.AddRequest):
                    running[msg.request_id] = (msg, [])
                    prompt_tokens += len(msg.prompt_token_ids)
                elif isinstance(msg, ep.Abort):
                    for rid in msg.request_ids:
                        running.pop(rid, None)
                elif isinstance(msg, ep.GetStats):
                    push.send(ep.encode(stats()))
                elif isinstance(msg, ep.Placement):
                    ok, text = True, ""
                    key = str(msg.layer)
                    if msg.op == "pin":
                        pinned.setdefault(key, []).append(msg.expert)
                    elif msg.op == "unpin":
                        if msg.expert in pinned.get(key, []):
                            pinned[key].remove(msg.expert)
                        else:
                            ok, text = False, f"expert {msg.expert} of layer {msg.layer} is not pinned"
                    elif msg.op == "reset":
                        pinned.clear()
                    push.send(ep.encode(ep.PlacementReply(token=msg.token, ok=ok, message=text, pinned=pinned)))
                elif isinstance(msg, ep.Shutdown):
                    push.close(linger=1000)
                    return 0
        now = time.monotonic()
        if now - last_stats >= args.stats_interval:
            last_stats = now
            push.send(ep.encode(stats()))
        if running and now >= next_step:
            next_step = now + args.double_step_s
            steps += 1
            outs = []
            for rid, (req, out) in list(running.items()):
                prompt = req.prompt_token_ids
                source = replay or prompt
                tok = source[len(out) % len(source)]
                out.append(tok)
                gen_tokens += 1
                s = req.sampling
                reason = None
                if tok in s.stop_token_ids or (tok in eos and not s.ignore_eos):
                    reason = "stop"
                elif len(out) >= s.max_tokens:
                    reason = "length"
                lps = None
                if s.logprobs is not None:
                    lps = [ep.TokenLogprobs(tok, -0.5, [(tok, -0.5)] * s.logprobs)]
                outs.append(
                    ep.RequestOutput(
                        request_id=rid,
                        new_token_ids=[tok],
                        finish_reason=reason,
                        logprobs=lps,
                        num_prompt_tokens=len(prompt),
                        num_output_tokens=len(out),
                        queue_s=0.0 if len(out) == 1 else None,
                    )
                )
                if reason:
                    del running[rid]
            push.send(ep.encode(ep.StepOutputs(outputs=outs, step_time_s=args.double_step_s)))


if __name__ == "__main__":
    sys.exit(main())
