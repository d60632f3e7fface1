"""The recipient's half of a migration: ask for services and adopt them.

For each service: TAKE, receive the graph and its descriptors, rebuild the
graph, adopt it into this process's runtime *without starting any I/O*, then
commit: record COMMITTED in the move's arbiter (``arbiter.py``), start, and
say COMMITTED. If anything fails before that, or the
originator recorded ROLLED_BACK first (it gave up waiting), the adopted copy
is discarded (descriptors closed, nothing shut down) and the originator,
which still holds its own copy, resumes.

The runtime supplies the channel and the object passed to ``adopt``; this
module never touches a socket.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import faults, heap, protocol
from .ahead import AheadPoller, Twins, build_sockets
from .arbiter import COMMITTED, Arbiter
from .auth import AUTH_SCHEME, Admission, check_nonce, check_peer, check_proof, new_nonce, proof
from .channel import Channel
from .errors import (
    AuthenticationError,
    ChannelClosedError,
    MigrationRefusedError,
    NoSuchServiceError,
    ProtocolError,
    RolledBackError,
    TakeoverError,
    error_from_code,
)
from .fds import close_all
from .logs import MOVES, move_event
from .pickling import gc_paused, loads
from .policy import TRUST_WARNING, UnpicklePolicy
from .protocol import DEFAULT_IN_DOUBT_WAIT, Conversation, Kind, Limits, Message, Role
from .registry import Service
from .script import preload_main

log = logging.getLogger("takeover.recipient")


@dataclass
class Taken:
    """One service that moved to this process.

    Attributes:
        name: the service's name.
        service: the adopted, running service object.
        connections: established connections that moved with it.
        pause_ms: how long the service was paused, from the originator's
            quiesce to this side's start (both read the same monotonic clock
            on one host).
        graph_bytes: size of the pickled graph.
        fds: descriptors that moved.
        draining: connections that could not move and drain in the
            originator (a partial move, ``drain=``); 0 otherwise.
        drain_seconds: how long they may drain there.
    """

    name: str
    service: Service
    connections: int
    pause_ms: float
    graph_bytes: int
    fds: int
    draining: int = 0
    drain_seconds: float | None = None

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "service": self.name,
            "connections": self.connections,
            "pause_ms": round(self.pause_ms, 3),
            "graph_bytes": self.graph_bytes,
            "fds": self.fds,
        }
        if self.draining:
            summary["draining"] = self.draining
            summary["drain_seconds"] = self.drain_seconds
        return summary


@dataclass
class CheckResult:
    """What a dry run of one service found (``RecipientSession.check``).

    Attributes:
        name: the service's name.
        ok: its graph pickles: it can move now.
        path: where the object that does not pickle sits in the graph, e.g.
            ``echo.connections[3].protocol.on_done`` (None when ``ok``).
        error: why that object cannot be pickled (None when ``ok``).
    """

    name: str
    ok: bool
    path: str | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"service": self.name, "ok": self.ok, "path": self.path, "error": self.error}


@dataclass
class _Arrival:
    """What one move has brought here so far.

    Attributes:
        arbiter: the move's commit arbiter (the first descriptor of a move).
        ahead: the sockets sent ahead of the graph, built.
        poller: where those sockets are registered for reading (passively).
        twins: their twins, if the originator sent some.
        meta: the GRAPH frame's body; ``blob`` its pickle.
        fds: descriptors sent after the graph, not yet owned by a socket.
    """

    arbiter: Arbiter | None = None
    ahead: list[socket.socket] = field(default_factory=list)
    poller: AheadPoller | None = None
    twins: Twins | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""
    fds: list[int] = field(default_factory=list)

    def add_ahead(
        self,
        sockets: list[socket.socket],
        kinds: list[list[int]],
        twin_kind: str | None,
        policy: UnpicklePolicy,
    ) -> None:
        """A batch sent ahead: register its stream sockets, build its twins."""
        self.ahead.extend(sockets)
        if self.poller is None:
            self.poller = AheadPoller()
        self.poller.add(sockets)
        if twin_kind is not None:
            if self.twins is None:
                self.twins = Twins(twin_kind, policy)
            self.twins.add(sockets, [k[4] for k in kinds for _ in range(k[0])])

    def close(self) -> None:
        """Close everything that arrived (the move ended before the graph was rebuilt)."""
        close_all(self.fds)
        self.fds = []
        for sock in self.ahead:
            sock.close()
        self.finish()

    def finish(self) -> None:
        """Close what no server took: the poller if unclaimed, the arbiter, twins' leftovers."""
        if self.poller is not None:
            self.poller.close()  # a no-op if a server claimed it
        if self.arbiter is not None:
            self.arbiter.close()
        if self.twins is not None:
            self.twins.close_leftovers()


class RecipientSession:
    """A recipient's conversation with one originator.

    Use :meth:`open` first, then :meth:`list` and :meth:`take` as needed, and
    :meth:`close` at the end.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        limits: Limits = Limits(),
        secret: bytes | None = None,
        policy: UnpicklePolicy | None = None,
        admission: Admission = Admission(),
        cross_host: bool = False,
        acquire_address: str | None = None,
        in_doubt_wait: float = DEFAULT_IN_DOUBT_WAIT,
        reopen: Callable[[float], Awaitable[Channel]] | None = None,
    ) -> None:
        self.channel = channel
        # Moves to this host from another (TCP_REPAIR; see crossmove.py), and the
        # command that makes the service address this host's at their commit.
        self.cross_host = cross_host
        self.acquire_address = acquire_address
        # A move across hosts in doubt (the channel failed after READY): how to
        # reach the originator again to ask what it decided, and for how long.
        self.reopen = reopen
        self.in_doubt_wait = in_doubt_wait
        # Originators of other users this side accepts (root and its own user always).
        self.admission = admission
        self.limits = limits
        self.secret = secret
        # Which globals an originator's graph may name (see _policy).
        self.policy = policy if policy is not None else UnpicklePolicy()
        if self.policy.trust:
            log.warning("%s", TRUST_WARNING)
        self.policy.prepare()
        self._fd_transport: dict[str, Any] | None = None
        self._main: str | None = None
        # What the originator asks its successor to carry on (its PID file).
        self.supervision: dict[str, str] = {}
        self.conversation = Conversation(Role.RECIPIENT, limits)
        self.originator: dict[str, Any] = {}
        self.pickle_protocol = pickle.HIGHEST_PROTOCOL

    async def _send(self, message: Message) -> None:
        self.conversation.send(message)
        await self.channel.send(message)

    async def _receive(self, timeout: float | None) -> Message:
        message = await self.channel.receive(timeout)
        self.conversation.receive(message)
        if message.kind is Kind.ERROR:
            raise error_from_code(
                str(message.body.get("code", "error")),
                str(message.body.get("message", "the originator reported an error")),
            )
        if message.kind is Kind.BYE:
            raise ChannelClosedError("the originator ended the conversation")
        return message

    async def open(self) -> dict[str, Any]:
        """Authenticate the originator and exchange HELLOs; return its HELLO.

        Raises:
            AuthenticationError: the originator runs as another user that
                this side does not admit, fails the shared-secret challenge,
                or does not authenticate while this side has a secret (or
                the reverse).
        """
        if self.channel.local:
            check_peer(self.channel.peer, role="originator", admission=self.admission)
        elif self.secret is None and not self.channel.encrypted:
            raise AuthenticationError(
                "a control channel over TCP needs a shared secret (--secret-file) or TLS"
            )
        faults.checkpoint("recipient.connected")
        nonce = new_nonce()
        extra: dict[str, Any] = {"nonce": nonce}
        if self.secret is not None:
            extra["auth"] = AUTH_SCHEME
        if self.cross_host:
            extra["cross_host"] = True  # no descriptor transport: it cannot be reached
        try:
            await self._send(
                protocol.hello(
                    Role.RECIPIENT,
                    pid=os.getpid(),
                    pickle_protocol=pickle.HIGHEST_PROTOCOL,
                    python=sys.version,
                    implementation=sys.implementation.name,
                    **extra,
                )
            )
        except ChannelClosedError:
            # An originator that refuses us (credentials) sends ERROR and closes
            # at once, maybe before our HELLO arrives: its ERROR is then waiting
            # to be read, and says why far better than the broken pipe does.
            await self._receive(self.limits.step_timeout)
            raise
        message = await self._receive(self.limits.step_timeout)
        self.originator = protocol.check_hello(message, Role.ORIGINATOR)
        self.pickle_protocol = min(pickle.HIGHEST_PROTOCOL, self.originator["pickle_protocol"])
        if self.secret is not None:
            if self.originator.get("auth") != AUTH_SCHEME:
                raise AuthenticationError(
                    "the originator does not authenticate with a shared secret, but this side "
                    "was given one: refusing to trust it (give both sides the same --secret-file)"
                )
            their_nonce = check_nonce(self.originator.get("nonce"), "originator")
            check_proof(self.secret, "originator", their_nonce, nonce, self.originator.get("proof"))
            await self._send(
                Message(Kind.AUTH, {"proof": proof(self.secret, "recipient", nonce, their_nonce)})
            )
            authed = await self._receive(self.limits.step_timeout)
            self.originator["fd_transport"] = authed.body.get("fd_transport")
        elif self.originator.get("auth"):
            raise AuthenticationError(
                "the originator requires a shared secret: pass the same --secret-file"
            )
        self.channel.limit_frames(self.limits.max_frame_size)
        transport = self.originator.get("fd_transport")
        self._fd_transport = transport if isinstance(transport, dict) else None
        faults.checkpoint("recipient.authenticated")
        return self.originator

    async def list(self) -> list[dict[str, Any]]:
        """The originator's services: name, state, kind, connections..."""
        await self._send(Message(Kind.LIST))
        reply = await self._receive(self.limits.step_timeout)
        services = reply.body.get("services")
        if not isinstance(services, list):
            raise ProtocolError("SERVICES frame lists no services")
        main = reply.body.get("main")
        self._main = main if isinstance(main, str) else None
        supervision = reply.body.get("supervision")
        if isinstance(supervision, dict):
            self.supervision = {
                key: value
                for key, value in supervision.items()
                if key == "pid_file" and isinstance(value, str) and os.path.isabs(value)
            }
        faults.checkpoint("recipient.listed")
        return services

    async def take(self, name: str, runtime: Any, drain: float | None = None) -> Taken:
        """Move service ``name`` into this process and start it.

        Args:
            name: the service to take.
            runtime: what the service's ``adopt`` needs (the asyncio loop,
                the Twisted reactor).
            drain: a partial move: connections that cannot move (a coroutine
                serves them, TLS, an unpicklable protocol) stay in the
                originator, which serves them for up to ``drain`` seconds;
                the listener and the others move. None: all or nothing
                (unless the service has a default).

        Raises:
            NoSuchServiceError, ServiceBusyError: the originator said so.
            MigrationRefusedError: the graph could not be rebuilt or adopted
                here; the originator has been told and resumes the service.
            ChannelClosedError: the originator went away before this side held
                the graph and every descriptor; the service was not started
                here.
            RolledBackError: the originator rolled back before this side
                could commit: it gave up waiting (its step timeout), or code
                outside the service changed one of its connections after the
                graph was pickled. The message says which.
        """
        origin = self.originator.get("pid")
        try:
            taken = await self._take(name, runtime, drain)
        except TakeoverError as exc:
            facts = move_event("not-taken", name, peer_pid=origin, reason=str(exc))
            MOVES.warning(
                "could not take %r from pid %s: %s", name, origin, exc, extra={"move": facts}
            )
            raise
        # The move's temporaries are freed now (_take has returned): hand back the heap they held.
        heap.give_back(taken.fds)
        summary = {key: value for key, value in taken.summary().items() if key != "service"}
        facts = move_event("took", name, peer_pid=origin, **summary)
        MOVES.info(
            "took %r from pid %s: %d connections, paused %.2f ms, %d fds",
            name,
            origin,
            taken.connections,
            taken.pause_ms,
            taken.fds,
            extra={"move": facts},
        )
        return taken

    async def _take(self, name: str, runtime: Any, drain: float | None) -> Taken:
        if self.cross_host:
            from .crossmove import take_across_hosts

            return await take_across_hosts(self, name, runtime, drain)
        if self._fd_transport is not None:
            # Over TCP: connect the local descriptor socket first (same host only).
            await self.channel.connect_fd_transport(self._fd_transport, self.limits.step_timeout)
            self._fd_transport = None
        if self._main is not None:
            # Load the originator's script now rather than inside the pause.
            preload_main(self._main, self.policy)
        # The originator refuses a graph bigger than that before it pauses anything.
        body: dict[str, Any] = {"service": name, "max_graph": self.limits.max_frame_size}
        if drain is not None:
            body["drain"] = drain
        await self._send(Message(Kind.TAKE, body))
        faults.checkpoint("recipient.take-sent")
        arrival = _Arrival()
        try:
            await self._receive_ahead(arrival)
            faults.checkpoint("recipient.ahead-received")
            await self._send(
                Message(Kind.AHEAD_READY, {"service": name, "count": len(arrival.ahead)})
            )
            faults.checkpoint("recipient.ahead-ready-sent")
            await self._receive_graph(arrival)
        except BaseException:
            arrival.close()
            raise
        try:
            # No cyclic collection until the service has started (see gc_paused).
            with gc_paused():
                service = await self._adopt(name, runtime, arrival)
                taken = await self._commit(name, service, arrival)
                # A turn of the loop for what waited during the pause (its
                # clients), before this side's bookkeeping and the collection
                # owed since the graph arrived.
                await self.channel.pass_turn()
            return taken
        finally:
            # After start (or discard): what nothing took is closed.
            arrival.finish()

    async def _receive_ahead(self, arrival: _Arrival) -> None:
        """Before the graph, while the service still runs over there: the
        arbiter, which says how many sockets follow it, then those sockets.

        Each batch is built, its connections registered for reading
        (passively) and their twins built as it arrives, so that nothing of
        it is left to do inside the pause. The conversation checks the
        counts, the kinds and the twins.
        """
        timeout = self.limits.step_timeout
        move = self.conversation.move
        assert move is not None  # TAKE was sent
        while not move.ahead_complete:
            body = (await self._receive(timeout)).body
            batch = await self.channel.take_fds(body["count"], timeout)
            if arrival.arbiter is None:
                arrival.arbiter = Arbiter.adopt(batch[0])
                continue
            sockets = build_sockets(batch, body["kinds"])
            arrival.add_ahead(sockets, body["kinds"], body.get("twins"), self.policy)

    async def _receive_graph(self, arrival: _Arrival) -> None:
        """The graph, then the descriptors of sockets opened since the dry run."""
        timeout = self.limits.step_timeout
        graph = await self._receive(timeout)
        faults.checkpoint("recipient.graph-received")
        arrival.meta, arrival.blob = graph.body, graph.blob
        while self.conversation.fds_expected:
            count = (await self._receive(timeout)).body["count"]
            arrival.fds.extend(await self.channel.take_fds(count, timeout))
        faults.checkpoint("recipient.fds-received")

    async def _adopt(self, name: str, runtime: Any, arrival: _Arrival) -> Service:
        """Rebuild the graph and adopt it, with no I/O; if that fails, say REFUSED."""
        service: Service | None = None
        # From here the load owns the descriptors: it closes them if it fails.
        fds, arrival.fds = arrival.fds, []
        try:
            main = arrival.meta.get("main")
            twins = arrival.twins
            graph = loads(
                arrival.blob,
                fds,
                main=main if isinstance(main, str) else None,
                policy=self.policy,
                ahead=arrival.ahead,
                unpickler=twins.unpickler if twins is not None else None,
            )
            if not isinstance(graph, Service):
                raise MigrationRefusedError(
                    f"the graph of {name!r} is a {type(graph).__qualname__}, not a takeover service"
                )
            service = graph
            service.adopt(runtime, arrival.poller)
        except TakeoverError as exc:
            if service is not None:
                service.discard()
            # Info, not warning: the caller gets the reason in the exception
            # (and `takeover take` prints it as its one error line).
            log.info("refusing %r: %s", name, exc)
            await self._send(Message(Kind.REFUSED, {"service": name, "reason": str(exc)}))
            raise MigrationRefusedError(f"cannot take {name!r}: {exc}") from exc
        except BaseException:
            if service is not None:
                service.discard()
            raise
        faults.checkpoint("recipient.adopted")
        return service

    async def _commit(self, name: str, service: Service, arrival: _Arrival) -> Taken:
        """Record COMMITTED in the arbiter, start the service, say COMMITTED."""
        assert arrival.arbiter is not None  # the first descriptor of every move
        # The commit point. The originator has quiesced the service and sent
        # everything; unless it has given up first (recorded ROLLED_BACK, on
        # its step timeout or a broken channel), the service is ours from here,
        # whether or not the originator is still alive to read COMMITTED.
        if arrival.arbiter.decide(COMMITTED) != COMMITTED:
            service.discard()
            why = arrival.arbiter.note() or "it gave up waiting, or its channel broke"
            error = RolledBackError(
                f"the originator rolled {name!r} back before this side could commit "
                f"({why}); not started here"
            )
            try:
                # The conversation goes on, if the channel does: another
                # service (or this one again) may be taken.
                await self._send(Message(Kind.REFUSED, {"service": name, "reason": str(error)}))
            except (TakeoverError, OSError) as exc:
                log.info("could not tell the originator (%s)", exc)
            raise error
        # Count what moved before start() accepts what queued meanwhile.
        described = service.describe()
        draining = _count_or_zero(arrival.meta.get("draining"))
        seconds = _seconds(arrival.meta.get("drain_seconds"))
        note = getattr(service, "takeover_draining_elsewhere", None)
        if draining and seconds is not None and note is not None:
            note(self.originator.get("pid"), draining, seconds)
        try:
            service.start()
        except Exception:
            # Committed: the originator lets go whatever happens, so there is
            # no going back. Keep whatever did start rather than let the
            # exception end the process and every connection with it.
            log.exception("service %r failed to start completely after commit", name)
        started_at = time.monotonic()
        quiesced_at = arrival.meta.get("quiesced_at")
        pause = (started_at - quiesced_at) * 1000 if isinstance(quiesced_at, float) else -1.0
        faults.checkpoint("recipient.started")
        # Only now tell the originator, so that its wake-up (which may take
        # this CPU) falls after the pause: the arbiter already holds the
        # decision, and the originator keeps its copies quiet until it reads it.
        try:
            await self._send(Message(Kind.COMMITTED, {"service": name, "pause_ms": pause}))
        except ChannelClosedError:
            # The originator learns it from the arbiter, or it is gone: either
            # way the service is ours.
            log.warning("originator closed before COMMITTED for %r; serving it anyway", name)
        except (TakeoverError, OSError) as exc:
            log.warning("could not answer COMMITTED for %r (%s); serving it anyway", name, exc)
        faults.checkpoint("recipient.committed-sent")
        meta = arrival.meta
        return Taken(
            name=name,
            service=service,
            connections=int(described.get("connections", 0)),
            pause_ms=pause,
            graph_bytes=len(arrival.blob),
            fds=len(arrival.ahead) + int(meta.get("fds", 0)),
            draining=draining,
            drain_seconds=seconds,
        )

    async def check(self, name: str) -> CheckResult:
        """Ask whether service ``name`` could move now, without moving it.

        The originator pickles the service's graph and throws the result
        away: nothing is paused, and a service in transit may be checked too.

        Raises:
            NoSuchServiceError: the originator publishes no such service.
        """
        await self._send(Message(Kind.CHECK, {"service": name}))
        reply = await self._receive(self.limits.step_timeout)
        body = reply.body
        ok, path, error = body.get("ok"), body.get("path"), body.get("error")
        if not isinstance(ok, bool):
            raise ProtocolError(f"CHECKED says neither yes nor no: {body!r}")
        if not all(value is None or isinstance(value, str) for value in (path, error)):
            raise ProtocolError(f"CHECKED path and error must be strings: {body!r}")
        return CheckResult(name, ok, path, error)

    async def close(self) -> None:
        """Say BYE (if the channel is still up) and close it."""
        try:
            if self.conversation.state == "idle":
                await self._send(Message(Kind.BYE))
        except TakeoverError:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the channel at once, without BYE."""
        self.channel.close()


def select(services: Sequence[dict[str, Any]], wanted: Sequence[str]) -> list[str]:
    """The names to take: ``wanted`` (checked), or every listed service."""
    names = [str(s.get("name")) for s in services]
    if not wanted:
        return names
    missing = [w for w in wanted if w not in names]
    if missing:
        raise NoSuchServiceError(
            f"no service named {', '.join(map(repr, missing))} "
            f"(published: {', '.join(names) or 'none'})"
        )
    return list(wanted)


def _count_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _seconds(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None
