"""Daemon configuration: precedence, validation messages, `moed config check`."""

from __future__ import annotations

import argparse
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
    f.write_text(f'model = "{model_dir}"\nclient_concurrency = 10\ndrain_timeout_s = 5\nlog_level = "debug"\n'
                 'listen = ["tcp://127.0.0.1:1", "ipc:///tmp/x.sock"]\n')
    env = {"MOED_CLIENT_CONCURRENCY": "20", "MOED_DRAIN_TIMEOUT_S": "7.5", "MOED_ENGINE_ARGS": "--a 1 --b 'x y'"}
    cfg, src = load_config(f, env, {"client_concurrency": "30"})
    assert cfg.client_concurrency == 30 and src["client_concurrency"] == "flag --client-concurrency"
    assert cfg.drain_timeout_s == 7.5 and src["drain_timeout_s"] == "environment MOED_DRAIN_TIMEOUT_S"
    assert cfg.log_level == "debug" and src["log_level"] == str(f)
    assert cfg.listen == ("tcp://127.0.0.1:1", "ipc:///tmp/x.sock")
    assert cfg.engine_args == ("--a", "1", "--b", "x y")
    assert cfg.max_message_bytes == 8 << 20 and "max_message_bytes" not in src  # default
    assert cfg.served_name == "ckpt"
    # MOED_CONFIG names the file when no --config is given.
    cfg2, _ = load_config(None, {"MOED_CONFIG": str(f)}, {})
    assert cfg2.client_concurrency == 10


def test_rendered_config_loads_back(tmp_path, model_dir):
    cfg, src = load_config(None, {"MOED_MODEL": model_dir, "MOED_LISTEN": "tcp://[::1]:5,ipc:///tmp/é.sock"}, {})
    text = render(cfg, src)
    assert "# environment MOED_LISTEN" in text
    f = tmp_path / "round.toml"
    f.write_text(text)
    assert load_config(f, {}, {})[0] == cfg


def test_rendered_config_hides_the_http_api_key(model_dir):
    cfg, src = load_config(None, {"MOED_MODEL": model_dir, "MOED_HTTP_API_KEY": "s3cret"}, {})
    text = render(cfg, src)
    assert cfg.http_api_key == "s3cret" and "s3cret" not in text and "http_api_key = " in text


@pytest.mark.parametrize("body, needle", [
    ('client_concurency = 3', "unknown key 'client_concurency'"),
    ('client_concurency = 3', "did you mean 'client_concurrency'"),
    ('client_concurrency = "many"', "client_concurrency from "),
    ('client_concurrency = 0', "must be >= 1, got 0"),
    ('drain_timeout_s = -1', "drain_timeout_s from"),
    ('stats_interval_s = 0', "must be > 0"),
    ('log_level = "loud"', "must be one of debug, info, warning, error"),
    ('listen = "tcp://127.0.0.1:1"', "must be a list of strings"),
    ('listen = ["http://x"]', "must start with tcp:// or ipc://"),
    ('metrics_address = "9100"', "must be HOST:PORT"),
    ('http_address = "localhost"', "http_address from"),
    ('http_max_requests = 0', "must be >= 1, got 0"),
    ('curve_secret_key = "/x.key_secret"', "Curve needs both"),
    ('model = "builtin:huge"', "unknown built-in model 'builtin:huge'"),
    ('model = "huge"', "'huge' is not a directory"),
    ('model = "/nonexistent/ckpt"', "is not a directory"),
    ('max_running = true', "must be an integer"),
    ('this is = not toml', "not valid TOML"),
])
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
    (tmp_path / "tiny").mkdir()  # a directory of that name wins over the built-in
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_config(None, {"MOED_MODEL": "tiny"}, {})


def test_serve_flags_parse_into_config(model_dir):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    from moed.daemon.config import flags_from_args

    args = p.parse_args(["--model", model_dir, "--listen", "tcp://127.0.0.1:9,ipc:///tmp/a", "--engine-args=--x 1"])
    cfg, src = load_config(args.config, {}, flags_from_args(args))
    assert cfg.listen == ("tcp://127.0.0.1:9", "ipc:///tmp/a") and cfg.engine_args == ("--x", "1")
    assert src["model"] == "flag --model"


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
