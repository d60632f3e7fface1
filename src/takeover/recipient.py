"""The recipient's half of a migration: ask for services and adopt them.

For each service: TAKE, receive the graph and its descriptors, rebuild the
graph, adopt it into this process's runtime *without starting any I/O*, then
commit: record COMMITTED in the move's arbiter (``_arbiter.py``), start, and
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _faults, _protocol, _staging
from ._arbiter import COMMITTED, Arbiter
from ._auth import AUTH_SCHEME, check_nonce, check_peer, check_proof, new_nonce, proof
from ._channel import Channel
from ._errors import (
    AuthenticationError,
    ChannelClosedError,
    MigrationRefusedError,
    MigrationTimeoutError,
    NoSuchServiceError,
    ProtocolError,
    TakeoverError,
    error_from_code,
)
from ._fds import close_all
from ._policy import TRUST_WARNING, UnpicklePolicy
from ._protocol import Conversation, Kind, Limits, Message, Role
from ._serialize import Twins, build_sockets, gc_paused, loads, preload_main
from ._staging import Staging
from .registry import Service

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
    """

    name: str
    service: Service
    connections: int
    pause_ms: float
    graph_bytes: int
    fds: int

    def summary(self) -> dict[str, Any]:
        return {
            "service": self.name,
            "connections": self.connections,
            "pause_ms": round(self.pause_ms, 3),
            "graph_bytes": self.graph_bytes,
            "fds": self.fds,
        }


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
    ) -> None:
        self.channel = channel
        self.limits = limits
        self.secret = secret
        # Which globals an originator's graph may name (see _policy).
        self.policy = policy if policy is not None else UnpicklePolicy()
        if self.policy.trust:
            log.warning("%s", TRUST_WARNING)
        self.policy.prepare()
        self._fd_transport: dict[str, Any] | None = None
        self._main: str | None = None
        self.conversation = Conversation(Role.RECIPIENT)
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
            AuthenticationError: the originator runs as another user, fails
                the shared-secret challenge, or does not authenticate while
                this side has a secret (or the reverse).
        """
        if self.channel.local:
            check_peer(self.channel.peer, role="originator")
        elif self.secret is None and not self.channel.encrypted:
            raise AuthenticationError(
                "a control channel over TCP needs a shared secret (--secret-file) or TLS"
            )
        _faults.checkpoint("recipient.connected")
        nonce = new_nonce()
        extra: dict[str, Any] = {"nonce": nonce}
        if self.secret is not None:
            extra["auth"] = AUTH_SCHEME
        try:
            await self._send(
                _protocol.hello(
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
        self.originator = _protocol.check_hello(message, Role.ORIGINATOR)
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
        _faults.checkpoint("recipient.authenticated")
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
        _faults.checkpoint("recipient.listed")
        return services

    async def take(self, name: str, runtime: Any) -> Taken:
        """Move service ``name`` into this process and start it.

        Args:
            name: the service to take.
            runtime: what the service's ``adopt`` needs (the asyncio loop,
                the Twisted reactor).

        Raises:
            NoSuchServiceError, ServiceBusyError: the originator said so.
            MigrationRefusedError: the graph could not be rebuilt or adopted
                here; the originator has been told and resumes the service.
            ChannelClosedError: the originator went away before this side held
                the graph and every descriptor; the service was not started
                here.
            MigrationTimeoutError: the originator gave up waiting (its step
                timeout) and rolled back before this side could commit.
        """
        if self._fd_transport is not None:
            # Over TCP: connect the local descriptor socket first (same host only).
            await self.channel.connect_fd_transport(self._fd_transport, self.limits.step_timeout)
            self._fd_transport = None
        if self._main is not None:
            # Load the originator's script now rather than inside the pause.
            preload_main(self._main, self.policy)
        await self._send(Message(Kind.TAKE, {"service": name}))
        _faults.checkpoint("recipient.take-sent")
        arbiter: Arbiter | None = None
        ahead: list[socket.socket] = []
        staging: Staging | None = None
        twins: Twins | None = None
        fds: list[int] = []
        try:
            # Before the graph, while the service still runs over there: the
            # arbiter, which says how many sockets follow it, then those
            # sockets. Each batch is built, its connections registered for
            # reading (passively) and their twins built as it arrives. STAGED
            # then tells the originator that it may pause the service: nothing
            # of this is left to do inside the pause.
            expected: int | None = None
            while expected is None or len(ahead) < expected:
                message = await self._receive(self.limits.step_timeout)
                if message.kind is not Kind.FDS:
                    raise ProtocolError(
                        f"{message.kind.name} before all the sockets sent ahead had arrived"
                    )
                count = int(message.body["count"])
                if len(ahead) + count + 1 > self.limits.max_fds:
                    raise ProtocolError(
                        f"service {name!r} sends more than {self.limits.max_fds} descriptors"
                    )
                batch = await self.channel.take_fds(count, self.limits.step_timeout)
                if message.body.get("arbiter") is True:
                    total = message.body.get("ahead")
                    if arbiter is not None or count != 1 or type(total) is not int or total < 0:
                        close_all(batch)
                        raise ProtocolError(
                            "a second arbiter, one with other descriptors, or one that does "
                            f"not say how many sockets follow it ({total!r})"
                        )
                    arbiter = Arbiter.adopt(batch[0])
                    expected = total
                    continue
                if expected is None or len(ahead) + count > expected:
                    close_all(batch)
                    raise ProtocolError(
                        f"{count} more sockets sent ahead than the arbiter announced ({expected!r})"
                    )
                kinds = message.body.get("kinds")
                sockets = build_sockets(batch, kinds)
                first = not ahead
                ahead.extend(sockets)
                if staging is None:
                    staging = Staging()
                staging.add(sockets)
                kind = message.body.get("twins")
                if first and kind is not None:
                    twins = Twins(kind, self.policy)
                if (twins is None) != (kind is None) or (twins is not None and twins.kind != kind):
                    raise ProtocolError("the batches sent ahead disagree on their twins")
                if twins is not None:
                    assert isinstance(kinds, list)  # build_sockets checked it
                    twins.add(sockets, [k[4] for k in kinds for _ in range(k[0])])
            _faults.checkpoint("recipient.ahead-received")
            await self._send(Message(Kind.STAGED, {"service": name, "count": len(ahead)}))
            _faults.checkpoint("recipient.staged-sent")
            message = await self._receive(self.limits.step_timeout)
            graph_message = message
            _faults.checkpoint("recipient.graph-received")
            meta = graph_message.body
            late = meta.get("fds")
            if not isinstance(late, int) or len(ahead) + late > self.limits.max_fds:
                raise ProtocolError(
                    f"service {name!r} brings {late!r} more descriptors; "
                    f"the limit is {self.limits.max_fds}"
                )
            if meta.get("ahead", 0) != len(ahead):
                raise ProtocolError(
                    f"the graph counts {meta.get('ahead')!r} sockets sent ahead, "
                    f"{len(ahead)} arrived"
                )
            if meta.get("twins", False) is not (twins is not None):
                raise ProtocolError(
                    f"the graph says twins: {meta.get('twins')!r}, the sockets sent ahead "
                    f"{'had' if twins is not None else 'had none'}"
                )
            while len(fds) < late:
                batch_message = await self._receive(self.limits.step_timeout)
                fds.extend(
                    await self.channel.take_fds(
                        int(batch_message.body["count"]), self.limits.step_timeout
                    )
                )
            _faults.checkpoint("recipient.fds-received")
            # The loop above ends only once the arbiter (the commit point) has come.
            assert arbiter is not None
        except BaseException:
            close_all(fds)
            for sock in ahead:
                sock.close()
            if staging is not None:
                staging.close()
            if arbiter is not None:
                arbiter.close()
            raise
        try:
            # No cyclic collection until the service has started (see gc_paused).
            with gc_paused():
                return await self._adopt(
                    name, runtime, meta, graph_message.blob, fds, arbiter, ahead, staging, twins
                )
        finally:
            if staging is not None:
                staging.close()  # a no-op if a server claimed it
            if arbiter is not None:
                arbiter.close()
            if twins is not None:
                # After start (or discard): what nothing took is closed.
                twins.close_leftovers()

    async def _adopt(
        self,
        name: str,
        runtime: Any,
        meta: dict[str, Any],
        blob: bytes,
        fds: Sequence[int],
        arbiter: Arbiter,
        ahead: Sequence[socket.socket] = (),
        staging: Staging | None = None,
        twins: Twins | None = None,
    ) -> Taken:
        """Rebuild and adopt the graph, commit through the arbiter, start."""
        service: Service | None = None
        try:
            main = meta.get("main")
            graph = loads(
                blob,
                fds,
                main=main if isinstance(main, str) else None,
                policy=self.policy,
                prebuilt=ahead,
                twins=twins,
            )
            if not isinstance(graph, Service):
                raise MigrationRefusedError(
                    f"the graph of {name!r} is a {type(graph).__qualname__}, not a takeover service"
                )
            service = graph
            # A server may take the staged registrations as its poller.
            _staging.offer(staging)
            try:
                service.adopt(runtime)
            finally:
                _staging.offer(None)
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
        _faults.checkpoint("recipient.adopted")
        # The commit point. The originator has quiesced the service and sent
        # everything; unless it has given up first (recorded ROLLED_BACK, on
        # its step timeout or a broken channel), the service is ours from here,
        # whether or not the originator is still alive to read COMMITTED.
        if arbiter.decide(COMMITTED) != COMMITTED:
            service.discard()
            raise MigrationTimeoutError(
                f"the originator rolled {name!r} back before this side could commit "
                "(it gave up waiting, or its channel broke); not started here"
            )
        # Count what moved before start() accepts what queued meanwhile.
        described = service.describe()
        try:
            service.start()
        except Exception:
            # Committed: the originator lets go whatever happens, so there is
            # no going back. Keep whatever did start rather than let the
            # exception end the process and every connection with it.
            log.exception("service %r failed to start completely after commit", name)
        started_at = time.monotonic()
        # Only now tell the originator, so that its wake-up (which may take
        # this CPU) falls after the pause: the arbiter already holds the
        # decision, and the originator keeps its copies quiet until it reads it.
        try:
            await self._send(Message(Kind.COMMITTED, {"service": name}))
        except ChannelClosedError:
            # The originator learns it from the arbiter, or it is gone: either
            # way the service is ours.
            log.warning("originator closed before COMMITTED for %r; serving it anyway", name)
        except (TakeoverError, OSError) as exc:
            log.warning("could not answer COMMITTED for %r (%s); serving it anyway", name, exc)
        _faults.checkpoint("recipient.committed-sent")
        quiesced_at = meta.get("quiesced_at")
        pause = (started_at - quiesced_at) * 1000 if isinstance(quiesced_at, float) else -1.0
        return Taken(
            name=name,
            service=service,
            connections=int(described.get("connections", 0)),
            pause_ms=pause,
            graph_bytes=len(blob),
            fds=len(ahead) + len(fds),
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
