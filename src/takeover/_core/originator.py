"""The originator's half of a migration: serve one control connection.

This is the "janitor" of the 2004 paper: every service handed to a recipient
is either committed (released here, forgotten by the registry) or rolled back
(resumed here, AVAILABLE again), whatever the recipient does. The rules:

* nothing is quiesced before the recipient has been authenticated and has
  asked for a service by name;
* the commit point is the move's arbiter (``arbiter.py``), a byte both
  processes share, sent to the recipient before anything is paused. The
  recipient, once it has rebuilt and adopted the graph, records COMMITTED
  there, starts and answers COMMITTED; the originator records ROLLED_BACK
  there before it resumes for any reason. Whichever is first wins.
* so after the graph the originator waits for COMMITTED up to the step
  timeout. COMMITTED means the recipient owns the service: only then are this
  process's descriptors closed. REFUSED resumes the service. Anything else (a
  timeout, a closed or garbled channel, an exception here) asks the arbiter:
  ROLLED_BACK recorded first resumes the service, COMMITTED found there
  releases it. So the channel can break anywhere and still only one process
  serves the service.
* once the graph is pickled the service is *sealed*: code outside it that
  writes to (or closes, pauses...) one of its connections asks the arbiter
  first (:meth:`_Move.late_call`). If nothing is decided, it records
  ROLLED_BACK, so the call takes effect here when the service resumes; if the
  recipient has committed, the call fails as on a lost connection
  (:class:`~takeover.ConnectionMovedError`). A call made after the pickle is
  never carried, so this is the only way it is never lost either.

The rules of the conversation itself (which frame may come when, what the
counts must be) are the sans-IO machine's (``protocol.Conversation``); this
module drives the steps. The runtime supplies the channel; this module never
touches a socket.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import faults, protocol
from .ahead import SocketsAhead
from .arbiter import COMMITTED, ROLLED_BACK, Arbiter
from .auth import AUTH_SCHEME, Admission, check_nonce, check_peer, check_proof, new_nonce, proof
from .channel import Channel
from .errors import (
    AuthenticationError,
    ChannelClosedError,
    NoSuchServiceError,
    ProtocolError,
    SerializationError,
    ServiceBusyError,
    TakeoverError,
)
from .fds import SCM_MAX_FD, batches
from .graphpath import SpreadCheck, Unpicklable, check_graph
from .logs import MOVES, move_event
from .pickling import Dumped, dumps, gc_paused
from .protocol import Conversation, Kind, Limits, Message, Role
from .registry import Registry, Service
from .script import main_reference

log = logging.getLogger("takeover.originator")

DRY_RUN_TURN = 0.002
"""Seconds of the dry run between two turns of the event loop (see SpreadCheck):
a client of the service waits for at most about that long, not for the whole
dry run."""

AHEAD_SLOTS_PER_TURN = 2048
"""Sockets given a slot ahead between two turns of the event loop (about 2 ms)."""

BATCHES_PER_TURN = 8
"""Batches of descriptors sent ahead between two turns of the event loop
(8 x 253 descriptors, about 2 ms)."""

DRAIN_HINT = "or take with --drain SECONDS: the connections that can move do, the others drain here"
"""Added to a refusal whose cause lies in a connection: a partial move would go on."""


@dataclass
class _Session:
    """One control connection: the channel, this side's conversation, the services."""

    channel: Channel
    conversation: Conversation
    registry: Registry
    limits: Limits
    pickle_protocol: int = pickle.HIGHEST_PROTOCOL
    peer_pid: int | None = None

    async def send(self, message: Message, fds: list[int] | None = None) -> None:
        self.conversation.send(message)
        await self.channel.send(message, fds or ())

    async def receive(self, timeout: float | None) -> Message:
        message = await self.channel.receive(timeout)
        self.conversation.receive(message)
        return message


async def serve_channel(
    channel: Channel,
    registry: Registry,
    *,
    limits: Limits = Limits(),
    secret: bytes | None = None,
    admission: Admission = Admission(),
) -> None:
    """Hold the conversation with one recipient until it says BYE or leaves.

    Every service this connection takes is committed or rolled back before
    this returns or raises.

    Args:
        channel: the control connection.
        registry: the services published here.
        limits: frame size, descriptor count and step timeout limits.
        secret: the shared secret a recipient must prove it knows (mutual
            HMAC challenge-response); None for peer credentials only.
        admission: the users and groups accepted besides this process's
            own user and root (AF_UNIX channels).
    """
    session = _Session(channel, Conversation(Role.ORIGINATOR, limits), registry, limits)
    faults.checkpoint("originator.connected")
    try:
        peer = await _handshake(session, secret, admission)
    except AuthenticationError as exc:
        log.warning("refused a recipient: %s", exc)
        if session.conversation.state != "closed":
            await session.send(protocol.error(exc.code, str(exc)))
        return
    faults.checkpoint("originator.authenticated")
    session.pickle_protocol = min(pickle.HIGHEST_PROTOCOL, peer["pickle_protocol"])
    # The kernel's word for a local peer; the recipient's own (same host) over TCP.
    credentials = channel.peer if channel.local else None
    claimed = peer.get("pid")
    if credentials is not None:
        session.peer_pid = credentials.pid
    elif isinstance(claimed, int):
        session.peer_pid = claimed
    channel.limit_frames(limits.max_frame_size)
    log.info("recipient pid %s connected (%s)", peer["pid"], peer.get("implementation"))
    while True:
        message = await session.receive(None)
        if message.kind is Kind.BYE:
            return
        if message.kind is Kind.LIST:
            # "main" lets the recipient load the script before the pause.
            listing = {
                "services": registry.describe(),
                "main": main_reference(),
                "supervision": registry.supervision,
            }
            await session.send(Message(Kind.SERVICES, listing))
            faults.checkpoint("originator.listed")
        elif message.kind is Kind.TAKE:
            drain = message.body.get("drain")
            if not isinstance(drain, (int, float)) or isinstance(drain, bool) or drain < 0:
                drain = None
            largest = message.body.get("max_graph")
            if not isinstance(largest, int) or isinstance(largest, bool) or largest < 1:
                largest = None  # a recipient that does not say (an older one)
            if message.body.get("cross_host") is True:
                from .crossmove import CrossHostMove

                wait = message.body.get("in_doubt_wait")
                if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
                    wait = None
                move = CrossHostMove(
                    session, message.body["service"], drain, largest, in_doubt_wait=wait
                )
                await move.run()
            else:
                await _Move(session, message.body["service"], drain, largest).run()
        elif message.kind is Kind.CHECK:
            await _check(session, message.body["service"])
        elif message.kind is Kind.OUTCOME:
            from .crossmove import answer_outcome

            await answer_outcome(session, message.body)


async def _handshake(
    session: _Session, secret: bytes | None, admission: Admission
) -> dict[str, Any]:
    """Check the recipient's credentials, exchange HELLOs and, with a secret,
    run the mutual challenge-response. Returns the recipient's HELLO body.

    Raises:
        AuthenticationError: the recipient is refused; nothing was sent but
            HELLO, and nothing of it was unpickled.
    """
    channel, timeout = session.channel, session.limits.step_timeout
    if channel.local:
        check_peer(channel.peer, role="recipient", admission=admission)
    elif secret is None and not channel.encrypted:
        raise AuthenticationError(
            "a control channel over TCP needs a shared secret or TLS; refusing the recipient"
        )
    peer = protocol.check_hello(await session.receive(timeout), Role.RECIPIENT)
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "pickle_protocol": min(pickle.HIGHEST_PROTOCOL, peer["pickle_protocol"]),
        "python": sys.version,
        "implementation": sys.implementation.name,
    }
    # A recipient on another host cannot reach the descriptor transport: none is offered.
    fd_transport = not channel.local and peer.get("cross_host") is not True
    if secret is None:
        if fd_transport:
            # TLS has authenticated the recipient: say where descriptors go.
            info["fd_transport"] = await channel.offer_fd_transport()
        await session.send(protocol.hello(Role.ORIGINATOR, **info))
        return peer
    if peer.get("auth") != AUTH_SCHEME:
        raise AuthenticationError(
            "this migration server requires a shared secret: "
            "give the recipient the same --secret-file"
        )
    their_nonce = check_nonce(peer.get("nonce"), "recipient")
    our_nonce = new_nonce()
    our_proof = proof(secret, "originator", our_nonce, their_nonce)
    await session.send(
        protocol.hello(Role.ORIGINATOR, **info, auth=AUTH_SCHEME, nonce=our_nonce, proof=our_proof)
    )
    message = await session.receive(timeout)
    check_proof(secret, "recipient", their_nonce, our_nonce, message.body.get("proof"))
    # Only an authenticated recipient learns where descriptors go (same host only).
    offer = {"fd_transport": await channel.offer_fd_transport()} if fd_transport else {}
    await session.send(Message(Kind.AUTHED, offer))
    return peer


async def _check(session: _Session, name: str) -> None:
    """Answer CHECK: could ``name`` move now? Nothing is paused, whatever its state."""
    try:
        service = session.registry.get(name)
    except NoSuchServiceError as exc:
        await session.send(protocol.error(exc.code, str(exc)))
        return
    problem = check_graph(service, name, session.pickle_protocol)
    if problem is not None:
        log.info("checked %r: cannot move: %s", name, problem)
    body = {
        "service": name,
        "ok": problem is None,
        "path": None if problem is None else problem.path,
        "error": None if problem is None else problem.error,
    }
    await session.send(Message(Kind.CHECKED, body))


class _Move:
    """One service in transit from this process, from TAKE to commit or rollback.

    :meth:`run` drives the steps; whatever happens, :meth:`_settle` leaves the
    service released (committed) or resumed and AVAILABLE (rolled back).
    """

    def __init__(
        self,
        session: _Session,
        name: str,
        drain: float | None = None,
        max_graph: int | None = None,
    ) -> None:
        self.session = session
        self.name = name
        # The largest graph the recipient accepts (its --max-frame-size), if it said.
        self.max_graph = max_graph
        self.sizes: list[int] = []
        # A partial move: how long what cannot move may drain here (None: all or nothing).
        self.drain = drain
        self.left = 0
        self.arbiter: Arbiter | None = None
        self.ahead = SocketsAhead(())
        self.quiesced = False
        self.committed = False
        # Why this side rolled back, if it did of its own accord (a late call).
        self.late: str | None = None
        # Why the move did not happen (for the one line that logs it).
        self.reason: str | None = None
        self.pause_ms: float | None = None

    async def run(self) -> None:
        try:
            service = self.session.registry.begin_transit(self.name)
        except (NoSuchServiceError, ServiceBusyError) as exc:
            log.info("refused to move %r: %s", self.name, exc)
            await self.session.send(protocol.error(exc.code, str(exc)))
            return
        faults.checkpoint("originator.take-received")
        # No cyclic collection until the move is over, either way: the work
        # before the pause allocates enough to set off a full collection, which
        # with thousands of connections holds the loop longer than any slice of
        # that work (16 ms at 10,000), and the pause would pay for one too. The
        # collection owed runs after the release, or as the service resumes.
        with gc_paused():
            try:
                if await self._send_ahead(service) and await self._send_graph(service):
                    await self._await_decision()
            except TakeoverError as exc:
                self.reason = self.reason or str(exc)
                raise
            finally:
                self._settle(service)

    async def _refuse(self, code: str, text: str) -> bool:
        """Tell the recipient this move will not happen; False, for the caller to return."""
        self.reason = text
        await self.session.send(protocol.error(code, text))
        return False

    async def _send_ahead(self, service: Service) -> bool:
        """The dry run, then, while the service still runs: the arbiter and the
        sockets the dry run found, until the recipient says AHEAD_READY.

        False if the move is refused (nothing was paused).
        """
        session, name = self.session, self.name
        # Over TCP, the recipient connects the descriptor socket before TAKE.
        await session.channel.accept_fd_transport(session.limits.step_timeout)
        # The dry run: nothing is paused until the graph is known to pickle.
        found: list[socket.socket] = []
        problem = await self._dry_run(service, found)
        if problem is not None:
            log.warning("cannot move %r, left running: %s", name, problem)
            text = problem.explain(name)
            if self.drain is None and _connection_index(problem.path, name) is not None:
                text += f"; {DRAIN_HINT}"
            return await self._refuse(SerializationError.code, text)
        too_big = self._too_big(self.sizes[-1] if self.sizes else 0)
        if too_big is not None:
            log.warning("cannot move %r, left running: %s", name, too_big)
            return await self._refuse("limit", too_big + "; nothing was paused")
        twins = getattr(service, "takeover_twins", None)
        twin_kind = getattr(service, "takeover_twin_kind", None)
        self.ahead = ahead = SocketsAhead((), twins() if twins is not None else None, twin_kind)
        # Slots for a few thousand sockets at a time, the service running in between.
        for start in range(0, len(found), AHEAD_SLOTS_PER_TURN):
            if start:
                await session.channel.pass_turn()
            ahead.add(found[start : start + AHEAD_SLOTS_PER_TURN])
        refusal = session.conversation.fd_limit_refusal(len(ahead.sockets) + 1)
        if refusal is not None:
            return await self._refuse("limit", refusal)
        self.arbiter = Arbiter.create()
        arbiter = {"count": 1, "arbiter": True, "ahead": len(ahead.sockets)}
        await session.send(Message(Kind.FDS, arbiter), [self.arbiter.fd])
        try:
            for index, (batch, kinds) in enumerate(ahead.batches(SCM_MAX_FD), 1):
                body: dict[str, Any] = {"count": len(batch), "kinds": kinds}
                if ahead.twin_kind is not None:
                    body["twins"] = ahead.twin_kind
                await session.send(Message(Kind.FDS, body), batch)
                if not index % BATCHES_PER_TURN:
                    # Before the next batch reads its descriptors (see batches).
                    await session.channel.pass_turn()
        finally:
            ahead.close_fillers()
        faults.checkpoint("originator.fds-sent-ahead")
        # The recipient has built them (and registered, and twinned) when it
        # says AHEAD_READY: only then is the service paused, so that none of
        # that work waits inside the pause.
        ready = await session.receive(session.limits.step_timeout)
        if ready.kind is Kind.BYE:
            raise ChannelClosedError(f"the recipient ended the conversation while taking {name!r}")
        faults.checkpoint("originator.ahead-ready-received")
        return True

    async def _dry_run(self, service: Service, found: list[socket.socket]) -> Unpicklable | None:
        """Pickle the service as the move would; a partial move first leaves
        behind each connection in the way (by its kind, then as the dry run
        finds them), until the rest pickles."""
        name, protocol = self.name, self.session.pickle_protocol
        drain = self.drain
        if drain is None:
            drain = getattr(service, "takeover_drain_default", None)
        begin = getattr(service, "takeover_begin_drain", None)
        if drain is None or begin is None:
            return await self._check(service, found)
        self.drain = drain
        begin(drain)
        first = True
        while True:
            if first:
                problem = await self._check(service, found)
                first = False
            else:
                problem = check_graph(service, name, protocol, found, self.sizes)
            index = None if problem is None else _connection_index(problem.path, name)
            if index is None or problem is None:
                break
            if not service.takeover_leave(index, problem.error):  # type: ignore[attr-defined]
                break
            del found[:]
        self.left = service.takeover_left()  # type: ignore[attr-defined]
        return problem

    async def _check(self, service: Service, found: list[socket.socket]) -> Unpicklable | None:
        """:func:`check_graph`, spread over turns of the event loop if the
        service names its parts (``takeover_parts()``, see :class:`SpreadCheck`)."""
        name, protocol = self.name, self.session.pickle_protocol
        parts = getattr(service, "takeover_parts", None)
        if parts is None:
            return check_graph(service, name, protocol, found, self.sizes)
        check = SpreadCheck(service, parts(), protocol, parts)
        while not check.step(DRY_RUN_TURN):
            await self.session.channel.pass_turn()
        if check.failed is not None:
            # Where and why, from the whole graph in one go (or it pickles now).
            log.debug("the spread dry run of %r failed (%s): checking it whole", name, check.failed)
            return check_graph(service, name, protocol, found, self.sizes)
        found.extend(check.sockets)
        self.sizes.append(check.size)
        return None

    async def _send_graph(self, service: Service) -> bool:
        """Quiesce the service, pickle it, send the graph and the descriptors
        found since the dry run. False if the move is refused."""
        session, name = self.session, self.name
        # No cyclic collection from quiesce until the graph is sent: the
        # collector would otherwise run over the pickled objects inside the
        # pause (it runs later, while the recipient rebuilds them).
        with gc_paused():
            # The pause starts when quiescing starts: the first connection stops here.
            quiesced_at = time.monotonic()
            # Set first: a quiesce that fails halfway is undone by resume() too.
            self.quiesced = True
            try:
                service.quiesce()
            except Exception as exc:
                text = (
                    f"service {name!r} could not be paused: {type(exc).__name__}: {exc} "
                    "(raised by its takeover_quiesce hook?); it goes on here"
                )
                log.exception("%s", text)
                return await self._refuse(TakeoverError.code, text)
            faults.checkpoint("originator.quiesced")
            try:
                dumped = self._pickle(service)
            except TakeoverError as exc:
                # It pickled before quiescing: a takeover_quiesce hook changed that.
                problem = check_graph(service, name, session.pickle_protocol)
                text = str(exc) if problem is None else problem.explain(name)
                log.warning("cannot move %r after quiescing it: %s", name, text)
                return await self._refuse(exc.code, text)
            left = getattr(service, "takeover_left", None)
            if left is not None:
                # Quiescing left behind the connections accepted since the dry
                # run that cannot move either.
                self.left = left()
            # From here a change to a connection would not be carried: see late_call.
            seal = getattr(service, "takeover_seal", None)
            if seal is not None:
                seal(self.late_call)
            # Sockets that appeared since the dry run travel after the graph.
            fds = [s.fileno() for s in dumped.sockets[len(self.ahead.sockets) :]]
            refusal = session.conversation.fd_limit_refusal(len(dumped.sockets) + 1)
            if refusal is None:
                # (Grown since the dry run: the recipient would break the channel on it.)
                refusal = self._too_big(len(dumped.blob))
            if refusal is not None:
                return await self._refuse("limit", refusal)
            meta = self._graph_meta(
                dumped,
                quiesced_at,
                fds=len(fds),
                ahead=len(self.ahead.sockets),
                twins=self.ahead.twin_kind is not None,
            )
            await session.send(Message(Kind.GRAPH, meta, dumped.blob))
            faults.checkpoint("originator.graph-sent")
            for batch in batches(fds):
                await session.send(Message(Kind.FDS, {"count": len(batch)}), batch)
            faults.checkpoint("originator.fds-sent")
        return True

    def _graph_meta(self, dumped: Dumped, quiesced_at: float, **how: Any) -> dict[str, Any]:
        """The body of GRAPH: what every move says of its graph, and ``how`` it travels."""
        return {
            "service": self.name,
            **how,
            "size": len(dumped.blob),
            "main": main_reference(),
            "quiesced_at": quiesced_at,
            "pickle_protocol": self.session.pickle_protocol,
            "originator_pid": os.getpid(),
            "draining": self.left,
            "drain_seconds": self.drain if self.left else None,
        }

    def _too_big(self, size: int) -> str | None:
        """Why a graph of ``size`` bytes cannot go to this recipient (None: it can)."""
        if self.max_graph is None or size <= self.max_graph:
            return None
        return (
            f"the graph of {self.name!r} is {size:,} bytes, more than the recipient accepts "
            f"({self.max_graph:,}, its --max-frame-size): take with a larger --max-frame-size"
        )

    def _pickle(self, service: Service) -> Dumped:
        """The quiesced service's graph, the sockets sent ahead by slot."""
        ahead = self.ahead
        # A connection closed while the sockets went ahead keeps its slot, unused.
        ahead.forget_closed()
        if ahead.twin_kind is not None:
            # Twins that now carry more than their socket travel in full.
            ahead.unfit(getattr(service, "takeover_unfit", list)())
        return dumps(service, self.session.pickle_protocol, ahead)

    def late_call(self, call: str) -> bool:
        """Code outside the sealed service makes ``call`` (say, "write() to the
        connection from 10.0.0.7:51234"); may it go ahead?

        True: this process serves the service still (the move is rolled back
        now, if it was not already), and the call takes effect when it
        resumes. False: the recipient has committed; the runtime fails the
        call as on a lost connection. Called synchronously by the runtime,
        inside the call.
        """
        assert self.arbiter is not None  # sealed after the arbiter went out
        if self.arbiter.fd < 0:
            return not self.committed
        if self.late is None:
            where = _caller()
            note = (
                f"{call}{f', at {where},' if where else ''} after the graph was pickled: "
                "that change would have been lost with this process's copy, so the move "
                "was rolled back and the change takes effect here. Stop such writers in "
                "takeover_quiesce() and restart them in takeover_resume() and "
                "takeover_adopted(), or take again once they have stopped"
            )
            if self.arbiter.decide(ROLLED_BACK, note) == COMMITTED:
                return False
            self.late = note
            log.warning("move of %r: %s", self.name, note)
        return True

    async def _await_decision(self) -> None:
        """Wait for the recipient's answer; the arbiter decides, not the frame."""
        assert self.arbiter is not None
        name = self.name
        broken: TakeoverError | None = None
        reply: Message | None = None
        try:
            reply = await self.session.receive(self.session.limits.step_timeout)
            if reply.kind is Kind.BYE:
                raise ChannelClosedError(f"the recipient ended the conversation taking {name!r}")
        except TakeoverError as exc:
            # Timeout, closed or garbled channel.
            broken, reply = exc, None
        # Recording ROLLED_BACK fails if the recipient has recorded COMMITTED
        # (it does before it starts).
        if broken is not None:
            why = str(broken)
        else:
            why = f"the recipient answered {reply.kind.name if reply is not None else 'nothing'}"
        self.committed = self.arbiter.decide(ROLLED_BACK, why) == COMMITTED
        if broken is not None:
            if not self.committed:
                raise broken
            log.warning(
                "service %r: no COMMITTED (%s), but the recipient committed: released here",
                name,
                broken,
            )
        elif reply is not None and reply.kind is Kind.REFUSED:
            # The conversation goes on: the recipient may ask for another service.
            reason = str(reply.body.get("reason", "no reason given"))
            if self.committed:
                log.error("the recipient refused %r after committing it: released here", name)
            else:
                self.reason = self.late or f"the recipient refused it: {reason}"
        elif reply is not None and reply.kind is Kind.COMMITTED:
            pause = reply.body.get("pause_ms")
            self.pause_ms = round(pause, 3) if isinstance(pause, (int, float)) else None
        if not self.committed and (reply is None or reply.kind is not Kind.REFUSED):
            raise ProtocolError(
                f"the recipient answered COMMITTED for {name!r} without recording it "
                "in the move's arbiter; rolled back"
            )
        if self.committed:
            faults.checkpoint("originator.committed-received")

    def _settle(self, service: Service) -> None:
        """Release the service (committed) or resume it (rolled back), and close the arbiter."""
        registry, name = self.session.registry, self.name
        connections = int(service.describe().get("connections", 0) or 0) - self.left
        arbiter = self.arbiter
        if arbiter is not None:
            if not self.committed:
                # Rolling back: make sure the recipient can no longer commit.
                decision = arbiter.decide(ROLLED_BACK, "the originator gave up on the move")
                self.committed = decision == COMMITTED
            arbiter.close()
        if not self.committed:
            # A partial move that did not happen leaves nothing behind.
            keep_all = getattr(service, "takeover_keep_all", None)
            if keep_all is not None:
                keep_all()
        if self.committed:
            service.release()
            registry.successor_pid = self.session.peer_pid
            registry.withdraw(name)
        elif self.quiesced:
            service.resume()
            registry.end_transit(name)
        else:
            registry.end_transit(name)
        self._log(connections)

    def _log(self, connections: int) -> None:
        """The move's one line."""
        name, peer = self.name, self.session.peer_pid
        if self.committed:
            pause = f", paused {self.pause_ms:.2f} ms" if self.pause_ms is not None else ""
            if self.left:
                pause = f" ({self.left} draining here for up to {self.drain:g} s){pause}"
            facts = move_event(
                "moved",
                name,
                peer_pid=peer,
                connections=connections,
                pause_ms=self.pause_ms,
                draining=self.left,
            )
            MOVES.info(
                "moved %r to pid %s: %d connections%s",
                name,
                peer,
                connections,
                pause,
                extra={"move": facts},
            )
            return
        where = "it goes on here" if self.quiesced else "nothing was paused"
        reason = self.late or self.reason or "the move was abandoned"
        facts = move_event("not-moved", name, peer_pid=peer, connections=connections, reason=reason)
        MOVES.warning(
            "did not move %r to pid %s (%s): %s", name, peer, where, reason, extra={"move": facts}
        )


def _caller() -> str:
    """Where the innermost caller outside takeover and the event loop's own
    modules is, as "FILE:LINE in FUNCTION" ('' if there is none)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if not module.startswith(("takeover.", "asyncio.", "twisted.", "uvloop")):
            code = frame.f_code
            return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return ""


def _connection_index(path: str, service: str) -> int | None:
    """The index of the connection a dry-run ``path`` leads into (None: not in one)."""
    found = re.match(rf"{re.escape(service)}\.(?:connections|_protocols)\[(\d+)\]", path)
    return int(found[1]) if found else None
