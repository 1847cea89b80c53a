"""GLM-5.1 at its real depth through the daemon: `moed serve` on the full-depth checkpoint, driven by clients.

    python -m moed.ops.bench.serve_depth --model /dev/shm/glm51-deep --out $OUT/serve_depth.json

Starts the real daemon (`python -m moed.daemon.cli serve`, a subprocess, as an operator would) on the `glm51` preset
checkpoint (78 layers, the MTP layer, the real vocabulary and widths), twice: MTP off, then MTP on (one draft token).
Each time it echoes the worker's load progress, times the load (start -> ready) and reads the host store's pinning
time from the log, then drives clients over ZMQ (ipc):
  decode   1, 8 and 32 concurrent streams (prompt `--prompt-len` tokens, `--gen` greedy tokens each, in CUDA graphs);
  prompts  one stream each of 1k, 8k and 32k tokens, `--prefill-gen` tokens: time to first token; then another 8k
           prompt (`--repeat-prompts`), whose TTFT against the first shows what the first long prefill pays once;
checking that every stream got all its tokens and, across the two runs, that greedy output is token for token the
same with MTP on and off. A random-weight model's top two logits are often close, and MTP on and off run the same
token through differently shaped steps (a verify step scores several tokens at once), so bf16 rounding can flip a
near-tie: at a first divergence the top-1 - top-2 logprob margin of both runs is reported, and the divergence counts
as a near-tie when both margins are below `--near-tie` nats, a real difference otherwise. Misses are served by
copies (`--miss-service copy`): CPU experts compute in fp32 where the GPU's kernel quantises activations, so a hybrid
run's tokens depend on how each step happened to split its misses and MTP on/off could not be compared exactly. The
expert cache gives `--slots` slots per layer (fewer than the checkpoint's experts, so decode misses at every depth).
Writes every figure to --out and prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("bench.serve_depth")
PROGRESS = re.compile(r"loading|host expert store|miss service|graphs|warm|ready|error|Traceback|captur", re.I)


class DaemonProcess:
    """`moed serve` in a subprocess; its log goes to a file and the load-progress lines to our stderr."""

    def __init__(
        self, model: str, address: str, engine_args: list[str], log_path: Path, max_running: int, device: str = "cuda"
    ) -> None:
        self.log_path = log_path
        self.metrics_address = f"127.0.0.1:{_free_port()}"
        cmd = [
            sys.executable,
            "-m",
            "moed.daemon.cli",
            "serve",
            "--model",
            model,
            "--device",
            device,
            "--listen",
            address,
            "--metrics-address",
            self.metrics_address,
            "--http-address",
            "",
            "--max-running",
            str(max_running),
            "--worker-start-timeout-s",
            "1500",
            "--engine-stall-timeout-s",
            "600",
            *engine_args,
        ]
        log.info("starting: %s", " ".join(cmd))
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("a") as f:
            for line in self.proc.stdout:
                f.write(line)
                self.lines.append(line)
                if PROGRESS.search(line):
                    print(
                        f"  [daemon +{time.monotonic() - self.t0:6.1f}s] {line.rstrip()[:200]}",
                        file=sys.stderr,
                        flush=True,
                    )

    async def wait_ready(self, address: str, timeout: float) -> None:
        """Until the daemon answers ready; fails at once when it exits or its engine worker fails to start (the
        supervisor would restart it until `timeout`, minutes of machine time for nothing)."""
        from moed.client.api import AsyncClient, DaemonUnavailable, RequestTimeout

        end = time.monotonic() + timeout
        async with AsyncClient(address, timeout=60) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {self.proc.returncode} before it was ready")
                failed = next((line for line in self.lines if "engine start failed" in line), None)
                if failed is not None:
                    raise RuntimeError(f"the engine worker failed to start: {failed.strip()}")
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the daemon was not ready within {timeout:.0f} s")
                try:
                    await client.wait_ready(timeout=min(5.0, left))
                    return
                except (RequestTimeout, DaemonUnavailable):  # not ready yet: look at the process and its log again
                    continue

    def counters(self, *names: str) -> dict[str, float]:
        """Prometheus counters from the daemon's /metrics, summed over their labels (0 when absent)."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = dict.fromkeys(names, 0.0)
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
        return out

    def find(self, pattern: str) -> float | None:
        """The first float captured by `pattern` in the log so far."""
        rx = re.compile(pattern)
        for line in self.lines:
            m = rx.search(line)
            if m:
                return float(m.group(1))
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expert_cache_gb(cfg: dict, slots: int) -> float:
    """The expert cache budget (GiB) that gives every MoE layer `slots` slots of the checkpoint's FP8 experts."""
    moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    N, K = cfg["moe_intermediate_size"], cfg["hidden_size"]
    expert_bytes = 3 * N * K + 4 * 3 * (N // 128) * (K // 128)  # FP8 weights + block-128 scales
    return (slots * moe_layers * expert_bytes + (1 << 20)) / 2**30


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    """A deterministic prompt of n token ids (the same in both runs)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


async def run_case(address: str, prompts: list[list[int]], gen: int) -> dict:
    """All prompts at once, greedy; per stream its tokens, TTFT and end-to-end time."""
    from moed.client.api import AsyncClient

    async with AsyncClient(address, timeout=1800) as client:
        t0 = time.monotonic()
        done = await asyncio.gather(
            *(
                client.generate(token_ids=p, max_tokens=gen, temperature=0.0, ignore_eos=True, logprobs=2)
                for p in prompts
            ),
            return_exceptions=True,
        )
        wall = time.monotonic() - t0
    streams, errors = [], []
    for d in done:
        if isinstance(d, BaseException):
            errors.append(repr(d))
            continue
        streams.append(
            {
                "tokens": d.token_ids,
                "margins": [top_margin(lp) for lp in d.logprobs or []],
                "ttft_s": d.ttft_s,
                "e2e_s": d.e2e_s,
                "finish": d.finish_reason,
            }
        )
    n_tok = sum(len(s["tokens"]) for s in streams)
    decode = [(s["e2e_s"] - s["ttft_s"]) / max(len(s["tokens"]) - 1, 1) for s in streams if s["ttft_s"] is not None]
    return {
        "streams": len(prompts),
        "ok": len(streams),
        "errors": errors,
        "tokens": n_tok,
        "all_delivered": not errors and all(len(s["tokens"]) == gen for s in streams),
        "wall_s": wall,
        "tok_s": n_tok / wall,
        "ttft_s": max((s["ttft_s"] or 0) for s in streams) if streams else None,
        "ms_per_token": 1e3 * sum(decode) / len(decode) if decode else None,
        "outputs": [s["tokens"] for s in streams],
        "margins": [s["margins"] for s in streams],
        # NaN logprobs mean NaN logits: the greedy token is then argmax over NaN, not a model output
        "nan_logprobs": sum(m != m for s in streams for m in s["margins"]),
    }


def top_margin(lp) -> float:
    """Top-1 minus top-2 logprob of one generated token (inf when only one alternative came back)."""
    return lp.top[0][1] - lp.top[1][1] if len(lp.top) > 1 else float("inf")


async def serve_once(args, spec_steps: int, work: Path) -> dict:
    from moed.client.api import AsyncClient

    address = f"ipc://{work}/depth-{spec_steps}.sock"
    # KV for the longest prompt plus every decode stream (not 90% of what is free: an 8192-token prefill step at this
    # depth needs a few GB of activations beside the CUDA graphs' pool).
    kv_pages = (
        max(args.prompts) + max(args.batches) * (args.prompt_len + args.gen + 8 * (1 + spec_steps))
    ) // 64 + 2 * max(args.batches)
    engine_args = [
        "--moe",
        "offload",
        "--expert-cache-gb",
        f"{args.cache_gb:.3f}",
        "--miss-service",
        args.miss_service,
        "--kv-pages",
        str(kv_pages),
        "--page-size",
        "64",
        "--max-model-len",
        str(max(args.prompts) + 64),
        "--max-tokens-per-step",
        str(args.chunk),
        "--graph-max-batch",
        str(max(args.batches)),
        "--spec-steps",
        str(spec_steps),
    ]
    daemon = DaemonProcess(
        args.model, address, engine_args, work / f"daemon-mtp{spec_steps}.log", max(args.batches), args.device
    )
    res: dict = {"spec_steps": spec_steps, "engine_args": engine_args}
    try:
        await daemon.wait_ready(address, args.ready_timeout)
        res["load_s"] = time.monotonic() - daemon.t0
        res["host_store_s"] = daemon.find(r"host expert store: .* in ([0-9.]+) s")
        res["load_read_s"] = daemon.find(r"loading \S+: .* in ([0-9.]+) s")
        log.info(
            "MTP %d: ready after %.0f s (host store pinned in %s s)", spec_steps, res["load_s"], res["host_store_s"]
        )
        cases = {}
        for b in args.batches:
            prompts = [prompt_ids(args.prompt_len, 1000 + i, args.vocab) for i in range(b)]
            cases[f"decode_b{b}"] = await run_case(address, prompts, args.gen)
            log.info(
                "MTP %d batch %d: %s", spec_steps, b, {k: v for k, v in cases[f"decode_b{b}"].items() if k != "outputs"}
            )
        prompts = [(f"prompt_{n}", n, n) for n in args.prompts]
        # then another prompt of a repeated length: its TTFT against the first shows what the first paid once
        prompts += [(f"prompt_{n}_again", n, n + 1) for n in args.repeat_prompts if n in args.prompts]
        for name, n, seed in prompts:
            cases[name] = await run_case(address, [prompt_ids(n, seed, args.vocab)], args.prefill_gen)
            log.info("MTP %d %s: ttft %.2f s", spec_steps, name, cases[name]["ttft_s"] or -1)
        res["cases"] = cases
        async with AsyncClient(address, timeout=60) as client:
            stats = await client.stats()
        import msgspec

        res["engine_stats"] = msgspec.to_builtins(stats)
        spec = daemon.counters("moed_spec_draft_tokens_total", "moed_spec_accepted_tokens_total")
        drafted, accepted = spec["moed_spec_draft_tokens_total"], spec["moed_spec_accepted_tokens_total"]
        res["spec"] = {
            "draft_tokens": drafted,
            "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None,
        }
    except Exception as e:  # the run's figures so far are kept; the failure is reported
        log.exception("serve run (MTP %d) failed", spec_steps)
        res["error"] = repr(e)
        res["log_tail"] = "".join(daemon.lines[-40:])
    finally:
        daemon.stop()
        res["exit_code"] = daemon.proc.returncode
    return res


def compare(off: dict, on: dict, near_tie: float) -> dict:
    """Greedy tokens with MTP off vs on, stream by stream: identical, or the first divergence with both runs'
    top-1 - top-2 margins there (a near-tie when both are below `near_tie`); and how common near-ties are."""
    out = {}
    for name, case in (off.get("cases") or {}).items():
        other = (on.get("cases") or {}).get(name)
        if other is None:
            continue
        first = None
        for i, (a, b) in enumerate(zip(case["outputs"], other["outputs"])):
            if a != b:
                pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                margins = [_at(m, i, pos) for m in (case["margins"], other["margins"])]
                first = {"stream": i, "position": pos, "margins": margins, "near_tie": max(margins) < near_tie}
                if any(m != m for m in margins):
                    first["near_tie"] = False  # NaN logits at the divergence: a fault, never a rounding flip
                break
        complete = case["all_delivered"] and other["all_delivered"]
        every = [m for stream in case["margins"] for m in stream]
        out[name] = {
            "identical": complete and first is None and len(case["outputs"]) == len(other["outputs"]),
            "nan_logprobs": [case.get("nan_logprobs", 0), other.get("nan_logprobs", 0)],
            "first_difference": first,
            "near_tie_share": sum(m < near_tie for m in every) / len(every) if every else None,
        }
    return out


def batch_control(run: dict) -> dict:
    """The batch-variance control, within one daemon: stream i of every decode case has the same prompt, so each
    larger batch's streams are compared with the smallest batch's -> {"b8_vs_b1": [first differing token or None per
    shared stream], ...}. On random weights a different batch shape alone moves bf16 rounding enough to flip
    near-ties; a divergence between MTP on and off no earlier than these is no evidence against MTP."""
    decode = sorted(
        ((int(name[len("decode_b") :]), case) for name, case in (run.get("cases") or {}).items()
         if name.startswith("decode_b")),
        key=lambda x: x[0],
    )  # fmt: skip
    if len(decode) < 2:
        return {}
    b0, ref = decode[0]
    out = {}
    for b, case in decode[1:]:
        firsts = []
        for a, c in zip(ref["outputs"], case["outputs"]):
            pos = next((j for j, (x, y) in enumerate(zip(a, c)) if x != y), None)
            firsts.append(pos if pos is not None or len(a) == len(c) else min(len(a), len(c)))
        out[f"b{b}_vs_b{b0}"] = firsts
    return out


def _at(margins: list[list[float]], stream: int, pos: int) -> float:
    return margins[stream][pos] if stream < len(margins) and pos < len(margins[stream]) else float("inf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/dev/shm/glm51-deep")
    p.add_argument("--device", default="cuda", help="cpu runs the same code on a small checkpoint (a smoke test)")
    p.add_argument("--out", default="serve_depth.json")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 8192, 32768])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--prefill-gen", type=int, default=4)
    p.add_argument(
        "--repeat-prompts",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[8192],
        help="of --prompts, the lengths served a second time (another prompt) after the first pass: first-use costs",
    )
    p.add_argument("--chunk", type=int, default=8192, help="engine max_tokens_per_step")
    p.add_argument("--slots", type=int, default=4, help="expert cache slots per MoE layer")
    p.add_argument("--miss-service", default="copy")
    p.add_argument("--mtp", default="0,1", help="spec_steps of the runs, in order")
    p.add_argument("--ready-timeout", type=float, default=1500)
    p.add_argument("--near-tie", type=float, default=0.05, help="nats: a greedy divergence below this is a near-tie")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = json.loads(Path(args.model, "config.json").read_text())
    args.vocab = cfg["vocab_size"]
    args.cache_gb = expert_cache_gb(cfg, args.slots)
    work = Path(tempfile.mkdtemp(prefix="moed-depth-", dir="/tmp"))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runs = {}
    for spec in [int(x) for x in args.mtp.split(",")]:
        runs[spec] = asyncio.run(serve_once(args, spec, work))
    result = {"model": args.model, "slots": args.slots, "cache_gb": args.cache_gb, "runs": runs}
    if 0 in runs and len(runs) > 1:
        result["greedy_mtp_on_vs_off"] = compare(runs[0], runs[max(runs)], args.near_tie)
    result["batch_control"] = {spec: batch_control(r) for spec, r in runs.items()}
    for r in runs.values():
        for c in (r.get("cases") or {}).values():
            c["outputs_head"] = [o[:8] for o in c.pop("outputs")]
            c["min_margin"] = min((m for stream in c.pop("margins") for m in stream), default=None)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(
        f"\nserve at depth: {Path(args.model).name} ({cfg['num_hidden_layers']} layers, {cfg['n_routed_experts']} "
        f"experts/layer, {args.slots} cache slots/layer, misses by {args.miss_service})"
    )
    for spec, r in runs.items():
        print(
            f"MTP {spec}: load {r.get('load_s', float('nan')):.0f} s (host store pinned in {r.get('host_store_s')} s,"
            f" weights read in {r.get('load_read_s')} s), exit {r.get('exit_code')}, error {r.get('error')}, drafts "
            f"accepted {(r.get('spec') or {}).get('acceptance')}"
        )
        nan = sum(c.get("nan_logprobs", 0) for c in (r.get("cases") or {}).values())
        if nan:
            print(
                f"  INVALID: {nan} generated tokens came with NaN logprobs (NaN logits; their tokens, speeds and the "
                "drafts' acceptance measure a fault, not the model)"
            )
        for name, c in (r.get("cases") or {}).items():
            ms = c["ms_per_token"]
            print(
                f"  {name:12s} streams {c['streams']:>3} ok {c['ok']:>3} tokens {c['tokens']:>5} all delivered "
                f"{c['all_delivered']!s:5} ttft {c['ttft_s'] or 0:7.2f} s  ms/token "
                f"{'-' if ms is None else f'{ms:8.1f}'}  tok/s {c['tok_s']:8.2f}  "
                f"NaN logprobs {c.get('nan_logprobs', 0)}"
            )
    for spec, control in result["batch_control"].items():
        for pair, firsts in control.items():
            print(
                f"batch control, MTP {spec}, {pair}: first differing token per shared stream "
                f"{['same' if f is None else f for f in firsts]}"
            )
    for name, cmp in (result.get("greedy_mtp_on_vs_off") or {}).items():
        first, share = cmp["first_difference"], cmp["near_tie_share"]
        verdict = "identical" if cmp["identical"] else "near-tie" if first and first["near_tie"] else "DIFFERS"
        if any(cmp["nan_logprobs"]):
            verdict = f"INVALID (NaN logprobs off/on: {cmp['nan_logprobs'][0]}/{cmp['nan_logprobs'][1]})"
        print(
            f"greedy MTP on vs off, {name}: {verdict} {first or ''} (margins < {args.near_tie} nats at "
            f"{'-' if share is None else f'{share:.0%}'} of MTP-off tokens)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
