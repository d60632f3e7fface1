"""The asyncio runtime.

An application becomes migratable in a few lines::

    import takeover.asyncio as takeover

    server = await takeover.start_server(EchoProtocol, "127.0.0.1", 8000, name="echo")
    async with takeover.MigrationServer("/run/echo.sock") as migration:
        migration.publish(server)
        await migration.wait_empty()        # returns once every service has moved

and ``takeover take /run/echo.sock`` (or :func:`take_and_serve` in another
program) moves the listener, every connection and the protocols' state to a
new process.

Frameworks built on coroutines (aiohttp, uvicorn, websockets, asyncio
streams) move their listening socket alone, with :func:`listen`: the
application started again takes it from its predecessor, which drains.

This package is the asyncio runtime of the sans-IO core (``takeover._core``):
its transport and server (``_transport``, ``_server``), its control channels
(``_channel``) and the migration server (``_migration``). On import it
registers with the core the modules whose classes travel in its graphs and
the twins it builds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._core import runtimes, tcprepair
from .._core.auth import Admission, TLSConfig, load_secret
from .._core.channel import Channel
from .._core.errors import (
    AuthenticationError,
    ChannelClosedError,
    MigrationTimeoutError,
    NoSuchServiceError,
    TakeoverError,
)
from .._core.logs import ensure_move_log
from .._core.options import add_control_options, add_release_address_option, control_options
from .._core.policy import UnpicklePolicy
from .._core.protocol import DEFAULT_IN_DOUBT_WAIT, Limits
from .._core.recipient import RecipientSession, Taken, select
from .._core.registry import Registry, Service
from .._core.retire import retire
from .._core.supervision import Supervisor
from ._channel import AsyncioChannel, StreamChannel, parse_control
from ._listen import Listener, listen
from ._listener import ListenerService
from ._migration import MigrationServer, check_publishable
from ._server import MigratableServer, ProtocolFactory, StreamsFactory
from ._transport import MigratableTransport, new_twins, start_tls, twin_claimed

__all__ = [
    "AsyncioChannel",
    "Listener",
    "ListenerService",
    "MigratableServer",
    "MigratableTransport",
    "MigrationServer",
    "StreamChannel",
    "Succession",
    "TLSConfig",
    "add_control_options",
    "add_release_address_option",
    "connect",
    "control_options",
    "hold",
    "listen",
    "load_secret",
    "retire",
    "serve_until_moved",
    "start_server",
    "start_tls",
    "start_unix_server",
    "take",
    "take_and_serve",
]

_retire = retire  # serve_until_moved's argument ``retire`` hides the function

runtimes.register_runtime(
    graph_modules=(
        "takeover.asyncio._transport",
        "takeover.asyncio._server",
        "takeover.asyncio._listener",
    ),
    twins=runtimes.TwinKind("asyncio", new_twins, twin_claimed),
)


async def start_server(
    protocol_factory: ProtocolFactory | Callable[..., Any],
    host: str | None,
    port: int,
    *,
    name: str,
    backlog: int = 1024,
    reuse_address: bool = True,
    drain: float | None = None,
    limit: int = 2**16,
) -> MigratableServer:
    """Listen on TCP ``host:port`` and serve it as migratable service ``name``.

    The counterpart of ``loop.create_server``: ``protocol_factory`` is called
    for each accepted connection and the result must pickle. Or, as with
    ``asyncio.start_server``, a ``client_connected_cb(reader, writer)``
    coroutine function (``limit``: the readers' buffer limit): its
    connections cannot move (a coroutine serves each), so a move takes the
    listener and the other connections, and these drain here.

    ``drain``: how long connections that cannot move may drain here when a
    recipient does not say (``takeover take --drain``); None refuses such a
    move, except for a ``client_connected_cb`` server (30 s).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    if reuse_address:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    factory: Any = protocol_factory
    if asyncio.iscoroutinefunction(protocol_factory):
        factory = StreamsFactory(protocol_factory, limit)
        drain = STREAMS_DRAIN if drain is None else drain
    server = _serve(sock, address, backlog, factory, name, loop)
    if drain is not None:
        server.takeover_drain_default = drain
    return server


STREAMS_DRAIN = 30.0
"""Seconds the connections of a ``client_connected_cb`` server drain by default."""


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


async def connect(
    control: str,
    *,
    limits: Limits = Limits(),
    secret: bytes | None = None,
    tls: TLSConfig | None = None,
    allow: Sequence[str] = (),
    trust: bool = False,
    admit_users: Iterable[int | str] = (),
    admit_groups: Iterable[int | str] = (),
    cross_host: bool = False,
    acquire_address: str | None = None,
    in_doubt_wait: float = DEFAULT_IN_DOUBT_WAIT,
) -> RecipientSession:
    """Open a control connection to the migration server at ``control``.

    Args:
        control: the originator's control socket path, or ``tcp:HOST:PORT``.
        limits: frame size, descriptor count and step timeout limits.
        secret: the shared secret, when the originator requires one (and
            then the originator must prove it knows it too).
        tls: certificates for TLS over TCP.
        allow: modules of the application (each with its submodules) whose
            classes and functions the graphs may name, beyond the
            originator's script and takeover (see ``takeover._core.policy``).
        trust: turn the unpickling policy off: the originator may run any
            code in this process.
        admit_users, admit_groups: originators running as another user
            that this side accepts (names or ids; see
            :class:`MigrationServer`); its own user and root always are.
        cross_host: the originator runs on another host: its services' TCP
            connections are rebuilt here by TCP_REPAIR (docs/crosshost.md).
        acquire_address: with ``cross_host``, the shell command that makes
            the service address this host's at the commit of each move
            (say ``ip addr add 10.0.0.100/24 dev eth0 && arping -U -c 1 -I
            eth0 10.0.0.100``); None: the address moves some other way.
        in_doubt_wait: with ``cross_host``, how long to ask what was decided if
            the channel fails after READY (docs/crosshost.md).

    Returns an opened :class:`~takeover.recipient.RecipientSession`.

    Raises:
        FileNotFoundError, ConnectionRefusedError: nothing serves ``control``.
        AuthenticationError: the originator runs as another user that is
            not admitted, or the secrets differ, or only one side has one.
        NotPermittedError: ``cross_host`` without CAP_NET_ADMIN.
        ValueError: a user or group name that this system does not know.
    """
    if cross_host:  # refused before anything is asked of the originator
        tcprepair.require_capability(nft=False)
    policy = UnpicklePolicy(tuple(allow), trust)  # a bad --allow fails before connecting
    admission = Admission.of(admit_users, admit_groups)
    channel = await _open_channel(control, limits, secret, tls, admission)
    session = RecipientSession(
        channel,
        limits=limits,
        secret=secret,
        policy=policy,
        admission=admission,
        cross_host=cross_host,
        acquire_address=acquire_address,
        in_doubt_wait=in_doubt_wait,
        reopen=_reopener(control, limits, secret, tls, admission) if cross_host else None,
    )
    try:
        await session.open()
    except ChannelClosedError as exc:
        session.abort()
        if channel.encrypted:
            # With TLS 1.3 the server checks our certificate after the
            # handshake has completed here: a refusal shows as a closed channel.
            raise AuthenticationError(
                f"the originator at {control} closed the TLS connection before answering: it "
                "probably refused this side's certificate (check --tls-cert against its CA)"
            ) from exc
        raise
    except BaseException:
        session.abort()
        raise
    return session


def _reopener(
    control: str, limits: Limits, secret: bytes | None, tls: TLSConfig | None, admission: Admission
) -> Callable[[float], Coroutine[Any, Any, Channel]]:
    """How a recipient in doubt reaches the originator again (``timeout`` s at most)."""

    async def reopen(timeout: float) -> Channel:
        try:
            return await asyncio.wait_for(
                _open_channel(control, limits, secret, tls, admission), timeout
            )
        except asyncio.TimeoutError:
            raise MigrationTimeoutError(f"{control} did not answer within {timeout:g} s") from None

    return reopen


async def _open_channel(
    control: str,
    limits: Limits,
    secret: bytes | None,
    tls: TLSConfig | None,
    admission: Admission,
) -> Channel:
    """The connected control channel to ``control`` (a socket path or TCP)."""
    kind, address = parse_control(control)
    if kind == "tcp":
        context = tls.context(server=False) if tls is not None else None
        if context is None and secret is None:
            raise AuthenticationError(
                f"a TCP control channel ({control}) needs a shared secret or TLS"
            )
        try:
            reader, writer = await asyncio.open_connection(*address, ssl=context)
        except ssl.SSLError as exc:
            raise AuthenticationError(
                f"TLS handshake with {control} failed: {exc.reason or exc}; check --tls-ca "
                "against the certificate the originator presents"
            ) from exc
        return StreamChannel(reader, writer, limits=limits, admission=admission)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return AsyncioChannel(sock, loop, limits=limits)


async def take(
    control: str,
    services: Sequence[str] = (),
    *,
    runtime: Any = None,
    limits: Limits = Limits(),
    secret: bytes | None = None,
    tls: TLSConfig | None = None,
    allow: Sequence[str] = (),
    trust: bool = False,
    admit_users: Iterable[int | str] = (),
    admit_groups: Iterable[int | str] = (),
    cross_host: bool = False,
    acquire_address: str | None = None,
    in_doubt_wait: float = DEFAULT_IN_DOUBT_WAIT,
) -> list[Taken]:
    """Move services from the migration server at ``control`` into this process.

    Args:
        control: the originator's control socket path, or ``tcp:HOST:PORT``.
        services: names to take; every published service when empty.
        runtime: what the services adopt (default: the running event loop).
        limits, secret, tls, allow, trust, admit_users, admit_groups,
            cross_host, acquire_address, in_doubt_wait: as for :func:`connect`.

    Returns:
        One :class:`~takeover.Taken` per service, each running in this
        process's event loop.

    Raises:
        TakeoverError: the first service that could not be taken; services
            taken before it keep running here.
    """
    runtime = runtime if runtime is not None else asyncio.get_running_loop()
    session = await connect(
        control,
        limits=limits,
        secret=secret,
        tls=tls,
        allow=allow,
        trust=trust,
        admit_users=admit_users,
        admit_groups=admit_groups,
        cross_host=cross_host,
        acquire_address=acquire_address,
        in_doubt_wait=in_doubt_wait,
    )
    try:
        names = select(await session.list(), services)
        return [await session.take(name, runtime) for name in names]
    finally:
        await session.close()


async def serve_until_moved(
    *services: Service,
    control: str,
    limits: Limits = Limits(),
    replace: bool = False,
    secret: bytes | None = None,
    tls: TLSConfig | None = None,
    ready: Callable[[MigrationServer], object] | None = None,
    retire: bool = True,
    pid_file: str | None = None,
    log_format: str | None = None,
    admit_users: Iterable[int | str] = (),
    admit_groups: Iterable[int | str] = (),
    release_address: str | None = None,
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
        secret, tls: what recipients must authenticate with (see
            :class:`MigrationServer`).
        ready: called once the control socket accepts recipients (to print
            a "ready" line, say).
        retire: once everything has moved, prepare this process to exit
            without taking CPU from its successor (:func:`takeover.retire`:
            the garbage collector's heap frozen, so the interpreter's
            teardown does not walk it, and the idle scheduling class).
            Pass False if the program goes on working after this returns.
        pid_file: keep this PID file naming the process that serves: this
            one once published, its successor once everything has moved
            (replaced atomically; the successor carries it on).
        log_format: "text" or "json": configure logging to stderr that way.
            By default logging is left as the application configured it;
            if it configured none, every move is logged to stderr in text.
        admit_users, admit_groups: other users and groups whose processes
            may take the services (see :class:`MigrationServer`).
        release_address: the shell command that gives up the service
            address at the commit of a move to another host (say ``ip addr
            del 10.0.0.100/24 dev eth0``; see docs/crosshost.md).

    Under a supervisor that set ``$NOTIFY_SOCKET`` (systemd's ``Type=notify``,
    or ``takeover run``), this process sends ``READY=1`` and a ``STATUS=``
    line once published, and, once everything has moved, ``MAINPID=`` its
    successor's pid, waiting until the supervisor has read it before
    returning (see ``takeover._core.supervision``).
    """
    ensure_move_log(log_format)
    supervisor = Supervisor(pid_file)
    async with MigrationServer(
        control,
        limits=limits,
        replace=replace,
        secret=secret,
        tls=tls,
        admit_users=admit_users,
        admit_groups=admit_groups,
        release_address=release_address,
    ) as migration:
        for service in services:
            migration.publish(service)
        migration.registry.supervision = supervisor.handed_on()
        supervisor.serving(*_counts(migration.registry))
        if ready is not None:
            ready(migration)
        await migration.wait_empty()
        supervisor.moved_away(migration.registry.successor_pid)
    drained = await _drained(services)
    if retire:
        _retire_after(drained)


@dataclass
class Succession:
    """What :func:`take_and_serve` did.

    Attributes:
        taken: the services that moved here, in the order they were taken.
        failed: each service that could not be taken, with the reason; it
            goes on in the originator.
        control: where this process published the services it took (None if
            it took none).
        moved_away: every service moved on to a successor (False: a signal
            stopped this process first, and it closed what it served).
    """

    taken: list[Taken] = field(default_factory=list)
    failed: list[tuple[str, TakeoverError]] = field(default_factory=list)
    control: str | None = None
    moved_away: bool = False


async def take_and_serve(
    control: str,
    services: Sequence[str] = (),
    *,
    runtime: Any = None,
    on_taken: Callable[[Taken], object] | None = None,
    on_failed: Callable[[str, TakeoverError], object] | None = None,
    on_serving: Callable[[MigrationServer], object] | None = None,
    pid_file: str | None = None,
    drain: float | None = None,
    **options: Any,
) -> Succession:
    """Take services from ``control``, publish them again, and serve them until they move on.

    What ``takeover take`` does: each service is taken in turn (one that
    fails stays with the originator, and the others are still taken); the
    services taken are published again, at ``control`` itself (renamed over
    it before the conversation ends) if they are all the originator had,
    else at a path of this process's own; then this process serves them
    until they have all moved on to a successor (then it retires, see
    :func:`takeover.retire`) or until SIGINT or SIGTERM (then it closes them).

    Args:
        control: the originator's control socket path, or ``tcp:HOST:PORT``.
        services: names to take; every published service when empty.
        runtime: what the services adopt (default: the running event loop;
            the Twisted runtime passes its reactor).
        on_taken: called with each service taken, as soon as it serves here.
        on_failed: called with the name and error of each service not taken.
        on_serving: called once the services are published again.
        drain: a partial move: what cannot move drains in the originator
            for up to this many seconds (see :meth:`RecipientSession.take`).
        pid_file: the PID file to keep (default: the originator's); see
            :func:`serve_until_moved`, whose notifications this sends too.
        options: those of :func:`connect`, and ``release_address``
            (:func:`serve_until_moved`); ``limits``, ``secret``, ``tls`` and the
            admissions apply to the server published here too.

    Raises:
        NoSuchServiceError: the originator publishes nothing, or not a
            service named in ``services``.
        TakeoverError: the conversation failed before any service moved.
    """
    runtime = runtime if runtime is not None else asyncio.get_running_loop()
    ensure_move_log()
    # Used twice (by connect() and by the server published here): no iterator.
    options.update({k: tuple(options[k]) for k in ("admit_users", "admit_groups") if k in options})
    release = options.pop("release_address", None)  # (for the server published here)
    session = await connect(control, **options)
    result = Succession()
    supervisor = Supervisor(pid_file)
    try:
        listed = await session.list()
        if pid_file is None and "pid_file" in session.supervision and not session.cross_host:
            supervisor = Supervisor(session.supervision["pid_file"])
        names = _to_take(control, listed, services)
        await _take_each(session, names, (runtime, drain), result, supervisor, on_taken, on_failed)
        if not result.taken:
            return result
        everything = {t.name for t in result.taken} == {str(s.get("name")) for s in listed}
        migration = _republish(control, everything, result.taken, options, release)
        migration.registry.supervision = supervisor.handed_on()
        if not migration.path.startswith("tcp:"):
            # Publish (rename over CONTROL) before BYE, so that the originator,
            # which removes CONTROL on leaving if it is still its own, sees ours.
            await migration.start()
    finally:
        await session.close()
    if migration.path.startswith("tcp:"):
        # The originator releases the port once the conversation is over.
        await migration.start()
    result.control = migration.path
    pause = max(t.pause_ms for t in result.taken)
    supervisor.serving(*_counts(migration.registry), pause_ms=pause)
    if on_serving is not None:
        on_serving(migration)
    result.moved_away = await hold(migration, supervisor)
    return result


async def _take_each(
    session: RecipientSession,
    names: Sequence[str],
    how: tuple[Any, float | None],
    result: Succession,
    supervisor: Supervisor,
    on_taken: Callable[[Taken], object] | None,
    on_failed: Callable[[str, TakeoverError], object] | None,
) -> None:
    """Take each of ``names`` in turn; one that fails stays with the originator."""
    for name in names:
        try:
            taken = await session.take(name, *how)
        except TakeoverError as exc:
            result.failed.append((name, exc))
            supervisor.failed(f"{name}: {exc}")
            if on_failed is not None:
                on_failed(name, exc)
            continue
        result.taken.append(taken)
        if on_taken is not None:
            on_taken(taken)


async def _drained(services: Sequence[Any]) -> bool:
    """Wait until the connections that partial moves left here have closed;
    whether there were any (then the move is long over: see :func:`_retire_after`)."""
    waited = False
    for service in services:
        if getattr(service, "draining", None):
            waited = True
        drained = getattr(service, "drained", None)
        if drained is not None:
            await drained()
    return waited


def _retire_after(drained: bool) -> None:
    """Retire; at idle priority only right after a move, when the successor
    may still be busy with it (after a drain, the exit must not wait for an
    idle CPU: supervisors expect the old process gone soon after its deadline)."""
    _retire(idle_priority=not drained)


def _counts(registry: Registry) -> tuple[int, int]:
    """How many services ``registry`` publishes, and how many connections they hold."""
    listed = registry.describe()
    return len(listed), sum(int(s.get("connections", 0) or 0) for s in listed)


def _to_take(control: str, listed: Sequence[dict[str, Any]], services: Sequence[str]) -> list[str]:
    """The names of the services to take, once sure they could be published again here.

    Raises:
        NoSuchServiceError: nothing is published, or not a service asked for.
        TakeoverError: this process could not publish them again
            (:func:`check_publishable`).
    """
    if not listed:
        raise NoSuchServiceError(f"the migration server at {control} publishes no services")
    names = select(listed, services)
    check_publishable(control, replace=set(names) == {str(s.get("name")) for s in listed})
    return names


def _republish(
    control: str,
    everything: bool,
    taken: Sequence[Taken],
    options: dict[str, Any],
    release_address: str | None = None,
) -> MigrationServer:
    """The migration server for the services taken (not started yet).

    At ``control`` itself if they are ``everything`` the originator had;
    otherwise at a path (or a port) of this process's own, since the
    originator still serves the rest at ``control``. From another host
    (``cross_host``): at the same port on every address of this host.
    """
    if options.get("cross_host"):
        port = control.rpartition(":")[2] if everything else "0"
        where = f"tcp:0.0.0.0:{port}"
    elif everything:
        where = control
    elif control.startswith("tcp:"):
        where = control.rpartition(":")[0] + ":0"
    else:
        where = f"{control}.{os.getpid()}"
    keys = ("limits", "secret", "tls", "admit_users", "admit_groups")
    security = {key: options[key] for key in keys if key in options}
    migration = MigrationServer(
        where, replace=everything, release_address=release_address, **security
    )
    for result in taken:
        migration.publish(result.service)
    return migration


async def hold(migration: MigrationServer, supervisor: Supervisor | None = None) -> bool:
    """Serve what ``migration`` publishes until it has all moved on (True) or
    SIGINT/SIGTERM (False); then close what is left, and retire if it moved
    (after telling ``supervisor`` who the successor is)."""
    loop = asyncio.get_running_loop()
    services = [migration.registry.get(name) for name in migration.registry.names()]
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    waiter = asyncio.ensure_future(migration.wait_empty())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    moved_away = waiter.done() and not waiter.cancelled()
    for future in (waiter, stopper):
        future.cancel()
    # Stop recipients first: a move in progress rolls back into this process,
    # and only then are the services closed here.
    await migration.aclose()
    for name in migration.registry.names():
        service: Any = migration.registry.withdraw(name)
        service.close_connections()
        service.close()
    # Let connection_lost callbacks run before the loop goes away.
    await asyncio.sleep(0)
    if moved_away and supervisor is not None:
        supervisor.moved_away(migration.registry.successor_pid)
    if moved_away:
        # The successor serves on this machine: leave without taking its CPU.
        _retire_after(await _drained(services))
    return moved_away
