"""`moed serve` and `moed config check`: process setup around the Daemon.

Reads the configuration (daemon/config.py gives the precedence), resolves built-in models (tiny,
small: generated once into $MOED_CACHE or ~/.cache/moed by moed.model.checkpoint in a subprocess,
since generating needs torch and the daemon must not import it), installs uvloop when present, turns SIGTERM and
SIGINT into a drain, and exits 0 after a drain, 1 when start-up fails (the engine worker's own start-up
failures included: see supervisor.py) or a serving task kept failing (daemon/liveness.py; systemd
restarts the service), 2 on a bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from moed.daemon.config import (
    ConfigError,
    ServeConfig,
    add_config_arguments,
    builtin_name,
    flags_from_args,
    load_config,
    render,
    unknown_env,
)

log = logging.getLogger("moed.daemon")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML configuration file [MOED_CONFIG]; precedence: defaults < file < MOED_* environment < flags",
    )
    add_config_arguments(parser)


def add_config_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="TOML configuration file to validate (default: $MOED_CONFIG)")
    parser.add_argument("--no-env", action="store_true", help="ignore MOED_* environment variables (MOED_CONFIG too)")


def builtin_model_dir(name: str) -> Path:
    """Where moed.model.checkpoint.builtin_checkpoint keeps a built-in checkpoint ($MOED_CACHE or ~/.cache/moed)."""
    # "-r2": moed.model.checkpoint.BUILTIN_REVISION (not imported: that module needs torch)
    return Path(os.environ.get("MOED_CACHE") or Path.home() / ".cache" / "moed") / f"{name}-bf16-seed0-r2"


def resolve_model(model: str) -> str:
    """A checkpoint directory for `model`; a built-in one is generated on first use, in a subprocess
    (generation needs torch, which this process must never import)."""
    name = builtin_name(model)
    if name is None:
        return model
    if Path(model).is_dir():
        log.warning(
            "model %r is the built-in %s checkpoint, not the folder ./%s; give a path (./%s) to serve the folder",
            model,
            name,
            model,
            model,
        )
    out = builtin_model_dir(name)
    if (out / "model.safetensors.index.json").is_file():
        log.info("model: the built-in %s checkpoint in %s", name, out)
        return str(out)
    log.info("generating the built-in %s checkpoint (once) into %s", name, out)
    code = "import sys; from moed.model.checkpoint import builtin_checkpoint; print(builtin_checkpoint(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, name], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(getattr(logging, level.upper()))  # also when `moed` configured logging first


async def _serve(cfg: ServeConfig, model_dir: str) -> int:
    from moed.daemon.sdnotify import Notifier
    from moed.daemon.server import Daemon

    notifier = Notifier()
    notifier.status(f"starting: loading {model_dir}")
    daemon = Daemon(cfg, model_dir, notifier=notifier)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_drain)
    try:
        await daemon.start()
    except Exception as e:
        log.error("cannot start: %s", e)
        await daemon.stop()
        return 1
    assert daemon.supervisor is not None
    stopped = asyncio.ensure_future(daemon.wait_stopped())
    failed = asyncio.ensure_future(daemon.supervisor.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    if stopped.done():
        failed.cancel()
        return daemon.exit_code
    # The worker cannot start: staying up unready would only hide that from the operator and from systemd.
    reason = daemon.supervisor.reason
    await daemon.stop()
    stopped.cancel()
    print(f"moed serve: {reason}", file=sys.stderr)
    return 1


def serve_main(args: argparse.Namespace) -> int:
    try:
        cfg, _ = load_config(args.config, os.environ, flags_from_args(args))
    except ConfigError as e:
        print("moed serve: bad configuration:\n  " + "\n  ".join(e.problems), file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    # The daemon encodes one text per call: tokenizers' rayon pool would only add threads and their malloc arenas.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in unknown_env():
        log.warning("environment variable %s names no configuration key", name)
    try:
        model_dir = resolve_model(cfg.model)
    except (OSError, subprocess.CalledProcessError) as e:
        log.error("cannot prepare model %s: %s", cfg.model, e)
        return 1
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(cfg, model_dir))
    return uvloop.run(_serve(cfg, model_dir))


def config_check_main(args: argparse.Namespace) -> int:
    env = {} if getattr(args, "no_env", False) else os.environ
    file = args.file or env.get("MOED_CONFIG")
    if not file:
        print("moed config check: give a TOML file or set MOED_CONFIG", file=sys.stderr)
        return 2
    try:
        cfg, sources = load_config(file, env, {})
    except ConfigError as e:
        print(f"{file}: {len(e.problems)} problem(s):\n  " + "\n  ".join(e.problems), file=sys.stderr)
        return 1
    for name in unknown_env(env):
        print(f"warning: environment variable {name} names no configuration key", file=sys.stderr)
    sys.stdout.write(render(cfg, sources))
    return 0


if __name__ == "__main__":  # `python -m moed.daemon.service [flags]` is `moed serve [flags]`
    _parser = argparse.ArgumentParser(prog="moed serve")
    add_serve_arguments(_parser)
    sys.exit(serve_main(_parser.parse_args()))
