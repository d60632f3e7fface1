"""The originator's half of a migration: serve one control connection.

This is the "janitor" of the 2004 paper: every service handed to a recipient
is either committed (released here, forgotten by the registry) or rolled back
(resumed here, AVAILABLE again), whatever the recipient does. The rules:

* nothing is quiesced before the recipient has been authenticated and has
  asked for a service by name;
* the commit point is the move's arbiter (``_arbiter.py``), a byte both
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

The runtime supplies the channel; this module never touches a socket.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import time
from typing import Any

from . import _faults, _protocol
from ._arbiter import COMMITTED, ROLLED_BACK, Arbiter
from ._auth import AUTH_SCHEME, check_nonce, check_peer, check_proof, new_nonce, proof
from ._channel import Channel
from ._errors import (
    AuthenticationError,
    NoSuchServiceError,
    ProtocolError,
    SerializationError,
    ServiceBusyError,
    TakeoverError,
)
from ._fds import SCM_MAX_FD, batches
from ._graphpath import check_graph
from ._protocol import Conversation, Kind, Limits, Message, Role
from ._serialize import EarlySockets, dumps, gc_paused, main_reference
from .registry import Registry

log = logging.getLogger("takeover.originator")


async def serve_channel(
    channel: Channel,
    registry: Registry,
    *,
    limits: Limits = Limits(),
    secret: bytes | None = None,
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
    """
    conversation = Conversation(Role.ORIGINATOR)

    async def send(message: Message, fds: list[int] | None = None) -> None:
        conversation.send(message)
        await channel.send(message, fds or ())

    _faults.checkpoint("originator.connected")
    try:
        peer = await _handshake(channel, conversation, send, limits, secret)
    except AuthenticationError as exc:
        log.warning("refused a recipient: %s", exc)
        if conversation.state != "closed":
            await send(_protocol.error(exc.code, str(exc)))
        return
    _faults.checkpoint("originator.authenticated")
    pickle_protocol = min(pickle.HIGHEST_PROTOCOL, peer["pickle_protocol"])
    channel.limit_frames(limits.max_frame_size)
    log.info("recipient pid %s connected (%s)", peer["pid"], peer.get("implementation"))
    while True:
        message = await channel.receive(None)
        conversation.receive(message)
        if message.kind is Kind.BYE:
            return
        if message.kind is Kind.LIST:
            # "main" lets the recipient load the script before the pause.
            listing = {"services": registry.describe(), "main": main_reference()}
            await send(Message(Kind.SERVICES, listing))
            _faults.checkpoint("originator.listed")
        elif message.kind is Kind.TAKE:
            name = message.body.get("service")
            if not isinstance(name, str):
                raise ProtocolError(f"TAKE names no service: {message.body!r}")
            await _move(channel, conversation, registry, name, pickle_protocol, limits, send)
        elif message.kind is Kind.CHECK:
            name = message.body.get("service")
            if not isinstance(name, str):
                raise ProtocolError(f"CHECK names no service: {message.body!r}")
            await _check(registry, name, pickle_protocol, send)


async def _handshake(
    channel: Channel,
    conversation: Conversation,
    send: Any,
    limits: Limits,
    secret: bytes | None,
) -> dict[str, Any]:
    """Check the recipient's credentials, exchange HELLOs and, with a secret,
    run the mutual challenge-response. Returns the recipient's HELLO body.

    Raises:
        AuthenticationError: the recipient is refused; nothing was sent but
            HELLO, and nothing of it was unpickled.
    """
    if channel.local:
        check_peer(channel.peer, role="recipient")
    elif secret is None and not channel.encrypted:
        raise AuthenticationError(
            "a control channel over TCP needs a shared secret or TLS; refusing the recipient"
        )
    message = await channel.receive(limits.step_timeout)
    conversation.receive(message)
    peer = _protocol.check_hello(message, Role.RECIPIENT)
    pickle_protocol = min(pickle.HIGHEST_PROTOCOL, peer["pickle_protocol"])
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "pickle_protocol": pickle_protocol,
        "python": sys.version,
        "implementation": sys.implementation.name,
    }
    if secret is None:
        if not channel.local:
            # TLS has authenticated the recipient: say where descriptors go.
            info["fd_transport"] = await channel.offer_fd_transport()
        await send(_protocol.hello(Role.ORIGINATOR, **info))
        return peer
    if peer.get("auth") != AUTH_SCHEME:
        raise AuthenticationError(
            "this migration server requires a shared secret: "
            "give the recipient the same --secret-file"
        )
    their_nonce = check_nonce(peer.get("nonce"), "recipient")
    our_nonce = new_nonce()
    await send(
        _protocol.hello(
            Role.ORIGINATOR,
            **info,
            auth=AUTH_SCHEME,
            nonce=our_nonce,
            proof=proof(secret, "originator", our_nonce, their_nonce),
        )
    )
    message = await channel.receive(limits.step_timeout)
    conversation.receive(message)
    check_proof(secret, "recipient", their_nonce, our_nonce, message.body.get("proof"))
    # Only an authenticated recipient learns where descriptors go (same host only).
    offer = {} if channel.local else {"fd_transport": await channel.offer_fd_transport()}
    await send(Message(Kind.AUTHED, offer))
    return peer


async def _check(registry: Registry, name: str, pickle_protocol: int, send: Any) -> None:
    """Answer CHECK: could ``name`` move now? Nothing is paused, whatever its state."""
    try:
        service = registry.get(name)
    except NoSuchServiceError as exc:
        await send(_protocol.error(exc.code, str(exc)))
        return
    problem = check_graph(service, name, pickle_protocol)
    if problem is not None:
        log.info("checked %r: cannot move: %s", name, problem)
    body = {
        "service": name,
        "ok": problem is None,
        "path": None if problem is None else problem.path,
        "error": None if problem is None else problem.error,
    }
    await send(Message(Kind.CHECKED, body))


def _over_fd_limit(name: str, count: int, limits: Limits) -> Message | None:
    """The ERROR refusing a move of ``count`` descriptors, if over the limit."""
    if count <= limits.max_fds:
        return None
    text = f"service {name!r} holds {count} descriptors; the limit is {limits.max_fds}"
    return _protocol.error("limit", text)


async def _move(
    channel: Channel,
    conversation: Conversation,
    registry: Registry,
    name: str,
    pickle_protocol: int,
    limits: Limits,
    send: Any,
) -> None:
    try:
        service = registry.begin_transit(name)
    except (NoSuchServiceError, ServiceBusyError) as exc:
        log.info("refused to move %r: %s", name, exc)
        await send(_protocol.error(exc.code, str(exc)))
        return
    _faults.checkpoint("originator.take-received")
    quiesced = committed = False
    arbiter: Arbiter | None = None
    try:
        # Over TCP, the recipient connects the descriptor socket before TAKE.
        await channel.accept_fd_transport(limits.step_timeout)
        # The dry run: nothing is paused until the graph is known to pickle.
        found: list[socket.socket] = []
        problem = check_graph(service, name, pickle_protocol, found)
        if problem is not None:
            log.warning("cannot move %r, left running: %s", name, problem)
            await send(_protocol.error(SerializationError.code, problem.explain(name)))
            return
        # Sent ahead, while the service still runs: the arbiter, and the
        # sockets the dry run found, so that the recipient builds and
        # registers them outside the pause.
        twins = getattr(service, "takeover_twins", None)
        early = EarlySockets(
            found,
            twins() if twins is not None else None,
            getattr(service, "takeover_twin_kind", None),
        )
        too_many = _over_fd_limit(name, len(early.sockets) + 1, limits)
        if too_many is not None:
            await send(too_many)
            return
        arbiter = Arbiter.create()
        await send(
            Message(Kind.FDS, {"count": 1, "arbiter": True, "ahead": len(early.sockets)}),
            [arbiter.fd],
        )
        for batch, kinds in early.batches(SCM_MAX_FD):
            body: dict[str, Any] = {"count": len(batch), "kinds": kinds}
            if early.twin_kind is not None:
                body["twins"] = early.twin_kind
            await send(Message(Kind.FDS, body), batch)
        _faults.checkpoint("originator.fds-sent-ahead")
        # The recipient has built them (and registered, and twinned) when it
        # says STAGED: only then is the service paused, so that none of that
        # work waits inside the pause.
        staged = await channel.receive(limits.step_timeout)
        conversation.receive(staged)
        if staged.body.get("count") != len(early.sockets):
            raise ProtocolError(
                f"the recipient staged {staged.body.get('count')!r} sockets, "
                f"{len(early.sockets)} were sent ahead"
            )
        _faults.checkpoint("originator.staged-received")
        # No cyclic collection from quiesce until the graph is sent: the
        # collector would otherwise run over the pickled objects inside the
        # pause (it runs later, while the recipient rebuilds them).
        with gc_paused():
            # The pause starts when quiescing starts: the first connection stops here.
            quiesced_at = time.monotonic()
            # Set first: a quiesce that fails halfway is undone by resume() too.
            quiesced = True
            try:
                service.quiesce()
            except Exception as exc:
                text = (
                    f"service {name!r} could not be paused: {type(exc).__name__}: {exc} "
                    "(raised by its takeover_quiesce hook?); it goes on here"
                )
                log.exception("%s", text)
                await send(_protocol.error(TakeoverError.code, text))
                return
            _faults.checkpoint("originator.quiesced")
            # A connection closed while the sockets went ahead keeps its slot, unused.
            early.forget_closed()
            if early.twin_kind is not None:
                # Twins that now carry more than their socket travel in full.
                early.unfit(getattr(service, "takeover_unfit", list)())
            try:
                dumped = dumps(service, pickle_protocol, early)
            except TakeoverError as exc:
                # It pickled before quiescing: a takeover_quiesce hook changed that.
                problem = check_graph(service, name, pickle_protocol)
                text = str(exc) if problem is None else problem.explain(name)
                log.warning("cannot move %r after quiescing it: %s", name, text)
                await send(_protocol.error(exc.code, text))
                return
            # Sockets that appeared since the dry run travel after the graph.
            fds = [s.fileno() for s in dumped.sockets[len(early.sockets) :]]
            too_many = _over_fd_limit(name, len(early.sockets) + len(fds) + 1, limits)
            if too_many is not None:
                await send(too_many)
                return
            meta = {
                "service": name,
                "fds": len(fds),
                "ahead": len(early.sockets),
                "twins": early.twin_kind is not None,
                "size": len(dumped.blob),
                "main": main_reference(),
                "quiesced_at": quiesced_at,
                "pickle_protocol": pickle_protocol,
                "originator_pid": os.getpid(),
                "arbiter": "ahead",
            }
            await send(Message(Kind.GRAPH, meta, dumped.blob))
            _faults.checkpoint("originator.graph-sent")
            for batch in batches(fds):
                await send(Message(Kind.FDS, {"count": len(batch)}), batch)
            _faults.checkpoint("originator.fds-sent")
        broken: TakeoverError | None = None
        reply: Message | None = None
        try:
            reply = await channel.receive(limits.step_timeout)
            conversation.receive(reply)
        except TakeoverError as exc:
            # Timeout, closed or garbled channel.
            broken, reply = exc, None
        # The arbiter decides, not the frame: recording ROLLED_BACK fails if
        # the recipient has recorded COMMITTED (it does before it starts).
        committed = arbiter.decide(ROLLED_BACK) == COMMITTED
        if broken is not None:
            if not committed:
                raise broken
            log.warning(
                "service %r: no COMMITTED (%s), but the recipient committed: released here",
                name,
                broken,
            )
        elif reply is not None and reply.kind is Kind.REFUSED:
            # The conversation goes on: the recipient may ask for another service.
            reason = str(reply.body.get("reason", "no reason given"))
            if committed:
                log.error("the recipient refused %r after committing it: released here", name)
            else:
                log.warning("the recipient refused %r, rolling back: %s", name, reason)
        elif not committed:
            raise ProtocolError(
                f"the recipient answered COMMITTED for {name!r} without recording it "
                "in the move's arbiter; rolled back"
            )
        if committed:
            _faults.checkpoint("originator.committed-received")
    except TakeoverError as exc:
        log.warning("move of %r rolled back: %s", name, exc)
        raise
    finally:
        if not committed and arbiter is not None:
            # Rolling back: make sure the recipient can no longer commit.
            committed = arbiter.decide(ROLLED_BACK) == COMMITTED
        if arbiter is not None:
            arbiter.close()
        if committed:
            service.release()
            registry.withdraw(name)
            log.info("service %r committed to the recipient and released here", name)
        elif quiesced:
            service.resume()
            registry.end_transit(name)
            log.info("service %r resumed here", name)
        else:
            registry.end_transit(name)
