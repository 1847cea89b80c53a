"""MTP correctness at any depth, in one process: which piece turns batched verify steps into NaN or garbage.

    python -m moed.ops.bench.spec_check --model /dev/shm/glm51-deep --out $OUT/spec_check.json

serve_depth found batched MTP at GLM-5.1's depth giving NaN logprobs and garbage tokens where one stream was right.
This drives the engine directly as the daemon does (requests arriving two a step, stopping at different lengths, so
decode graphs replay padded buckets) in these runs, each on a freshly loaded engine:
  off            MTP off: the reference tokens
  graphs         MTP on, compiled decode graphs (the daemon's default)
  eager-graphs   MTP on, graphs of the eager layers (compile_decode off)
  no-graphs      MTP on, every step eager
Every replayed graph step is also run eagerly on its own unpadded context and the two compared (relative max error;
NaN is a failure); a replay with NaN is run again eagerly on its padded bucket (the graph's own inputs), which tells
padding from capture. Every eager forward (steps, drafts and those checks) is watched layer by layer: the first
attention, MoE/MLP or decoder layer whose input is finite and output is not is named with its step, rows and the
batch's shape. Every token's logprob is checked for NaN; each run's tokens are compared with `off`'s. Misses are
copied (exact), as in serve_depth. Prints a table and writes every figure to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.spec_check")

RUNS = {
    "off": {"spec_steps": 0},
    "graphs": {"spec_steps": 1},
    "eager-graphs": {"spec_steps": 1, "compile_decode": False},
    "no-graphs": {"spec_steps": 1, "cuda_graphs": False},
}


class NonfiniteWatch:
    """Forward hooks on every decoder layer (target and MTP) and its attention and MLP: each eager call whose output
    holds a NaN or inf is recorded with whether its input was finite, so the first entry with a finite input names
    the module that made it. Silent inside torch.compile tracing and CUDA-graph capture (a host read there would
    break both); replays run no Python, so graph steps are checked by `check_replays`' eager runs."""

    def __init__(self, model: torch.nn.Module, limit: int = 24) -> None:
        self.phase = "load"
        self.events: list[dict] = []
        self.calls = 0
        self._ctx = None
        self.limit = limit
        self.handles = []
        layers = model.model.layers
        for i, layer in enumerate(layers):
            for name, mod in (("layer", layer), ("attention", layer.self_attn), ("mlp", layer.mlp)):
                self.handles.append(mod.register_forward_hook(self._hook(f"{name} {i}")))

    def _hook(self, where: str):
        def hook(module, args, output) -> None:
            capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
            if torch.compiler.is_compiling() or capturing:
                return
            self.calls += 1
            ctx = next((a for a in args if hasattr(a, "seqs")), None)
            if ctx is not None:  # an MLP's call has none: it runs on the step its layer's attention ran
                self._ctx = ctx
            out = output[0] if isinstance(output, tuple) else output
            bad = ~torch.isfinite(out.float()).reshape(out.shape[0], -1).all(dim=1)
            if len(self.events) >= self.limit or not bool(bad.any()):
                return
            x, ctx = args[0], self._ctx
            event = {
                "phase": self.phase,
                "where": where,
                "tokens": int(out.shape[0]),
                "bad_rows": bad.nonzero().flatten()[:16].tolist(),
                "input_finite": bool(torch.isfinite(x.float()).all()),
            }
            if ctx is not None:
                event["seqs"] = [(s.num_cached, s.num_new) for s in ctx.seqs][:16]
                if ctx.paged is not None:
                    event["seq_lens"] = ctx.paged.seq_lens[:16].tolist()
                    event["positions"] = ctx.positions[:48].tolist()
            self.events.append(event)
            log.warning("non-finite output: %s", event)

        return hook

    def first_cause(self) -> dict | None:
        return next((e for e in self.events if e["input_finite"]), None)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class LayerTrace:
    """While `on`, every decoder layer's, attention's and MLP's output (fp32 copies, in call order): two eager runs
    of one step compared module by module name the first that differs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.on = False
        self.outputs: list[tuple[str, torch.Tensor]] = []
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            for name, mod in (("attention", layer.self_attn), ("mlp", layer.mlp), ("layer", layer)):
                self.handles.append(mod.register_forward_hook(self._hook(f"{name} {i}")))

    def _hook(self, where: str):
        def hook(module, args, output) -> None:
            if self.on:
                out = output[0] if isinstance(output, tuple) else output
                self.outputs.append((where, out.detach().float().clone()))

        return hook

    def run(self, fn) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """fn's result and the outputs it traced."""
        self.outputs, self.on = [], True
        try:
            result = fn()
        finally:
            self.on = False
        return self.outputs, result

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def first_divergence(a: list, b: list, rows: int, rtol: float) -> dict | None:
    """The first module whose output rows :rows differ by more than rtol between two traces of one step."""
    for (where, x), (where_b, y) in zip(a, b):
        if where != where_b:
            return {"module": where, "note": f"call order differs ({where} vs {where_b})"}
        err = rel_err(x[:rows], y[:rows])
        if not err <= rtol:
            per_row = ((x[:rows] - y[:rows]).abs().amax(dim=-1) / y[:rows].abs().amax().clamp_min(1e-6)).tolist()
            bad = [i for i, e in enumerate(per_row) if not e <= rtol]
            return {"module": where, "err": err, "rows": bad[:16]}
    return None


def check_replays(engine, rtol: float, limit: int = 64, watch: NonfiniteWatch | None = None) -> dict:
    """From now on each replayed decode graph step is also run eagerly on its own (unpadded) context, bounded as the
    graph was captured so that both take the same attention path. A replay that differs (or holds NaN) is diagnosed:
    the step is run eagerly on the graph's own bucket context (the static inputs as the replay left them), which
    tells capture (replay != eager on the bucket) from padding (eager on the bucket != eager unpadded), and the two
    eager runs are traced module by module to name the first that differs."""
    graphs = engine.runner.graphs
    found: dict = {"replays": 0, "padded": 0, "checked": 0, "max_err": 0.0, "problems": []}
    if graphs is None:
        return found
    replay = graphs.run
    trace = LayerTrace(engine.model)
    backend, moe = engine.runner.backend, engine.runner.moe

    def checked(input_ids, ctx):
        out = replay(input_ids, ctx)
        if out is None:
            return out
        found["replays"] += 1
        n = len(ctx.seqs)
        bs = graphs.bucket(n)
        found["padded"] += bs > n
        if found["checked"] >= limit:
            return out
        found["checked"] += 1
        got = out.float().clone()
        phase = watch.phase if watch is not None else ""
        if watch is not None:
            watch.phase = f"eager unpadded check of replay {found['replays']}"

        def unpadded():
            # on the attention path the graph captured: its bound above the dense threshold selects (exactly: every
            # causal position within index_topk) where these contexts run eagerly would take dense MHA, and the two
            # formulations' bf16 rounding flips near-tied router choices (the H100, 2026-12-07: a replay equal to
            # eager on its bucket, 0.54 off the dense step from layer 3's MoE on)
            own = ctx.paged.max_context
            ctx.paged.max_context = max(own, graphs.max_context)
            ctx.paged.derived.clear()
            try:
                return engine.model(input_ids, ctx, backend, moe).float()
            finally:
                ctx.paged.max_context = own
                ctx.paged.derived.clear()

        ref = unpadded()
        err = rel_err(got, ref)
        found["max_err"] = err if err != err else max(found["max_err"], err)
        if not err <= rtol and len(found["problems"]) < 8:
            rows = n * graphs.tokens_per_seq
            problem: dict = {"sequences": n, "bucket": bs, "err": err}
            problem["nan_rows_in_replay"] = (~torch.isfinite(got).all(dim=1)).nonzero().flatten()[:16].tolist()
            problem["seq_lens"] = ctx.paged.seq_lens.tolist()[:16]
            problem["max_context"] = ctx.paged.max_context
            problem["captured_max_context"] = graphs.max_context
            static_ctx = graphs.contexts[bs]

            def bucket_eager():
                static_ctx.paged.derived.clear()
                ids = graphs.static.input_ids[: bs * graphs.tokens_per_seq]
                return engine.model(ids, static_ctx, backend, moe)

            if watch is not None:
                watch.phase = f"eager bucket {bs} of replay {found['replays']}"
            t_bucket, on_bucket = trace.run(bucket_eager)
            on_bucket = on_bucket.float()[:rows]
            t_unpadded, _ = trace.run(unpadded)
            problem["replay_vs_eager_on_bucket"] = rel_err(got, on_bucket)
            problem["eager_on_bucket_vs_unpadded"] = rel_err(on_bucket, ref)
            problem["first_divergence_bucket_vs_unpadded"] = first_divergence(t_bucket, t_unpadded, rows, rtol)
            found["problems"].append(problem)
            log.warning("replay problem: %s", problem)
        if watch is not None:
            watch.phase = phase
        return out

    graphs.run = checked
    return found


def drive(
    engine, prompts: list[list[int]], gen: int, per_step: int, errors: list[str], watch: NonfiniteWatch | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    """Requests arrive `per_step` a step; stream i asks for gen - i % 4 tokens. -> tokens and logprobs per stream;
    request errors (a numerical fault: non-finite logits) appended to `errors`."""
    from moed.engine.protocol import SamplingParams

    pending = [
        (str(i), p, SamplingParams(max_tokens=gen - i % 4, ignore_eos=True, logprobs=1)) for i, p in enumerate(prompts)
    ]
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    lps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    step = 0
    while pending or engine.has_unfinished:
        step += 1
        if watch is not None:
            watch.phase = f"step {step}"
        for _ in range(per_step):
            if pending:
                engine.add_request(*pending.pop(0))
        outs = engine.step()
        if not pending and not engine.has_unfinished:
            outs += engine.flush()
        for o in outs:
            tokens[int(o.request_id)] += o.new_token_ids
            lps[int(o.request_id)] += [lp.logprob for lp in o.logprobs or []]
            if o.error:
                errors.append(f"stream {o.request_id}: {o.error}")
    return [tokens[i] for i in tokens], [lps[i] for i in lps]


def first_difference(ref: list[list[int]], got: list[list[int]]) -> dict | None:
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return {"stream": i, "position": next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))}
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/dev/shm/glm51-deep")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="spec_check.json")
    p.add_argument("--runs", default=",".join(RUNS), help=f"of {', '.join(RUNS)}")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--per-step", type=int, default=2, help="requests arriving each step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=12)
    p.add_argument("--slots", type=int, default=4, help="expert cache slots per MoE layer")
    p.add_argument("--rtol", type=float, default=0.3, help="replay vs eager, relative max error (compiled: rounding)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from moed.engine.llm_engine import EngineConfig, LLMEngine
    from moed.ops.bench.serve_depth import expert_cache_gb, prompt_ids

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    cfg = json.loads(Path(args.model, "config.json").read_text())
    prompts = [prompt_ids(args.prompt_len + 7 * i, i, cfg["vocab_size"]) for i in range(args.streams)]
    base = {
        "model": args.model,
        "device": args.device,
        "dtype": "bf16",
        "moe": "offload",
        "expert_cache_gb": expert_cache_gb(cfg, args.slots),
        "miss_service": "copy",
        "max_running": args.streams,
        "graph_max_batch": args.streams,
        "max_tokens_per_step": 8192,
        "page_size": 64,
        "max_model_len": 4096,
        "kv_pages": args.streams * (-(-(args.prompt_len + 7 * args.streams + args.gen + 16) // 64)) + 8,
    }
    results: dict = {"model": args.model, "streams": args.streams, "runs": {}}
    ref = None
    for name in runs:
        t0 = time.monotonic()
        torch._dynamo.reset()
        engine = LLMEngine(EngineConfig(**{**base, **RUNS[name]}))
        engine.warmup()
        load_s = time.monotonic() - t0
        watch = NonfiniteWatch(engine.model)
        replays = check_replays(engine, args.rtol, watch=watch)
        errors: list[str] = []
        tokens, lps = drive(engine, prompts, args.gen, args.per_step, errors, watch)
        watch.close()
        res = {
            "load_s": load_s,
            "nan_logprobs": sum(x != x for s in lps for x in s),
            "numerical_faults": engine.numerical_faults,
            "errors": errors,
            "replays": replays,
            "nonfinite_cause": watch.first_cause(),
            "nonfinite_events": watch.events,
            "watched_calls": watch.calls,
            "tokens_head": [t[:8] for t in tokens],
            "acceptance": engine.spec_accepted_tokens / engine.spec_draft_tokens if engine.spec_draft_tokens else None,
        }
        if name == "off":
            ref = tokens
        elif ref is not None:
            res["first_difference_from_off"] = first_difference(ref, tokens)
        results["runs"][name] = res
        log.info("%s: %s", name, {k: v for k, v in res.items() if k != "tokens_head"})
        # Free the host store (pinned, the size of the checkpoint's experts) and the GPU before the next engine loads:
        # two at once do not fit the GPU machine's host memory beside the checkpoint in /dev/shm.
        engine.experts.close()
        engine.runner.graphs = None
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nMTP check: {Path(args.model).name}, {args.streams} streams arriving {args.per_step} a step")
    print(
        f"{'run':13s} {'faults':>6} {'NaN lp':>6} {'replays':>7} {'padded':>6} {'bad':>4} {'max err':>8} {'accept':>6}"
        "  vs off"
    )
    for name, r in results["runs"].items():
        rp, acc, diff = r["replays"], r["acceptance"], r.get("first_difference_from_off", "-")
        print(
            f"{name:13s} {r['numerical_faults']:>6} {r['nan_logprobs']:>6} {rp['replays']:>7} {rp['padded']:>6} "
            f"{len(rp['problems']):>4} "
            f"{rp['max_err']:>8.3g} {'-' if acc is None else f'{acc:.2f}':>6}  {diff}"
        )
    for name, r in results["runs"].items():
        if r["nonfinite_events"]:
            print(f"{name}: first non-finite output from finite input: {r['nonfinite_cause']}")
            print(f"{name}: first non-finite output: {r['nonfinite_events'][0]}")
        for problem in r["replays"]["problems"][:3]:
            print(f"{name}: replay problem {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
