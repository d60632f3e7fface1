"""Listener hand-off for frameworks: :func:`listen` and the :class:`Listener` it opens.

aiohttp, uvicorn, the websockets library and asyncio streams serve each
connection in a coroutine, whose frame does not pickle, so their connections
cannot move. What can is what tableflip hands over: the listening socket,
and with it the kernel's accept queue. The application starts the same
command again (with new code); that process takes the listening socket from
its predecessor over the ordinary conversation (authentication, the
arbiter, rollback), publishes it for its own successor, and serves; the
predecessor stops accepting at once, drains its connections with its
framework's own graceful shutdown, and exits::

    async with takeover.asyncio.listen("127.0.0.1", 8080, control=CONTROL) as listener:
        site = web.SockSite(runner, listener.socket)     # any create_server(sock=...)
        await site.start()
        if await listener.wait():    # True: a successor took the listener
            ...                      # graceful shutdown: no more accepts here already

The service that moves is a :class:`~takeover.asyncio._listener.ListenerService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator, Iterable, Sequence
from types import TracebackType
from typing import Any

from .._core.auth import Admission, TLSConfig
from .._core.errors import NoSuchServiceError, TakeoverError
from .._core.logs import ensure_move_log
from .._core.protocol import Limits
from .._core.recipient import RecipientSession, Taken
from .._core.retire import retire as _retire
from .._core.supervision import Supervisor
from ._listener import ListenerRuntime, ListenerService
from ._migration import MigrationServer, check_publishable

log = logging.getLogger("takeover.asyncio")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def listen(
    host: str | None,
    port: int,
    *,
    control: str,
    name: str = "listener",
    backlog: int = 1024,
    reuse_address: bool = True,
    limits: Limits = Limits(),
    secret: bytes | None = None,
    tls: TLSConfig | None = None,
    admit_users: Iterable[int | str] = (),
    admit_groups: Iterable[int | str] = (),
    pid_file: str | None = None,
    log_format: str | None = None,
    retire: bool = True,
) -> Listener:
    """Bind TCP ``host:port``, or take it from the predecessor publishing at ``control``.

    Use the result with ``async with`` (it is closed on leaving), or
    ``await`` it (then call :meth:`Listener.aclose`). Opening it:

    * if a process publishes at ``control``, takes its listening socket
      ``name`` over the takeover conversation (same authentication, the
      move's arbiter, rollback): the predecessor keeps accepting until this
      process has committed, then accepts no more, and every connection
      still in the kernel's queue is this process's to accept. A take that
      fails raises, and the predecessor goes on serving as if nothing
      happened;
    * else binds and listens (``backlog``; SO_REUSEADDR with
      ``reuse_address``);
    * then publishes the listener at ``control`` for the next process
      (renamed over the predecessor's, as ``takeover take`` does), and tells
      a supervisor that set ``$NOTIFY_SOCKET`` READY (and ``pid_file`` this
      process's pid; a successor carries the predecessor's PID file on).

    Hand :attr:`Listener.socket` to the framework (any
    ``loop.create_server(sock=...)``), then wait with :meth:`Listener.wait`
    (or :attr:`Listener.successor_taken`) and run the framework's graceful
    shutdown. Once a successor took the listener, this process's framework
    accepts nothing more (see ``ListenerService.release``), its supervisor is
    told ``MAINPID=`` the successor, and on leaving (with ``retire``) the
    heap is frozen for a cheap exit (:func:`takeover.retire`, without the
    idle scheduling class: the exit must come by the drain's deadline).

    One listener per control path: a predecessor that publishes other
    services there too is refused before anything moves.

    Args:
        host, port: the TCP address to bind when nobody publishes at ``control``.
        control: the control socket path (or ``tcp:HOST:PORT``).
        name: the listener's service name.
        limits, secret, tls, admit_users, admit_groups: as for
            :class:`~takeover.asyncio.MigrationServer` (and what this side
            requires of the predecessor, see :func:`~takeover.asyncio.connect`).
        log_format: "text" or "json": configure logging to stderr that way
            (by default every move is logged to stderr if the application
            configured no logging).

    Raises (when opened):
        TakeoverError: a predecessor publishes at ``control`` but the take
            failed (refused, rolled back, busy, no listener ``name``); it
            goes on serving.
        OSError: the address could not be bound.
    """
    return Listener(
        host,
        port,
        control=control,
        name=name,
        backlog=backlog,
        reuse_address=reuse_address,
        limits=limits,
        secret=secret,
        tls=tls,
        admission=(tuple(admit_users), tuple(admit_groups)),
        pid_file=pid_file,
        log_format=log_format,
        retire=retire,
    )


class Listener:
    """A listening socket this process serves until a successor takes it (see :func:`listen`).

    Attributes:
        successor_taken: set once a successor has taken the listener; from
            then on this process's framework accepts nothing more.
        successor_pid: that successor's pid (None until then).
        stopping: set by SIGINT or SIGTERM while :meth:`wait` or after it.
        taken: how the listener came here from a predecessor (None: bound here).
        predecessor_pid: the predecessor's pid (None: bound here).
        control: where this process publishes the listener.
    """

    def __init__(
        self,
        host: str | None,
        port: int,
        *,
        control: str,
        name: str,
        backlog: int,
        reuse_address: bool,
        limits: Limits,
        secret: bytes | None,
        tls: TLSConfig | None,
        admission: tuple[Sequence[int | str], Sequence[int | str]],
        pid_file: str | None,
        log_format: str | None,
        retire: bool,
    ) -> None:
        Admission.of(*admission)  # a bad name fails here, before anything is opened
        self.host, self.port, self.name = host, port, name
        self._control, self._backlog, self._reuse_address = control, backlog, reuse_address
        self._security: dict[str, Any] = {
            "limits": limits,
            "secret": secret,
            "tls": tls,
            "admit_users": admission[0],
            "admit_groups": admission[1],
        }
        self._pid_file, self._log_format, self._retire = pid_file, log_format, retire
        self.control: str | None = None
        self.taken: Taken | None = None
        self.predecessor_pid: int | None = None
        self.successor_pid: int | None = None
        self.successor_taken = asyncio.Event()
        self.stopping = asyncio.Event()
        self._service: ListenerService | None = None
        self._socket: socket.socket | None = None
        self._migration: MigrationServer | None = None
        self._supervisor = Supervisor(pid_file)
        self._aftermath: asyncio.Task[None] | None = None
        self._signals: list[int] = []
        self._opened = self._closed = False

    # -- opening ---------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Listener]:
        return self.open().__await__()

    async def __aenter__(self) -> Listener:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> Listener:
        """Take the listener from the predecessor at ``control``, or bind it; publish it."""
        if self._opened:
            return self
        self._opened = True
        ensure_move_log(self._log_format)
        loop = asyncio.get_running_loop()
        if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            log.warning(
                "takeover.asyncio.listen: %s is not asyncio's selector event loop, so when "
                "the listener moves this process's framework is not stopped at once: close "
                "it as soon as successor_taken is set",
                type(loop).__name__,
            )
        from . import connect  # the package's, which imports this module

        try:
            session = await connect(self._control, **self._security)
        except (FileNotFoundError, ConnectionRefusedError):
            await self._bind_and_publish(loop)
        else:
            await self._take_and_publish(session, loop)
        assert self._migration is not None
        self._migration.registry.supervision = self._supervisor.handed_on()
        self._migration.registry.when_empty(self._moved)
        pause = self.taken.pause_ms if self.taken is not None else None
        self._supervisor.serving(1, 0, pause_ms=pause)
        return self

    async def _bind_and_publish(self, loop: asyncio.AbstractEventLoop) -> None:
        """Nobody publishes at ``control``: bind the address and publish it there."""
        sock = await _bind(self.host, self.port, self._backlog, self._reuse_address, loop)
        self._service = ListenerService(sock, self.name, loop)
        migration = MigrationServer(self._control, **self._security)
        migration.publish(self._service)
        await self._publish(migration)

    async def _take_and_publish(
        self, session: RecipientSession, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Take the listener from the predecessor, and publish it at ``control`` before BYE."""
        control = self._control
        try:
            listed = [str(s.get("name")) for s in await session.list()]
            if self.name not in listed:
                raise NoSuchServiceError(
                    f"the process at {control} publishes no listener named {self.name!r} "
                    f"(it publishes: {', '.join(listed) or 'nothing'})"
                )
            if listed != [self.name]:
                raise TakeoverError(
                    f"the process at {control} publishes other services besides listener "
                    f"{self.name!r} ({', '.join(n for n in listed if n != self.name)}); "
                    "nothing was taken: give each listener a control path of its own"
                )
            check_publishable(control, replace=True)
            try:
                self.taken = await session.take(self.name, ListenerRuntime(loop))
            except TakeoverError as exc:
                self._supervisor.failed(f"{self.name}: {exc}")
                raise
            if self._pid_file is None and "pid_file" in session.supervision:
                self._supervisor = Supervisor(session.supervision["pid_file"])
            self.predecessor_pid = _int_or_none(session.originator.get("pid"))
            service = self.taken.service
            assert isinstance(service, ListenerService)
            self._service = service
            migration = MigrationServer(control, replace=True, **self._security)
            migration.publish(service)
            if not migration.path.startswith("tcp:"):
                # Renamed over CONTROL before BYE: the predecessor, which removes
                # CONTROL on leaving if it is still its own, sees this one's.
                await self._publish(migration)
        finally:
            await session.close()
        if migration.path.startswith("tcp:"):
            await self._publish(migration)  # the predecessor releases the port after BYE

    async def _publish(self, migration: MigrationServer) -> None:
        """Start ``migration``; if it cannot start, close the listener taken (nobody could
        take it from here, and this process is about to fail)."""
        try:
            await migration.start()
        except BaseException:
            if self._service is not None:
                self._service.close()
            raise
        self._migration, self.control = migration, migration.path

    # -- serving ---------------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The listening socket to hand to the framework (``create_server(sock=...)``).

        A duplicate of takeover's own, made once: the framework owns it and
        closes it when it shuts down. Its accept loop is stopped here when a
        successor takes the listener.
        """
        if self._socket is None:
            if self._service is None:
                raise RuntimeError("open the listener first (async with, or await it)")
            self._socket = self._service.hand_out()
        return self._socket

    @property
    def address(self) -> Any:
        """The bound address (``(host, port)``; None once closed here)."""
        return self._service.address if self._service is not None else None

    def stop_accepting(self) -> None:
        """Stop this process's framework accepting on :attr:`socket`, closing nothing.

        A move does it at commit (the kernel's queue is then the successor's);
        call it before draining when stopping without a successor (SIGTERM),
        so that nothing is accepted behind the drain's back. Connections
        already accepted go on; the framework's shutdown closes the socket.
        """
        if self._service is not None:
            self._service.stop_accepting()

    @property
    def moved(self) -> bool:
        """Whether a successor has taken the listener."""
        return self.successor_taken.is_set()

    async def wait(self, stop_signals: Iterable[int] = STOP_SIGNALS) -> bool:
        """Serve until a successor takes the listener (True) or a stop signal comes (False).

        ``stop_signals`` (SIGINT and SIGTERM by default) set :attr:`stopping`
        from now until :meth:`aclose`: one that comes during the drain does
        not kill the process (end the drain early on :attr:`stopping` if
        you like). Pass ``()`` if the framework handles signals itself.
        """
        loop = asyncio.get_running_loop()
        for signum in stop_signals:
            if signum not in self._signals:
                with contextlib.suppress(ValueError, RuntimeError):  # not the main thread
                    loop.add_signal_handler(signum, self.stopping.set)
                    self._signals.append(signum)
        moved = asyncio.ensure_future(self.successor_taken.wait())
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([moved, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            stopped.cancel()
        return self.moved

    def _moved(self) -> None:
        """The registry's last service has gone: a successor took the listener."""
        assert self._migration is not None
        self.successor_pid = self._migration.registry.successor_pid
        self.successor_taken.set()
        log.info(
            "listener %r moved to pid %s: this process accepts no more and drains",
            self.name,
            self.successor_pid,
        )
        self._aftermath = asyncio.ensure_future(self._after_move())

    async def _after_move(self) -> None:
        """Let the conversation end, stop publishing, and tell the supervisor."""
        assert self._migration is not None
        await self._migration.wait_empty()
        # First: over TCP, the successor publishes once this releases the port.
        await self._migration.aclose()
        # MAINPID waits (up to 5 s) until the supervisor has read it: not in the loop,
        # which still serves the connections being drained.
        await asyncio.to_thread(self._supervisor.moved_away, self.successor_pid)

    async def aclose(self) -> None:
        """Stop publishing; close takeover's copy of the socket unless it moved; retire if it did.

        The framework's socket (:attr:`socket`) is the framework's to close.
        """
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)
        self._signals.clear()
        if self._aftermath is None and self._migration is not None:
            # A move in progress rolls back into this process before the socket
            # closes (or commits, and then the aftermath below follows).
            await self._migration.aclose()
        if self._aftermath is not None:
            await self._aftermath
        if self._service is not None and not self._service.released:
            self._service.close()
        if self.moved and self._retire:
            # Only the frozen heap: SCHED_IDLE could starve this exit for as long as
            # the successor keeps the CPUs busy, and a drain promises a deadline.
            _retire(idle_priority=False)

    def __repr__(self) -> str:
        where = "moved" if self.moved else "serving" if self._service is not None else "unopened"
        return f"<Listener {self.name!r} {where} control={self.control or self._control!r}>"


async def _bind(
    host: str | None, port: int, backlog: int, reuse_address: bool, loop: asyncio.AbstractEventLoop
) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, non-blocking."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None
