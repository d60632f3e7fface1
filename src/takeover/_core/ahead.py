"""Sockets sent ahead of the graph, while the service still runs.

The dry run's pickle names every socket of a service's graph. A move sends
their descriptors to the recipient before the service is paused, so that the
recipient does outside the pause what costs per connection:

* it builds its socket objects (:func:`build_sockets`);
* it registers the stream sockets for reading with an epoll instance of its
  own (:class:`AheadPoller`). Registration is *passive*: nothing watches
  that instance until the service starts, so no byte is read before commit.
  The server that adopts the graph takes the instance as its poller;
* it builds their *twins* (:class:`Twins`): an object that stands for a
  socket and carries nothing else (an idle asyncio transport) is built on
  the recipient from its socket alone, by the runtime that registered that
  kind of twin (see ``runtimes``), and is not pickled at all. Both sides
  start the move's pickle memo with one entry per socket sent ahead, its
  twin or a stand-in, so the graph refers to each twin with a memo GET.

After quiescing, the graph refers to the sockets sent ahead by slot
(:class:`SocketsAhead` on the originator). Sockets closed since leave their
slot unused; sockets opened since travel after the graph.
"""

from __future__ import annotations

import itertools
import select
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from . import runtimes
from .errors import ProtocolError
from .fds import close_all
from .pickling import (
    GraphUnpickler,
    Source,
    _raw_type,
    socket_ahead_reduction,
    socket_kind,
)
from .policy import UnpicklePolicy


class SocketsAhead:
    """The sockets a move sends ahead of its graph (originator side).

    ``twins`` maps some of those sockets to the object that stands for each
    (an asyncio transport), and ``twin_kind`` names the kind of twin that
    the recipient builds from the socket alone. Then both picklers' memos
    start with one entry per socket sent ahead: its twin, or a stand-in
    nobody refers to. The service says after quiescing which twins now carry
    more than their socket (:meth:`unfit`): those become stand-ins, and the
    objects travel in full.
    """

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        twins: Mapping[socket.socket, Any] | None = None,
        twin_kind: str | None = None,
    ) -> None:
        self.sockets: list[socket.socket] = []
        self.reductions: dict[socket.socket, Any] = {}
        self.kinds: list[list[int]] = []
        self._twins = twins or {}
        self.twin_kind = twin_kind if self._twins and twin_kind else None
        # Pickle memo entries (id -> (index, object)), one per slot; None: no twins.
        self.memo: dict[int, tuple[int, Any]] | None = None
        self._slot_objects: list[Any] = []  # what memo entry N was made for
        if self.twin_kind is not None:
            self.memo = {}
        # Sockets made to fill the slot of a socket closed before it was sent.
        self._fillers: list[socket.socket] = []
        self.add(sockets)

    def add(self, sockets: Sequence[socket.socket]) -> None:
        """Give the next slots to ``sockets`` (those still open), in order.

        A move adds them a few thousand at a time, letting the service run
        in between: the work is per socket.
        """
        twins, memo, kinds, reductions = self._twins, self.memo, self.kinds, self.reductions
        slot = len(self.sockets)
        for sock in sockets:
            if sock.fileno() < 0 or sock in reductions:
                continue  # closed since, or already given a slot
            self.sockets.append(sock)
            reductions[sock] = socket_ahead_reduction(slot)
            flag = 0
            if memo is not None:
                twin = twins.get(sock)
                if twin is None:
                    twin = object()  # a stand-in, kept alive by its memo entry
                else:
                    flag = 1
                memo[id(twin)] = (slot, twin)
                self._slot_objects.append(twin)
            described = [*socket_kind(sock), flag]
            if kinds and kinds[-1][1:] == described:
                kinds[-1][0] += 1
            else:
                kinds.append([1, *described])
            slot += 1

    def unfit(self, objects: Sequence[Any]) -> None:
        """Twins in ``objects`` travel in full: their memo entries become stand-ins."""
        if self.memo is not None:
            for obj in objects:
                self._stand_in(obj)

    def _stand_in(self, obj: Any) -> None:
        """Put a stand-in in ``obj``'s memo entry, if it has one."""
        assert self.memo is not None
        entry = self.memo.pop(id(obj), None)
        if entry is not None:
            stand_in = object()  # kept alive by its memo entry
            self.memo[id(stand_in)] = (entry[0], stand_in)

    def batches(self, size: int) -> Iterator[tuple[list[int], list[list[int]]]]:
        """(descriptors, their kinds) in batches of at most ``size``.

        Each batch's descriptors are read when it is made, so that a move
        may let the service run between two batches: a socket closed by then
        (its number maybe another socket's since) is sent as a *filler*, a
        new unconnected socket of the same kind, whose slot the graph never
        uses (see :meth:`forget_closed`). Close the fillers with
        :meth:`close_fillers` once the batches are sent.
        """
        runs = [list(k) for k in self.kinds]
        sockets = self.sockets
        for start in range(0, len(sockets), size):
            batch = sockets[start : start + size]
            fds = [s.fileno() for s in batch]
            kinds: list[list[int]] = []
            need, position = len(batch), 0
            while need:
                take = min(need, runs[0][0])
                kinds.append([take, *runs[0][1:]])
                if -1 in fds[position : position + take]:
                    family, kind, proto = runs[0][1:4]
                    for index in range(position, position + take):
                        if fds[index] < 0:
                            filler = socket.socket(family, kind, proto)
                            self._fillers.append(filler)
                            fds[index] = filler.fileno()
                position += take
                runs[0][0] -= take
                need -= take
                if not runs[0][0]:
                    runs.pop(0)
            yield fds, kinds

    def close_fillers(self) -> None:
        """Close this side's copies of the fillers :meth:`batches` made."""
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()

    def forget_closed(self) -> None:
        """Drop the reductions (and twins) of sockets closed since they were sent.

        The twin of a closed connection then pickles in full if anything
        still refers to it, and fails as any closed socket does, rather than
        arrive as a transport nobody owns.
        """
        for slot, sock in enumerate(self.sockets):
            if sock.fileno() < 0:
                self.reductions.pop(sock, None)
                if self.memo is not None:
                    self._stand_in(self._slot_objects[slot])


def build_sockets(fds: Sequence[int], kinds: list[list[int]]) -> list[socket.socket]:
    """Socket objects for descriptors sent ahead, described by ``kinds``.

    ``kinds`` is ``[[count, family, type, proto, twin], ...]`` in descriptor
    order, as the conversation checked it (``protocol.check_kinds``). On
    error every descriptor is closed.
    """
    built: list[socket.socket] = []
    try:
        position = 0
        for count, family, kind, proto, _twin in kinds:
            for fd in fds[position : position + count]:
                built.append(socket.socket(family, kind, proto, fd))
            position += count
    except BaseException:
        for sock in built:
            sock.close()
        close_all(list(fds[len(built) :]))
        raise
    return built


class AheadPoller:
    """An epoll instance with the stream sockets sent ahead registered for reading.

    The server that adopts the graph may take it as its poller (:meth:`claim`):
    it keeps the registrations of its connections and removes the others.
    Closing an unclaimed instance drops every registration at once.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.registered: set[int] = set()
        self.claimed = False

    def add(self, sockets: Iterable[socket.socket]) -> None:
        register, registered = self.epoll.register, self.registered
        for sock in sockets:
            if _raw_type(sock) == socket.SOCK_STREAM:
                fd = sock.fileno()
                register(fd, select.EPOLLIN)
                registered.add(fd)

    def claim(self) -> AheadPoller | None:
        """Take the registrations, once (None if already taken): the claimer owns them."""
        if self.claimed:
            return None
        self.claimed = True
        return self

    def close(self) -> None:
        """Drop every registration, unless a server claimed the instance (it is its now)."""
        if not self.claimed:
            self.epoll.close()
            self.registered.clear()


_STAND_IN = object()  # the memo entry of a socket sent ahead that has no twin


class Twins:
    """The recipient's twins of the sockets sent ahead (see :class:`SocketsAhead`).

    Built batch by batch as the sockets arrive, while the service still runs
    in the originator, and memoized in that order by the unpickler that will
    load the graph: memo entry N is the twin of the socket in slot N (or a
    stand-in). The graph's server gives each twin its protocol; a twin it
    does not claim (a connection closed in the meantime, or one that
    travelled in full) leaves its socket to :meth:`close_leftovers`.
    """

    def __init__(self, kind: str, policy: UnpicklePolicy | None = None) -> None:
        builder = runtimes.twin_kind(kind)
        if builder is None:
            raise ProtocolError(
                f"unknown kind of twin {kind!r} for the sockets sent ahead (no runtime "
                "imported here builds it)"
            )
        self.kind = kind
        self.builder = builder
        self.objects: list[Any] = []
        self.unpickler = GraphUnpickler(Source(), (), policy)

    def add(self, sockets: Sequence[socket.socket], flags: Sequence[int]) -> None:
        """Build the twins of a batch of sockets (flag 1: it has one) and memoize them."""
        build = self.builder.build
        if all(flags):
            objects = build(sockets)
        else:
            built = iter(build(list(itertools.compress(sockets, flags))))
            objects = [next(built) if flag else _STAND_IN for flag in flags]
        self.objects.extend(objects)
        self.unpickler.seed(objects)

    def close_leftovers(self) -> None:
        """Close what arrived that neither the graph nor a claimed twin holds.

        Called once the service runs (a loop over every twin, so not inside
        the pause), or after it has been discarded.
        """
        ahead, claimed = self.unpickler.ahead, self.builder.claimed
        for slot, obj in enumerate(self.objects):
            if obj is not _STAND_IN and claimed(obj):
                ahead.pop(slot, None)
        self.unpickler.close_unused()
