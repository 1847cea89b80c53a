"""Whole-model benchmark: GLM-5.1 decode and time to first token at its real depth, beside llama.cpp.

    python -m moed.ops.bench.model --ckpt /dev/shm/glm51-deep --work $OUT/model [--llama llama.json]

No host here holds GLM-5.1 (~750 GB in FP8), so the whole-model figure is assembled from two measured parts, each
taken where it can be taken faithfully, and printed with every input and its bound:

  deep    (`--stage deep`, model_deep.py) the `glm51` preset checkpoint (78 layers, 3 dense, the MTP layer, the real
          vocabulary and widths; few experts per layer) served by the engine: everything that is not routed experts
          per decode step and per prompt, and the engine's offload runner in situ.
  slice   (`--stage slice`, model_slice.py) MoE layers with all 256 experts, as many as the host holds, with the
          expert cache a deployment of the whole model on this GPU would have: decode per batch and trace, prefill
          streaming (now and as before the cache's rounds computed only their own routes), and where the time per
          layer goes at depth. `--expert-dtype int4`: the same with moed's int4 experts (batch 1 in the pipeline).
  report  (`--stage report`, model_report.py) whole-model decode, MTP, time to first token, memory and PCIe per
          token, llama.cpp's figures by the same method (ops/bench/llama_peer.py), the moed / llama.cpp headline.
The arithmetic is model_projection.py; how things are timed on a GPU and on a CPU is model_timing.py.

Without `--stage` all stages run, each in its own process (the deep checkpoint's engine and the 256-expert store do
not fit the host together); `--stage` runs one. Every stage writes its JSON into `--work` as it goes (a run cut off
keeps what it measured); the report reads whatever is there. `--device cpu` runs the same code at tiny sizes (the
`tiny` preset; tests/ops/test_bench_model.py), so a GPU run cannot die on a stage that never ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from moed.ops.bench.model_projection import BATCHES, CHUNK, PROMPTS

PARTS = ("deep", "slice", "slice_int4")  # the stages' JSON files the report reads

log = logging.getLogger("bench.model")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("all", "deep", "slice", "report"), default="all")
    p.add_argument("--device", default="cuda", help="cuda; cpu runs every stage at tiny sizes (a smoke test)")
    p.add_argument("--work", default="model-bench", help="folder for each stage's JSON")
    p.add_argument("--out", default=None, help="the report's JSON (default WORK/results.json)")
    p.add_argument("--llama", default=None, help="llama.cpp figures (ops/bench/llama_peer.py's JSON)")
    p.add_argument("--cpu-threads", type=int, default=0, help="CPU expert threads; 0: every core but one")
    p.add_argument("--miss-service", default="auto", help="the deep engine's (auto, copy, hybrid, cpu)")
    p.add_argument("--prompts", type=_ints, default=list(PROMPTS), help="prompt lengths of the time to first token")
    d = p.add_argument_group("deep")
    d.add_argument("--ckpt", default="/dev/shm/glm51-deep", help="the glm51 preset checkpoint")
    d.add_argument("--deep-cache-gb", type=float, default=4.0, help="deep engine's expert cache (the issue's 4 GB)")
    d.add_argument("--deep-batches", type=_ints, default=list(BATCHES), help="non-MoE decode batches")
    d.add_argument(
        "--no-deep-compiled",
        dest="deep_compiled",
        action="store_false",
        help="skip the non-MoE rows from compiled decode graphs (compile_decode; CUDA only)",
    )
    d.add_argument(
        "--no-deep-fp8",
        dest="deep_fp8",
        action="store_false",
        help="skip the non-MoE rows with the projections kept FP8 (fp8_projections; CUDA only; loads the model again)",
    )
    d.add_argument("--deep-offload-batches", type=_ints, default=[1, 8, 32], help="offload runner in situ")
    d.add_argument("--deep-prompt", type=int, default=256)
    d.add_argument("--deep-gen", type=int, default=16)
    d.add_argument("--deep-step-tokens", type=int, default=8192, help="the deep engine's max_tokens_per_step")
    d.add_argument("--delete-ckpt-after-load", action="store_true")
    s = p.add_argument_group("slice")
    s.add_argument("--preset", default="glm51", help="widths of the slice's MoE layers (tiny: the CPU smoke test)")
    s.add_argument("--experts", type=int, default=256, help="routed experts per slice layer")
    s.add_argument(
        "--expert-dtype",
        choices=("checkpoint", "int4"),
        default="checkpoint",
        help="the slice's experts: FP8 as released (checkpoint) or moed's int4 (written to slice_int4.json)",
    )
    s.add_argument("--context", type=int, default=32768, help="KV the deployment keeps room for (tokens)")
    s.add_argument("--reserve-gib", type=float, default=4.0, help="activations, graph pools, CUDA context")
    s.add_argument("--nonexpert-gib", type=float, default=38.0, help="without a deep stage: resident non-expert")
    s.add_argument("--gpu-gib", type=float, default=79.2, help="off CUDA: the GPU memory the deployment assumes")
    s.add_argument("--host-margin-gib", type=float, default=12.0)
    s.add_argument("--max-slice-layers", type=int, default=8)
    s.add_argument("--slots", type=int, default=0, help="cache slots per slice layer; 0: the deployment's")
    s.add_argument("--slice-alloc", default="huge", help="host slabs of the 256-expert slice: torch, mmap, huge")
    s.add_argument("--batches", type=_ints, default=list(BATCHES), help="decode batches (batch 1 is measured first)")
    s.add_argument(
        "--keep-decode",
        action="store_true",
        help="keep the decode rows of an earlier slice run for batches this run does not measure",
    )
    s.add_argument(
        "--hybrid-max-tokens",
        type=int,
        default=0,
        help="largest step whose misses the CPU shares; 0: the engine's rule for each batch (every decode step)",
    )
    s.add_argument(
        "--prefill-tokens", type=_ints, default=[1024, CHUNK, 8192, 32768], help="prefill step sizes (empty: none)"
    )
    s.add_argument(
        "--pin-prefix",
        type=int,
        default=128,
        help="tokens of steps run eagerly before each decode row's timed ones (cache and pin planner warm-up; 128 "
        "tokens = 128 steps at batch 1, 2 at batch 64)",
    )
    s.add_argument("--pin-every", type=int, default=32, help="tokens between the pin planner's re-plans in the prefix")
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--warm-steps", type=int, default=8)
    s.add_argument("--depth-layers", type=int, default=75, help="0: skip the one-layer vs deep cases")
    s.add_argument("--depth-allocs", default="huge", help="host allocations of the depth cases (huge,torch)")
    return p


def stage_name(args) -> str:
    """The stage's JSON name: deep, slice, or slice_int4 (the slice with int4 experts)."""
    return "slice_int4" if args.stage == "slice" and args.expert_dtype == "int4" else args.stage


def run_stage(args) -> dict:
    """One stage in this process; deep and slice write WORK/<stage>.json after each part."""
    import torch

    work = Path(args.work)
    meta = {
        "stage": args.stage,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "args": vars(args),
    }
    t0 = time.perf_counter()
    path = work / f"{stage_name(args)}.json"
    kept: list[dict] = []
    if args.stage == "slice" and args.keep_decode and path.exists():
        measured = set(args.batches)
        kept = [r for r in json.loads(path.read_text()).get("decode", []) if r["batch"] not in measured]

    from moed.ops.bench.model_timing import write_json

    def save(res: dict) -> None:
        merged = dict(res)
        if kept:
            merged["decode"] = sorted(kept + res.get("decode", []), key=lambda r: (r["batch"], r["trace"]))
        write_json(path, {**merged, **meta, "seconds": time.perf_counter() - t0})

    if args.stage == "deep":
        from moed.ops.bench.model_deep import stage_deep

        res = stage_deep(args, save)
    else:
        from moed.ops.bench.model_slice import stage_slice

        res = stage_slice(args, save)
    save(res)
    log.info("stage %s done in %.0f s", args.stage, time.perf_counter() - t0)
    return res


def report(args) -> dict:
    from moed.ops.bench.model_report import build_report, print_report
    from moed.ops.bench.model_timing import write_json

    work = Path(args.work)
    parts = {
        name: json.loads(Path(work, f"{name}.json").read_text())
        for name in PARTS
        if Path(work, f"{name}.json").exists()
    }
    if args.llama and Path(args.llama).exists():
        parts["llama"] = json.loads(Path(args.llama).read_text())
    rep = build_report(parts)
    write_json(Path(args.out or work / "results.json"), {"report": rep, **parts})
    print_report(rep, parts)
    return rep


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage == "report":
        report(args)
        return 0
    if args.stage != "all":
        run_stage(args)
        return 0
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--stage")]
    failed = []
    for stage in ("deep", "slice"):
        if stage == "deep" and not Path(args.ckpt, "config.json").exists():
            log.warning("no checkpoint at %s: deep stage skipped", args.ckpt)
            continue
        rc = subprocess.call([sys.executable, "-m", "moed.ops.bench.model", "--stage", stage, *rest])
        log.info("stage %s exited with %d", stage, rc)
        if rc:
            failed.append(stage)
    report(args)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
