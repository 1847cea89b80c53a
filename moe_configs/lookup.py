"""Tuned fused-MoE tile configs: file names, lookup with fallbacks, nearest-batch choice and defaults.

Files are JSON objects from batch size M (tokens before top-k, as a string) to
`{"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}`, optionally moed's
`"A_QUANT_IN_GEMM"` (bool); other keys such as sglang's "USE_TMA" are ignored and a top-level "triton_version"
key is dropped. Names follow sglang and vLLM:
  sglang `triton_{X}_{Y}_{Z}/E={E},N={N},device_name={dev}[,dtype={dtype}][,block_shape=[128, 128]][_down].json`
  vLLM   `E={E},N={N},device_name={dev}[,dtype={dtype}][,block_shape=[128,128]].json` in a flat folder.
E is the number of expert ids (257 = 256 routed + a fused shared expert), N the per-shard intermediate size
(`w2.shape[2]`; for int4 the unpacked size, twice the packed `w2.shape[2]`), dev `torch.cuda.get_device_name()` with
spaces as `_`, dtype "fp8_w8a8", "int4_w4a16" (4-bit groups of 128, named without block_shape as vLLM and sglang
name theirs) or none for bf16.
An optional `_down.json` is the down GEMM's table; its BLOCK_SIZE_M is overridden by the up table's.

Search order in each root (`$MOED_MOE_CONFIG_DIR` first when set, then this package's folder): the installed
Triton's folder, the other `triton_*` folders newest first, then the flat vLLM layout. Anything but the
installed version's file, and the built-in defaults, log one warning naming the file that was missing.
No torch import: device name and Triton version are arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("moed.moe_configs")

PACKAGE_DIR = Path(__file__).resolve().parent
ENV_DIR = "MOED_MOE_CONFIG_DIR"
KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
# moed's own: FP8 activations quantised inside the GEMM (else a separate pass); int4 routes computed GEMV_ROWS at a
# time on the CUDA cores (0 or absent: tensor-core tiles), their K steps shared by SPLIT_K programs (absent: 1); int4
# tensor-core tiles that unpack nibbles through bf16 bits (UNPACK_BF16) instead of int-to-float conversions; int4
# CUDA-core tiles that read 32-bit words of eight nibbles (GEMV_WORDS); int4 tensor-core tiles on int8 activations and
# the int8 MMA (A8)
OPTIONAL_KEYS = ("A_QUANT_IN_GEMM", "GEMV_ROWS", "SPLIT_K", "UNPACK_BF16", "GEMV_WORDS", "A8", "PAIRS")
# The batch sizes sglang and vLLM tune, plus 8192 for long prefill chunks.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192)


class ConfigFileError(ValueError):
    pass


def triton_dir_name(version: str) -> str:
    """'3.6.0' (or '3.6.0+gitabc') -> 'triton_3_6_0'."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        raise ConfigFileError(f"Triton version {version!r} is not of the form X.Y.Z")
    return "triton_{}_{}_{}".format(*m.groups())


def file_name(
    E: int,
    N: int,
    device_name: str,
    dtype: str | None,
    block_shape: list[int] | tuple[int, ...] | None,
    *,
    down: bool = False,
    vllm: bool = False,
) -> str:
    """The config file name sglang (default) or vLLM (`vllm=True`, no `_down`) would look for."""
    dev = device_name.replace(" ", "_")
    name = f"E={E},N={N},device_name={dev}"
    if dtype:
        name += f",dtype={dtype}"
    if block_shape:
        shape = str(list(block_shape))
        name += f",block_shape={shape.replace(' ', '') if vllm else shape}"
    return name + ("_down.json" if down and not vllm else ".json")


def _device_aliases(device_name: str) -> list[str]:
    dev = device_name.replace(" ", "_")
    # vLLM files name every H200 variant NVIDIA_H200.
    return [dev] + (["NVIDIA_H200"] if "H200" in dev.split("_") and dev != "NVIDIA_H200" else [])


def _version_key(dirname: str) -> tuple[int, ...]:
    return tuple(int(p) for p in dirname.split("_")[1:] if p.isdigit())


def load_table(path: Path) -> dict[int, dict]:
    """Read and validate one JSON table -> {M: config}; errors name the file and the entry."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigFileError(f"MoE config {path}: cannot read JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigFileError(f"MoE config {path}: top level must be an object from batch size to config")
    raw.pop("triton_version", None)
    table: dict[int, dict] = {}
    for key, cfg in raw.items():
        try:
            m = int(key)
        except ValueError:
            raise ConfigFileError(f"MoE config {path}: key {key!r} is not a batch size") from None
        if m < 1 or not isinstance(cfg, dict):
            raise ConfigFileError(f"MoE config {path}: entry {key!r} must map a batch size >= 1 to an object")
        missing = [k for k in KEYS if k not in cfg]
        if missing:
            raise ConfigFileError(f"MoE config {path}: entry {key!r} lacks {missing}")
        for k in KEYS:
            v = cfg[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigFileError(f"MoE config {path}: entry {key!r} has {k}={v!r}; want a positive int")
        if not isinstance(cfg.get("A_QUANT_IN_GEMM", False), bool):
            raise ConfigFileError(
                f"MoE config {path}: entry {key!r} has A_QUANT_IN_GEMM={cfg['A_QUANT_IN_GEMM']!r}; want true or false"
            )
        rows = cfg.get("GEMV_ROWS", 0)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0 or rows & (rows - 1):
            raise ConfigFileError(f"MoE config {path}: entry {key!r} has GEMV_ROWS={rows!r}; want 0 or a power of two")
        split = cfg.get("SPLIT_K", 1)
        if not isinstance(split, int) or isinstance(split, bool) or split < 1 or split & (split - 1):
            raise ConfigFileError(f"MoE config {path}: entry {key!r} has SPLIT_K={split!r}; want a power of two >= 1")
        if split > 1 and not (rows or cfg.get("A8")):
            raise ConfigFileError(f"MoE config {path}: entry {key!r} has SPLIT_K={split} without GEMV_ROWS or A8")
        unpack = cfg.get("UNPACK_BF16", False)
        if not isinstance(unpack, bool) or (unpack and rows):
            raise ConfigFileError(
                f"MoE config {path}: entry {key!r} has UNPACK_BF16={unpack!r}; want true or false, and false with "
                "GEMV_ROWS"
            )
        words = cfg.get("GEMV_WORDS", False)
        if not isinstance(words, bool) or (words and not rows):
            raise ConfigFileError(
                f"MoE config {path}: entry {key!r} has GEMV_WORDS={words!r}; want true or false, and false without "
                "GEMV_ROWS"
            )
        a8 = cfg.get("A8", False)
        if not isinstance(a8, bool) or (a8 and (rows or unpack)):
            raise ConfigFileError(
                f"MoE config {path}: entry {key!r} has A8={a8!r}; want true or false, and false with GEMV_ROWS or "
                "UNPACK_BF16"
            )
        pairs = cfg.get("PAIRS", False)
        if not isinstance(pairs, bool) or (pairs and not a8):
            raise ConfigFileError(
                f"MoE config {path}: entry {key!r} has PAIRS={pairs!r}; want true or false, and false without A8"
            )
        table[m] = {k: cfg[k] for k in (*KEYS, *OPTIONAL_KEYS) if k in cfg}
    if not table:
        raise ConfigFileError(f"MoE config {path}: no entries")
    return dict(sorted(table.items()))


def nearest(table: dict[int, dict], M: int) -> dict:
    """Entry of the batch size closest to M (ties to the smaller), as sglang and vLLM choose."""
    return table[min(table, key=lambda m: (abs(m - M), m))]


def default_config(M: int, dtype: str | None, block_shape: tuple[int, ...] | None) -> dict:
    """Built-in tiles for shapes nobody tuned: small row blocks for decode, wider tiles for prefill."""
    bm = 16 if M <= 32 else 32 if M <= 128 else 64
    if dtype == "fp8_w8a8" and block_shape:
        return {
            "BLOCK_SIZE_M": bm,
            "BLOCK_SIZE_N": 128,
            "BLOCK_SIZE_K": block_shape[1],
            "GROUP_SIZE_M": 1 if M <= 128 else 32,
            "num_warps": 4,
            "num_stages": 3,
        }
    if dtype == "int4_w4a16":  # K steps of one 128-wide quantisation group (the kernel needs BLOCK_SIZE_K | group)
        # 16-row tiles up to 256 tokens: the H100's tuned table (E=257, N=2048) picks them there, and the 32-row
        # 8-warp tile these defaults had took 3.3x as long at 64 tokens (16.3 vs 5.0 ms, 2026-12-07)
        small = M <= 256
        return {
            "BLOCK_SIZE_M": 16 if small else 64,
            "BLOCK_SIZE_N": 64 if small else 128,
            "BLOCK_SIZE_K": 128,
            "GROUP_SIZE_M": 1 if small else 8,
            # 64x128 tiles with 4 warps spill the unpacked tiles and two accumulators to local memory on sm_90
            # (ptxas: 255 registers, 150-420 bytes of stack with Triton 3.6 and 3.9); 8 warps hold them in registers
            # (tests/kernels/test_sm90_compile.py)
            "num_warps": 4 if small else 8,
            "num_stages": 4 if small else 3,
        }
    return {
        "BLOCK_SIZE_M": bm,
        "BLOCK_SIZE_N": 64 if M <= 128 else 128,
        "BLOCK_SIZE_K": 64,
        "GROUP_SIZE_M": 1 if M <= 128 else 8,
        "num_warps": 4,
        "num_stages": 3,
    }


@dataclasses.dataclass(frozen=True)
class MoETables:
    """The tables found for one (E, N, dtype, block, device); `up is None` means built-in defaults."""

    up: dict[int, dict] | None
    down: dict[int, dict] | None
    source: Path | None
    down_source: Path | None
    dtype: str | None
    block_shape: tuple[int, ...] | None

    def pick(self, M: int) -> tuple[dict, dict]:
        """(gate-up config, down config) for M tokens; the down BLOCK_SIZE_M always equals the up one."""
        up = dict(nearest(self.up, M)) if self.up else default_config(M, self.dtype, self.block_shape)
        down = dict(nearest(self.down, M)) if self.down else dict(up)
        down["BLOCK_SIZE_M"] = up["BLOCK_SIZE_M"]
        return up, down


def config_roots() -> list[Path]:
    roots = [Path(os.environ[ENV_DIR])] if os.environ.get(ENV_DIR) else []
    return [*roots, PACKAGE_DIR]


def find_file(
    E: int,
    N: int,
    dtype: str | None,
    block_shape: tuple[int, ...] | None,
    device_name: str,
    triton_version: str,
    *,
    down: bool = False,
) -> tuple[Path | None, bool]:
    """(path, is_installed_version_file) of the first file in search order, or (None, False)."""
    installed = triton_dir_name(triton_version)
    for root in config_roots():
        for dev in _device_aliases(device_name):
            sg = file_name(E, N, dev, dtype, block_shape, down=down)
            p = root / installed / sg
            if p.is_file():
                return p, True
            others = sorted(
                (d for d in root.glob("triton_*") if d.is_dir() and d.name != installed),
                key=lambda d: _version_key(d.name),
                reverse=True,
            )
            for d in others:
                if (d / sg).is_file():
                    return d / sg, False
            flat = [root / file_name(E, N, dev, dtype, block_shape, vllm=True)] if not down else []
            for p in [*flat, root / sg]:
                if p.is_file():
                    return p, False
    return None, False


@functools.lru_cache(maxsize=256)
def _get_tables(
    E: int,
    N: int,
    dtype: str | None,
    block_shape: tuple[int, ...] | None,
    device_name: str,
    triton_version: str,
    roots: tuple[str, ...],
) -> MoETables:
    del roots  # part of the cache key only: a changed $MOED_MOE_CONFIG_DIR is a new lookup
    wanted = Path(triton_dir_name(triton_version)) / file_name(E, N, device_name, dtype, block_shape)
    up_path, exact = find_file(E, N, dtype, block_shape, device_name, triton_version)
    if up_path is None:
        log.warning(
            "No tuned fused-MoE config %s (searched %s); using built-in defaults, which are slower. "
            "Run `moed tune-moe` on this GPU to make one.",
            wanted,
            [str(r) for r in config_roots()],
        )
        return MoETables(None, None, None, None, dtype, block_shape)
    if not exact:
        log.warning(
            "Tuned fused-MoE config %s is missing; using %s (tuned for another Triton version or layout).",
            wanted,
            up_path,
        )
    cand = up_path.with_name(up_path.name[: -len(".json")] + "_down.json")
    down_path = cand if cand.is_file() else None
    return MoETables(
        load_table(up_path), load_table(down_path) if down_path else None, up_path, down_path, dtype, block_shape
    )


def get_tables(
    E: int,
    N: int,
    dtype: str | None,
    block_shape: list[int] | tuple[int, ...] | None,
    device_name: str,
    triton_version: str,
) -> MoETables:
    """Tables for these experts on this device (cached; warnings are logged once per distinct lookup)."""
    if E < 1 or N < 1:
        raise ConfigFileError(f"MoE config lookup: E={E} and N={N} must be positive")
    shape = tuple(block_shape) if block_shape else None
    return _get_tables(E, N, dtype, shape, device_name, triton_version, tuple(str(r) for r in config_roots()))


def clear_cache() -> None:
    _get_tables.cache_clear()
