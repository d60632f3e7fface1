"""Established connections moved to another host by TCP_REPAIR, clients unaware.

Three real network namespaces on a bridge (harness/hosts.py): the client, host
A and host B; the service address moves between A and B (``ip addr del``,
``ip addr add``, a gratuitous ARP). A line echo server
(tests/apps/repair_host.py) freezes its connections on one host, the other
host rebuilds them in repair mode, the address moves, the new host starts.
Fifty checksummed streams (tests/streaming.py) run throughout: every byte
echoed once, in order.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
from collections.abc import Iterator

import pytest

import pythons
from harness.hosts import SERVICE_IP, SUBNET, Host, Hosts
from harness.procs import APPS, PYTHON, ROOT, Proc, process_state
from harness.waiting import wait_until
from streaming import StreamingClients
from takeover._core import dropguard, tcprepair
from users import Sandbox, user_command

APP = os.path.join(APPS, "repair_host.py")
ENV = {"PYTHONPATH": os.path.join(ROOT, "src")}
PORT = 7007
CLIENTS = 50


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or not tcprepair.has_net_admin():
        pythons.skip_or_fail("moving connections across hosts needs root (CAP_NET_ADMIN)")
    for tool in ("nft", "arping", "unshare", "nsenter", "ip", "ss"):
        if shutil.which(tool) is None:
            pythons.missing(tool, "make network-tools installs nftables and iputils-arping")
    with Hosts() as made:
        yield made


def server(host: Host, procs: list[Proc]) -> Proc:
    proc = Proc(host.command([PYTHON, APP]), ENV, stdin=True)
    procs.append(proc)
    return proc


@pytest.fixture
def clients(hosts: Hosts) -> Iterator[list[StreamingClients]]:
    made: list[StreamingClients] = []
    yield made
    for streams in made:
        streams.driver.stopping.set()
        streams.driver.join(streams.driver.deadline + 5)
        streams.close()


def finished_whole(streams: StreamingClients) -> None:
    """The streams end with no error, every byte echoed once and in order."""
    outcome = streams.finish()
    assert not outcome.errors, outcome.errors
    assert not outcome.corrupted, outcome.corrupted
    assert not outcome.incomplete, outcome.incomplete


def move(hosts: Hosts, old: Proc, new: Proc, old_host: Host, new_host: Host, path: str) -> None:
    """The cross-host sequence, each step on the host it belongs to."""
    old.send_line(f"freeze {path}")
    old.expect(rf"^frozen {CLIENTS}$")
    new.send_line(f"adopt {path}")
    new.expect(rf"^prepared {CLIENTS}$")
    old.send_line("close")  # commit: closed in repair mode, nothing sent
    old.expect("^closed$")
    old_host.sh(hosts.del_address_script())  # packets for the address are not local here now
    old.send_line("lift")
    old.expect("^lifted$")
    assert old.wait() == 0
    new_host.sh(hosts.add_address_script())
    new.send_line("start")
    new.expect("^started$")


def test_fifty_clients_move_to_another_host_and_back(
    hosts: Hosts, procs: list[Proc], clients: list[StreamingClients], workdir: str
) -> None:
    on_a = server(hosts.a, procs)
    on_a.send_line(f"serve {SERVICE_IP} {PORT}")
    on_a.expect("^serving$")
    streams = hosts.client.run(
        lambda: StreamingClients(PORT, CLIENTS, 32 * 1024, 60.0, host=SERVICE_IP)
    )
    clients.append(streams)
    streams.wait_all_echoing()
    on_b = server(hosts.b, procs)
    move(hosts, on_a, on_b, hosts.a, hosts.b, os.path.join(workdir, "a-to-b"))
    assert hosts.holder_of_address() == ["B"]
    assert hosts.a.ss(PORT) == "", "host A still knows the connections"
    assert len(hosts.b.ss(PORT).splitlines()) == CLIENTS + 1  # and the listener
    streams.wait_progress()
    back_on_a = server(hosts.a, procs)
    move(hosts, on_b, back_on_a, hosts.b, hosts.a, os.path.join(workdir, "b-to-a"))
    assert hosts.holder_of_address() == ["A"]
    assert hosts.b.ss(PORT) == ""
    streams.wait_progress()
    finished_whole(streams)


def test_rollback_after_freeze_leaves_clients_unaware(
    hosts: Hosts, procs: list[Proc], clients: list[StreamingClients], workdir: str
) -> None:
    on_a = server(hosts.a, procs)
    on_a.send_line(f"serve {SERVICE_IP} {PORT}")
    on_a.expect("^serving$")
    streams = hosts.client.run(
        lambda: StreamingClients(PORT, CLIENTS, 32 * 1024, 60.0, host=SERVICE_IP)
    )
    clients.append(streams)
    streams.wait_all_echoing()
    on_a.send_line(f"freeze {os.path.join(workdir, 'state')}")
    on_a.expect(rf"^frozen {CLIENTS}$")
    # A recipient rebuilt them, then the move failed: it discards its copies.
    on_b = server(hosts.b, procs)
    on_b.send_line(f"adopt {os.path.join(workdir, 'state')}")
    on_b.expect(rf"^prepared {CLIENTS}$")
    on_b.kill()
    on_a.send_line("thaw")
    on_a.expect("^thawed$")
    streams.wait_progress()
    finished_whole(streams)
    assert "takeover_" not in hosts.a.sh("nft list tables"), "the drop was not lifted"


# -- the move through the library: examples/echo.py and `takeover take --cross-host` -------

ECHO = os.path.join(ROOT, "examples", "echo.py")
TWISTED_ECHO = os.path.join(ROOT, "examples", "twisted_echo.py")
CONTROL_PORT = 9007
ACQUIRE = Hosts.acquire_hook()


def host_ip(host: Host, hosts: Hosts) -> str:
    return f"{SUBNET}.{2 if host is hosts.a else 3}"


def secret_file(workdir: str, name: str = "secret", text: str = "", uid: int = 0) -> str:
    path = os.path.join(workdir, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text or "0123456789abcdef0123456789abcdef")
    os.chown(path, uid, -1)
    return path


def echo_on(
    host: Host,
    hosts: Hosts,
    secret: str,
    procs: list[Proc],
    release: str = "",
    as_nobody: Sandbox | None = None,
    env: dict[str, str] | None = None,
    script: str = ECHO,
) -> Proc:
    """examples/echo.py on ``host``, on the service address, its control on the host's own."""
    argv = [
        *(as_nobody.script("echo") if as_nobody else script, "--host", SERVICE_IP),
        *("--port", str(PORT), "--control", f"tcp:{host_ip(host, hosts)}:{CONTROL_PORT}"),
        *("--secret-file", secret),
        *("--release-address", release or hosts.del_address_script()),
    ]
    proc = Proc(host.command(python_argv(argv, as_nobody)), {**ENV, **(env or {})})
    procs.append(proc)
    proc.expect("control")
    return proc


def take_across(
    hosts: Hosts,
    into: Host,
    origin: Host,
    secret: str,
    procs: list[Proc],
    *extra: str,
    env: dict[str, str] | None = None,
    as_nobody: Sandbox | None = None,
) -> Proc:
    """``takeover take --cross-host`` run on ``into``, from the process on ``origin``."""
    argv = [
        *("-m", "takeover", "take", "--json", "--cross-host"),
        *(f"tcp:{host_ip(origin, hosts)}:{CONTROL_PORT}", "--secret-file", secret),
        *("--acquire-address", ACQUIRE),
        *("--release-address", hosts.del_address_script(), *extra),
    ]
    proc = Proc(into.command(python_argv(argv, as_nobody)), {**ENV, **(env or {})})
    procs.append(proc)
    return proc


def python_argv(argv: list[str], as_nobody: Sandbox | None) -> list[str]:
    """``python ARGV`` as root, or as nobody with the sandbox's copy of takeover (and
    the interpreter made reachable: pyenv's lies behind /root, see users.py)."""
    if as_nobody is None:
        return [PYTHON, *argv]
    root = as_nobody.root
    return user_command("nobody", "nogroup", argv, env=as_nobody.env, cwd=root, stages=root)


def moved(take: Proc) -> int:
    """The connections ``take --json`` says it took."""
    line = take.expect(r'^\{.*"service": "echo"', timeout=40).string
    count: int = json.loads(line)["connections"]
    return count


def test_echo_moves_to_another_host_and_back_through_the_library(
    hosts: Hosts, procs: list[Proc], clients: list[StreamingClients], workdir: str
) -> None:
    secret = secret_file(workdir)
    on_a = echo_on(hosts.a, hosts, secret, procs)
    streams = hosts.client.run(
        lambda: StreamingClients(PORT, CLIENTS, 32 * 1024, 60.0, host=SERVICE_IP)
    )
    clients.append(streams)
    streams.wait_all_echoing()
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
    assert moved(on_b) == CLIENTS
    on_b.expect('"event": "serving"')
    assert on_a.wait() == 0, on_a.output()
    assert hosts.holder_of_address() == ["B"]
    assert hosts.a.ss(PORT) == "", "host A still knows the connections"
    assert len(hosts.b.ss(PORT).splitlines()) == CLIENTS + 1  # and the listener
    streams.wait_progress()
    back = take_across(hosts, hosts.a, hosts.b, secret, procs)
    assert moved(back) == CLIENTS
    back.expect('"event": "serving"')
    assert on_b.wait() == 0, on_b.output()
    assert hosts.holder_of_address() == ["A"]
    assert hosts.b.ss(PORT) == "", "host B still knows the connections"
    streams.wait_progress()
    finished_whole(streams)


@pytest.mark.parametrize("failure", ["recipient-killed", "release-hook-fails"])
def test_rollback_after_prepare_leaves_clients_unaware(
    hosts: Hosts,
    procs: list[Proc],
    clients: list[StreamingClients],
    workdir: str,
    failure: str,
) -> None:
    """The connections frozen on A and rebuilt in repair mode on B, then the move
    fails before the originator decides: B killed once it has adopted the
    graph (before READY), or A's release hook fails (after READY; A says ERROR
    and B discards its copies). A thaws and serves on; the clients saw a pause; the drop is gone.
    After the kill, a second take moves the service all the same."""
    secret = secret_file(workdir)
    release = "echo the address stays >&2; false" if failure == "release-hook-fails" else ""
    on_a = echo_on(hosts.a, hosts, secret, procs, release=release)
    streams = hosts.client.run(
        lambda: StreamingClients(PORT, CLIENTS, 32 * 1024, 60.0, host=SERVICE_IP)
    )
    clients.append(streams)
    streams.wait_all_echoing()
    if failure == "recipient-killed":
        fault = {"TAKEOVER_FAULTS": "recipient.adopted=kill"}
        on_b = take_across(hosts, hosts.b, hosts.a, secret, procs, env=fault)
        assert on_b.wait(40) != 0
        on_a.expect("did not move 'echo'")
    else:
        on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
        on_b.expect("the address stays")
        assert on_b.wait(40) != 0
        on_a.expect("did not move 'echo'")
    assert hosts.holder_of_address() == ["A"]
    assert "takeover_" not in hosts.a.sh("nft list tables"), "the drop was not lifted"
    assert hosts.b.ss(PORT) == "", "host B kept a rebuilt connection"
    streams.wait_progress()
    if failure == "recipient-killed":
        again = take_across(hosts, hosts.b, hosts.a, secret, procs)
        assert moved(again) == CLIENTS
        assert on_a.wait() == 0, on_a.output()
        assert hosts.holder_of_address() == ["B"]
        streams.wait_progress()
    finished_whole(streams)


def test_not_root_is_refused_on_either_side(hosts: Hosts, procs: list[Proc], workdir: str) -> None:
    """Without CAP_NET_ADMIN: a recipient refuses itself before asking anything; an
    originator answers a clear ERROR and serves on."""
    secret = secret_file(workdir)
    sandbox = Sandbox(workdir)  # nobody's interpreter view and copy of takeover
    their_secret = secret_file(sandbox.root, "nobody-secret", uid=pwd.getpwnam("nobody").pw_uid)
    refused = take_across(hosts, hosts.b, hosts.a, their_secret, procs, as_nobody=sandbox)
    refused.expect("takeover: error: .*needs CAP_NET_ADMIN")
    assert refused.wait() != 0
    on_a = echo_on(hosts.a, hosts, their_secret, procs, as_nobody=sandbox)
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
    line = on_b.expect("takeover: error: ").string
    assert "cannot move 'echo' to another host from here" in line, line
    assert "needs CAP_NET_ADMIN" in line, line
    assert on_b.wait() != 0
    assert hosts.holder_of_address() == ["A"]
    with hosts.client.run(lambda: socket.create_connection((SERVICE_IP, PORT), 10)) as sock:
        sock.sendall(b"still here\n")
        assert sock.recv(100) == b"still here\n"
    assert on_a.popen.poll() is None


def test_client_connecting_during_the_move_reaches_the_new_host(
    hosts: Hosts, procs: list[Proc], workdir: str
) -> None:
    """The originator stops itself once the graph is sent (frozen: its listener's
    new SYNs dropped); a client connects meanwhile. Its SYN is dropped, not
    queued on A (where it would be reset with the listener); once the move is
    over its retransmitted SYN reaches B, which serves it."""
    secret = secret_file(workdir)
    stop = {"TAKEOVER_FAULTS": "originator.graph-sent=stop"}
    on_a = echo_on(hosts.a, hosts, secret, procs, env=stop)
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
    wait_until(lambda: process_state(on_a.pid) == "T", what="the originator stopped")

    def connect() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        assert sock.connect_ex((SERVICE_IP, PORT)) == errno.EINPROGRESS
        return sock

    late = hosts.client.run(connect)
    with late:
        # Whatever the wait, the handshake cannot complete while A is frozen.
        select.select([], [late], [], 0.3)
        assert late.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 2  # SYN_SENT
        on_a.signal(signal.SIGCONT)
        assert moved(on_b) == 0
        assert on_a.wait() == 0, on_a.output()
        late.setblocking(True)
        late.settimeout(30)
        late.sendall(b"late but served\n")
        assert late.recv(100) == b"late but served\n"
    assert hosts.holder_of_address() == ["B"]


# -- faults across hosts: in doubt, an originator killed, the accept queue ----------------


def no_drop_left(host: Host) -> None:
    assert "takeover_" not in host.sh("nft list tables"), "a drop table was left"


def test_commit_lost_the_recipient_asks_and_starts(
    hosts: Hosts, procs: list[Proc], clients: list[StreamingClients], workdir: str
) -> None:
    """The originator decides (its release hook has run) and stops before COMMIT
    leaves; the recipient's step timeout (2 s) runs out, so it is in doubt: it
    keeps its copies silent and asks, on new connections, what was decided.
    Once the originator runs again it answers COMMIT; the recipient starts.
    The clients saw a longer pause and nothing else. A drop table that a dead
    process left on A (a stale one) is deleted by the move."""
    secret = secret_file(workdir)
    stale = f"{dropguard.table_prefix(999999)}0"  # no process 999999 here
    other = f"takeover_1_{os.getpid()}_0"  # another PID namespace's: not judged
    hosts.a.sh(f"nft add table inet {stale}; nft add table inet {other}")
    stop = {"TAKEOVER_FAULTS": "originator.decided=stop"}
    on_a = echo_on(hosts.a, hosts, secret, procs, env=stop)
    streams = hosts.client.run(
        lambda: StreamingClients(PORT, CLIENTS, 32 * 1024, 60.0, host=SERVICE_IP)
    )
    clients.append(streams)
    streams.wait_all_echoing()
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs, "--step-timeout", "2")
    wait_until(lambda: process_state(on_a.pid) == "T", what="the originator stopped")
    on_b.expect("in doubt: the channel failed after READY")
    on_a.signal(signal.SIGCONT)
    on_b.expect("the originator says it committed; starting it here")
    assert moved(on_b) == CLIENTS
    assert on_a.wait() == 0, on_a.output()
    assert "the recipient asked and was told it committed" in on_a.output()
    assert hosts.holder_of_address() == ["B"]
    tables = hosts.a.sh("nft list tables")
    assert stale not in tables and other in tables, tables
    hosts.a.sh(f"nft delete table inet {other}")
    no_drop_left(hosts.a)
    streams.wait_progress()
    finished_whole(streams)


def test_originator_killed_after_deciding(hosts: Hosts, procs: list[Proc], workdir: str) -> None:
    """The originator is killed once it has decided, before COMMIT: the recipient
    asks for its in-doubt wait (2 s), finds nobody, presumes a rollback, says so
    and discards its copies (B holds nothing). The guard deletes the drop table
    the dead originator left on A. (Those connections are lost: the one process
    that could say it committed is gone.)"""
    secret = secret_file(workdir)
    kill = {"TAKEOVER_FAULTS": "originator.decided=kill"}
    on_a = echo_on(hosts.a, hosts, secret, procs, env=kill)
    with hosts.client.run(lambda: socket.create_connection((SERVICE_IP, PORT), 10)) as sock:
        sock.sendall(b"one\n")
        assert sock.recv(100) == b"one\n"
        on_b = take_across(hosts, hosts.b, hosts.a, secret, procs, "--in-doubt-wait", "2")
        assert on_a.wait(40) == -signal.SIGKILL
        line = on_b.expect("takeover: error: ").string
        assert "could not be asked within 2 s" in line, line
        assert "presumed rolled back" in line, line
        assert on_b.wait(40) != 0
    assert hosts.b.ss(PORT) == "", "host B kept a rebuilt connection"
    wait_until(lambda: "takeover_" not in hosts.a.sh("nft list tables"), what="the guard")


def test_originator_killed_while_frozen_leaves_no_drop(
    hosts: Hosts, procs: list[Proc], workdir: str
) -> None:
    """The originator is killed with its connections frozen: its guard deletes
    the drop table, so a service started again on A is reached at once (the
    listener's SYN drop would otherwise leave the port a black hole); the
    recipient says the channel closed and keeps nothing."""
    secret = secret_file(workdir)
    kill = {"TAKEOVER_FAULTS": "originator.frozen=kill"}
    on_a = echo_on(hosts.a, hosts, secret, procs, env=kill)
    with hosts.client.run(lambda: socket.create_connection((SERVICE_IP, PORT), 10)):
        on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
        assert on_a.wait(40) == -signal.SIGKILL
        on_b.expect("takeover: error: ")
        assert on_b.wait(40) != 0
    wait_until(lambda: "takeover_" not in hosts.a.sh("nft list tables"), what="the guard")
    assert hosts.b.ss(PORT) == ""
    echo_on(hosts.a, hosts, secret, procs)
    with hosts.client.run(lambda: socket.create_connection((SERVICE_IP, PORT), 2)) as sock:
        sock.sendall(b"served again\n")
        assert sock.recv(100) == b"served again\n"


def test_connections_queued_before_the_pause_move(
    hosts: Hosts, procs: list[Proc], workdir: str
) -> None:
    """Clients connect after the dry run, while the originator does not run
    (stopped at ``originator.checked``): the kernel completes their handshakes
    into the listener's accept queue. Before pausing, the move drops new SYNs
    and lets the service accept what is queued, so those connections move as
    any other and are served on B (the accept queue itself cannot move: they
    would be lost with the listener)."""
    secret = secret_file(workdir)
    stop = {"TAKEOVER_FAULTS": "originator.checked=stop"}
    on_a = echo_on(hosts.a, hosts, secret, procs, env=stop)
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
    wait_until(lambda: process_state(on_a.pid) == "T", what="the originator stopped")
    queued = [
        hosts.client.run(lambda: socket.create_connection((SERVICE_IP, PORT), 10)) for _ in range(5)
    ]
    try:
        listening = hosts.a.sh(f"ss -Hltn 'sport = :{PORT}'").split()
        assert listening[1] == str(len(queued)), listening  # Recv-Q: the accept queue
        on_a.signal(signal.SIGCONT)
        assert moved(on_b) == len(queued)
        assert on_a.wait() == 0, on_a.output()
        assert hosts.holder_of_address() == ["B"]
        for index, sock in enumerate(queued):
            sock.settimeout(30)
            sock.sendall(b"queued %d\n" % index)
            assert sock.recv(100) == b"queued %d\n" % index
    finally:
        for sock in queued:
            sock.close()


def test_hooks_run_while_the_loop_serves(hosts: Hosts, procs: list[Proc], workdir: str) -> None:
    """The release hook runs in a thread: while it runs (2 s), the originator's
    loop still answers its control channel (`takeover list` from another host
    shows the service in transit), and the move then completes."""
    secret = secret_file(workdir)
    marker = os.path.join(workdir, "hook-running")
    release = f"touch {marker}; sleep 2; rm {marker}; {hosts.del_address_script()}"
    on_a = echo_on(hosts.a, hosts, secret, procs, release=release)
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs)
    wait_until(lambda: os.path.exists(marker), what="the release hook running")
    control = f"tcp:{host_ip(hosts.a, hosts)}:{CONTROL_PORT}"
    listing = Proc(
        hosts.client.command([PYTHON, "-m", "takeover", "list", control, "--secret-file", secret]),
        ENV,
    )
    procs.append(listing)
    assert listing.wait(10) == 0, listing.output()
    assert os.path.exists(marker), "the listing waited for the hook"
    assert "in-transit" in listing.output(), listing.output()
    assert moved(on_b) == 0
    assert on_a.wait() == 0, on_a.output()
    assert hosts.holder_of_address() == ["B"]


@pytest.mark.parametrize("point", ["recipient.ready-sent", "recipient.commit-received"])
def test_recipient_killed_after_ready(
    hosts: Hosts, procs: list[Proc], workdir: str, point: str
) -> None:
    """The recipient is killed after READY (before or after COMMIT reached it):
    the originator has decided, waits as long as the recipient said it would ask
    (--in-doubt-wait 1, plus 5 s), nobody asks, and it says the connections are
    lost if COMMIT did not arrive. It leaves no drop table and exits (the service
    was committed away). A recipient that dies holding connections loses them,
    across hosts as on one."""
    secret = secret_file(workdir)
    on_a = echo_on(hosts.a, hosts, secret, procs)
    with hosts.client.run(lambda: socket.create_connection((SERVICE_IP, PORT), 10)) as sock:
        sock.sendall(b"one\n")
        assert sock.recv(100) == b"one\n"
        kill = {"TAKEOVER_FAULTS": f"{point}=kill"}
        on_b = take_across(hosts, hosts.b, hosts.a, secret, procs, "--in-doubt-wait", "1", env=kill)
        assert on_b.wait(40) == -signal.SIGKILL
        on_a.expect("waiting up to 1 s for it to ask what was decided")
        on_a.expect("neither confirmed nor asked within 1 s", timeout=20)
        assert on_a.wait(20) == 0, on_a.output()
    no_drop_left(hosts.a)
    assert hosts.a.ss(PORT) == ""


def test_twisted_echo_moves_to_another_host_and_back(
    hosts: Hosts, procs: list[Proc], clients: list[StreamingClients], workdir: str
) -> None:
    """examples/twisted_echo.py (a Twisted port and its connections) moves A -> B
    -> A with 20 checksummed streams, the recipients serving in a Twisted
    reactor (`take --runtime twisted`): nothing lost or duplicated, the bytes
    A's kernel had never sent go out first on B."""
    secret = secret_file(workdir)
    on_a = echo_on(hosts.a, hosts, secret, procs, script=TWISTED_ECHO)
    streams = hosts.client.run(lambda: StreamingClients(PORT, 20, 32 * 1024, 60.0, host=SERVICE_IP))
    clients.append(streams)
    streams.wait_all_echoing()
    on_b = take_across(hosts, hosts.b, hosts.a, secret, procs, "--runtime", "twisted")
    assert moved(on_b) == 20
    on_b.expect('"event": "serving"')
    assert on_a.wait() == 0, on_a.output()
    assert hosts.holder_of_address() == ["B"]
    assert hosts.a.ss(PORT) == ""
    streams.wait_progress()
    back = take_across(hosts, hosts.a, hosts.b, secret, procs, "--runtime", "twisted")
    assert moved(back) == 20
    assert on_b.wait() == 0, on_b.output()
    assert hosts.holder_of_address() == ["A"]
    streams.wait_progress()
    finished_whole(streams)


@pytest.mark.parametrize("script", [ECHO, TWISTED_ECHO], ids=["asyncio", "twisted"])
def test_bytes_never_sent_go_out_first(
    hosts: Hosts, procs: list[Proc], workdir: str, script: str
) -> None:
    """A client sends 4 MB of lines and reads nothing until after the move: A's
    kernel holds echoed bytes it has never sent (its window is full) and the
    transport holds more. Those bytes travel in the checkpoint and go out on B
    before the transport's own output: the client reads its 4 MB back, in order."""
    secret = secret_file(workdir)
    on_a = echo_on(hosts.a, hosts, secret, procs, script=script)
    payload = b"".join(b"%07d %s\n" % (i, os.urandom(24).hex().encode()) for i in range(70_000))

    def connect() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect((SERVICE_IP, PORT))
        return sock

    with hosts.client.run(connect) as sock:
        sock.sendall(payload)

        def unsent_on_a() -> int:
            found = re.search(r"notsent:(\d+)", hosts.a.sh(f"ss -Htin 'sport = :{PORT}'"))
            return int(found.group(1)) if found else 0

        wait_until(lambda: unsent_on_a() > 0, what="bytes A's kernel has not sent")
        runtime = ("--runtime", "twisted") if script == TWISTED_ECHO else ()
        on_b = take_across(hosts, hosts.b, hosts.a, secret, procs, *runtime)
        assert moved(on_b) == 1
        assert on_a.wait() == 0, on_a.output()
        sock.settimeout(30)
        received = bytearray()
        while len(received) < len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {len(received)} of {len(payload)} bytes"
            received += chunk
        assert bytes(received) == payload
