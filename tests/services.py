"""A service's processes seen from outside: start the test app, and see who holds what.

Used by the end-to-end tests of rollback, races and the fault matrix: which
descriptors of a process are a service's sockets (from /proc/PID/net/tcp),
whether a process holds exactly a takeover process's own descriptors and
nothing else, and which live processes hold a listening socket.
"""

from __future__ import annotations

import os

from harness.procs import APPS, PYTHON, Proc, list_fds


def run_app(
    procs: list[Proc], port: int, control: str, *extra: str, env: dict[str, str] | None = None
) -> Proc:
    """Start tests/apps/multi_echo.py and wait until its control socket exists."""
    proc = Proc(
        [
            PYTHON,
            os.path.join(APPS, "multi_echo.py"),
            *("--port", str(port), "--control", control, *extra),
        ],
        env=env,
    )
    procs.append(proc)
    proc.expect(r"control")
    return proc


def tcp_sockets(pid: int, port: int) -> set[str]:
    """Sockets (``socket:[N]``) in ``pid``'s namespace whose local port is ``port``."""
    found = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{fields[9]}]")
    return found


def unix_paths(pid: int) -> dict[str, str]:
    """AF_UNIX sockets in ``pid``'s namespace: ``socket:[N]`` -> bound path ('' if none)."""
    paths = {}
    with open(f"/proc/{pid}/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            paths[f"socket:[{fields[6]}]"] = fields[7] if len(fields) > 7 else ""
    return paths


def service_fds(pid: int, port: int) -> dict[int, str]:
    """The descriptors of ``pid`` that are the listener on ``port`` or its connections."""
    sockets = tcp_sockets(pid, port)
    return {fd: target for fd, target in list_fds(pid).items() if target in sockets}


def check_own_fds(pid: int, own: dict[int, str], control: str, pollers: int = 1) -> None:
    """``own`` is exactly a takeover process's own set: stdio, epoll, self-pipe, control,
    and one epoll instance per asyncio service it serves (``pollers``)."""
    sockets = sorted(t for t in own.values() if t.startswith("socket:"))
    others = sorted(t for t in own.values() if not t.startswith("socket:"))
    epolls = ["anon_inode:[eventpoll]"] * (1 + pollers)
    assert others == sorted(["/dev/null", *epolls, *[own[1]] * 2]), own
    assert own[1].startswith("pipe:"), own
    unix = unix_paths(pid)
    assert all(s in unix for s in sockets), f"{pid} holds non-AF_UNIX sockets: {own}"
    paths = sorted(unix[s] for s in sockets)
    # The event loop's self-pipe (an unnamed socketpair) and the control
    # listener; a control connection left open would be another unnamed one.
    assert paths == ["", "", control], own


def listener_inode(port: int) -> str:
    """``socket:[N]`` of the socket listening on 127.0.0.1:``port``."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return f"socket:[{fields[9]}]"
    raise AssertionError(f"nothing listens on port {port}")


def holders(inode: str, *candidates: Proc) -> list[Proc]:
    """The live processes among ``candidates`` that hold ``inode``."""
    found = []
    for proc in candidates:
        if proc.popen.poll() is not None:
            continue
        try:
            if inode in list_fds(proc.pid).values():
                found.append(proc)
        except FileNotFoundError:
            continue
    return found
