"""The asyncio transport that can be paused, pickled and adopted.

asyncio's own selector transports cannot be paused for writing and keep
their unsent output in a private buffer, so takeover brings its own. The
differences that matter for migration:

* Its connection is watched by its server's epoll instance (see
  ``_server._Poller``), not by the event loop directly, so that quiescing a
  server stops every connection at once. Output the protocol writes while
  the service is paused is buffered, never lost.
* It pickles: its socket (as a descriptor slot), its protocol, its unsent
  output and the flags that differ from their defaults travel; the event
  loop does not. An idle transport travels as a *twin* instead (see
  :func:`new_twins`).
* ``_release()`` (originator, after commit) closes this process's
  descriptor with a plain ``close()``: no ``shutdown()``, no SO_LINGER, so
  the connection, now the recipient's, is untouched. The transport is then
  *moved*: ``is_closing()`` is true and ``write()`` raises
  :class:`~takeover.ConnectionMovedError`, so a writer that kept a
  reference learns that its bytes were not sent.
* Once the service's graph is pickled, a call from outside the service that
  changes the connection (``write()``, ``close()``, ``pause_reading()``...)
  first asks the move (the server's seal, see
  ``takeover._core.registry.Service``): either the move is rolled back and
  the call takes effect here, or the recipient has committed and the call
  fails as above. Never is it silently dropped with the originator's copy.
* On the recipient, ``_start()`` first writes the carried output, then
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
import functools
import logging
import socket
import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

from .._core.errors import ConnectionMovedError

if TYPE_CHECKING:
    from ._server import MigratableServer

log = logging.getLogger("takeover.asyncio")

READ_SIZE = 64 * 1024
"""Bytes asked of each ``recv`` (Twisted's choice too), not asyncio's 256 KiB:
``recv(n)`` allocates n bytes before it knows how many arrive, and above
glibc's mmap threshold (128 KiB until a larger block is freed) each such
read maps, faults in, remaps and unmaps a fresh block, which costs a busy
server most of its CPU."""
HIGH_WATER = 64 * 1024


# A transport whose instance dict holds no more than these carries nothing
# but its socket and protocol: it can travel as a twin (see new_twins).
_TWIN_KEYS = frozenset({"_sock", "_protocol", "_server", "_buffer", "_quiesced"})


def new_twins(sockets: Sequence[socket.socket]) -> list[MigratableTransport]:
    """The recipient's transports for connections sent ahead, before their graph.

    The graph refers to them through the move's pickle memo (see
    ``takeover._core.ahead.SocketsAhead``) instead of pickling them; the server that
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


def unfit_twins(transports: Iterable[MigratableTransport]) -> list[MigratableTransport]:
    """Those of ``transports`` that carry more than their socket and protocol."""
    keys = _TWIN_KEYS
    return [t for t in transports if t._buffer or not t.__dict__.keys() <= keys]


def twin_claimed(twin: MigratableTransport) -> bool:
    """Whether a server of the graph took ``twin`` as one of its connections.

    Asked of the attribute, not of ``twin.__dict__``: reading ``__dict__``
    makes CPython build the instance a dict object (64 bytes per connection)
    that it then keeps. ``_server`` has no default on the class.
    """
    return hasattr(twin, "_server")


class MigratableTransport(asyncio.Transport):
    """A stream transport over a connected socket that can migrate."""

    # How the dry run names these attributes in a path (see takeover._core.graphpath).
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
    _high_water = HIGH_WATER
    _low_water = HIGH_WATER // 4
    _quiesced = True
    _lost_pending = False
    _moved = False
    _buffered = False  # the protocol is an asyncio.BufferedProtocol (reads with recv_into)
    _info: dict[str, Any] | None = None
    # loop.start_tls() may wrap this transport (the connection then cannot
    # move: TLS state does not pickle; a partial move leaves it to drain).
    _start_tls_compatible = True

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
        if isinstance(protocol, asyncio.BufferedProtocol):
            self._buffered = True

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._server._loop

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
        if self._quiesced and not self._may_change("set_protocol()"):
            return
        self._protocol = protocol
        buffered = isinstance(protocol, asyncio.BufferedProtocol)
        if buffered != self._buffered:
            self._buffered = buffered

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if self._reading_paused or self._closing:
            return
        if self._quiesced and not self._may_change("pause_reading()"):
            return
        self._reading_paused = True
        self._sync()

    def resume_reading(self) -> None:
        if not self._reading_paused or self._closing:
            return
        if self._quiesced and not self._may_change("resume_reading()"):
            return
        self._reading_paused = False
        self._sync()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._quiesced and not self._may_change("set_write_buffer_limits()"):
            return
        self._high_water = HIGH_WATER if high is None else high
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
            if self._moved and data:
                raise self._moved_error("write()")
            return
        if self._quiesced and not self._may_change("write()"):
            raise self._moved_error("write()")
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
        if self._moved:
            raise self._moved_error("write_eof()")
        if self._closing or self._eof_pending or self._eof_written:
            return
        if self._quiesced and not self._may_change("write_eof()"):
            raise self._moved_error("write_eof()")
        self._eof_pending = True
        if not self._buffer and not self._quiesced:
            self._shutdown_write()

    def close(self) -> None:
        if self._closing:
            return
        if self._quiesced and not self._may_change("close()"):
            return
        self._closing = True
        self._sync()
        if not self._buffer:
            self._schedule_connection_lost(None)

    def abort(self) -> None:
        if self._lost or (self._quiesced and not self._may_change("abort()")):
            return
        self._force_close(None)

    # -- I/O ------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._buffered:
            self._read_into()
            return
        try:
            data = self._sock.recv(READ_SIZE)
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

    def _read_into(self) -> None:
        """``_read_ready`` for an asyncio.BufferedProtocol (TLS, for one)."""
        protocol: Any = self._protocol
        try:
            buffer = protocol.get_buffer(-1)
            if not len(buffer):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except Exception as exc:
            self._fatal_error(exc)
            return
        try:
            count = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal_error(exc)
            return
        if count:
            protocol.buffer_updated(count)
            return
        self._eof_received = True
        self._sync()
        keep_open = protocol.eof_received()
        if not keep_open:
            self.close()

    def _cannot_move(self) -> str | None:
        """Why this connection cannot move, by the kind of its protocol (None: it may)."""
        protocol = self._protocol
        if isinstance(protocol, asyncio.StreamReaderProtocol):
            return "an asyncio stream (a coroutine serves it)"
        if type(protocol).__module__ == "asyncio.sslproto":
            return "a TLS session"
        if self._buffered:
            return "a buffered protocol"
        return None

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
        From now on the transport is closed, and writes raise
        ConnectionMovedError.
        """
        self._quiesced = True
        self._lost = True
        self._closing = True
        self._moved = True
        self._sock.close()

    def _may_change(self, call: str) -> bool:
        """Whether ``call`` may change this quiesced connection.

        Inside a move whose graph is pickled (the server is sealed), the
        move decides (see ``takeover._core.registry.Service``); if the
        recipient owns the connection, this transport is moved from now on
        and False is returned.
        """
        if self._moved:
            return False
        server = self._server
        seal = server._seal
        if seal is None or (server._leaving and self in server._leaving):
            return True  # not in a move, or left behind by it: it stays here
        if seal(f"{call} on {self._describe()}"):
            return True
        self._closing = True
        self._moved = True
        return False

    def _describe(self) -> str:
        try:
            peer = self._sock.getpeername()
        except OSError:
            peer = None
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        where = f" from {peer}" if peer else ""
        return f"the connection{where} of service {self._server.service_name!r}"

    def _moved_error(self, call: str) -> ConnectionMovedError:
        return ConnectionMovedError(
            f"{call} on {self._describe()}: the connection now belongs to another process "
            "(the service moved); nothing was sent"
        )

    def __repr__(self) -> str:
        peer = (self._info or {}).get("peername")
        state = (
            "moved"
            if self._moved
            else "quiesced"
            if self._quiesced
            else "closing"
            if self._closing
            else "open"
        )
        return f"<MigratableTransport fd={self._sock.fileno()} peer={peer} {state}>"


def _share_keys(cls: type[MigratableTransport]) -> None:
    """Put the attributes of an idle connection in ``cls``'s shared instance keys.

    CPython (3.11, 3.12) gives the instances of a class one shared table of
    attribute names and each instance an array of values only, as long as
    the name it sets is in that table, or the table may still grow: it may
    only while the class has made fewer than about 30 instances. A recipient
    builds thousands of twins (:func:`new_twins`) before it sets any of their
    attributes, so without this the table froze empty and each twin got a
    dict of its own: about 270 bytes more per connection than on the
    originator. Called once, at import, before any instance exists.
    """
    probe = cls.__new__(cls)
    for name in ("_sock", "_protocol", "_server", "_buffer", "_quiesced"):
        setattr(probe, name, None)  # the order of MigratableTransport.__init__, then accept


_share_keys(MigratableTransport)


async def start_tls(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    sslcontext: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
) -> asyncio.Transport:
    """``loop.start_tls()`` on a takeover connection, whatever the event loop.

    asyncio's own loops run it as is. uvloop's ``start_tls()`` accepts only
    uvloop's transports and refuses a :class:`MigratableTransport`; asyncio's
    implementation (``asyncio.sslproto`` over the transport's public methods
    and the loop's ``call_soon``, ``call_later``, ``create_future``) runs on
    uvloop's loop too, so that is what runs there. The TLS connection is the
    same either way: it cannot move, and a partial move leaves it to drain.
    """
    loop: Any = asyncio.get_running_loop()
    start = loop.start_tls
    if not isinstance(loop, asyncio.BaseEventLoop):
        start = functools.partial(asyncio.BaseEventLoop.start_tls, loop)
    new: asyncio.Transport = await start(
        transport,
        protocol,
        sslcontext,
        server_side=server_side,
        server_hostname=server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout,
    )
    return new
