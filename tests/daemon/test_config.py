"""Daemon configuration: precedence, validation messages, `moed config check`."""

from __future__ import annotations

import argparse
import sys
import tomllib

import pytest

from moed.daemon.config import ConfigError, load_config, render
from moed.daemon.service import add_config_check_arguments, add_serve_arguments, config_check_main


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return str(d)


def test_precedence_defaults_file_env_flags(tmp_path, model_dir):
    f = tmp_path / "moed.toml"
    f.write_text(
        f'model = "{model_dir}"\nclient_concurrency = 10\ndrain_timeout_s = 5\nlog_level = "debug"\n'
        'listen = ["tcp://127.0.0.1:1", "ipc:///tmp/x.sock"]\n'
    )
    env = {"MOED_CLIENT_CONCURRENCY": "20", "MOED_DRAIN_TIMEOUT_S": "7.5", "MOED_WORKER_COMMAND": "w --b 'x y'"}
    cfg, src = load_config(f, env, {"client_concurrency": "30"})
    assert cfg.client_concurrency == 30 and src["client_concurrency"] == "flag --client-concurrency"
    assert cfg.drain_timeout_s == 7.5 and src["drain_timeout_s"] == "environment MOED_DRAIN_TIMEOUT_S"
    assert cfg.log_level == "debug" and src["log_level"] == str(f)
    assert cfg.listen == ("tcp://127.0.0.1:1", "ipc:///tmp/x.sock")
    assert cfg.worker_command == ("w", "--b", "x y")
    assert cfg.max_message_bytes == 0 and "max_message_bytes" not in src  # default
    assert cfg.served_name == "ckpt"
    # MOED_CONFIG names the file when no --config is given.
    cfg2, _ = load_config(None, {"MOED_CONFIG": str(f)}, {})
    assert cfg2.client_concurrency == 10


def test_engine_settings_are_keys_variables_and_flags(tmp_path, model_dir):
    f = tmp_path / "moed.toml"
    f.write_text(
        f'model = "{model_dir}"\nmoe = "offload"\nmax_model_len = 4096\nexpert_cache_gb = 60\n'
        'spec_steps = 2\ncompile_prefill = true\nkv_pages = "auto"\n'
    )
    env = {"MOED_EXPERT_CACHE_GB": "2.5", "MOED_MISS_SERVICE": "copy", "MOED_CUDA_GRAPHS": "off", "MOED_SEED": "7"}
    cfg, src = load_config(f, env, {"spec_steps": "1", "overlap": "false"})
    assert (cfg.moe, cfg.max_model_len, cfg.compile_prefill, cfg.kv_pages) == ("offload", 4096, True, None)
    assert cfg.expert_cache_gb == 2.5 and src["expert_cache_gb"] == "environment MOED_EXPERT_CACHE_GB"
    assert (cfg.miss_service, cfg.cuda_graphs, cfg.seed) == ("copy", False, 7)
    assert cfg.spec_steps == 1 and src["spec_steps"] == "flag --spec-steps" and cfg.overlap is False
    assert (cfg.device, cfg.dtype, cfg.max_running) == ("auto", "auto", 64)  # defaults: a daemon picks its GPU


def test_worker_gets_the_engine_settings_as_flags(model_dir):
    from moed.daemon.supervisor import WorkerSupervisor
    from moed.engine.config import engine_config_from_args
    from moed.engine.worker import build_parser

    cfg, _ = load_config(
        None,
        {},
        {
            "model": model_dir,
            "moe": "offload",
            "expert_cache_gb": "1.5",
            "device": "cpu",
            "overlap": "false",
            "max_model_len": "512",
            "miss_service": "copy",
        },
    )
    sup = WorkerSupervisor(
        cfg, model_dir, None, on_message=print, on_ready=print, on_lost=print, on_state=print, on_restart=print
    )
    argv = sup._worker_argv("ipc:///a", "ipc:///b")
    assert argv[:3] == [sys.executable, "-m", "moed.engine.worker"]
    # Only what differs from the worker's defaults is written out: the command line says what was chosen.
    assert argv[argv.index("--stats-interval") + 2 :] == [
        "--device",
        "cpu",
        "--max-model-len",
        "512",
        "--moe",
        "offload",
        "--expert-cache-gb",
        "1.5",
        "--miss-service",
        "copy",
        "--no-overlap",
    ]
    engine = engine_config_from_args(build_parser().parse_args(argv[3:]), model_dir)
    for key in (
        "moe",
        "expert_cache_gb",
        "overlap",
        "max_model_len",
        "miss_service",
        "device",
        "max_running",
        "kv_pages",
        "cuda_graphs",
        "spec_steps",
        "seed",
    ):
        assert getattr(engine, key) == getattr(cfg, key), key
    assert engine.dtype == "fp32"  # auto on a CPU device


def test_rendered_config_loads_back(tmp_path, model_dir):
    cfg, src = load_config(
        None,
        {
            "MOED_MODEL": model_dir,
            "MOED_LISTEN": "tcp://[::1]:5,ipc:///tmp/é.sock",
            "MOED_EXPERT_CACHE_GB": "3",
            "MOED_MOE": "offload",
            "MOED_OVERLAP": "no",
        },
        {},
    )
    text = render(cfg, src)
    assert "# environment MOED_LISTEN" in text
    f = tmp_path / "round.toml"
    f.write_text(text)
    assert load_config(f, {}, {})[0] == cfg


def test_rendered_config_hides_the_http_api_key(model_dir):
    cfg, src = load_config(None, {"MOED_MODEL": model_dir, "MOED_HTTP_API_KEY": "s3cret"}, {})
    text = render(cfg, src)
    assert cfg.http_api_key == "s3cret" and "s3cret" not in text and "http_api_key = " in text


@pytest.mark.parametrize(
    "body, needle",
    [
        ("client_concurency = 3", "unknown key 'client_concurency'"),
        ("client_concurency = 3", "did you mean 'client_concurrency'"),
        ('client_concurrency = "many"', "client_concurrency from "),
        ("client_concurrency = 0", "must be >= 1, got 0"),
        ("drain_timeout_s = -1", "drain_timeout_s from"),
        ("stats_interval_s = 0", "must be > 0"),
        ('log_level = "loud"', "must be one of debug, info, warning, error"),
        ("listen = 5", "must be a list of strings"),
        ('moe = "fast"', "moe from"),
        ('moe = "fast"', "must be one of torch, offload"),
        ('miss_service = "gpu"', "must be one of auto, copy, hybrid, cpu"),
        ('miss_service = "hybrid"', "needs moe='offload'"),
        ('expert_cache_gb = "lots"', "cannot parse 'lots' as a number (or auto)"),
        ('overlap = "maybe"', "as a boolean"),
        ("overlap = 1", "must be true or false"),
        ("max_model_len = 0", "must be >= 1, got 0"),
        ('placement = "on"', "only moe = offload has"),
        ('listen = ["http://x"]', "must start with tcp:// or ipc://"),
        ('metrics_address = "9100"', "must be HOST:PORT"),
        ('http_address = "localhost"', "http_address from"),
        ("http_max_requests = 0", "must be >= 1, got 0"),
        ('curve_secret_key = "/x.key_secret"', "Curve needs both"),
        ('model = "builtin:huge"', "unknown built-in model 'builtin:huge'"),
        ('model = "huge"', "'huge' is not a directory"),
        ('model = "/nonexistent/ckpt"', "is not a directory"),
        ("max_running = true", "must be an integer"),
        ("this is = not toml", "not valid TOML"),
    ],
)
def test_bad_file_values_are_named(tmp_path, model_dir, body, needle):
    f = tmp_path / "bad.toml"
    text = body if body.startswith("model") else f'model = "{model_dir}"\n{body}\n'
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, {}, {})
    msg = str(e.value)
    assert needle in msg, msg
    if "TOML" not in needle and "unknown key" not in needle and "did you" not in needle:
        assert str(f) in msg or "defaults" in msg  # where the value came from


def test_env_and_flag_errors_name_their_source(model_dir):
    with pytest.raises(ConfigError, match="environment MOED_CLIENT_TIMEOUT_S: cannot parse 'soon'"):
        load_config(None, {"MOED_MODEL": model_dir, "MOED_CLIENT_TIMEOUT_S": "soon"}, {})
    with pytest.raises(ConfigError, match="flag --kv-pages"):
        load_config(None, {"MOED_MODEL": model_dir}, {"kv_pages": "-3"})
    with pytest.raises(ConfigError, match="model is required"):
        load_config(None, {}, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/file.toml", {}, {})


def test_builtin_model_names(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "builtin:tiny", "builtin:small"):
        cfg, _ = load_config(None, {"MOED_MODEL": name}, {})
        assert cfg.served_name == name.removeprefix("builtin:")
    # A folder of that name changes nothing: a bare name is the built-in one, a folder is given as a path.
    (tmp_path / "tiny").mkdir()
    assert load_config(None, {"MOED_MODEL": "tiny"}, {})[0].served_name == "tiny"
    with pytest.raises(ConfigError, match=r"'./tiny' has no config\.json"):
        load_config(None, {"MOED_MODEL": "./tiny"}, {})


def test_builtin_name_next_to_a_folder_of_that_name_is_logged(monkeypatch, tmp_path, caplog):
    from moed.daemon.service import builtin_model_dir, resolve_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOED_CACHE", str(tmp_path / "cache"))
    cached = builtin_model_dir("tiny")
    cached.mkdir(parents=True)
    (cached / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "tiny").mkdir()
    with caplog.at_level("INFO", logger="moed.daemon"):
        assert resolve_model("tiny") == str(cached)
    assert "not the folder ./tiny; give a path (./tiny)" in caplog.text
    assert "the built-in tiny checkpoint in" in caplog.text


def test_serve_flags_parse_into_config(model_dir):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    from moed.daemon.config import flags_from_args

    args = p.parse_args(
        [
            "--model",
            model_dir,
            "--listen",
            "tcp://127.0.0.1:9,ipc:///tmp/a",
            "--moe",
            "offload",
            "--expert-cache-gb",
            "60",
            "--no-cuda-graphs",
            "--max-model-len",
            "auto",
        ]
    )
    cfg, src = load_config(args.config, {}, flags_from_args(args))
    assert cfg.listen == ("tcp://127.0.0.1:9", "ipc:///tmp/a")
    assert (cfg.moe, cfg.expert_cache_gb, cfg.cuda_graphs, cfg.max_model_len) == ("offload", 60.0, False, None)
    assert src["model"] == "flag --model" and src["cuda_graphs"] == "flag --cuda-graphs"


def test_listen_may_be_one_string_in_the_file(tmp_path, model_dir):
    f = tmp_path / "moed.toml"
    f.write_text(f'model = "{model_dir}"\nlisten = "tcp://0.0.0.0:5710"\n')
    assert load_config(f, {}, {})[0].listen == ("tcp://0.0.0.0:5710",)


def test_serve_help_shows_every_key_with_its_default_and_variable():
    from moed.daemon.config import FIELDS, env_name, flag_name

    wide = lambda prog: argparse.HelpFormatter(prog, width=1000, max_help_position=100)  # noqa: E731 (a line each)
    p = argparse.ArgumentParser(prog="moed serve", formatter_class=wide)
    add_serve_arguments(p)
    lines = p.format_help().splitlines()
    for key in FIELDS:
        line = next(x for x in lines if x.strip().startswith(flag_name(key)))
        assert "(default: " in line and f"[{env_name(key)}]" in line, line
    text = "\n".join(lines)
    assert "--expert-cache-gb GB" in text and "--miss-service {auto,copy,hybrid,cpu}" in text
    assert "--overlap, --no-overlap" in text and "(default: 64) [MOED_MAX_RUNNING]" in text


def test_config_check_command(tmp_path, model_dir, capsys, monkeypatch):
    p = argparse.ArgumentParser()
    add_config_check_arguments(p)
    good = tmp_path / "good.toml"
    good.write_text(f'model = "{model_dir}"\nclient_timeout_s = 12\n')
    monkeypatch.setenv("MOED_CLIENT_CONCURENCY", "5")  # a typo in the environment is reported, not fatal
    assert config_check_main(p.parse_args([str(good)])) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["client_timeout_s"] == 12.0 and f"# {good}" in out
    assert "MOED_CLIENT_CONCURENCY names no configuration key" in err
    bad = tmp_path / "bad.toml"
    bad.write_text(f'model = "{model_dir}"\nclient_timeout_s = 0\nlisten = ["udp://x"]\n')
    assert config_check_main(p.parse_args([str(bad)])) == 1
    _, err = capsys.readouterr()
    assert "2 problem(s)" in err and "client_timeout_s" in err and "udp://x" in err
    # With no file named, MOED_CONFIG names it (as for `moed serve`); with neither, the command says so.
    monkeypatch.setenv("MOED_CONFIG", str(good))
    assert config_check_main(p.parse_args([])) == 0
    assert tomllib.loads(capsys.readouterr().out)["client_timeout_s"] == 12.0
    monkeypatch.setenv("MOED_CONFIG", str(bad))
    assert config_check_main(p.parse_args([])) == 1
    assert f"{bad}: 2 problem(s)" in capsys.readouterr().err
    monkeypatch.delenv("MOED_CONFIG")
    assert config_check_main(p.parse_args([])) == 2
    assert "give a TOML file or set MOED_CONFIG" in capsys.readouterr().err


def test_builtin_model_is_generated_once_in_a_subprocess(tmp_path, monkeypatch):
    import sys

    from moed.daemon.service import resolve_model

    monkeypatch.setenv("MOED_CACHE", str(tmp_path))
    had_torch = "torch" in sys.modules
    path = resolve_model("tiny")
    assert (tmp_path / "tiny-bf16-seed0-r2" / "model.safetensors.index.json").is_file()
    assert path == str(tmp_path / "tiny-bf16-seed0-r2")
    assert resolve_model("builtin:tiny") == path  # second time: found, not generated
    assert ("torch" in sys.modules) == had_torch  # generation ran in another process
    assert resolve_model(str(tmp_path)) == str(tmp_path)
