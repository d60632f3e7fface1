"""Processes of other users, in a network namespace of their own, for tests/test_users.py.

The tests hand a service bound to port 80 by root to a process of user
nobody, the 2004 paper's own case. Three things make that work on any machine
where the tests run as root, wherever the repository was cloned:

* **A private network namespace** (:class:`NetNamespace`): a holder process
  made by ``unshare --net`` with its loopback up; the processes of a test
  enter it with ``nsenter --net``, and the test's clients open their sockets
  from a thread that has entered it (``setns``). Port 80 there is free, and
  no other test or program on the machine sees it.
* **The code, where every user can read it** (:class:`Sandbox`): a copy of
  ``src/takeover`` and of the originator's script in the test's directory
  (mode 0755), on ``PYTHONPATH``. The recipient loads the originator's script
  by its path, so the originator runs the copy too.
* **This very interpreter, for a user who may not reach it**
  (:func:`interpreter_view`): pyenv's interpreters live under root's home
  (0700), and their ``python`` finds ``libpython`` there by an absolute
  RUNPATH, so neither a symlink nor a copy elsewhere would run. The other
  user's process runs in a private mount namespace (``unshare --mount``)
  where a tmpfs (0755) covers the first directory it may not enter, and only
  the interpreter's own installation is mounted back at its very path. It
  runs the interpreter under test (the matrix's 3.9 to 3.13 and PyPy alike),
  and the rest of root's home stays hidden from it.

The other user's process is started by ``setpriv`` with its uid, gid and
groups set before ``exec``: it never runs as root, and holds no capability.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TypeVar

import pythons
from harness.hosts import run_in_namespace
from harness.procs import EXAMPLES, ROOT, Proc

T = TypeVar("T")

TOOLS = ("unshare", "nsenter", "setpriv", "mount", "ip")


def unavailable(message: str) -> None:
    """Skip on a developer's machine; fail in CI, which runs as root with all it needs."""
    pythons.skip_or_fail(message)


def require_root() -> None:
    """Skip (fail in CI) unless this runs as root with the tools and namespaces needed."""
    if os.geteuid() != 0:
        unavailable("handing a service to another user needs the tests to run as root")
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        unavailable(f"{', '.join(absent)} not found: install util-linux and iproute2")
    for name in ("nobody", "daemon"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            unavailable(f"there is no user {name} (a Debian base system has it)")
    problem = _namespaces_problem()
    if problem:
        unavailable(f"no private network and mount namespaces: {problem}")
    problem = _interpreter_problem()
    if problem:
        unavailable(problem)


@functools.cache
def _namespaces_problem() -> str | None:
    probe = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--",
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return "`unshare --net --mount` failed (a container without CAP_SYS_ADMIN?): " + (
            probe.stderr.strip() or f"status {probe.returncode}"
        )
    return None


def uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def status_ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of ``/proc/PID/status`` (and CapEff, CapPrm)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    ids = {key: [int(v) for v in fields[key].split()] for key in ("Uid", "Gid", "Groups")}
    ids.update({key: [int(fields[key], 16)] for key in ("CapEff", "CapPrm")})
    return ids


# -- the network namespace --------------------------------------------------------


class NetNamespace:
    """A private network namespace with its loopback up, held by a sleeping process."""

    def __init__(self, procs: list[Proc]) -> None:
        self.holder = Proc(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 600"]
        )
        procs.append(self.holder)
        self.holder.expect(r"^up$")
        self.path = f"/proc/{self.holder.pid}/ns/net"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in this namespace (``nsenter`` execs it: the pid is the command's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, function: Callable[[], T]) -> T:
        """Call ``function`` in a thread that has entered this namespace, and return
        its result: the sockets it opens belong to the namespace, whichever thread
        uses them afterwards."""
        return run_in_namespace(self.path, function)

    def tcp_sockets(self, port: int, *, listening: bool = False) -> set[str]:
        """Sockets (``socket:[N]``) in this namespace whose local port is ``port``."""
        found = set()
        with open(f"/proc/{self.holder.pid}/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) != port:
                    continue
                if (listening and fields[3] != "0A") or fields[9] == "0":
                    continue  # inode 0: a connection closed (TIME_WAIT), nobody's
                found.add(f"socket:[{fields[9]}]")
        return found


# -- the code and the interpreter, for another user ------------------------------


class Sandbox:
    """A test's directory laid out for processes of other users.

    ``lib/takeover`` (a copy of the package), the scripts copied with
    :meth:`script`, and ``run/``, the control socket's directory, owned by
    ``run_owner`` (the user that republishes there must create files in it).
    """

    def __init__(
        self,
        workdir: str,
        *,
        run_owner: str = "nobody",
        run_group: str = "nogroup",
        run_mode: int = 0o755,
    ) -> None:
        self.root = workdir
        os.chmod(workdir, 0o755)
        self.lib = os.path.join(workdir, "lib")
        # With its __pycache__ (make bytecode's): sources keep their mtimes, so
        # the compiled files stay valid and no process compiles takeover again.
        shutil.copytree(os.path.join(ROOT, "src", "takeover"), os.path.join(self.lib, "takeover"))
        self.run = os.path.join(workdir, "run")
        os.mkdir(self.run)
        os.chown(self.run, uid(run_owner), gid(run_group))
        os.chmod(self.run, run_mode)
        self.control = os.path.join(self.run, "control.sock")
        self.env = {"PYTHONPATH": self.lib, "PYTHONDONTWRITEBYTECODE": "1"}

    def script(self, name: str) -> str:
        """A copy of ``examples/NAME.py`` that every user can read."""
        path = os.path.join(self.root, f"{name}.py")
        shutil.copyfile(os.path.join(EXAMPLES, f"{name}.py"), path)
        os.chmod(path, 0o644)
        return path


def interpreter_view() -> tuple[str, list[str]]:
    """This interpreter's path, and the directories to mount back for another user.

    Returns ``(python, exposed)``: ``python`` is the interpreter itself (a
    venv's base interpreter: the venv's packages are not needed), ``exposed``
    its installation's directories that lie behind a directory others may not
    enter (empty when nothing is hidden).
    """
    python = os.path.realpath(sys.executable)
    needed = [os.path.realpath(sys.base_prefix), os.path.dirname(python)]
    exposed: list[str] = []
    for path in needed:
        if _blocker(path) is None:
            continue
        if any(path == e or path.startswith(e + os.sep) for e in exposed):
            continue
        exposed = [e for e in exposed if not e.startswith(path + os.sep)] + [path]
    return python, exposed


def _blocker(path: str) -> str | None:
    """The first directory on the way to ``path`` that others may not enter
    (no o+x: users such as nobody and daemon can't)."""
    parts = path.strip(os.sep).split(os.sep)
    for i in range(len(parts)):
        ancestor = os.sep + os.sep.join(parts[:i])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def user_command(
    user: str,
    group: str,
    argv: Sequence[str],
    *,
    groups: Sequence[str] = (),
    env: dict[str, str] | None = None,
    cwd: str,
    stages: str,
) -> list[str]:
    """The command that runs ``python ARGV`` (this interpreter) as ``user``:``group``
    (supplementary ``groups``, else none) in ``cwd``, with exactly ``env``.

    A shell runs as root in a private mount namespace, makes the interpreter
    reachable (see the module's docstring; its mount points are made in
    ``stages``), and execs ``setpriv``, which sets the ids and execs the
    interpreter: the pid stays the command's, and the interpreter never runs
    as root.
    """
    python, exposed = interpreter_view()
    lines = ["set -e"]
    blockers: dict[str, list[tuple[str, str]]] = {}
    for i, path in enumerate(exposed):
        stage = os.path.join(stages, f".stage{i}")
        os.makedirs(stage, exist_ok=True)
        lines.append(f"mount --bind {shlex.quote(path)} {shlex.quote(stage)}")
        blocker = _blocker(path)
        assert blocker is not None
        blockers.setdefault(blocker, []).append((path, stage))
    for blocker, paths in blockers.items():
        lines.append(f"mount -t tmpfs -o mode=0755 takeover-test {shlex.quote(blocker)}")
        for path, stage in paths:
            lines.append(f"mkdir -p {shlex.quote(path)}")
            lines.append(f"mount --bind {shlex.quote(stage)} {shlex.quote(path)}")
    ids = [f"--reuid={user}", f"--regid={group}"]
    ids.append(f"--groups={','.join(str(gid(g)) for g in groups)}" if groups else "--clear-groups")
    environment = [
        "PATH=/usr/bin:/bin",
        "HOME=/nonexistent",
        "PYTHONUNBUFFERED=1",
        *(f"{key}={value}" for key, value in (env or {}).items()),
    ]
    run = ["setpriv", *ids, "--", "env", "-i", *environment, python, *argv]
    lines.append(f"cd {shlex.quote(cwd)}")
    lines.append("exec " + " ".join(shlex.quote(word) for word in run))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines)]


@functools.cache
def _interpreter_problem() -> str | None:
    """Why user nobody can't run this interpreter as :func:`user_command` does, if so."""
    stages = tempfile.mkdtemp(prefix="tk", dir="/tmp")
    try:
        os.chmod(stages, 0o755)
        command = user_command(
            "nobody", "nogroup", ["-c", "import asyncio"], cwd=stages, stages=stages
        )
        probe = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(stages, ignore_errors=True)
    if probe.returncode != 0:
        return (
            f"user nobody cannot run {sys.executable} even with its installation mounted "
            f"back: {probe.stderr.strip() or probe.returncode}"
        )
    return None


def as_user(
    sandbox: Sandbox,
    netns: NetNamespace,
    user: str,
    group: str,
    argv: Sequence[str],
    *,
    groups: Sequence[str] = (),
) -> Proc:
    """Run ``python ARGV`` as ``user``:``group`` in ``netns``, with this interpreter and
    the sandbox's copy of takeover (see :func:`user_command`)."""
    command = user_command(
        user, group, argv, groups=groups, env=sandbox.env, cwd=sandbox.root, stages=sandbox.root
    )
    return Proc(netns.command(command))


def as_root(sandbox: Sandbox, netns: NetNamespace, argv: Sequence[str]) -> Proc:
    """Run ``python ARGV`` as root (this interpreter) in ``netns``, with the sandbox's code."""
    return Proc(netns.command([sys.executable, *argv]), env=sandbox.env)
