"""The engine's settings, each declared once, and how every front end reads them.

`EngineConfig` is what an `LLMEngine` is built from. Each of its fields is a setting with one type,
one default and one line of documentation; settings with a fixed vocabulary are the Literal types
below. Everything else is made from these declarations: the daemon's TOML keys, `MOED_*` variables and
`moed serve` flags (daemon/config.py), the worker's and `moed generate`'s flags (`add_engine_arguments`),
the argv the daemon starts a worker with (`engine_argv`), the metrics' label values and the benches'
choices. The text forms are shared too: numbers as written, booleans as true/false (yes/no, on/off,
1/0), and "auto" for a setting left to the engine (None here).

Imports only the standard library and moed.model.config (standard library only, where the expert formats are
declared): the daemon reads it and never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shlex
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from moed.model.config import ExpertDtype

Dtype = Literal["fp32", "bf16"]
MoeMode = Literal["torch", "offload"]  # torch: every expert resident; offload: host store + GPU expert cache
# How decode steps serve expert misses (prefill steps always copy): copy (into the GPU cache; exact FP8), hybrid
# (split between CPU experts and copies by measured rates), cpu (every decode miss on the CPU), auto (hybrid on
# CUDA, copy on a CPU device, where the "copies" are host memcpys that CPU experts cannot beat).
MissService = Literal["auto", "copy", "hybrid", "cpu"]
ResolvedMissService = Literal["copy", "hybrid", "cpu"]  # what a runner does once auto is decided: metric labels

AUTO = "auto"  # the text of a setting left to the engine (None), and of device/dtype chosen at start
# A process that owns a device (the worker, `moed serve`, `moed generate`) uses CUDA when present, in bf16;
# the library's EngineConfig stays on the CPU in fp32 unless told, which the engine's tests rely on.
PROCESS_DEFAULTS: dict[str, str] = {"device": AUTO, "dtype": AUTO}


def setting(default: Any, doc: str, **checks: Any) -> Any:
    """A declared setting: `doc` is its help line; checks: min, gt, max (numbers), split ("comma" or "shell":
    how the text of a list is cut)."""
    return dataclasses.field(default=default, metadata={"doc": doc, **checks})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = dataclasses.field(metadata={"doc": "checkpoint directory (HF layout)"})
    device: str = setting("cpu", "cpu, cuda or cuda:N; auto = cuda when present")
    dtype: Dtype = setting("fp32", "activation and dense weight dtype; auto = bf16 on CUDA, fp32 on a CPU")
    max_running: int = setting(64, "sequences decoded together at most", min=1)
    max_tokens_per_step: int = setting(2048, "tokens one engine step processes at most (prefill chunks)", min=1)
    kv_pages: int | None = setting(
        None,
        "KV cache pages; auto = kv_memory_fraction of the device memory free after "
        "loading (paged backends), else room for max_running full sequences",
        min=1,
    )
    kv_memory_fraction: float = setting(
        0.9, "share of the device memory free after loading that auto kv_pages takes", gt=0, max=1
    )
    page_size: int = setting(64, "tokens per KV page", min=1)
    spec_steps: int = setting(
        0, "MTP draft tokens per decode step (0 = off; needs a checkpoint with an MTP layer)", min=0
    )
    max_model_len: int | None = setting(
        None, "longest sequence (prompt + output) served; auto = the model's max_position_embeddings", min=1
    )
    attention: str = setting(AUTO, "attention backend: auto, reference, triton or trtllm (attention/select.py)")
    kv_latent_dtype: str | None = setting(
        None, "paged KV latent dtype: bf16, fp8 or fp32; auto = bf16 for a bf16 model, else fp32"
    )
    kv_index_dtype: str | None = setting(
        None, "paged index-K dtype: fp8, bf16 or fp32; auto = fp8 on CUDA, else the latent dtype"
    )
    moe: MoeMode = setting(
        "torch", "routed experts: torch (all resident on the device) or offload (host store and a GPU expert cache)"
    )
    expert_cache_gb: float | None = setting(
        None,
        "offload: the target model's expert cache (GiB); auto = sized when "
        "the weights are loaded: what is free on the GPU then, less the KV "
        "pool (at most half of it) and 5 percent for activations",
        gt=0,
    )
    draft_expert_cache_gb: float | None = setting(
        None, "offload: the MTP draft's own expert cache (GiB); auto = the target's per-layer share", gt=0
    )
    miss_service: MissService = setting(
        AUTO,
        "offload: how decode serves expert misses: copy (exact FP8), hybrid "
        "(CPU experts and copies at once), cpu; auto = hybrid on CUDA, copy "
        "on a CPU",
    )
    cpu_expert_threads: int = setting(0, "threads of the CPU experts (hybrid, cpu); 0 = every core but one", min=0)
    miss_column_split: bool = setting(
        False,
        "hybrid: split a step's boundary expert by intermediate columns between the CPU and a GPU copy, so "
        "neither side idles at the end of a step with few misses",
    )
    placement_pin_fraction: float = setting(
        0.5,
        "share of each offloaded layer's cache slots pinned with its hottest "
        "experts, operator pins included (one slot always stays unpinned); "
        "the rest are evicted least recently used (docs/benchmarks.md, Hit "
        "rate). Steps are sized for this many pins from the start, and more are refused",
        min=0,
        max=1,
    )
    cuda_graphs: bool = setting(True, "decode through CUDA graphs on CUDA")
    overlap: bool = setting(
        True, "plan and launch each step before reading the previous one's tokens back (not with MTP)"
    )
    graph_max_batch: int = setting(128, "largest decode batch captured in a CUDA graph", min=1)
    graph_max_context: int = setting(8192, "contexts longer than this decode eagerly", min=1)
    compile_prefill: bool = setting(
        False,
        "run eager steps of >= compile_min_tokens tokens through torch.compile'd "
        "decoder layers (~20 s of compiling at start)",
    )
    compile_min_tokens: int = setting(2048, "shortest step that compile_prefill compiles", min=1)
    fp8_projections: bool = setting(
        False,
        "keep an FP8 checkpoint's projections FP8 on the device (w8a16 kernel for decode; half the bytes and memory "
        "of bf16, which the expert cache gets) instead of dequantising them at load",
    )
    compile_decode: bool = setting(
        True,
        "capture the decode CUDA graphs from torch.compile'd decoder layers (fuses the elementwise kernels "
        "between projections: GLM-5.1's non-MoE decode step 1.3-1.4x faster on an H100; ~15 s more at start)",
    )
    seed: int | None = setting(None, "seeds the noise of requests that set no seed; auto = a random seed", min=0)
    expert_dtype: ExpertDtype = setting(
        "checkpoint",
        "routed experts as the checkpoint has them, or int4: bf16 / FP8 "
        "experts quantised to 4 bits at load (formats/int4.py)",
    )
    int4_cache_dir: str | None = setting(
        None,
        "with expert_dtype int4: keep the quantised experts here, so the next "
        "start loads them instead of quantising again",
    )

    def __post_init__(self) -> None:
        if AUTO in (self.device, self.dtype):  # decided here, once: the engine sees a device and a dtype
            device, dtype = resolve_device(self.device, self.dtype)
            object.__setattr__(self, "device", device)
            object.__setattr__(self, "dtype", dtype)
        problems = engine_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


ENGINE_SETTINGS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "model")


# --- declarations -> checks and text -------------------------------------------------------------


@functools.cache
def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) > 1 and all(typing.get_origin(a) is Literal for a in args):  # Dtype | Literal["auto"]
            return Literal[tuple(v for a in args for v in typing.get_args(a))], optional
        return args[0], optional
    return tp, False


def base_type(cls: type, name: str) -> Any:
    """A setting's type without None (`int | None` -> int)."""
    return _unwrap(_types(cls)[name])[0]


def choices(tp: Any) -> tuple[str, ...]:
    """The words of a Literal type (or of the Literal a setting's type holds)."""
    base, _ = _unwrap(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_setting(cls: type, name: str, text: str) -> Any:
    """The value of a setting written as text (environment, flag); raises ValueError saying what is accepted."""
    base, optional = _unwrap(_types(cls)[name])
    if optional and text.strip().lower() in (AUTO, ""):
        return None
    if base is bool:
        word = text.strip().lower()
        if word in _TRUE + _FALSE:
            return word in _TRUE
        raise ValueError(f"cannot parse {text!r} as a boolean (true or false)")
    if base is int or base is float:
        try:
            return base(text)
        except ValueError:
            kind = "an integer" if base is int else "a number"
            raise ValueError(f"cannot parse {text!r} as {kind}" + (" (or auto)" if optional else "")) from None
    if typing.get_origin(base) is tuple:
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        if field.metadata.get("split") == "shell":
            return tuple(shlex.split(text))
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def setting_problem(cls: type, name: str, value: Any) -> str | None:
    """None when `value` fits the setting's declaration, else what is wrong ("must be ..., got ...")."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    base, optional = _unwrap(_types(cls)[name])
    got = f"got {value!r} ({type(value).__name__})"
    if value is None:
        return None if optional else f"must be set, {got}"
    words = choices(base)
    if words:
        return None if value in words else f"must be one of {', '.join(words)}, {got}"
    if base is bool and not isinstance(value, bool):
        return f"must be true or false, {got}"
    if base is int and (not isinstance(value, int) or isinstance(value, bool)):
        return f"must be an integer, {got}"
    if base is float and (not isinstance(value, int | float) or isinstance(value, bool)):
        return f"must be a number, {got}"
    if base is str and not isinstance(value, str):
        return f"must be a string, {got}"
    if typing.get_origin(base) is tuple and (
        not isinstance(value, tuple) or not all(isinstance(v, str) for v in value)
    ):
        return f"must be a list of strings, {got}"
    if base in (int, float):
        meta = field.metadata
        if not math.isfinite(value):
            return f"must be a finite number, {got}"
        if "min" in meta and value < meta["min"]:
            return f"must be >= {meta['min']}, {got}"
        if "gt" in meta and value <= meta["gt"]:
            return f"must be > {meta['gt']}, {got}"
        if "max" in meta and value > meta["max"]:
            return f"must be <= {meta['max']}, {got}"
    return None


def combination_problems(cfg: EngineConfig) -> list[tuple[str, str]]:
    """(setting, problem) for engine settings that are each fine but cannot work together."""
    problems = []
    if cfg.miss_service in ("hybrid", "cpu") and cfg.moe != "offload":
        problems.append(
            (
                "miss_service",
                f"miss_service {cfg.miss_service!r} needs moe='offload' (with "
                f"moe={cfg.moe!r} every expert is resident and nothing misses)",
            )
        )
    return problems


def engine_problems(cfg: EngineConfig) -> list[str]:
    """Every engine setting of `cfg` that does not fit its declaration, and the combinations that cannot work."""
    problems = [
        f"{name} {p}"
        for name in ENGINE_SETTINGS
        if (p := setting_problem(type(cfg), name, getattr(cfg, name))) is not None
    ]
    return problems + [p for _, p in combination_problems(cfg)]


def metavar(cls: type, name: str, extra: tuple[str, ...] = ()) -> str:
    """The placeholder a flag's help shows for its value: its words, or what kind of value it takes."""
    base, _ = _unwrap(_types(cls)[name])
    if choices(base):
        return "{" + ",".join((*choices(base), *extra)) + "}"
    if name.endswith("_gb"):
        return "GB"
    if name.endswith("_s"):
        return "SECONDS"
    return {int: "N", float: "X"}.get(base, name.rsplit("_", 1)[-1].upper())


def text_of(value: Any) -> str:
    """How a value is written in help, flags and the environment."""
    if value is None:
        return AUTO
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


# --- process flags -------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser | Any, exclude: tuple[str, ...] = ()) -> None:
    """One flag per engine setting (typed; unset flags take the process default)."""
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model" or f.name in exclude:
            continue
        default = PROCESS_DEFAULTS.get(f.name, f.default)
        help_text = f"{f.metadata['doc']} (default: {text_of(default)})"
        if _types(EngineConfig)[f.name] is bool:
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue

        def parse(text: str, name: str = f.name) -> Any:
            if name in PROCESS_DEFAULTS and text == AUTO:
                return AUTO
            try:
                value = parse_setting(EngineConfig, name, text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            problem = setting_problem(EngineConfig, name, value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
            return value

        extra = (AUTO,) if f.name in PROCESS_DEFAULTS else ()
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=parse,
            default=default,
            help=help_text,
            metavar=metavar(EngineConfig, f.name, extra),
        )


def engine_argv(values: Mapping[str, Any] | Any) -> list[str]:
    """The flags that give a process these engine settings (a mapping or any object with the fields): only those
    that differ from the process defaults, so a worker's command line says what was chosen."""
    get = values.get if isinstance(values, Mapping) else lambda name, default: getattr(values, name, default)
    argv: list[str] = []
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        default = PROCESS_DEFAULTS.get(f.name, f.default)
        value = get(f.name, default)
        if value == default:
            continue
        if isinstance(value, bool):
            argv.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [_flag(f.name), text_of(value)]
    return argv


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """device and dtype with auto decided: CUDA when present, bf16 there, fp32 on a CPU."""
    if device == AUTO:
        import torch  # only a process that runs the engine asks

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == AUTO:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return device, dtype


def engine_config_from_args(args: argparse.Namespace, model: str, **overrides: Any) -> EngineConfig:
    """The EngineConfig that flags from `add_engine_arguments` describe (device and dtype decided)."""
    values = {name: getattr(args, name) for name in ENGINE_SETTINGS if hasattr(args, name)}
    return EngineConfig(model=model, **{**values, **overrides})
