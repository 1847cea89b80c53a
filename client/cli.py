"""`moed client`: a prompt from the shell, and the daemon's other requests.

Streams the completion to stdout; with --json prints the whole result as one JSON object instead.
The daemon is at --address, else $MOED_ADDRESS, else tcp://127.0.0.1:5710; when nothing listens there
the command says so at once, and how to start or find a daemon. Sampling flags are made from
`SamplingParams` (client/protocol.py): their help and defaults are the protocol's own.
Exit status: 0 done, 1 the daemon refused or failed the request, 2 no usable connection,
130 interrupted (the request is aborted first).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import asdict
from typing import Any

import msgspec
import msgspec.inspect as mi

from moed.client import protocol as cp
from moed.client.calls import ADDRESS_ENV, DEFAULT_ADDRESS, Completion, MoedError
from moed.client.keys import curve_keys, keygen
from moed.client.sync_client import Client

PROBE_TIMEOUT_S = 3.0  # how long `moed client` waits for a TCP connection before saying no daemon is there
HOW_TO_START = (
    f"start one with `moed serve --model tiny` (or your checkpoint: `moed serve --help`), or give its "
    f"address with --address or {ADDRESS_ENV}"
)


def add_sampling_arguments(parser: argparse.ArgumentParser | Any, exclude: tuple[str, ...] = ()) -> None:
    """One flag per SamplingParams field (help: the field's description, default: the protocol's). Unset flags
    stay None, so the protocol's defaults apply; `sampling_from_args` collects the set ones."""
    for f in mi.type_info(cp.SamplingParams).fields:
        if f.name in exclude:
            continue
        t = f.type
        if isinstance(t, mi.UnionType):  # X | None
            t = next(a for a in t.types if not isinstance(a, mi.NoneType))
        doc = (t.extra_json_schema or {}).get("description", "") if isinstance(t, mi.Metadata) else ""
        t = t.type if isinstance(t, mi.Metadata) else t
        default = f.default if f.default is not msgspec.NODEFAULT else []
        flag = "--" + f.name.replace("_", "-")
        if isinstance(t, mi.BoolType):
            parser.add_argument(flag, dest=f"sp_{f.name}", action="store_const", const=True, default=None, help=doc)
        elif isinstance(t, mi.ListType):
            item = int if isinstance(t.item_type, mi.IntType) else str
            parser.add_argument(
                flag,
                dest=f"sp_{f.name}",
                action="append",
                type=item,
                default=None,
                metavar="ID" if item is int else "TEXT",
                help=f"{doc} (repeatable)",
            )
        else:
            kind = int if isinstance(t, mi.IntType) else float
            shown = "none" if default is None else default
            parser.add_argument(
                flag,
                dest=f"sp_{f.name}",
                type=kind,
                default=None,
                metavar="N" if kind is int else "X",
                help=f"{doc} (default: {shown})",
            )


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields given on the command line."""
    return {
        name: getattr(args, f"sp_{name}")
        for name in cp.SamplingParams.__struct_fields__
        if getattr(args, f"sp_{name}", None) is not None
    }


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="prompt text ('-' reads standard input)")
    parser.add_argument(
        "--address", default=None, help=f"daemon endpoint (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})"
    )
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--system", help="system message (implies --chat)")
    add_sampling_arguments(parser.add_argument_group("sampling (the protocol's SamplingParams)"))
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole completion")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before the request is aborted (default: 600)"
    )
    parser.add_argument("--curve-server-key", help="the daemon's Curve public key (Z85 text or its .key file)")
    parser.add_argument("--curve-cert", help="this client's secret certificate (.key_secret)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--health", action="store_true", help="print the daemon's health")
    what.add_argument("--ready", action="store_true", help="print readiness; exit 1 when not ready")
    what.add_argument("--stats", action="store_true", help="print daemon and engine statistics")
    what.add_argument("--models", action="store_true", help="list served models")
    what.add_argument("--placement", choices=["get", "pin", "unpin", "reset"], help="expert placement request")
    what.add_argument("--keygen", metavar="DIR", help="write a Curve certificate pair NAME.key(_secret) into DIR")
    parser.add_argument("--layer", type=int, help="layer for --placement")
    parser.add_argument("--expert", type=int, help="expert for --placement")
    parser.add_argument("--name", default="client", help="certificate name for --keygen (default: client)")


def _print_struct(obj: object) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2, ensure_ascii=False))


def nothing_listens(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why no daemon can be at `address` (refused, no such socket file, unreachable), or None when something
    accepts connections there. ZMQ itself would keep retrying in silence."""
    try:
        if address.startswith("ipc://"):
            path = address[len("ipc://") :]
            if not os.path.exists(path):
                return f"no socket file {path}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
        elif address.startswith("tcp://"):
            host, _, port = address[len("tcp://") :].rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
    except ValueError:
        return None  # not HOST:PORT: let ZMQ report it
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def client_main(args: argparse.Namespace) -> int:
    if args.keygen:
        public, secret = keygen(args.keygen, args.name)
        print(f"public key (give to the daemon's curve_allowed_clients directory): {public}\nsecret: {secret}")
        return 0
    try:
        curve = curve_keys(args.curve_server_key, args.curve_cert) if args.curve_server_key else None
    except ValueError as e:
        print(f"moed client: {e}", file=sys.stderr)
        return 2
    address = args.address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    why = nothing_listens(address)
    if why is not None:
        print(f"moed client: no daemon at {address} ({why}); {HOW_TO_START}", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with Client(address, timeout=args.timeout, curve=curve) as client:
        try:
            if args.health:
                _print_struct(client.health())
            elif args.ready:
                status = client.ready()
                _print_struct(status)
                return 0 if status.ready else 1
            elif args.stats:
                _print_struct(client.stats())
            elif args.models:
                _print_struct(client.models())
            elif args.placement:
                result = client.placement(args.placement, args.layer, args.expert)
                _print_struct(result)
                return 0 if result.ok else 1
            else:
                if prompt is None:
                    print("moed client: give a prompt (or '-' to read one from standard input)", file=sys.stderr)
                    return 2
                return _generate(client, prompt, args)
        except MoedError as e:
            print(f"moed client: {e}", file=sys.stderr)
            return 1
        except (ConnectionError, TimeoutError) as e:
            print(f"moed client: {e} (is a moed daemon listening at {address}? {HOW_TO_START})", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\nmoed client: interrupted; request aborted", file=sys.stderr)
            return 130
    return 0


def _generate(client: Client, prompt: str, args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = sampling_from_args(args)
    try:
        if args.chat or args.system:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            kwargs["messages"] = [*messages, {"role": "user", "content": prompt}]
            prompt = None
        if args.no_stream or args.json:
            result = client.generate(prompt, **kwargs)
            if args.json:
                print(json.dumps(msgspec.to_builtins(asdict(result)), ensure_ascii=False))
            else:
                if result.reasoning:  # chat: the model's thinking goes to stderr, the answer to stdout
                    print(result.reasoning, file=sys.stderr)
                print(result.text)
                _print_tool_calls(result)
            return 0
        stream = client.stream(prompt, **kwargs)
        for delta in stream:
            if delta.reasoning:
                sys.stderr.write(delta.reasoning)
                sys.stderr.flush()
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        c = stream.completion
        if c is not None:
            _print_tool_calls(c)
            print(
                f"[{c.finish_reason}; {c.prompt_tokens} prompt + {c.completion_tokens} generated tokens; "
                f"first token {c.ttft_s or 0:.3f} s; total {c.e2e_s:.3f} s]",
                file=sys.stderr,
            )
    except ValueError as e:
        print(f"moed client: {e}", file=sys.stderr)
        return 2
    return 0


def _print_tool_calls(result: Completion) -> None:
    for call in result.tool_calls:
        print(f"[tool call {call.id}: {call.name}({call.arguments})]", file=sys.stderr)


if __name__ == "__main__":  # `python -m moed.client.cli ...` is `moed client ...`
    _parser = argparse.ArgumentParser(prog="moed client")
    add_client_arguments(_parser)
    sys.exit(client_main(_parser.parse_args()))
