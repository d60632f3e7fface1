"""Control channels for the asyncio runtime.

* :class:`AsyncioChannel`: AF_UNIX. Frames and descriptors share the socket;
  it is read with ``recvmsg`` only, so each descriptor batch arrives no later
  than the FDS frame it rides on.
* :class:`StreamChannel`: TCP, optionally TLS, on asyncio streams. It carries
  frames only; descriptors go over an *fd transport* (``_FdSocket``), an AF_UNIX socket
  in the abstract namespace that the originator offers (address and a
  one-time token in its HELLO) and the recipient connects before its first
  TAKE. The abstract namespace belongs to the network namespace, so a
  recipient on another host cannot reach it, and is told so.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .._core import fds as _fds
from .._core.auth import Admission, PeerCredentials, check_peer, peer_credentials
from .._core.errors import (
    AuthenticationError,
    ChannelClosedError,
    MigrationTimeoutError,
    ProtocolError,
)
from .._core.protocol import HANDSHAKE_FRAME_LIMIT, FrameDecoder, Limits, Message
from ._transport import READ_SIZE

T = TypeVar("T")

_TOKEN_BYTES = 32


async def _wait_fd(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    writable: bool,
    deadline: float | None = None,
    what: str = "",
) -> None:
    """Wait until ``sock`` is readable (or writable), until ``deadline`` (loop time).

    ``what`` completes the timeout's message: "the peer sent nothing for WHAT".

    A timer on the loop, not ``asyncio.wait_for``: that would run the wait
    in a task of its own, which costs two more turns of the loop per frame
    (a move's pause is a few frames long).

    Raises:
        MigrationTimeoutError: the deadline passed first.
    """
    fd = sock.fileno()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    def expired() -> None:
        if not future.done():
            future.set_exception(_timeout_error(what))

    timer = None
    if deadline is not None:
        timer = loop.call_at(deadline, expired)
    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _timeout_error(what: str) -> MigrationTimeoutError:
    return MigrationTimeoutError(f"the peer sent nothing for {what}; giving up on this step")


async def _with_timeout(awaitable: Any, timeout: float | None, what: str) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise MigrationTimeoutError(
            f"the peer sent nothing for {timeout:g} s while {what}; giving up on this step"
        ) from None


class _FdSocket:
    """Descriptors (and frame bytes, for AF_UNIX channels) on a non-blocking
    AF_UNIX stream socket, always read with ``recvmsg``."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.fds: collections.deque[int] = collections.deque()
        self.eof = False

    async def send(self, data: bytes | memoryview, fds: Sequence[int]) -> None:
        view = memoryview(data)
        try:
            if fds:
                while True:
                    try:
                        sent = _fds.send_with_fds(self.sock, view, fds)
                        break
                    except (BlockingIOError, InterruptedError):
                        await _wait_fd(self.loop, self.sock, writable=True)
                view = view[sent:]
            while view:
                try:
                    sent = self.sock.send(view)
                except (BlockingIOError, InterruptedError):
                    await _wait_fd(self.loop, self.sock, writable=True)
                    continue
                view = view[sent:]
        except OSError as exc:
            if self.sock.fileno() < 0:
                raise ChannelClosedError("the control channel was closed") from exc
            raise ChannelClosedError(f"the control channel broke: {exc}") from exc

    async def read(self, deadline: float | None = None, what: str = "") -> bytes:
        """Bytes read (b"" at EOF); descriptors that came along are queued.

        Reads at once when data is there: the loop is entered only to wait.
        """
        while True:
            try:
                data, fds = _fds.recv_with_fds(self.sock, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                await _wait_fd(self.loop, self.sock, False, deadline, what)
                continue
            except ProtocolError:
                raise
            except OSError as exc:
                raise ChannelClosedError(f"the control channel broke: {exc}") from exc
            self.fds.extend(fds)
            if not data:
                self.eof = True
            return data

    def take(self, count: int) -> list[int]:
        return [self.fds.popleft() for _ in range(count)]

    def close(self) -> None:
        _fds.close_all(list(self.fds))
        self.fds.clear()
        self.sock.close()


class _LoopTime:
    """What both channels do with asyncio's loop itself (see ``Channel``)."""

    async def pass_turn(self) -> None:
        await asyncio.sleep(0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)


class AsyncioChannel(_LoopTime):
    """A control channel over a non-blocking AF_UNIX stream socket."""

    local = True
    encrypted = False

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: Limits = Limits(),
    ) -> None:
        self._io = _FdSocket(sock, loop or asyncio.get_running_loop())
        # Small until the handshake is over: an unauthenticated peer can't make
        # this side wait for, or buffer, a large frame.
        self._decoder = FrameDecoder(min(limits.max_frame_size, HANDSHAKE_FRAME_LIMIT))
        self._messages: collections.deque[Message] = collections.deque()
        self._peer = peer_credentials(sock)

    @property
    def peer(self) -> PeerCredentials | None:
        return self._peer

    def limit_frames(self, size: int) -> None:
        self._decoder.max_frame_size = size

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        await self._io.send(message.encode(), fds)

    async def receive(self, timeout: float | None) -> Message:
        if self._messages:
            return self._messages.popleft()
        deadline = None if timeout is None else self._io.loop.time() + timeout
        what = "" if timeout is None else f"{timeout:g} s while waiting for a frame"
        while not self._messages:
            if self._io.eof:
                raise ChannelClosedError("the peer closed the control channel")
            data = await self._io.read(deadline, what)
            if not data:
                if self._decoder.pending:
                    raise ProtocolError(
                        f"the peer closed the channel in the middle of a frame "
                        f"({self._decoder.pending} bytes of it arrived)"
                    )
                continue
            self._messages.extend(self._decoder.feed(data))
        return self._messages.popleft()

    async def take_fds(self, count: int, timeout: float | None = None) -> list[int]:
        if count > len(self._io.fds):
            raise ProtocolError(
                f"an FDS frame announced {count} descriptors but {len(self._io.fds)} arrived"
            )
        return self._io.take(count)

    async def offer_fd_transport(self) -> dict[str, Any]:
        return {}

    async def accept_fd_transport(self, timeout: float | None) -> None:
        return None

    async def connect_fd_transport(self, offer: dict[str, Any], timeout: float | None) -> None:
        return None

    def close(self) -> None:
        self._io.close()


class StreamChannel(_LoopTime):
    """A control channel over TCP (optionally TLS), descriptors aside.

    Args:
        reader, writer: the asyncio stream pair of the connection.
        limits: frame size limit.
        admission: the other users and groups accepted at the other end of
            the descriptor transport (its SO_PEERCRED check).
    """

    local = False

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        limits: Limits = Limits(),
        admission: Admission = Admission(),
    ) -> None:
        self._admission = admission
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        # Small until the handshake is over: an unauthenticated peer can't make
        # this side wait for, or buffer, a large frame.
        self._decoder = FrameDecoder(min(limits.max_frame_size, HANDSHAKE_FRAME_LIMIT))
        self._messages: collections.deque[Message] = collections.deque()
        self.encrypted = writer.get_extra_info("ssl_object") is not None
        self._listener: socket.socket | None = None
        self._token = b""
        self._fd: _FdSocket | None = None

    @property
    def peer(self) -> PeerCredentials | None:
        return None

    def limit_frames(self, size: int) -> None:
        self._decoder.max_frame_size = size

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if fds:
            if self._fd is None:
                raise ChannelClosedError("no descriptor transport is connected")
            await self._fd.send(b"F", fds)
        try:
            self._writer.write(message.encode())
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise ChannelClosedError(f"the control channel broke: {exc}") from exc

    async def receive(self, timeout: float | None) -> Message:
        message: Message = await _with_timeout(self._receive(), timeout, "waiting for a frame")
        return message

    async def _receive(self) -> Message:
        while not self._messages:
            try:
                data = await self._reader.read(READ_SIZE)
            except OSError as exc:
                raise ChannelClosedError(f"the control channel broke: {exc}") from exc
            if not data:
                if self._decoder.pending:
                    raise ProtocolError(
                        f"the peer closed the channel in the middle of a frame "
                        f"({self._decoder.pending} bytes of it arrived)"
                    )
                raise ChannelClosedError("the peer closed the control channel")
            self._messages.extend(self._decoder.feed(data))
        return self._messages.popleft()

    async def take_fds(self, count: int, timeout: float | None = None) -> list[int]:
        if self._fd is None:
            raise ProtocolError("descriptors announced, but no descriptor transport is connected")
        fd = self._fd

        async def collect() -> list[int]:
            while len(fd.fds) < count:
                if not await fd.read() and fd.eof:
                    raise ChannelClosedError("the descriptor transport closed mid-transfer")
            return fd.take(count)

        fds: list[int] = await _with_timeout(collect(), timeout, "waiting for descriptors")
        return fds

    async def offer_fd_transport(self) -> dict[str, Any]:
        name = f"takeover-fd-{secrets.token_hex(8)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + name)
            listener.listen(1)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        return {"address": "@" + name, "token": self._token.hex()}

    async def accept_fd_transport(self, timeout: float | None) -> None:
        if self._fd is not None:
            return
        if self._listener is None:
            raise ProtocolError("no descriptor transport was offered")
        listener = self._listener

        async def accept() -> _FdSocket:
            while True:
                try:
                    conn, _ = listener.accept()
                    break
                except (BlockingIOError, InterruptedError):
                    await _wait_fd(self._loop, listener, writable=False)
            fd = _FdSocket(conn, self._loop)
            try:
                check_peer(peer_credentials(conn), role="recipient", admission=self._admission)
                token = b""
                while len(token) < _TOKEN_BYTES:
                    chunk = await fd.read()
                    if not chunk:
                        break
                    token += chunk
                if not hmac.compare_digest(token, self._token):
                    raise AuthenticationError("the descriptor transport presented a wrong token")
            except BaseException:
                fd.close()
                raise
            return fd

        self._fd = await _with_timeout(
            accept(), timeout, "waiting for the recipient's descriptor transport"
        )
        self._listener = None
        listener.close()

    async def connect_fd_transport(self, offer: dict[str, Any], timeout: float | None) -> None:
        address, token = offer.get("address"), offer.get("token")
        if not (isinstance(address, str) and address.startswith("@") and isinstance(token, str)):
            raise ProtocolError(f"malformed descriptor transport offer {offer!r}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                await self._loop.sock_connect(sock, "\0" + address[1:])
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ChannelClosedError(
                    f"cannot reach the originator's descriptor socket {address}: the originator "
                    "runs on another host (or network namespace); services move only between "
                    "processes on one host"
                ) from exc
            check_peer(peer_credentials(sock), role="originator", admission=self._admission)
            fd = _FdSocket(sock, self._loop)
            await fd.send(bytes.fromhex(token), ())
        except BaseException:
            sock.close()
            raise
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            self._fd.close()
        if self._listener is not None:
            self._listener.close()
        self._writer.close()


def parse_control(control: str) -> tuple[str, Any]:
    """``("unix", path)`` or ``("tcp", (host, port))`` from a CONTROL argument.

    Raises:
        ValueError: ``tcp:`` without a valid ``HOST:PORT``.
    """
    if not control.startswith("tcp:"):
        return ("unix", control)
    host, sep, port = control[4:].rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"a TCP control address reads tcp:HOST:PORT, not {control!r}")
    return ("tcp", (host.strip("[]") or "127.0.0.1", int(port)))
