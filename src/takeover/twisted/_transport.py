"""Twisted transports and ports that can be paused, pickled and adopted.

These are Twisted's own ``tcp.Port``/``tcp.Server`` and ``unix.Port``/
``unix.Server``, subclassed only where migration needs it:

* every ``startReading``/``stopReading``/``startWriting``/``stopWriting``
  goes through a gate. While the gate is shut (the service is quiesced, or
  the graph was just unpickled) the calls are remembered, not passed to the
  reactor: a protocol that writes during the pause only fills the write
  buffer, exactly as the 2004 system's ``stopReading()``/``stopWriting()``
  quiescing did.
* the connections pickle: the socket (as a descriptor slot), the protocol,
  Twisted's unsent output (``_tempDataBuffer``, ``_tempDataLen``,
  ``dataBuffer`` and ``offset`` of ``abstract.FileDescriptor``), its flags
  (``connected``, ``disconnecting``, ``_writeDisconnecting``...) and whether
  it wants to read and write. The reactor does not travel.
* the recipient does not go through ``adoptStreamConnection`` or
  ``adoptStreamPort``: both call ``factory.buildProtocol`` (a new protocol) and
  ``makeConnection`` (``connectionMade`` again, which resets a telnet or
  manhole session) and start reading at once, before the move has committed.
  The unpickled objects are Twisted's own classes with their own state; the
  recipient only gives them its reactor and socket. Nothing is registered
  with the reactor before ``start()``.
* ``release()`` (originator, after commit) removes the reader and writer and
  closes this process's descriptor with a plain ``close()``. Never
  ``loseConnection()`` (it ends in ``shutdown()``) nor ``abortConnection()``
  (SO_LINGER 0, an RST), nor ``stopListening()`` (a ``shutdown()`` of the
  listening socket wakes every process's ``accept`` with an error): the
  connection and the listener now belong to the recipient. The connection
  is then *moved*: ``connected`` is 0, and ``write()`` raises
  :class:`~takeover.ConnectionMovedError` instead of dropping the bytes
  as Twisted does on a closed connection, so a writer that kept a reference
  learns that they were not sent.
* once the graph is pickled, a call from outside the service that changes a
  connection (``write``, ``loseConnection``, ``pauseProducing``...) first
  asks the move, as in the asyncio runtime: either the move is rolled back
  and the call takes effect here, or the recipient has committed and the
  call fails as above.

A protocol (and a factory) may define the hooks of the asyncio runtime:
``takeover_quiesce()``, ``takeover_resume()`` and ``takeover_adopted()``.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp, unix

from .._core.ahead import AheadPoller
from .._core.errors import ConnectionMovedError, MigrationRefusedError
from .._core.hooks import run_service_hooks

log = logging.getLogger("takeover.twisted")

# Attributes that belong to this process, not to the connection.
_LOCAL = ("reactor", "fileno", "deferred", "_tko_seal")


def _check_reactor(runtime: Any) -> Any:
    """The reactor to adopt into: ``runtime`` if it is one (an ``IReactorFDSet``),
    else the installed reactor if it is Twisted's asyncio reactor, running."""
    if runtime is not None and callable(getattr(runtime, "addReader", None)):
        return runtime
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    reactor = sys.modules.get("twisted.internet.reactor")
    if not isinstance(reactor, AsyncioSelectorReactor) or not reactor.running:
        raise MigrationRefusedError(
            "this is a Twisted service: take it with a Twisted recipient "
            "(`takeover take --runtime twisted`, or takeover.twisted.take in a running "
            "asyncio reactor)"
        )
    return reactor


def _gated(flag: str, wanted: bool, call: str) -> Callable[[Any], None]:
    """A gated ``startReading``-like method: set ``flag``, then ``reactor.call(self)``
    unless the gate is shut."""

    def method(self: Any) -> None:
        setattr(self, flag, wanted)
        if not self._tko_quiesced:
            getattr(self.reactor, call)(self)

    return method


class _Gate:
    """The reader/writer gate shared by migratable connections and ports."""

    _tko_quiesced = False
    _tko_reading = False
    _tko_writing = False
    reactor: Any

    # Each records what the object wants, and passes it on to the reactor
    # unless the gate is shut.
    startReading = _gated("_tko_reading", True, "addReader")
    stopReading = _gated("_tko_reading", False, "removeReader")
    startWriting = _gated("_tko_writing", True, "addWriter")
    stopWriting = _gated("_tko_writing", False, "removeWriter")

    def _tko_quiesce(self) -> None:
        if self._tko_quiesced:
            return
        self._tko_quiesced = True
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)

    def _tko_run(self) -> None:
        """Open the gate: register what the object asked for meanwhile.

        The writer goes first: output carried from the originator (or
        written during the pause) leaves before anything new is read.
        """
        if not self._tko_quiesced:
            return
        self._tko_quiesced = False
        if self._tko_writing:
            self.reactor.addWriter(self)
        if self._tko_reading:
            self.reactor.addReader(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in _LOCAL:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Shut until the recipient starts it, whatever it was on the other side.
        self._tko_quiesced = True

    def _tko_adopt(self, reactor: Any) -> None:
        sock: socket.socket = self.socket  # type: ignore[attr-defined]
        sock.setblocking(False)
        self.reactor = reactor
        self.fileno = sock.fileno


class _MigratableConnection(_Gate):
    """What the two server connection classes add to Twisted's."""

    socket: socket.socket
    server: Any
    protocol: Any
    connected: int
    _tko_moved = False

    # -- calls from outside while the service is in transit (see _tko_may_change)

    def write(self, data: bytes) -> None:
        if (self._tko_quiesced or self._tko_moved) and data and not self._tko_may_change("write()"):
            raise self._tko_moved_error("write()")
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        if (self._tko_quiesced or self._tko_moved) and not self._tko_may_change("writeSequence()"):
            raise self._tko_moved_error("writeSequence()")
        super().writeSequence(iovec)  # type: ignore[misc]

    def loseConnection(self, *args: Any, **kwargs: Any) -> None:
        if self._tko_quiesced and not self._tko_may_change("loseConnection()"):
            return
        super().loseConnection(*args, **kwargs)  # type: ignore[misc]

    def loseWriteConnection(self) -> None:
        if self._tko_quiesced and not self._tko_may_change("loseWriteConnection()"):
            return
        super().loseWriteConnection()  # type: ignore[misc]

    def abortConnection(self) -> None:
        if self._tko_quiesced and not self._tko_may_change("abortConnection()"):
            return
        super().abortConnection()  # type: ignore[misc]

    def pauseProducing(self) -> None:
        if self._tko_quiesced and not self._tko_may_change("pauseProducing()"):
            return
        super().pauseProducing()  # type: ignore[misc]

    def resumeProducing(self) -> None:
        if self._tko_quiesced and not self._tko_may_change("resumeProducing()"):
            return
        super().resumeProducing()  # type: ignore[misc]

    def _tko_may_change(self, call: str) -> bool:
        """Whether ``call`` may change this quiesced connection.

        While the move's graph is pickled (its port is sealed) the move
        decides (see ``takeover._core.registry.Service``); if the recipient
        owns the connection, it is moved from now on and False is returned.
        """
        if self._tko_moved:
            return False
        if not self.connected:
            return True  # closed before the move: Twisted ignores the call
        seal = getattr(self.server, "_tko_seal", None)
        if seal is None or seal(f"{call} on {self._tko_describe()}"):
            return True
        self._tko_moved = True
        self.connected = 0
        self.disconnected = 1
        return False

    def _tko_describe(self) -> str:
        try:
            peer: Any = self.socket.getpeername()
        except OSError:
            peer = None
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        elif isinstance(peer, bytes):
            peer = peer.decode(errors="replace")
        return f"the connection{f' from {peer}' if peer else ''} (a Twisted {type(self).__name__})"

    def _tko_moved_error(self, call: str) -> ConnectionMovedError:
        return ConnectionMovedError(
            f"{call} on {self._tko_describe()}: the connection now belongs to another "
            "process (the service moved); nothing was sent"
        )

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)  # type: ignore[misc]
        finally:
            connections = getattr(self.server, "_tko_connections", None)
            if connections is not None:
                connections.pop(self, None)

    def _tko_release(self) -> None:
        """Commit, originator side: drop this process's descriptor only."""
        self._tko_quiesce()
        self.connected = 0
        self.disconnected = 1
        self._tko_moved = True
        self.socket.close()

    def _tko_discard(self) -> None:
        self.socket.close()

    def _tko_put_first(self, data: bytes) -> None:
        """Queue ``data`` before everything the protocol has written (Twisted's
        ``dataBuffer`` from ``offset``, then ``_tempDataBuffer``)."""
        buffer: bytes = getattr(self, "dataBuffer", b"")
        offset: int = getattr(self, "offset", 0)
        temp: list[bytes] = getattr(self, "_tempDataBuffer", [])
        self.dataBuffer = b"".join([data, buffer[offset:], *temp])
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.startWriting()

    def _tko_pending(self) -> int:
        """Bytes written by the protocol and not yet sent."""
        data_buffer: bytes = getattr(self, "dataBuffer", b"")
        offset: int = getattr(self, "offset", 0)
        temp: int = getattr(self, "_tempDataLen", 0)
        return len(data_buffer) - offset + temp


class MigratableTCPServer(_MigratableConnection, tcp.Server):
    """A server-side TCP connection (``tcp.Server``) that can migrate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tcp.Server.__init__(self, *args, **kwargs)
        _register(self)


class MigratableUNIXServer(_MigratableConnection, unix.Server):
    """A server-side AF_UNIX connection (``unix.Server``) that can migrate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unix.Server.__init__(self, *args, **kwargs)  # type: ignore[no-untyped-call]
        _register(self)


def _register(connection: _MigratableConnection) -> None:
    connections = getattr(connection.server, "_tko_connections", None)
    if connections is not None:
        connections[connection] = None


class _MigratablePort(_Gate):
    """What the two port classes add to Twisted's: the connections they accepted."""

    # How the dry run names these attributes in a path (see takeover._core.graphpath).
    _takeover_path_names = {"_tko_connections": "connections"}
    _tko_connections: dict[_MigratableConnection, None]
    socket: socket.socket
    factory: Any
    # The move's late_call while a move's graph is pickled (MigratablePort.takeover_seal).
    _tko_seal: Callable[[str], bool] | None = None

    def _tko_release(self) -> None:
        self._tko_quiesce()
        self.__dict__["connected"] = False
        self.socket.close()

    def _tko_discard(self) -> None:
        self.socket.close()


class MigratableTCPPort(_MigratablePort, tcp.Port):
    """A listening TCP port (``tcp.Port``) whose connections can migrate with it."""

    transport = MigratableTCPServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tcp.Port.__init__(self, *args, **kwargs)
        self._tko_connections = {}


class MigratableUNIXPort(_MigratablePort, unix.Port):
    """A listening AF_UNIX port (``unix.Port``) whose connections can migrate with it."""

    transport = MigratableUNIXServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unix.Port.__init__(self, *args, **kwargs)
        self._tko_connections = {}


class MigratablePort:
    """One Twisted listening port and every connection it accepted, as a service.

    This is what :func:`takeover.twisted.listen_tcp` and ``listen_unix``
    return and what moves: pickling it pickles the port, its factory, each
    connection with its protocol and unsent output, and whatever they refer
    to.
    """

    # How the dry run names these attributes in a path (see takeover._core.graphpath).
    _takeover_path_names = {"port": "port"}

    def __init__(self, port: MigratableTCPPort | MigratableUNIXPort, name: str) -> None:
        self.service_name = name
        self.port = port

    @property
    def connections(self) -> list[Any]:
        """The connections (Twisted transports) the port currently holds."""
        return list(self.port._tko_connections)

    @property
    def factory(self) -> Any:
        return self.port.factory

    def getHost(self) -> Any:
        """The listening address, as ``IListeningPort.getHost``."""
        return self.port.getHost()  # type: ignore[no-untyped-call]

    def describe(self) -> dict[str, Any]:
        address: Any = None
        try:
            address = self.port.socket.getsockname()
        except (AttributeError, OSError):
            pass
        if isinstance(address, tuple):
            address = f"{address[0]}:{address[1]}"
        elif isinstance(address, bytes):
            address = address.decode(errors="replace")
        return {"kind": "twisted", "address": address, "connections": len(self.connections)}

    # -- the Service interface ----------------------------------------------------

    def quiesce(self) -> None:
        self.port._tko_quiesce()
        for connection in self.connections:
            connection._tko_quiesce()
        run_service_hooks(
            self.port.factory, [c.protocol for c in self.connections], "takeover_quiesce"
        )

    def takeover_seal(self, late_call: Callable[[str], bool]) -> None:
        """Make calls from outside that change a connection ask ``late_call``
        first, until resume() or release() (see ``_tko_may_change``)."""
        self.port._tko_seal = late_call

    def takeover_unsent(self, unsent: dict[socket.socket, bytes]) -> None:
        """A move across hosts, recipient, before start: the bytes each
        connection's old kernel had never sent go out first, before the
        output the transport carried (see ``takeover._core.crossmove``)."""
        for connection in self.connections:
            data = unsent.get(connection.socket)
            if data:
                connection._tko_put_first(data)

    def resume(self) -> None:
        self.port.__dict__.pop("_tko_seal", None)
        run_service_hooks(
            self.port.factory, [c.protocol for c in self.connections], "takeover_resume"
        )
        self._run()

    def release(self) -> None:
        self.quiesce()
        for connection in self.connections:
            connection._tko_release()
        self.port._tko_connections.clear()
        self.port.__dict__.pop("_tko_seal", None)
        self.port._tko_release()

    def adopt(self, runtime: Any, ahead: AheadPoller | None = None) -> None:
        # The sockets sent ahead stay registered with the core's poller only
        # until the move is over: a Twisted service is watched by its reactor.
        reactor = _check_reactor(runtime)
        self.port._tko_adopt(reactor)
        for connection in self.connections:
            if getattr(connection, "TLS", False):
                raise MigrationRefusedError(
                    f"connection {connection!r} runs TLS; TLS sessions cannot move yet"
                )
            connection._tko_adopt(reactor)

    def start(self) -> None:
        run_service_hooks(
            self.port.factory, [c.protocol for c in self.connections], "takeover_adopted"
        )
        self._run()

    def discard(self) -> None:
        for connection in self.connections:
            connection._tko_discard()
        self.port._tko_connections.clear()
        self.port._tko_discard()

    def _run(self) -> None:
        for connection in self.connections:
            connection._tko_run()
        self.port._tko_run()

    # -- closing (not migration) -------------------------------------------------

    def close(self) -> Any:
        """Stop listening (``stopListening``): the connections stay open."""
        return self.port.stopListening()  # type: ignore[no-untyped-call]

    def close_connections(self) -> None:
        """Close every connection, as ``transport.loseConnection()`` would."""
        for connection in self.connections:
            connection.loseConnection()

    def __repr__(self) -> str:
        return f"<MigratablePort {self.service_name!r} {self.describe()}>"
