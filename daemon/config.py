"""The daemon's configuration: defaults < TOML file < MOED_* environment < command-line flags.

Each later source overrides the earlier ones key by key. The file is flat TOML (`key = value`,
native types); an environment variable is `MOED_` + the key in capitals and a flag is `--` + the
key with dashes, and both take text: numbers as written, lists comma-separated (`listen`) or split
like a shell line (`engine_args`, `worker_command`). The file is named by `--config` or
`MOED_CONFIG`. Every problem names the key, the source it came from and what is accepted;
`moed config check FILE` reports them all at once, or prints the effective configuration.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BUILTIN_MODELS = ("tiny", "small")  # generated on first use by moed.model.checkpoint.builtin_checkpoint


def builtin_name(model: str) -> str | None:
    """The built-in checkpoint `model` names ("builtin:tiny", or "tiny" when no such directory exists), else None."""
    if model.startswith("builtin:"):
        return model.removeprefix("builtin:")
    if model in BUILTIN_MODELS and not Path(model).is_dir():
        return model
    return None
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _f(default: Any, doc: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc, **kw})


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: str = _f("", "checkpoint directory (HF layout), or a built-in one: tiny, small (builtin:tiny, ...)")
    model_name: str = _f("", "name clients use for the model; default: the directory's name")
    listen: tuple[str, ...] = _f(("tcp://127.0.0.1:5710",), "ZMQ endpoints for clients (tcp://HOST:PORT, ipc://PATH)")
    metrics_address: str = _f("127.0.0.1:9710", "HOST:PORT for /metrics, /health, /ready; empty = off")
    http_address: str = _f("127.0.0.1:8710", "HOST:PORT of the OpenAI-compatible HTTP API (/v1/...); empty = off")
    http_api_key: str = _f("", "when set, HTTP API requests need 'Authorization: Bearer KEY'", secret=True)
    http_max_requests: int = _f(1024, "generate requests (choices) in flight over HTTP; more get 429", min=1)
    device: str = _f("", "engine --device (cpu, cuda); empty = engine default")
    dtype: str = _f("", "engine --dtype; empty = engine default")
    max_running: int = _f(0, "engine --max-running (max running sequences); 0 = engine default", min=0)
    kv_pages: int = _f(0, "engine --kv-pages; 0 = engine default (sized from memory)", min=0)
    stats_interval_s: float = _f(1.0, "engine stats period in seconds", gt=0)
    engine_args: tuple[str, ...] = _f((), "further engine worker flags, passed verbatim")
    worker_command: tuple[str, ...] = _f((), "argv that starts a worker; empty = python -m moed.engine.worker")
    runtime_dir: str = _f("", "directory for ipc sockets; empty = $RUNTIME_DIRECTORY or /tmp/moed-UID")
    max_message_bytes: int = _f(8 << 20, "largest client message answered (bytes); larger ones get an Error, and "
                                         "ones over 4x this are cut off by ZMQ with no reply", min=1024)
    client_concurrency: int = _f(256, "in-flight generate requests allowed per client", min=1)
    client_queue_limit: int = _f(1024, "replies queued for a client that does not read before it is dropped",
                                 min=16)
    client_send_hwm: int = _f(1000, "messages ZMQ buffers per client before the daemon's own outbox (which "
                                    "merges a stream's chunks) takes over", min=1)
    client_timeout_s: float = _f(30.0, "a client silent this long while it has requests in flight loses them",
                                 gt=0)
    default_deadline_s: float = _f(0.0, "deadline for requests that set none (seconds); 0 = none", min=0)
    drain_timeout_s: float = _f(30.0, "on SIGTERM, time in-flight requests get to finish before abort", min=0)
    curve_secret_key: str = _f("", "the daemon's Curve secret certificate (zmq.auth format); empty = no Curve")
    curve_allowed_clients: str = _f("", "directory of allowed client public certificates (*.key)")
    worker_start_timeout_s: float = _f(1800.0, "time a worker gets to load the model and warm up", gt=0)
    engine_stall_timeout_s: float = _f(60.0, "a worker silent this long is killed and restarted", gt=0)
    restart_backoff_s: float = _f(1.0, "first restart delay after a worker crash; doubles per crash", min=0)
    restart_backoff_max_s: float = _f(60.0, "largest restart delay", min=0)
    crash_loop_restarts: int = _f(5, "this many crashes within crash_loop_window_s end restarts (unready)",
                                  min=1)
    crash_loop_window_s: float = _f(600.0, "window for crash_loop_restarts", gt=0)
    log_level: str = _f("info", "debug, info, warning, error", choices=LOG_LEVELS)
    placement: str = _f("off", "expert placement manager (needs engine_args --moe offload): on, off",
                        choices=("on", "off"))
    placement_pin_budget: int = _f(4, "experts pinned per cached MoE layer, operator pins included (must stay "
                                      "below the layer's cache slots)", min=0)
    placement_interval_s: float = _f(30.0, "seconds between pin recomputations from the engine's expert counts",
                                     gt=0)
    placement_state_file: str = _f("", "expert counts and operator pins kept across restarts; empty = "
                                       "$STATE_DIRECTORY (else ~/.local/state/moed)/placement-NAME.json; "
                                       "none = not kept")

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


FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}
_SHELL_LISTS = ("engine_args", "worker_command")


def env_name(key: str) -> str:
    return "MOED_" + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _kind(key: str) -> type:
    return {"int": int, "float": float, "str": str, "tuple[str, ...]": tuple}[FIELDS[key].type]


def _from_text(key: str, text: str) -> Any:
    """Parse an environment or flag value; raises ValueError saying what is accepted."""
    kind = _kind(key)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is tuple:
        if key in _SHELL_LISTS:
            return tuple(shlex.split(text))
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def _check(key: str, value: Any, where: str) -> str | None:
    """None if `value` is acceptable for `key`, else the problem."""
    f = FIELDS[key]
    kind = _kind(key)
    meta = f.metadata
    got = f"got {value!r} ({type(value).__name__})"
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{key} from {where}: must be an integer, {got}"
    if kind is float and (not isinstance(value, int | float) or isinstance(value, bool)):
        return f"{key} from {where}: must be a number, {got}"
    if kind is str and not isinstance(value, str):
        return f"{key} from {where}: must be a string, {got}"
    if kind is tuple and (not isinstance(value, tuple) or not all(isinstance(v, str) for v in value)):
        return f"{key} from {where}: must be a list of strings, {got}"
    if kind in (int, float):
        if value != value or value in (float("inf"), float("-inf")):
            return f"{key} from {where}: must be a finite number, {got}"
        if "min" in meta and value < meta["min"]:
            return f"{key} from {where}: must be >= {meta['min']}, {got}"
        if "gt" in meta and value <= meta["gt"]:
            return f"{key} from {where}: must be > {meta['gt']}, {got}"
    if "choices" in meta and value not in meta["choices"]:
        return f"{key} from {where}: must be one of {', '.join(meta['choices'])}, {got}"
    return None


def _check_semantics(cfg: ServeConfig, sources: Mapping[str, str], check_files: bool) -> list[tuple[str, str]]:
    """(key, problem) pairs for values that are well-typed but unusable."""
    def at(key: str) -> str:
        return f"{key} from {sources.get(key, 'defaults')}"

    problems = []
    if not cfg.model:
        problems.append(("model", f"model is required: set it in the config file, {env_name('model')} or --model "
                                  f"(a checkpoint directory, or a built-in one: {', '.join(BUILTIN_MODELS)})"))
    elif builtin_name(cfg.model) is not None:
        if builtin_name(cfg.model) not in BUILTIN_MODELS:
            problems.append(("model", f"{at('model')}: unknown built-in model {cfg.model!r}; built-in models are "
                                      + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS)))
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
        problems.append(("curve_secret_key", f"{at('curve_secret_key')} and {at('curve_allowed_clients')}: Curve "
                         "needs both the daemon's secret certificate and a directory of allowed client public "
                         "certificates"))
    elif cfg.curve_secret_key and check_files:
        if not Path(cfg.curve_secret_key).is_file():
            problems.append(("curve_secret_key", f"{at('curve_secret_key')}: no file {cfg.curve_secret_key!r}"))
        if not Path(cfg.curve_allowed_clients).is_dir():
            problems.append(("curve_allowed_clients",
                             f"{at('curve_allowed_clients')}: no directory {cfg.curve_allowed_clients!r}"))
    if cfg.restart_backoff_max_s < cfg.restart_backoff_s:
        problems.append(("restart_backoff_max_s", f"{at('restart_backoff_max_s')}: must be >= restart_backoff_s "
                                                  f"({cfg.restart_backoff_s})"))
    return problems


def load_config(file: str | Path | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, str] | None = None, check_files: bool = True) -> tuple[ServeConfig, dict[str, str]]:
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
            if _kind(key) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif _kind(key) is tuple and isinstance(value, list):
                value = tuple(value)
            values[key], sources[key] = value, str(path)
    for key in FIELDS:
        name = env_name(key)
        if name in env:
            try:
                values[key], sources[key] = _from_text(key, env[name]), f"environment {name}"
            except ValueError:
                problems.append(f"{key} from environment {name}: cannot parse {env[name]!r} as {FIELDS[key].type}")
    for key, text in flags.items():
        if key not in FIELDS:
            raise ConfigError([f"unknown option {flag_name(key)}"])
        try:
            values[key], sources[key] = _from_text(key, text), f"flag {flag_name(key)}"
        except ValueError:
            problems.append(f"{key} from flag {flag_name(key)}: cannot parse {text!r} as {FIELDS[key].type}")
    bad_keys = set()
    for key, value in list(values.items()):
        p = _check(key, value, sources[key])
        if p:
            problems.append(p)
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
    known = {env_name(k) for k in FIELDS} | {"MOED_CONFIG", "MOED_CACHE"}  # MOED_CACHE: built-in checkpoints
    return sorted(n for n in env if n.startswith("MOED_") and n not in known)


def render(cfg: ServeConfig, sources: Mapping[str, str]) -> str:
    """The effective configuration as TOML, each line marked with its source."""
    lines = []
    for key in FIELDS:
        value = getattr(cfg, key)
        value = list(value) if isinstance(value, tuple) else value
        if FIELDS[key].metadata.get("secret") and value:
            value = "(set, not shown)"
        lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}  # {sources.get(key, 'default')}")
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: Any, exclude: tuple[str, ...] = ()) -> None:
    """One flag per key (text, parsed like the environment); unset flags stay None."""
    for key, f in FIELDS.items():
        if key in exclude:
            continue
        parser.add_argument(flag_name(key), dest=f"cfg_{key}", default=None, metavar=key.split("_")[-1].upper(),
                            help=f"{f.metadata['doc']} [{env_name(key)}]")


def flags_from_args(args: Any) -> dict[str, str]:
    return {k: getattr(args, f"cfg_{k}") for k in FIELDS if getattr(args, f"cfg_{k}", None) is not None}

