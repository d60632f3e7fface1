"""What a supervisor is told: sd_notify messages and PID files.

A supervisor watches one process per service: systemd its unit's main PID
(and, for ``Type=notify``, the messages that PID sends to ``$NOTIFY_SOCKET``),
monit or an init script the PID in a PID file. A move changes the process
that serves, so each side says so:

* a process that publishes services sends ``READY=1`` and a one-line
  ``STATUS=`` (with ``X_TAKEOVER_*`` fields that ``takeover run`` reads, see
  ``takeover.anchor``), and writes its PID into the PID file;
* a process whose services have all moved away sends ``MAINPID=`` the
  successor's PID (with ``READY=1`` on its behalf), waits until the
  supervisor has read that (``BARRIER=1``), and writes the successor's PID
  into the PID file, before it exits. A supervisor therefore never sees its
  main process exit without knowing the next one.

The protocol is systemd's (sd_notify(3)): datagrams of ``KEY=VALUE`` lines
to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace). Without ``$NOTIFY_SOCKET`` nothing is sent. Sending
never raises: a supervisor that has gone away must not take the service
with it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("takeover.supervision")

BARRIER_TIMEOUT = 5.0


def _address(value: str) -> str:
    """A ``$NOTIFY_SOCKET`` value as a socket address ('@' is the abstract namespace)."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """A connection to a supervisor's notification socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """The supervisor named by ``$NOTIFY_SOCKET``, or None."""
        path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        return cls(path) if path.startswith(("/", "@")) else None

    def send(self, fields: Mapping[str, object], fds: tuple[int, ...] = ()) -> bool:
        """Send ``fields`` as one message; False (logged) if it could not go."""
        text = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(_address(self.path))
                if fds:
                    socket.send_fds(sock, [text.encode()], list(fds))
                else:
                    sock.send(text.encode())
        except OSError as exc:
            log.warning("could not notify the supervisor at %s: %s", self.path, exc)
            return False
        return True

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Wait until the supervisor has read every message sent before (``BARRIER=1``).

        The supervisor closes the descriptor sent with the barrier once it
        has processed the messages before it; True if that happened within
        ``timeout``.
        """
        read, write = os.pipe()
        try:
            sent = self.send({"BARRIER": 1}, (write,))
            os.close(write)
            write = -1
            if not sent:
                return False
            import select

            ready, _, _ = select.select([read], [], [], timeout)
            return bool(ready)
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def status_fields(
    services: int, connections: int, *, pause_ms: float | None = None, error: str | None = None
) -> dict[str, object]:
    """``STATUS=`` and the ``X_TAKEOVER_*`` fields of a process that serves."""
    text = f"serving {services} service(s), {connections} connection(s) (pid {os.getpid()})"
    fields: dict[str, object] = {
        "X_TAKEOVER_SERVICES": services,
        "X_TAKEOVER_CONNECTIONS": connections,
    }
    if pause_ms is not None:
        text += f"; moved here with a pause of {pause_ms:.2f} ms"
        fields["X_TAKEOVER_PAUSE_MS"] = f"{pause_ms:.3f}"
    if error is not None:
        text += f"; last error: {error}"
    return {"STATUS": text, **fields}


def write_pid_file(path: str, pid: int) -> None:
    """Replace the PID file at ``path`` with ``pid``, atomically (write, then rename)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{pid}\n")
    os.replace(temporary, path)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``RELOADING=1`` wants it (``MONOTONIC_USEC``)."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


class Supervisor:
    """What this process tells its supervisor as it serves and as its services move.

    Args:
        pid_file: the PID file to keep up to date (None: none).
        notifier: the supervisor's socket (default: ``$NOTIFY_SOCKET``'s, if set).
    """

    def __init__(self, pid_file: str | None = None, notifier: Notifier | None = None) -> None:
        self.pid_file = os.path.abspath(pid_file) if pid_file else None
        self.notifier = notifier if notifier is not None else Notifier.from_env()

    def handed_on(self) -> dict[str, str]:
        """What a successor is asked to carry on (the ``supervision`` of a listing)."""
        return {"pid_file": self.pid_file} if self.pid_file else {}

    def serving(self, services: int, connections: int, *, pause_ms: float | None = None) -> None:
        """This process serves (it published, or took and published again)."""
        if self.pid_file:
            _write_pid(self.pid_file, os.getpid())
        if self.notifier is not None:
            fields = status_fields(services, connections, pause_ms=pause_ms)
            self.notifier.send({"READY": 1, **fields})

    def failed(self, error: str) -> None:
        """A take failed here (the service goes on in the originator)."""
        if self.notifier is not None:
            self.notifier.send({"X_TAKEOVER_ERROR": error})

    def moved_away(self, successor: int | None) -> None:
        """Every service moved on to ``successor``: hand the supervisor over to it.

        Called before this process exits: the supervisor reads MAINPID before
        it sees this process go (the barrier), and the PID file names the
        successor.
        """
        if successor is None:
            return
        if self.pid_file:
            _write_pid(self.pid_file, successor)
        if self.notifier is not None:
            status = f"moved to pid {successor}"
            sent = self.notifier.send({"MAINPID": successor, "READY": 1, "STATUS": status})
            if sent and not self.notifier.barrier():
                log.warning("the supervisor did not confirm MAINPID=%s in time", successor)


def _write_pid(path: str, pid: int) -> None:
    try:
        write_pid_file(path, pid)
    except OSError as exc:
        log.warning("could not write the PID file %s: %s", path, exc)
