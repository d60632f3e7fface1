"""The drop tables of an originator that dies while its connections are frozen.

A move across hosts drops its connections' packets with an nft table of its
own (``tcprepair.Freeze``), named ``takeover_PIDNS_PID_N``. An originator
killed before it lifts the table would leave the clients talking to a black
hole on this host, and new connections to the service's port dropped for good.
So each move starts a :class:`DropGuard`, which deletes the process's tables
when the process is gone, and sweeps the tables of processes that are gone
(:func:`sweep_stale_tables`). docs/crosshost.md, "The in-doubt window".
"""

from __future__ import annotations

import os
import re
import subprocess

from .errors import RepairError


def nft(script: str) -> None:
    """Run an nft script (``nft -f -``); RepairError with its stderr if it fails."""
    result = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise RepairError(f"nft failed: {result.stderr.strip() or result.returncode}")


def pid_namespace() -> int:
    """This process's PID namespace (its inode): a pid means something only there."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def table_prefix(pid: int | None = None) -> str:
    """The name every drop table of process ``pid`` (default: this one) starts
    with: ``takeover_PIDNS_PID_``. Processes in other PID namespaces may share
    the network namespace (a pod's containers): their tables are not ours to judge."""
    return f"takeover_{pid_namespace()}_{os.getpid() if pid is None else pid}_"


_TABLE_NAME = re.compile(r"^table inet (takeover_(\d+)_(\d+)_\d+)$", re.MULTILINE)


def sweep_stale_tables() -> list[str]:
    """Delete the drop tables left by processes of this PID namespace that are
    gone (an originator killed while its connections were frozen, its guard
    with it); the names deleted."""
    listed = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=30, check=False
    )
    stale = []
    namespace = pid_namespace()
    for match in _TABLE_NAME.finditer(listed.stdout):
        pid = int(match.group(3))
        if int(match.group(2)) != namespace or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(match.group(1))
        except PermissionError:
            pass  # alive, another user's
    if stale:
        nft("".join(f"delete table inet {name}\n" for name in stale))
    return stale


# The guard: ``read`` returns at the end of its input, which comes when the
# process that holds the pipe's other end goes, however it goes. "done" on it
# says every table was lifted already.
_GUARD_SCRIPT = (
    'read said; [ "$said" = done ] && exit 0; '
    "for t in $(nft list tables 2>/dev/null | sed -n 's/^table inet \\({prefix}[0-9]*\\)$/\\1/p'); "
    'do nft delete table inet "$t"; done'
)


class DropGuard:
    """A watchdog process that deletes this process's drop tables if it dies
    before lifting them (killed while frozen), so that the clients are not
    left talking to a black hole on this host, nor new connections to the port.

    ``sh`` reading a pipe whose write end only this process holds (close on
    exec; a plain fork would share it). :meth:`stop` tells it all is lifted.
    """

    def __init__(self) -> None:
        script = _GUARD_SCRIPT.format(prefix=table_prefix())
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a signal to this process group spares it
        )

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        """Every table is lifted: the guard leaves without touching anything."""
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            process.stdin.write(b"done\n")
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
