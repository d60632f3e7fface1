"""takeover under a real systemd: docs/deploy.md's two units, run as written.

systemd is PID 1 of private namespaces (harness/systemd.py); the clients run
here, on the shared network. With the anchor (`takeover run`), `systemctl
reload` moves the service under 50 checksummed streams while MainPID stays
the anchor's; SIGKILL of the serving process makes systemd restart the unit;
`systemctl stop` leaves nothing. Without it, `takeover take --detach` as
ExecReload= and the old server's MAINPID= hand the unit over to each new
process.
"""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from harness.echo import echo
from harness.procs import EXAMPLES, PYTHON
from harness.systemd import SystemdNamespace
from harness.waiting import wait_until
from streaming import streaming

RELOADS = 5
UNIT = "echo.service"


def echo_command(control: str, port: int, *extra: str) -> str:
    return " ".join(
        [
            PYTHON,
            os.path.join(EXAMPLES, "echo.py"),
            "--port",
            str(port),
            "--control",
            control,
            *extra,
        ]
    )


def write_unit(ns: SystemdNamespace, service: str) -> None:
    ns.write_unit(UNIT, f"[Unit]\nDefaultDependencies=no\n\n[Service]\n{service}")
    ns.daemon_reload()


def serving(ns: SystemdNamespace) -> int:
    """The pid (inside) that serves, from the anchor's STATUS line."""
    found = re.match(r"serving pid (\d+): ", ns.show(UNIT, "StatusText"))
    assert found, ns.show(UNIT, "StatusText")
    return int(found[1])


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_the_anchor_unit_reloads_restarts_and_stops(systemd_ns, control, free_port):
    """Five reloads under 50 streams; one MainPID, a new server each time; restart; stop."""
    ns = systemd_ns
    anchor = f"{PYTHON} -m takeover run --control {control} -- {echo_command(control, free_port)}"
    write_unit(
        ns,
        f"Type=notify\nExecStart={anchor}\nExecReload=/bin/kill -HUP $MAINPID\n"
        "Restart=on-failure\nRestartSec=100ms\n",
    )
    ns.systemctl("start", UNIT, check=True)
    state = ns.wait_for_state(UNIT, "active", "running")
    main = state["MainPID"]
    servers = [serving(ns)]
    assert servers[0] != int(main)
    with streaming(free_port, 50) as clients:
        clients.wait_all_echoing()
        for move in range(1, RELOADS + 1):
            ns.systemctl("reload", UNIT, check=True)
            wait_until(
                lambda move=move: f"; {move} move(s)" in ns.show(UNIT, "StatusText"),
                what=f"move {move} in the status line",
            )
            state = ns.wait_for_state(UNIT, "active", "running")
            assert state["MainPID"] == main, state
            servers.append(serving(ns))
            assert servers[-1] not in servers[:-1]
            clients.wait_progress()
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    assert outcome.unechoed == 0
    assert re.search(r"; 5 move\(s\); last pause \d+\.\d+ ms$", ns.show(UNIT, "StatusText"))
    # Both sides logged every move (the unit's output is its journal here).
    log = ns.output(UNIT)
    assert len(re.findall(r"takeover\.moves: moved 'echo' to pid \d+: ", log)) == RELOADS, log
    # Every old server has exited: the unit holds the anchor and the server only.
    wait_until(lambda: len(_cgroup_pids(ns)) == 2, what="the old servers to be gone")

    # The serving process killed: the anchor dies of it, systemd restarts the unit.
    os.kill(ns.host_pid(servers[-1]), signal.SIGKILL)
    wait_until(lambda: ns.show(UNIT, "NRestarts") == "1", what="systemd to restart the unit")
    state = ns.wait_for_state(UNIT, "active", "running")
    assert state["MainPID"] != main
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"restarted\n") == b"restarted\n"

    ns.systemctl("stop", UNIT, check=True)
    ns.wait_for_state(UNIT, "inactive")
    assert _cgroup_pids(ns) == []
    assert refused(free_port)


def _cgroup_pids(ns: SystemdNamespace) -> list[str]:
    group = ns.show(UNIT, "ControlGroup")
    if not group:
        return []
    done = ns.run(["cat", f"/sys/fs/cgroup{group}/cgroup.procs"])
    return done.stdout.split()


@pytest.mark.slow
def test_without_the_anchor_mainpid_follows_each_new_server(
    systemd_ns, workdir, control, free_port
):
    """ExecReload=takeover take --detach: MainPID and the PID file name each new server."""
    ns = systemd_ns
    pid_file = os.path.join(workdir, "echo.pid")
    reload = f"{PYTHON} -m takeover take --detach {control}"
    write_unit(
        ns,
        "Type=notify\nNotifyAccess=all\n"
        f"ExecStart={echo_command(control, free_port, '--pid-file', pid_file)}\n"
        f"ExecReload={reload}\nRestart=on-failure\n",
    )
    ns.systemctl("start", UNIT, check=True)
    mains = [int(ns.wait_for_state(UNIT, "active", "running")["MainPID"])]
    with streaming(free_port, 10) as clients:
        clients.wait_all_echoing()
        for _ in range(3):
            ns.systemctl("reload", UNIT, check=True)
            wait_until(lambda: int(ns.show(UNIT, "MainPID")) not in mains, what="a new MainPID")
            state = ns.wait_for_state(UNIT, "active", "running")
            mains.append(int(state["MainPID"]))
            with open(pid_file) as f:
                assert int(f.read()) == mains[-1]
            clients.wait_progress()
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    assert len(set(mains)) == 4
    wait_until(lambda: len(_cgroup_pids(ns)) == 1, what="the old servers to be gone")
    ns.systemctl("stop", UNIT, check=True)
    ns.wait_for_state(UNIT, "inactive")
    assert _cgroup_pids(ns) == []
    assert refused(free_port)
