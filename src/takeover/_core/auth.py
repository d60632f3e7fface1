"""Who is on the other end of the control channel.

Three checks, all before a byte of service data moves:

* **Peer credentials** (SO_PEERCRED) on AF_UNIX: the peer runs as the same
  user as this process, or as root, or as a user or in a group this process
  admits (:class:`Admission`: ``--admit-user``, ``--admit-group``).
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

import errno
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import socket
import ssl
import stat
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import AuthenticationError

AUTH_SCHEME = "hmac-sha256"
NONCE_BYTES = 32

_UCRED = struct.Struct("3i")
# PyPy's socket module lacks the constant; 17 is its value on Linux.
_SO_PEERCRED: int = getattr(socket, "SO_PEERCRED", 17)
# The peer's supplementary groups as they were at connect() (Linux 4.13).
# Python's socket module has no name for it; its value is 59 in the kernel's
# generic numbering, which these machines use (alpha, mips, parisc and sparc
# number it otherwise: there /proc is read instead).
_GENERIC_SOCKOPTS = ("x86_64", "i386", "i486", "i586", "i686", "aarch64", "arm", "riscv", "s390")
_SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None)
if _SO_PEERGROUPS is None and sys.platform == "linux":
    if os.uname().machine.startswith(_GENERIC_SOCKOPTS):
        _SO_PEERGROUPS = 59
# getsockopt() buffers are at most 1024 bytes in CPython: 256 groups.
_GROUPS_BUFFER = 1024


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of an AF_UNIX socket.

    Attributes:
        pid, uid, gid: from SO_PEERCRED, as they were when the peer
            connected (or listened).
        groups: its supplementary groups at that same moment
            (SO_PEERGROUPS); None where the kernel could not say (before
            Linux 4.13, or more than 256 groups).
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The peer's pid, uid, gid and groups, or None where the socket is not AF_UNIX."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    if _SO_PEERGROUPS is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_BUFFER)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.ERANGE, errno.EINVAL):
            return None
        raise
    count = len(raw) // 4
    return struct.unpack(f"{count}I", raw[: 4 * count])


def _resolve(value: int | str, kind: str) -> int:
    """The id of a user or group (``kind``) given by name or by number."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"cannot admit {kind} {value}: ids are not negative")
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        if kind == "user":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"cannot admit {kind} {value!r}: there is no such {kind}") from None


def resolve_user(user: int | str) -> int:
    """The uid of ``user``, a name or a number (a number needs no entry).

    Raises:
        ValueError: no user has that name.
    """
    return _resolve(user, "user")


def resolve_group(group: int | str) -> int:
    """The gid of ``group``, a name or a number (a number needs no entry).

    Raises:
        ValueError: no group has that name.
    """
    return _resolve(group, "group")


def user_name(uid: int) -> str:
    """``uid``'s name, or the number where the user database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """``gid``'s name, or the number where the group database has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@dataclass(frozen=True)
class Admission:
    """Who may be the peer on a control channel besides this process's own
    user and root: users (uids) and groups (gids).

    A peer is admitted when its uid is one of ``users``, or its primary
    group or one of its supplementary groups is one of ``groups``. The same
    admission serves both directions: the recipients a migration server
    accepts, and the originators a recipient accepts to take from.
    """

    users: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()

    @classmethod
    def of(cls, users: Iterable[int | str] = (), groups: Iterable[int | str] = ()) -> Admission:
        """The admission of ``users`` and ``groups``, each a name or an id.

        Raises:
            ValueError: a name that the user or group database does not know.
        """
        return cls(
            tuple(dict.fromkeys(resolve_user(user) for user in users)),
            tuple(dict.fromkeys(resolve_group(group) for group in groups)),
        )

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)

    def admits(self, creds: PeerCredentials) -> bool:
        """Whether ``creds`` is an admitted user or in an admitted group."""
        if creds.uid in self.users:
            return True
        if not self.groups:
            return False
        if creds.gid in self.groups:
            return True
        groups = creds.groups if creds.groups is not None else _proc_groups(creds)
        return any(gid in self.groups for gid in groups)

    def describe(self) -> str:
        """``user nobody, group www-data``: who is admitted, for messages."""
        names = [f"user {user_name(uid)}" for uid in self.users]
        names += [f"group {group_name(gid)}" for gid in self.groups]
        return ", ".join(names)

    def socket_mode(self) -> tuple[int, int | None]:
        """The mode and group (None: leave it) of a control socket file.

        Connecting to an AF_UNIX socket needs write permission on its file.
        Nobody admitted: 0600, this user only. One group and no user: the
        file goes to that group, 0660, so the kernel lets in no one the peer
        check would refuse anyway. Otherwise (users, or several groups, which
        one file's group can't express): 0666, and the peer check decides,
        before a byte is read; restrict further with the directory's mode.
        """
        if not self:
            return 0o600, None
        if not self.users and len(self.groups) == 1:
            return 0o660, self.groups[0]
        return 0o666, None


def _proc_groups(creds: PeerCredentials) -> tuple[int, ...]:
    """The supplementary groups of ``creds.pid`` from /proc, where SO_PEERGROUPS
    could not say.

    Racy where SO_PEERGROUPS is not: the groups are read now, not as they were
    at connect(), and the pid may by now be another process. The Uid and Gid
    lines must still match the credentials, so a reused pid counts only if it
    runs as the same user and group; anything unreadable admits nothing.
    """
    try:
        with open(f"/proc/{creds.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        uids = [int(v) for v in fields["Uid"].split()]
        gids = [int(v) for v in fields["Gid"].split()]
        groups = tuple(int(v) for v in fields["Groups"].split())
    except (OSError, KeyError, ValueError):
        return ()
    if uids[1] != creds.uid or gids[1] != creds.gid:
        return ()
    return groups


def check_peer(
    creds: PeerCredentials | None, *, role: str, admission: Admission = Admission()
) -> None:
    """Accept a peer of the same uid, root, or one that ``admission`` admits;
    refuse anyone else.

    Args:
        creds: the peer's credentials (None: not an AF_UNIX peer).
        role: what the peer is to us ("recipient" or "originator"), for the
            message.
        admission: the other users and groups accepted.

    Raises:
        AuthenticationError: the peer runs as another, unprivileged user that
            is not admitted, or its credentials are unknown.
    """
    if creds is None:
        raise AuthenticationError(
            f"cannot check the {role}'s credentials on this kind of socket; "
            "use an AF_UNIX control path"
        )
    me = os.geteuid()
    if creds.uid in (me, 0) or admission.admits(creds):
        return
    who = user_name(creds.uid)
    name = f" ({who})" if who != str(creds.uid) else ""
    admitted = f"; this process admits {admission.describe()}" if admission else ""
    raise AuthenticationError(
        f"refused {role} pid {creds.pid}: it runs as uid {creds.uid}{name}, gid {creds.gid}, "
        f"this process as uid {me} ({user_name(me)}){admitted}; run both as the same user, "
        f"or admit it here with --admit-user {who} (admit_users= in the API) or "
        "--admit-group with one of its groups"
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
