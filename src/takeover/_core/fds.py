"""File descriptors over an AF_UNIX stream socket (SCM_RIGHTS).

Linux refuses more than ``SCM_MAX_FD`` (253) descriptors in one message, so
descriptors travel in batches. Each batch is attached to the first byte of the
bytes sent with it; the kernel never merges a message that carries
descriptors with later data, so a reader that always uses ``recvmsg`` receives
every batch no later than the first byte it rode on. The control protocol
relies on that: an FDS frame announces how many descriptors it carries, and by
the time the whole frame has been read they are in the receive queue.

Descriptors are received with ``MSG_CMSG_CLOEXEC`` so that a child process
never inherits a service's sockets, and a truncated control message
(``MSG_CTRUNC``) is an error: the kernel has closed the descriptors that did
not fit, and the service they belonged to cannot be rebuilt.
"""

from __future__ import annotations

import array
import os
import socket
import sys
from collections.abc import Sequence

from .errors import ProtocolError

SCM_MAX_FD = 253
"""The most descriptors Linux accepts in one SCM_RIGHTS message."""

_INT_SIZE = array.array("i").itemsize
# Linux's value where the socket module lacks the constant (PyPy 3.9 does):
# without the flag every descriptor received would be inherited by children.
_MSG_CMSG_CLOEXEC: int = getattr(
    socket, "MSG_CMSG_CLOEXEC", 0x40000000 if sys.platform.startswith("linux") else 0
)


def batches(fds: Sequence[int], size: int = SCM_MAX_FD) -> list[list[int]]:
    """Split ``fds`` into lists of at most ``size`` descriptors, in order."""
    if size < 1 or size > SCM_MAX_FD:
        raise ValueError(f"batch size must be between 1 and {SCM_MAX_FD}, not {size}")
    return [list(fds[i : i + size]) for i in range(0, len(fds), size)]


def ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ``sendmsg`` ancillary data that passes ``fds`` (at most 253)."""
    if not fds:
        return []
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"at most {SCM_MAX_FD} descriptors fit in one message, not {len(fds)}")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def ancillary_space(max_fds: int = SCM_MAX_FD) -> int:
    """The ``recvmsg`` ancillary buffer size for ``max_fds`` descriptors."""
    return socket.CMSG_SPACE(max_fds * _INT_SIZE)


def recv_with_fds(sock: socket.socket, bufsize: int) -> tuple[bytes, list[int]]:
    """Read up to ``bufsize`` bytes and any descriptors that came with them.

    Raises:
        BlockingIOError: nothing to read on a non-blocking socket.
        ProtocolError: the ancillary data was truncated or is not SCM_RIGHTS;
            any descriptors that did arrive are closed first.
    """
    data, ancdata, flags, _addr = sock.recvmsg(bufsize, ancillary_space(), _MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    unexpected = False
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:usable]))
        else:
            unexpected = True
    if flags & socket.MSG_CTRUNC or unexpected:
        close_all(fds)
        what = "truncated (MSG_CTRUNC)" if flags & socket.MSG_CTRUNC else "not SCM_RIGHTS"
        raise ProtocolError(
            f"ancillary data on the control channel was {what}: descriptors were lost; "
            f"the transfer cannot be completed{_descriptor_hint()}"
        )
    return data, fds


def _descriptor_hint() -> str:
    """Why descriptors may have been dropped: this process ran out of them."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError):
        return ""
    if soft == resource.RLIM_INFINITY or in_use < soft - 2 * SCM_MAX_FD:
        return ""
    return (
        f" (this process has {in_use} descriptors open and may open {soft}: "
        "raise RLIMIT_NOFILE, e.g. `ulimit -n`, before taking a service this large)"
    )


def send_with_fds(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int]) -> int:
    """Send ``data`` with ``fds`` attached to its first byte; return bytes sent.

    The caller sends whatever was not sent with plain ``send``: the
    descriptors went with the first byte.
    """
    if not data:
        raise ValueError("descriptors must ride on at least one byte of data")
    return sock.sendmsg([data], ancillary(fds))


def close_all(fds: Sequence[int]) -> None:
    """Close every descriptor in ``fds``, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
