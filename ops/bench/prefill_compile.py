"""Prefill of one GLM-5.1-width MoE decoder layer: eager against torch.compile, moed's kernels as custom ops.

    python3 -m moed.ops.bench.prefill_compile --out $OUT/prefill_compile.json             (GPU)
    python -m moed.ops.bench.prefill_compile --device cpu --tiny --out /tmp/pc.json       (CPU smoke test)

What runs: model/glm.py's `DecoderLayer` of layer 1 (MLA with the DSA indexer, router, routed + shared experts)
with random weights at GLM-5.1's widths: routed experts FP8 block-128, all `n_routed_experts` resident in GPU
slots (slot = expert id); everything else bf16 (indexer weights_proj fp32, as the loader keeps it). Attention is
the Triton backend (attention/nsa.py) over a paged pool of --pool-tokens (bf16 latents, FP8 index keys, page 64):
one sequence prefills T tokens from an empty cache, so T <= index_topk runs the dense one-shot MHA path and
longer T the indexer + top-k + sparse MLA path.

Variants (--variants; default eager, eager_ops, compile_attn: three compiles fit the default budget), per T:
  eager         the code as it is: the backends call the Triton kernel functions directly;
  eager_ops     the kernel entry points the backends import (nsa.indexer_topk, nsa.sparse_mla,
                dense.gather_paged_rows, the runner's fused_moe) replaced by kernels/torch_ops, and the pool's KV
                writes made by `moed::paged_store` (`store_through_op`): what the dispatcher costs;
  compile       torch.compile(mode=M) of the layer step as in eager_ops: every kernel an opaque node, the
                pool's views and writes visible to the compiler (the latent pool is written in place; the FP8
                index pool's dtype views, uint8 read as e4m3 keys and fp32 scales, still made Inductor copy that
                pool layer in its CPU code);
  compile_attn  torch.compile of the layer step with the backend's whole `attend` (KV write, indexer, top-k,
                sparse or dense MLA, through the kernel ops in eager mode) as one opaque op, `moed_bench::attend`,
                which reads the pool and the step context outside the graph (vLLM's and sglang's split for
                piecewise graphs); MoE through its op;
  compile_pool_store  as compile but with PagedKVPool.store as it is (indexing on pool views), which Inductor
                turns into a scatter into a copy of the whole pool layer, copied back every step.
Compiled variants run for each mode of --modes, one fresh compile per T (static shapes; `--dynamic` compiles
with dynamic shapes and reuses the result across T: on the CPU compile_attn needed 2 compiles for T in
{8, 12, 32, 40}, dense and sparse steps alike, as the branch between them is inside the opaque op).
Eager variants run first for every T, then the compiled ones, so a compile cut short by the budget still leaves
every baseline.
Per variant: median ms per prefill over --reps (CUDA events; wall clock on the CPU), ratio to eager, the first
call's wall time (for compiled variants: dynamo + Inductor compile and the first run), graphs and graph breaks
dynamo counted, the relative error of the output against eager_ops (the same kernels) and eager, whole-step and
for the median token (a rounding change that flips one token's router or indexer top-k choice moves that token
by tens of percent: the whole-step figure counts those, the median shows rounding noise, bf16 amplified by FP8
activation quantisation; on the tiny CPU model Inductor flipped one indexer row of 32 and left the other rows'
attention within 0.5%), and model TFLOP/s (matmul FLOPs of the step, `step_flops`) with its ratio to the bf16
GEMM rate measured in this run (8192^3).
On the CPU, eager runs the Triton interpreter and the ops run the torch references: timings there only show
that the script works.
A variant that fails is recorded with its error and the others go on; a SIGALRM deadline (--budget-s) ends a
compile that would overrun and skips what is left, so the command returns in time with what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

LAYER = 1  # the first MoE layer of a glm51-slice (first_k_dense_replace = 1)
PAGE = 64
KINDS = ("eager", "eager_ops", "compile", "compile_attn", "compile_pool_store")
FP32_PARAMS = ("indexer.weights_proj.weight", "mlp.gate.e_score_correction_bias")
GRACE_S = 10.0  # after the budget, how long a compile that swallowed the Deadline may go on before the exit
_RUN: dict = {"deadline": False, "report": None, "out": None}


class Deadline(Exception):
    """The run's time budget ran out."""


def _alarm(signum, frame) -> None:
    if not _RUN["deadline"]:
        _RUN["deadline"] = True
        signal.setitimer(signal.ITIMER_REAL, GRACE_S)
        raise Deadline("time budget (--budget-s) reached")
    # Dynamo/Inductor catch exceptions inside a compile, so the first alarm may not stop one: keep what was
    # measured and leave.
    report = _RUN["report"]
    report["stopped"] = f"time budget (--budget-s) + {GRACE_S:.0f} s reached inside a compile; exited"
    finish(report, _RUN["out"])
    os._exit(3)


def finish(report: dict, out: str | None) -> None:
    report["total_s"] = time.perf_counter() - report.pop("_start", time.perf_counter())
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
    print_table(report)
    sys.stdout.flush()


# -- model pieces ---------------------------------------------------------------------------------------------


def bench_config(tiny: bool):
    from moed.model.checkpoint import make_config
    from moed.model.config import GlmMoeDsaConfig

    if tiny:  # the test preset, with an FFN width FP8 block-128 experts accept
        raw = make_config("tiny", layers=2, fp8=True)
        raw["moe_intermediate_size"] = 128
    else:
        raw = make_config("glm51-slice", layers=2, fp8=True)
    return GlmMoeDsaConfig.from_dict(raw, source="prefill_compile")


def build_layer(cfg, device: torch.device, seed: int) -> torch.nn.Module:
    """DecoderLayer(LAYER) with random weights: linear ~ N(0, 1/in), norms 1, biases 0."""
    from moed.model.glm import DecoderLayer

    torch.manual_seed(seed)
    layer = DecoderLayer(cfg, LAYER).to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(FP32_PARAMS):
                p.data = p.data.float()
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return layer.eval()


class ResidentExperts:
    """Every routed expert of the layer in a GPU slot (slot = expert id): a MoERunner over the fused-MoE kernel.

    w13 e4m3 [E, 2N, K], w2 e4m3 [E, K, N]; block-128 fp32 scales K**-0.5 / N**-0.5 (weights of std ~1/sqrt(in)).
    `moe_fn` is the kernel function or its op (`routing` swaps it).
    """

    def __init__(self, cfg, device: torch.device, seed: int) -> None:
        from moed.kernels.fused_moe import fused_moe

        E, N, K = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        gen = torch.Generator(device=device).manual_seed(seed)
        fp8 = torch.float8_e4m3fn
        self.w13 = torch.empty(E, 2 * N, K, dtype=fp8, device=device)
        self.w2 = torch.empty(E, K, N, dtype=fp8, device=device)
        for e0 in range(0, E, 16):  # 16 experts of bf16 draws at a time (~0.8 GB at GLM-5.1 widths)
            e1 = min(E, e0 + 16)
            for w in (self.w13, self.w2):
                w[e0:e1] = torch.randn(w[e0:e1].shape, generator=gen, device=device, dtype=torch.bfloat16).to(fp8)
        self.w13_scale = torch.full((E, 2 * N // 128, -(-K // 128)), K**-0.5, device=device)
        self.w2_scale = torch.full((E, -(-K // 128), -(-N // 128)), N**-0.5, device=device)
        self.expert_to_slot = torch.arange(E, dtype=torch.int32, device=device)
        self.moe_fn: Callable[..., torch.Tensor] = fused_moe

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.moe_fn(
            hidden,
            self.w13,
            self.w2,
            topk_ids,
            topk_weights,
            self.expert_to_slot,
            w13_scale=self.w13_scale,
            w2_scale=self.w2_scale,
            block_shape=(128, 128),
        )


def store_through_op(
    self,
    layer: int,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    index_k: torch.Tensor | None,
    page: torch.Tensor,
    offset: torch.Tensor,
) -> None:
    """PagedKVPool.store (attention/paged_kv.py) with each write one `moed::paged_store` instead of indexing."""
    from moed.attention.paged_kv import quantize_rows_fp8
    from moed.kernels.torch_ops import paged_store

    lv = self.latent_view(layer)
    if self.latent_dtype == "fp8":
        q, scale = quantize_rows_fp8(latent)
        paged_store(lv.nope.view(torch.uint8), q.view(torch.uint8), page, offset)
        paged_store(lv.scale, scale, page, offset)
    else:
        paged_store(lv.nope, latent, page, offset)
    paged_store(lv.rope, k_rope, page, offset)
    if index_k is None:
        return
    iv = self.index_view(layer)
    if self.index_dtype == "fp8":
        q, scale = quantize_rows_fp8(index_k)
        paged_store(iv.k.view(torch.uint8), q.view(torch.uint8), page, offset)
        paged_store(iv.scale, scale, page, offset)
    else:
        paged_store(iv.k, index_k, page, offset)


_STEP: dict = {}  # what `moed_bench::attend` reads outside the graph: the backend and the step's context


def register_attend_op(index_topk: int) -> None:
    """`moed_bench::attend(layer, q_nope, q_rope, latent, k_rope, index_q?, index_k?, index_w?, kv_b_proj)
    -> (out [T, H * v_head_dim], topk [T, index_topk] int32, -1 rows on the dense path)`: backend.attend as one op.
    The pool it writes is not an argument (as vLLM's attention op keeps its KV cache in a forward context), so
    nothing of it reaches the compiler; prev_topk is not passed (one layer with its own indexer here)."""
    from moed.model.attention_interface import IndexerInputs, LayerWeights, MLAInputs

    if hasattr(torch.ops, "moed_bench") and hasattr(torch.ops.moed_bench, "attend"):
        return

    def attend(layer, q_nope, q_rope, latent, k_rope, index_q, index_k, index_w, kv_b_proj):
        backend, ctx = _STEP["backend"], _STEP["ctx"]
        indexer = None if index_q is None else IndexerInputs(q=index_q, k=index_k, weights=index_w)
        out, topk = type(backend).attend(
            backend,
            layer,
            LayerWeights(kv_b_proj=kv_b_proj),
            MLAInputs(q_nope=q_nope, q_rope=q_rope, latent=latent, k_rope=k_rope),
            indexer,
            None,
            ctx,
        )
        if topk is None:
            topk = torch.full((q_nope.shape[0], index_topk), -1, dtype=torch.int32, device=q_nope.device)
        return out, topk.clone()

    def fake(layer, q_nope, q_rope, latent, k_rope, index_q, index_k, index_w, kv_b_proj):
        T, H, dn = q_nope.shape
        dv = kv_b_proj.shape[0] // H - dn
        return q_nope.new_empty((T, H * dv)), q_nope.new_empty((T, index_topk), dtype=torch.int32)

    op = torch.library.custom_op(
        "moed_bench::attend",
        attend,
        mutates_args=(),
        schema="(int layer, Tensor q_nope, Tensor q_rope, Tensor latent, Tensor k_rope, Tensor? index_q, "
        "Tensor? index_k, Tensor? index_w, Tensor kv_b_proj) -> (Tensor, Tensor)",
    )
    op.register_fake(fake)


def attend_through_op(layer, weights, mla, indexer, prev_topk, ctx):
    """AttentionBackend.attend as one `moed_bench::attend` call (set on the backend instance)."""
    iq, ik, iw = (None, None, None) if indexer is None else (indexer.q, indexer.k, indexer.weights)
    return torch.ops.moed_bench.attend(
        layer, mla.q_nope, mla.q_rope, mla.latent, mla.k_rope, iq, ik, iw, weights.kv_b_proj
    )


@contextlib.contextmanager
def routing(kind: str, runner: ResidentExperts, backend) -> Iterator[None]:
    """Point the layer's kernel calls where variant `kind` wants them; everything is restored on exit."""
    from moed.attention import dense, nsa
    from moed.kernels import torch_ops

    saved = (nsa.indexer_topk, nsa.sparse_mla, dense.gather_paged_rows, runner.moe_fn)
    if kind != "eager":  # (inside compile_attn's opaque op too: its attention is eager_ops's)
        nsa.indexer_topk, nsa.sparse_mla = torch_ops.indexer_topk, torch_ops.sparse_mla
        dense.gather_paged_rows, runner.moe_fn = torch_ops.gather_paged_rows, torch_ops.fused_moe
    if kind in ("eager_ops", "compile"):
        backend.pool.store = store_through_op.__get__(backend.pool)
    if kind == "compile_attn":
        backend.attend = attend_through_op
    try:
        yield
    finally:
        nsa.indexer_topk, nsa.sparse_mla, dense.gather_paged_rows, runner.moe_fn = saved
        backend.pool.__dict__.pop("store", None)
        backend.__dict__.pop("attend", None)


@dataclasses.dataclass
class Prefill:
    """One sequence prefilling T tokens from an empty cache: the layer's inputs and step context."""

    x: torch.Tensor  # [T, hidden_size] bf16
    cos: torch.Tensor  # [T, rope_dim // 2]
    sin: torch.Tensor
    ctx: object  # StepContext with its PagedStep
    dense: bool  # the step runs the dense one-shot path (context <= threshold)


def make_prefill(cfg, backend, T: int, device: torch.device, seed: int) -> Prefill:
    from moed.attention.paged_kv import PagedSequence, build_paged_step
    from moed.model.attention_interface import SequenceStep, StepContext
    from moed.model.rope import rope_cos_sin, rope_inv_freq

    seq = SequenceStep(num_cached=0, num_new=T, kv=PagedSequence(backend.pool))
    paged = build_paged_step([seq], PAGE, device)
    positions = torch.arange(T, device=device)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, device), torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, cfg.hidden_size, generator=gen, device=device, dtype=torch.bfloat16)
    seq.kv.release()  # the pages go back for the next T; this step keeps its page table
    return Prefill(
        x, cos, sin, StepContext(positions=positions, seqs=[seq], paged=paged), dense=T <= backend.dense_threshold
    )


def step_flops(cfg, T: int, dense: bool) -> float:
    """Matmul FLOPs of one layer prefill of T tokens from an empty cache (causal halves counted once)."""
    H, nH, ql = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank
    C, R, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    iH, iD, N = cfg.index_n_heads, cfg.index_head_dim, cfg.moe_intermediate_size
    proj = H * ql + ql * nH * (dn + R) + H * (C + R) + ql * iH * iD + H * iD + H * iH + nH * dv * H
    moe = H * cfg.n_routed_experts + (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * H * N
    per_token = 2 * (proj + moe)
    if dense:  # kv_b expansion of every position, causal QK^T and PV
        attn = 2 * T * C * nH * (dn + dv) + 2 * nH * (T * T / 2) * (dn + R + dv)
    else:  # q absorption, indexer over the causal prefix, sparse MLA over top-k, output absorption
        sel = min(cfg.index_topk, T)
        attn = 2 * T * nH * dn * C + 2 * iH * iD * (T * T / 2) + 2 * T * nH * sel * (C + R + C) + 2 * T * nH * C * dv
    return per_token * T + attn


# -- timing ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gemm_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)
    return 2 * 8192**3 / median_ms(lambda: torch.matmul(a, b, out=out), 10, device) / 1e9


def _dynamo_counts() -> tuple[int, int, list[str]]:
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return int(counters["stats"]["unique_graphs"]), int(sum(breaks.values())), sorted(breaks)[:5]


# -- the run --------------------------------------------------------------------------------------------------


def run_variant(
    name: str,
    fn: Callable,
    p: Prefill,
    reps: int,
    device: torch.device,
    baselines: dict[str, torch.Tensor],
    flops: float,
    gemm: float | None,
) -> tuple[dict, torch.Tensor]:
    from torch._dynamo.utils import counters

    def call() -> torch.Tensor:
        p.ctx.paged.derived.clear()  # per-step values the backend caches (KV write slots): built by each call
        _STEP["ctx"] = p.ctx
        return fn(p.x, p.cos, p.sin, p.ctx)

    row: dict = {"variant": name, "tokens": p.x.shape[0], "path": "dense" if p.dense else "sparse"}
    counters.clear()
    t0 = time.perf_counter()
    out = call()
    _sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    call()  # a second warm-up: allocator, autotune caches
    row["ms"] = median_ms(call, reps, device)
    row["graphs"], row["graph_breaks"], row["break_reasons"] = _dynamo_counts()
    row["tflops"] = flops / row["ms"] / 1e9
    if gemm:
        row["of_gemm"] = row["tflops"] / gemm
    for base, ref in baselines.items():  # vs eager_ops: what compiling changed, the kernels being the same
        diff, ref32 = out.float() - ref.float(), ref.float()
        row[f"rel_err_vs_{base}"] = float(diff.norm() / ref32.norm())
        # The median token's error: bf16 noise, where the whole-step figure also counts the few tokens whose
        # router or indexer top-k choice flipped on a rounding change.
        row[f"token_rel_err_p50_vs_{base}"] = float((diff.norm(dim=1) / ref32.norm(dim=1)).median())
    return row, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tiny preset's widths (CPU smoke test)")
    ap.add_argument("--tokens", default=None, help="comma-separated T (default 512,2048,8192; tiny: 8,32)")
    ap.add_argument(
        "--modes",
        default="default",
        help="comma-separated torch.compile modes to try, e.g. "
        "default,max-autotune-no-cudagraphs ('none' for eager only)",
    )
    ap.add_argument("--dynamic", action="store_true", help="one compile with dynamic shapes for every T")
    ap.add_argument(
        "--variants",
        default="eager,eager_ops,compile_attn",
        help=f"comma-separated, run in this order per phase; from {', '.join(KINDS)}",
    )
    ap.add_argument(
        "--pool-tokens",
        type=int,
        default=None,
        help="KV pool capacity in tokens (default 262144; tiny 1024): what a whole-pool copy costs",
    )
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop compiling and skip what is left after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for every figure")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # eager calls the Triton kernels: the interpreter here
        torch.set_num_threads(1)  # on a small shared machine, OpenMP threads waiting for each other swamp timings
    elif not torch.cuda.is_available():
        print("prefill_compile: --device cuda but no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    tokens = [int(t) for t in (args.tokens or ("8,32" if args.tiny else "512,2048,8192")).split(",")]
    if min(tokens) < 1:
        print(f"prefill_compile: --tokens {args.tokens!r}: every T must be >= 1", file=sys.stderr)
        return 2
    modes = [] if args.modes == "none" else args.modes.split(",")
    kinds = args.variants.split(",")
    if not set(kinds) <= set(KINDS):
        print(
            f"prefill_compile: --variants {args.variants!r}: unknown {sorted(set(kinds) - set(KINDS))}; "
            f"choose from {', '.join(KINDS)}",
            file=sys.stderr,
        )
        return 2
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "tokens": tokens,
        "modes": modes,
        "dynamic": args.dynamic,
        "reps": args.reps,
        "variants": kinds,
        "results": [],
        "_start": start,
    }
    _RUN.update(report=report, out=args.out)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(args.budget_s - (time.perf_counter() - start), 0.001))
    try:
        import triton

        from moed.attention.nsa import TritonSparseAttention
        from moed.attention.paged_kv import PagedKVPool
        from moed.kernels import torch_ops  # noqa: F401  (registers torch.ops.moed.*)

        report["triton"] = triton.__version__
        cfg = bench_config(args.tiny)
        with torch.inference_mode():
            layer = build_layer(cfg, device, args.seed)
            runner = ResidentExperts(cfg, device, args.seed + 1)
            pool_tokens = max(args.pool_tokens or (1024 if args.tiny else 262144), max(tokens))
            pool = PagedKVPool(cfg, -(-pool_tokens // PAGE) + 1, PAGE, "bf16", "fp8", device, layers=[LAYER])
            backend = TritonSparseAttention(cfg, pool)
            register_attend_op(cfg.index_topk)
            _STEP["backend"] = backend
            report["gemm_bf16_tflops"] = gemm_tflops(device)
        report["setup_s"] = time.perf_counter() - start
        report["layer"] = {
            "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "experts": cfg.n_routed_experts,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "index_topk": cfg.index_topk,
            "dense_threshold": backend.dense_threshold,
            "pool_tokens": (pool.num_pages - 1) * PAGE,
            "pool_layer_MB": pool.latent.nbytes / 1e6,
        }
        run_all(report, cfg, layer, runner, backend, tokens, kinds, modes, args, device)
    except Deadline as e:
        report["stopped"] = str(e)
    except Exception as e:  # a failed setup still leaves a report
        if _RUN["deadline"]:
            report["stopped"] = "time budget (--budget-s) reached"
        else:
            report["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    finish(report, args.out)
    return 0 if "error" not in report else 1


def run_all(
    report: dict,
    cfg,
    layer,
    runner,
    backend,
    tokens: list[int],
    kinds: list[str],
    modes: list[str],
    args,
    device: torch.device,
) -> None:
    def step(x, cos, sin, ctx):
        return layer(x, cos, sin, backend, runner, ctx, None)[0]

    with torch.inference_mode():
        prefills = {T: make_prefill(cfg, backend, T, device, args.seed + T) for T in tokens}
    baselines: dict[int, dict[str, torch.Tensor]] = {T: {} for T in tokens}
    eager_ms: dict[int, float] = {}
    # (name, kind, T, function factory): eager kinds for every T first, then each compiled kind and mode
    plan: list[tuple[str, str, int, Callable[[], Callable]]] = []
    for T in tokens:
        plan += [(k, k, T, lambda: step) for k in kinds if not k.startswith("compile")]
    shared: dict[str, Callable] = {}  # --dynamic: one compiled function per variant for every T
    for kind in (k for k in kinds if k.startswith("compile")):
        for mode in modes:
            name = f"{kind}:{mode}"
            plan += [(name, kind, T, lambda m=mode, n=name: compiled(step, m, args.dynamic, shared, n)) for T in tokens]
    for name, kind, T, make in plan:
        if _RUN["deadline"] and "stopped" not in report:  # the alarm came inside code that swallowed it
            report["stopped"] = "time budget (--budget-s) reached"
        if "stopped" in report:
            report["results"].append({"variant": name, "tokens": T, "skipped": report["stopped"]})
            continue
        p = prefills[T]
        try:
            with torch.inference_mode(), routing(kind, runner, backend):
                row, out = run_variant(
                    name,
                    make(),
                    p,
                    args.reps,
                    device,
                    baselines[T],
                    step_flops(cfg, T, p.dense),
                    report.get("gemm_bf16_tflops"),
                )
            if name == "eager":
                eager_ms[T] = row["ms"]
            elif T in eager_ms:
                row["vs_eager"] = eager_ms[T] / row["ms"]
            if name in ("eager", "eager_ops"):
                baselines[T][name] = out
        except Deadline as e:
            report["stopped"] = str(e)
            row = {"variant": name, "tokens": T, "error": f"stopped: {e}"}
        except Exception as e:  # one failing variant is reported; the others still run
            row = {"variant": name, "tokens": T, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            if _RUN["deadline"]:  # a Deadline wrapped by dynamo
                report["stopped"] = "time budget (--budget-s) reached"
                row["error"] = f"stopped: {report['stopped']}"
            else:
                traceback.print_exc()
        report["results"].append(row)
        print(json.dumps(row), flush=True)


def compiled(step: Callable, mode: str, dynamic: bool, shared: dict[str, Callable], key: str) -> Callable:
    if dynamic and key in shared:
        return shared[key]
    torch._dynamo.reset()  # a fresh compile: its cost is measured, not an earlier T's cache
    fn = torch.compile(step, mode=None if mode == "default" else mode, dynamic=dynamic)
    shared[key] = fn
    return fn


def print_table(report: dict) -> None:
    print(
        f"\nprefill_compile on {report.get('device')}: torch {report.get('torch')}, triton {report.get('triton')}, "
        f"bf16 GEMM {report.get('gemm_bf16_tflops') or 0:.0f} TFLOP/s, setup {report.get('setup_s', 0):.1f} s, "
        f"total {report.get('total_s', 0):.1f} s"
    )
    for key in ("error", "stopped"):
        if key in report:
            print(f"{key}: {report[key]}")
    print(
        f"{'T':>6} {'path':>6} {'variant':<40} {'ms':>9} {'x eager':>8} {'first s':>8} {'graphs':>6} "
        f"{'breaks':>6} {'rel err':>8} {'tok p50':>8} {'TFLOP/s':>8} {'of GEMM':>7}  (errors vs eager_ops)"
    )
    for r in report["results"]:
        if "ms" not in r:
            print(f"{r['tokens']:>6} {'':>6} {r['variant']:<40} {r.get('error') or r.get('skipped')}")
            continue
        err, tok = r.get("rel_err_vs_eager_ops"), r.get("token_rel_err_p50_vs_eager_ops")
        vs = r.get("vs_eager")
        print(
            f"{r['tokens']:>6} {r['path']:>6} {r['variant']:<40} {r['ms']:>9.3f} "
            f"{'' if vs is None else f'{vs:.2f}':>8} "
            f"{r['first_call_s']:>8.1f} {r['graphs']:>6} {r['graph_breaks']:>6} "
            f"{'' if err is None else f'{err:.1e}':>8} {'' if tok is None else f'{tok:.1e}':>8} "
            f"{r['tflops']:>8.1f} {r.get('of_gemm', 0):>7.1%}"
        )


if __name__ == "__main__":
    sys.exit(main())
