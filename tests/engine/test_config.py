"""Engine settings are declared once (moed.engine.config) and every front end is made from that declaration."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import msgspec
import pytest

from moed.daemon.config import FIELDS, ServeConfig
from moed.engine import protocol as ep
from moed.engine.config import (
    ENGINE_SETTINGS,
    PROCESS_DEFAULTS,
    EngineConfig,
    MissService,
    ResolvedMissService,
    add_engine_arguments,
    engine_argv,
    engine_config_from_args,
    parse_setting,
)


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False, **kw)
    add_engine_arguments(p)
    return p


def test_every_engine_setting_is_a_documented_daemon_key_of_the_same_type():
    engine = {f.name: f for f in dataclasses.fields(EngineConfig)}
    engine_types, serve_types = typing.get_type_hints(EngineConfig), typing.get_type_hints(ServeConfig)
    for name in ENGINE_SETTINGS:
        assert engine[name].metadata["doc"], name
        assert name in FIELDS and FIELDS[name].metadata["doc"] == engine[name].metadata["doc"]
        if name in PROCESS_DEFAULTS:  # a daemon picks its device: "auto" on top of the engine's words
            assert FIELDS[name].default == PROCESS_DEFAULTS[name]
        else:
            assert (FIELDS[name].default, serve_types[name]) == (engine[name].default, engine_types[name]), name


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"moe": "fast"}, "moe must be one of torch, offload"),
        ({"miss_service": "gpu"}, "miss_service must be one of auto, copy, hybrid, cpu"),
        ({"miss_service": "cpu"}, "needs moe='offload'"),
        ({"dtype": "fp16"}, "dtype must be one of fp32, bf16"),
        ({"max_running": 0}, "max_running must be >= 1"),
        ({"kv_memory_fraction": 1.5}, "kv_memory_fraction must be <= 1"),
        ({"expert_cache_gb": 0.0}, "expert_cache_gb must be > 0"),
        ({"overlap": "yes"}, "overlap must be true or false"),
        ({"spec_steps": 1.5}, "spec_steps must be an integer"),
    ],
)
def test_engine_config_names_the_bad_setting(kw, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(model="m", **kw)


def test_text_forms():
    assert parse_setting(EngineConfig, "expert_cache_gb", "auto") is None
    assert parse_setting(EngineConfig, "expert_cache_gb", "12.5") == 12.5
    assert [parse_setting(EngineConfig, "overlap", t) for t in ("yes", "off", "1", "False")] == [
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="cannot parse 'maybe' as a boolean"):
        parse_setting(EngineConfig, "overlap", "maybe")
    with pytest.raises(ValueError, match=r"cannot parse 'x' as an integer \(or auto\)"):
        parse_setting(EngineConfig, "max_model_len", "x")


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"device": "cpu", "dtype": "bf16", "moe": "offload", "expert_cache_gb": 0.75, "miss_service": "copy"},
        {
            "overlap": False,
            "cuda_graphs": False,
            "compile_prefill": True,
            "seed": 0,
            "max_model_len": 300,
            "kv_latent_dtype": "fp8",
            "spec_steps": 2,
            "kv_memory_fraction": 0.5,
        },
    ],
)
def test_worker_flags_round_trip(values):
    argv = engine_argv(values)
    args = _parser().parse_args(argv)
    cfg = engine_config_from_args(args, "ckpt")
    for name in ENGINE_SETTINGS:
        if name in values:
            assert getattr(cfg, name) == values[name], name
        elif name not in PROCESS_DEFAULTS:
            assert getattr(cfg, name) == EngineConfig.__dataclass_fields__[name].default, name
    assert engine_argv({}) == []  # defaults write nothing


def test_process_flags_refuse_bad_values_with_the_declarations_words():
    p = _parser()
    for argv, needle in (
        (["--miss-service", "gpu"], "must be one of auto, copy, hybrid, cpu"),
        (["--max-running", "0"], "must be >= 1"),
        (["--expert-cache-gb", "lots"], "cannot parse 'lots' as a number"),
    ):
        with pytest.raises(argparse.ArgumentError, match=needle):
            p.parse_args(argv)
    text = p.format_help()
    assert "--miss-service {auto,copy,hybrid,cpu}" in text and "--dtype {fp32,bf16,auto}" in text
    assert "--no-overlap" in text and "(default: auto)" in text


def test_miss_service_words_are_one_vocabulary():
    from moed.daemon.metrics import MISS_SERVICE_LABELS

    assert set(MISS_SERVICE_LABELS) == set(typing.get_args(ResolvedMissService)) < set(typing.get_args(MissService))
    stats = ep.EngineStats(
        running=0,
        waiting=0,
        kv_usage=0.0,
        num_steps=0,
        prompt_tokens=0,
        generation_tokens=0,
        preemptions=0,
        miss_service="gpu",
    )  # not a word of the vocabulary: refused on arrival
    with pytest.raises(msgspec.ValidationError, match="miss_service"):
        ep.decode_from_worker(ep.encode(stats))


def test_bench_takes_the_vocabulary(capsys):
    from moed.ops.bench.engine import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--miss-service {auto,copy,hybrid,cpu}" in text and "--moe {torch,offload}" in text


def test_auto_device_and_dtype_are_decided_once_at_construction():
    import torch

    cfg = EngineConfig(model="m", device="auto", dtype="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert (cfg.device, cfg.dtype) == (want, "bf16" if want == "cuda" else "fp32")
    assert EngineConfig(model="m", device="cpu", dtype="auto").dtype == "fp32"
