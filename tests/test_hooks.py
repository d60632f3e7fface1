"""Timers re-armed through the hooks; UNIX-stream services; the control socket's mode."""

from __future__ import annotations

import os
import re
import socket
import stat

from harness.procs import APPS, PYTHON, Proc, process_state, takeover


def _start_ticker(port: int, control: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
    proc = Proc(
        [
            PYTHON,
            os.path.join(APPS, "ticker.py"),
            "--port",
            str(port),
            "--control",
            control,
            *extra,
        ],
        env=env,
    )
    proc.expect("control")
    return proc


def _ticks(sock: socket.socket, buffer: bytearray, count: int) -> list[tuple[int, int]]:
    """Read ``count`` whole tick lines: (tick number, pid)."""
    ticks: list[tuple[int, int]] = []
    while len(ticks) < count:
        while b"\n" not in buffer:
            chunk = sock.recv(4096)
            assert chunk, "the ticker closed the connection"
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        match = re.fullmatch(rb"tick (\d+) pid (\d+)", line)
        assert match, line
        ticks.append((int(match[1]), int(match[2])))
    return ticks


def _check_ticks_cross_move(
    client: socket.socket,
    origin_pid: int,
    control: str,
    procs: list[Proc],
    env: dict[str, str] | None = None,
) -> Proc:
    """Read ticks from the originator, move the service, read ticks from the recipient."""
    buffer = bytearray()
    before = _ticks(client, buffer, 3)
    assert all(pid == origin_pid for _, pid in before)
    recipient = takeover("take", control, env=env)
    procs.append(recipient)
    recipient.expect(r"^serving ")
    after = _ticks(client, buffer, 40)
    numbers = [n for n, _ in before + after]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    assert after[-1][1] == recipient.pid
    return recipient


def test_timer_rearmed_after_move(control, free_port, procs):
    """A call_later timer keeps ticking in the new process, counting on without a gap."""
    origin = _start_ticker(free_port, control)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        _check_ticks_cross_move(client, origin.pid, control, procs)
    assert origin.wait() == 0


def test_unix_stream_service_moves(control, free_port, workdir, procs):
    """A service listening on an AF_UNIX stream socket moves with its connections."""
    path = os.path.join(workdir, "ticker.sock")
    origin = _start_ticker(free_port, control, "--unix", path)
    procs.append(origin)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        recipient = _check_ticks_cross_move(client, origin.pid, control, procs)
        assert re.search(r"^took ticker-unix: 1 connections", recipient.output(), re.M)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
        late.settimeout(10)
        late.connect(path)
        assert _ticks(late, bytearray(), 1)[0][1] == recipient.pid
    assert origin.wait() == 0


def test_control_socket_is_private(control, free_port, procs):
    """The control socket is created 0600, and a recipient republishes it 0600."""
    origin = _start_ticker(free_port, control)
    procs.append(origin)
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    recipient = takeover("take", control)
    procs.append(recipient)
    recipient.expect(r"^serving ")
    assert origin.wait() == 0
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600


def test_stale_control_socket_is_replaced(control, free_port, procs):
    """A control socket left by a killed process is replaced; a live one is not."""
    first = _start_ticker(free_port, control)
    procs.append(first)
    first.kill()
    assert os.path.exists(control)
    second = _start_ticker(free_port, control)
    procs.append(second)
    with socket.socket() as probe:
        free = probe.bind(("127.0.0.1", 0)) or probe.getsockname()[1]
    third = Proc(
        [PYTHON, os.path.join(APPS, "ticker.py"), "--port", str(free), "--control", control]
    )
    procs.append(third)
    assert third.wait() != 0
    assert "already listening at" in third.output()
    listing = takeover("list", control)
    procs.append(listing)
    listing.expect(r"^ticker\s+available")


def test_accept_backs_off_when_out_of_descriptors(control, free_port, procs):
    """With no descriptor left, a connection waits in the queue and is served once one frees."""
    origin = _start_ticker(free_port, control, "--spare-fds", "2")
    procs.append(origin)
    first = socket.create_connection(("127.0.0.1", free_port), timeout=10)
    second = socket.create_connection(("127.0.0.1", free_port), timeout=10)
    with first, second, socket.create_connection(("127.0.0.1", free_port), timeout=10) as third:
        assert _ticks(first, bytearray(), 1)
        assert _ticks(second, bytearray(), 1)
        origin.expect(r"accept failed on ticker: .*Too many open files.*retrying")
        first.close()
        assert _ticks(third, bytearray(), 1)[0][1] == origin.pid


def test_stalled_recipient_rolled_back_after_step_timeout(control, free_port, procs):
    """A recipient that stops answering past --step-timeout loses the service to a rollback."""
    origin = _start_ticker(free_port, control, "--step-timeout", "0.5")
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        buffer = bytearray()
        first = _ticks(client, buffer, 2)
        stalled = takeover("take", control, env={"TAKEOVER_FAULTS": "recipient.adopted=stop"})
        procs.append(stalled)
        # Ticks stop while the service is in transit, then resume in the originator.
        later = _ticks(client, buffer, 60)
        assert all(pid == origin.pid for _, pid in later)
        numbers = [n for n, _ in first + later]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert process_state(stalled.pid) == "T"
    listing = takeover("list", "--json", control)
    procs.append(listing)
    listing.expect(r'"state": "available"')


def test_failing_quiesce_hook_refuses_the_move(control, free_port, procs):
    """A takeover_quiesce hook that raises: the take fails saying so, the service goes on."""
    origin = _start_ticker(free_port, control, env={"TICKER_FAIL_HOOK": "quiesce"})
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        buffer = bytearray()
        first = _ticks(client, buffer, 2)
        refused = takeover("take", control)
        procs.append(refused)
        assert refused.wait() != 0
        lines = refused.output().splitlines()
        assert len(lines) == 1 and "could not be paused" in lines[0], lines
        assert "refuses to be paused" in lines[0]
        later = _ticks(client, buffer, 20)
        assert {pid for _, pid in later} == {origin.pid}
        numbers = [n for n, _ in first + later]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_failing_adopted_hook_does_not_lose_the_service(control, free_port, procs):
    """A takeover_adopted hook that raises after commit is logged; the service keeps serving."""
    failing = {"TICKER_FAIL_HOOK": "adopted"}
    origin = _start_ticker(free_port, control)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        recipient = _check_ticks_cross_move(client, origin.pid, control, procs, env=failing)
        assert "takeover_adopted() of" in recipient.output()
    assert origin.wait() == 0
