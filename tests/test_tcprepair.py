"""TCP_REPAIR: a live connection checkpointed in one process, restored in another.

Real sockets in a private network namespace (tests/users.py's NetNamespace),
real processes (tests/apps/repair_peer.py), a real netfilter drop (nft). The
connection carries unread bytes both ways and bytes in flight that the client
never acknowledged when it is frozen; the client keeps writing while it is
frozen. Every byte of both streams is checked, in order, once.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import select
import shutil
import socket
import subprocess
import threading

import pytest

import pythons
from harness.procs import APPS, PYTHON, ROOT, Proc
from takeover._core import tcprepair
from users import NetNamespace, Sandbox, user_command

PEER = os.path.join(APPS, "repair_peer.py")
ENV = {"PYTHONPATH": os.path.join(ROOT, "src")}
CLIENT_TOTAL, READ, SERVER_TOTAL = 60_000, 3_000, 400_000
CLIENT = random.Random(1).randbytes(CLIENT_TOTAL)
SERVER = random.Random(2).randbytes(SERVER_TOTAL)


@pytest.fixture
def repair_available() -> None:
    if os.geteuid() != 0 or not tcprepair.has_net_admin():
        pythons.skip_or_fail("TCP_REPAIR needs the tests to run as root (CAP_NET_ADMIN)")
    for tool in ("nft", "unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pythons.missing(tool, "make network-tools installs nftables and iproute2")


def test_state_is_builtins_only(repair_available: None, procs: list[Proc]) -> None:
    """The checkpoint is plain data: it pickles with nothing but builtins."""
    ns = NetNamespace(procs)

    def pair() -> dict[str, object]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
        with client, server:
            client.sendall(b"unread")
            frozen = tcprepair.freeze([server])
            try:
                (state,) = frozen.checkpoints()
            finally:
                frozen.thaw()
            # Thawed: the connection lives, nothing was consumed.
            assert server.recv(6) == b"unread"
            server.sendall(b"back")
            assert client.recv(4) == b"back"
        return state

    state = ns.run(pair)
    assert state["recv_queue"] == b"unread"
    allowed = {int, str, bytes, list, dict, type(None)}

    def walk(value: object) -> None:
        assert type(value) in allowed, value
        if isinstance(value, dict):
            for key, item in value.items():
                assert type(key) is str
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(state)
    assert pickle.loads(pickle.dumps(state)) == state


def test_move_between_processes(
    repair_available: None, procs: list[Proc], workdir: str, free_port: int
) -> None:
    ns = NetNamespace(procs)
    path = os.path.join(workdir, "state")
    origin = Proc(ns.command([PYTHON, PEER, "origin", str(free_port), path]), ENV, stdin=True)
    procs.append(origin)
    origin.expect("^listening$")
    client = ns.run(lambda: socket.create_connection(("127.0.0.1", free_port)))
    received = bytearray()
    with client:
        client.sendall(CLIENT[:10_000])
        origin.expect("^read$")
        origin.send_line("freeze")
        frozen = origin.expect(r"^frozen sent=(\d+) unsent=(\d+) inq=(\d+)$")
        sent, unsent, inq = map(int, frozen.groups())
        # Unread in both directions, and in flight unacknowledged.
        assert sent > 0 and unsent > 0 and inq == 10_000 - READ
        # The client writes while the connection is frozen: dropped, retransmitted later.
        client.sendall(CLIENT[10_000:30_000])
        recipient = Proc(ns.command([PYTHON, PEER, "recipient", path]), ENV, stdin=True)
        procs.append(recipient)
        recipient.expect("^prepared$")
        origin.send_line("lift")
        origin.expect("^lifted$")
        assert origin.wait() == 0
        recipient.send_line("start")

        def write_rest() -> None:
            client.sendall(CLIENT[30_000:])
            client.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write_rest)
        writer.start()
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
        writer.join()
    recipient.expect(rf"^received {CLIENT_TOTAL - READ}$")
    assert recipient.wait() == 0
    assert len(received) == SERVER_TOTAL
    assert bytes(received) == SERVER


def test_refused_without_net_admin(repair_available: None, workdir: str) -> None:
    """A process without CAP_NET_ADMIN is refused up front, with the reason."""
    script = (
        "from takeover._core import tcprepair\n"
        "try:\n"
        "    tcprepair.require_capability()\n"
        "except tcprepair.CapabilityError as exc:\n"
        "    print(exc)\n"
    )
    sandbox = Sandbox(workdir)  # the interpreter made reachable (pyenv's lies behind /root)
    root = sandbox.root
    proc = Proc(
        user_command("nobody", "nogroup", ["-c", script], env=sandbox.env, cwd=root, stages=root)
    )
    try:
        proc.expect("needs CAP_NET_ADMIN")
        assert proc.wait() == 0
    finally:
        proc.kill()


def test_freeze_drops_new_connections_to_a_listener(
    repair_available: None, procs: list[Proc]
) -> None:
    """A frozen listener's new SYNs are dropped (the client sends them again), the
    connections already made are not touched; after the thaw the client's retry
    connects. A table with only a listener in it is still made and lifted."""
    ns = NetNamespace(procs)

    def scenario() -> tuple[int, bytes]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            frozen = tcprepair.freeze([], [listener])
            try:
                assert (
                    "tcp flags syn / syn,ack drop"
                    in subprocess.run(
                        ["nft", "list", "table", "inet", frozen.table],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
                client = socket.socket()
                client.setblocking(False)
                assert client.connect_ex(listener.getsockname()) == errno.EINPROGRESS
                # Whatever the wait, the handshake cannot complete: its SYN is dropped.
                select.select([], [client], [], 0.3)
                state = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            finally:
                frozen.thaw()
            with client:
                client.setblocking(True)
                client.settimeout(30)
                listener.settimeout(30)
                conn, _ = listener.accept()  # the retransmitted SYN got through
                with conn:
                    conn.sendall(b"hello")
                    return state, client.recv(5)

    state, data = ns.run(scenario)
    assert state == 2  # SYN_SENT
    assert data == b"hello"
