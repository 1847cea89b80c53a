"""The daemon's configuration: defaults < TOML file < MOED_* environment < command-line flags.

Each later source overrides the earlier ones key by key. The keys are the engine's settings (declared once in
moed.engine.config and handed to the worker as its flags) and the daemon's own (`ServeConfig`). The file is flat
TOML (`key = value`, native types, or text as the environment takes it); an environment variable is `MOED_` + the
key in capitals and a flag is `--` + the key with dashes (booleans: `--KEY` / `--no-KEY`), and both take text:
numbers as written, booleans as true/false, "auto" for a setting left to the engine, lists comma-separated
(`listen`) or split like a shell line (`worker_command`). The file is named by `--config` or `MOED_CONFIG`. Every
problem names the key, the source it came from and what is accepted; `moed config check [FILE]` reports them all
at once, or prints the effective configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from moed.client.calls import ADDRESS_ENV, DEFAULT_ADDRESS
from moed.engine.config import (
    AUTO,
    ENGINE_SETTINGS,
    Dtype,
    EngineConfig,
    base_type,
    combination_problems,
    metavar,
    parse_setting,
    setting,
    setting_problem,
    text_of,
)

BUILTIN_MODELS = ("tiny", "small")  # generated on first use by moed.model.checkpoint.builtin_checkpoint


def builtin_name(model: str) -> str | None:
    """The built-in checkpoint `model` names ("tiny", "small" or "builtin:NAME"), else None: a directory.
    A folder called tiny is given as a path (./tiny), so a bare name never depends on the working directory."""
    if model.startswith("builtin:"):
        return model.removeprefix("builtin:")
    return model if model in BUILTIN_MODELS else None


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class ServeConfig(EngineConfig):
    """The daemon's settings: every engine setting (moed.engine.config.EngineConfig, passed to the worker) and
    the daemon's own. Checked by `load_config`, which names the source of each bad value."""

    model: str = setting(
        "",
        "checkpoint directory (HF layout), or a built-in one: tiny, small (builtin:tiny, ...); "
        "a folder of such a name is given as a path (./tiny)",
    )
    # A daemon runs on the GPU when there is one: the engine library's own default is the CPU.
    device: str = setting(AUTO, EngineConfig.__dataclass_fields__["device"].metadata["doc"])
    dtype: Dtype | Literal["auto"] = setting(AUTO, EngineConfig.__dataclass_fields__["dtype"].metadata["doc"])
    model_name: str = setting("", "name clients use for the model; default: the directory's name")
    listen: tuple[str, ...] = setting(
        (DEFAULT_ADDRESS,), "ZMQ endpoints for clients (tcp://HOST:PORT, ipc://PATH), comma-separated", split="comma"
    )
    metrics_address: str = setting("127.0.0.1:9710", "HOST:PORT for /metrics, /health, /ready; empty = off")
    http_address: str = setting("127.0.0.1:8710", "HOST:PORT of the OpenAI-compatible HTTP API (/v1/...); empty = off")
    http_api_key: str = setting("", "when set, HTTP API requests need 'Authorization: Bearer KEY'", secret=True)
    http_max_requests: int = setting(1024, "generate requests (choices) in flight over HTTP; more get 429", min=1)
    stats_interval_s: float = setting(1.0, "engine stats period in seconds", gt=0)
    worker_command: tuple[str, ...] = setting(
        (), "argv that starts a worker; empty = python -m moed.engine.worker", split="shell"
    )
    runtime_dir: str = setting("", "directory for ipc sockets; empty = $RUNTIME_DIRECTORY or /tmp/moed-UID")
    max_message_bytes: int = setting(
        0,
        "largest client message (ZMQ) or HTTP body answered (bytes); larger ones get "
        "an Error, and ZMQ messages over 4x this (at least 32 MiB) are cut off with "
        "no reply; 0 = sized to the model's max_model_len (16 bytes a token + 64 "
        "KiB)",
        min=0,
    )
    client_concurrency: int = setting(256, "in-flight generate requests allowed per client", min=1)
    client_queue_limit: int = setting(
        1024, "replies queued for a client that does not read before it is dropped", min=16
    )
    client_send_hwm: int = setting(
        1000,
        "messages ZMQ buffers per client before the daemon's own outbox (which merges a stream's chunks) takes over",
        min=1,
    )
    client_timeout_s: float = setting(
        30.0, "a client silent this long while it has requests in flight loses them", gt=0
    )
    default_deadline_s: float = setting(0.0, "deadline for requests that set none (seconds); 0 = none", min=0)
    drain_timeout_s: float = setting(30.0, "on SIGTERM, time in-flight requests get to finish before abort", min=0)
    curve_secret_key: str = setting("", "the daemon's Curve secret certificate (zmq.auth format); empty = no Curve")
    curve_allowed_clients: str = setting("", "directory of allowed client public certificates (*.key)")
    worker_start_timeout_s: float = setting(1800.0, "time a worker gets to load the model and warm up", gt=0)
    engine_stall_timeout_s: float = setting(60.0, "a worker silent this long is killed and restarted", gt=0)
    restart_backoff_s: float = setting(1.0, "first restart delay after a worker crash; doubles per crash", min=0)
    restart_backoff_max_s: float = setting(60.0, "largest restart delay", min=0)
    crash_loop_restarts: int = setting(
        5,
        "this many crashes within crash_loop_window_s end restarts (unready; a "
        "worker that was never ready ends the daemon instead)",
        min=1,
    )
    crash_loop_window_s: float = setting(600.0, "window for crash_loop_restarts", gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "debug, info, warning, error")
    placement: Literal["auto", "on", "off"] = setting(
        "auto",
        "expert placement manager: pins each offloaded layer's hottest experts from the engine's counts. "
        "auto: on when moe = offload; on: the same, and an error with another moe; off",
    )
    placement_interval_s: float = setting(
        30.0, "seconds between pin recomputations from the engine's expert counts", gt=0
    )
    placement_state_file: str = setting(
        "",
        "expert counts and operator pins kept across restarts; empty = "
        "$STATE_DIRECTORY (else ~/.local/state/moed)/placement-NAME.json; "
        "none = not kept",
    )

    def __post_init__(self) -> None:
        pass  # load_config checks every value and names its source; the engine checks what it is given again

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return builtin_name(self.model) or Path(self.model).name or self.model

    @property
    def placement_state_path(self) -> Path | None:
        """Where the placement manager keeps its state (None: not kept)."""
        if self.placement_state_file == "none":
            return None
        if self.placement_state_file:
            return Path(self.placement_state_file)
        base = os.environ.get("STATE_DIRECTORY") or Path.home() / ".local" / "state" / "moed"
        return Path(base) / f"placement-{self.served_name.replace('/', '_')}.json"


# Daemon keys first, then the engine's, in declaration order: how `--help` and `moed config check` list them.
FIELDS = {f.name: f for f in sorted(dataclasses.fields(ServeConfig), key=lambda f: f.name in ENGINE_SETTINGS)}


def env_name(key: str) -> str:
    return "MOED_" + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _from_file(key: str, value: Any) -> Any:
    """A TOML value as the setting's type: text is read as the environment's would be (`listen = "tcp://..."`,
    `expert_cache_gb = "auto"`), integers pass as numbers, arrays as lists."""
    if isinstance(value, str):
        return parse_setting(ServeConfig, key, value)
    if isinstance(value, int) and not isinstance(value, bool) and base_type(ServeConfig, key) is float:
        return float(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_semantics(cfg: ServeConfig, sources: Mapping[str, str], check_files: bool) -> list[tuple[str, str]]:
    """(key, problem) pairs for values that are well-typed but unusable."""

    def at(key: str) -> str:
        return f"{key} from {sources.get(key, 'defaults')}"

    problems = []
    if not cfg.model:
        problems.append(
            (
                "model",
                f"model is required: set it in the config file, {env_name('model')} or --model "
                f"(a checkpoint directory, or a built-in one: {', '.join(BUILTIN_MODELS)})",
            )
        )
    elif builtin_name(cfg.model) is not None:
        if builtin_name(cfg.model) not in BUILTIN_MODELS:
            problems.append(
                (
                    "model",
                    f"{at('model')}: unknown built-in model {cfg.model!r}; built-in models are "
                    + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS),
                )
            )
    elif check_files:
        d = Path(cfg.model)
        if not d.is_dir():
            problems.append(("model", f"{at('model')}: {cfg.model!r} is not a directory"))
        else:
            missing = [n for n in ("config.json", "tokenizer.json") if not (d / n).is_file()]
            if missing:
                problems.append(("model", f"{at('model')}: {cfg.model!r} has no {' or '.join(missing)}"))
    if not cfg.listen:
        problems.append(("listen", f"{at('listen')}: at least one endpoint is needed"))
    for ep in cfg.listen:
        if not (ep.startswith("tcp://") or ep.startswith("ipc://")):
            problems.append(("listen", f"{at('listen')}: endpoint {ep!r} must start with tcp:// or ipc://"))
    for key in ("metrics_address", "http_address"):
        address = getattr(cfg, key)
        host, sep, port = address.rpartition(":")
        if address and (not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536):
            problems.append((key, f"{at(key)}: must be HOST:PORT (port 0-65535) or empty, got {address!r}"))
    if bool(cfg.curve_secret_key) != bool(cfg.curve_allowed_clients):
        problems.append(
            (
                "curve_secret_key",
                f"{at('curve_secret_key')} and {at('curve_allowed_clients')}: Curve "
                "needs both the daemon's secret certificate and a directory of allowed client public "
                "certificates",
            )
        )
    elif cfg.curve_secret_key and check_files:
        if not Path(cfg.curve_secret_key).is_file():
            problems.append(("curve_secret_key", f"{at('curve_secret_key')}: no file {cfg.curve_secret_key!r}"))
        if not Path(cfg.curve_allowed_clients).is_dir():
            problems.append(
                ("curve_allowed_clients", f"{at('curve_allowed_clients')}: no directory {cfg.curve_allowed_clients!r}")
            )
    if 0 < cfg.max_message_bytes < 1024:
        problems.append(
            (
                "max_message_bytes",
                f"{at('max_message_bytes')}: must be 0 (sized to max_model_len) or "
                f">= 1024, got {cfg.max_message_bytes}",
            )
        )
    if cfg.restart_backoff_max_s < cfg.restart_backoff_s:
        problems.append(
            (
                "restart_backoff_max_s",
                f"{at('restart_backoff_max_s')}: must be >= restart_backoff_s ({cfg.restart_backoff_s})",
            )
        )
    if cfg.placement == "on" and cfg.moe != "offload":
        problems.append(
            (
                "placement",
                f"{at('placement')} with {at('moe')}: the placement manager pins experts in "
                "the GPU expert cache, which only moe = offload has",
            )
        )
    for key, problem in combination_problems(cfg):
        problems.append((key, f"{at(key)}: {problem}"))
    return problems


def load_config(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
    check_files: bool = True,
) -> tuple[ServeConfig, dict[str, str]]:
    """Merge defaults, file, environment and flags; returns the config and each set key's source.

    `flags` maps keys to the text given on the command line. Raises ConfigError with every problem.
    """
    env = os.environ if env is None else env
    flags = flags or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    file = file or env.get("MOED_CONFIG") or None
    if file:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError([f"config file {str(path)!r} does not exist"]) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError([f"config file {str(path)!r} cannot be read: {e}"]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"config file {str(path)!r} is not valid TOML: {e}"]) from None
        for key, value in data.items():
            if key not in FIELDS:
                close = difflib.get_close_matches(key, FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown key {key!r} in {str(path)!r}{hint}; keys are listed by `moed serve --help`")
                continue
            try:
                values[key], sources[key] = _from_file(key, value), str(path)
            except ValueError as e:
                problems.append(f"{key} from {str(path)!r}: {e}")
    for key in FIELDS:
        name = env_name(key)
        if name in env:
            try:
                values[key], sources[key] = parse_setting(ServeConfig, key, env[name]), f"environment {name}"
            except ValueError as e:
                problems.append(f"{key} from environment {name}: {e}")
    for key, text in flags.items():
        if key not in FIELDS:
            raise ConfigError([f"unknown option {flag_name(key)}"])
        try:
            values[key], sources[key] = parse_setting(ServeConfig, key, text), f"flag {flag_name(key)}"
        except ValueError as e:
            problems.append(f"{key} from flag {flag_name(key)}: {e}")
    bad_keys = set()
    for key, value in list(values.items()):
        p = setting_problem(ServeConfig, key, value)
        if p:
            problems.append(f"{key} from {sources[key]}: {p}")
            bad_keys.add(key)
            del values[key]
    cfg = ServeConfig(**values)  # the well-typed values, so every further problem is found in one pass
    problems += [p for key, p in _check_semantics(cfg, sources, check_files) if key not in bad_keys]
    if problems:
        raise ConfigError(problems)
    return cfg, sources


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """MOED_* variables that name no key (likely typos); reported, not fatal (workers read their own)."""
    env = os.environ if env is None else env
    # MOED_CACHE: built-in checkpoints and kernel builds; MOED_ADDRESS: where `moed client` finds the daemon
    known = {env_name(k) for k in FIELDS} | {"MOED_CONFIG", "MOED_CACHE", ADDRESS_ENV}
    return sorted(n for n in env if n.startswith("MOED_") and n not in known)


def render(cfg: ServeConfig, sources: Mapping[str, str]) -> str:
    """The effective configuration as TOML (settings left to the engine as "auto"), each line marked with its
    source."""
    lines = []
    for key in FIELDS:
        if key == ENGINE_SETTINGS[0]:
            lines.append("# engine settings (moed.engine.config)")
        value = getattr(cfg, key)
        value = list(value) if isinstance(value, tuple) else AUTO if value is None else value
        if FIELDS[key].metadata.get("secret") and value:
            value = "(set, not shown)"
        lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}  # {sources.get(key, 'default')}")
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: Any, exclude: tuple[str, ...] = ()) -> None:
    """One flag per key, in two groups (daemon, engine); values are text parsed like the environment's, booleans
    are --KEY / --no-KEY; unset flags stay None so the file and the environment show through."""
    groups = {
        False: parser.add_argument_group("daemon settings"),
        True: parser.add_argument_group("engine settings (passed to the engine worker)"),
    }
    for key, f in FIELDS.items():
        if key in exclude:
            continue
        group = groups[key in ENGINE_SETTINGS]
        default = text_of(f.default) or "''"
        help_text = f"{f.metadata['doc']} (default: {default}) [{env_name(key)}]"
        if base_type(ServeConfig, key) is bool:
            group.add_argument(
                flag_name(key), dest=f"cfg_{key}", action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag_name(key), dest=f"cfg_{key}", default=None, metavar=metavar(ServeConfig, key), help=help_text
            )


def flags_from_args(args: Any) -> dict[str, str]:
    return {k: text_of(getattr(args, f"cfg_{k}")) for k in FIELDS if getattr(args, f"cfg_{k}", None) is not None}
