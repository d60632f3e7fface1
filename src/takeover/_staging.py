"""Connections registered for reading before the graph that owns them arrives.

A move sends the sockets of a service ahead of its graph, while the service
still runs in the originator (see :class:`~takeover._serialize.EarlySockets`).
The recipient registers each stream socket with an epoll instance of its own
as it arrives: one system call per connection, done outside the pause, and
*passive* (nothing reads from the sockets; the instance is not watched by
any event loop yet).

After the graph is rebuilt, the first server that adopts it may :func:`claim`
the instance as its poller (the asyncio runtime does); it keeps the
registrations of its connections and removes the others. Whatever is not
claimed is closed with the move, which drops every registration at once. A
rollback closes the sockets, which drops them as well.
"""

from __future__ import annotations

import _socket
import select
import socket
from collections.abc import Iterable

_raw_type = _socket.socket.type.__get__  # an int, without the enum conversion


class Staging:
    """An epoll instance with the stream sockets sent ahead registered for reading."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.registered: set[int] = set()
        self.claimed = False

    def add(self, sockets: Iterable[socket.socket]) -> None:
        register, registered = self.epoll.register, self.registered
        for sock in sockets:
            if _raw_type(sock) == socket.SOCK_STREAM:
                fd = sock.fileno()
                register(fd, select.EPOLLIN)
                registered.add(fd)

    def close(self) -> None:
        """Drop every registration, unless a server claimed the instance (it is its now)."""
        if not self.claimed:
            self.epoll.close()
            self.registered.clear()


_current: Staging | None = None


def offer(staging: Staging | None) -> None:
    """Make ``staging`` claimable during the adoption that follows (None: nothing is)."""
    global _current
    _current = staging


def claim() -> Staging | None:
    """Take the staged registrations, once; the claimer owns the epoll instance."""
    global _current
    staging, _current = _current, None
    if staging is not None:
        staging.claimed = True
    return staging
