"""Listener hand-off for frameworks (takeover.asyncio.listen): the examples for aiohttp,
uvicorn, the websockets library and asyncio streams, upgraded five times under load by
running the same command again, with real clients and real processes.

What must hold at every upgrade: no connection refused or reset (a load of
clients opening a new connection per request, and keep-alive or long-lived
clients); the listening socket stays the same kernel socket; a request in
flight is answered by the old process; the old process closes its
connections politely (between requests: ``Connection: close``, a WebSocket
close 1012, a FIN after a complete line; at the deadline too) and exits
within its drain deadline (measured: within 0.6 s of it; asserted within LATE).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import pythons
from frameworks_load import (
    Closed,
    Load,
    Probe,
    Response,
    connect,
    echo_long_lived,
    echo_new_connections,
    http_get,
    http_keep_alive,
    http_new_connections,
    read_line,
    ws_connect,
    ws_long_lived,
    ws_new_connections,
)
from harness.procs import EXAMPLES, PYTHON, Proc, takeover
from harness.waiting import wait_until, wait_until_async
from services import holders, listener_inode

UPGRADES = 5
GRACE = 0.5
LATE = 5.0
"""How late after its deadline an old process may exit, or a probe end, before a
test fails. On an idle machine they are within 0.6 s (each test prints its
figures); the bound is wide because these machines are shared and a loaded CPU
delays a process's exit: it catches an old process that waits for something,
not a slow one."""


@dataclass(frozen=True)
class Framework:
    """An example, the framework it needs, its load and its probes."""

    example: str
    module: str
    drain: float
    clients: dict[str, tuple[Callable[..., None], int]]
    probes: Callable[[int, threading.Event], dict[str, Probe]]
    check: Callable[[dict[str, Probe], int, float, float], None]


def require(module: str) -> None:
    """Skip (fail in CI) when the framework is not installed for this interpreter."""
    if importlib.util.find_spec(module) is None:
        pythons.missing(
            module, "install takeover's extra of that name (make venv installs them all)"
        )


def start(example: str, port: int, control: str, drain: float, *extra: str, **env: str) -> Proc:
    """Start ``examples/EXAMPLE.py`` (again: an upgrade) and wait until it serves."""
    argv = [PYTHON, os.path.join(EXAMPLES, f"{example}.py"), "--port", str(port)]
    argv += ["--control", control, "--drain", str(drain), "--grace", str(GRACE), *extra]
    proc = Proc(argv, env=env or None)
    proc.expect(r"\(pid \d+, (bound|taken from pid \d+)\), control ")
    return proc


# -- probes: HTTP ----------------------------------------------------------------------


def http_probes(port: int, moved: threading.Event) -> dict[str, Probe]:
    def in_flight(probe: Probe) -> tuple[Response, bool]:
        with connect(port) as sock, sock.makefile("rb") as reader:
            probe.ready.set()
            response = http_get(sock, reader, "/slow?seconds=2")
            return response, reader.read(1) == b""

    def idle(probe: Probe) -> tuple[Response, str]:
        with connect(port) as sock, sock.makefile("rb") as reader:
            response = http_get(sock, reader, "/")
            probe.ready.set()
            try:
                return response, "eof" if reader.read(1) == b"" else "data"
            except OSError as exc:
                return response, repr(exc)

    def deadline(probe: Probe) -> str:
        with connect(port) as sock, sock.makefile("rb") as reader:
            probe.ready.set()
            try:
                response = http_get(sock, reader, "/slow?seconds=60")
            except Closed as exc:
                return str(exc)
            except OSError as exc:
                return repr(exc)
            return f"answered {response.status}"

    probes = {"in flight": Probe(in_flight), "idle": Probe(idle), "deadline": Probe(deadline)}
    for probe in probes.values():
        probe.start()
    return probes


def http_check(probes: dict[str, Probe], old: int, moved_at: float, drain: float) -> None:
    response, eof = probes["in flight"].outcome()
    assert response.status == 200 and f"slow 2.0 s from pid {old}" in response.body, response
    assert response.closes and eof, f"not closed politely after the request in flight: {response}"
    response, end = probes["idle"].outcome()
    assert f"pid {old}" in response.body
    assert end == "eof", f"an idle keep-alive connection was not closed cleanly: {end}"
    assert probes["idle"].finished_at is not None
    assert probes["idle"].finished_at - moved_at < GRACE + LATE
    # A request slower than the deadline: its connection is closed then, without
    # an RST (aiohttp), or it is answered 500 (uvicorn answers a cancelled request so).
    assert probes["deadline"].outcome() in ("closed before answering", "answered 500")


# -- probes: WebSockets ------------------------------------------------------------------


def ws_probes(port: int, moved: threading.Event) -> dict[str, Probe]:
    from websockets.exceptions import ConnectionClosed

    def closing_code(ws: Any) -> int | None:
        try:
            ws.recv(timeout=30)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        return -1  # a message instead of the close

    def in_flight(probe: Probe) -> tuple[str, int | None]:
        with ws_connect(port) as ws:
            ws.send("sleep 1")
            probe.ready.set()
            reply = ws.recv(timeout=30)
            return str(reply), closing_code(ws)

    def idle(probe: Probe) -> tuple[str, int | None]:
        with ws_connect(port) as ws:
            ws.send("pid")
            reply = ws.recv(timeout=30)
            probe.ready.set()
            return str(reply), closing_code(ws)

    def deadline(probe: Probe) -> int | None:
        with ws_connect(port) as ws:
            ws.send("sleep 60")
            probe.ready.set()
            return closing_code(ws)

    probes = {"in flight": Probe(in_flight), "idle": Probe(idle), "deadline": Probe(deadline)}
    for probe in probes.values():
        probe.start()
    return probes


def ws_check(probes: dict[str, Probe], old: int, moved_at: float, drain: float) -> None:
    assert probes["in flight"].outcome() == ("slept 1.0", 1012)
    assert probes["idle"].outcome() == (f"pid {old}", 1012)
    # Still at work at the deadline: closed with 1012 all the same, not cut.
    assert probes["deadline"].outcome() == 1012
    finished = probes["deadline"].finished_at
    assert finished is not None and drain - 0.2 < finished - moved_at < drain + LATE


# -- probes: the line echo --------------------------------------------------------------


def echo_probes(port: int, moved: threading.Event) -> dict[str, Probe]:
    def end(reader: Any) -> str:
        try:
            return "eof" if reader.read(1) == b"" else "data"
        except OSError as exc:
            return repr(exc)

    def in_flight(probe: Probe) -> tuple[bytes, str]:
        # Half a line before the move, the rest after: the old process echoes it.
        with connect(port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"half a ")
            probe.ready.set()
            assert moved.wait(30)
            sock.sendall(b"line\n")
            return read_line(reader), end(reader)

    def idle(probe: Probe) -> tuple[bytes, str]:
        with connect(port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"one line\n")
            line = read_line(reader)
            probe.ready.set()
            return line, end(reader)

    def deadline(probe: Probe) -> str:
        with connect(port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"a line that never ends")
            probe.ready.set()
            return end(reader)

    probes = {"in flight": Probe(in_flight), "idle": Probe(idle), "deadline": Probe(deadline)}
    for probe in probes.values():
        probe.start()
    return probes


def echo_check(probes: dict[str, Probe], old: int, moved_at: float, drain: float) -> None:
    assert probes["in flight"].outcome() == (b"half a line\n", "eof")
    assert probes["idle"].outcome() == (b"one line\n", "eof")
    assert probes["deadline"].outcome() == "eof"
    finished = probes["deadline"].finished_at
    assert finished is not None and drain - 0.2 < finished - moved_at < drain + LATE


FRAMEWORKS = {
    "aiohttp": Framework(
        "aiohttp_app",
        "aiohttp",
        3.0,
        {"new connection": (http_new_connections, 2), "keep-alive": (http_keep_alive, 2)},
        http_probes,
        http_check,
    ),
    "uvicorn": Framework(
        "uvicorn_app",
        "uvicorn",
        3.0,
        {"new connection": (http_new_connections, 2), "keep-alive": (http_keep_alive, 2)},
        http_probes,
        http_check,
    ),
    "websockets": Framework(
        "websockets_app",
        "websockets",
        2.0,
        {"new connection": (ws_new_connections, 2), "long-lived": (ws_long_lived, 3)},
        ws_probes,
        ws_check,
    ),
    "streams": Framework(
        "streams_echo",
        "asyncio",
        2.0,
        {"new connection": (echo_new_connections, 2), "long-lived": (echo_long_lived, 3)},
        echo_probes,
        echo_check,
    ),
}


class ExitWatch(threading.Thread):
    """When a process exits (its status and the monotonic time)."""

    def __init__(self, proc: Proc) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.at: float | None = None
        self.status: int | None = None
        self.start()

    def run(self) -> None:
        self.status = self.proc.popen.wait()
        self.at = time.monotonic()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_five_upgrades_under_load(name, control, free_port, procs):
    """Five upgrades (the same command run again) under load: nothing refused or reset,
    in-flight requests answered by the old process, polite closes, prompt exits."""
    framework = FRAMEWORKS[name]
    require(framework.module)
    drain = framework.drain
    current = start(framework.example, free_port, control, drain)
    procs.append(current)
    inode = listener_inode(free_port)
    moves: list[tuple[int, float, ExitWatch]] = []
    checks: list[tuple[dict[str, Probe], int, float]] = []
    with Load(free_port, framework.clients) as load:
        load.wait_served_by(current.pid)
        for _ in range(UPGRADES):
            moved = threading.Event()
            probes = framework.probes(free_port, moved)
            for probe in probes.values():
                assert probe.ready.wait(15), "a probe did not get in place"
            time.sleep(0.2)  # the requests in flight have reached the server
            new = start(framework.example, free_port, control, drain)
            procs.append(new)
            moved_at = time.monotonic()
            assert f"taken from pid {current.pid}" in new.lines[-1]
            current.expect(rf"moved to pid {new.pid}; draining")
            moved.set()
            moves.append((current.pid, moved_at, ExitWatch(current)))
            checks.append((probes, current.pid, moved_at))
            # The same kernel socket, held by the new process (and the old ones
            # still draining, only until their framework has closed its copy).
            assert listener_inode(free_port) == inode
            assert new in holders(inode, new)
            current = new
            load.wait_served_by(current.pid)
        # Every old process exits within its drain deadline (plus LATE: see there).
        for pid, moved_at, watch in moves:
            watch.join(drain + 5)
            assert watch.at is not None, f"pid {pid} did not exit"
            assert watch.status == 0, f"pid {pid} exited with {watch.status}"
            assert watch.at - moved_at < drain + LATE, (pid, watch.at - moved_at)
        load.wait_served_by(current.pid)
    for probes, old, moved_at in checks:
        framework.check(probes, old, moved_at, drain)
    summary = load.summary()
    print(f"{name}: {UPGRADES} upgrades: {summary}")
    print(f"{name}: exits after the move (s): {[round(w.at - m, 2) for _, m, w in moves]}")
    assert load.problems() == {}
    # Clean closes between two requests would be the keep-alive race; polite ones only.
    assert all(tally.clean == 0 for tally in load.tallies.values()), summary
    assert all(tally.polite for kind, tally in load.tallies.items() if kind != "new connection")
    current.signal(signal.SIGTERM)
    assert current.wait() == 0, current.output()
    assert "stopping; draining" in current.output()


# -- the pieces, in one process ---------------------------------------------------------


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def test_asyncio_server_close_does_not_shut_the_listener_down():
    """asyncio's Server.close() (what every framework's shutdown ends in) closes its
    descriptor and nothing else: another holder of the socket still accepts, the
    connection queued meanwhile included."""

    async def scenario(sock: socket.socket) -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), sock=sock.dup())
        server.close()
        await server.wait_closed()

    with _listening() as sock:
        asyncio.run(scenario(sock))
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            sock.settimeout(5)
            conn, _ = sock.accept()
            conn.close()
            client.settimeout(5)
            assert client.recv(1) == b""  # the FIN of conn.close(), not a refusal


def test_release_stops_the_frameworks_accept_loop_and_leaves_the_queue():
    """release() (the commit, originator side) removes the framework's accept reader and
    closes takeover's copy; connections queued after it wait for the other holder."""
    from takeover.asyncio import ListenerService

    accepted: list[int] = []

    async def scenario(sock: socket.socket, other: socket.socket) -> list[socket.socket]:
        loop = asyncio.get_running_loop()
        service = ListenerService(sock, "http", loop)

        def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            writer.close()

        server = await asyncio.start_server(handle, sock=service.hand_out())
        port = other.getsockname()[1]
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        await wait_until_async(lambda: accepted)
        service.quiesce()  # a listener stops nothing: accepting on changes nothing it carries
        second = socket.create_connection(("127.0.0.1", port), timeout=5)
        await wait_until_async(lambda: len(accepted) == 2)
        service.release()
        assert service._sock.fileno() == -1 and service.released
        queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert len(accepted) == 2  # the framework accepts no more here
        server.close()  # the framework's shutdown: its copy closed, no shutdown()
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="has moved"):
            service.hand_out()
        return [first, second, *queued]

    with _listening() as sock, sock.dup() as other:
        clients = asyncio.run(scenario(sock, other))
        try:
            # "The new process": every connection queued after the move is accepted here.
            other.settimeout(5)
            for _ in range(3):
                conn, _ = other.accept()
                conn.close()
        finally:
            for client in clients:
                client.close()


# -- takeover's commands and a failed move ------------------------------------------------


def test_takeover_list_and_check_see_the_listener_and_take_refuses_it(control, free_port, procs):
    """`takeover list`/`check` show the listener; `takeover take` is refused (it has no
    framework to hand the socket to) and the application goes on accepting."""
    server = start("streams_echo", free_port, control, 1.0)
    procs.append(server)
    listing = takeover("list", control)
    procs.append(listing)
    assert listing.wait() == 0
    assert re.search(
        rf"^echo +available +0 +listener +127\.0\.0\.1:{free_port}$", listing.output(), re.M
    ), listing.output()
    check = takeover("check", control)
    procs.append(check)
    assert check.wait() == 0 and "echo: ok" in check.output()
    take = takeover("take", control)
    procs.append(take)
    assert take.wait() == 1
    assert "takeover: error: cannot take 'echo': service 'echo' is a listening socket" in (
        take.output()
    )
    with connect(free_port) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"still here\n")
        assert read_line(reader) == b"still here\n"
    assert "moved to pid" not in server.output()


def test_listen_takes_nothing_but_its_own_listener(control, free_port, procs):
    """A process at CONTROL that publishes something else: listen() takes nothing, says
    why, and the process goes on serving its own services."""
    from services import run_app

    other = run_app(procs, free_port, control)
    argv = [PYTHON, os.path.join(EXAMPLES, "streams_echo.py"), "--port", str(free_port)]
    refused = Proc([*argv, "--control", control])
    procs.append(refused)
    assert refused.wait() == 1
    assert (
        f"takeover: error: the process at {control} publishes no listener named 'echo' "
        "(it publishes: a)"
    ) in refused.output()
    assert "moved 'a'" not in other.output() and other.popen.poll() is None


@pytest.mark.slow
def test_a_failed_upgrade_leaves_the_old_process_accepting(control, free_port, procs):
    """A successor that dies before it commits: the move rolls back, and the old process
    accepts on as if nothing happened (no connection refused or reset meanwhile)."""
    server = start("streams_echo", free_port, control, 1.0)
    procs.append(server)
    with Load(free_port, {"new connection": (echo_new_connections, 2)}) as load:
        load.wait_served_by(server.pid)
        for fault in ("recipient.adopted=exit", "recipient.ahead-received=kill"):
            argv = [PYTHON, os.path.join(EXAMPLES, "streams_echo.py"), "--port", str(free_port)]
            failing = Proc([*argv, "--control", control], env={"TAKEOVER_FAULTS": fault})
            procs.append(failing)
            assert failing.wait() != 0
            wait_until(lambda: "did not move 'echo'" in server.output(), what="the rollback")
            server.lines.clear()
            load.wait_served_by(server.pid)
        # And then an upgrade works.
        new = start("streams_echo", free_port, control, 1.0)
        procs.append(new)
        load.wait_served_by(new.pid)
    assert load.problems() == {}
    assert server.wait() == 0
    new.signal(signal.SIGTERM)
    assert new.wait() == 0


# -- under the anchor ----------------------------------------------------------------------


@pytest.mark.slow
def test_takeover_run_upgrades_with_the_example_as_successor(workdir, control, free_port, procs):
    """`takeover run --successor "python examples/aiohttp_app.py ..."`: SIGHUP starts the
    same command, which takes the listener and says READY; the old one hands MAINPID
    on, drains and exits; the anchor's PID stays."""
    require("aiohttp")
    from test_anchor import Upstream, serving_pid

    upstream = Upstream(os.path.join(workdir, "notify.sock"))
    try:
        app = [PYTHON, os.path.join(EXAMPLES, "aiohttp_app.py"), "--port", str(free_port)]
        app += ["--control", control, "--drain", "2", "--grace", str(GRACE)]
        successor = " ".join(app)
        argv = [PYTHON, "-m", "takeover", "run", "--control", control]
        anchor = Proc(
            [*argv, "--successor", successor, "--", *app], env={"NOTIFY_SOCKET": upstream.path}
        )
        procs.append(anchor)
        servers = [serving_pid(upstream.expect("READY", "1"))]
        with Load(
            free_port,
            {"new connection": (http_new_connections, 1), "keep-alive": (http_keep_alive, 1)},
        ) as load:
            load.wait_served_by(servers[-1])
            for move in (1, 2):
                anchor.signal(signal.SIGHUP)
                upstream.expect("RELOADING", "1")
                ready = upstream.expect("READY", "1")
                assert f"{move} move(s)" in ready["STATUS"], ready
                servers.append(serving_pid(ready))
                assert servers[-1] not in servers[:-1]
                load.wait_served_by(servers[-1])
                old = servers[-2]
                wait_until(
                    lambda old=old: not os.path.exists(f"/proc/{old}"),
                    timeout=2 + 2,
                    what=f"the old server {old} to drain and exit",
                )
        assert load.problems() == {}
        anchor.signal(signal.SIGTERM)
        assert anchor.wait() == 0, anchor.output()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in servers)
    finally:
        upstream.close()
