"""The client library's public names: the sync and asyncio clients, their results and errors, CurveZMQ keys.

Needs pyzmq and msgspec, never torch:

    from moed.client.api import Client
    with Client("tcp://127.0.0.1:5710") as c:
        print(c.generate("Hello", max_tokens=32).text)
        for delta in c.stream("Hello", max_tokens=32):
            print(delta.text, end="", flush=True)

`AsyncClient` offers the same calls as coroutines; the wire protocol is `moed.client.protocol`.
"""

from moed.client.async_client import AsyncClient, AsyncStream
from moed.client.calls import AuthenticationError, Completion, DaemonUnavailable, Delta, MoedError, RequestTimeout
from moed.client.keys import CurveKeys, curve_keys, keygen
from moed.client.sync_client import Client, Stream

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "Client",
    "Completion",
    "CurveKeys",
    "DaemonUnavailable",
    "Delta",
    "MoedError",
    "RequestTimeout",
    "Stream",
    "curve_keys",
    "keygen",
]
