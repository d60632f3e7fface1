"""Published services and their states.

A service is AVAILABLE while its process serves it, IN_TRANSIT from the moment
a recipient asks for it until the move commits (the service is then forgotten)
or rolls back (AVAILABLE again). Only one recipient can hold a service in
transit; a second one is told it is busy.

The registry knows nothing of event loops: a runtime's service object
implements :class:`Service` and the registry only calls it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import NoSuchServiceError, ServiceBusyError

if TYPE_CHECKING:
    from .ahead import AheadPoller


@runtime_checkable
class Service(Protocol):
    """What a runtime implements for a migratable service.

    Originator side, in order: ``quiesce`` (stop every read, write, accept and
    callback, so the graph can be pickled consistently), then ``resume``
    (rollback: undo ``quiesce``) or ``release`` (commit: drop this process's
    copy of every descriptor without shutting anything down).

    Recipient side: ``adopt`` (attach to this process's event loop without
    starting any I/O), then ``start`` (after commit) or ``discard`` (the move
    failed before commit: close the descriptors without shutting them down).
    ``adopt`` is given the :class:`~takeover._core.ahead.AheadPoller` where
    the sockets sent ahead are registered (None if there were none): a server
    may claim it as its own poller.

    Optional, for objects that can travel as *twins* (built on the recipient
    from their socket, see ``ahead.SocketsAhead``): ``takeover_twin_kind``
    (the name of a kind of twin a runtime registered, see ``runtimes``),
    ``takeover_twins()`` (socket -> object, asked before quiescing) and
    ``takeover_unfit()`` (those that now carry more than their socket, asked
    after quiescing).

    Optional, originator side: ``takeover_parts()``, objects of the graph
    (its connections) that the dry run may pickle a slice at a time while the
    service runs, rather than the whole graph in one go (see
    ``graphpath.SpreadCheck``); asked again at the end of the dry run, for
    those still part of it.

    Optional, originator side: ``takeover_seal(late_call)``, called once the
    service's graph is pickled. From then on, until ``resume`` or
    ``release`` (which lift the seal), a call from outside the service that
    would change one of its connections (a write, a close...) must first ask
    ``late_call(description)``: True, the call goes ahead (the move has been
    rolled back, and the call takes effect when the service resumes); False,
    the recipient owns the connection, and the call must fail as on a lost
    connection (``write`` raises :class:`~takeover.ConnectionMovedError`).
    Without it such a call would change what was already pickled, and be
    lost.
    """

    service_name: str

    def describe(self) -> dict[str, Any]: ...
    def quiesce(self) -> None: ...
    def resume(self) -> None: ...
    def release(self) -> None: ...
    def adopt(self, runtime: Any, ahead: AheadPoller | None) -> None: ...
    def start(self) -> None: ...
    def discard(self) -> None: ...


class Outcomes:
    """What this originator decided for its moves across hosts, by move id,
    for a recipient that lost the channel before COMMIT reached it and asks
    (``crossmove.answer_outcome``). The last :attr:`KEEP` are kept."""

    PENDING = "pending"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    KEEP = 256

    def __init__(self) -> None:
        self._decided: dict[str, str] = {}
        self._told: set[str] = set()

    def record(self, move: str, outcome: str) -> None:
        """``move`` is now ``outcome`` (PENDING from GRAPH to the decision)."""
        self._decided.pop(move, None)
        self._decided[move] = outcome
        while len(self._decided) > self.KEEP:
            oldest = next(iter(self._decided))
            del self._decided[oldest]
            self._told.discard(oldest)

    def get(self, move: str) -> str | None:
        return self._decided.get(move)

    def tell(self, move: str) -> None:
        """The recipient has been told the move committed."""
        self._told.add(move)

    def told(self, move: str) -> bool:
        return move in self._told


class ServiceState(enum.Enum):
    AVAILABLE = "available"
    IN_TRANSIT = "in-transit"


class Registry:
    """The services a process publishes for migration, by name."""

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}
        self._states: dict[str, ServiceState] = {}
        self._on_empty: list[Callable[[], None]] = []
        # The pid of the process that took the last service that moved away.
        self.successor_pid: int | None = None
        # What a recipient is told to carry on (``pid_file``), see supervision.py.
        self.supervision: dict[str, str] = {}
        # The command that gives up the service address at the commit of a move
        # to another host (see crossmove.py); None: moved some other way.
        self.release_address: str | None = None
        # What its moves across hosts came to, for a recipient in doubt.
        self.outcomes = Outcomes()

    def publish(self, service: Service) -> None:
        """Make ``service`` available under its ``service_name``.

        Raises:
            ValueError: a service of that name is already published.
        """
        name = service.service_name
        if name in self._services:
            raise ValueError(f"a service named {name!r} is already published")
        self._services[name] = service
        self._states[name] = ServiceState.AVAILABLE

    def withdraw(self, name: str) -> Service:
        """Forget a service (it moved away or its owner closed it)."""
        service = self.get(name)
        del self._services[name]
        del self._states[name]
        if not self._services:
            callbacks, self._on_empty = self._on_empty, []
            for callback in callbacks:
                callback()
        return service

    def __contains__(self, name: object) -> bool:
        return name in self._services

    def __len__(self) -> int:
        return len(self._services)

    def names(self) -> list[str]:
        return list(self._services)

    def get(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            known = ", ".join(sorted(self._services)) or "none"
            raise NoSuchServiceError(
                f"no service named {name!r} here (published: {known})"
            ) from None

    def state(self, name: str) -> ServiceState:
        self.get(name)
        return self._states[name]

    def describe(self) -> list[dict[str, Any]]:
        """What LIST answers: name, state and the service's own metadata."""
        return [
            {**service.describe(), "name": name, "state": self._states[name].value}
            for name, service in self._services.items()
        ]

    def begin_transit(self, name: str) -> Service:
        """Mark ``name`` IN_TRANSIT and return it.

        Raises:
            NoSuchServiceError: nothing of that name is published.
            ServiceBusyError: it is already in transit to another recipient.
        """
        service = self.get(name)
        if self._states[name] is ServiceState.IN_TRANSIT:
            raise ServiceBusyError(
                f"service {name!r} is busy: it is already moving to another recipient; "
                "try again when that move has finished"
            )
        self._states[name] = ServiceState.IN_TRANSIT
        return service

    def end_transit(self, name: str) -> None:
        """Rollback: ``name`` is AVAILABLE again."""
        self.get(name)
        self._states[name] = ServiceState.AVAILABLE

    def when_empty(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the last service has been withdrawn."""
        if not self._services:
            callback()
        else:
            self._on_empty.append(callback)
