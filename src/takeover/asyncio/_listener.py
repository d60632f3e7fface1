"""A listening socket that moves alone: the service behind :func:`takeover.asyncio.listen`.

Frameworks built on coroutines (aiohttp, uvicorn, the websockets library,
asyncio streams) keep each connection's state in coroutine frames, which do
not pickle: their connections cannot move. Their listening socket can, and
with it the kernel's accept queue. A :class:`ListenerService` is a service
whose graph is that socket and nothing else; it goes through the same
conversation, arbiter and rollback as any other service.

The framework accepts on a duplicate of the socket (:meth:`hand_out`): the
descriptor is the application's, which its framework closes when it shuts
down (asyncio's ``Server.close()`` calls ``close()``, never ``shutdown()``:
a ``shutdown()`` on a listening socket would stop every process holding it).

* Originator: ``quiesce()`` stops nothing. The graph is the socket alone, so
  a connection the framework accepts meanwhile changes nothing that travels:
  it stays here and is served here, and a rollback is exactly "nothing
  happened". ``release()``, at commit, removes the framework's accept loop
  from the event loop (``loop.remove_reader`` on the duplicate: asyncio's
  servers accept in a reader callback, so not one more ``accept()`` runs
  here) and closes takeover's own descriptor. Whatever the kernel queued and
  this process did not accept is the new process's to accept.
* Recipient: only :func:`takeover.asyncio.listen` adopts a listener (it passes
  a :class:`ListenerRuntime`); a generic recipient (``takeover take``) would
  hold the socket with nothing accepting on it, so it is refused and the
  move rolls back.

This module is one of the runtime's graph modules (the unpickling policy
admits its classes): keep it to the service class and its adoption marker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

from .._core.ahead import AheadPoller
from .._core.errors import MigrationRefusedError

log = logging.getLogger("takeover.asyncio")


@dataclass(frozen=True)
class ListenerRuntime:
    """What :func:`takeover.asyncio.listen` passes to ``adopt``: the loop to serve in.

    A listener refuses any other runtime: a recipient that is not the
    application itself has no framework to hand the socket to.
    """

    loop: asyncio.AbstractEventLoop


class ListenerService:
    """A bound, listening stream socket, published for migration on its own.

    Args:
        sock: the listening socket (takeover's own copy; the application's
            framework gets a duplicate from :meth:`hand_out`).
        name: the service's name in the migration server.
        loop: the event loop the application serves in.
    """

    # How the dry run names the socket in a path (see takeover._core.graphpath).
    _takeover_path_names = {"_sock": "socket"}

    # The layout of the pickled state: its name and its socket, nothing else.
    _STATE_VERSION = 1

    def __init__(
        self, sock: socket.socket, name: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        self.service_name = name
        self._sock = sock
        self._loop = loop
        self._handed: list[socket.socket] = []
        self.released = False

    def __getstate__(self) -> dict[str, Any]:
        return {
            "service_name": self.service_name,
            "_sock": self._sock,
            "_state_version": self._STATE_VERSION,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        version = state.get("_state_version")
        if version != self._STATE_VERSION:
            raise ValueError(
                f"a listener's state has layout {version!r}; this takeover reads "
                f"{self._STATE_VERSION} (originator and recipient run different takeovers)"
            )
        name, sock = state.get("service_name"), state.get("_sock")
        if type(name) is not str or not isinstance(sock, socket.socket):
            raise ValueError("a listener's state is its name and its socket")
        self.service_name = name
        self._sock = sock
        self._loop = None
        self._handed = []
        self.released = False

    @property
    def address(self) -> Any:
        """The address the socket is bound to (None once it is closed here)."""
        try:
            return self._sock.getsockname()
        except OSError:
            return None

    def hand_out(self) -> socket.socket:
        """A duplicate of the listening socket, for the application's framework.

        The framework owns it (and closes it when it shuts down); takeover
        stops its accept loop when the listener moves (see :meth:`release`).

        Raises:
            RuntimeError: the listener has moved to another process already.
        """
        if self.released:
            raise RuntimeError(
                f"listener {self.service_name!r} has moved to another process; "
                "this one must not accept on it"
            )
        duplicate = self._sock.dup()
        duplicate.setblocking(False)
        self._handed.append(duplicate)
        return duplicate

    # -- the Service interface ----------------------------------------------------

    def describe(self) -> dict[str, Any]:
        address = self.address
        if isinstance(address, tuple):
            address = f"{address[0]}:{address[1]}"
        # Its connections are the framework's: they stay and drain where they are.
        return {"kind": "listener", "address": address, "connections": 0}

    def quiesce(self) -> None:
        """Nothing to stop: accepting on changes nothing the graph carries."""

    def resume(self) -> None:
        """Nothing to undo: the framework never stopped accepting."""

    def release(self) -> None:
        """Committed: stop the framework's accept loop here and close takeover's copy.

        ``remove_reader`` on each duplicate handed out: asyncio's
        ``create_server(sock=...)`` (which aiohttp's ``SockSite``, uvicorn's
        ``Server.serve(sockets=...)``, ``websockets.serve(sock=...)`` and
        ``asyncio.start_server(sock=...)`` all use) accepts in that reader
        callback, and a callback already due is cancelled with it. The
        duplicates stay open (the framework closes them when it shuts down:
        a plain ``close()``, harmless to the new process); no ``shutdown()``
        here, which would stop the listener for every process.
        """
        self.released = True
        self.stop_accepting()
        self._handed.clear()
        self._sock.close()

    def stop_accepting(self) -> None:
        """Stop the accept loop of every framework serving a duplicate, closing nothing.

        What a move does at commit; an application that stops without a
        successor calls it too (:meth:`Listener.stop_accepting`) before it
        drains, so that no connection is accepted that the drain would miss.
        """
        loop = self._loop
        for duplicate in self._handed:
            fd = duplicate.fileno()
            if fd >= 0 and loop is not None and not loop.is_closed():
                loop.remove_reader(fd)

    def adopt(self, runtime: Any, ahead: AheadPoller | None = None) -> None:
        if not isinstance(runtime, ListenerRuntime):
            raise MigrationRefusedError(
                f"service {self.service_name!r} is a listening socket that its application "
                "hands to its own framework (aiohttp, uvicorn, websockets, asyncio streams): "
                "only that application takes it, started again with the same --control "
                "(takeover.asyncio.listen); a generic recipient would hold it with nothing "
                "accepting"
            )
        self._loop = runtime.loop
        # O_NONBLOCK belongs to the open file, shared with the originator: set already.
        if self._sock.gettimeout() != 0.0:
            self._sock.setblocking(False)

    def start(self) -> None:
        """Nothing to start: the application's framework accepts on :meth:`hand_out`'s socket."""

    def discard(self) -> None:
        self._sock.close()

    def close(self) -> None:
        """Close takeover's copy (the application stopped serving without moving)."""
        self._sock.close()

    def __repr__(self) -> str:
        return f"<ListenerService {self.service_name!r} {self.describe()}>"
