"""The control channel as the migration logic sees it.

``originator.py`` and ``recipient.py`` are written against this interface and
never touch a socket: each runtime (asyncio, Twisted) provides an
implementation that moves frames and descriptors for its event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .auth import PeerCredentials
from .protocol import Message

T = TypeVar("T")


class Channel(Protocol):
    """One side of a control connection.

    ``local`` channels are AF_UNIX: the peer's credentials are known and
    descriptors ride on the channel itself. Other channels (TCP) have no
    credentials and carry descriptors over a separate AF_UNIX socket, the
    *fd transport*, which only a process on the same host can reach.
    """

    local: bool
    encrypted: bool

    @property
    def peer(self) -> PeerCredentials | None:
        """The peer's credentials, where the transport tells them."""
        ...

    def limit_frames(self, size: int) -> None:
        """Accept frames of up to ``size`` bytes from now on.

        Channels start with a small limit for the handshake; each side
        raises it to its configured limit once the peer is authenticated.
        """
        ...

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send ``message``; ``fds`` (at most 253) travel with it."""
        ...

    async def pass_turn(self) -> None:
        """Let the event loop run what is ready (the service's connections)
        before going on: a move's long steps before the pause are cut in
        slices, so that clients do not wait for the whole of them."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, the event loop running meanwhile (whether or not
        the channel is still open: its runtime's clock)."""
        ...

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker thread, the event loop running meanwhile
        (a blocking step, such as a shell hook, that must not hold the loop)."""
        ...

    async def receive(self, timeout: float | None) -> Message:
        """The next message.

        Raises:
            ChannelClosedError: the peer closed the channel.
            MigrationTimeoutError: nothing came within ``timeout`` seconds.
            ProtocolError: the peer sent a malformed frame.
        """
        ...

    async def take_fds(self, count: int, timeout: float | None) -> list[int]:
        """The next ``count`` descriptors received, in order.

        Raises:
            ProtocolError: fewer than ``count`` have arrived (local channel).
            MigrationTimeoutError: they did not arrive in time (fd transport).
        """
        ...

    async def offer_fd_transport(self) -> dict[str, Any]:
        """Originator, non-local channel: listen for the recipient's fd
        transport; return where and with which token to connect."""
        ...

    async def accept_fd_transport(self, timeout: float | None) -> None:
        """Originator: wait until the fd transport is connected (no-op if
        local or already connected)."""
        ...

    async def connect_fd_transport(self, offer: dict[str, Any], timeout: float | None) -> None:
        """Recipient: connect to the originator's fd transport.

        Raises:
            ChannelClosedError: it can't be reached: the originator is on
                another host.
        """
        ...

    def close(self) -> None:
        """Close the channel and any descriptor received but not taken."""
        ...
