"""Curve keys for clients: generating certificates and applying keys to a socket.

Certificates are zmq.auth's files: `NAME.key` holds the public key (give it to the daemon's
allow-list directory, or to clients as the server key) and `NAME.key_secret` both keys (keep it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes  # Z85
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def _server_key(value: str | bytes | os.PathLike) -> bytes:
    if isinstance(value, bytes | str) and len(value) == 40 and not Path(str(value)).exists():
        return value.encode() if isinstance(value, str) else value
    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"curve server key {value!r} is neither a 40-character Z85 key nor a readable certificate file: {e}"
        ) from e
    return public


def curve_keys(server_key: str | bytes | os.PathLike, client_cert: str | os.PathLike | None = None) -> CurveKeys:
    """Keys for a Curve connection: the daemon's public key (Z85 text or its .key file) and this
    client's secret certificate (a .key_secret file; None: a fresh keypair, for daemons that allow any key)."""
    server = _server_key(server_key)
    if client_cert is None:
        public, secret = zmq.curve_keypair()
    else:
        try:
            public, secret = zmq.auth.load_certificate(client_cert)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read client certificate {str(client_cert)!r}: {e}") from e
        if not secret:
            raise ValueError(f"client certificate {str(client_cert)!r} has no secret key (give the .key_secret file)")
    return CurveKeys(server, public, secret)


def keygen(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into `directory`; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(d, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)
