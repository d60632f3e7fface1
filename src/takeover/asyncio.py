"""The asyncio runtime.

An application becomes migratable in a few lines::

    import takeover.asyncio as takeover

    server = await takeover.start_server(EchoProtocol, "127.0.0.1", 8000, name="echo")
    async with takeover.MigrationServer("/run/echo.sock") as migration:
        migration.publish(server)
        await migration.wait_empty()        # returns once every service has moved

and ``takeover take /run/echo.sock`` (or :func:`take` in another program)
moves the listener, every connection and the protocols' state to a new
process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

from . import _fds
from ._aio_transport import MigratableServer, MigratableTransport, ProtocolFactory
from ._auth import PeerCredentials, peer_credentials
from ._errors import ChannelClosedError, MigrationTimeoutError, ProtocolError, TakeoverError
from ._protocol import FrameDecoder, Limits, Message
from .originator import serve_channel
from .recipient import RecipientSession, Taken, select
from .registry import Registry, Service

__all__ = [
    "AsyncioChannel",
    "MigratableServer",
    "MigratableTransport",
    "MigrationServer",
    "connect",
    "serve_until_moved",
    "start_server",
    "start_unix_server",
    "take",
]

log = logging.getLogger("takeover.asyncio")


class AsyncioChannel:
    """A control channel over a non-blocking AF_UNIX stream socket."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits = Limits(),
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._decoder = FrameDecoder(limits.max_frame_size)
        self._messages: collections.deque[Message] = collections.deque()
        self._fds: collections.deque[int] = collections.deque()
        self._eof = False
        self._peer = peer_credentials(sock)

    @property
    def peer(self) -> PeerCredentials | None:
        return self._peer

    async def _wait(self, writable: bool) -> None:
        fd = self._sock.fileno()
        future: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        if writable:
            self._loop.add_writer(fd, ready)
        else:
            self._loop.add_reader(fd, ready)
        try:
            await future
        finally:
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        data = memoryview(message.encode())
        try:
            if fds:
                while True:
                    try:
                        sent = _fds.send_with_fds(self._sock, data, fds)
                        break
                    except (BlockingIOError, InterruptedError):
                        await self._wait(writable=True)
                data = data[sent:]
            while data:
                try:
                    sent = self._sock.send(data)
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                data = data[sent:]
        except OSError as exc:
            if self._sock.fileno() < 0:
                raise ChannelClosedError("the control channel was closed") from exc
            raise ChannelClosedError(f"the control channel broke: {exc}") from exc

    async def receive(self, timeout: float | None) -> Message:
        try:
            return await asyncio.wait_for(self._receive(), timeout)
        except asyncio.TimeoutError:
            raise MigrationTimeoutError(
                f"the peer sent nothing for {timeout:g} s; giving up on this step"
            ) from None

    async def _receive(self) -> Message:
        while not self._messages:
            if self._eof:
                raise ChannelClosedError("the peer closed the control channel")
            try:
                data, fds = _fds.recv_with_fds(self._sock, 256 * 1024)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except ProtocolError:
                raise
            except OSError as exc:
                raise ChannelClosedError(f"the control channel broke: {exc}") from exc
            self._fds.extend(fds)
            if not data:
                self._eof = True
                if self._decoder.pending:
                    raise ProtocolError(
                        f"the peer closed the channel in the middle of a frame "
                        f"({self._decoder.pending} bytes of it arrived)"
                    )
                continue
            self._messages.extend(self._decoder.feed(data))
        return self._messages.popleft()

    def take_fds(self, count: int) -> list[int]:
        if count > len(self._fds):
            raise ProtocolError(
                f"an FDS frame announced {count} descriptors but {len(self._fds)} arrived"
            )
        return [self._fds.popleft() for _ in range(count)]

    def close(self) -> None:
        _fds.close_all(list(self._fds))
        self._fds.clear()
        self._sock.close()


async def start_server(
    protocol_factory: ProtocolFactory,
    host: str | None,
    port: int,
    *,
    name: str,
    backlog: int = 1024,
    reuse_address: bool = True,
) -> MigratableServer:
    """Listen on TCP ``host:port`` and serve it as migratable service ``name``.

    The counterpart of ``loop.create_server``: ``protocol_factory`` is called
    for each accepted connection and the result must pickle.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    if reuse_address:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return _serve(sock, address, backlog, protocol_factory, name, loop)


async def start_unix_server(
    protocol_factory: ProtocolFactory, path: str, *, name: str, backlog: int = 1024
) -> MigratableServer:
    """Listen on the AF_UNIX stream socket ``path`` as migratable service ``name``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return _serve(sock, path, backlog, protocol_factory, name, asyncio.get_running_loop())


def _serve(
    sock: socket.socket,
    address: Any,
    backlog: int,
    protocol_factory: ProtocolFactory,
    name: str,
    loop: asyncio.AbstractEventLoop,
) -> MigratableServer:
    """Bind and listen on ``sock`` (closing it on failure) and start serving."""
    try:
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    server = MigratableServer(sock, protocol_factory, name, loop)
    server.start()
    return server


def _bind_control(path: str, backlog: int = 64) -> socket.socket:
    """A listening AF_UNIX socket at ``path``, mode 0600 from the start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _path_lock(path: str) -> Iterator[None]:
    """Serialize renames onto ``path`` with the check-and-unlink of its owner.

    A recipient renames its socket over the control path while the process it
    replaced may be closing and removing that same path if the inode is still
    its own. Both steps hold an exclusive flock on the parent directory, so a
    rename can't land between the other's ``stat`` and ``unlink``.
    """
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale(path: str) -> None:
    """Remove a socket file at ``path`` that nothing listens on any more.

    Raises:
        FileExistsError: a migration server is listening there, or the path
            is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; choose another control path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.info("removing stale control socket %s", path)
            os.unlink(path)
            return
    raise FileExistsError(
        f"a migration server is already listening at {path}; "
        "take its services with `takeover take` or choose another control path"
    )


class MigrationServer:
    """Publishes services for migration on an AF_UNIX control socket.

    Args:
        path: where the control socket lives. It is created with mode 0600;
            only the same user (or root) may take services, checked with
            SO_PEERCRED on every connection.
        limits: frame size, descriptor count and step timeout limits.
        replace: bind a temporary path and ``rename`` it over ``path``
            (how a recipient takes over the control path of the process it
            replaced). Otherwise ``path`` must not exist.
    """

    def __init__(self, path: str, *, limits: Limits = Limits(), replace: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.limits = limits
        self.registry = Registry()
        self._replace = replace
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._empty: asyncio.Event | None = None

    async def __aenter__(self) -> MigrationServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the control socket and begin accepting recipients."""
        self._loop = asyncio.get_running_loop()
        self._empty = asyncio.Event()
        if self._replace:
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            self._sock = _bind_control(temporary)
            with _path_lock(self.path):
                os.rename(temporary, self.path)
        else:
            with _path_lock(self.path):
                _remove_stale(self.path)
                self._sock = _bind_control(self.path)
        self._inode = os.stat(self.path).st_ino
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)
        log.info("migration server listening on %s", self.path)

    def publish(self, service: Service) -> None:
        """Make ``service`` available to recipients."""
        self.registry.publish(service)

    async def wait_empty(self) -> None:
        """Return once every published service has moved away (or none is left)."""
        assert self._empty is not None, "start() the migration server first"
        self.registry.when_empty(self._empty.set)
        await self._empty.wait()
        # Let the conversation that moved the last service finish cleanly
        # (the recipient publishes the services again before it says BYE).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.limits.step_timeout)

    def _accept_ready(self) -> None:
        assert self._sock is not None and self._loop is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("migration server accept failed: %s", exc)
                return
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        channel = AsyncioChannel(conn, self._loop, limits=self.limits)
        try:
            await serve_channel(channel, self.registry, limits=self.limits)
        except ChannelClosedError:
            pass
        except TakeoverError as exc:
            log.warning("control connection ended: %s", exc)
        except Exception:
            log.exception("control connection failed")
        finally:
            channel.close()

    async def aclose(self) -> None:
        """Stop accepting recipients and remove the control path if still ours."""
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            # Another process may have renamed its own socket over the path.
            with _path_lock(self.path), contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))


async def connect(control: str, *, limits: Limits = Limits()) -> RecipientSession:
    """Open a control connection to the migration server at ``control``.

    Returns an opened :class:`~takeover.recipient.RecipientSession`.

    Raises:
        FileNotFoundError, ConnectionRefusedError: nothing serves ``control``.
        AuthenticationError: the originator runs as another user.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, control)
    except BaseException:
        sock.close()
        raise
    session = RecipientSession(AsyncioChannel(sock, loop, limits=limits), limits=limits)
    try:
        await session.open()
    except BaseException:
        session.channel.close()
        raise
    return session


async def take(
    control: str, services: Sequence[str] = (), *, limits: Limits = Limits()
) -> list[Taken]:
    """Move services from the migration server at ``control`` into this process.

    Args:
        control: the originator's control socket path.
        services: names to take; every published service when empty.

    Returns:
        One :class:`~takeover.recipient.Taken` per service, each running in
        this process's event loop.

    Raises:
        TakeoverError: the first service that could not be taken; services
            taken before it keep running here.
    """
    session = await connect(control, limits=limits)
    try:
        names = select(await session.list(), services)
        loop = asyncio.get_running_loop()
        return [await session.take(name, loop) for name in names]
    finally:
        await session.close()


async def serve_until_moved(
    *services: Service,
    control: str,
    limits: Limits = Limits(),
    replace: bool = False,
    ready: Callable[[MigrationServer], object] | None = None,
) -> None:
    """Publish ``services`` at ``control`` and return once all have moved away.

    The usual last line of a migratable program's ``main()``: when it
    returns, every connection belongs to another process and this one may
    exit.

    Args:
        services: the services to publish.
        control: the control socket path.
        limits: frame size, descriptor count and step timeout limits.
        replace: rename over an existing control socket at ``control``.
        ready: called once the control socket accepts recipients (to print
            a "ready" line, say).
    """
    async with MigrationServer(control, limits=limits, replace=replace) as migration:
        for service in services:
            migration.publish(service)
        if ready is not None:
            ready(migration)
        await migration.wait_empty()
