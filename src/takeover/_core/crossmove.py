"""A move to another host: established TCP connections rebuilt by TCP_REPAIR.

Both halves of a move whose TAKE says ``"cross_host": true`` (docs/crosshost.md).
No descriptor travels and there is no shared arbiter: the originator decides.

Originator (:class:`CrossHostMove`): refuses unless it may repair connections
(CAP_NET_ADMIN, ``nft``); the dry run, which also refuses a socket that
cannot move across hosts (a UNIX socket, a connection that is not
established), naming it; quiesce; freeze the connections (an nft drop of
their 4-tuples, then repair mode); pickle the graph with each connection's
checkpoint in place of its descriptor and each listener's address and
backlog in place of its own; GRAPH; wait for READY. Then the decision: the
release hook (``ip addr del``; the last step that may still fail, and then
roll back), then, committed: the frozen sockets closed (in repair mode:
nothing sent), the drop lifted, COMMIT. Any failure before the decision
thaws the connections and resumes the service: the clients saw a pause.

Recipient (:func:`take_across_hosts`): checks its own capability before
TAKE; rebuilds the graph, each connection in repair mode bound to the
service address with IP_TRANSPARENT and each listener with IP_FREEBIND
(the address is not this host's yet); adopts it without I/O; READY. On
COMMIT: the acquire hook (``ip addr add``, ``arping -U``), each connection
out of repair mode, the bytes the originator's kernel had never sent put in
front of its transport's output, the service started, COMMITTED. On ERROR
(the originator rolled back) or a broken channel before COMMIT, the copies
are discarded (closed in repair mode: silently).

The in-doubt window: the originator has decided (its sockets closed, the
address released) but COMMIT does not reach the recipient, which then
discards its copies: those connections are lost (their clients see them
time out or reset). It is the price of having no arbiter both hosts share.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from . import faults, protocol, tcprepair
from .crosspickle import dumps_cross_host
from .errors import (
    ChannelClosedError,
    MigrationRefusedError,
    RolledBackError,
    SerializationError,
    TakeoverError,
)
from .pickling import gc_paused, loads
from .protocol import Kind, Message
from .registry import Service
from .script import preload_main
from .tcprepair import cross_host_refusal, is_listening

if TYPE_CHECKING:
    from .recipient import RecipientSession, Taken

from .originator import _Move

log = logging.getLogger("takeover.crosshost")


class CrossHostMove(_Move):
    """One service in transit to another host, from TAKE to commit or rollback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freezes: list[tcprepair.Freeze] = []
        self.frozen: set[socket.socket] = set()
        self.found: list[socket.socket] = []
        self.decided = False

    async def run(self) -> None:
        session, name = self.session, self.name
        try:
            tcprepair.require_capability()
        except tcprepair.CapabilityError as exc:
            text = f"cannot move {name!r} to another host from here: {exc}"
            log.warning("%s", text)
            await session.send(protocol.error(exc.code, text))
            return
        await super().run()

    async def _send_ahead(self, service: Service) -> bool:
        """The dry run, and the checks only a move across hosts makes; nothing
        is sent ahead (no descriptor can travel)."""
        name = self.name
        if getattr(service, "takeover_unsent", None) is None:
            return await self._refuse(
                SerializationError.code,
                f"service {name!r} ({type(service).__name__}) cannot move to another host: "
                "it does not take back the bytes a connection had not sent "
                "(takeover_unsent); asyncio's MigratableServer does",
            )
        if self.drain is not None:
            return await self._refuse(
                SerializationError.code,
                f"a partial move (--drain) of {name!r} cannot go to another host: the "
                "connections left to drain here would lose the service address with it",
            )
        # The dry run, without a partial move (even one the service would default to).
        problem = await self._check(service, self.found)
        if problem is not None:
            log.warning("cannot move %r, left running: %s", name, problem)
            return await self._refuse(SerializationError.code, problem.explain(name))
        for sock in self.found:
            refusal = cross_host_refusal(sock)
            if refusal is not None:
                log.warning("cannot move %r, left running: %s", name, refusal)
                return await self._refuse(SerializationError.code, f"{refusal}; nothing was paused")
        too_big = self._too_big(self.sizes[-1] if self.sizes else 0)
        if too_big is not None:
            return await self._refuse("limit", too_big + "; nothing was paused")
        return True

    def _freeze(
        self, sockets: list[socket.socket], listeners: list[socket.socket] | None = None
    ) -> None:
        if not sockets and not listeners:
            return
        self.freezes.append(tcprepair.freeze(sockets, listeners or ()))
        self.frozen.update(sockets)

    def _checkpoint(self, sock: socket.socket) -> dict[str, Any]:
        """The reduction's checkpoint: a connection that appeared since the dry
        run is frozen on its own first."""
        if sock not in self.frozen:
            self._freeze([sock])
        return tcprepair.checkpoint(sock)

    async def _send_graph(self, service: Service) -> bool:
        """Quiesce, freeze the connections, pickle the graph with their state, send it."""
        session, name = self.session, self.name
        with gc_paused():
            quiesced_at = time.monotonic()
            self.quiesced = True
            try:
                service.quiesce()
            except Exception as exc:
                text = f"service {name!r} could not be paused: {type(exc).__name__}: {exc}"
                log.exception("%s", text)
                return await self._refuse(TakeoverError.code, text)
            faults.checkpoint("originator.quiesced")
            try:
                live = [s for s in self.found if s.fileno() >= 0]
                listeners = [s for s in live if is_listening(s)]
                # New connections are dropped too: their clients send the SYN again.
                self._freeze([s for s in live if s not in listeners], listeners)
                faults.checkpoint("originator.frozen")
                dumped = dumps_cross_host(service, session.pickle_protocol, self._checkpoint)
            except TakeoverError as exc:
                log.warning("cannot move %r to another host: %s", name, exc)
                return await self._refuse(exc.code, f"{exc}; it goes on here")
            except OSError as exc:
                text = f"cannot freeze the connections of {name!r}: {exc}; it goes on here"
                log.warning("%s", text)
                return await self._refuse(tcprepair.RepairError.code, text)
            left = getattr(service, "takeover_left", None)
            if left is not None:
                self.left = left()
            seal = getattr(service, "takeover_seal", None)
            if seal is not None:
                seal(self.late_call)
            refusal = self._too_big(len(dumped.blob))
            if refusal is not None:
                return await self._refuse("limit", refusal)
            meta = self._graph_meta(
                dumped,
                quiesced_at,
                cross_host=True,
                fds=0,
                ahead=0,
                twins=False,
                connections=len(dumped.sockets),
            )
            await session.send(Message(Kind.GRAPH, meta, dumped.blob))
            faults.checkpoint("originator.graph-sent")
        return True

    def late_call(self, call: str) -> bool:
        """A call from outside the sealed service (see ``_Move.late_call``):
        before the decision it rolls the move back and takes effect here;
        after it, it fails as on a lost connection."""
        if self.decided:
            return False
        if self.late is None:
            self.late = (
                f"{call} after the graph was pickled: the move was rolled back and the "
                "change takes effect here"
            )
            log.warning("move of %r: %s", self.name, self.late)
        return True

    async def _await_decision(self) -> None:
        """READY, then the decision; REFUSED or anything else before it rolls back."""
        session, name = self.session, self.name
        timeout = session.limits.step_timeout
        reply = await session.receive(timeout)
        if reply.kind is Kind.BYE:
            raise ChannelClosedError(f"the recipient ended the conversation taking {name!r}")
        if reply.kind is Kind.REFUSED:
            self.reason = f"the recipient refused it: {reply.body.get('reason', 'no reason given')}"
            return
        faults.checkpoint("originator.ready-received")
        if self.late is not None:
            self.reason = self.late
            await session.send(protocol.error(RolledBackError.code, self.late))
            return
        try:
            # The last step that may fail and still roll back.
            tcprepair.run_address_hook(session.registry.release_address, "release")
        except tcprepair.RepairError as exc:
            self.reason = str(exc)
            log.error("move of %r rolled back: %s", name, exc)
            await session.send(protocol.error(exc.code, f"{exc}; rolled back"))
            return
        # The decision: the connections are the recipient's from here.
        self.decided = self.committed = True
        faults.checkpoint("originator.decided")
        for frozen in self.freezes:
            frozen.close_sockets()
        for frozen in self.freezes:
            try:
                frozen.lift()
            except tcprepair.RepairError as exc:
                log.error("move of %r: the drop could not be lifted: %s", name, exc)
        self.freezes = []
        try:
            await session.send(Message(Kind.COMMIT, {"service": name}))
            faults.checkpoint("originator.commit-sent")
            reply = await session.receive(timeout)
        except TakeoverError as exc:
            log.error(
                "move of %r: decided and let go here, but the recipient did not confirm "
                "(%s): if COMMIT did not reach it, the connections are lost",
                name,
                exc,
            )
            raise
        pause = reply.body.get("pause_ms")
        self.pause_ms = round(pause, 3) if isinstance(pause, (int, float)) else None

    def _settle(self, service: Service) -> None:
        if not self.committed:
            for frozen in self.freezes:
                try:
                    frozen.thaw()
                except Exception:
                    log.exception("move of %r: thawing its connections failed", self.name)
            self.freezes = []
        super()._settle(service)
        if self.committed:
            # Its pid means nothing on this host: no MAINPID, no PID file for it.
            self.session.registry.successor_pid = None


async def take_across_hosts(
    session: RecipientSession, name: str, runtime: Any, drain: float | None
) -> Taken:
    """The recipient's half of a move across hosts (see the module's docstring)."""
    from .recipient import Taken

    tcprepair.require_capability(nft=False)
    limits = session.limits
    if session._main is not None:
        preload_main(session._main, session.policy)
    body: dict[str, Any] = {"service": name, "max_graph": limits.max_frame_size, "cross_host": True}
    if drain is not None:
        body["drain"] = drain
    await session._send(Message(Kind.TAKE, body))
    faults.checkpoint("recipient.take-sent")
    graph = await session._receive(limits.step_timeout)
    received_at = time.monotonic()
    faults.checkpoint("recipient.graph-received")
    blob = graph.blob
    repaired: list[tuple[socket.socket, dict[str, Any]]] = []
    service = await _rebuild(session, name, runtime, graph, repaired)
    faults.checkpoint("recipient.adopted")
    try:
        await session._send(Message(Kind.READY, {"service": name, "count": len(repaired)}))
        faults.checkpoint("recipient.ready-sent")
        await session._receive(limits.step_timeout)  # COMMIT; an ERROR raises
    except BaseException as exc:
        # Rolled back (or the channel broke before COMMIT: see the in-doubt window).
        service.discard()
        if isinstance(exc, RolledBackError):
            raise RolledBackError(
                f"the originator rolled {name!r} back ({exc}); not started here"
            ) from exc
        raise
    faults.checkpoint("recipient.commit-received")
    try:
        tcprepair.run_address_hook(session.acquire_address, "acquire")
    except tcprepair.RepairError as exc:
        # Committed: the connections are ours whatever happens; say it loudly.
        log.error("service %r: %s; starting it anyway", name, exc)
    unsent: dict[socket.socket, bytes] = {}
    for sock, state in repaired:
        try:
            rest = tcprepair.start(sock, state)
        except OSError as exc:
            log.error("could not start the connection from %s: %s", state.get("peer"), exc)
            continue
        if rest:
            unsent[sock] = rest
    service.takeover_unsent(unsent)  # type: ignore[attr-defined]
    described = service.describe()
    try:
        service.start()
    except Exception:
        log.exception("service %r failed to start completely after commit", name)
    pause = (time.monotonic() - received_at) * 1000
    faults.checkpoint("recipient.started")
    try:
        await session._send(Message(Kind.COMMITTED, {"service": name, "pause_ms": pause}))
    except (TakeoverError, OSError) as exc:
        log.warning("could not answer COMMITTED for %r (%s); serving it anyway", name, exc)
    return Taken(
        name=name,
        service=service,
        connections=int(described.get("connections", 0)),
        pause_ms=pause,
        graph_bytes=len(blob),
        fds=0,
    )


async def _rebuild(
    session: RecipientSession,
    name: str,
    runtime: Any,
    graph: Message,
    repaired: list[tuple[socket.socket, dict[str, Any]]],
) -> Service:
    """The graph rebuilt (its connections in repair mode, listed in ``repaired``)
    and adopted, with no I/O; if that fails, REFUSED (everything built closed)."""
    service: Service | None = None
    try:
        with gc_paused():
            main = graph.body.get("main")
            loaded = loads(
                graph.blob,
                (),
                main=main if isinstance(main, str) else None,
                policy=session.policy,
                repaired=repaired,
            )
            if not isinstance(loaded, Service):
                raise MigrationRefusedError(
                    f"the graph of {name!r} is a {type(loaded).__qualname__}, "
                    "not a takeover service"
                )
            service = loaded
            service.adopt(runtime, None)
    except TakeoverError as exc:
        if service is not None:
            service.discard()
        log.info("refusing %r: %s", name, exc)
        await session._send(Message(Kind.REFUSED, {"service": name, "reason": str(exc)}))
        raise MigrationRefusedError(f"cannot take {name!r}: {exc}") from exc
    except BaseException:
        if service is not None:
            service.discard()
        raise
    return service
