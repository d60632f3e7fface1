"""A move to another host: established TCP connections rebuilt by TCP_REPAIR.

Both halves of a move whose TAKE says ``"cross_host": true`` (docs/crosshost.md).
No descriptor travels and there is no shared arbiter: the originator decides.

Originator (:class:`CrossHostMove`): refuses unless it may repair connections
(CAP_NET_ADMIN, ``nft``); sweeps the drop tables of dead processes and starts
a guard that deletes its own if it dies; the dry run, which also refuses a
socket that cannot move across hosts (a UNIX socket, a connection that is
not established), naming it; the door: new SYNs to the listeners dropped,
and what they had queued accepted by the service; quiesce; freeze every
connection (an nft drop of their 4-tuples, then repair mode); pickle the
graph with each connection's checkpoint in place of its descriptor and each
listener's address and backlog in place of its own; GRAPH (naming the
move); wait for READY. Then the decision: the release hook (``ip addr
del``; the last step that may still fail, and then roll back), then,
committed: the frozen sockets closed (in repair mode: nothing sent), the
drop lifted, COMMIT. Any failure before the decision thaws the connections
and resumes the service: the clients saw a pause.

Recipient (:func:`take_across_hosts`): checks its own capability before
TAKE; rebuilds the graph, each connection in repair mode bound to the
service address with IP_TRANSPARENT and each listener with IP_FREEBIND
(the address is not this host's yet); adopts it without I/O; READY. On
COMMIT: the acquire hook (``ip addr add``, ``arping -U``), each connection
out of repair mode, the bytes the originator's kernel had never sent put in
front of its transport's output, the service started, COMMITTED. On ERROR
(the originator rolled back) the copies are discarded (closed in repair
mode: silently).

In doubt: if the channel fails after READY, before COMMIT, the recipient asks
the originator on new connections (OUTCOME) what it decided, for its
``in_doubt_wait``; the originator, if it decided and lost the channel,
waits as long to be asked (:func:`answer_outcome`). Only if the originator
cannot be asked in time (it died) does the recipient presume a rollback:
if it had committed, those connections are lost (docs/crosshost.md).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from . import dropguard, faults, protocol, tcprepair
from .channel import Channel
from .crosspickle import dumps_cross_host
from .errors import (
    ChannelClosedError,
    MigrationRefusedError,
    RolledBackError,
    SerializationError,
    TakeoverError,
)
from .pickling import gc_paused, loads
from .protocol import DEFAULT_IN_DOUBT_WAIT, Kind, Message
from .registry import Outcomes, Service
from .script import preload_main
from .tcprepair import cross_host_refusal, is_listening

if TYPE_CHECKING:
    from .originator import _Session
    from .recipient import RecipientSession, Taken

from .originator import _Move

log = logging.getLogger("takeover.crosshost")

DOOR_WAIT = 0.5
"""At most this long, new connections dropped, the service accepts what its
listeners had queued before it is paused (see ``CrossHostMove._close_door``)."""
_DOOR_POLL = 0.002


class CrossHostMove(_Move):
    """One service in transit to another host, from TAKE to commit or rollback."""

    def __init__(self, *args: Any, in_doubt_wait: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freeze: tcprepair.Freeze | None = None
        self.guard: dropguard.DropGuard | None = None
        self.found: list[socket.socket] = []
        self.decided = False
        # Names this move to a recipient that lost the channel and asks (OUTCOME).
        self.move_id = secrets.token_hex(8)
        self.in_doubt_wait = DEFAULT_IN_DOUBT_WAIT if in_doubt_wait is None else in_doubt_wait

    async def run(self) -> None:
        session, name = self.session, self.name
        try:
            tcprepair.require_capability()
            # Tables an originator killed while frozen left here.
            for table in dropguard.sweep_stale_tables():
                log.warning("deleted the drop table %s of a process that is gone", table)
            self.guard = dropguard.DropGuard()
        except (tcprepair.RepairError, OSError) as exc:
            text = f"cannot move {name!r} to another host from here: {exc}"
            log.warning("%s", text)
            code = exc.code if isinstance(exc, TakeoverError) else tcprepair.RepairError.code
            await session.send(protocol.error(code, text))
            return
        guard = self.guard
        try:
            await super().run()
        finally:
            guard.stop()

    async def _send_ahead(self, service: Service) -> bool:
        """The dry run, and the checks only a move across hosts makes; nothing
        is sent ahead (no descriptor can travel)."""
        name = self.name
        if getattr(service, "takeover_unsent", None) is None:
            return await self._refuse(
                SerializationError.code,
                f"service {name!r} ({type(service).__name__}) cannot move to another host: "
                "it does not take back the bytes a connection had not sent "
                "(takeover_unsent); takeover's asyncio and Twisted servers do",
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
        faults.checkpoint("originator.checked")
        try:
            await self._close_door([s for s in self.found if is_listening(s)])
        except (tcprepair.RepairError, OSError) as exc:
            text = f"cannot close the listeners of {name!r} to new connections: {exc}"
            text += "; nothing was paused"
            log.warning("%s", text)
            return await self._refuse(tcprepair.RepairError.code, text)
        return True

    async def _close_door(self, listeners: list[socket.socket]) -> None:
        """Drop new connections to the listeners (their clients send the SYN
        again a second later, to whichever host has the address by then), and
        let the service accept what the kernel had queued for it, so that
        those connections move too: the accept queue itself cannot (a
        connection completed there after this is lost with the listener)."""
        if not listeners:
            return
        self.freeze = tcprepair.Freeze([], listeners)
        self.freeze.drop()
        deadline = time.monotonic() + DOOR_WAIT
        empty = 0
        while empty < 2 and time.monotonic() < deadline:
            # Twice empty a turn apart: a handshake answered just before the
            # drop completes within a round trip.
            await self.session.channel.sleep(_DOOR_POLL)
            queued = sum(tcprepair.queued(s) for s in listeners if s.fileno() >= 0)
            empty = empty + 1 if queued == 0 else 0
        if empty < 2:
            log.warning(
                "move of %r: the listeners still had connections queued after %g s; "
                "those are lost if the move commits",
                self.name,
                DOOR_WAIT,
            )

    def _freeze(self, sockets: list[socket.socket]) -> None:
        if self.freeze is None:
            self.freeze = tcprepair.Freeze([], [])
        self.freeze.add(sockets)

    def _checkpoint(self, sock: socket.socket) -> dict[str, Any]:
        """The reduction's checkpoint: a connection that appeared since the
        freeze is frozen on its own first."""
        if self.freeze is None or sock not in self.freeze.sockets:
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
                # The connections of the dry run, and those accepted since
                # (the door closing), in one drop table with the listeners'.
                live = {s: None for s in self.found if s.fileno() >= 0}
                sockets = getattr(service, "sockets", None)
                if callable(sockets):
                    live.update((s, None) for s in sockets() if s.fileno() >= 0)
                self._freeze([s for s in live if not is_listening(s)])
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
                move=self.move_id,
                fds=0,
                ahead=0,
                twins=False,
                connections=len(dumped.sockets),
            )
            session.registry.outcomes.record(self.move_id, Outcomes.PENDING)
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
            await _hook(session.channel, session.registry.release_address, "release")
        except tcprepair.RepairError as exc:
            self.reason = str(exc)
            log.error("move of %r rolled back: %s", name, exc)
            await session.send(protocol.error(exc.code, f"{exc}; rolled back"))
            return
        # The decision: the connections are the recipient's from here.
        self.decided = self.committed = True
        session.registry.outcomes.record(self.move_id, Outcomes.COMMITTED)
        faults.checkpoint("originator.decided")
        frozen, self.freeze = self.freeze, None
        if frozen is not None:
            frozen.close_sockets()
            try:
                frozen.lift()
            except tcprepair.RepairError as exc:
                log.error("move of %r: the drop could not be lifted: %s", name, exc)
        try:
            await session.send(Message(Kind.COMMIT, {"service": name, "move": self.move_id}))
            faults.checkpoint("originator.commit-sent")
            reply = await session.receive(timeout)
        except (TakeoverError, OSError) as exc:
            if await self._told_elsewhere(exc):
                return
            raise
        pause = reply.body.get("pause_ms")
        self.pause_ms = round(pause, 3) if isinstance(pause, (int, float)) else None

    async def _told_elsewhere(self, exc: BaseException) -> bool:
        """Decided, but the channel failed before COMMITTED: wait, as long as the
        recipient said it would ask, for it to ask (OUTCOME, on a new connection)
        and be told. True once it was; False if it never asked: then, if COMMIT
        did not reach it either, the connections are lost."""
        outcomes, name = self.session.registry.outcomes, self.name
        log.warning(
            "move of %r: decided and let go here, but the channel failed before the "
            "recipient confirmed (%s); waiting up to %g s for it to ask what was decided",
            name,
            exc,
            self.in_doubt_wait,
        )
        deadline = time.monotonic() + self.in_doubt_wait + 5.0
        while time.monotonic() < deadline:
            if outcomes.told(self.move_id):
                log.warning("move of %r: the recipient asked and was told it committed", name)
                return True
            await self.session.channel.sleep(0.05)
        log.error(
            "move of %r: committed here, and the recipient neither confirmed nor asked within "
            "%g s: if COMMIT did not reach it, the connections are lost",
            name,
            self.in_doubt_wait,
        )
        return False

    def _settle(self, service: Service) -> None:
        outcomes = self.session.registry.outcomes
        if not self.committed:
            frozen, self.freeze = self.freeze, None
            if frozen is not None:
                try:
                    frozen.thaw()
                except Exception:
                    log.exception("move of %r: thawing its connections failed", self.name)
            if outcomes.get(self.move_id) is not None:
                outcomes.record(self.move_id, Outcomes.ROLLED_BACK)
        super()._settle(service)
        if self.committed:
            # Its pid means nothing on this host: no MAINPID, no PID file for it.
            self.session.registry.successor_pid = None


async def _hook(channel: Channel, command: str | None, what: str) -> None:
    """An address hook, run in a thread: the loop serves the process's other
    services meanwhile (this one is paused)."""
    if command:
        await channel.in_thread(tcprepair.run_address_hook, command, what)


async def take_across_hosts(
    session: RecipientSession, name: str, runtime: Any, drain: float | None
) -> Taken:
    """The recipient's half of a move across hosts (see the module's docstring)."""
    from .recipient import Taken

    tcprepair.require_capability(nft=False)
    limits = session.limits
    if session._main is not None:
        preload_main(session._main, session.policy)
    body: dict[str, Any] = {
        "service": name,
        "max_graph": limits.max_frame_size,
        "cross_host": True,
        "in_doubt_wait": session.in_doubt_wait,
    }
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
    in_doubt = await _ready(session, name, service, len(repaired), graph.body.get("move"))
    faults.checkpoint("recipient.commit-received")
    try:
        await _hook(session.channel, session.acquire_address, "acquire")
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
        if not in_doubt:  # else the originator learnt it was told, when it answered OUTCOME
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


async def _ready(
    session: RecipientSession, name: str, service: Service, count: int, move: Any
) -> bool:
    """READY, then COMMIT: True if the channel failed and the originator, asked
    (in doubt), said it committed. Any other end discards the copies and raises:
    :class:`RolledBackError` if the originator rolled back or was presumed to."""
    try:
        try:
            await session._send(Message(Kind.READY, {"service": name, "count": count}))
            faults.checkpoint("recipient.ready-sent")
            reply = await session.channel.receive(session.limits.step_timeout)
            session.conversation.receive(reply)
            if reply.kind is Kind.BYE:
                raise ChannelClosedError("the originator ended the conversation")
        except (TakeoverError, OSError) as exc:
            # In doubt: COMMIT may have been sent (the channel broke or timed
            # out, or said something out of turn). Ask, on a new connection.
            why = await _ask_outcome(session, name, move, exc)
            if why is not None:
                raise RolledBackError(f"{why}; {name!r} not started here") from exc
            return True
        if reply.kind is not Kind.COMMIT:  # ERROR: the originator rolled back
            said = reply.body.get("message", "no reason given")
            raise RolledBackError(f"the originator rolled {name!r} back ({said}); not started here")
    except BaseException:
        service.discard()
        raise
    return False


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


async def _ask_outcome(
    session: RecipientSession, name: str, move: Any, lost: BaseException
) -> str | None:
    """The channel failed after READY: ask the originator, on new connections,
    what it decided for ``move``, for up to the session's ``in_doubt_wait``.
    None: it committed (start the copies). Otherwise why they are discarded:
    it rolled back, or does not know the move, or could not be asked in time
    (presumed rolled back: if it had committed, the connections are lost).
    Until then the copies stay silent in repair mode and the clients' TCP
    retransmits into the drop."""
    wait = session.in_doubt_wait
    reopen = session.reopen
    old = session.channel
    session.abort()  # the old channel is of no use now; the originator sees it end
    if reopen is None or wait <= 0 or not isinstance(move, str):
        why = f"the move of {name!r} is in doubt ({lost}) and cannot be asked about"
        log.error("%s: presumed rolled back", why)
        return why + ": presumed rolled back"
    log.warning(
        "move of %r in doubt: the channel failed after READY (%s); asking the originator "
        "what it decided, for up to %g s",
        name,
        lost,
        wait,
    )
    deadline = time.monotonic() + wait
    last: BaseException = lost
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        asker: RecipientSession | None = None
        try:
            asker = await _asker(session, reopen, left)
            await asker._send(Message(Kind.OUTCOME, {"service": name, "move": move}))
            await asker._receive(max(deadline - time.monotonic(), 0.1))  # COMMIT, or ERROR raises
        except RolledBackError as exc:
            log.warning("move of %r: the originator says %s", name, exc)
            return f"the originator says {exc}"
        except (TakeoverError, OSError) as exc:
            last = exc
            await old.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
            continue
        finally:
            if asker is not None:
                await asker.close()
        log.warning("move of %r: the originator says it committed; starting it here", name)
        return None
    why = (
        f"the move of {name!r} was in doubt ({lost}) and the originator could not be asked "
        f"within {wait:g} s (last: {last}): presumed rolled back; if it had committed, "
        "those connections are lost"
    )
    log.error("%s", why)
    return why


async def _asker(session: RecipientSession, reopen: Any, timeout: float) -> RecipientSession:
    from .recipient import RecipientSession

    asker = RecipientSession(
        await reopen(timeout),
        limits=session.limits,
        secret=session.secret,
        policy=session.policy,
        admission=session.admission,
        cross_host=True,
    )
    try:
        await asker.open()
    except BaseException:
        asker.abort()
        raise
    return asker


async def answer_outcome(session: _Session, body: dict[str, Any]) -> None:
    """OUTCOME: tell a recipient in doubt what this originator decided for a move
    (waiting, if the move is still being decided, for the decision)."""
    move, name = str(body["move"]), str(body["service"])
    outcomes = session.registry.outcomes
    while outcomes.get(move) == Outcomes.PENDING:
        await session.channel.sleep(0.02)
    outcome = outcomes.get(move)
    if outcome == Outcomes.COMMITTED:
        await session.send(Message(Kind.COMMIT, {"service": name, "move": move}))
        outcomes.tell(move)
        log.info("told a recipient in doubt that the move of %r committed", name)
        return
    if outcome == Outcomes.ROLLED_BACK:
        text = f"the move of {name!r} ({move}) was rolled back here"
    else:
        text = (
            f"no move {move} of {name!r} is known here (this process did not decide it): "
            "presumed rolled back"
        )
    log.info("told a recipient in doubt: %s", text)
    await session.send(protocol.error(RolledBackError.code, text))
