"""The control channel as the migration logic sees it.

``originator.py`` and ``recipient.py`` are written against this interface and
never touch a socket: each runtime (asyncio, Twisted) provides an
implementation that moves frames and descriptors for its event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ._auth import PeerCredentials
from ._protocol import Message


class Channel(Protocol):
    """One side of a control connection."""

    @property
    def peer(self) -> PeerCredentials | None:
        """The peer's credentials, where the transport tells them."""
        ...

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send ``message``; ``fds`` (at most 253) ride on its first byte."""
        ...

    async def receive(self, timeout: float | None) -> Message:
        """The next message.

        Raises:
            ChannelClosedError: the peer closed the channel.
            MigrationTimeoutError: nothing came within ``timeout`` seconds.
            ProtocolError: the peer sent a malformed frame.
        """
        ...

    def take_fds(self, count: int) -> list[int]:
        """The next ``count`` descriptors received, in order.

        Raises:
            ProtocolError: fewer than ``count`` have arrived.
        """
        ...

    def close(self) -> None:
        """Close the channel and any descriptor received but not taken."""
        ...
