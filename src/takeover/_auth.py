"""Who is on the other end of the control channel.

Today: peer credentials (SO_PEERCRED). A peer is accepted when it runs as the
same user as this process, or as root. The shared-secret challenge-response
and TLS of a later issue plug in beside :func:`check_peer`.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from ._errors import AuthenticationError

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
