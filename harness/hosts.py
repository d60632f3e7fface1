"""Simulated hosts for the moves across hosts (docs/crosshost.md): three network
namespaces on one Ethernet segment.

::

    client namespace                 host A             host B
    br0 10.77.0.1/24 -- vA  <veth>  eth0 10.77.0.2/24
                     -- vB  <veth>                      eth0 10.77.0.3/24
    service address 10.77.0.100/24: on A's eth0 at first, moved by the hooks

Each namespace is held by a sleeping ``unshare --net`` process; killing the
three holders (:meth:`Hosts.close`, also on failure) removes the namespaces,
and with them the bridge and the veth pairs: nothing is left in the machine's
own namespace, nothing is ever created there. The client's bridge has ARP
``locktime`` 0 so that the gratuitous ARP the acquiring host sends replaces at
once the neighbour entry that still names the other host's MAC (the default, 1
s, ignores an update that close to the previous one).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from harness.procs import Proc

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"
SERVICE_IP = f"{SUBNET}.100"
PREFIX = 24


class Host:
    """A network namespace held by a sleeping process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder = Proc(
            [
                "unshare",
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo up && exec sleep 3600",
            ]
        )
        self.holder.expect(r"^up$")
        self.path = f"/proc/{self.holder.pid}/ns/net"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in this namespace (``nsenter`` execs it: the pid is the command's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def sh(self, script: str) -> str:
        """Run a shell script in this namespace; its output, or an AssertionError."""
        done = subprocess.run(
            self.command(["sh", "-ec", script]), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"{self.name}: {script!r}: {done.stderr or done.stdout}"
        return done.stdout

    def run(self, function: Callable[[], T]) -> T:
        """Call ``function`` in a thread that entered this namespace: the sockets it
        opens belong here, whichever thread uses them afterwards."""
        return run_in_namespace(self.path, function)

    def ss(self, port: int) -> str:
        """``ss -tan`` lines of this namespace for TCP port ``port`` (either end)."""
        lines = self.sh("ss -Htan").splitlines()
        return "\n".join(line for line in lines if f":{port} " in line + " ")

    def close(self) -> None:
        self.holder.kill()


class Hosts:
    """The client, host A and host B on one bridge; A holds the service address."""

    def __init__(self) -> None:
        self.all: list[Host] = []
        try:
            self.client = self._add("client")
            self.a = self._add("A")
            self.b = self._add("B")
            self.client.sh(
                "ip link add br0 type bridge && ip link set br0 up && "
                f"ip addr add {SUBNET}.1/{PREFIX} dev br0 && "
                "sysctl -qw net.ipv4.neigh.br0.locktime=0"
            )
            for host, number in ((self.a, 2), (self.b, 3)):
                veth = f"v{host.name}"
                self.client.sh(
                    f"ip link add {veth} type veth peer name eth0 netns {host.holder.pid} && "
                    f"ip link set {veth} master br0 && ip link set {veth} up"
                )
                host.sh(f"ip link set eth0 up && ip addr add {SUBNET}.{number}/{PREFIX} dev eth0")
            self.a.sh(self.add_address_script())
        except BaseException:
            self.close()
            raise

    def _add(self, name: str) -> Host:
        host = Host(name)
        self.all.append(host)
        return host

    @staticmethod
    def add_address_script(address: str = SERVICE_IP) -> str:
        """The acquiring host's hook: the address, then a gratuitous ARP for it."""
        return (
            f"ip addr add {address}/{PREFIX} dev eth0 && "
            f"arping -q -U -c 1 -I eth0 {address} || true"
        )

    @staticmethod
    def acquire_hook(address: str = SERVICE_IP) -> str:
        """``takeover take --acquire-address``: the address, then a gratuitous ARP
        in the background (arping waits a second after its one announcement; the
        pause need not)."""
        return (
            f"ip addr add {address}/{PREFIX} dev eth0 && "
            f"{{ arping -q -U -c 1 -I eth0 {address} >/dev/null 2>&1 & }}"
        )

    @staticmethod
    def del_address_script(address: str = SERVICE_IP) -> str:
        """The releasing host's hook."""
        return f"ip addr del {address}/{PREFIX} dev eth0"

    def holder_of_address(self, address: str = SERVICE_IP) -> list[str]:
        return [h.name for h in (self.a, self.b) if address in h.sh("ip -o addr show dev eth0")]

    def close(self) -> None:
        for host in self.all:
            host.close()
        self.all.clear()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_in_namespace(path: str, function: Callable[[], T]) -> T:
    """Call ``function`` in a thread that has entered the network namespace at
    ``path`` (``/proc/PID/ns/net``), and return its result or raise its exception:
    the sockets it opens belong to the namespace, whichever thread uses them
    afterwards. The calling thread stays where it is."""
    outcome: list[Any] = []

    def enter_and_call() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            outcome.append((True, function()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=enter_and_call)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


def _setns(fd: int, kind: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12
    if setns is not None:
        setns(fd, kind)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, kind) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
