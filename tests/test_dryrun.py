"""The dry run: what does not pickle is named by path before anything pauses; `takeover check`."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from harness.procs import APPS, PYTHON, Proc, list_fds, process_state, takeover
from harness.waiting import wait_until, wait_until_async
from takeover import NoSuchServiceError, ProtocolError, SerializationError, ServiceState
from takeover._core.graphpath import ADVICE, Unpicklable, check_graph, find_unpicklable
from takeover._core.originator import DRAIN_HINT
from takeover._core.protocol import Conversation, FrameDecoder, Kind, Message, Role, error, hello
from takeover.asyncio import (
    MigratableServer,
    MigratableTransport,
    MigrationServer,
    connect,
    start_server,
)

ERROR_PREFIX = "takeover: error:"
LAMBDA = "cannot pickle 'function' object (a lambda)"


def cannot_pickle(name: str) -> str:
    """The pickler's own words for an object of the type ``name`` (``_thread.lock``)."""
    if sys.implementation.name == "pypy":
        # PyPy's pickler is pickle.py's: it looks the type up as a global and fails there.
        where = name if "." in name else f"builtins.{name}"
        return f"Can't pickle <class '{name}'>: it's not found as {where}"
    return f"cannot pickle '{name}' object"


class Node:
    """A plain object (module level, so it pickles by reference)."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


class Slotted:
    """An object with ``__slots__`` and no ``__dict__``."""

    __slots__ = ("first", "second")

    def __init__(self, first: Any, second: Any) -> None:
        self.first = first
        self.second = second


class Guarded:
    """Keeps a lock, but leaves it out of its pickled state; ``shown`` travels as ``visible``."""

    def __init__(self, shown: Any) -> None:
        self.lock = threading.Lock()
        self.shown = shown

    def __getstate__(self) -> dict[str, Any]:
        return {"visible": self.shown}


class Room:
    """What every protocol of a chat-like service shares."""

    def __init__(self) -> None:
        self.members: list[Member] = []


class Member(asyncio.Protocol):
    """A protocol that joins its room."""

    def __init__(self, room: Room) -> None:
        self.room = room
        room.members.append(self)


class RoomFactory:
    """A protocol factory that is an instance holding the room."""

    def __init__(self) -> None:
        self.room = Room()

    def __call__(self) -> Member:
        return Member(self.room)


class Plain(asyncio.Protocol):
    """An echo protocol that counts how often it was quiesced."""

    quiesced = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def takeover_quiesce(self) -> None:
        type(self).quiesced += 1


def path_of(graph: Any, root: str = "svc") -> str:
    """The path the dry run reports for ``graph`` (which must not pickle)."""
    found = check_graph(graph, root)
    assert isinstance(found, Unpicklable), graph
    return str(found)


async def _coroutine() -> None:
    pass


def _generator() -> Iterator[int]:
    yield 1


# -- the path finder, in process ----------------------------------------------


def test_lambda_named_by_attribute_path():
    """A lambda deep in plain objects is named by its attribute path and called a lambda."""
    graph = Node(protocol=Node(on_done=lambda: None))
    assert path_of(graph) == f"svc.protocol.on_done: {LAMBDA}"


def test_coroutine_named_by_path():
    """A coroutine object is named by path."""
    coroutine = _coroutine()
    try:
        assert path_of(Node(task=Node(body=coroutine))) == (
            f"svc.task.body: {cannot_pickle('coroutine')}"
        )
    finally:
        coroutine.close()


def test_generator_named_by_path():
    """A generator object is named by path."""
    assert path_of(Node(lines=_generator())) == f"svc.lines: {cannot_pickle('generator')}"


def test_thread_lock_named_by_path():
    """A threading.Lock is named by path."""
    assert path_of(Node(guard=threading.Lock())) == (f"svc.guard: {cannot_pickle('_thread.lock')}")


def test_open_tls_socket_named_by_path():
    """An open TLS socket is named by path, with the graph pickler's own reason."""
    a, b = socket.socketpair()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls = context.wrap_socket(a, server_hostname="peer", do_handshake_on_connect=False)
    try:
        found = check_graph(Node(conn=Node(sock=tls)), "svc")
        assert found is not None
        assert found.path == "svc.conn.sock"
        assert found.error.startswith("cannot migrate TLS socket <ssl.SSLSocket")
        assert "TLS sessions cannot move yet" in found.error
    finally:
        tls.close()
        b.close()


def test_nested_lists_are_indexed():
    """Items of nested lists and tuples are named by index."""
    graph = Node(rows=[[1, 2], (3, [4, 5, threading.Lock()])])
    assert path_of(graph).startswith("svc.rows[1][1][2]: ")


def test_dict_values_are_named_by_key_repr():
    """A dict value is named by its key's repr, strings and others alike."""
    assert path_of(Node(handlers={"close": lambda: None})) == (f"svc.handlers['close']: {LAMBDA}")
    assert path_of(Node(by_id={7: Node(cb=lambda: None)})) == f"svc.by_id[7].cb: {LAMBDA}"


def test_unpicklable_dict_key_is_named_by_position():
    """A dict key that does not pickle is named by its position among the keys."""
    lock = threading.Lock()
    assert path_of({"a": 1, lock: 2}) == f"svc<key 1>: {cannot_pickle('_thread.lock')}"


def test_set_items_are_named_by_position():
    """An item of a set that does not pickle is named as an item of that set."""
    found = check_graph(Node(tags={threading.Lock()}), "svc")
    assert found == Unpicklable("svc.tags<item 0>", cannot_pickle("_thread.lock"))


def test_cycles_are_walked_once_and_the_culprit_still_found():
    """A graph full of cycles terminates and names the culprit by its first path."""
    a = Node()
    b = Node(back=a)
    a.me = a
    a.peers = [b, a, [a, b]]
    b.lock = threading.Lock()
    assert path_of(a) == f"svc.peers[0].lock: {cannot_pickle('_thread.lock')}"


def test_picklable_cyclic_graph_finds_nothing():
    """A cyclic graph that pickles: the dry run says so and the walk finds nothing."""
    a = Node()
    a.me = a
    a.items = [a, {"a": a}]
    assert check_graph(a, "svc") is None
    assert find_unpicklable(a, "svc") is None


def test_getstate_is_respected():
    """What __getstate__ leaves out is not reported; the path follows its keys, not __dict__."""
    assert check_graph(Node(g=Guarded(shown=1)), "svc") is None
    graph = Node(g=Guarded(shown=[lambda: None]))
    assert path_of(graph) == f"svc.g.visible[0]: {LAMBDA}"


def test_slots_are_named_like_attributes():
    """A slot's value is named like an attribute."""
    graph = Node(pair=Slotted(1, Node(cb=lambda: None)))
    assert path_of(graph) == f"svc.pair.second.cb: {LAMBDA}"


def test_partial_and_bound_method_are_entered():
    """functools.partial shows .func/.args/.keywords; a bound method shows .__self__."""
    holder = Node(lock=threading.Lock())
    assert path_of(Node(cb=functools.partial(print, 1, holder))) == (
        f"svc.cb.args[1].lock: {cannot_pickle('_thread.lock')}"
    )
    assert path_of(Node(cb=functools.partial(lambda: None))) == f"svc.cb.func: {LAMBDA}"
    assert path_of(Node(cb=Node(lock=threading.Lock()).__init__)) == (
        f"svc.cb.__self__.lock: {cannot_pickle('_thread.lock')}"
    )


def test_instance_of_a_local_class_is_named():
    """An instance of a class defined inside a function is named, with why."""

    class Local:
        pass

    found = check_graph(Node(inner=[Local()]), "svc")
    assert found is not None
    assert found.path == "svc.inner[0]"
    assert "Local" in found.error
    assert "defined inside a function" in found.error


def test_depth_is_bounded():
    """Below max_depth the walk stops; check_graph still reports the failure at the root."""
    chain = Node(next=None, cb=lambda: None)
    for _ in range(50):
        chain = Node(next=chain)
    assert find_unpicklable(chain, "svc", max_depth=10) is None
    found = find_unpicklable(chain, "svc")
    assert found is not None
    assert found.path == "svc" + ".next" * 50 + ".cb"


def test_sockets_are_slots_and_no_fd_is_touched():
    """A graph of sockets passes the dry run and every descriptor stays as it was."""
    a, b = socket.socketpair()
    try:
        before = list_fds(os.getpid())
        assert check_graph(Node(pair=[a, b]), "svc") is None
        assert list_fds(os.getpid()) == before
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    finally:
        a.close()
        b.close()


def test_explanation_says_what_to_do():
    """The message an originator sends names the service, the path, the error and the fix."""
    text = Unpicklable("echo.connections[3].protocol.on_done", LAMBDA).explain("echo")
    assert text == (
        f"service 'echo' cannot move: echo.connections[3].protocol.on_done: {LAMBDA}; {ADVICE}"
    )
    assert "__getstate__" in ADVICE
    assert "takeover_quiesce" in ADVICE


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop that is never run (the servers below only need one to refer to)."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def build_server(
    loop: asyncio.AbstractEventLoop, factory: Any, name: str, connections: int
) -> tuple[MigratableServer, list[socket.socket]]:
    """A MigratableServer holding ``connections`` transports over socketpairs (never started)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = MigratableServer(listener, factory, name, loop)
    opened = [listener]
    for _ in range(connections):
        ours, theirs = socket.socketpair()
        opened += [ours, theirs]
        protocol = factory()
        transport = MigratableTransport(ours, protocol, server)
        protocol.transport = transport
        server._transports[transport] = None
    return server, opened


def test_server_path_reads_connections_and_protocol(loop):
    """In a MigratableServer the path goes through connections[N].protocol; the loop is skipped."""
    server, opened = build_server(loop, Plain, "echo", 4)
    try:
        assert check_graph(server, "echo") is None
        server.connections[3].get_protocol().on_done = lambda: None  # type: ignore[attr-defined]
        assert path_of(server, "echo") == f"echo.connections[3].protocol.on_done: {LAMBDA}"
    finally:
        for sock in opened:
            sock.close()


def test_server_path_through_the_factory(loop):
    """A factory shared by every protocol is walked first, as pickle walks it."""
    server, opened = build_server(loop, RoomFactory(), "chat", 3)
    try:
        assert check_graph(server, "chat") is None
        server.connections[2].get_protocol().on_done = lambda: None  # type: ignore[attr-defined]
        assert path_of(server, "chat") == (
            f"chat.protocol_factory.room.members[2].on_done: {LAMBDA}"
        )
    finally:
        for sock in opened:
            sock.close()


# -- CHECK and CHECKED in the conversation --------------------------------------


def handshake() -> tuple[Conversation, Conversation]:
    """An originator's and a recipient's conversation, both idle after HELLOs."""
    originator, recipient = Conversation(Role.ORIGINATOR), Conversation(Role.RECIPIENT)
    talk(recipient, originator, hello(Role.RECIPIENT, pid=1, pickle_protocol=5, python="3"))
    talk(originator, recipient, hello(Role.ORIGINATOR, pid=2, pickle_protocol=5, python="3"))
    return originator, recipient


def talk(sender: Conversation, receiver: Conversation, message: Message) -> Message:
    """``sender`` frames ``message``; ``receiver`` decodes and validates it."""
    (received,) = FrameDecoder().feed(sender.send(message))
    receiver.receive(received)
    return received


def checked(ok: bool, path: str | None = None, error: str | None = None) -> Message:
    return Message(Kind.CHECKED, {"service": "echo", "ok": ok, "path": path, "error": error})


def test_check_then_checked_returns_both_sides_to_idle():
    """CHECK moves both sides to checking; CHECKED back to idle; the body round-trips."""
    originator, recipient = handshake()
    talk(recipient, originator, Message(Kind.CHECK, {"service": "echo"}))
    assert (originator.state, recipient.state) == ("checking", "checking")
    reply = talk(originator, recipient, checked(False, "echo.x", LAMBDA))
    assert reply.body == {"service": "echo", "ok": False, "path": "echo.x", "error": LAMBDA}
    assert (originator.state, recipient.state) == ("idle", "idle")
    talk(recipient, originator, Message(Kind.TAKE, {"service": "echo"}))
    assert (originator.state, recipient.state) == ("taking", "taking")


def test_error_answering_check_returns_to_idle():
    """ERROR (no such service) answering CHECK leaves the channel usable."""
    originator, recipient = handshake()
    talk(recipient, originator, Message(Kind.CHECK, {"service": "nosuch"}))
    talk(originator, recipient, error("no-such-service", "no service named 'nosuch'"))
    assert (originator.state, recipient.state) == ("idle", "idle")
    talk(recipient, originator, Message(Kind.CHECK, {"service": "echo"}))
    talk(originator, recipient, checked(True))
    assert (originator.state, recipient.state) == ("idle", "idle")


@pytest.mark.parametrize(
    ("state", "sender", "kind"),
    [
        ("idle", Role.ORIGINATOR, Kind.CHECKED),
        ("idle", Role.ORIGINATOR, Kind.CHECK),
        ("checking", Role.RECIPIENT, Kind.CHECK),
        ("checking", Role.RECIPIENT, Kind.TAKE),
        ("checking", Role.RECIPIENT, Kind.CHECKED),
        ("checking", Role.ORIGINATOR, Kind.GRAPH),
        ("taking", Role.RECIPIENT, Kind.CHECK),
        ("taking", Role.ORIGINATOR, Kind.CHECKED),
    ],
)
def test_check_out_of_turn_is_refused(state, sender, kind):
    """CHECK and CHECKED out of turn (or in the wrong direction) are refused, state unchanged."""
    originator, recipient = handshake()
    if state != "idle":
        opener = Kind.CHECK if state == "checking" else Kind.TAKE
        talk(recipient, originator, Message(opener, {"service": "echo"}))
    side = originator if sender is Role.ORIGINATOR else recipient
    with pytest.raises(ProtocolError, match=f"unexpected {kind.name} from the {sender.value}"):
        side.send(Message(kind, {"fds": 0}))
    assert side.state == state


# -- originator and recipient in one process ------------------------------------


async def _in_process(control: str) -> None:
    loop = asyncio.get_running_loop()
    server = await start_server(Plain, "127.0.0.1", 0, name="echo")
    migration = MigrationServer(control)
    await migration.start()
    migration.publish(server)
    client = socket.socket()
    client.setblocking(False)
    session = None
    try:
        await loop.sock_connect(client, server.sockets[0].getsockname())
        await wait_until_async(lambda: server.connections, what="the connection")
        protocol: Any = server.connections[0].get_protocol()
        protocol.on_done = lambda: None
        session = await connect(control)

        with pytest.raises(SerializationError) as info:
            await session.take("echo", loop)
        assert f"echo.connections[0].protocol.on_done: {LAMBDA}" in str(info.value)
        assert Plain.quiesced == 0
        assert migration.registry.state("echo") is ServiceState.AVAILABLE
        await loop.sock_sendall(client, b"ping")
        assert await loop.sock_recv(client, 10) == b"ping"

        result = await session.check("echo")
        assert (result.ok, result.path, result.error) == (
            False,
            "echo.connections[0].protocol.on_done",
            LAMBDA,
        )
        del protocol.on_done
        assert (await session.check("echo")).ok

        # A service in transit may be checked: nothing is paused or changed.
        migration.registry.begin_transit("echo")
        assert (await session.check("echo")).summary() == {
            "service": "echo",
            "ok": True,
            "path": None,
            "error": None,
        }
        assert migration.registry.state("echo") is ServiceState.IN_TRANSIT
        migration.registry.end_transit("echo")

        with pytest.raises(NoSuchServiceError, match="nosuch"):
            await session.check("nosuch")
        assert [s["name"] for s in await session.list()] == ["echo"]
        assert Plain.quiesced == 0
    finally:
        if session is not None:
            await session.close()
        client.close()
        migration.registry.withdraw("echo")
        server.close_connections()
        server.close()
        await migration.aclose()
        await wait_until_async(lambda: not server.connections, what="the closes")


def test_take_refused_by_dry_run_and_check_in_one_process(control):
    """TAKE of an unpicklable graph is an ERROR naming its path, nothing paused; CHECK agrees."""
    Plain.quiesced = 0
    asyncio.run(_in_process(control))


class SpoilsOnQuiesce(asyncio.Protocol):
    """An echo protocol whose takeover_quiesce hook stores a lambda (removed on resume)."""

    resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def takeover_quiesce(self) -> None:
        self.on_quiesce = lambda: None

    def takeover_resume(self) -> None:
        del self.on_quiesce
        type(self).resumed += 1


async def _spoiled_by_hook(control: str) -> None:
    loop = asyncio.get_running_loop()
    server = await start_server(SpoilsOnQuiesce, "127.0.0.1", 0, name="echo")
    migration = MigrationServer(control)
    await migration.start()
    migration.publish(server)
    client = socket.socket()
    client.setblocking(False)
    session = None
    try:
        await loop.sock_connect(client, server.sockets[0].getsockname())
        await wait_until_async(lambda: server.connections, what="the connection")
        session = await connect(control)
        assert (await session.check("echo")).ok
        with pytest.raises(SerializationError) as info:
            await session.take("echo", loop)
        assert f"echo.connections[0].protocol.on_quiesce: {LAMBDA}" in str(info.value)
        assert SpoilsOnQuiesce.resumed == 1
        assert migration.registry.state("echo") is ServiceState.AVAILABLE
        await loop.sock_sendall(client, b"pong")
        assert await loop.sock_recv(client, 10) == b"pong"
    finally:
        if session is not None:
            await session.close()
        client.close()
        migration.registry.withdraw("echo")
        server.close_connections()
        server.close()
        await migration.aclose()
        await wait_until_async(lambda: not server.connections, what="the closes")


def test_graph_spoiled_by_quiesce_hook_is_named_and_rolled_back(control):
    """A graph a takeover_quiesce hook makes unpicklable is named by path and resumed."""
    SpoilsOnQuiesce.resumed = 0
    asyncio.run(_spoiled_by_hook(control))


# -- real processes and the command line ----------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``python -m takeover ARGS`` to completion; its status and output lines."""
    proc = takeover(*args, env=env)
    try:
        status = proc.wait(timeout=30)
        return status, proc.output().splitlines()
    finally:
        proc.kill()


@pytest.fixture
def fragile(control: str, free_port: int, procs: list[Proc]) -> Proc:
    """tests/apps/fragile.py serving on ``free_port``, control socket at ``control``."""
    proc = Proc(
        [PYTHON, os.path.join(APPS, "fragile.py"), "--port", str(free_port), "--control", control]
    )
    procs.append(proc)
    proc.expect(r"control")
    return proc


@pytest.fixture
def clients(fragile: Proc, free_port: int) -> Iterator[list[socket.socket]]:
    """Two clients the fragile server has served once each."""
    made: list[socket.socket] = []
    try:
        for _ in range(2):
            made.append(socket.create_connection(("127.0.0.1", free_port), timeout=10))
            ask(made[-1], "hello")
        yield made
    finally:
        for client in made:
            client.close()


def ask(client: socket.socket, line: str) -> str:
    """Send one line and return the one-line answer."""
    client.sendall(f"{line}\n".encode())
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = client.recv(100)
        assert chunk, "the server closed the connection"
        answer += chunk
    return answer.decode().rstrip("\n")


def assert_available(control: str) -> None:
    """``takeover list --json`` shows the service still available here."""
    status, lines = run_cli("list", "--json", control)
    assert status == 0, lines
    assert json.loads(lines[0])["state"] == "available"


def test_check_says_ok_then_names_the_lambda(fragile, clients, control):
    """``takeover check`` says ok and exits 0; once a lambda is stored it names its path, exit 1."""
    assert run_cli("check", control) == (0, ["fragile: ok"])
    assert ask(clients[1], "lambda") == "ok lambda"
    status, lines = run_cli("check", control)
    assert status == 1
    assert lines == [f"fragile: cannot move: fragile.connections[1].protocol.on_done: {LAMBDA}"]
    status, lines = run_cli("check", "--json", "--service", "fragile", control)
    assert status == 1
    assert [json.loads(line) for line in lines] == [
        {
            "service": "fragile",
            "ok": False,
            "path": "fragile.connections[1].protocol.on_done",
            "error": LAMBDA,
        }
    ]
    assert ask(clients[1], "drop") == "ok drop"
    status, lines = run_cli("check", "--json", control)
    assert status == 0
    assert json.loads(lines[0])["ok"] is True
    assert "quiesced" not in fragile.output()


@pytest.mark.parametrize(
    ("command", "path", "error"),
    [
        ("lambda", "fragile.connections[0].protocol.on_done", LAMBDA),
        ("lock", "fragile.connections[0].protocol.lock", cannot_pickle("_thread.lock")),
    ],
)
def test_take_fails_naming_the_path_and_nothing_pauses(
    fragile, clients, control, command, path, error
):
    """``takeover take`` fails with one error line naming the path; the service never paused."""
    assert ask(clients[0], command) == f"ok {command}"
    status, lines = run_cli("take", control)
    assert status == 1
    assert lines == [
        f"{ERROR_PREFIX} service 'fragile' cannot move: {path}: {error}; {ADVICE}; {DRAIN_HINT}"
    ]
    for client in clients:
        assert ask(client, "still here") == "still here"
    assert_available(control)
    status, lines = run_cli("check", control)
    assert (status, lines) == (1, [f"fragile: cannot move: {path}: {error}"])
    fragile.expect(re.escape(f"cannot move 'fragile', left running: {path}: {error}"))
    assert "quiesced" not in fragile.output()
    assert fragile.popen.poll() is None


def test_take_succeeds_once_the_object_is_dropped(fragile, clients, control, procs):
    """After a refused take the graph is fixed; the next take moves it with both clients."""
    assert ask(clients[0], "lock") == "ok lock"
    assert run_cli("take", control)[0] == 1
    assert ask(clients[0], "drop") == "ok drop"
    recipient = takeover("take", control)
    procs.append(recipient)
    recipient.expect(r"took fragile: 2 connections")
    fragile.expect(r"quiesced pid")
    assert fragile.wait() == 0
    for client in clients:
        assert ask(client, "moved") == "moved"


def test_check_a_service_in_transit(fragile, clients, control, procs):
    """A service in transit to a stalled recipient can be checked; it stays in transit."""
    stalled = takeover("take", control, env={"TAKEOVER_FAULTS": "recipient.adopted=stop"})
    procs.append(stalled)
    wait_until(lambda: process_state(stalled.pid) == "T", what="the recipient to stop")
    assert run_cli("check", control) == (0, ["fragile: ok"])
    status, lines = run_cli("list", "--json", control)
    assert status == 0, lines
    assert json.loads(lines[0])["state"] == "in-transit"
    stalled.kill()
    wait_until(
        lambda: json.loads(run_cli("list", "--json", control)[1][0])["state"] == "available",
        what="the rollback",
    )
    assert ask(clients[0], "back") == "back"


def test_check_unknown_service_is_one_error_line(fragile, control):
    """``takeover check --service nosuch`` prints one error line naming what is published."""
    status, lines = run_cli("check", "--service", "nosuch", control)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{ERROR_PREFIX} no service named 'nosuch'")
    assert "fragile" in lines[0]
