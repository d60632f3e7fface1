"""A real systemd as PID 1 of private namespaces, for tests that run services under it.

:class:`SystemdNamespace` boots the machine's own systemd (not a mock, not a
user manager) as PID 1 of a new PID, mount, UTS and cgroup namespace, so that a
test can write unit files, ``systemctl start``/``reload``/``stop`` them, read
``MainPID`` and ``NRestarts`` and watch ``Restart=`` at work, exactly as on a
host that boots with systemd. The network namespace is the host's: the test
process connects to what the units serve on 127.0.0.1 or on an AF_UNIX path.

How it boots, and why each step (the shell script ``_SETUP`` does the mounts as
the namespace's PID 1, then execs systemd)::

    setpriv --pdeathsig KILL            # the test process dies: so does unshare
      sh -c 'echo $$ > CGROUP/cgroup.procs; exec unshare ...'
        unshare --fork --pid --mount-proc --mount --propagation private
                --uts --cgroup --kill-child   # unshare dies: so does PID 1
          sh -c _SETUP                  # PID 1: mounts, then
            exec systemd --unit=takeover-test.target --log-target=console ...

* cgroups: systemd as PID 1 creates ``init.scope`` and ``system.slice`` at the
  root of the cgroup hierarchy it sees and moves processes around in it. So the
  outer shell first moves itself into a fresh child of the test process's own
  cgroup v2 directory (``CGROUP``, see :func:`cgroup_root`), ``unshare
  --cgroup`` makes that child the namespace's cgroup root, and the setup
  mounts a cgroup2 of its own on ``/sys/fs/cgroup`` (over a read-only bind of
  ``/sys``, whose other cgroup mounts it hides): systemd runs in unified mode
  inside that child whatever the host uses, and cannot see, let alone move,
  any process of the host. :meth:`SystemdNamespace.stop` removes the child.
* ``/tmp``, ``/var/tmp`` and ``/run`` are fresh tmpfs mounts: a unit that pulls
  in ``sysinit.target`` would run ``systemd-tmpfiles``, which empties ``/tmp``,
  and systemd keeps its state (``/run/systemd``) there. Directories of the host
  that the units need from under those (the test's work directory, this
  harness's state directory) are bind-mounted back at the same path, so a
  path means the same thing inside and out (``rm -rf`` and tmpfiles' clean-up
  do not cross mount points). Unit files go in ``/run/systemd/system``, a bind
  of :attr:`SystemdNamespace.units` on the host.
* The host cannot be written through it: mount propagation is private (the
  host sees none of these mounts), ``/etc``, ``/sys`` and ``/proc/sys`` are
  read-only binds (systemd would otherwise raise ``fs.nr_open`` and
  ``fs.file-max`` for the whole machine), ``/dev/kmsg`` is ``/dev/null``, and
  ``container=takeover-test`` in its environment tells systemd that it runs in
  a container, where it loads no kernel module and sets no clock, as it would
  as the host's init. Generators do not run (``SYSTEMD_GENERATOR_PATH``): they
  would turn the host's ``/etc/fstab`` and init scripts into units, and slow
  down every ``daemon-reload``.
* ``/dev/console`` is a pseudo-terminal that a thread of the test process
  reads into :attr:`SystemdNamespace.console_log`: systemd as PID 1 of a
  container logs to ``/dev/console`` only if it is a terminal (a plain file
  bound there gets nothing), and at boot it resets the console, which would
  otherwise be the host's.
* No journald: it would read the host's kernel log (``/dev/kmsg``) and open
  the kernel's audit socket, which is the whole machine's. Instead a drop-in for every service
  (``service.d/``) sends its output to ``logs/UNIT.log`` (:meth:`~SystemdNamespace.output`);
  a unit that sets ``StandardOutput=`` itself is overridden by that drop-in
  unless it adds a drop-in of its own sorting after ``50-takeover-test-output.conf``.

Ending it: SIGKILL to its PID 1 kills every process of a PID namespace; once
``unshare`` has reaped PID 1 none is left, the mounts went with the mount
namespace, and :meth:`SystemdNamespace.stop` removes the cgroup directories and
the state directory. No ``systemctl poweroff``: its shutdown would run the
units' stop commands against a host that never booted them.

Processes inside see their PIDs in the namespace (``MainPID`` is one of those);
:meth:`SystemdNamespace.host_pid` translates for ``os.kill`` and ``/proc``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Sequence
from types import TracebackType

from harness import procs
from harness.waiting import wait_until

#: The default unit systemd boots: a target that pulls in nothing.
TARGET = "takeover-test.target"
#: What the namespace's systemd reads in ``$container``.
CONTAINER = "takeover-test"
#: Directories that are fresh tmpfs mounts inside.
MASKED = ("/tmp", "/var/tmp", "/run")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_TARGET_UNIT = """\
[Unit]
Description=takeover test namespace (nothing but what the test starts)
DefaultDependencies=no
AllowIsolate=yes
"""

_OUTPUT_DROPIN = """\
# Written by harness/systemd.py: no journald runs in the test namespace.
[Service]
StandardOutput=append:{logs}/%n.log
StandardError=inherit
"""

# Run by sh as PID 1 of the new namespaces (after unshare's --mount-proc), then
# replaced by systemd. $1: the console terminal, $2: the directory of unit
# files, $3: the systemd binary, $4...: systemd's arguments up to "--", then
# the host directories to show again at the same path under /tmp, /var/tmp or
# /run.
_SETUP = r"""
set -eu
console=$1 units=$2 systemd=$3
shift 3
args=""
while [ "$1" != "--" ]; do args="$args $1"; shift; done
shift
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/takeover-test/host
i=0
for path in "$@"; do
    i=$((i + 1))
    mkdir /run/takeover-test/host/$i
    mount --bind "$path" /run/takeover-test/host/$i
done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
i=0
for path in "$@"; do
    i=$((i + 1))
    mkdir -p "$path"
    mount --bind /run/takeover-test/host/$i "$path"
done
mkdir -p /run/systemd/system
mount --bind "$units" /run/systemd/system
mount --bind /sys /sys
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount --bind /etc /etc
mount -o remount,bind,ro /etc
mount --bind "$console" /dev/console
mount --bind /dev/null /dev/kmsg
exec "$systemd" $args
"""


class SystemdError(AssertionError):
    """The namespace did not boot, or a command in it failed (an AssertionError: tests fail)."""


def find_systemd() -> str | None:
    """The systemd binary of this machine, or None."""
    for path in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
        if os.access(path, os.X_OK):
            return path
    return None


def cgroup_root() -> str | None:
    """The cgroup v2 directory of this process on the host, or None if there is no cgroup2 mount.

    Its children are where a namespace's systemd runs (one per namespace).
    """
    own = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, _, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                own = path
    if own is None:
        return None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "cgroup2":
                continue
            # The mount shows the hierarchy from ``root`` down.
            root, mountpoint = fields[3], fields[4].replace("\\040", " ")
            if root == "/" or own == root or own.startswith(root.rstrip("/") + "/"):
                relative = own[len(root) :] if root != "/" else own
                return os.path.normpath(os.path.join(mountpoint, relative.lstrip("/")))
    return None


@functools.cache
def unavailable() -> str | None:
    """Why a systemd namespace cannot run here, or None if it can.

    Checks what :meth:`SystemdNamespace.start` needs, ending with a real
    ``unshare`` of every namespace it uses (a container may forbid it).
    """
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (unshare, mount, cgroups)"
    for tool in ("unshare", "nsenter", "setpriv", "mount", "systemctl"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    if find_systemd() is None:
        return "no systemd binary (/lib/systemd/systemd)"
    root = cgroup_root()
    if root is None:
        return "no cgroup v2 hierarchy mounted (systemd needs one of its own)"
    probe = os.path.join(root, f"takeover-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return f"cannot create a cgroup under {root}: {e}"
    argv = ["unshare", "--fork", "--pid", "--mount-proc", "--mount", "--uts", "--cgroup", "true"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(argv)}: {e}"
    if result.returncode != 0:
        return f"{' '.join(argv)} failed: {result.stderr.strip()}"
    return None


class SystemdNamespace:
    """systemd as PID 1 of private namespaces (see the module's docstring).

    Args:
        binds: host directories the units need that are under ``/tmp``,
            ``/var/tmp`` or ``/run`` (fresh tmpfs mounts inside), shown at the
            same path; others are visible as they are. This checkout and the
            running Python's prefix are added when they are there.
        log_level: systemd's log level (``debug`` logs every notification a
            unit sends).
        keep: leave the state directory (unit files, logs) behind on stop.
        boot_timeout: seconds allowed to reach ``running``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    PID 1 gets SIGKILL if the thread that started it exits (``setpriv
    --pdeathsig``): start it from the thread that runs the test.
    """

    def __init__(
        self,
        binds: Sequence[str] = (),
        *,
        log_level: str = "info",
        keep: bool = False,
        boot_timeout: float = 20.0,
    ) -> None:
        self.log_level, self.keep, self.boot_timeout = log_level, keep, boot_timeout
        self.state = tempfile.mkdtemp(prefix="tksd", dir="/tmp")
        #: Unit files: /run/systemd/system inside.
        self.units = os.path.join(self.state, "system")
        #: Every service's output, one file per unit (StandardOutput=append:).
        self.logs = os.path.join(self.state, "logs")
        #: What systemd logged on its console.
        self.console_log = os.path.join(self.state, "console.log")
        #: stdout and stderr of unshare and of the setup script.
        self.setup_log = os.path.join(self.state, "setup.log")
        os.mkdir(self.units)
        os.mkdir(self.logs)
        wanted = [self.state, procs.ROOT, sys.prefix, *binds]
        self.binds = [os.path.abspath(p) for p in dict.fromkeys(wanted) if _masked(p)]
        #: Host PID of the namespace's PID 1 (systemd once booted; kept after stop).
        self.pid1: int | None = None
        #: The namespace's cgroup root on the host (removed by stop).
        self.cgroup: str | None = None
        self._pidns: str | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._console: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None

    # -- starting and stopping ------------------------------------------------------

    def start(self) -> SystemdNamespace:
        """Boot systemd and wait until ``systemctl is-system-running`` says ``running``.

        Raises:
            SystemdError: it did not boot (the message has its logs).
        """
        try:
            reason = unavailable()
            if reason is not None:
                raise SystemdError(f"it cannot run here: {reason}")
            systemd, root = find_systemd(), cgroup_root()
            assert systemd is not None and root is not None
            self._boot(systemd, root)
        except BaseException as e:
            report = self.diagnostics()
            self.stop()
            raise SystemdError(f"systemd did not boot in its namespace: {e}\n{report}") from e
        return self

    def _boot(self, systemd: str, root: str) -> None:
        with open(os.path.join(self.units, TARGET), "w") as f:
            f.write(_TARGET_UNIT)
        os.makedirs(os.path.join(self.units, "service.d"))
        dropin = os.path.join(self.units, "service.d", "50-takeover-test-output.conf")
        with open(dropin, "w") as f:
            f.write(_OUTPUT_DROPIN.format(logs=self.logs))

        self.cgroup = os.path.join(root, f"takeover-systemd-{uuid.uuid4().hex[:12]}")
        os.mkdir(self.cgroup)

        master, slave = pty.openpty()
        self._console = (master, slave)
        self._reader = threading.Thread(target=self._read_console, args=(master,), daemon=True)
        self._reader.start()

        systemd_args = [
            f"--unit={TARGET}",
            "--log-target=console",
            f"--log-level={self.log_level}",
            "--log-color=no",
            "--log-time=yes",
            "--show-status=no",
        ]
        unshare = [
            "unshare",
            "--fork",
            "--pid",
            "--mount-proc",
            "--mount",
            "--propagation",
            "private",
            "--uts",
            "--cgroup",
            # unshare dies: PID 1 gets SIGKILL. (util-linux 2.38's unshare then
            # says "sigprocmask unblock failed" as it exits: harmless.)
            "--kill-child",
            *("sh", "-c", _SETUP, "setup", os.ttyname(slave), self.units, systemd),
            *systemd_args,
            "--",
            *self.binds,
        ]
        outer = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
        argv = ["setpriv", "--pdeathsig", "KILL", "sh", "-c", outer, "sh", self.cgroup, *unshare]
        env = {
            "PATH": _PATH,
            "LANG": "C.UTF-8",
            "container": CONTAINER,
            "SYSTEMD_GENERATOR_PATH": "/run/takeover-test/no-generators",
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": "/run/takeover-test/no-generators",
        }
        with open(self.setup_log, "wb") as log:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        popen, unshare_pid = self._popen, self._popen.pid

        def alive() -> None:
            if popen.poll() is not None:
                raise SystemdError(f"unshare exited with {popen.returncode}")

        def forked() -> int | None:
            alive()
            try:
                with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
                    children = f.read().split()
            except OSError:
                return None
            return int(children[0]) if children else None

        self.pid1 = wait_until(forked, self.boot_timeout, what="unshare to fork PID 1")
        # unshare, outside the PID namespace, has no business in the
        # namespace's cgroup root: systemd cannot see it there ("Couldn't move
        # remaining userspace processes"), and a cgroup v2 with processes of
        # its own cannot hand controllers down to systemd's slices. Done while
        # PID 1 is still the setup script, most of the time.
        with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.procs"), "w") as f:
            f.write(str(unshare_pid))
        real, pid = os.path.realpath(systemd), self.pid1

        def execd() -> bool:
            alive()
            try:
                return os.path.realpath(f"/proc/{pid}/exe") == real
            except OSError:
                return False

        wait_until(execd, self.boot_timeout, what="the setup to exec systemd as PID 1")
        self._pidns = os.readlink(f"/proc/{pid}/ns/pid")

        def running() -> bool:
            alive()
            # "offline" until systemd listens on /run/systemd/private.
            state = self.systemctl("is-system-running").stdout.strip()
            if state in ("degraded", "maintenance", "stopping"):
                raise SystemdError(f"systemd is {state}: {self.systemctl('--failed').stdout}")
            return state == "running"

        wait_until(running, self.boot_timeout, what="systemctl is-system-running: running")

    def _read_console(self, master: int) -> None:
        """Copy the console into :attr:`console_log` until the terminal hangs up."""
        with open(self.console_log, "ab", buffering=0) as log:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: no one holds the terminal any more
                    return
                if not data:
                    return
                log.write(data.replace(b"\r\n", b"\n"))

    def stop(self) -> None:
        """Kill PID 1 (and with it every process inside) and remove what was made for it.

        Safe to call twice, and after a failed :meth:`start`. Returns once no
        process of the namespace is left, its cgroups are gone and the console
        thread has ended.
        """
        if self._popen is not None:
            if self.pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGKILL)
            else:  # not yet PID 1: --kill-child takes the child with unshare
                self._popen.kill()
            try:
                self._popen.wait(20)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(20)
            self._popen = None
        if self._pidns is not None:
            wait_until(lambda: not self.processes(), 20, what="every process of the namespace")
        if self._console is not None:
            master, slave = self._console
            os.close(slave)  # the last holder: the reader gets EIO
            if self._reader is not None:
                self._reader.join(10)
            os.close(master)
            self._console = self._reader = None
        if self.cgroup is not None:
            cgroup = self.cgroup
            wait_until(lambda: _remove_cgroup(cgroup), 20, what=f"removal of {cgroup}")
        if not self.keep:
            shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> SystemdNamespace:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, SystemdError):
            # The state directory goes with stop(): say what systemd saw first.
            print(self.diagnostics(), file=sys.stderr)
        self.stop()

    # -- units ----------------------------------------------------------------------

    def write_unit(self, name: str, text: str) -> str:
        """Write a unit file (or a drop-in: ``NAME.service.d/x.conf``); returns its host path.

        systemd loads a unit the first time it is named; a unit it has loaded
        needs :meth:`daemon_reload` to see a change.
        """
        path = os.path.join(self.units, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def daemon_reload(self) -> None:
        """``systemctl daemon-reload``; raises :class:`SystemdError` if it fails."""
        self.systemctl("daemon-reload", check=True)

    def systemctl(
        self, *args: str, check: bool = False, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl ARGS`` inside (text output, no pager).

        Raises:
            SystemdError: ``check`` and it exited non-zero.
        """
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60.0,
        input: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespaces (``nsenter``), with stdout and stderr captured.

        The command sees the namespace's files, PIDs and cgroups but is no
        unit of systemd's (it stays in the test's cgroup): for that, start a
        unit. Its environment is a minimal one (``PATH``, ``LANG``) and ``env``.

        Raises:
            SystemdError: ``check`` and it exited non-zero.
        """
        if self._popen is None or self.pid1 is None:
            raise SystemdError("the systemd namespace is not running")
        where = [f"--wd={cwd}"] if cwd is not None else []
        nsenter = ["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-C", *where, "--"]
        base = {"PATH": _PATH, "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
        result = subprocess.run(
            [*nsenter, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**base, **(env or {})},
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise SystemdError(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def show(self, unit: str, prop: str) -> str:
        """One property of ``unit`` (``systemctl show -p PROP --value``), e.g. ``MainPID``."""
        return self.systemctl("show", "-p", prop, "--value", unit, check=True).stdout.strip()

    def properties(self, unit: str, *props: str) -> dict[str, str]:
        """Several properties of ``unit`` at once (one ``systemctl`` call: a consistent view)."""
        args = [f"--property={p}" for p in props]
        out = self.systemctl("show", *args, unit, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        """``MainPID`` of ``unit``: a PID inside the namespace, 0 when it has none."""
        return int(self.show(unit, "MainPID"))

    def wait_for_state(
        self, unit: str, state: str, sub: str | None = None, timeout: float = 20.0
    ) -> dict[str, str]:
        """Wait until ``unit``'s ActiveState is ``state`` (and SubState ``sub``, if given).

        Returns the unit's ActiveState, SubState, MainPID, NRestarts and Result
        seen then.

        Raises:
            AssertionError: ``timeout`` passed; says what the unit was in, and its output.
        """
        seen: dict[str, str] = {}

        def reached() -> bool:
            seen.clear()
            props = ("ActiveState", "SubState", "MainPID", "NRestarts", "Result")
            seen.update(self.properties(unit, *props))
            return seen["ActiveState"] == state and sub in (None, seen["SubState"])

        wanted = state if sub is None else f"{state} ({sub})"
        try:
            wait_until(reached, timeout, what=f"{unit} to be {wanted}")
        except AssertionError as e:
            raise AssertionError(
                f"{e}; last seen: {seen}\n--- output of {unit}:\n{self.output(unit)}"
                f"\n--- systemd:\n{self.manager_log()}"
            ) from None
        return dict(seen)

    # -- what happened --------------------------------------------------------------

    def log_path(self, unit: str) -> str:
        """The host file that a service's stdout and stderr go to."""
        return os.path.join(self.logs, f"{unit}.log")

    def output(self, unit: str) -> str:
        """What ``unit`` (its ExecStart, ExecReload, ... commands) printed so far."""
        try:
            with open(self.log_path(unit), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def manager_log(self, unit: str | None = None) -> str:
        """What systemd logged (only the lines that name ``unit``, if given)."""
        try:
            with open(self.console_log, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return ""
        if unit is None:
            return text
        return "".join(line for line in text.splitlines(True) if unit in line)

    def diagnostics(self) -> str:
        """The setup's output, systemd's log and every unit's output, for a failure report."""
        parts = []
        for title, path in (("setup", self.setup_log), ("systemd", self.console_log)):
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                parts.append(f"--- {title} ({path}):\n{f.read()}")
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.logs)):
                with open(os.path.join(self.logs, name), errors="replace") as f:
                    parts.append(f"--- {name}:\n{f.read()}")
        return "\n".join(parts)

    # -- processes ------------------------------------------------------------------

    def processes(self) -> dict[int, int]:
        """Every process of the namespace still on the host: host PID to PID inside."""
        found: dict[int, int] = {}
        if self._pidns is None:
            return found
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != self._pidns:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            # Outermost first: the last is the PID in the namespace.
                            found[int(entry)] = int(line.split()[-1])
            except OSError:  # gone meanwhile
                continue
        return found

    def host_pid(self, pid: int) -> int:
        """The host PID of the process that is ``pid`` inside (for ``os.kill``, ``/proc``).

        Raises:
            LookupError: no such process inside.
        """
        for host, inside in self.processes().items():
            if inside == pid:
                return host
        raise LookupError(f"no process {pid} in the systemd namespace")


def _masked(path: str) -> bool:
    """Whether ``path`` is under a directory that is a fresh tmpfs inside."""
    path = os.path.abspath(path)
    return any(path == m or path.startswith(m + "/") for m in MASKED)


def _remove_cgroup(path: str) -> bool:
    """Remove a cgroup directory and its children, deepest first; whether it is gone."""
    if not os.path.isdir(path):
        return True
    for directory, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(OSError):  # busy still: the caller tries again
            os.rmdir(directory)
    return not os.path.isdir(path)
