"""Tile configs of the fused-MoE kernels: the tuned table's entry for a launch (`moed.moe_configs`), and its check."""

from __future__ import annotations

import functools

import torch
import triton

from moed.moe_configs import lookup

CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def dtype_name(w13: torch.Tensor) -> str | None:
    """The config-file dtype string of these weights (None for bf16, as sglang and vLLM name them)."""
    return "fp8_w8a8" if w13.dtype == torch.float8_e4m3fn else None


@functools.cache
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def get_moe_config(
    num_ids: int, N: int, M: int, fp8: bool, block_shape: tuple[int, int] | None, device: torch.device
) -> tuple[dict, dict]:
    """(gate-up config, down config) for M tokens: tuned tables when present, else built-in defaults."""
    dev = device_name(device.index or 0) if device.type == "cuda" else "cpu"
    tables = lookup.get_tables(
        num_ids, N, "fp8_w8a8" if fp8 else None, list(block_shape) if block_shape else None, dev, triton.__version__
    )
    return tables.pick(M)


def check_config(config: dict, fp8: bool, block_shape: tuple[int, int] | None, name: str) -> None:
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"fused_moe: {name} lacks {missing}; a config needs {list(CONFIG_KEYS)}")
    for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        v = config[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"fused_moe: {name}[{k!r}] = {v!r}; must be a power of two >= 16")
    if config["BLOCK_SIZE_N"] < 32:
        raise ValueError(
            f"fused_moe: {name}['BLOCK_SIZE_N'] = {config['BLOCK_SIZE_N']}; must be >= 32 "
            "(gate and up take half of it each)"
        )
    if fp8 and config["BLOCK_SIZE_K"] != block_shape[1]:
        raise ValueError(
            f"fused_moe: {name}['BLOCK_SIZE_K'] = {config['BLOCK_SIZE_K']}; FP8 block quant needs "
            f"BLOCK_SIZE_K == block_k = {block_shape[1]}"
        )
    for k in ("GROUP_SIZE_M", "num_warps", "num_stages"):
        if not isinstance(config[k], int) or config[k] < 1:
            raise ValueError(f"fused_moe: {name}[{k!r}] = {config[k]!r}; must be a positive int")
    if not isinstance(config.get("A_QUANT_IN_GEMM", False), bool):
        raise ValueError(f"fused_moe: {name}['A_QUANT_IN_GEMM'] = {config['A_QUANT_IN_GEMM']!r}; must be true/false")
