"""``takeover run``: a process whose PID never changes, for supervisors.

systemd, supervisord and container runtimes watch one process. A move
replaces the process that serves, so under them the server's own PID is the
wrong thing to watch: systemd kills the unit when its main PID exits (or the
cgroup is left with a server nobody supervises), a container stops when its
PID 1 exits. The anchor is the process they watch (einhorn and socketmaster
do the same for listening sockets)::

    takeover run --control /run/echo.sock -- python app.py --control /run/echo.sock

* It starts COMMAND, and becomes a *child subreaper* (``PR_SET_CHILD_SUBREAPER``),
  so that every process started below it (successors, their orphans) is
  reparented to it rather than to PID 1, and reaped by it.
* On SIGHUP it starts the successor (``takeover take CONTROL`` under this
  interpreter, or ``--successor`` COMMAND). The successor takes the
  services; the old server exits once they have moved.
* SIGTERM and SIGINT go to the process that serves (and to a successor in
  progress). The anchor exits once no server is left, with the status of the
  last one; if a signal killed it, the anchor kills itself with that signal,
  so that its supervisor sees what it would have seen of the server (as PID
  1, which a signal without a handler does not kill, it exits with 128+N).
* It learns what happens from the processes themselves: it gives them its
  own notification socket as ``$NOTIFY_SOCKET``, and takeover's servers
  report there (``READY=1`` once published, ``MAINPID=`` the successor once
  their services moved, ``X_TAKEOVER_ERROR=`` when a take fails; see
  ``takeover._core.supervision``).
* Under systemd (``$NOTIFY_SOCKET`` set for the anchor itself) it passes on
  ``READY=1`` once the first server has published; on SIGHUP
  ``RELOADING=1`` with ``MONOTONIC_USEC``, then ``READY=1`` once the move
  has committed or failed; and a one-line ``STATUS=``: the serving pid, its
  services and connections, the moves so far, the last pause or the last
  error. A failed move leaves the old server serving and the unit active.

As PID 1 of a container it does what an init must: it reaps every zombie and
it handles SIGTERM and SIGINT (a PID 1 gets no default action for them).
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._core.supervision import Notifier, monotonic_usec

log = logging.getLogger("takeover.anchor")

PR_SET_CHILD_SUBREAPER = 36
LINGER = 5.0
"""Seconds the anchor waits, once no server is left, for the rest (old servers
still retiring) to exit, before it exits itself."""
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Linux's values, for interpreters whose socket module lacks the names (PyPy).
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


def become_subreaper() -> bool:
    """Make orphans below this process its children (Linux); False where impossible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass
class _State:
    """What the anchor knows about the processes below it."""

    serving: int | None = None
    successor: int | None = None
    ready: bool = False
    moves: int = 0
    services: str = "?"
    connections: str = "?"
    pause: str | None = None
    error: str | None = None
    attempt_error: str | None = None  # what the successor in progress reported
    status: int = 0
    stopping: bool = False
    started: set[int] = field(default_factory=set)

    def line(self) -> str:
        """The one-line STATUS."""
        text = (
            f"serving pid {self.serving}: {self.services} service(s), "
            f"{self.connections} connection(s); {self.moves} move(s)"
        )
        if self.error is not None:
            return f"{text}; last move failed: {self.error}"
        if self.pause is not None:
            return f"{text}; last pause {self.pause} ms"
        return text


class Anchor:
    """The running anchor: its children, its notification socket, its supervisor.

    Args:
        command: the first server's command line.
        successor: the command started on SIGHUP.
    """

    def __init__(self, command: Sequence[str], successor: Sequence[str]) -> None:
        self.command = list(command)
        self.successor = list(successor)
        self.state = _State()
        self.upstream = Notifier.from_env()
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []

    # -- set-up ----------------------------------------------------------------

    def _open_notify_socket(self) -> str:
        """Our own $NOTIFY_SOCKET for the children (abstract, with sender credentials)."""
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"takeover-anchor-{os.getpid()}-{os.urandom(6).hex()}"
        self._notify.bind("\0" + name)
        self._notify.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self._selector.register(self._notify, selectors.EVENT_READ, self._notified)
        return "@" + name

    def _trap_signals(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        self._selector.register(reader, selectors.EVENT_READ, self._drain_wakeup)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup[0].recv(4096):
                pass
        except BlockingIOError:
            pass

    def _spawn(self, argv: Sequence[str]) -> int:
        pid = _spawn(list(argv), self._env)
        self.state.started.add(pid)
        return pid

    # -- the loop ----------------------------------------------------------------

    def run(self) -> int:
        """Start the first server and supervise until no server is left; its status."""
        if not become_subreaper():
            log.warning("could not become a child subreaper: orphans go to PID 1")
        self._env = dict(os.environ, NOTIFY_SOCKET=self._open_notify_socket())
        self._env["TAKEOVER_ANCHOR_PID"] = str(os.getpid())
        self._trap_signals()
        try:
            self.state.serving = self._spawn(self.command)
        except OSError as exc:
            log.error("cannot start %s: %s", self.command[0], exc)
            return 127
        log.info("started pid %s: %s", self.state.serving, " ".join(self.command))
        while self.state.serving is not None or self.state.successor is not None:
            for key, _ in self._selector.select():
                key.data()
            self._handle_signals()
        log.info("no server left; exiting with status %s", self.state.status)
        self._selector.close()
        _reap_the_rest(LINGER)
        return self.state.status

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum == signal.SIGHUP:
                self._reload()
            else:
                self._stop(signum)

    def _reload(self) -> None:
        state = self.state
        if state.stopping or state.serving is None:
            return
        if state.successor is not None:
            log.warning("SIGHUP: a move is in progress (pid %s); ignored", state.successor)
            return
        self._tell({"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()})
        state.attempt_error = None
        try:
            state.successor = self._spawn(self.successor)
        except OSError as exc:
            self._move_failed(f"cannot start {self.successor[0]}: {exc}")
            return
        log.info("SIGHUP: started successor pid %s: %s", state.successor, " ".join(self.successor))

    def _stop(self, signum: int) -> None:
        self.state.stopping = True
        for pid in (self.state.serving, self.state.successor):
            if pid is not None:
                log.info("passing %s on to pid %s", signal.Signals(signum).name, pid)
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def _reap(self) -> None:
        state = self.state
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
            if pid == state.successor:
                state.successor = None
                if state.serving is not None and not state.stopping:
                    reason = state.attempt_error or f"the successor exited with status {code}"
                    self._move_failed(f"pid {pid}: {reason}")
                elif state.serving is None:
                    state.status = code
            elif pid == state.serving:
                state.status = code
                state.serving = None
                log.info("pid %s, which served, exited with status %s", pid, code)
            else:
                log.debug("reaped pid %s (status %s)", pid, code)

    # -- what the processes say ----------------------------------------------------

    def _notified(self) -> None:
        while True:
            try:
                data, ancillary, _flags, _addr = self._notify.recvmsg(
                    4096, socket.CMSG_SPACE(_CREDENTIALS.size) + socket.CMSG_SPACE(16 * 4)
                )
            except BlockingIOError:
                return
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                    sender, uid, _gid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])
                    if uid not in (os.geteuid(), 0):
                        sender = None
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    # BARRIER=1 comes with a descriptor: closing it says every
                    # message before it has been read, as systemd does.
                    usable = len(payload) - len(payload) % 4
                    for fd in struct.unpack(f"{usable // 4}i", payload[:usable]):
                        os.close(fd)
            if sender is None:
                continue
            lines = data.decode(errors="replace").splitlines()
            self._update(sender, dict(line.split("=", 1) for line in lines if "=" in line))

    def _update(self, sender: int, fields: dict[str, str]) -> None:
        state = self.state
        if sender not in (state.serving, state.successor):
            return
        before = state.line()
        if "X_TAKEOVER_SERVICES" in fields:
            state.services = fields["X_TAKEOVER_SERVICES"]
            state.connections = fields.get("X_TAKEOVER_CONNECTIONS", "?")
        if "X_TAKEOVER_PAUSE_MS" in fields:
            state.pause = fields["X_TAKEOVER_PAUSE_MS"]
        if "X_TAKEOVER_ERROR" in fields and sender == state.successor:
            state.attempt_error = fields["X_TAKEOVER_ERROR"]
        if sender == state.serving and state.ready and state.line() != before:
            # The new server's own count (its READY may come after the old
            # server's MAINPID): the status line only.
            self._tell({})
        mainpid = fields.get("MAINPID", "")
        if sender == state.serving and mainpid.isdigit() and int(mainpid) != sender:
            # The old server's services have moved to that process.
            self._committed(int(mainpid))
        elif fields.get("READY") == "1" and sender == state.successor:
            self._committed(sender)
        elif fields.get("READY") == "1" and sender == state.serving and not state.ready:
            state.ready = True
            log.info("pid %s serves", sender)
            self._tell({"READY": 1})

    def _committed(self, pid: int) -> None:
        state = self.state
        if state.serving == pid:
            return
        state.serving = pid
        state.successor = None if state.successor == pid else state.successor
        state.moves += 1
        state.error = None
        log.info("the services moved to pid %s (move %s)", pid, state.moves)
        self._tell({"READY": 1})

    def _move_failed(self, error: str) -> None:
        self.state.error = " ".join(error.split())
        log.error("the move failed, pid %s goes on serving: %s", self.state.serving, error)
        self._tell({"READY": 1})

    def _tell(self, fields: dict[str, object]) -> None:
        """Tell the supervisor ``fields`` and the current STATUS line."""
        if self.upstream is not None:
            self.upstream.send({**fields, "STATUS": self.state.line()})


def _spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start ``argv`` (searched in PATH) with ``env``; its pid."""
    spawn = getattr(os, "posix_spawnp", None)
    if spawn is not None:
        return int(spawn(argv[0], argv, env))
    pid = os.fork()  # PyPy has no posix_spawnp
    if pid == 0:
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


def _reap_the_rest(timeout: float) -> None:
    """Wait up to ``timeout`` for what is left below (old servers retiring), reaping it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def run(command: Sequence[str], control: str, successor: Sequence[str] = ()) -> int:
    """Run ``command`` under an anchor; return the exit status of the last server.

    Args:
        command: the first server.
        control: its control path, for the default successor.
        successor: the command to start on SIGHUP (default: ``takeover take
            CONTROL`` under this interpreter).
    """
    following = list(successor) or [sys.executable, "-m", "takeover", "take", control]
    status = Anchor(command, following).run()
    if status < 0:
        if os.getpid() != 1:
            signal.signal(-status, signal.SIG_DFL)
            os.kill(os.getpid(), -status)
        return 128 - status
    return status
