"""Logits drift of 4-bit experts, moed beside llama.cpp, on the same weights and the same tokens (CPU).

    python -m moed.ops.bench.llama_drift --llama-cpp-dir DIR [--llama-bin DIR/build/bin] [--model small]
        [--n-ctx 256] [--chunks 16] [--work DIR] [--json OUT]

The checkpoint (default: the built-in `small`, GLM-5.1's architecture at hidden 512, 64 experts) goes to an F32 GGUF
through llama.cpp's own converter (`llama_peer.convert_plain`), and `llama-quantize` makes the files users run from
it: Q8_0, Q4_0 and Q4_K_M (llama.cpp's stock mixes: attention and the rest quantised too), and Q4_0 / Q4_K on the
routed experts alone (`--tensor-type ..._exps=`, the rest F32, as moed's int4 keeps the checkpoint's non-expert
weights). Text: random token ids of the checkpoint's tokenizer that decode to whole characters, decoded, so
llama.cpp tokenizes it itself. `llama-perplexity --kl-divergence-base` over the F32 GGUF writes the tokens and
llama.cpp's unquantised log-probabilities (chunks of n_ctx tokens, the second half of each scored), and this module
writes moed's own unquantised answer on exactly those tokens in the same file format (`write_base`: the project's
torch reference in fp32, HF's GlmMoeDsaForCausalLM's arithmetic). Every variant is then scored against both bases
with llama.cpp's statistics: llama.cpp's by `llama-perplexity --kl-divergence`, moed's (`expert_dtype="int4"`:
asymmetric int4, group 128, quantised at load with the clip search; exact arithmetic, and with int8 activations in
128-wide steps as the GPU's A8 tiles and the CPU expert kernel compute) by `kld_stats`, which mirrors
perplexity.cpp's formulas on the same decoded base log-probabilities. The F32 GGUF against moed's base says how
closely the two implementations agree before anything is quantised.

llama.cpp: the vendor/llama.cpp tree of the `llama-cpp-python` 0.3.36 sdist (`pip download --no-deps --no-binary
:all: llama-cpp-python==0.3.36`; ops/bench/device_prep.sh packs the same tree into .peers/), built for the CPU with
`cmake -B build -G Ninja -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
-DLLAMA_BUILD_SERVER=OFF && cmake --build build --target llama-quantize llama-perplexity` (~10 minutes on 2 cores).
Its GLM-DSA graph needs the indexer's head width to be a multiple of 64 (a Hadamard rotation of at least 64), so the
built-in `tiny` (32) does not load there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = b"_logits_"
KLD_FLOOR = -16.0  # perplexity.cpp: base log-probs at or below this add nothing to the KL sum

# (name, llama-quantize type, --tensor-type overrides): what users download, and the routed experts alone at 4 bits.
# Overrides apply only under a quantised file type, first match wins: experts to the 4-bit type, every other
# quantisable tensor back to F32 (norms and routers it never quantises).
LLAMA_VARIANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("llama.cpp Q8_0", "Q8_0", ()),
    ("llama.cpp Q4_0", "Q4_0", ()),
    ("llama.cpp Q4_K_M", "Q4_K_M", ()),
    ("llama.cpp experts Q4_0, rest F32", "Q4_0", ("_exps=q4_0", ".=f32")),
    ("llama.cpp experts Q4_K, rest F32", "Q4_K_M", ("_exps=q4_k", ".=f32")),
)


def row_width(n_vocab: int) -> int:
    """uint16 values a scored position takes in the file: two floats (scale, min log-prob), then the vocabulary."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_logprobs(logits: np.ndarray) -> np.ndarray:
    """[n, V] float32 logits -> [n, row_width(V)] uint16, as perplexity.cpp's base writer compresses them: log-probs
    within 16 nats of the top in 65535 steps, (scale, min log-prob) as two floats in front."""
    x = np.asarray(logits, dtype=np.float32)
    n, V = x.shape
    mx = x.max(1)
    mn = np.maximum(x.min(1), mx - np.float32(16))
    lse = np.log(np.exp(x - mx[:, None]).sum(1, dtype=np.float64)).astype(np.float32)
    min_lp = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    out = np.zeros((n, row_width(V)), dtype=np.uint16)
    head = np.zeros((n, 2), dtype=np.float32)
    head[:, 0], head[:, 1] = scale, min_lp
    out[:, :4] = head.view(np.uint16)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    q = np.rint(inv[:, None] * (x - mn[:, None]))  # nearest_int: round half to even
    out[:, 4 : 4 + V] = np.where(x > mn[:, None], q, 0).astype(np.uint16)
    return out


def decode_logprobs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """[n, row_width] uint16 -> [n, V] float32 log-probs, as perplexity.cpp reads them back."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    return head[:, :1] * rows[:, 4 : 4 + n_vocab].astype(np.float32) + head[:, 1:2]


@dataclass
class Base:
    """A `--kl-divergence-base` file: chunks of n_ctx tokens and the log-probs of positions n_ctx/2 .. n_ctx-2."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int32
    rows: np.ndarray  # [n_chunk, n_ctx - 1 - n_ctx // 2, row_width] uint16

    @property
    def first(self) -> int:
        return self.n_ctx // 2


def read_base(path: Path) -> Base:
    data = path.read_bytes()
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: not a llama-perplexity log-prob file (no {MAGIC!r} header)")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(data, dtype=np.int32, count=3, offset=8))
    n_pos, nv = n_ctx - 1 - n_ctx // 2, row_width(n_vocab)
    off = 20 + 4 * n_chunk * n_ctx
    want = off + n_chunk * n_pos * nv * 2
    if min(n_ctx, n_vocab, n_chunk) < 1 or len(data) < want:
        raise ValueError(f"{path}: {len(data)} bytes, {want} expected for {n_chunk} chunks of {n_ctx} (V {n_vocab})")
    tokens = np.frombuffer(data, dtype=np.int32, count=n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)
    rows = np.frombuffer(data, dtype=np.uint16, count=n_chunk * n_pos * nv, offset=off).reshape(n_chunk, n_pos, nv)
    return Base(n_ctx, n_vocab, tokens.copy(), rows.copy())


def write_base(path: Path, n_ctx: int, tokens: np.ndarray, logits: list[np.ndarray]) -> None:
    """The file `llama-perplexity --kl-divergence-base` writes, from our own logits: logits[c] is [n_ctx - 1 - n_ctx/2,
    V] for chunk c (positions n_ctx/2 .. n_ctx - 2)."""
    n_chunk, V = len(logits), logits[0].shape[1]
    with path.open("wb") as f:
        f.write(MAGIC)
        f.write(np.array([n_ctx, V, n_chunk], dtype=np.int32).tobytes())
        f.write(np.ascontiguousarray(tokens[:n_chunk], dtype=np.int32).tobytes())
        for chunk in logits:
            f.write(encode_logprobs(chunk).tobytes())


def kld_stats(
    logits: np.ndarray, base_rows: np.ndarray, next_tokens: np.ndarray, n_vocab: int
) -> dict[str, np.ndarray]:
    """Per scored position, perplexity.cpp's `log_softmax` against a base: KL(base || this) over the base's
    log-probs above -16 nats, whether the argmax agrees, the probability of the next token here minus in the base
    (Δp), and both negative log-likelihoods."""
    x = np.asarray(logits, dtype=np.float32)
    lp_base = decode_logprobs(base_rows, n_vocab)
    mx = x.max(1)
    lse = np.log(np.exp(x - mx[:, None]).sum(1, dtype=np.float64)).astype(np.float32)
    logq = x - (mx + lse)[:, None]
    idx = np.arange(len(x))
    nll, nll_base = -logq[idx, next_tokens], -lp_base[idx, next_tokens]
    keep = lp_base > KLD_FLOOR
    kld = (np.exp(lp_base, where=keep, out=np.zeros_like(lp_base)) * (lp_base - logq) * keep).sum(1, dtype=np.float64)
    return {
        "kld": kld,
        "same_top": x.argmax(1) == lp_base.argmax(1),
        "p_diff": np.exp(-nll.astype(np.float64)) - np.exp(-nll_base.astype(np.float64)),
        "nll": nll.astype(np.float64),
        "nll_base": nll_base.astype(np.float64),
    }


def _percentile(values: np.ndarray, fraction: float) -> float:
    v = np.sort(values)
    p = fraction * (len(v) - 1)
    i = int(p)
    return float((1 - (p - i)) * v[i] + (p - i) * v[min(i + 1, len(v) - 1)])


def summarise(per_pos: dict[str, np.ndarray]) -> dict[str, float]:
    """The figures llama-perplexity prints at the end of --kl-divergence, from per-position values."""
    kld = per_pos["kld"]
    return {
        "positions": len(kld),
        "mean_kld": float(kld.mean()),
        "kld_99": _percentile(kld, 0.99),
        "max_kld": float(kld.max()),
        "rms_dp_pct": 100 * float(np.sqrt((per_pos["p_diff"] ** 2).mean())),
        "same_top_pct": 100 * float(per_pos["same_top"].mean()),
        "ln_ppl_ratio": float(per_pos["nll"].mean() - per_pos["nll_base"].mean()),
    }


_LLAMA_FIGURES = {
    "mean_kld": r"Mean\s+KLD:\s*([-\d.]+)",
    "kld_99": r"99\.0%\s+KLD:\s*([-\d.]+)",
    "max_kld": r"Maximum KLD:\s*([-\d.]+)",
    "rms_dp_pct": r"RMS Δp\s*:\s*([-\d.]+)",
    "same_top_pct": r"Same top p:\s*([-\d.]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-\d.]+)",
}


def parse_llama_kld(text: str) -> dict[str, float]:
    """llama-perplexity --kl-divergence's closing statistics; a figure it did not print is left out."""
    out = {}
    for key, pat in _LLAMA_FIGURES.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    return out


# ---- the checkpoint's text, and the runs -----------------------------------------------------------------------


def random_text(tokenizer_json: Path, n_tokens: int, seed: int) -> str:
    """Random ids of the checkpoint's tokenizer that decode to whole characters (byte-level pieces of a multi-byte
    character would decode to U+FFFD, which re-tokenizes as the same three bytes again and again), decoded."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    ok = [
        i
        for i in range(tok.get_vocab_size())
        if tok.id_to_token(i) not in special and "\ufffd" not in (s := tok.decode([i])) and s.strip()
    ]
    r = random.Random(seed)
    return tok.decode([r.choice(ok) for _ in range(n_tokens)])


def _run(cmd: list[str], timeout: float) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def _gguf(llama_dir: Path):
    """gguf-py from llama.cpp's tree (the version that knows its file types)."""
    if str(llama_dir / "gguf-py") not in sys.path:
        sys.path.insert(0, str(llama_dir / "gguf-py"))
    import gguf

    return gguf


def gguf_summary(path: Path, llama_dir: Path) -> dict:
    """File bytes, and the routed experts' tensor types and bits per weight."""
    gguf = _gguf(llama_dir)
    r = gguf.GGUFReader(str(path))
    exps = [t for t in r.tensors if "_exps." in t.name]
    types = sorted({t.tensor_type.name for t in exps})
    bits = 8 * sum(int(t.n_bytes) for t in exps) / max(1, sum(int(t.n_elements) for t in exps))
    return {"bytes": path.stat().st_size, "expert_types": types, "expert_bits": bits}


@torch.no_grad()
def moed_logits(ckpt: Path, variants: list[str], tokens: np.ndarray, add_bos: bool, bos: int) -> dict[str, list]:
    """Each variant's logits at every chunk's scored positions ([n_ctx - 1 - n_ctx/2, V] float32 per chunk): 'ref'
    (the checkpoint's experts), 'int4' (asymmetric int4, exact arithmetic), 'int4_a8' (int4 with int8 activations in
    128-wide steps, as the GPU's A8 tiles and the CPU expert kernel compute)."""
    from moed.attention.reference import ReferenceAttention
    from moed.kernels.fused_moe_reference import fused_moe_reference
    from moed.model.attention_interface import SequenceStep, StepContext
    from moed.model.config import GlmMoeDsaConfig
    from moed.model.weights import load_model
    from moed.offload.torch_runner import TorchMoERunner

    class Int8ActRunner(TorchMoERunner):
        def run(self, layer, hidden, topk_ids, topk_weights):
            w = self.weights[layer]
            K, N = self.cfg.hidden_size, self.cfg.moe_intermediate_size
            kw = self.int4.moe_kwargs(w)
            return fused_moe_reference(
                hidden, w["w13"], w["w2"], topk_ids, topk_weights, self.expert_to_slot, **kw,
                int8_steps=(min(128, K), min(128, N)),
            )  # fmt: skip

    cfg = GlmMoeDsaConfig.from_file(ckpt / "config.json")
    attn = ReferenceAttention(cfg)
    n_chunk, n_ctx = tokens.shape
    first = n_ctx // 2
    out: dict[str, list] = {}
    for name in variants:
        xd = "checkpoint" if name == "ref" else "int4"
        runner = (Int8ActRunner if name == "int4_a8" else TorchMoERunner)(cfg, torch.float32, expert_dtype=xd)
        model = load_model(ckpt, runner, dtype=torch.float32, mtp=False, config=cfg, expert_dtype=xd)
        rows = []
        for c in range(n_chunk):
            ids = torch.from_numpy(tokens[c].astype(np.int64))
            if add_bos:  # llama-perplexity puts BOS in each chunk's first place
                ids[0] = bos
            ctx = StepContext(positions=torch.arange(n_ctx), seqs=[SequenceStep(0, n_ctx, attn.new_sequence())])
            hidden = model(ids, ctx, attn, runner)
            rows.append(model.logits(hidden[first : n_ctx - 1]).float().numpy())
        out[name] = rows
        del model, runner  # one model in memory at a time (a GLM-width checkpoint is ~10 GB in fp32)
        gc.collect()
        print(f"  moed {name}: {n_chunk} chunks of {n_ctx}", flush=True)
    return out


MOED_NAMES = {
    "ref": "moed reference (the checkpoint's experts, fp32 math)",
    "int4": "moed int4 experts, quantised at load (exact arithmetic)",
    "int4_a8": "moed int4 experts, int8 activations (A8 tiles, CPU kernel)",
}


def run(args) -> dict:
    from moed.model.checkpoint import builtin_checkpoint
    from moed.ops.bench.llama_peer import convert_plain

    llama_dir = Path(args.llama_cpp_dir).resolve()
    bindir = Path(args.llama_bin) if args.llama_bin else llama_dir / "build" / "bin"
    for tool in ("llama-quantize", "llama-perplexity"):
        if not (bindir / tool).exists():
            raise SystemExit(f"llama_drift: {bindir / tool} not found (build it: see this module's docstring)")
    ckpt = Path(args.model) if Path(args.model).is_dir() else builtin_checkpoint(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    threads = ["-t", str(args.threads)]
    ctx = ["-c", str(args.n_ctx), "-b", str(args.n_ctx)]
    t0 = time.perf_counter()

    f32 = work / "f32.gguf"
    convert_plain(ckpt, f32, llama_dir)
    text = work / "text.txt"
    text.write_text(random_text(ckpt / "tokenizer.json", args.n_ctx * (args.chunks + 2), args.seed))
    llama_base_path = work / "llama_f32.kld"
    _run(
        [str(bindir / "llama-perplexity"), "-m", str(f32), "-f", str(text), *ctx, "--chunks", str(args.chunks),
         "--kl-divergence-base", str(llama_base_path), *threads],
        args.timeout,
    )  # fmt: skip
    llama_base = read_base(llama_base_path)
    gg = gguf_summary(f32, llama_dir)
    bos = _gguf_int(f32, llama_dir, "tokenizer.ggml.bos_token_id")
    # common_tokenize put BOS first iff the vocabulary adds one; llama-perplexity then puts it first in every chunk
    add_bos = bos is not None and int(llama_base.tokens[0, 0]) == bos
    print(
        f"[tokens] {llama_base.tokens.shape[0]} chunks of {llama_base.n_ctx} (V {llama_base.n_vocab}, "
        f"add_bos {add_bos}); F32 GGUF {gg['bytes'] / 1e6:.1f} MB",
        flush=True,
    )

    moed = moed_logits(ckpt, ["ref", "int4", "int4_a8"], llama_base.tokens, add_bos, bos or 0)
    moed_base_path = work / "moed_ref.kld"
    write_base(moed_base_path, llama_base.n_ctx, llama_base.tokens, moed["ref"])
    moed_base = read_base(moed_base_path)
    next_tok = llama_base.tokens[:, llama_base.first + 1 :].reshape(-1)

    def ours(rows: list) -> dict[str, dict]:
        x = np.concatenate(rows)
        return {
            "vs_moed": summarise(kld_stats(x, moed_base.rows.reshape(len(x), -1), next_tok, moed_base.n_vocab)),
            "vs_llama": summarise(kld_stats(x, llama_base.rows.reshape(len(x), -1), next_tok, llama_base.n_vocab)),
        }

    rows = []
    int4_bits, ckpt_format, ckpt_bits = _moed_expert_bits(ckpt)
    for name in ("ref", "int4", "int4_a8"):
        q = name != "ref"
        rows.append({"variant": MOED_NAMES[name], "expert_types": ["int4 asym g128" if q else ckpt_format],
                     "expert_bits": int4_bits if q else ckpt_bits, **ours(moed[name])})  # fmt: skip

    def llama_row(name: str, path: Path, bases=(("vs_moed", moed_base_path), ("vs_llama", llama_base_path))) -> dict:
        res = {"variant": name, **gguf_summary(path, llama_dir)}
        for key, base in bases:
            out = _run(
                [str(bindir / "llama-perplexity"), "-m", str(path), "--kl-divergence-base", str(base),
                 "--kl-divergence", *ctx, *threads],
                args.timeout,
            )  # fmt: skip
            res[key] = parse_llama_kld(out)
        return res

    rows.append(llama_row("llama.cpp F32 (unquantised)", f32, bases=(("vs_moed", moed_base_path),)))
    for name, qtype, overrides in LLAMA_VARIANTS:
        path = work / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".gguf")
        tt = [a for o in overrides for a in ("--tensor-type", o)]
        _run([str(bindir / "llama-quantize"), *tt, str(f32), str(path), qtype, str(args.threads)], args.timeout)
        rows.append(llama_row(name, path))
        print(f"  {name}: done", flush=True)
    return {
        "model": str(ckpt),
        "n_ctx": llama_base.n_ctx,
        "chunks": int(llama_base.tokens.shape[0]),
        "positions": int(next_tok.size),
        "n_vocab": llama_base.n_vocab,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def _gguf_int(path: Path, llama_dir: Path, key: str) -> int | None:
    gguf = _gguf(llama_dir)
    f = gguf.GGUFReader(str(path)).fields.get(key)
    return int(f.parts[f.data[0]][0]) if f is not None and f.data else None


def _moed_expert_bits(ckpt: Path) -> tuple[float, str, float]:
    """Bits per routed-expert weight of moed's int4 layout for this checkpoint (packed weights, scales, zero points),
    and the checkpoint's own expert format and bits."""
    from moed.model.config import GlmMoeDsaConfig
    from moed.offload.host_store import ExpertLayout

    cfg = GlmMoeDsaConfig.from_file(ckpt / "config.json")
    weights = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    own = ExpertLayout.for_config(cfg, "checkpoint")
    return 8 * ExpertLayout.for_config(cfg, "int4").expert_bytes / weights, own.format, 8 * own.expert_bytes / weights


def print_table(res: dict) -> None:
    print(
        f"\n{res['model']}: {res['chunks']} chunks of {res['n_ctx']} tokens, {res['positions']} scored positions, "
        f"V {res['n_vocab']}"
    )
    print(
        "\n| variant | routed experts | expert bits/weight | file MB | KLD vs moed ref (mean / 99%) | same top-1 | "
        "RMS Δp | KLD vs llama.cpp F32 (mean) | same top-1 |"
    )
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in res["rows"]:
        m, q = r.get("vs_moed", {}), r.get("vs_llama", {})
        size = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else ""

        def f(d, k, fmt):
            return format(d[k], fmt) if k in d else "n/a"

        print(
            f"| {r['variant']} | {', '.join(r['expert_types'])} | {r['expert_bits']:.3f} | {size} | "
            f"{f(m, 'mean_kld', '.5f')} / {f(m, 'kld_99', '.4f')} | {f(m, 'same_top_pct', '.2f')}% | "
            f"{f(m, 'rms_dp_pct', '.3f')}% | {f(q, 'mean_kld', '.5f')} | {f(q, 'same_top_pct', '.2f')}% |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moed.ops.bench.llama_drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp-dir", default=os.environ.get("LLAMA_CPP_DIR", "llama.cpp"))
    p.add_argument("--llama-bin", default=None, help="directory of llama-quantize and llama-perplexity")
    p.add_argument("--model", default="small", help="checkpoint directory, or 'small' (built in)")
    p.add_argument("--n-ctx", type=int, default=256, help="tokens a chunk (its second half is scored)")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default="llama_drift")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    res = run(args)
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
