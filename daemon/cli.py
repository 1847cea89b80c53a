"""The `moed` command line.

`moed client` and `moed config check` need only the client install (pyzmq, msgspec); the other commands need
the `serve` extra (`pip install 'moed[serve]'`: the engine's torch, triton, tokenizers, ...), and say so when it
is missing. Subcommands that need torch import it inside their handler, so `moed serve` and `moed client` stay
light (the daemon process never imports torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Any

# What the `serve` extra installs (import names of pyproject's [project.optional-dependencies] serve, less the
# optional uvloop and httptools); tests/client/test_install.py keeps the two lists together.
SERVE_MODULES = (
    "torch",
    "triton",
    "numpy",
    "safetensors",
    "tokenizers",
    "jinja2",
    "tqdm",
    "prometheus_client",
    "fastapi",
    "uvicorn",
)
CLIENT_COMMANDS = ("client", "config")


class _Help(argparse.HelpFormatter):
    """Shows each option's default (unless its help already names one, or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or isinstance(action, argparse._HelpAction)
        ):
            return text
        return text + " (default: %(default)s)"


def missing_serve_modules() -> list[str]:
    return [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]


def _cmd_checkpoint_make(args: argparse.Namespace) -> int:
    from moed.model.checkpoint import make_checkpoint

    out = make_checkpoint(
        args.out,
        preset=args.preset,
        dtype=args.dtype,
        seed=args.seed,
        layers=args.layers,
        experts=args.experts,
        mtp_layers=args.mtp_layers,
        shard_bytes=int(args.shard_gib * (1 << 30)) if args.shard_gib else None,
        device=args.device,
    )
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """One prompt through the serving engine (LLMEngine) in this process, streamed as the daemon would."""
    import msgspec

    from moed.client.cli import sampling_from_args
    from moed.client.protocol import SamplingParams
    from moed.daemon.config import builtin_name
    from moed.daemon.detokenizer import IncrementalDetokenizer
    from moed.daemon.tokenizer import TemplateError, TextTokenizer, TokenizerError
    from moed.engine.config import engine_config_from_args
    from moed.engine.llm_engine import LLMEngine
    from moed.model.checkpoint import builtin_checkpoint

    model = args.model
    name = builtin_name(model)
    if name is not None:
        model = str(builtin_checkpoint(name))
        logging.getLogger("moed.generate").info("model: the built-in %s checkpoint in %s", name, model)
    try:
        sampling = msgspec.convert(sampling_from_args(args), SamplingParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"sampling: {e}") from None
    engine = LLMEngine(engine_config_from_args(args, model))  # a bad checkpoint fails here, naming the file
    try:
        tok = TextTokenizer(model)
        if args.chat or args.system:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            ids = tok.encode_chat([*messages, {"role": "user", "content": args.prompt}])
        else:
            ids = tok.encode(args.prompt)
    except (TokenizerError, TemplateError) as e:
        raise ValueError(str(e)) from None
    engine.add_request("generate", ids, sampling)
    detok = IncrementalDetokenizer(tok, ids)
    while engine.has_unfinished:
        for out in engine.step():
            sys.stdout.write(detok.add(out.new_token_ids))
            sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    return 0


def _cmd_tune_moe(args: argparse.Namespace) -> int:
    from moed.kernels.fused_moe_tuner import main as tune_main

    return tune_main(args.tune_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moed", description="Expert-offload MoE runtime for GLM-5.1", formatter_class=_Help
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent: Any, name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=text, description=text, formatter_class=_Help, **kw)

    ck = command(sub, "checkpoint", "checkpoint tools").add_subparsers(dest="checkpoint_cmd", required=True)
    mk = command(ck, "make", "write a random-weight GLM-5.1-architecture checkpoint")
    mk.add_argument("--preset", choices=["tiny", "small", "glm51-slice", "glm51"], default="tiny", help="model shape")
    mk.add_argument("--out", required=True, help="output directory")
    mk.add_argument(
        "--dtype",
        choices=["bf16", "fp8", "int4"],
        default="bf16",
        help="weight format (int4: routed experts in compressed-tensors pack-quantized W4A16_ASYM, the rest bf16)",
    )
    mk.add_argument("--seed", type=int, default=0, help="random weights' seed")
    mk.add_argument("--layers", type=int, help="num_hidden_layers (main stack; default: the preset's)")
    mk.add_argument("--experts", type=int, help="routed experts per MoE layer (default: the preset's)")
    mk.add_argument("--mtp-layers", type=int, help="MTP (NextN) layers (default: the preset's)")
    mk.add_argument("--shard-gib", type=float, help="shard size in GiB (default: one shard)")
    mk.add_argument("--device", help="where random weights are drawn (default: cuda if present)")
    mk.set_defaults(func=_cmd_checkpoint_make)

    # Daemon and client subcommands: their modules import no torch.
    from moed.client.cli import add_client_arguments, add_sampling_arguments, client_main
    from moed.daemon.service import add_config_check_arguments, add_serve_arguments, config_check_main, serve_main
    from moed.engine.config import add_engine_arguments

    g = command(sub, "generate", "run one prompt through the engine in this process (no daemon)")
    g.add_argument("--model", required=True, help="checkpoint directory, or a built-in one: tiny, small")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--system", help="system message (implies --chat)")
    add_sampling_arguments(
        g.add_argument_group("sampling (the protocol's SamplingParams)"), exclude=("stop", "logprobs")
    )
    add_engine_arguments(g.add_argument_group("engine settings (moed.engine.config)"), exclude=("seed",))
    g.add_argument("prompt")
    g.set_defaults(func=_cmd_generate)

    s = command(sub, "serve", "run the daemon: ZMQ service, engine worker, metrics")
    add_serve_arguments(s)
    s.set_defaults(func=serve_main)
    c = command(sub, "client", "send a prompt or a health/stats/placement request to a daemon")
    add_client_arguments(c)
    c.set_defaults(func=client_main)
    cf = command(sub, "config", "configuration tools").add_subparsers(dest="config_cmd", required=True)
    chk = command(cf, "check", "validate a daemon TOML file and print the effective configuration")
    add_config_check_arguments(chk)
    chk.set_defaults(func=config_check_main)

    t = command(sub, "tune-moe", "tune fused-MoE kernel configs on this GPU (see --help of the tuner)", add_help=False)
    t.add_argument("tune_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=_cmd_tune_moe)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse's REMAINDER cannot start with an option (`moed tune-moe --E 256`): the tuner's options arrive as
    # unknown arguments and are handed to it whole; any other command with unknown arguments is an error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "tune-moe":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        raw = list(sys.argv[1:] if argv is None else argv)
        args.tune_args = raw[raw.index("tune-moe") + 1 :]
    if args.command not in CLIENT_COMMANDS:
        missing = missing_serve_modules()
        if missing:
            print(
                f"moed {args.command}: needs the 'serve' extra, which this install lacks (no {', '.join(missing)}):"
                " pip install 'moed[serve]' (on a GPU server, install your CUDA build of torch first)",
                file=sys.stderr,
            )
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # ConfigError and CheckpointError are ValueErrors whose message names the file and field.
        print(f"moed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
