"""The Twisted runtime.

A Twisted application becomes migratable in a few lines::

    import takeover.twisted as takeover

    takeover.install_reactor()              # before anything imports the reactor
    from twisted.internet import reactor

    port = takeover.listen_tcp(8000, EchoFactory(), name="echo")
    done = takeover.serve_until_moved(port, control="/run/echo.sock")
    done.addBoth(lambda _: reactor.stop())  # every connection has moved away
    reactor.run()

and ``takeover take --runtime twisted /run/echo.sock`` moves the listening
port, every connection, their protocols and the factory to a new process.

**The reactor.** takeover's migration logic (``originator.serve_channel``,
``recipient.RecipientSession`` in ``takeover._core``) is sans-IO code written
against its ``Channel`` interface; its control channels and timeouts
are the asyncio runtime's. Twisted's ``asyncioreactor`` runs
the reactor on an asyncio event loop, so the very same channel code, already
covered by the fault matrix and the fuzzers, serves here unchanged: the
migration server and :func:`take` are coroutines on the reactor's loop,
handed to Twisted code as Deferreds (``Deferred.fromFuture``). The cost is
one line for the application: :func:`install_reactor` before the reactor is
imported. A second channel written on Deferreds would duplicate every
subtlety of framing, descriptor passing and TCP fd transports for no gain.

**The unpickling policy.** A Twisted graph names Twisted's classes (the
factory, ``LineReceiver``, telnet and insults protocols...). A recipient of
this runtime (:func:`take`, ``takeover take --runtime twisted``) allows the
modules in :data:`GRAPH_MODULES` besides the originator's script and
takeover's runtime modules: Twisted's protocol and factory classes, whose
objects are data and callbacks for the reactor to call. Modules whose
objects run code they are given (``twisted.conch.manhole``, whose
interpreter executes source, like takeover's demo shell) are not among
them: a recipient of a manhole takes it with ``--allow
twisted.conch.manhole``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .. import asyncio as aio
from .._core import runtimes
from .._core.auth import TLSConfig, load_secret
from .._core.errors import TakeoverError
from .._core.options import add_control_options, add_release_address_option, control_options
from .._core.registry import Service
from ._transport import (
    MigratablePort,
    MigratableTCPPort,
    MigratableTCPServer,
    MigratableUNIXPort,
    MigratableUNIXServer,
)

__all__ = [
    "GRAPH_MODULES",
    "MigratablePort",
    "MigratableTCPPort",
    "MigratableTCPServer",
    "MigratableUNIXPort",
    "MigratableUNIXServer",
    "TLSConfig",
    "add_control_options",
    "add_release_address_option",
    "control_options",
    "install_reactor",
    "listen_tcp",
    "listen_unix",
    "load_secret",
    "run",
    "serve_until_moved",
    "take",
]

T = TypeVar("T")

# Twisted modules whose classes a Twisted recipient rebuilds without --allow.
GRAPH_MODULES: tuple[str, ...] = (
    "twisted.internet.protocol",
    "twisted.internet.address",
    "twisted.protocols.basic",
    "twisted.conch.telnet",
    "twisted.conch.insults.insults",
    "twisted.conch.recvline",
    "twisted.cred.portal",
    "twisted.cred.checkers",
    "twisted.cred.credentials",
)

runtimes.register_runtime(graph_modules=("takeover.twisted._transport",))


def install_reactor() -> Any:
    """Install Twisted's asyncio reactor (once) and return it.

    Call it before anything imports ``twisted.internet.reactor``.

    Raises:
        TakeoverError: another reactor is already installed.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    installed = sys.modules.get("twisted.internet.reactor")
    if installed is None:
        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)  # type: ignore[no-untyped-call]
        from twisted.internet import reactor as installed
    if not isinstance(installed, AsyncioSelectorReactor):
        raise TakeoverError(
            f"takeover.twisted needs Twisted's asyncio reactor, but {type(installed).__name__} "
            "is installed: call takeover.twisted.install_reactor() before anything imports "
            "twisted.internet.reactor"
        )
    return installed


def _reactor(reactor: Any = None) -> Any:
    return reactor if reactor is not None else install_reactor()


def _loop(reactor: Any) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = reactor._asyncioEventloop
    return loop


def _deferred(coroutine: Coroutine[Any, Any, T], reactor: Any = None) -> Any:
    """Run ``coroutine`` on the reactor's asyncio loop; a Deferred of its result."""
    from twisted.internet.defer import Deferred

    loop = _loop(_reactor(reactor))
    return Deferred.fromFuture(asyncio.ensure_future(coroutine, loop=loop))


def listen_tcp(
    port: int,
    factory: Any,
    *,
    name: str,
    interface: str = "",
    backlog: int = 50,
    reactor: Any = None,
) -> MigratablePort:
    """``reactor.listenTCP`` as migratable service ``name``.

    The factory, and the protocols it builds, must pickle.
    """
    listening = MigratableTCPPort(port, factory, backlog, interface, _reactor(reactor))
    listening.startListening()
    return MigratablePort(listening, name)


def listen_unix(
    path: str,
    factory: Any,
    *,
    name: str,
    backlog: int = 50,
    mode: int = 0o666,
    reactor: Any = None,
) -> MigratablePort:
    """``reactor.listenUNIX`` (a stream socket at ``path``) as migratable service ``name``."""
    listening = MigratableUNIXPort(path, factory, backlog, mode, _reactor(reactor))
    listening.startListening()  # type: ignore[no-untyped-call]
    return MigratablePort(listening, name)


def serve_until_moved(*services: Service, control: str, reactor: Any = None, **options: Any) -> Any:
    """Publish ``services`` at ``control``; a Deferred that fires once all have moved.

    The migration server runs in the reactor (see the module's docstring);
    the other keyword arguments (``limits``, ``replace``, ``secret``,
    ``tls``, ``ready``, ``retire``, ``pid_file``) are those of
    :func:`takeover.asyncio.serve_until_moved`.
    """
    return _deferred(aio.serve_until_moved(*services, control=control, **options), reactor)


def take(
    control: str,
    services: Sequence[str] = (),
    *,
    allow: Sequence[str] = (),
    reactor: Any = None,
    **options: Any,
) -> Any:
    """Move services from the migration server at ``control`` into this reactor.

    A Deferred of one :class:`~takeover.Taken` per service. The other keyword
    arguments (``limits``, ``secret``, ``tls``, ``trust``) are those of
    :func:`takeover.asyncio.take`; :data:`GRAPH_MODULES` are allowed besides
    ``allow``.
    """
    reactor = _reactor(reactor)
    allowed = (*GRAPH_MODULES, *allow)
    return _deferred(
        aio.take(control, services, runtime=reactor, allow=allowed, **options), reactor
    )


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the reactor until ``coroutine`` (run on its loop) returns; return its result.

    What ``asyncio.run`` is to the asyncio runtime: ``takeover take --runtime
    twisted`` runs in it.
    """
    reactor = install_reactor()
    outcome: list[Any] = []

    def finish(result: Any) -> None:
        outcome.append(result)
        if reactor.running:
            reactor.stop()

    def begin() -> None:
        _deferred(coroutine, reactor).addBoth(finish)

    reactor.callWhenRunning(begin)
    reactor.run(installSignalHandlers=False)
    if not outcome:
        raise RuntimeError("the reactor stopped before the coroutine finished")
    result = outcome[0]
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    value: T = result
    return value
