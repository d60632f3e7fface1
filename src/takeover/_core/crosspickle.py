"""The graph of a move to another host (docs/crosshost.md): how its sockets
pickle and how they are rebuilt. Part of ``pickling`` (whose reconstructors
``_repaired_socket`` and ``_listening_socket`` stand for the two functions at
the end, resolved by the load in progress), kept apart for size.

No descriptor can travel to another host: a connection pickles as its
TCP_REPAIR checkpoint, a listener as what binds it again.
"""

from __future__ import annotations

import io
import socket
from typing import TYPE_CHECKING, Any, Callable

from .errors import MigrationRefusedError, ProtocolError, SerializationError
from .pickling import Dumped, GraphPickler, _dump, _listening_socket, _repaired_socket
from .tcprepair import cross_host_refusal, is_listening, listen_again, listener_options, prepare

if TYPE_CHECKING:
    from .pickling import GraphUnpickler


class CrossHostPickler(GraphPickler):
    """The graph of a move to another host, where no descriptor can travel.

    A connected TCP socket pickles as its TCP_REPAIR state
    (``_repaired_socket(state)``, made by ``checkpoint``, which freezes the
    connection first if it was not yet); a listening one as what binds it
    again (``_listening_socket(family, address, backlog, options)``). Any
    other socket (AF_UNIX, UDP) is refused, naming it; TLS still is.
    """

    def __init__(
        self,
        file: io.BytesIO,
        protocol: int,
        checkpoint: Callable[[socket.socket], dict[str, Any]],
    ) -> None:
        super().__init__(file, protocol)
        self.checkpoint = checkpoint
        table = dict(self.dispatch_table)
        table[socket.socket] = self._reduce_for_host
        self.dispatch_table = table

    def _reduce_for_host(self, sock: socket.socket) -> Any:
        if sock.fileno() < 0:
            raise SerializationError(f"cannot migrate closed socket {sock!r}")
        refusal = cross_host_refusal(sock)
        if refusal is not None:
            raise SerializationError(refusal)
        if is_listening(sock):
            backlog, options = listener_options(sock)
            address = list(sock.getsockname())
            return (_listening_socket, (int(sock.family), address, backlog, options))
        self.sockets.append(sock)
        return (_repaired_socket, (self.checkpoint(sock),))


def dumps_cross_host(
    graph: Any, protocol: int, checkpoint: Callable[[socket.socket], dict[str, Any]]
) -> Dumped:
    """Pickle ``graph`` for another host (see :class:`CrossHostPickler`):
    ``Dumped.sockets`` lists the connections, in the order they were checkpointed.

    Raises:
        SerializationError: something in the graph cannot be pickled, or a
            socket cannot move to another host (the message names it).
        RepairError: a connection could not be frozen or checkpointed.
    """
    buffer = io.BytesIO()
    return _dump(CrossHostPickler(buffer, protocol, checkpoint), buffer, graph)


def repaired_socket(unpickler: GraphUnpickler, state: Any) -> socket.socket:
    """A connection rebuilt in repair mode from its TCP_REPAIR state, bound to the
    service address before it is this host's. It sends nothing until the
    recipient starts it. Only in a load of a move across hosts."""
    repaired = unpickler.repaired
    if repaired is None:
        raise ProtocolError(
            "the graph carries a connection moved across hosts, but this is not a move across hosts"
        )
    if type(state) is not dict:
        raise ProtocolError(f"malformed TCP repair state {type(state).__name__}")
    try:
        sock = prepare(state, freebind=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed TCP repair state: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise MigrationRefusedError(
            f"cannot rebuild the connection from {state.get('peer')!r} here: {exc}"
        ) from exc
    unpickler.rebuilt.append(sock)
    sock.setblocking(False)
    repaired.append((sock, state))
    return sock


def listening_socket(
    unpickler: GraphUnpickler, family: Any, address: Any, backlog: Any, options: Any
) -> socket.socket:
    """A listener bound again here with IP_FREEBIND (the service address is not
    this host's yet), listening. Only in a load of a move across hosts."""
    if unpickler.repaired is None:
        raise ProtocolError(
            "the graph carries a listener moved across hosts, but this is not a move across hosts"
        )
    if (
        family not in (socket.AF_INET, socket.AF_INET6)
        or type(address) is not list
        or type(backlog) is not int
        or type(options) is not dict
    ):
        raise ProtocolError(f"malformed listener {family!r} {address!r} {backlog!r}")
    try:
        sock = listen_again(family, address, backlog, options)
    except OSError as exc:
        raise MigrationRefusedError(f"cannot listen on {address!r} here: {exc}") from exc
    unpickler.rebuilt.append(sock)
    return sock
