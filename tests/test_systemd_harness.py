"""The systemd namespace of harness/systemd.py, against the machine's real systemd.

Later tests run takeover under it (Type=notify units, ``systemctl reload``,
MainPID, ``Restart=``); these check that what they will rely on holds: systemd
boots as PID 1, supervises a Type=notify service the way it does on a host,
and leaves nothing of itself on the host once stopped. Each test boots a
systemd of its own (a fifth of a second).
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from harness import systemd
from harness.systemd import SystemdNamespace
from harness.waiting import wait_until

SERVICE = "tk-notify.service"

# A Type=notify service: READY=1 over $NOTIFY_SOCKET once its SIGHUP handler
# is in place; it appends "start PID" and "hup PID" (its PID inside) to the
# file named by its argument, and prints "ready" (to the unit's log).
NOTIFY_SCRIPT = """\
import os
import signal
import socket
import sys

EVENTS = sys.argv[1]


def record(event):
    with open(EVENTS, "a") as f:
        f.write(f"{event} {os.getpid()}\\n")


def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):  # an abstract socket
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


signal.signal(signal.SIGHUP, lambda signum, frame: record("hup"))
record("start")
notify("READY=1")
print("ready", flush=True)
while True:
    signal.pause()
"""


def notify_unit(workdir: str) -> tuple[str, str]:
    """The script and unit file of the Type=notify service; returns (unit text, events path)."""
    script = os.path.join(workdir, "notify_service.py")
    with open(script, "w") as f:
        f.write(NOTIFY_SCRIPT)
    events = os.path.join(workdir, "events")
    unit = f"""\
[Unit]
DefaultDependencies=no
StartLimitIntervalSec=0

[Service]
Type=notify
ExecStart={sys.executable} {script} {events}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=50ms
"""
    return unit, events


def events(path: str) -> list[tuple[str, int]]:
    """What the service recorded: (event, its PID inside)."""
    try:
        with open(path) as f:
            return [(name, int(pid)) for name, pid in (line.split() for line in f)]
    except FileNotFoundError:
        return []


def start_notify_service(ns: SystemdNamespace, workdir: str) -> tuple[int, str]:
    """Start the Type=notify service, wait until active; returns (MainPID, events path)."""
    unit, path = notify_unit(workdir)
    ns.write_unit(SERVICE, unit)
    ns.systemctl("start", SERVICE, check=True)  # returns once READY=1 came
    state = ns.wait_for_state(SERVICE, "active", "running")
    return int(state["MainPID"]), path


def unit_cgroup(ns: SystemdNamespace, unit: str) -> str:
    """The host directory of a unit's cgroup in the namespace's hierarchy."""
    assert ns.cgroup is not None
    return os.path.join(ns.cgroup, "system.slice", unit)


def cgroup_procs(cgroup: str) -> list[int]:
    """The host PIDs in a cgroup directory."""
    with open(os.path.join(cgroup, "cgroup.procs")) as f:
        return [int(pid) for pid in f.read().split()]


def test_boots_systemd_as_pid_1(systemd_ns):
    """systemd is PID 1 inside, running, in a container, with the test target active."""
    ns = systemd_ns
    assert ns.systemctl("is-system-running").stdout.strip() == "running"
    assert ns.run(["cat", "/proc/1/comm"], check=True).stdout == "systemd\n"
    assert ns.pid1 is not None and ns.processes()[ns.pid1] == 1
    assert ns.show(systemd.TARGET, "ActiveState") == "active"
    virt = ns.run(["systemd-detect-virt", "--container"]).stdout.strip()
    assert virt == "container-other"


def test_cgroups_are_a_child_of_the_test_process_cgroup(systemd_ns):
    """systemd's cgroup tree is the namespace's own, under a fresh child of the test's cgroup."""
    ns = systemd_ns
    # Inside, PID 1 sees itself in init.scope at the root of its hierarchy...
    assert ns.run(["cat", "/proc/1/cgroup"], check=True).stdout.endswith("0::/init.scope\n")
    # ...which on the host is the child made for it.
    assert os.path.dirname(ns.cgroup) == systemd.cgroup_root()
    assert cgroup_procs(os.path.join(ns.cgroup, "init.scope")) == [ns.pid1]
    fstype = ns.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], check=True).stdout
    assert fstype == "cgroup2fs\n"


def test_host_is_read_only_or_hidden_inside(systemd_ns, workdir):
    """/etc, /sys and /proc/sys are read-only inside; /tmp is its own, the workdir shared."""
    ns = systemd_ns
    for path in ("/etc/takeover-test", "/proc/sys/fs/file-max", "/sys/fs/takeover-test"):
        result = ns.run(["sh", "-c", f"echo x > {path}"])
        assert result.returncode != 0 and "Read-only file system" in result.stderr, path
    with open(os.path.join(workdir, "from-host"), "w") as f:
        f.write("host")
    ns.run(["sh", "-c", f"cat {workdir}/from-host > {workdir}/from-inside"], check=True)
    with open(os.path.join(workdir, "from-inside")) as f:
        assert f.read() == "host"
    assert ns.run(["stat", "-f", "-c", "%T", "/tmp"], check=True).stdout == "tmpfs\n"


def test_tmpfiles_wiping_tmp_inside_spares_the_host(systemd_ns, workdir):
    """systemd-tmpfiles --remove empties /tmp inside, not the host's nor the workdir bound in."""
    ns = systemd_ns
    # Were /tmp the host's, this test would empty it: make sure first.
    assert ns.run(["stat", "-f", "-c", "%T", "/tmp"], check=True).stdout == "tmpfs\n"
    sentinel = os.path.join(workdir, "sentinel")
    with open(sentinel, "w") as f:
        f.write("kept")
    ns.run(["touch", "/tmp/inside-only"], check=True)
    ns.run(["systemd-tmpfiles", "--remove", "--boot", "--prefix=/tmp"], check=True)
    assert ns.run(["test", "-e", "/tmp/inside-only"]).returncode == 1  # it did wipe
    with open(sentinel) as f:
        assert f.read() == "kept"
    assert os.path.isdir(ns.state)


@pytest.mark.slow
def test_notify_service_becomes_active_with_its_main_pid(systemd_ns, workdir):
    """A Type=notify unit is active once READY=1 came, and MainPID is the script's own PID."""
    ns = systemd_ns
    main, path = start_notify_service(ns, workdir)
    assert events(path) == [("start", main)]
    wait_until(lambda: ns.output(SERVICE) == "ready\n", 10, what="the service's output")
    host = ns.host_pid(main)
    with open(f"/proc/{host}/cmdline", "rb") as f:
        assert b"notify_service.py" in f.read()
    assert cgroup_procs(unit_cgroup(ns, SERVICE)) == [host]


@pytest.mark.slow
def test_reload_delivers_sighup_and_the_unit_is_active_again(systemd_ns, workdir):
    """systemctl reload runs ExecReload (kill -HUP $MAINPID): the script gets SIGHUP, stays."""
    ns = systemd_ns
    main, path = start_notify_service(ns, workdir)
    ns.systemctl("reload", SERVICE, check=True)
    wait_until(lambda: ("hup", main) in events(path), 10, what="the SIGHUP recorded")
    state = ns.wait_for_state(SERVICE, "active", "running")
    assert int(state["MainPID"]) == main and state["NRestarts"] == "0"
    assert events(path) == [("start", main), ("hup", main)]


@pytest.mark.slow
def test_sigkill_of_the_main_process_restarts_it(systemd_ns, workdir):
    """Restart=on-failure: a main process killed by SIGKILL is replaced, NRestarts counts it."""
    ns = systemd_ns
    main, path = start_notify_service(ns, workdir)
    os.kill(ns.host_pid(main), signal.SIGKILL)

    def restarted() -> dict[str, str] | None:
        state = ns.properties(SERVICE, "ActiveState", "SubState", "MainPID", "NRestarts")
        return state if state["NRestarts"] == "1" and state["SubState"] == "running" else None

    state = wait_until(restarted, 10, what=f"{SERVICE} restarted")
    new = int(state["MainPID"])
    assert new not in (0, main) and state["ActiveState"] == "active"
    assert events(path) == [("start", main), ("start", new)]
    assert "status=9/KILL" in ns.manager_log(SERVICE)


@pytest.mark.slow
def test_stop_leaves_no_process_of_the_unit(systemd_ns, workdir):
    """systemctl stop: the unit is inactive, its main process gone and its cgroup removed."""
    ns = systemd_ns
    main, _ = start_notify_service(ns, workdir)
    host = ns.host_pid(main)
    cgroup = unit_cgroup(ns, SERVICE)
    assert os.path.isdir(cgroup)
    ns.systemctl("stop", SERVICE, check=True)
    state = ns.wait_for_state(SERVICE, "inactive", "dead")
    assert state["MainPID"] == "0"
    assert not os.path.exists(f"/proc/{host}")
    assert not os.path.exists(cgroup)
    assert list(ns.processes().values()) == [1]  # systemd alone


@pytest.mark.slow
def test_stop_leaves_nothing_behind(systemd_available, workdir):
    """After stop(): the host's /tmp, mounts and cgroups as before, no process of the namespace."""
    sentinel = os.path.join("/tmp", f"tk-sentinel-{os.getpid()}")
    with open(sentinel, "w") as f:
        f.write("host")
    try:
        mounts = read_mounts()
        ns = SystemdNamespace(binds=[workdir])
        with ns:
            start_notify_service(ns, workdir)
            assert read_mounts() == mounts  # nothing propagates, even while it runs
            inside = ns.processes()
            assert len(inside) >= 2 and ns.pid1 in inside
            cgroup = ns.cgroup
            assert cgroup is not None and os.path.isdir(cgroup)
            pidns = os.readlink(f"/proc/{ns.pid1}/ns/pid")
            assert ns.run(["test", "-e", sentinel]).returncode == 1  # /tmp inside is its own
        assert ns.pid1 is not None and not os.path.exists(f"/proc/{ns.pid1}")
        for pid in inside:
            assert not os.path.exists(f"/proc/{pid}")
        assert not any(in_namespace(entry, pidns) for entry in os.listdir("/proc"))
        assert read_mounts() == mounts
        assert not os.path.exists(cgroup)
        assert not os.path.exists(ns.state)
        with open(sentinel) as f:
            assert f.read() == "host"
    finally:
        os.unlink(sentinel)


def test_a_failed_boot_says_why_and_leaves_nothing_behind(systemd_available):
    """systemd refusing to boot raises SystemdError with its own words, and is cleaned up."""
    ns = SystemdNamespace(log_level="no-such-level")
    with pytest.raises(systemd.SystemdError, match='Failed to parse log level "no-such-level"'):
        ns.start()
    assert ns.cgroup is not None and ns.pid1 is not None
    assert not os.path.exists(ns.cgroup)
    assert not os.path.exists(f"/proc/{ns.pid1}")
    assert not os.path.exists(ns.state)


def read_mounts() -> str:
    """This process's mount table."""
    with open("/proc/self/mounts") as f:
        return f.read()


def in_namespace(entry: str, pidns: str) -> bool:
    """Whether /proc/ENTRY is a process of the PID namespace ``pidns``."""
    try:
        return entry.isdigit() and os.readlink(f"/proc/{entry}/ns/pid") == pidns
    except OSError:
        return False
