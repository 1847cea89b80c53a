"""llama.cpp beside moed on the same machine: FP8 checkpoint -> GGUF Q8_0 or Q4_0 fast, llama-bench, per-layer figures.

    LLAMA_CPP_DIR=... python -m moed.ops.bench.llama_peer convert CKPT_DIR OUT.gguf [--qtype q4_0]
    python -m moed.ops.bench.llama_peer bench --llama-bench BIN --deep DEEP.gguf --slice SLICE.gguf --out llama.json

`convert` runs llama.cpp's own converter (its `GlmMoeDsaForCausalLM` class: tensor names, the kv_b split, the expert
stacking, the hyper-parameters and the vocabulary) over the moed-made checkpoint, with the tensor data path moved to
the GPU. The stock path dequantises FP8 and quantises Q8_0 in single-threaded numpy (minutes per GLM-5.1 MoE layer);
here each weight is read straight to the GPU, dequantised there (FP8 x block scale, fp32), passed through the
converter's `prepare_tensors` unchanged, and quantised to Q8_0 there with ggml's reference arithmetic (per 32 values
d = amax / 127 as fp16, q = round-half-away(x / d)); or, with `--qtype q4_0`, to the mix `llama-quantize ... Q4_0`
makes (`q4_0_tensor`: every weight matrix but output.weight at Q4_0, `q4_0_bytes`), which llama.cpp's converter
cannot write and the GPU machine has no llama-quantize to make. Two passes over the same code: the first with meta
tensors (shapes and types only) lays out the file's header, the second streams the data in the same order, so no more
than one layer's tensors are ever held. The locally trained tokenizer has no registered pre-tokenizer hash: "glm4"
(what GLM's real one maps to) is used, as the project's earlier runs did.

`bench` runs llama-bench (`-o json`) on the full-depth GGUF (all on the GPU, and routed experts on the CPU with
`-ot exps=CPU`: decode only by default, the direct whole-model figure) and on the 256-expert slice (1 dense + 2 MoE
layers: all on the GPU, experts on the CPU; `--n-cpu-moe 1` on request), batch-1 decode and prefill, each run saved as
it ends, and derives the same per-layer figures as moed's bench (`model_projection.llama_per_layer`): whole model =
full-depth all-GPU step + 75 x (CPU-expert layer - GPU-expert layer), with the slice's difference; (b) keeps as many
layers' experts on the GPU as the GPU's memory allows beside llama.cpp's own non-expert weights and KV
(`--n-cpu-moe 75 - that`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, get_args

import numpy as np

log = logging.getLogger("bench.llama_peer")
Q8_BLOCK, Q8_BYTES = 32, 34
Q4_BLOCK, Q4_BYTES = 32, 18
QType = Literal["q8_0", "q4_0"]
QTYPES: tuple[QType, ...] = get_args(QType)
# what llama-quantize never quantises that a GLM-DSA file could hold (src/llama-quant.cpp), and indexer.proj
Q4_0_KEPT = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "indexer.proj.weight",
)


def q8_0_bytes(x, device: str):
    """ggml block_q8_0 of a float tensor [..., n] (n % 32 == 0): per block fp16 d then 32 int8; as uint8 numpy."""
    import torch

    rows = x.reshape(-1, Q8_BLOCK)
    out = torch.empty((rows.shape[0], Q8_BYTES), dtype=torch.uint8)
    # a tensor divisor: CUDA turns division by a Python number into a multiply by its reciprocal (not bit-exact)
    by127 = torch.full((), 127.0, device=device)
    step = 1 << 24
    for s in range(0, rows.shape[0], step):
        v = rows[s : s + step].to(device=device, dtype=torch.float32)
        d = v.abs().amax(dim=1, keepdim=True) / by127
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = v * inv
        q = (torch.sign(q) * torch.floor(q.abs() + 0.5)).to(torch.int8)
        out[s : s + step] = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1).cpu()
    return out.numpy().reshape(*x.shape[:-1], x.shape[-1] // Q8_BLOCK * Q8_BYTES)


def q4_0_bytes(x, device: str):
    """ggml block_q4_0 of a float tensor [..., n] (n % 32 == 0), as uint8 numpy [..., n / 32 * 18].

    Per block of 32: fp16 d = (the value of largest magnitude, sign kept; the first such) / -8, then 16 bytes whose
    low nibbles hold q[0:16] and high nibbles q[16:32], q = min(15, trunc(x / d + 8.5)) (0 for every value when d is 0:
    all 8s); x = d * (q - 8). gguf-py's reference arithmetic (gguf/quants.py Q4_0) step for step in fp32."""
    import torch

    rows = x.reshape(-1, Q4_BLOCK)
    out = torch.empty((rows.shape[0], Q4_BYTES), dtype=torch.uint8)
    step = 1 << 24
    for s in range(0, rows.shape[0], step):
        v = rows[s : s + step].to(device=device, dtype=torch.float32)
        signed_max = v.gather(1, v.abs().argmax(dim=1, keepdim=True))  # argmax: first of equal magnitudes
        d = signed_max / -8  # exact in fp32 however computed (a power of two)
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc(v * inv + 8.5).clamp_(0, 15).to(torch.uint8)
        packed = q[:, : Q4_BLOCK // 2] | (q[:, Q4_BLOCK // 2 :] << 4)
        out[s : s + step] = torch.cat([d.to(torch.float16).view(torch.uint8), packed], dim=1).cpu()
    return out.numpy().reshape(*x.shape[:-1], x.shape[-1] // Q4_BLOCK * Q4_BYTES)


class _Dev:
    """What `Tensor.numpy()` returns for a device or meta tensor inside the converter: shape and dtype as numpy would
    report them, the data left where it is until it is quantised."""

    def __init__(self, t) -> None:
        self.t = t
        self.shape = tuple(t.shape)
        self.dtype = np.dtype(np.float32 if t.dtype.is_floating_point else np.int32)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize


def q4_0_tensor(gguf_name: str, n_dims: int) -> bool:
    """Whether `llama-quantize ... Q4_0` (src/llama-quant.cpp, no imatrix) writes this GLM-DSA GGUF tensor as Q4_0.

    It quantises every 2-D/3-D tensor named *weight except norms, the router (ffn_gate_inp) and a list of other
    architectures' small tensors (none of them in GLM-DSA; the MiniMax indexer names kept for safety), and its Q4_0 mix
    bumps no GLM-DSA tensor but output.weight (to Q6_K; GLM-5.1's embeddings are not tied, so token_embd stays Q4_0).
    So: routed experts, shared expert, dense FFN, attention (q_a, q_b, kv_a_mqa, k_b, v_b, output), the DSA indexer's
    attn_k and attn_q_b, and token_embd. indexer.proj (hidden x 32 heads) stays F32 as the converter writes it ("DSA
    indexer weights should be F32"): llama-quantize would make it Q4_0, but 0.8 MB a layer moves no timing, and F32 is
    the layout llama.cpp's own converter vouches for."""
    return (
        n_dims >= 2
        and gguf_name.endswith("weight")
        and gguf_name != "output.weight"
        and not any(k in gguf_name for k in Q4_0_KEPT)
    )


def import_converter(llama_dir: Path, ckpt: Path):
    """(gguf, conversion.base, the converter's model class for `ckpt`) from llama.cpp's source tree, the class set to
    leave out the MTP block (llama-bench and llama-perplexity do not use it)."""
    for sub in ("gguf-py", ""):
        if str(llama_dir / sub) not in sys.path:
            sys.path.insert(0, str(llama_dir / sub))
    import gguf
    from conversion import base, get_model_class

    model_class = get_model_class(base.ModelBase.load_hparams(ckpt, False)["architectures"][0])
    model_class.no_mtp = True
    return gguf, base, model_class


def glm4_pre_tokenizer(base):
    """Map a tokenizer without a registered pre-tokenizer hash (the locally trained one) to "glm4", what GLM's real
    one maps to; returns the original method, for the caller to put back."""
    orig_pre = base.TextModel.get_vocab_base_pre

    def pre(self, tokenizer):
        try:
            return orig_pre(self, tokenizer)
        except NotImplementedError:
            return "glm4"

    base.TextModel.get_vocab_base_pre = pre
    return orig_pre


def convert_plain(ckpt: Path, out: Path, llama_dir: Path) -> dict:
    """HF-layout checkpoint -> an F32 GGUF by llama.cpp's stock converter path (CPU, numpy): the unquantised file
    llama-quantize makes every other type from. For small checkpoints; `convert` is the fast path for GLM widths."""
    gguf, base, model_class = import_converter(llama_dir, ckpt)
    t0 = time.perf_counter()
    orig_pre = glm4_pre_tokenizer(base)
    try:
        model_class(ckpt, gguf.LlamaFileType.ALL_F32, out, eager=True).write()
    finally:
        base.TextModel.get_vocab_base_pre = orig_pre
    return {"gguf": str(out), "qtype": "f32", "bytes": out.stat().st_size, "seconds": time.perf_counter() - t0}


def convert(ckpt: Path, out: Path, llama_dir: Path, qtype: QType = "q8_0") -> dict:
    """FP8 (or bf16) HF-layout checkpoint -> GGUF through llama.cpp's converter, tensors on the GPU.

    q8_0: what `convert_hf_to_gguf.py --outtype q8_0` writes (byte for byte). q4_0: what `llama-quantize` would make
    of that file with its Q4_0 file type (`q4_0_tensor` says which tensors), except output.weight, which it makes
    Q6_K and this writes Q8_0 (gguf-py has no Q6_K quantiser: 0.45 GB more for GLM-5.1's head, which runs on the GPU
    either way). The converter has no Q4_0 file type: its Q8_0 path runs, Q4_0 chosen per tensor through its
    `tensor_force_quant` hook, and the header states MOSTLY_Q4_0 as llama-quantize's would. A row whose length is not a
    multiple of 32 falls back to F16 (the converter's fallback; llama-quantize would refuse the tensor)."""
    import torch
    from safetensors import safe_open

    gguf, base, model_class = import_converter(llama_dir, ckpt)  # gguf.quants: imported by the package

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    orig_pre = glm4_pre_tokenizer(base)
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r}: expected one of {', '.join(QTYPES)}")
    model = model_class(ckpt, gguf.LlamaFileType.MOSTLY_Q8_0, out, eager=True)
    if qtype == "q4_0":
        force_quant = model.tensor_force_quant

        def q4_force_quant(name, new_name, bid, n_dims):
            if q4_0_tensor(new_name, n_dims):
                return gguf.GGMLQuantizationType.Q4_0
            return force_quant(name, new_name, bid, n_dims)

        model.tensor_force_quant = q4_force_quant  # type: ignore[method-assign]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = json.loads((ckpt / "config.json").read_text())
    bn, bk = (cfg.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    shards = sorted(set(index.values()))

    def names():
        for shard in shards:
            with safe_open(str(ckpt / shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name.endswith("_scale_inv"):
                        continue
                    item = model_class.filter_tensors((name, None))
                    if item is not None:
                        yield shard, name, item[0]

    def meta_tensors():
        for shard, name, new in names():
            with safe_open(str(ckpt / shard), framework="pt") as f:
                shape = f.get_slice(name).get_shape()
            yield new, torch.empty(shape, dtype=torch.float32, device="meta")

    def real_tensors():
        handles: dict[str, object] = {}
        for shard, name, new in names():
            f = handles.get(shard)
            if f is None:
                handles.clear()  # one shard open at a time
                f = handles[shard] = safe_open(str(ckpt / shard), framework="pt", device=device)
            w = f.get_tensor(name)  # type: ignore[attr-defined]
            if w.dtype == torch.float8_e4m3fn:
                s = f.get_tensor(name.removesuffix(".weight") + ".weight_scale_inv").float()  # type: ignore[attr-defined]
                full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: w.shape[0], : w.shape[1]]
                w = w.float() * full
            yield new, w

    orig_numpy, orig_quantize = torch.Tensor.numpy, gguf.quants.quantize
    laid_out: list[str] = []
    written = [0, 0]
    types: dict[str, int] = {}

    def numpy(self, *a, **kw):
        return _Dev(self) if self.device.type != "cpu" else orig_numpy(self, *a, **kw)

    def quantize(data, qtype):
        if not isinstance(data, _Dev):
            return orig_quantize(data, qtype)
        Q = gguf.GGMLQuantizationType
        blocks = {Q.Q8_0: (Q8_BLOCK, Q8_BYTES, q8_0_bytes), Q.Q4_0: (Q4_BLOCK, Q4_BYTES, q4_0_bytes)}.get(qtype)
        if blocks is not None:
            block, nbytes, to_bytes = blocks
            if data.shape[-1] % block:
                raise gguf.QuantError(f"row of {data.shape[-1]} values is not a multiple of {block}")
            if data.t.device.type == "meta":
                return _Bytes((*data.shape[:-1], data.shape[-1] // block * nbytes))
            return to_bytes(data.t, device)
        dt = {Q.F32: torch.float32, Q.F16: torch.float16}.get(qtype)
        if dt is None:
            raise gguf.QuantError(f"{qtype.name} is not produced by this converter")
        if data.t.device.type == "meta":
            return _Arr(data.shape, np.float32 if dt == torch.float32 else np.float16)
        return data.t.to(dt).contiguous().cpu().numpy()

    real_writer = model.gguf_writer

    class Writer1:  # pass 1: tensor infos only; anything else goes to the real writer
        def __getattr__(self, name):
            return getattr(real_writer, name)

        def add_tensor(self, name, data, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            real_writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw_dtype)
            laid_out.append(name)
            kind = raw_dtype.name if raw_dtype is not None else str(data.dtype)
            types[kind] = types.get(kind, 0) + 1

    class Writer2(Writer1):  # pass 2: the data, in the same order
        def add_tensor(self, name, data, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            expect = laid_out[written[0]]
            if name != expect:
                raise RuntimeError(f"second pass produced {name} where the header has {expect}")
            real_writer.write_tensor_data(np.ascontiguousarray(data))
            written[0] += 1
            written[1] += data.nbytes

    torch.Tensor.numpy = numpy  # type: ignore[method-assign]
    gguf.quants.quantize = quantize
    try:
        model.get_tensors = meta_tensors  # type: ignore[method-assign]
        model.gguf_writer = Writer1()  # type: ignore[assignment]
        model._experts = None
        model.prepare_tensors()
        model.gguf_writer = real_writer
        hparams_before = json.loads(json.dumps(model.hparams))
        if qtype == "q4_0":  # general.file_type, as llama-quantize writes it
            model.ftype = gguf.LlamaFileType.MOSTLY_Q4_0
        model.prepare_metadata(vocab_only=False)  # mutates hparams (MLA -> 1 KV head), as after the stock tensor pass
        model.ftype = gguf.LlamaFileType.MOSTLY_Q8_0
        real_writer.write_header_to_file(path=out)
        real_writer.write_kv_data_to_file()
        real_writer.write_ti_data_to_file()
        log.info("header of %s laid out: %d tensors (%.1f s)", out.name, len(laid_out), time.perf_counter() - t0)
        model.hparams = hparams_before  # the tensor pass must see what the stock converter's saw
        model.get_tensors = real_tensors  # type: ignore[method-assign]
        model.gguf_writer = Writer2()  # type: ignore[assignment]
        model.prepare_tensors()
    finally:
        torch.Tensor.numpy = orig_numpy  # type: ignore[method-assign]
        gguf.quants.quantize = orig_quantize
        model.gguf_writer = real_writer
        base.TextModel.get_vocab_base_pre = orig_pre
    real_writer.close()
    if written[0] != len(laid_out):
        raise RuntimeError(f"{out}: {written[0]} of {len(laid_out)} tensors written")
    dt = time.perf_counter() - t0
    res = {
        "gguf": str(out),
        "qtype": qtype,
        "tensors": written[0],
        "tensor_types": types,
        "bytes": out.stat().st_size,
        "seconds": dt,
        "GBps": out.stat().st_size / dt / 1e9,
    }
    log.info("converted %s -> %s: %s", ckpt, out, res)
    return res


class _Bytes:
    def __init__(self, shape) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(np.uint8)
        self.nbytes = int(np.prod(self.shape))


class _Arr:
    def __init__(self, shape, dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------- llama-bench


def run_llama_bench(
    binary: str, gguf_path: str, extra: list[str], prompts: list[int], gen: int, reps: int, threads: int, timeout: float
) -> list[dict]:
    """One llama-bench invocation (-o json); [] with the error logged when it fails."""
    cmd = [
        binary,
        "-m",
        gguf_path,
        "-ngl",
        "99",
        "-p",
        ",".join(map(str, prompts)) or "0",
        "-n",
        str(gen),
        "-r",
        str(reps),
        "-t",
        str(threads),
        "-o",
        "json",
        *extra,
    ]
    log.info("%s", " ".join(cmd))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.error("llama-bench timed out after %.0f s: %s", timeout, " ".join(cmd))
        return []
    if done.returncode != 0:
        log.error("llama-bench failed (%d): %s", done.returncode, done.stderr[-2000:])
        return []
    try:
        rows = json.loads(done.stdout)
    except json.JSONDecodeError:
        log.error("llama-bench printed no JSON: %s", done.stdout[-2000:])
        return []
    log.info("llama-bench done in %.0f s", time.perf_counter() - t0)
    return [
        {
            "n_prompt": r["n_prompt"],
            "n_gen": r["n_gen"],
            "avg_ms": r["avg_ns"] / 1e6,
            "stddev_ms": r["stddev_ns"] / 1e6,
            "tok_s": r["avg_ts"],
            "extra": extra,
        }
        for r in rows
    ]


def decode_ms(rows: list[dict]) -> float | None:
    """Per generated token: llama-bench's tg row (n_gen tokens after an empty prompt)."""
    tg = [r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0]
    return 1e3 / tg[0]["tok_s"] if tg else None


def prefill_s(rows: list[dict]) -> dict[int, float]:
    return {r["n_prompt"]: r["avg_ms"] / 1e3 for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0}


def bench(args) -> dict:
    """Run llama-bench on the GGUFs given; the runs and the files' sizes (derive() turns them into figures)."""
    runs: dict[str, list[dict]] = {}
    sizes: dict[str, int] = {}
    common = dict(gen=args.gen, reps=args.reps, threads=args.threads, timeout=args.timeout)
    variants = {"gpu": [], "cpu": ["-ot", "exps=CPU"], "ncpumoe1": ["--n-cpu-moe", "1"]}
    cpu_prompts = args.prompts if args.cpu_prompts is None else args.cpu_prompts
    kinds = (
        ("deep", args.deep, args.deep_variants),
        ("slice", args.slice, args.slice_variants),
        ("slice_q4", args.slice_q4, args.slice_variants),
    )
    for kind, path, names in kinds:
        if not path:
            continue
        sizes[f"{kind}_gguf"] = Path(path).stat().st_size
        for v in names:
            prompts = args.prompts if v == "gpu" else cpu_prompts
            runs[f"{kind}_{v}"] = run_llama_bench(args.llama_bench, path, variants[v], prompts, **common)
            if args.out:  # each run as it finishes: a pipeline cut off keeps the runs it has
                Path(args.out).write_text(
                    json.dumps(
                        {"binary": args.llama_bench, "threads": args.threads, "runs": runs, "sizes": sizes}, indent=1
                    )
                )
    return {"binary": args.llama_bench, "threads": args.threads, "runs": runs, "sizes": sizes}


def derive(
    runs: dict[str, list[dict]],
    sizes: dict[str, int],
    *,
    deep_experts: int = 8,
    slice_moe_layers: int = 2,
    gpu_bytes: int = int(79.2 * 2**30),
    kv_bytes: int = int(3.3 * 2**30),
    reserve_bytes: int = 4 << 30,
    layer_expert_bytes: int = 256 * 3 * 2048 * 6144 * Q8_BYTES // Q8_BLOCK,
    head_bytes: int = 154880 * 6144 * Q8_BYTES // Q8_BLOCK,
) -> dict:
    """llama.cpp's whole-model figures by moed's per-layer method, from recorded llama-bench runs (pure arithmetic).

    (a) experts on the CPU: full-depth all-GPU step + 75 x (CPU-experts layer - GPU-experts layer) from the slice;
    (b) as many layers' experts on the GPU as fit beside its non-expert weights (the full-depth GGUF less its
    experts), KV and buffers; the rest on the CPU (--n-cpu-moe). `whole_q4`: the same for Q4_0 from the Q4_0 slice
    (`model_projection.llama_q4_per_layer`: the full-depth step is the Q8_0 file's less what Q4_0 saves per layer on
    the slice); its non-expert bytes are the Q8_0 file's with all but output.weight (`head_bytes`, Q8_0 in both) at
    18/34 (the F32 norms and routers, ~0.5 GB, counted as if quantised)."""
    from moed.ops.bench.model_projection import MOE_LAYERS, llama_gpu_layers, llama_per_layer, llama_q4_per_layer

    dec = {k: decode_ms(v) for k, v in runs.items()}
    pre = {k: prefill_s(v) for k, v in runs.items()}
    res: dict = {"runs": runs, "sizes": sizes, "decode_ms": dec, "prefill_s": pre}
    if not dec.get("deep_gpu") or "deep_gguf" not in sizes:
        return res
    nonexpert = sizes["deep_gguf"] - MOE_LAYERS * deep_experts * layer_expert_bytes // 256
    if dec.get("slice_q4_gpu") and dec.get("slice_q4_cpu"):
        layer_q4 = layer_expert_bytes * Q4_BYTES // Q8_BYTES
        nonexpert_q4 = head_bytes + (nonexpert - head_bytes) * Q4_BYTES // Q8_BYTES
        gpu_layers_q4 = llama_gpu_layers(gpu_bytes, nonexpert_q4, kv_bytes, reserve_bytes, layer_q4)
        args_q4 = (dec["deep_gpu"], dec["slice_q4_gpu"], dec["slice_q4_cpu"], slice_moe_layers, dec.get("slice_gpu"))
        res["whole_q4"] = {
            "cpu_experts": llama_q4_per_layer(*args_q4),
            "n_cpu_moe": llama_q4_per_layer(*args_q4, gpu_layers=gpu_layers_q4),
        }
        res["whole_q4"]["n_cpu_moe"].update(gpu_layers=gpu_layers_q4, n_cpu_moe=MOE_LAYERS - gpu_layers_q4)
        res.update(nonexpert_q4_bytes_est=nonexpert_q4, layer_experts_q4_bytes=layer_q4)
    if not all(dec.get(k) for k in ("deep_cpu", "slice_gpu", "slice_cpu")):
        return res
    gpu_layers = llama_gpu_layers(gpu_bytes, nonexpert, kv_bytes, reserve_bytes, layer_expert_bytes)
    args = (dec["deep_gpu"], dec["deep_cpu"], dec["slice_gpu"], dec["slice_cpu"], slice_moe_layers)
    whole = {"cpu_experts": llama_per_layer(*args), "n_cpu_moe": llama_per_layer(*args, gpu_layers=gpu_layers)}
    whole["n_cpu_moe"].update(gpu_layers=gpu_layers, n_cpu_moe=MOE_LAYERS - gpu_layers)
    res.update(whole=whole, nonexpert_q8_bytes=nonexpert, layer_experts_q8_bytes=layer_expert_bytes)
    ttft = {}
    for n in sorted(set(pre.get("deep_gpu", {})) & set(pre.get("slice_gpu", {})) & set(pre.get("slice_cpu", {}))):
        extra = (pre["slice_cpu"][n] - pre["slice_gpu"][n]) / slice_moe_layers
        ttft[n] = {
            "cpu_experts": pre["deep_gpu"][n] + MOE_LAYERS * extra,
            "n_cpu_moe": pre["deep_gpu"][n] + (MOE_LAYERS - gpu_layers) * extra,
            "deep_direct_cpu": pre.get("deep_cpu", {}).get(n),
        }
    res["ttft_s"] = ttft
    return res


def print_summary(res: dict) -> None:
    print("\n== llama.cpp on this machine ==")
    for k, v in (res.get("decode_ms") or {k: decode_ms(v) for k, v in res["runs"].items()}).items():
        print(
            f"  {k:16s} decode {v if v is None else round(v, 2)} ms/token, prefill "
            f"{ {n: round(s, 3) for n, s in prefill_s(res['runs'].get(k, [])).items()} } s"
        )
    for k, w in (res.get("whole") or {}).items():
        print(
            f"  whole model ({k}): {w['whole_ms']:.1f} ms/token ({1e3 / w['whole_ms']:.2f} tok/s); CPU experts cost "
            f"{w['cpu_extra_per_layer_ms']:.2f} ms per MoE layer over the GPU; full-depth GGUF with its experts on "
            f"the CPU measured directly: {w['deep_direct_cpu_ms']:.1f} ms/token"
        )
    for k, w in (res.get("whole_q4") or {}).items():
        saved = w["gpu_saved_per_layer_ms"]
        print(
            f"  whole model at Q4_0 ({k}): {w['whole_ms']:.1f} ms/token ({1e3 / w['whole_ms']:.2f} tok/s); CPU experts "
            f"cost {w['cpu_extra_per_layer_ms']:.2f} ms per MoE layer over the GPU; full-depth all-GPU step "
            f"{w['deep_gpu_ms']:.1f} ms (the Q8_0 file's, "
            + ("no Q8_0 slice to take Q4_0's saving from)" if saved is None else f"less 78 x {saved:.3f} ms)")
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("--llama-cpp-dir", default=os.environ.get("LLAMA_CPP_DIR", "llama.cpp"))
    c.add_argument("--qtype", choices=QTYPES, default="q8_0", help="q4_0: llama-quantize's Q4_0 mix (see convert)")
    b = sub.add_parser("bench")
    b.add_argument("--llama-bench", required=True)
    b.add_argument("--deep", default=None, help="full-depth GGUF (the glm51 preset, few experts per layer)")
    b.add_argument("--deep-experts", type=int, default=8, help="routed experts per layer of the full-depth GGUF")
    b.add_argument("--slice", default=None, help="1 dense + 2 MoE layers, 256 experts each")
    b.add_argument("--slice-q4", default=None, help="the same slice as a Q4_0 GGUF (convert --qtype q4_0)")
    b.add_argument("--slice-moe-layers", type=int, default=2)
    b.add_argument(
        "--prompts",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1024, 8192],
        help="prompt lengths of the all-GPU runs (empty: decode only)",
    )
    b.add_argument(
        "--cpu-prompts",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=None,
        help="prompt lengths of the runs with experts on the CPU (default: --prompts)",
    )
    b.add_argument("--deep-variants", type=lambda s: s.split(","), default=["gpu", "cpu"])
    b.add_argument(
        "--slice-variants",
        type=lambda s: s.split(","),
        default=["gpu", "cpu"],
        help="gpu, cpu (-ot exps=CPU), ncpumoe1 (--n-cpu-moe 1)",
    )
    b.add_argument("--gen", type=int, default=16)
    b.add_argument("--reps", type=int, default=2)
    b.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    b.add_argument("--timeout", type=float, default=300)
    b.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="bench JSONs -> llama.json with the whole-model figures")
    m.add_argument("parts", nargs="+")
    m.add_argument("--gpu-gib", type=float, default=79.2)
    m.add_argument("--kv-gib", type=float, default=3.3, help="KV for the same context moed's deployment plans for")
    m.add_argument("--reserve-gib", type=float, default=4.0)
    m.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "convert":
        print(json.dumps(convert(Path(args.ckpt), Path(args.out), Path(args.llama_cpp_dir), args.qtype)))
        return 0
    if args.cmd == "bench":
        res = bench(args)
    else:
        runs, sizes = {}, {}
        for part in args.parts:
            if Path(part).exists():
                d = json.loads(Path(part).read_text())
                runs.update(d.get("runs", {}))
                sizes.update(d.get("sizes", {}))
        res = derive(
            runs,
            sizes,
            gpu_bytes=int(args.gpu_gib * 2**30),
            kv_bytes=int(args.kv_gib * 2**30),
            reserve_bytes=int(args.reserve_gib * 2**30),
        )
    Path(args.out).write_text(json.dumps(res, indent=1))
    print_summary(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
