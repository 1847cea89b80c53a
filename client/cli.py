"""`moed client`: a prompt from the shell, and the daemon's other requests.

Streams the completion to stdout; with --json prints the whole result as one JSON object instead.
Exit status: 0 done, 1 the daemon refused or failed the request, 2 no usable connection,
130 interrupted (the request is aborted first).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import msgspec

from moed.client.calls import DEFAULT_ADDRESS, Completion, MoedError
from moed.client.keys import curve_keys, keygen
from moed.client.sync_client import Client


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="prompt text ('-' reads standard input)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"daemon endpoint (default {DEFAULT_ADDRESS})")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--system", help="system message (implies --chat)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole completion")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the request is aborted")
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
    parser.add_argument("--name", default="client", help="certificate name for --keygen")


def _print_struct(obj: object) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2, ensure_ascii=False))


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
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with Client(args.address, timeout=args.timeout, curve=curve) as client:
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
            print(f"moed client: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\nmoed client: interrupted; request aborted", file=sys.stderr)
            return 130
    return 0


def _generate(client: Client, prompt: str, args: argparse.Namespace) -> int:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop)
    try:
        if args.chat or args.system:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
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
            print(f"[{c.finish_reason}; {c.prompt_tokens} prompt + {c.completion_tokens} generated tokens; "
                  f"first token {c.ttft_s or 0:.3f} s; total {c.e2e_s:.3f} s]", file=sys.stderr)
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
