"""CurveZMQ for the client socket: the daemon's keypair and an allow-list of client public keys.

Key files are zmq.auth certificates (`zmq.auth.create_certificates`, or `moed client --keygen`):
the daemon reads its secret certificate and every `*.key` public certificate in the allow-list
directory. A ZAP handler (pyzmq's asyncio Authenticator, in the daemon's loop) accepts a client
whose public key is listed and refuses every other one during the handshake, before any message
of it is read. The list is read at start-up; restart the daemon to change it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger(__name__)


class CurveError(Exception):
    pass


class AllowList:
    """ZAP credentials provider: a client is allowed when its Z85 public key is in the list."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            self.denied += 1
            log.warning("refused a client with Curve key %s (not in the allow-list)", key.decode(errors="replace"))
        return ok


def load_allow_list(directory: str | Path) -> set[bytes]:
    d = Path(directory)
    if not d.is_dir():
        raise CurveError(f"curve_allowed_clients: {str(d)!r} is not a directory of client public certificates")
    keys: set[bytes] = set()
    for path in sorted(d.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise CurveError(f"curve_allowed_clients: cannot read certificate {str(path)!r}: {e}") from e
        keys.add(public)
    if not keys:
        log.warning("Curve allow-list %s holds no *.key certificate: every client will be refused", d)
    return keys


def load_server_keys(path: str | Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveError(f"curve_secret_key: cannot read certificate {str(path)!r}: {e}") from e
    if not secret:
        raise CurveError(f"curve_secret_key: {str(path)!r} holds no secret key (give the *.key_secret file)")
    return public, secret


def enable_curve(
    ctx: zmq.asyncio.Context, sock: zmq.Socket, secret_cert: str, allowed_dir: str
) -> tuple[AsyncioAuthenticator, AllowList]:
    """Make `sock` a Curve server that admits only allow-listed clients; call before bind()."""
    public, secret = load_server_keys(secret_cert)
    allow = AllowList(load_allow_list(allowed_dir))
    auth = AsyncioAuthenticator(ctx, log=logging.getLogger("moed.daemon.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    log.info("Curve on: %d allowed client key(s) from %s", len(allow.keys), allowed_dir)
    return auth, allow
