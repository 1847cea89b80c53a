"""The `moed` command line.

Subcommands that need torch import it inside their handler, so `moed serve` and `moed client`
stay light (the daemon process never imports torch).
"""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_checkpoint_make(args: argparse.Namespace) -> int:
    from moed.model.checkpoint import make_checkpoint

    out = make_checkpoint(args.out, preset=args.preset, dtype=args.dtype, seed=args.seed, layers=args.layers,
                          experts=args.experts, mtp_layers=args.mtp_layers,
                          shard_bytes=int(args.shard_gib * (1 << 30)) if args.shard_gib else None,
                          device=args.device)
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer

    from moed.engine.generate import generate_ids, load, stream_text
    from moed.model.checkpoint import builtin_checkpoint
    from moed.model.tokenizer import render_chat

    if args.model in ("tiny", "small") and not Path(args.model).is_dir():
        args.model = str(builtin_checkpoint(args.model))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    m = load(args.model, device=args.device, dtype=dtypes[args.dtype] if args.dtype else None,
             expert_dtype=args.expert_dtype, int4_cache_dir=args.int4_cache_dir)
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    prompt = args.prompt
    if args.chat:
        tcfg = json.loads((Path(args.model) / "tokenizer_config.json").read_text())
        prompt = render_chat(tcfg["chat_template"], [{"role": "user", "content": prompt}])
    ids = tok.encode(prompt, add_special_tokens=False).ids
    stop = set() if args.ignore_eos else set(m.cfg.eos_token_ids)
    tokens = generate_ids(m, ids, args.max_tokens, args.temperature, args.seed, stop)
    for delta in stream_text(lambda x: tok.decode(x, skip_special_tokens=True), tokens):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_tune_moe(args: argparse.Namespace) -> int:
    from moed.kernels.fused_moe_tuner import main as tune_main

    return tune_main(args.tune_args)


def build_parser() -> argparse.ArgumentParser:
    from moed.model.config import EXPERT_DTYPES  # torch-free

    p = argparse.ArgumentParser(prog="moed", description="Expert-offload MoE runtime for GLM-5.1")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_cmd", required=True)
    mk = ck.add_parser("make", help="write a random-weight GLM-5.1-architecture checkpoint")
    mk.add_argument("--preset", choices=["tiny", "small", "glm51-slice"], default="tiny")
    mk.add_argument("--out", required=True, help="output directory")
    mk.add_argument("--dtype", choices=["bf16", "fp8", "int4"], default="bf16",
                    help="int4: routed experts in compressed-tensors pack-quantized W4A16_ASYM, the rest bf16")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--layers", type=int, help="num_hidden_layers (main stack)")
    mk.add_argument("--experts", type=int, help="routed experts per MoE layer")
    mk.add_argument("--mtp-layers", type=int, help="MTP (NextN) layers")
    mk.add_argument("--shard-gib", type=float, help="shard size in GiB")
    mk.add_argument("--device", help="where random weights are drawn (default: cuda if present)")
    mk.set_defaults(func=_cmd_checkpoint_make)

    g = sub.add_parser("generate", help="generate text from a prompt with an incremental KV cache")
    g.add_argument("--model", required=True, help="checkpoint directory, or 'tiny' / 'small' (built in)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--expert-dtype", choices=EXPERT_DTYPES, default="checkpoint",
                   help="int4: quantise bf16 / FP8 routed experts to 4 bits at load")
    g.add_argument("--int4-cache-dir", help="with --expert-dtype int4: keep the quantised experts here for next time")
    g.add_argument("prompt")
    g.set_defaults(func=_cmd_generate)

    # Daemon and client subcommands: their modules import no torch.
    from moed.client.cli import add_client_arguments, client_main
    from moed.daemon.service import add_config_check_arguments, add_serve_arguments, config_check_main, serve_main

    s = sub.add_parser("serve", help="run the daemon: ZMQ service, engine worker, metrics")
    add_serve_arguments(s)
    s.set_defaults(func=serve_main)
    c = sub.add_parser("client", help="send a prompt or a health/stats/placement request to a daemon")
    add_client_arguments(c)
    c.set_defaults(func=client_main)
    cf = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_cmd", required=True)
    chk = cf.add_parser("check", help="validate a daemon TOML file and print the effective configuration")
    add_config_check_arguments(chk)
    chk.set_defaults(func=config_check_main)

    t = sub.add_parser("tune-moe", help="tune fused-MoE kernel configs on this GPU (see --help of the tuner)",
                       add_help=False)
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
        args.tune_args = raw[raw.index("tune-moe") + 1:]
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # ConfigError and CheckpointError are ValueErrors whose message names the file and field.
        print(f"moed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
