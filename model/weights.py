"""Reading HF-layout checkpoints: `model.safetensors.index.json` + shards, memory-mapped.

`Checkpoint` validates the index and every shard's header up front (a missing or truncated shard
fails before any weight is read, naming the file), then serves tensors one at a time from the
memory map. `load_model` builds the network with each tensor's shape checked against the config,
dequantises FP8 block-quantised and int4 pack-quantized non-expert weights for the torch path, and hands
routed experts to the MoE runner one (layer, expert) at a time, as stored (FP8 stays FP8, compressed-tensors
pack-quantized int4 stays int4: its packed words are `moed.formats.int4`'s bytes), so no layer of experts is
ever staged anywhere but where the runner puts it. With `expert_dtype="int4"`, bf16 and FP8 experts are
quantised to int4 as they are read (on the GPU when there is one), optionally through a cache directory of
pack-quantized layer files (`moed.model.int4_cache`) that later starts read instead.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from moed.formats import int4
from moed.formats.fp8 import dequantize_block_fp8, scale_shape
from moed.model.config import EXPERT_DTYPES, ExpertDtype, GlmMoeDsaConfig
from moed.model.glm import Fp8Linear, GlmMoeDsaForCausalLM
from moed.model.int4_cache import Int4Cache
from moed.model.moe import ExpertWeights, MoERunner

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FP32_PARAMS = ("indexer.weights_proj.weight", "mlp.gate.e_score_correction_bias")
# compressed-tensors pack-quantized tensors of one weight `<base>.weight`, by suffix of `<base>.`.
PACKED = "weight_packed"
PACKED_PARTS = (PACKED, "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and file."""


class Checkpoint:
    """Name -> shard map of a safetensors checkpoint directory, with headers validated."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        index_path = self.dir / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
        elif (self.dir / SINGLE_FILE).exists():
            weight_map = {name: SINGLE_FILE for name in _read_header(self.dir / SINGLE_FILE)}
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.weight_map: dict[str, str] = weight_map
        self.headers: dict[str, dict] = {}
        for shard in sorted(set(weight_map.values())):
            path = self.dir / shard
            if not path.exists():
                names = [n for n, s in weight_map.items() if s == shard]
                raise CheckpointError(
                    f"{path}: shard listed in {INDEX_FILE} (for {names[0]} and {len(names) - 1} more) is missing"
                )
            self.headers[shard] = _read_header(path)
        for name, shard in weight_map.items():
            if name not in self.headers[shard]:
                raise CheckpointError(f"{self.dir / shard}: tensor {name} listed in {INDEX_FILE} is not in the shard")
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    def is_fp8(self, name: str) -> bool:
        """Stored as float8_e4m3fn (the safetensors header's dtype F8_E4M3), read from the header alone."""
        return self.headers[self.weight_map[name]][name]["dtype"] == "F8_E4M3"

    def nbytes(self, name: str) -> int:
        begin, end = self.headers[self.weight_map[name]][name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        shard = self.weight_map[name]
        handle = self._open.get(shard)
        if handle is None:
            handle = self._open[shard] = safe_open(str(self.dir / shard), framework="pt")
        try:
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:  # safetensors raises its own types; name the tensor and file
            raise CheckpointError(f"{self.dir / shard}: cannot read tensor {name}: {e}") from None

    def close(self) -> None:
        self._open.clear()


def _read_header(path: Path) -> dict[str, dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated shard ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated shard (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated shard: tensors need {8 + n + end} bytes, file has {size}")
    return header


class LoadProgress:
    """Bytes and rate: a tqdm bar on a terminal, a log line every few seconds otherwise."""

    def __init__(self, total_bytes: int, what: str) -> None:
        self.total, self.done, self.what = total_bytes, 0, what
        self.t0 = self._last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self._last >= 5.0 or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s: %s / %s (%s/s)", self.what, _fmt_bytes(self.done), _fmt_bytes(self.total), _fmt_bytes(rate))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        dt = time.monotonic() - self.t0
        log.info("%s: %s in %.1f s (%s/s)", self.what, _fmt_bytes(self.done), dt, _fmt_bytes(self.done / max(dt, 1e-9)))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def expert_names(layer: int, expert: int) -> dict[str, str]:
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return {proj: f"{p}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}


def moe_layers(cfg: GlmMoeDsaConfig, mtp: bool) -> list[int]:
    main = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    return main + (cfg.mtp_layer_ids if mtp else [])


def stored_names(ckpt: Checkpoint, name: str) -> list[str]:
    """The tensors that hold weight `name` in this checkpoint: itself (+ FP8 scales), or its pack-quantized parts."""
    base = name.removesuffix(".weight")
    if name not in ckpt and f"{base}.{PACKED}" in ckpt:
        return [f"{base}.{part}" for part in PACKED_PARTS if f"{base}.{part}" in ckpt]
    return [n for n in (name, f"{base}.weight_scale_inv") if n in ckpt]


def load_model(
    directory: str | Path,
    runner: MoERunner,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    mtp: bool = True,
    config: GlmMoeDsaConfig | None = None,
    expert_dtype: ExpertDtype = "checkpoint",
    int4_cache_dir: str | Path | None = None,
    fp8_projections: bool = False,
) -> GlmMoeDsaForCausalLM:
    """Build the network from a checkpoint directory; routed experts go to `runner`.

    fp8_projections: the checkpoint's FP8 projections stay FP8 (`Fp8Linear`, half the bytes of bf16) instead of being
    dequantised into `dtype`; kv_b_proj, whose weight the attention backend reads as a matrix, is dequantised still.

    expert_dtype "int4" quantises bf16 / FP8 routed experts to moed's int4 format as they are read (int4 ones stay
    as they are); int4_cache_dir (optional, with "int4") keeps the result for the next start."""
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert_dtype must be one of {list(EXPERT_DTYPES)}, got {expert_dtype!r}")
    if int4_cache_dir is not None and expert_dtype != "int4":
        raise ValueError("int4_cache_dir is only used with expert_dtype 'int4'")
    cfg = config or GlmMoeDsaConfig.from_file(Path(directory) / "config.json")
    ckpt = Checkpoint(directory)
    if not mtp and cfg.num_nextn_predict_layers:
        # A config without MTP layers: the network is built without them.
        from dataclasses import replace

        cfg = replace(cfg, num_nextn_predict_layers=0)
    model = GlmMoeDsaForCausalLM(cfg)
    for layer in cfg.mtp_layer_ids:
        mtp_layer = model.model.layers[layer]
        if f"model.layers.{layer}.embed_tokens.weight" in ckpt:
            mtp_layer.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        if f"model.layers.{layer}.shared_head.head.weight" in ckpt:
            mtp_layer.shared_head.head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")

    params = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight")
    expert_layers = moe_layers(cfg, mtp)

    def nbytes(name: str) -> int:
        return sum(ckpt.nbytes(n) for n in stored_names(ckpt, name))

    total = sum(nbytes(n) for n in params)
    total += sum(
        nbytes(t)
        for layer in expert_layers
        for e in range(cfg.n_routed_experts)
        for t in expert_names(layer, e).values()
    )
    quantise = expert_dtype == "int4"
    cache = Int4Cache(int4_cache_dir, ckpt.dir, cfg) if quantise and int4_cache_dir is not None else None
    qdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    what = f"loading {Path(directory).name}" + (f" (routed experts to int4 on {qdev.type})" if quantise else "")
    progress = LoadProgress(total, what)
    try:
        for name, p in params.items():
            if fp8_projections and _keeps_fp8(model, ckpt, name):
                _set_fp8_linear(model, ckpt, name, tuple(p.shape), cfg, device)
                progress.advance(nbytes(name))
                continue
            value = _read_weight(ckpt, name, tuple(p.shape), cfg, device=device)
            keep_fp32 = name.endswith(_FP32_PARAMS)
            value = value.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
            _set_param(model, name, value)
            progress.advance(nbytes(name))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for layer in expert_layers:
            cached = cache.read_layer(layer) if cache is not None else None
            for e in range(cfg.n_routed_experts):
                if cached is not None:
                    weights = cached[e]
                    n = sum(nbytes(t) for t in expert_names(layer, e).values())
                else:
                    weights, n = read_expert(ckpt, cfg, layer, e)
                    if quantise and not weights.is_int4:
                        weights = quantize_expert(weights, cfg, qdev)
                    if cache is not None:
                        cache.add(layer, e, weights)
                runner.load_expert(layer, e, weights)
                progress.advance(n)
            if cache is not None and cached is None:
                cache.write_layer(layer)
        runner.finish_loading()
    finally:
        progress.close()
        ckpt.close()
    model.inv_freq = model.inv_freq.to(device)
    return model.eval()


def quantize_expert(weights: ExpertWeights, cfg: GlmMoeDsaConfig, device: torch.device) -> ExpertWeights:
    """A bf16 or FP8 expert -> moed's int4 format (asymmetric, group 128, each group's range fitted by the clip
    search: `moed.formats.int4`), quantised on `device`, returned on CPU."""
    q = cfg.quantization
    block = (q.block_n, q.block_k) if q is not None else None
    parts = []
    for w, s in (
        (weights.gate_proj, weights.gate_scale_inv),
        (weights.up_proj, weights.up_scale_inv),
        (weights.down_proj, weights.down_scale_inv),
    ):
        w = w.to(device)
        full = dequantize_block_fp8(w, s.to(device), *block) if w.dtype == torch.float8_e4m3fn else w.float()
        qw = int4.quantize_int4(full, clip_search=True)
        parts.append(qw._replace(qweight=qw.qweight.cpu(), scales=qw.scales.cpu(), zeros=qw.zeros.cpu()))
    return ExpertWeights.from_int4(*parts)


def _read_int4(ckpt: Checkpoint, name: str, expected: tuple[int, int], cfg: GlmMoeDsaConfig) -> int4.Int4Weight:
    """One pack-quantized weight (`<base>.weight_packed` and friends) as an Int4Weight, every part checked."""
    base = name.removesuffix(".weight")
    pq = cfg.pack_quantization
    if pq is None:
        raise CheckpointError(
            f"{ckpt.file_of(base + '.' + PACKED)}: tensor {base}.{PACKED} is pack-quantized but "
            "config.json has no compressed-tensors quantization_config"
        )
    for part in ("weight_scale", "weight_shape"):
        if f"{base}.{part}" not in ckpt:
            raise CheckpointError(f"{ckpt.dir}: tensor {base}.{part} is missing (needed by {base}.{PACKED})")
    shape = tuple(int(v) for v in ckpt.get(f"{base}.weight_shape").tolist())
    if shape != expected:
        raise CheckpointError(
            f"{ckpt.file_of(base + '.weight_shape')}: {base}.weight_shape is {list(shape)}, expected {list(expected)}"
        )
    g_idx = f"{base}.weight_g_idx"
    if g_idx in ckpt:  # activation order that keeps groups contiguous is harmless; permuted groups are not
        want = torch.arange(expected[1]) // pq.group_size
        if not torch.equal(ckpt.get(g_idx).long(), want):
            raise CheckpointError(
                f"{ckpt.file_of(g_idx)}: {g_idx} permutes the quantisation groups "
                "(actorder 'group'), which moed does not support"
            )
    zp = f"{base}.weight_zero_point"
    try:
        return int4.from_pack_quantized(
            ckpt.get(f"{base}.{PACKED}"),
            ckpt.get(f"{base}.weight_scale"),
            shape,
            ckpt.get(zp) if zp in ckpt else None,
            pq.group_size,
        )
    except ValueError as e:
        raise CheckpointError(f"{ckpt.file_of(base + '.' + PACKED)}: {base}: {e}") from None


def _read_weight(
    ckpt: Checkpoint,
    name: str,
    expected: tuple[int, ...],
    cfg: GlmMoeDsaConfig,
    dequantize: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The tensor as stored; FP8 dequantised (on `device` when given: FP8 bytes cross to the GPU, not fp32)."""
    base = name.removesuffix(".weight")
    if name not in ckpt and f"{base}.{PACKED}" in ckpt and len(expected) == 2:
        return int4.dequantize_int4(_read_int4(ckpt, name, expected, cfg))  # type: ignore[arg-type]
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.dir}: tensor {name} is missing (expected shape {list(expected)})")
    shape = ckpt.shape(name)
    if shape != expected:
        raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name} has shape {list(shape)}, expected {list(expected)}")
    t = ckpt.get(name)
    if t.dtype != torch.float8_e4m3fn:
        return t
    if cfg.quantization is None:
        raise CheckpointError(
            f"{ckpt.file_of(name)}: tensor {name} is float8_e4m3fn but config.json has no quantization_config"
        )
    bn, bk = cfg.quantization.block_n, cfg.quantization.block_k
    sname = name.removesuffix(".weight") + ".weight_scale_inv"
    sexp = scale_shape(*expected, bn, bk)
    if sname not in ckpt:
        raise CheckpointError(f"{ckpt.dir}: tensor {sname} is missing (FP8 weight {name} needs shape {list(sexp)})")
    if ckpt.shape(sname) != sexp:
        raise CheckpointError(
            f"{ckpt.file_of(sname)}: tensor {sname} has shape {list(ckpt.shape(sname))}, expected {list(sexp)}"
        )
    scale = ckpt.get(sname)
    if not dequantize:
        return t
    if device is not None:
        t, scale = t.to(device), scale.to(device)
    return dequantize_block_fp8(t, scale, bn, bk)


def read_expert(ckpt: Checkpoint, cfg: GlmMoeDsaConfig, layer: int, expert: int) -> tuple[ExpertWeights, int]:
    """One routed expert as stored (FP8 with scales, bf16, or int4 pack-quantized), shapes checked; and its bytes."""
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    names = expert_names(layer, expert)
    if names["gate_proj"] not in ckpt and names["gate_proj"].removesuffix(".weight") + f".{PACKED}" in ckpt:
        q = [_read_int4(ckpt, name, shapes[proj], cfg) for proj, name in names.items()]
        if any(w.zeros is not None for w in q):  # symmetric = zero point 0: spelled out where an expert mixes both
            q = [w.with_zero_points() for w in q]
        return ExpertWeights.from_int4(*q), sum(
            ckpt.nbytes(n) for name in names.values() for n in stored_names(ckpt, name)
        )
    parts: dict[str, torch.Tensor | None] = {}
    nbytes = 0
    for proj, name in names.items():
        w = _read_weight(ckpt, name, shapes[proj], cfg, dequantize=False)
        parts[proj] = w
        nbytes += ckpt.nbytes(name)
        sname = name.removesuffix(".weight") + ".weight_scale_inv"
        if w.dtype == torch.float8_e4m3fn:
            parts[proj.removesuffix("_proj") + "_scale_inv"] = ckpt.get(sname).float()
            nbytes += ckpt.nbytes(sname)
    return ExpertWeights(**parts), nbytes  # type: ignore[arg-type]


def _keeps_fp8(model: torch.nn.Module, ckpt: Checkpoint, name: str) -> bool:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    return (
        attr == "weight"
        and isinstance(mod, torch.nn.Linear)
        and mod.bias is None
        and not mod_name.endswith("kv_b_proj")
        and name in ckpt
        and ckpt.is_fp8(name)
    )


def _set_fp8_linear(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    name: str,
    shape: tuple[int, ...],
    cfg: GlmMoeDsaConfig,
    device: torch.device | str,
) -> None:
    weight = _read_weight(ckpt, name, shape, cfg, dequantize=False)  # checks the weight and its scales
    scale = ckpt.get(name.removesuffix(".weight") + ".weight_scale_inv").float()
    q = cfg.quantization
    assert q is not None  # _read_weight refuses FP8 without a quantization_config
    mod_name, _, _ = name.rpartition(".")
    parent_name, _, child = mod_name.rpartition(".")
    setattr(
        model.get_submodule(parent_name), child, Fp8Linear(weight.to(device), scale.to(device), (q.block_n, q.block_k))
    )


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))
