"""Who is on the other end of the control channel.

Three checks, all before a byte of service data moves:

* **Peer credentials** (SO_PEERCRED) on AF_UNIX: the peer runs as the same
  user as this process, or as root.
* **A shared secret**, when one is configured: a mutual HMAC-SHA256
  challenge-response. Each side sends a fresh 256-bit nonce; each proves it
  knows the secret by the HMAC of both nonces, labelled with its role, so a
  recorded exchange proves nothing on another connection (the other side's
  nonce differs) and one side's proof can't be reflected back as the other's.
  Proofs are compared in constant time.
* **TLS with certificates on both sides**, for a TCP control channel.

Over TCP there are no peer credentials, so a secret or TLS is mandatory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import ssl
import stat
import struct
from dataclasses import dataclass

from .errors import AuthenticationError

AUTH_SCHEME = "hmac-sha256"
NONCE_BYTES = 32

_UCRED = struct.Struct("3i")
# PyPy's socket module lacks the constant; 17 is its value on Linux.
_SO_PEERCRED: int = getattr(socket, "SO_PEERCRED", 17)


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of an AF_UNIX socket."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The peer's pid, uid and gid, or None where the socket is not AF_UNIX."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def check_peer(creds: PeerCredentials | None, *, role: str) -> None:
    """Accept a peer of the same uid, or root; refuse anyone else.

    Args:
        creds: the peer's credentials (None: not an AF_UNIX peer).
        role: what the peer is to us ("recipient" or "originator"), for the
            message.

    Raises:
        AuthenticationError: the peer runs as another, unprivileged user, or
            its credentials are unknown.
    """
    if creds is None:
        raise AuthenticationError(
            f"cannot check the {role}'s credentials on this kind of socket; "
            "use an AF_UNIX control path"
        )
    me = os.geteuid()
    if creds.uid not in (me, 0):
        raise AuthenticationError(
            f"refused {role} pid {creds.pid}: it runs as uid {creds.uid}, this process as "
            f"uid {me}; run both as the same user (or the {role} as root)"
        )


def load_secret(path: str) -> bytes:
    """Read a shared secret from ``path``, refusing a file others can read.

    Raises:
        AuthenticationError: the file is readable or writable by group or
            others, owned by another user, or empty.
        OSError: it can't be read at all.
    """
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuthenticationError(
                f"secret file {path} is accessible to other users "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
            )
        if info.st_uid not in (os.geteuid(), 0):
            raise AuthenticationError(
                f"secret file {path} belongs to uid {info.st_uid}, not to this user"
            )
        secret = f.read().strip()
    if not secret:
        raise AuthenticationError(f"secret file {path} is empty")
    return secret


def new_nonce() -> str:
    """A fresh random nonce, hex-encoded."""
    return secrets.token_hex(NONCE_BYTES)


def proof(secret: bytes, role: str, own_nonce: str, peer_nonce: str) -> str:
    """What ``role`` sends to prove it knows ``secret`` on this connection."""
    message = f"takeover/1 {role} {own_nonce} {peer_nonce}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_proof(secret: bytes, role: str, own_nonce: str, peer_nonce: str, given: object) -> None:
    """Check the proof of the peer playing ``role``, in constant time.

    Raises:
        AuthenticationError: the proof is missing or wrong.
    """
    expected = proof(secret, role, own_nonce, peer_nonce)
    if not isinstance(given, str) or not hmac.compare_digest(expected, given):
        raise AuthenticationError(
            f"the {role} failed the shared-secret challenge: its secret differs from this "
            "side's (check both --secret-file arguments)"
        )


def check_nonce(value: object, whose: str) -> str:
    """Validate a nonce received from the peer."""
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise AuthenticationError(f"the {whose} sent no valid nonce")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise AuthenticationError(f"the {whose} sent no valid nonce") from None
    return value


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for a TCP control channel; both sides present one.

    Attributes:
        cert: this side's certificate (PEM).
        key: its private key (PEM).
        ca: the CA certificate(s) that signed the peer's certificate.
    """

    cert: str
    key: str
    ca: str

    def context(self, *, server: bool) -> ssl.SSLContext:
        """An SSLContext that requires and verifies the peer's certificate."""
        purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
        context = ssl.create_default_context(purpose, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not server:
            # The control peer is named by address; the CA is the trust anchor.
            context.check_hostname = False
        return context
