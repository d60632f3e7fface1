"""asyncio transports and servers that can be paused, pickled and adopted.

asyncio's own selector transports cannot be paused for writing and keep
their unsent output in a private buffer, so takeover brings its own. The
differences that matter for migration:

* A server's connections are watched by an epoll instance of its own (a
  :class:`_Poller`), and the event loop watches that one descriptor. So
  ``quiesce()`` stops every connection at once by removing one reader from
  the loop, not one per connection, and a recipient registers its
  connections with one C call each instead of a trip through the selector.
  Output the protocol writes while paused is buffered, never lost.
* The transport pickles: its socket (as a descriptor slot), its protocol, its
  unsent output and its flags travel; the event loop does not.
* ``release()`` (originator, after commit) unregisters and closes this
  process's descriptor with a plain ``close()``: no ``shutdown()``, no
  SO_LINGER, so the connection, now the recipient's, is untouched.
* On the recipient, ``start()`` first writes the carried output, then
  resumes reading: bytes leave in the order the protocol wrote them.

A protocol needs no change. It may define three optional hooks:
``takeover_quiesce()`` (originator, before the graph is pickled: cancel
timers), ``takeover_resume()`` (originator, after a rollback: re-arm them) and
``takeover_adopted()`` (recipient, after commit, before any I/O: re-arm them
there). A server's protocol factory may define the same hooks (a factory
that is a class is not called).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

from . import _staging
from ._staging import Staging

log = logging.getLogger("takeover.asyncio")

_READ_SIZE = 64 * 1024
"""Bytes asked of each ``recv`` (Twisted's choice too). Not asyncio's 256 KiB:
``recv(n)`` allocates n bytes before it knows how many arrive, and above
glibc's mmap threshold (128 KiB until a large block is freed) that is an
mmap, an mremap and a munmap per read. A server answering small requests
spent two thirds of its CPU there (42k requests/s against 120k in
benchmarks/load.py), and whether it did depended on the process's history."""
_HIGH_WATER = 64 * 1024
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
    def from_staging(cls, staging: Staging, transports: Iterable[MigratableTransport]) -> _Poller:
        """A poller made of the staged epoll instance (recipient, before start).

        Each connection keeps the registration (for reading) made when its
        socket arrived; start() corrects the few that should not read
        (``_start`` through ``_sync``). Staged descriptors that are not one of
        these connections are unregistered.
        """
        poller = cls.__new__(cls)
        poller._epoll = staging.epoll
        poller._masks = masks = {}
        poller._transports = owners = {}
        registered = staging.registered
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
                    t._quiesced = False  # registered already (staged, or before a rollback)
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


def _hooks(objects: Iterable[Any], name: str) -> None:
    """:func:`_hook` on each object, looking the hook up once per class.

    An object whose class has no such attribute (and no ``__getattr__``)
    has the hook only if its own ``__dict__`` does.
    """
    verdicts: dict[type, bool] = {}
    for obj in objects:
        cls = type(obj)
        may = verdicts.get(cls)
        if may is None:
            may = verdicts[cls] = hasattr(cls, name) or hasattr(cls, "__getattr__")
        if may or name in getattr(obj, "__dict__", ()):
            _hook(obj, name)


def _hook(obj: Any, name: str) -> None:
    """Call ``obj``'s migration hook ``name``, if it has one.

    A failing ``takeover_quiesce`` aborts the move (the originator rolls
    back); the other hooks run when there is no going back, so their failure
    is logged and the service goes on.
    """
    if isinstance(obj, type):
        return
    method = getattr(obj, name, None)
    if not callable(method):
        return
    try:
        method()
    except Exception:
        if name == "takeover_quiesce":
            raise
        log.exception("%s() of %r failed", name, obj)


# A transport whose instance dict holds no more than these carries nothing
# but its socket and protocol: it can travel as a twin (see new_twins).
_TWIN_KEYS = frozenset({"_sock", "_protocol", "_server", "_buffer", "_quiesced"})


def new_twins(sockets: Sequence[socket.socket]) -> list[MigratableTransport]:
    """The recipient's transports for connections sent ahead, before their graph.

    The graph refers to them through the move's pickle memo (see
    ``_serialize.EarlySockets``) instead of pickling them; the server that
    claims one gives it its protocol (``MigratableServer.__setstate__``).
    Built with C loops (``map``): thousands arrive while the originator
    pickles, and the graph waits for the last.
    """
    count = len(sockets)
    cls = MigratableTransport
    twins = list(map(cls.__new__, repeat(cls, count)))
    deque(map(setattr, twins, repeat("_sock", count), sockets), maxlen=0)
    buffers = map(bytearray, repeat(b"", count))
    deque(map(setattr, twins, repeat("_buffer", count), buffers), maxlen=0)
    return twins


def twin_claimed(twin: MigratableTransport) -> bool:
    """Whether a server of the graph took ``twin`` as one of its connections."""
    return "_server" in twin.__dict__


class MigratableTransport(asyncio.Transport):
    """A stream transport over a connected socket that can migrate."""

    # How the dry run names these attributes in a path (see _graphpath).
    _takeover_path_names = {"_protocol": "protocol", "_sock": "socket", "_server": "server"}

    # Every flag has its default here, on the class: an idle connection's
    # instance dict holds only its socket, protocol, server and output buffer,
    # so it pickles and unpickles in C (no __getstate__ or __setstate__ runs
    # per connection) and small. The event loop is the server's, not stored
    # here. (asyncio.BaseTransport's ``_extra`` slot is not used: what
    # get_extra_info() reads is cached in ``_info``.)
    _closing = False
    _lost = False
    _eof_received = False
    _eof_pending = False
    _eof_written = False
    _reading_paused = False
    _protocol_paused = False
    _high_water = _HIGH_WATER
    _low_water = _HIGH_WATER // 4
    _quiesced = True
    _lost_pending = False
    _info: dict[str, Any] | None = None

    def __init__(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        server: MigratableServer,
    ) -> None:
        # No super().__init__(): it would only fill the unused _extra slot.
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        self._sock = sock
        self._protocol = protocol
        self._server = server
        self._buffer = bytearray()

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._server._loop

    def _legacy_state(self) -> None:
        """Bring a transport pickled by takeover 0.1 (full ``__dict__``) up to date."""
        state = self.__dict__
        state.pop("_loop", None)
        extra = state.pop("_extra", None)
        if extra:
            state["_info"] = dict(extra)
        self._buffer = bytearray(self._buffer)

    # -- asyncio.Transport ----------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        info = self._info
        if info is None:
            # Read when first asked (not at accept time: two system calls per
            # connection saved), then cached, and carried when it moves.
            info = self._info = {}
            for key, getter in (
                ("peername", self._sock.getpeername),
                ("sockname", self._sock.getsockname),
            ):
                try:
                    info[key] = getter()
                except OSError:
                    pass
        return info.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if self._reading_paused or self._closing:
            return
        self._reading_paused = True
        self._sync()

    def resume_reading(self) -> None:
        if not self._reading_paused or self._closing:
            return
        self._reading_paused = False
        self._sync()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = _HIGH_WATER if high is None else high
        self._low_water = self._high_water // 4 if low is None else low
        self._maybe_pause_protocol()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if self._eof_pending or self._eof_written:
            raise RuntimeError("cannot write after write_eof()")
        if self._closing or self._lost or not data:
            return
        if not self._buffer and not self._quiesced:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal_error(exc)
                return
            data = memoryview(data)[sent:]
            if not data:
                return
            self._buffer += data
            self._sync()
        else:
            self._buffer += data
        self._maybe_pause_protocol()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_pending or self._eof_written:
            return
        self._eof_pending = True
        if not self._buffer and not self._quiesced:
            self._shutdown_write()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._sync()
        if not self._buffer:
            self._schedule_connection_lost(None)

    def abort(self) -> None:
        self._force_close(None)

    # -- I/O ------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal_error(exc)
            return
        if data:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            return
        self._eof_received = True
        self._sync()
        keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self.close()

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._buffer.clear()
            self._fatal_error(exc)
            return
        del self._buffer[:sent]
        self._maybe_resume_protocol()
        if self._buffer:
            return
        self._sync()
        if self._closing:
            self._schedule_connection_lost(None)
        elif self._eof_pending:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        self._eof_pending = False
        self._eof_written = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _maybe_pause_protocol(self) -> None:
        if len(self._buffer) > self._high_water and not self._protocol_paused:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception:
                log.exception("protocol.pause_writing() failed")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and len(self._buffer) <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:
                log.exception("protocol.resume_writing() failed")

    def _fatal_error(self, exc: Exception) -> None:
        if not isinstance(exc, (ConnectionError, OSError)):
            log.error("fatal error on transport %r", self, exc_info=exc)
        self._force_close(exc)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._buffer.clear()
        self._closing = True
        self._sync()
        self._schedule_connection_lost(exc)

    def _schedule_connection_lost(self, exc: Exception | None) -> None:
        if self._quiesced:
            # In transit: whichever process ends up owning the connection
            # reports the loss when it starts.
            self._lost_pending = True
            return
        assert self._loop is not None
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        if self._quiesced:
            self._lost_pending = True
            return
        self._lost = True
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._server._detach(self)
            if self._server._poller is not None:
                self._server._poller.forget(self)
            self._sock.close()

    # -- migration --------------------------------------------------------------

    def _sync(self) -> None:
        """Tell the server's poller what this connection waits for now."""
        if self._quiesced or self._lost:
            return
        poller = self._server._poller
        if poller is not None:
            reading = not (self._closing or self._reading_paused or self._eof_received)
            poller.watch(self, reading, bool(self._buffer))

    def _start(self) -> None:
        """Begin (or resume) I/O: carried output first, then reading."""
        if not self._quiesced or self._lost:
            return
        self._quiesced = False
        loop = self._loop
        assert loop is not None
        if self._lost_pending or (self._closing and not self._buffer):
            self._lost_pending = False
            loop.call_soon(self._connection_lost, None)
            return
        if self._buffer:
            self._write_ready()
        elif self._eof_pending:
            self._shutdown_write()
        self._sync()

    def _release(self) -> None:
        """Commit, originator side: drop this process's descriptor only.

        The server has closed its poller first, so nothing watches it here.
        """
        self._quiesced = True
        self._lost = True
        self._sock.close()

    def __repr__(self) -> str:
        peer = (self._info or {}).get("peername")
        state = "quiesced" if self._quiesced else "closing" if self._closing else "open"
        return f"<MigratableTransport fd={self._sock.fileno()} peer={peer} {state}>"


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


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

    # How the dry run names these attributes in a path (see _graphpath).
    _takeover_path_names = {"_transports": "connections", "_sock": "socket"}

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
        self._serving = False
        self._quiesced = True

    # The layout of the pickled state: 2 since transports pickle without
    # __getstate__ (a graph without the key comes from takeover 0.1); 3 since
    # the connections travel as two lists, transports and their protocols,
    # so that a transport may travel as a twin, its protocol apart.
    _STATE_VERSION = 3

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loop"] = None
        state["_poller"] = None
        transports = list(self._transports)
        state["_transports"] = transports
        state["_protocols"] = [t._protocol for t in transports]
        state["_state_version"] = self._STATE_VERSION
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        version = state.pop("_state_version", 1)
        protocols = state.pop("_protocols", None)
        self.__dict__.update(state)
        self.__dict__.setdefault("_poller", None)  # a graph from before 2d4ee1b has none
        self._quiesced = True
        if version < 2:
            for transport in self._transports:
                transport._legacy_state()
        if version < 3:
            return
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

    # -- twins (see _serialize.EarlySockets) -------------------------------------

    takeover_twin_kind = "asyncio"

    def takeover_twins(self) -> dict[socket.socket, MigratableTransport]:
        """Each connection by its socket: each may travel as a twin (see new_twins)."""
        return {t._sock: t for t in self._transports}

    def takeover_unfit(self) -> list[MigratableTransport]:
        """The connections that now carry more than their socket and protocol
        (output to send, a flag set, addresses read): they travel in full."""
        keys = _TWIN_KEYS
        return [t for t in self._transports if t._buffer or not t.__dict__.keys() <= keys]

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
        return {"kind": "asyncio", "address": address, "connections": len(self._transports)}

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
        _hook(self.protocol_factory, "takeover_quiesce")
        _hooks([t._protocol for t in self._transports], "takeover_quiesce")

    def resume(self) -> None:
        _hook(self.protocol_factory, "takeover_resume")
        _hooks([t._protocol for t in self._transports], "takeover_resume")
        self._run()

    def release(self) -> None:
        self.quiesce()
        if self._poller is not None:
            # Closing the epoll instance drops every registration at once; the
            # recipient's copies of the sockets are not watched here any more.
            self._poller.close()
            self._poller = None
        for transport in self._transports:
            transport._release()
        self._transports.clear()
        if self._sock is not None:
            self._sock.close()

    def adopt(self, runtime: Any) -> None:
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
        if self._poller is None:
            # The connections' registrations, made as their sockets arrived
            # ahead of the graph, become this server's poller.
            staging = _staging.claim()
            if staging is not None:
                self._poller = _Poller.from_staging(staging, self._transports)

    def start(self) -> None:
        _hook(self.protocol_factory, "takeover_adopted")
        _hooks([t._protocol for t in self._transports], "takeover_adopted")
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
