"""Rollback with real processes: a killed or refusing recipient, and fd accounting."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
from collections.abc import Iterator

import pytest

from harness.echo import echo, recv_exact
from harness.procs import free_port as another_port
from harness.procs import (
    list_fds,
    process_state,
    run_example,
    socket_inodes,
    takeover,
)
from harness.waiting import wait_until
from services import check_own_fds, run_app, service_fds

PRIVATE_MODULE = "takeover_test_private"
PRIVATE_SOURCE = '''\
"""A protocol class only the originator can import."""

import asyncio


class PrivateEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.pending = b""

    def data_received(self, data):
        *lines, self.pending = (self.pending + data).split(b"\\n")
        for line in lines:
            self.transport.write(line + b"\\n")
'''
STOP_AFTER_ADOPT = {"TAKEOVER_FAULTS": "recipient.adopted=stop"}
# The private module is application code the recipient must be told to allow;
# with it allowed, what fails is the import itself.
ALLOW_PRIVATE = ("--allow", PRIVATE_MODULE)


# -- helpers -------------------------------------------------------------------


def private_module(workdir: str) -> dict[str, str]:
    """Write the private protocol module; return the env that makes it importable."""
    directory = os.path.join(workdir, "private")
    os.mkdir(directory)
    with open(os.path.join(directory, f"{PRIVATE_MODULE}.py"), "w") as f:
        f.write(PRIVATE_SOURCE)
    return {"PYTHONPATH": directory}


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``port``, each checked with one echoed line."""
    with contextlib.ExitStack() as stack:
        socks = []
        for i in range(count):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            assert echo(sock, f"hello {i}\n".encode()) == f"hello {i}\n".encode()
            socks.append(sock)
        yield socks


def _less_one_epoll(remaining: dict[int, str], now: dict[int, str]) -> bool:
    """``now`` is ``remaining`` less exactly one epoll instance: the moved service's own."""
    gone = {fd: t for fd, t in remaining.items() if now.get(fd) != t}
    return set(now.items()) <= set(remaining.items()) and list(gone.values()) == [
        "anon_inode:[eventpoll]"
    ]


# -- rollback ------------------------------------------------------------------


def test_killed_recipient_rolls_back_unnoticed(control, free_port, procs):
    """A recipient killed after adopting leaves the service with the originator, clients unaware."""
    origin = run_example("echo", free_port, control)
    procs.append(origin)
    with clients(free_port, 3) as socks:
        socks[0].sendall(b"par")  # a partial line, held in the protocol
        stopped = takeover("take", control, env=STOP_AFTER_ADOPT)
        procs.append(stopped)
        wait_until(lambda: process_state(stopped.pid) == "T", what="the recipient to stop")

        listing = takeover("list", control, "--json")
        procs.append(listing)
        assert listing.wait() == 0, listing.output()
        states = [json.loads(line)["state"] for line in listing.output().splitlines()]
        assert states == ["in-transit"]

        # Sent while the service is paused: it waits in the kernel buffers.
        socks[0].sendall(b"tial\n")
        for i, sock in enumerate(socks[1:], 1):
            sock.sendall(f"while stopped {i}\n".encode())
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as queued:
            queued.sendall(b"queued while stopped\n")

            stopped.signal(signal.SIGKILL)
            assert stopped.wait() == -signal.SIGKILL

            # Everything arrives, once, and in order.
            assert recv_exact(socks[0], 8) == b"partial\n"
            for i, sock in enumerate(socks[1:], 1):
                expected = f"while stopped {i}\n".encode()
                assert recv_exact(sock, len(expected)) == expected
            assert recv_exact(queued, 21) == b"queued while stopped\n"
            for i, sock in enumerate([*socks, queued]):
                assert echo(sock, f"after {i}\n".encode()) == f"after {i}\n".encode()
            with socket.create_connection(("127.0.0.1", free_port), timeout=10) as fresh:
                assert echo(fresh, b"fresh\n") == b"fresh\n"
            assert origin.popen.poll() is None

            # Nothing is stuck in transit: the next take moves everything.
            recipient = takeover("take", control)
            procs.append(recipient)
            recipient.expect(r"^took echo: 4 connections")
            recipient.expect(r"^serving 1 service\(s\) at " + re.escape(control) + " ")
            assert origin.wait() == 0, origin.output()
            for i, sock in enumerate([*socks, queued]):
                assert echo(sock, f"moved {i}\n".encode()) == f"moved {i}\n".encode()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()


def test_unimportable_class_is_refused_and_rolled_back(control, workdir, free_port, procs):
    """An unimportable protocol class fails the take in one line; the originator serves on."""
    env = private_module(workdir)
    origin = run_app(
        procs, free_port, control, "--protocol", f"{PRIVATE_MODULE}:PrivateEcho", env=env
    )
    with clients(free_port, 2) as socks:
        socks[0].sendall(b"half a ")
        refused = takeover("take", control, *ALLOW_PRIVATE)
        procs.append(refused)
        assert refused.wait() == 1, refused.output()
        output = refused.output()
        # One line, and it names the class and the module that failed.
        assert re.fullmatch(r"takeover: error: [^\n]*", output), output
        assert f"{PRIVATE_MODULE}.PrivateEcho" in output
        assert f"No module named '{PRIVATE_MODULE}'" in output

        socks[0].sendall(b"line\n")
        assert recv_exact(socks[0], 12) == b"half a line\n"
        assert echo(socks[1], b"still here\n") == b"still here\n"
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as fresh:
            assert echo(fresh, b"fresh\n") == b"fresh\n"
        assert origin.popen.poll() is None

        # Rolled back to AVAILABLE: a recipient that can import the class takes it.
        recipient = takeover("take", control, *ALLOW_PRIVATE, env=env)
        procs.append(recipient)
        recipient.expect(r"^took a: 2 connections")
        recipient.expect(r"^serving 1 service\(s\) at " + re.escape(control) + " ")
        assert origin.wait() == 0, origin.output()
        for i, sock in enumerate(socks):
            assert echo(sock, f"moved {i}\n".encode()) == f"moved {i}\n".encode()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()


# -- descriptors ---------------------------------------------------------------


def test_move_leaks_no_fd(control, free_port, procs):
    """After moving a only, the originator holds none of a's sockets, the recipient just those."""
    port_b = another_port()
    origin = run_app(procs, free_port, control, "--port-b", str(port_b))
    with clients(free_port, 3) as a_socks, clients(port_b, 2) as b_socks:
        before = list_fds(origin.pid)
        moving = service_fds(origin.pid, free_port)
        assert len(moving) == 4  # listener + 3 connections
        assert len(service_fds(origin.pid, port_b)) == 3

        recipient = takeover("take", control, "--service", "a")
        procs.append(recipient)
        recipient.expect(r"^took a: 3 connections, .*, 4 fds")
        own_control = f"{control}.{recipient.pid}"
        recipient.expect(r"^serving 1 service\(s\) at " + re.escape(own_control) + " ")

        # The originator: exactly its old table minus service a, once the
        # control connection is gone.
        remaining = {fd: t for fd, t in before.items() if fd not in moving}
        wait_until(
            lambda: _less_one_epoll(remaining, list_fds(origin.pid)),
            what="the originator's fd table",
        )
        assert not set(moving.values()) & set(socket_inodes(origin.pid))

        # The recipient: one descriptor per socket of service a, plus its own.
        wait_until(
            lambda: len(list_fds(recipient.pid)) == len(moving) + 8,  # + its epoll
            what="the recipient's fd table to settle",
        )
        fds = list_fds(recipient.pid)
        held = sorted(t for t in fds.values() if t in set(moving.values()))
        assert held == sorted(moving.values())
        check_own_fds(
            recipient.pid,
            {fd: t for fd, t in fds.items() if t not in set(moving.values())},
            own_control,
        )

        # Both services still serve: a from the recipient, b from the originator.
        for i, sock in enumerate(a_socks + b_socks):
            assert echo(sock, f"after {i}\n".encode()) == f"after {i}\n".encode()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()
    assert origin.popen.poll() is None


def test_rollback_after_kill_leaks_no_fd(control, free_port, procs):
    """After a killed recipient's rollback, the originator's fd table is as before the attempt."""
    origin = run_app(procs, free_port, control)
    with clients(free_port, 3) as socks:
        before = list_fds(origin.pid)
        stopped = takeover("take", control, env=STOP_AFTER_ADOPT)
        procs.append(stopped)
        wait_until(lambda: process_state(stopped.pid) == "T", what="the recipient to stop")
        # In transit, the recipient holds its own copies of the listener and
        # connections; the originator keeps its own plus the control connection
        # and the move's commit arbiter (a memfd).
        assert set(service_fds(origin.pid, free_port).values()) <= set(socket_inodes(stopped.pid))
        during = list_fds(origin.pid)
        extra = sorted(target for fd, target in during.items() if before.get(fd) != target)
        assert len(during) == len(before) + 2, extra
        assert any("memfd:takeover-arbiter" in target for target in extra), extra
        stopped.signal(signal.SIGKILL)
        assert stopped.wait() == -signal.SIGKILL
        wait_until(lambda: list_fds(origin.pid) == before, what="the originator's fd table")
        for i, sock in enumerate(socks):
            assert echo(sock, f"after {i}\n".encode()) == f"after {i}\n".encode()


def test_refused_service_leaks_no_fd_in_either_process(control, workdir, free_port, procs):
    """Taking a and b, b refused: b stays whole in the originator, no trace in the recipient."""
    env = private_module(workdir)
    port_b = another_port()
    protocol_b = f"{PRIVATE_MODULE}:PrivateEcho"
    origin = run_app(
        procs, free_port, control, "--port-b", str(port_b), "--protocol-b", protocol_b, env=env
    )
    with clients(free_port, 2) as a_socks, clients(port_b, 3) as b_socks:
        before = list_fds(origin.pid)
        moving = service_fds(origin.pid, free_port)
        staying = service_fds(origin.pid, port_b)
        assert (len(moving), len(staying)) == (3, 4)

        recipient = takeover("take", control, *ALLOW_PRIVATE)
        procs.append(recipient)
        recipient.expect(r"^took a: 2 connections")
        error = recipient.expect(r"^takeover: error: ")
        assert f"{PRIVATE_MODULE}.PrivateEcho" in error.string
        assert f"No module named '{PRIVATE_MODULE}'" in error.string
        own_control = f"{control}.{recipient.pid}"
        recipient.expect(r"^serving 1 service\(s\) at " + re.escape(own_control) + " ")

        remaining = {fd: t for fd, t in before.items() if fd not in moving}
        wait_until(
            lambda: _less_one_epoll(remaining, list_fds(origin.pid)),
            what="the originator's fd table",
        )
        wait_until(
            lambda: len(list_fds(recipient.pid)) == len(moving) + 8,  # + its epoll
            what="the recipient's fd table to settle",
        )
        fds = list_fds(recipient.pid)
        assert not set(fds.values()) & set(staying.values())
        assert sorted(t for t in fds.values() if t in set(moving.values())) == sorted(
            moving.values()
        )
        check_own_fds(
            recipient.pid,
            {fd: t for fd, t in fds.items() if t not in set(moving.values())},
            own_control,
        )
        for i, sock in enumerate(a_socks + b_socks):
            assert echo(sock, f"after {i}\n".encode()) == f"after {i}\n".encode()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 3, recipient.output()  # EXIT_PARTIAL
    assert origin.popen.poll() is None


@pytest.mark.parametrize("order", [("b", "a"), ("a", "b")])
def test_refusal_keeps_the_conversation(control, workdir, free_port, procs, order):
    """After b is refused, the same `take` still moves a, whichever is asked first."""
    env = private_module(workdir)
    port_b = another_port()
    protocol_b = f"{PRIVATE_MODULE}:PrivateEcho"
    origin = run_app(
        procs, free_port, control, "--port-b", str(port_b), "--protocol-b", protocol_b, env=env
    )
    with clients(free_port, 1) as a_socks, clients(port_b, 1) as b_socks:
        args = [arg for name in order for arg in ("--service", name)]
        recipient = takeover("take", control, *args, *ALLOW_PRIVATE)
        procs.append(recipient)
        recipient.expect(r"^serving 1 service\(s\) at ")
        assert re.search(r"^took a: 1 connections", recipient.output(), re.M)
        assert echo(a_socks[0], b"a\n") == b"a\n"
        assert echo(b_socks[0], b"b\n") == b"b\n"
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 3, recipient.output()
    assert origin.popen.poll() is None
