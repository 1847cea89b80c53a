"""The one place that picks the attention backend, from the device, installed packages, config and model.

| device                                   | auto      | explicit "triton"   | explicit "trtllm"        |
| ---------------------------------------- | --------- | ------------------- | ------------------------ |
| CPU                                      | reference | only TRITON_INTERPRET=1 (tests) | error            |
| CUDA < SM80                              | reference | error               | error                    |
| CUDA SM80..SM9x (Ampere, Hopper)         | triton    | triton              | error (needs SM100+)     |
| CUDA SM100+ with flashinfer, model/pool fit trtllm-gen | trtllm | triton       | trtllm                   |
| CUDA SM100+ otherwise                    | triton    | triton              | error naming what is missing |

"reference" is always available. The choice and its reason are logged once per call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os

import torch

from moed.attention.paged_kv import LATENT_DTYPES, PagedKVPool
from moed.attention.reference import ReferenceAttention
from moed.attention.trtllm import unsupported_reason
from moed.model.attention_interface import AttentionBackend
from moed.model.config import GlmMoeDsaConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton", "trtllm")


class BackendUnavailable(RuntimeError):
    """An explicitly requested attention backend cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the choice depends on besides the model: probed by `probe_platform`, or given by tests."""

    device_type: str  # "cpu" | "cuda"
    capability: tuple[int, int] | None  # CUDA compute capability
    device_name: str
    has_flashinfer: bool
    interpret: bool  # TRITON_INTERPRET=1: Triton kernels run on the CPU (tests only)


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    name: str  # "reference" | "triton" | "trtllm"
    reason: str


def probe_platform(device: torch.device | str) -> Platform:
    dev = torch.device(device)
    cap, name = None, "cpu"
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
    return Platform(
        device_type=dev.type,
        capability=cap,
        device_name=name,
        has_flashinfer=importlib.util.find_spec("flashinfer") is not None,
        interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )


def choose_backend(
    requested: str, platform: Platform, cfg: GlmMoeDsaConfig, page_size: int = 64, latent_dtype: str = "bf16"
) -> BackendChoice:
    if requested not in BACKENDS:
        raise ValueError(f"attention backend '{requested}' is unknown (choose from {', '.join(BACKENDS)})")
    if requested == "reference":
        return BackendChoice("reference", "requested")
    where = (
        f"{platform.device_name} (SM{platform.capability[0]}{platform.capability[1]})"
        if platform.capability
        else platform.device_type
    )
    triton_ok, triton_why = _triton_status(platform)
    trtllm_why = _trtllm_problem(platform, cfg, page_size, latent_dtype)
    if requested == "triton":
        if not triton_ok:
            raise BackendUnavailable(f"attention backend 'triton' cannot run on {where}: {triton_why}")
        return BackendChoice("triton", "requested")
    if requested == "trtllm":
        if trtllm_why:
            raise BackendUnavailable(f"attention backend 'trtllm' cannot run on {where}: {trtllm_why}")
        return BackendChoice("trtllm", "requested")
    if platform.device_type != "cuda":
        return BackendChoice("reference", f"auto: no CUDA device ({where}); the torch reference backend runs on CPU")
    if trtllm_why is None:
        return BackendChoice("trtllm", f"auto: {where} with flashinfer: trtllm-gen MLA kernels")
    if triton_ok:
        return BackendChoice("triton", f"auto: {where}: Triton DSA kernels (trtllm not used: {trtllm_why})")
    return BackendChoice("reference", f"auto: {where}: {triton_why}")


def _triton_status(p: Platform) -> tuple[bool, str]:
    if p.device_type == "cuda":
        if p.capability is not None and p.capability >= (8, 0):
            return True, ""
        return False, "the Triton kernels need bf16 tensor cores (SM80 or newer)"
    if p.interpret:
        return True, ""
    return False, "the Triton kernels need a CUDA device (TRITON_INTERPRET=1 runs them on the CPU, for tests only)"


def _trtllm_problem(p: Platform, cfg: GlmMoeDsaConfig, page_size: int, latent_dtype: str) -> str | None:
    if p.device_type != "cuda" or p.capability is None:
        return "trtllm-gen kernels need an SM100+ (Blackwell) CUDA device"
    if p.capability[0] < 10:
        return (
            f"trtllm-gen kernels need SM100+ (Blackwell); this device is SM{p.capability[0]}{p.capability[1]} "
            "(use 'triton')"
        )
    if not p.has_flashinfer:
        return "flashinfer is not installed (pip install flashinfer-python)"
    return unsupported_reason(cfg, page_size, latent_dtype)


def make_attention_backend(
    cfg: GlmMoeDsaConfig,
    device: torch.device | str,
    requested: str | BackendChoice = "auto",
    *,
    num_pages: int | None = None,
    page_size: int = 64,
    latent_dtype: str = "bf16",
    index_dtype: str = "fp8",
    layers: list[int] | None = None,
    dense_threshold: int | None = None,
    platform: Platform | None = None,
) -> AttentionBackend:
    """Build a backend (the paged ones with a KV pool of `num_pages` pages for `layers`, default every layer).

    `requested` is a backend name to choose from (the choice is logged here) or a choice already made and logged:
    the engine chooses once, sizes its KV pages by it, then builds one backend per layer set."""
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent KV dtype '{latent_dtype}' is not supported (choose from {LATENT_DTYPES})")
    choice = requested
    if not isinstance(choice, BackendChoice):
        choice = choose_backend(choice, platform or probe_platform(device), cfg, page_size, latent_dtype)
        log.info("attention backend: %s (%s)", choice.name, choice.reason)
    if choice.name == "reference":
        return ReferenceAttention(cfg)
    if num_pages is None:
        raise ValueError(f"attention backend '{choice.name}' needs num_pages for its paged KV pool")
    pool = PagedKVPool(cfg, num_pages, page_size, latent_dtype, index_dtype, device, layers=layers)
    if choice.name == "trtllm":
        from moed.attention.trtllm import TrtllmAttention

        return TrtllmAttention(cfg, pool, dense_threshold)
    from moed.attention.nsa import TritonSparseAttention

    return TritonSparseAttention(cfg, pool, dense_threshold)
