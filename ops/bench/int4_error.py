"""Int4 expert error on the CPU: the format choice on GLM-width weights, then per-layer and whole-model drift.

Part 1 (`format`): GLM-5.1-width expert matrices (gate/up 2048 x 6144, down 6144 x 2048) drawn from several
distributions (Gaussian as moed's random checkpoints and GLM-like init draw them; Student-t with 3 degrees of
freedom; Gaussian with 1% of input channels 8x larger, the outlier-channel pattern of trained LLM weights), each
quantised by every candidate rule. Printed per rule: bits per weight, relative RMS error of the weights, relative
error of one expert's SwiGLU output on random inputs, and the quantiser's CPU time per expert.
Rules: `asym` (min/max scale and a 4-bit zero point per group, compressed-tensors' asymmetric rule, what
`moed checkpoint make --dtype int4` writes; `asym-g64`, `asym-g32` the same at finer groups), `sym` (the group's
extreme maps to -8 with a signed bf16 scale), `sym-ct` (compressed-tensors' symmetric rule: absmax / 7.5, clamp to
[-8, 7]), `sym-mse` / `asym-mse` (the same with the range shrunk by the factor in [0.70, 1] that minimises each
group's squared error, as AWQ's clip search does; `asym-mse` is moed's load-time quantiser, `quantize_int4(...,
clip_search=True)`), and `Q4_0` (llama.cpp's rule: group 32, fp16 scale).

Part 2 (`model`): a checkpoint (default: the built-in tiny one) run by the torch reference with its own experts
and with the experts quantised to int4 at load (`expert_dtype="int4"`), on the same tokens: per MoE layer, the
routed-expert output error on that layer's real inputs (captured from the reference run), then the logits drift
(relative error, top-1 agreement, mean KL divergence).
Run: `python -m moed.ops.bench.int4_error [--model tiny|DIR] [--tokens 64] [--parts format,model] [--rules ...]`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moed.formats import int4

GLM_H, GLM_I = 6144, 2048
SHRINK = torch.linspace(0.70, 1.0, 16)


# ---- candidate rules: each maps w [out, in] fp32 to its dequantised fp32 twin -------------------------------------


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.view(w.shape[0], w.shape[1] // g, g)


def _fake_sym(w: torch.Tensor, g: int, scale: torch.Tensor, sdtype: torch.dtype) -> torch.Tensor:
    """Round w's groups to scale * [-8, 7]; scale [out, in / g] is first rounded to `sdtype`."""
    s = scale.to(sdtype).float()
    safe = s.masked_fill(s == 0, 1.0)[..., None]
    b = _groups(w, g)
    return (torch.round(b / safe).clamp(-8, 7) * s[..., None]).view_as(w)


def rule_sym(w: torch.Tensor, g: int = 128) -> torch.Tensor:
    b = _groups(w, g)
    extreme = b.gather(-1, b.abs().argmax(-1, keepdim=True)).squeeze(-1)  # the signed element of largest magnitude
    return _fake_sym(w, g, extreme / -8, torch.bfloat16)


def rule_sym_ct(w: torch.Tensor, g: int = 128) -> torch.Tensor:
    return _fake_sym(w, g, _groups(w, g).abs().amax(-1) / 7.5, torch.bfloat16)


def rule_q4_0(w: torch.Tensor, g: int = 32) -> torch.Tensor:
    b = _groups(w, g)
    extreme = b.gather(-1, b.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return _fake_sym(w, g, extreme / -8, torch.float16)


def rule_asym(w: torch.Tensor, g: int = 128) -> torch.Tensor:
    return int4.dequantize_int4(int4.quantize_int4(w, g))


def _sym_mse(w: torch.Tensor, g: int = 128) -> torch.Tensor:
    b = _groups(w, g)
    extreme = b.gather(-1, b.abs().argmax(-1, keepdim=True)).squeeze(-1)
    best, best_err = None, None
    for f in SHRINK.tolist():
        d = _fake_sym(w, g, extreme * f / -8, torch.bfloat16)
        err = ((_groups(d, g) - b) ** 2).sum(-1)
        if best is None:
            best, best_err = _groups(d, g).clone(), err
        else:
            better = err < best_err
            best[better] = _groups(d, g)[better]
            best_err = torch.minimum(err, best_err)
    return best.view_as(w)


def _asym_mse(w: torch.Tensor, g: int = 128) -> torch.Tensor:
    """moed's load-time quantiser: the asym rule with each group's range fitted (`quantize_int4(clip_search=True)`)."""
    return int4.dequantize_int4(int4.quantize_int4(w, g, clip_search=True))


# name -> (rule, bits per weight: 4 + scale bits / group (+ 4-bit zero point / group))
RULES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "asym": (rule_asym, 4 + 20 / 128),
    "asym-g64": (lambda w: rule_asym(w, 64), 4 + 20 / 64),  # moed's rule at finer groups: the bytes accuracy costs
    "asym-g32": (lambda w: rule_asym(w, 32), 4 + 20 / 32),
    "sym": (rule_sym, 4 + 16 / 128),
    "sym-ct": (rule_sym_ct, 4 + 16 / 128),
    "sym-mse": (_sym_mse, 4 + 16 / 128),
    "asym-mse": (_asym_mse, 4 + 20 / 128),
    "Q4_0": (rule_q4_0, 4 + 16 / 32),
}


def draw(kind: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    in_f = shape[1]
    if kind == "gaussian":
        w = torch.randn(shape, generator=gen)
    elif kind == "student-t3":
        # t(3) = normal / sqrt(chi2(3) / 3), chi2(3) the sum of three squared normals
        chi2 = (torch.randn((3, *shape), generator=gen) ** 2).sum(0)
        w = torch.randn(shape, generator=gen) / torch.sqrt(chi2 / 3)
    elif kind == "outlier-channels":
        w = torch.randn(shape, generator=gen)
        cols = torch.randperm(in_f, generator=gen)[: in_f // 100]
        w[:, cols] *= 8
    else:
        raise ValueError(f"unknown distribution {kind!r}")
    return w * in_f**-0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def format_part(tokens: int, seed: int, kinds: list[str], rules: list[str] | None = None) -> list[dict]:
    rows = []
    for kind in kinds:
        gen = torch.Generator().manual_seed(seed)
        gate, up = draw(kind, (GLM_I, GLM_H), gen), draw(kind, (GLM_I, GLM_H), gen)
        down = draw(kind, (GLM_H, GLM_I), gen)
        x = torch.randn((tokens, GLM_H), generator=gen)
        ref = _swiglu(x, gate, up, down)
        for name, (rule, bits) in RULES.items():
            if rules and name not in rules:
                continue
            t0 = time.perf_counter()
            q = [rule(m) for m in (gate, up, down)]
            dt = time.perf_counter() - t0
            w_err = math.sqrt(
                sum(float((a - b).pow(2).sum()) for a, b in zip(q, (gate, up, down)))
                / sum(float(b.pow(2).sum()) for b in (gate, up, down))
            )
            row = {
                "dist": kind,
                "rule": name,
                "bits": bits,
                "w_err": w_err,
                "out_err": _rel(_swiglu(x, *q), ref),
                "quant_s": dt,
            }
            rows.append(row)
            print(
                f"  {kind:16s} {name:8s} {bits:6.3f} b/w  weights {w_err:.4f}  expert out {row['out_err']:.4f}  "
                f"quantise {dt:6.2f} s/expert",
                flush=True,
            )
    return rows


# ---- part 2: a checkpoint, reference experts vs int4 experts ---------------------------------------------------


class _Recording:
    """A MoE runner that records each layer's inputs, then delegates."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, {}

    def load_expert(self, layer, expert, weights):
        self.inner.load_expert(layer, expert, weights)

    def finish_loading(self):
        self.inner.finish_loading()

    def run(self, layer, hidden, topk_ids, topk_weights):
        self.seen[layer] = (hidden.clone(), topk_ids.clone(), topk_weights.clone())
        return self.inner.run(layer, hidden, topk_ids, topk_weights)


@torch.no_grad()
def model_part(model: str, tokens: int, seed: int) -> dict:
    from moed.attention.reference import ReferenceAttention
    from moed.model.attention_interface import SequenceStep, StepContext
    from moed.model.checkpoint import builtin_checkpoint
    from moed.model.config import GlmMoeDsaConfig
    from moed.model.weights import load_model
    from moed.offload.torch_runner import TorchMoERunner

    path = Path(model) if Path(model).is_dir() else builtin_checkpoint(model)
    cfg = GlmMoeDsaConfig.from_file(path / "config.json")
    ref_runner = _Recording(TorchMoERunner(cfg, torch.float32))
    ref = load_model(path, ref_runner, dtype=torch.float32, mtp=False, config=cfg)
    q_runner = TorchMoERunner(cfg, torch.float32, expert_dtype="int4")
    quant = load_model(path, q_runner, dtype=torch.float32, mtp=False, config=cfg, expert_dtype="int4")
    ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed))
    attn = ReferenceAttention(cfg)

    def logits(m, runner):
        ctx = StepContext(positions=torch.arange(tokens), seqs=[SequenceStep(0, tokens, attn.new_sequence())])
        return m.logits(m(ids, ctx, attn, runner)).float()

    ref_logits = logits(ref, ref_runner)
    layers = {}
    for layer, (hidden, topk_ids, topk_w) in sorted(ref_runner.seen.items()):
        want = ref_runner.inner.run(layer, hidden, topk_ids, topk_w)
        got = q_runner.run(layer, hidden, topk_ids, topk_w)
        layers[layer] = _rel(got.float(), want.float())
        print(f"  layer {layer:3d}: routed-expert output rel err {layers[layer]:.4f} (same inputs)", flush=True)
    q_logits = logits(quant, q_runner)
    logp, logq = F.log_softmax(ref_logits, -1), F.log_softmax(q_logits, -1)
    drift = {
        "logits_rel_err": _rel(q_logits, ref_logits),
        "top1_agreement": float((ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean()),
        "mean_kl": float((logp.exp() * (logp - logq)).sum(-1).mean()),
    }
    print(
        f"  logits: rel err {drift['logits_rel_err']:.4f}, top-1 agreement {drift['top1_agreement']:.3f}, "
        f"mean KL {drift['mean_kl']:.2e} over {tokens} tokens",
        flush=True,
    )
    return {"model": str(path), "tokens": tokens, "layers": layers, **drift}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.int4_error", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="format,model")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' / 'small' (built in)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dists", default="gaussian,student-t3,outlier-channels")
    p.add_argument("--rules", default=None, help=f"format rules to run (default: all of {', '.join(RULES)})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    torch.set_grad_enabled(False)
    if "format" in parts:
        print(f"[format] GLM-5.1 expert widths ({GLM_I} x {GLM_H}), {args.tokens} random tokens", flush=True)
        rows = format_part(args.tokens, args.seed, args.dists.split(","), args.rules.split(",") if args.rules else None)
        print(
            "\n| distribution | rule | bits/weight | weight rel RMS err | expert output rel err | quantise s/expert |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(
                f"| {r['dist']} | {r['rule']} | {r['bits']:.3f} | {r['w_err']:.4f} | {r['out_err']:.4f} | "
                f"{r['quant_s']:.2f} |"
            )
    if "model" in parts:
        print(f"\n[model] {args.model}: reference experts vs int4 experts on the same {args.tokens} tokens", flush=True)
        res = model_part(args.model, args.tokens, args.seed)
        errs = list(res["layers"].values())
        print(
            f"\nper-layer routed-expert rel err: min {min(errs):.4f}, max {max(errs):.4f}; logits rel err "
            f"{res['logits_rel_err']:.4f}; top-1 agreement {res['top1_agreement']:.3f}; mean KL {res['mean_kl']:.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
