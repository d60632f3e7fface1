"""The asyncio server that can be paused, pickled and adopted, with its connections.

A :class:`MigratableServer` is the service object that moves: its listening
socket, its protocol factory and every connection it accepted. Its
connections are watched by an epoll instance of its own (a :class:`_Poller`)
and the event loop watches that one descriptor: ``quiesce()`` stops every
connection at once by removing one reader from the loop, not one per
connection, and a recipient registers its connections with one C call each
instead of a trip through the selector; better still, the registrations
made as the sockets arrived ahead of the graph become its poller (see
``takeover._core.ahead.AheadPoller``).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .._core.ahead import AheadPoller
from .._core.hooks import run_service_hooks
from ._transport import MigratableTransport, unfit_twins

log = logging.getLogger("takeover.asyncio")

_ACCEPT_RETRY = 1.0


_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class _Poller:
    """One epoll instance for a server's connections.

    The loop watches the instance's descriptor (readable when any connection
    is ready); :meth:`ready` then dispatches. Level-triggered, so whatever is
    not handled in one round is reported again in the next.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._masks: dict[int, int] = {}
        self._transports: dict[int, MigratableTransport] = {}

    @classmethod
    def from_ahead(cls, ahead: AheadPoller, transports: Iterable[MigratableTransport]) -> _Poller:
        """A poller made of the epoll instance of the sockets sent ahead (recipient, before start).

        Each connection keeps the registration (for reading) made when its
        socket arrived; start() corrects the few that should not read
        (``_start`` through ``_sync``). Registered descriptors that are not one of
        these connections are unregistered.
        """
        poller = cls.__new__(cls)
        poller._epoll = ahead.epoll
        poller._masks = masks = {}
        poller._transports = owners = {}
        registered = ahead.registered
        for t in transports:
            fd = t._sock.fileno()
            if fd in registered:
                masks[fd] = select.EPOLLIN
                owners[fd] = t
                registered.discard(fd)
        for fd in registered:
            try:
                poller._epoll.unregister(fd)
            except OSError:
                pass
        registered.clear()
        return poller

    def fileno(self) -> int:
        return self._epoll.fileno()

    def watch(self, transport: MigratableTransport, read: bool, write: bool) -> None:
        fd = transport._sock.fileno()
        mask = (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self.forget(transport)
        elif not old:
            self._epoll.register(fd, mask)
            self._masks[fd] = mask
            self._transports[fd] = transport
        else:
            self._epoll.modify(fd, mask)
            self._masks[fd] = mask

    def forget(self, transport: MigratableTransport) -> None:
        """Stop watching ``transport`` (before its socket is closed)."""
        fd = transport._sock.fileno()
        if self._masks.pop(fd, None) is not None:
            del self._transports[fd]
            self._epoll.unregister(fd)

    def ready(self) -> None:
        try:
            events = self._epoll.poll(0)
        except InterruptedError:
            return
        masks, transports = self._masks, self._transports
        for fd, event in events:
            transport = transports.get(fd)
            if transport is None:
                continue
            if event & _READ_EVENTS and masks.get(fd, 0) & select.EPOLLIN:
                transport._read_ready()
            if event & _WRITE_EVENTS and masks.get(fd, 0) & select.EPOLLOUT:
                transport._write_ready()

    def start_idle(self, transports: Iterable[MigratableTransport]) -> list[MigratableTransport]:
        """Start each transport that only waits to read; return the others.

        The common case of a recipient's start (an idle connection, nothing
        to send) costs one epoll registration and no Python call; what is
        left (output to send, a close pending, already watched) goes through
        :meth:`MigratableTransport._start`.
        """
        register, masks, owners = self._epoll.register, self._masks, self._transports
        others = []
        for t in transports:
            if not t._quiesced or (
                t._lost
                or t._lost_pending
                or t._closing
                or t._buffer
                or t._eof_pending
                or t._eof_received
                or t._reading_paused
            ):
                others.append(t)
                continue
            fd = t._sock.fileno()
            if fd in masks:
                if masks[fd] == select.EPOLLIN and owners.get(fd) is t:
                    t._quiesced = False  # registered already (sent ahead, or before a rollback)
                else:
                    others.append(t)
                continue
            try:
                register(fd, select.EPOLLIN)
            except (OSError, ValueError):
                others.append(t)  # _start() will fail again, and close it
                continue
            masks[fd] = select.EPOLLIN
            owners[fd] = t
            t._quiesced = False
        return others

    def close(self) -> None:
        """Drop every registration at once (originator, after commit)."""
        self._epoll.close()
        self._masks.clear()
        self._transports.clear()


ProtocolFactory = Callable[[], asyncio.BaseProtocol]

LINGER = 2.0
"""Seconds a connection closed politely at a drain deadline waits for the
client's own close (see ``MigratableServer._close_politely``)."""


class _Discard(asyncio.Protocol):
    """What is left of a connection closed politely: input is dropped, and the
    client's close ends it."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False


class StreamsFactory:
    """The protocol factory of an asyncio streams server: a
    ``StreamReaderProtocol`` calling ``client_connected_cb(reader, writer)``.

    It pickles (the callback by reference), so the listener can move; the
    connections it makes drain (see ``MigratableTransport._cannot_move``).
    """

    def __init__(self, client_connected_cb: Callable[..., Any], limit: int) -> None:
        self.client_connected_cb = client_connected_cb
        self.limit = limit

    def __call__(self) -> asyncio.StreamReaderProtocol:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, self.client_connected_cb, loop=loop)


class MigratableServer:
    """A listening socket, its protocol factory and every connection it accepted.

    This is the service object that moves: pickling it pickles the factory,
    each connection's transport and protocol, and whatever they refer to
    (a chat room shared by every connection, say).

    Args:
        sock: a bound, listening stream socket.
        protocol_factory: called once per accepted connection; it must pickle
            (a class, a module-level function, an object with ``__call__``
            or a bound method of one).
        name: the service's name in the migration server.
        loop: the event loop (default: the running one).
    """

    # How the dry run names these attributes in a path (see takeover._core.graphpath).
    _takeover_path_names = {"_transports": "connections", "_sock": "socket"}

    # The move's late_call while a move's graph is pickled (see takeover_seal).
    _seal: Callable[[str], bool] | None = None
    # A partial move (see takeover_begin_drain): the connections left behind,
    # with why, and how long they may drain here after the commit.
    _leaving: dict[MigratableTransport, str] | None = None
    _drain_seconds = 0.0
    _drained: asyncio.Event | None = None
    # What a partial move that brought this service here left in the old process.
    _draining_elsewhere: tuple[int | None, int, float] | None = None
    # How long to drain what cannot move, when the recipient does not say (None: refuse).
    takeover_drain_default: float | None = None

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        name: str,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        sock.setblocking(False)
        self.service_name = name
        self.protocol_factory = protocol_factory
        self._sock: socket.socket | None = sock
        self._loop: asyncio.AbstractEventLoop | None = loop or asyncio.get_running_loop()
        self._transports: dict[MigratableTransport, None] = {}
        self._poller: _Poller | None = None
        self._quiesced = True

    # The layout of the pickled state. The connections travel as two lists,
    # transports and their protocols, so that a transport may travel as a
    # twin (see new_twins), its protocol apart.
    _STATE_VERSION = 3

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loop"] = None
        state["_poller"] = None
        for local in ("_seal", "_leaving", "_drain_seconds", "_drained", "_draining_elsewhere"):
            state.pop(local, None)
        transports = self._moving()
        state["_transports"] = transports
        state["_protocols"] = [t._protocol for t in transports]
        state["_state_version"] = self._STATE_VERSION
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        version = state.pop("_state_version", None)
        if version != self._STATE_VERSION:
            raise ValueError(
                f"a server's state has layout {version!r}; this takeover reads "
                f"{self._STATE_VERSION} (originator and recipient run different takeovers)"
            )
        protocols = state.pop("_protocols", None)
        self.__dict__.update(state)
        self._quiesced = True
        transports: Any = self._transports
        if (
            type(transports) is not list
            or type(protocols) is not list
            or len(transports) != len(protocols)
        ):
            raise ValueError("a server's connections and protocols do not match")
        # A twin (see new_twins) gets its protocol and server here; a transport
        # that travelled in full has them already.
        for transport, protocol in zip(transports, protocols):
            if type(transport) is not MigratableTransport:
                raise ValueError(f"a server's connection is a {type(transport).__name__}")
            transport._protocol = protocol
            transport._server = self
        self._transports = dict.fromkeys(transports)

    # -- twins (see takeover._core.ahead.SocketsAhead) ---------------------------

    takeover_twin_kind = "asyncio"

    def takeover_twins(self) -> dict[socket.socket, MigratableTransport]:
        """Each connection by its socket: each may travel as a twin (see new_twins)."""
        return {t._sock: t for t in self._transports}

    def takeover_unfit(self) -> list[MigratableTransport]:
        """The connections that now carry more than their socket and protocol
        (output to send, a flag set, addresses read): they travel in full."""
        return unfit_twins(self._moving())

    def takeover_parts(self) -> list[MigratableTransport]:
        """The connections a move takes: the dry run pickles them a slice at a
        time, the service running in between (see ``graphpath.SpreadCheck``)."""
        return self._moving()

    # -- partial moves (see takeover._core.registry.Service) ----------------------

    def _moving(self) -> list[MigratableTransport]:
        """The connections that a move takes (all but those left behind)."""
        leaving = self._leaving
        if not leaving:
            return list(self._transports)
        return [t for t in self._transports if t not in leaving]

    def takeover_begin_drain(self, seconds: float) -> int:
        """A partial move: leave behind, to drain for ``seconds`` after the
        commit, every connection that cannot move by its kind (a stream, a
        TLS or other buffered protocol); return how many."""
        self._drain_seconds = seconds
        self._leaving = {}
        self._leave_by_kind(self._leaving)
        return len(self._leaving)

    def _leave_by_kind(self, leaving: dict[MigratableTransport, str]) -> None:
        """Add to ``leaving`` each connection that cannot move by its kind."""
        for transport in self._transports:
            if transport not in leaving:
                reason = transport._cannot_move()
                if reason is not None:
                    leaving[transport] = reason

    def takeover_leave(self, index: int, reason: str) -> bool:
        """Leave behind the ``index``-th connection that would move (the dry run
        found it in the way); False if there is no such connection."""
        moving = self._moving()
        if self._leaving is None or not 0 <= index < len(moving):
            return False
        self._leaving[moving[index]] = reason
        return True

    def takeover_keep_all(self) -> None:
        """The move is off: nothing is left behind."""
        self._leaving = None

    def takeover_left(self) -> int:
        """How many connections this move leaves behind."""
        return len(self._leaving or ())

    @property
    def draining(self) -> list[MigratableTransport]:
        """Connections left behind by a partial move, still being served here."""
        return list(self._transports) if self._sock is None and self._drained else []

    async def drained(self) -> None:
        """Return once every connection left behind by a partial move has closed."""
        if self._drained is not None:
            await self._drained.wait()

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening socket (as a list, like ``asyncio.Server.sockets``)."""
        return [self._sock] if self._sock is not None else []

    @property
    def connections(self) -> list[MigratableTransport]:
        """Transports of the connections this server currently holds."""
        return list(self._transports)

    def describe(self) -> dict[str, Any]:
        address: Any = None
        if self._sock is not None:
            try:
                address = self._sock.getsockname()
            except OSError:
                pass
        if isinstance(address, tuple):
            address = f"{address[0]}:{address[1]}"
        described: dict[str, Any] = {
            "kind": "asyncio",
            "address": address,
            "connections": len(self._transports),
        }
        elsewhere = self._draining_elsewhere
        if elsewhere is not None and time.time() < elsewhere[2]:
            pid, count, until = elsewhere
            described["draining"] = {"pid": pid, "connections": count, "until": until}
        return described

    def takeover_draining_elsewhere(self, pid: int | None, count: int, seconds: float) -> None:
        """A partial move brought this service here: ``count`` of its connections
        drain in process ``pid`` for up to ``seconds`` (``describe`` says so)."""
        self._draining_elsewhere = (pid, count, time.time() + seconds)

    # -- serving ---------------------------------------------------------------

    def _accept_ready(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(128):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: leave the connection queued and retry
                # soon, rather than spin on a listener that stays readable.
                log.warning("accept failed on %s: %s; retrying in 1 s", self.service_name, exc)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(_ACCEPT_RETRY, self._retry_accept)
                return
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                protocol = self.protocol_factory()
            except Exception:
                log.exception("protocol factory of %s failed", self.service_name)
                conn.close()
                continue
            transport = MigratableTransport(conn, protocol, self)
            self._transports[transport] = None
            transport._quiesced = False
            protocol.connection_made(transport)
            if not transport._closing:
                transport._quiesced = True
                transport._start()

    def _retry_accept(self) -> None:
        if self._sock is not None and not self._quiesced and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            self._accept_ready()

    def _detach(self, transport: MigratableTransport) -> None:
        self._transports.pop(transport, None)
        self._close_poller_when_done()
        self._check_drained()

    def _close_poller_when_done(self) -> None:
        # A closed server whose last connection has gone needs no poller.
        if self._sock is None and not self._transports and self._poller is not None:
            if not self._quiesced and self._loop is not None:
                self._loop.remove_reader(self._poller.fileno())
            self._poller.close()
            self._poller = None

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections stay open)."""
        if self._sock is None:
            return
        if not self._quiesced and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self._close_poller_when_done()

    def close_connections(self) -> None:
        """Close every connection, as ``transport.close()`` would."""
        for transport in list(self._transports):
            transport.close()

    # -- the Service interface ----------------------------------------------------

    def quiesce(self) -> None:
        if self._quiesced:
            return
        self._quiesced = True
        if self._loop is not None:
            if self._sock is not None:
                self._loop.remove_reader(self._sock.fileno())
            if self._poller is not None:
                # Every connection stops here: they are all behind this one descriptor.
                self._loop.remove_reader(self._poller.fileno())
        for transport in self._transports:
            transport._quiesced = True
        if self._leaving is not None:
            # A partial move: a connection accepted since the dry run that
            # cannot move by its kind (a stream, TLS) stays behind too.
            self._leave_by_kind(self._leaving)
        run_service_hooks(
            self.protocol_factory, [t._protocol for t in self._transports], "takeover_quiesce"
        )

    def takeover_unsent(self, unsent: dict[socket.socket, bytes]) -> None:
        """A move across hosts, recipient, before start: the bytes each
        connection's old kernel had never sent go out first, before the
        output the transport carried (see ``takeover._core.crossmove``)."""
        for transport in self._transports:
            data = unsent.get(transport._sock)
            if data:
                transport._buffer[:0] = data

    def takeover_seal(self, late_call: Callable[[str], bool]) -> None:
        """Make calls from outside that change a connection ask ``late_call``
        first, until resume() or release() (see ``_transport._may_change``)."""
        self._seal = late_call

    def resume(self) -> None:
        self._seal = None
        self._leaving = None
        run_service_hooks(
            self.protocol_factory, [t._protocol for t in self._transports], "takeover_resume"
        )
        self._run()

    def release(self) -> None:
        self.quiesce()
        if self._leaving:
            self._release_and_drain()
            return
        if self._poller is not None:
            # Closing the epoll instance drops every registration at once; the
            # recipient's copies of the sockets are not watched here any more.
            self._poller.close()
            self._poller = None
        for transport in self._transports:
            transport._release()
        self._transports.clear()
        self._seal = None
        if self._sock is not None:
            self._sock.close()

    def _release_and_drain(self) -> None:
        """Commit of a partial move: release what moved, serve what was left
        behind until it closes or the deadline passes (then close it politely)."""
        assert self._leaving is not None and self._loop is not None
        leaving, self._leaving = self._leaving, None
        for transport in [t for t in self._transports if t not in leaving]:
            if self._poller is not None:
                self._poller.forget(transport)
            transport._release()
            del self._transports[transport]
        self._seal = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._drained = asyncio.Event()
        log.info(
            "service %r: %d connection(s) drain here for up to %g s",
            self.service_name,
            len(self._transports),
            self._drain_seconds,
        )
        self._loop.call_later(self._drain_seconds, self._drain_deadline)
        self._run()
        self._check_drained()

    def _drain_deadline(self) -> None:
        """The drain deadline: each connection still here is asked to close politely."""
        for transport in list(self._transports):
            protocol: Any = transport._protocol
            closing: Any = transport
            if type(protocol).__module__ == "asyncio.sslproto":
                # TLS: the application's protocol, and its TLS transport (whose
                # close() ends the session with close_notify).
                closing = getattr(protocol, "_app_transport", None) or transport
                protocol = getattr(protocol, "_app_protocol", protocol)
            hook = getattr(protocol, "takeover_drain_close", None)
            try:
                if hook is not None:
                    hook()
                elif closing is transport:
                    self._close_politely(transport)
                else:
                    closing.close()
            except Exception:
                log.exception("closing %r at the drain deadline failed", transport)
                transport.close()

    def _close_politely(self, transport: MigratableTransport) -> None:
        """Close a connection without a reset: send what is queued and a FIN,
        discard what the client still sends until it closes too (or
        :data:`LINGER` seconds pass), then close. Closing a socket with unread
        input makes the kernel answer with a reset instead."""
        if transport.is_closing():
            return
        transport.write_eof()
        transport.set_protocol(_Discard())
        assert self._loop is not None
        self._loop.call_later(LINGER, transport.close)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._transports:
            self._drained.set()

    def adopt(self, runtime: Any, ahead: AheadPoller | None = None) -> None:
        loop = runtime if runtime is not None else asyncio.get_running_loop()
        self._loop = loop
        # The descriptors arrive non-blocking (O_NONBLOCK belongs to the open
        # file, shared with the originator, and the socket objects are built
        # knowing it): no system call per connection here.
        if self._sock is not None and self._sock.gettimeout() != 0.0:
            self._sock.setblocking(False)
        for transport in self._transports:
            if transport._sock.gettimeout() != 0.0:
                transport._sock.setblocking(False)
        claimed = ahead.claim() if ahead is not None and self._poller is None else None
        if claimed is not None:
            # The connections' registrations, made as their sockets arrived
            # ahead of the graph, become this server's poller.
            self._poller = _Poller.from_ahead(claimed, self._transports)

    def start(self) -> None:
        run_service_hooks(
            self.protocol_factory, [t._protocol for t in self._transports], "takeover_adopted"
        )
        self._run()

    def discard(self) -> None:
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        for transport in self._transports:
            transport._sock.close()
        self._transports.clear()
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        assert self._loop is not None
        self._quiesced = False
        if self._poller is None:
            self._poller = _Poller()
        for transport in self._poller.start_idle(list(self._transports)):
            try:
                transport._start()
            except Exception as exc:
                # One broken connection must not take the others down with it.
                log.exception("starting %r failed; closing that connection", transport)
                transport._force_close(exc)
        self._loop.add_reader(self._poller.fileno(), self._poller.ready)
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            # Connections that queued while the service was paused.
            self._accept_ready()

    def __repr__(self) -> str:
        return f"<MigratableServer {self.service_name!r} {self.describe()}>"
