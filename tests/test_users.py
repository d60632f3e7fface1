"""Handing a service to another user: ``--admit-user`` and ``--admit-group``.

Root binds port 80 and hands the service, its connections included, to a
process of user nobody that never had root; a user not admitted is refused
before a byte of the service moves. Real processes of real users, in a
network namespace of the test's own (see tests/users.py for how a process of
user nobody gets this interpreter and the code).
"""

from __future__ import annotations

import grp
import os
import socket
import stat

import pytest

from harness.echo import echo
from harness.procs import EXAMPLES, PYTHON, Proc, list_fds, takeover
from harness.waiting import wait_until
from services import holders
from streaming import WINDOW, StreamingClients
from users import (
    NetNamespace,
    Sandbox,
    as_root,
    as_user,
    gid,
    interpreter_view,
    require_root,
    status_ids,
    uid,
)

ERROR = "takeover: error: "


@pytest.fixture
def netns(procs: list[Proc]) -> NetNamespace:
    require_root()
    return NetNamespace(procs)


def _serve_echo(sandbox: Sandbox, netns: NetNamespace, procs: list[Proc], *admit: str) -> Proc:
    """examples/echo.py (the sandbox's copy) as root on port 80, admitting ``admit``."""
    argv = [sandbox.script("echo"), "--port", "80", "--control", sandbox.control, *admit]
    origin = as_root(sandbox, netns, argv)
    procs.append(origin)
    origin.expect(r"^echo on 127\.0\.0\.1:80, control ")
    return origin


def _connect(netns: NetNamespace) -> socket.socket:
    sock = netns.run(lambda: socket.create_connection(("127.0.0.1", 80), timeout=10))
    assert echo(sock, b"hello\n") == b"hello\n"
    return sock


def _one_error(proc: Proc) -> str:
    """The single ``takeover: error:`` line of a failed run (and nothing else printed)."""
    assert proc.wait(30) != 0
    lines = proc.output().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), lines
    return lines[0]


def _mode(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def _assert_never_root(pid: int, user: str, group: str, groups: tuple[str, ...] = ()) -> None:
    """Every uid of ``pid`` (real, effective, saved, filesystem) is ``user``, and so on:
    it can't become root again, and holds no capability."""
    ids = status_ids(pid)
    assert ids["Uid"] == [uid(user)] * 4, ids
    assert ids["Gid"] == [gid(group)] * 4, ids
    assert sorted(ids["Groups"]) == sorted(gid(g) for g in groups), ids
    assert ids["CapEff"] == [0] and ids["CapPrm"] == [0], ids


def test_root_hands_port_80_to_nobody(netns, workdir, procs):
    """The paper's case: root binds port 80, a process of nobody takes the service with
    its live connections (streams checked byte for byte across the move), serves them
    and new ones, and republishes at the same path; root takes it back only if it
    admits nobody. The control directory is the README's: nobody's, 0750."""
    sandbox = Sandbox(workdir, run_mode=0o750)
    origin = _serve_echo(sandbox, netns, procs, "--admit-user", "nobody")
    assert _mode(sandbox.control) == (0o666, 0, 0)
    with _connect(netns) as client:
        # Accepted (not just queued: a queued one would move with the listener,
        # and the count below would be 3).
        assert echo(client, b"before\n") == b"before\n"
        clients = netns.run(lambda: StreamingClients(80, 3, WINDOW, 45.0))
        try:
            clients.wait_all_echoing()
            take = ["-m", "takeover", "take", sandbox.control]
            recipient = as_user(sandbox, netns, "nobody", "nogroup", take)
            procs.append(recipient)
            recipient.expect(r"^took echo: 4 connections")
            recipient.expect(r"^serving 1 service\(s\) at ")
            assert origin.wait() == 0
            _assert_never_root(recipient.pid, "nobody", "nogroup")
            assert os.readlink(f"/proc/{recipient.pid}/exe") == interpreter_view()[0]
            # The listener on port 80 and every connection are the nobody process's.
            (listener,) = netns.tcp_sockets(80, listening=True)
            assert holders(listener, origin, recipient) == [recipient]
            connections = netns.tcp_sockets(80) - {listener}
            assert len(connections) == 4
            assert connections <= set(list_fds(recipient.pid).values())
            clients.wait_progress()
            assert echo(client, b"after\n") == b"after\n"
            with _connect(netns):
                pass
            # Republished at the same path by nobody, for nobody (it admits no one else).
            assert _mode(sandbox.control) == (0o600, uid("nobody"), gid("nogroup"))
            outcome = clients.finish()
        finally:
            clients.close()
        assert not outcome.errors and not outcome.corrupted and not outcome.incomplete, outcome
        # Back to root: what root would rebuild comes from nobody, so root takes from
        # nobody's process only if it admits nobody; then nobody's process exits.
        distrustful = as_root(sandbox, netns, take)
        procs.append(distrustful)
        line = _one_error(distrustful)
        assert f"refused originator pid {recipient.pid}" in line
        assert "--admit-user nobody" in line
        back = as_root(sandbox, netns, [*take, "--admit-user", "nobody"])
        procs.append(back)
        back.expect(r"^took echo: ")
        assert recipient.wait() == 0
        assert echo(client, b"back\n") == b"back\n"


@pytest.mark.parametrize(
    "admit",
    [
        ("--admit-user", "nobody"),
        ("--admit-group", "nogroup", "--admit-group", "users"),
    ],
    ids=["user-nobody", "two-groups"],
)
def test_user_not_admitted_is_refused(netns, workdir, procs, admit):
    """daemon, neither admitted nor in an admitted group, reaches the socket (0666) and
    is refused by SO_PEERCRED before HELLO: one error line naming its uid and the
    option; the originator serves on and its descriptors are those it had."""
    sandbox = Sandbox(workdir)
    origin = _serve_echo(sandbox, netns, procs, *admit)
    assert _mode(sandbox.control)[0] == 0o666
    with _connect(netns) as client:
        before = list_fds(origin.pid)
        refused = as_user(
            sandbox, netns, "daemon", "daemon", ["-m", "takeover", "take", sandbox.control]
        )
        procs.append(refused)
        line = _one_error(refused)
        assert f"refused recipient pid {refused.pid}: it runs as uid {uid('daemon')} (daemon)" in (
            line
        )
        assert "--admit-user daemon" in line and "--admit-group" in line
        wait_until(lambda: list_fds(origin.pid) == before, what="the refused channel closed")
        assert "refused a recipient" in origin.output()
        assert echo(client, b"still here\n") == b"still here\n"
    listing = takeover("list", "--json", sandbox.control)
    procs.append(listing)
    listing.expect(r'"state": "available"')
    assert origin.popen.poll() is None


@pytest.mark.parametrize("how", ["primary", "supplementary"])
def test_group_admission(netns, workdir, procs, how):
    """--admit-group: the socket file belongs to the group, 0660; a process whose primary
    group (SO_PEERCRED) or supplementary group (SO_PEERGROUPS) it is takes the service;
    another user can't even open the socket."""
    sandbox = Sandbox(workdir)
    group = "nogroup" if how == "primary" else "users"
    groups = () if how == "primary" else ("users",)
    origin = _serve_echo(sandbox, netns, procs, "--admit-group", group)
    assert _mode(sandbox.control) == (0o660, 0, gid(group))
    with _connect(netns) as client:
        outsider = as_user(
            sandbox, netns, "daemon", "daemon", ["-m", "takeover", "list", sandbox.control]
        )
        procs.append(outsider)
        assert f"permission denied opening {sandbox.control}" in _one_error(outsider)
        recipient = as_user(
            sandbox,
            netns,
            "nobody",
            "nogroup",
            ["-m", "takeover", "take", sandbox.control],
            groups=groups,
        )
        procs.append(recipient)
        recipient.expect(r"^took echo: 1 connections")
        assert origin.wait() == 0
        _assert_never_root(recipient.pid, "nobody", "nogroup", groups)
        assert echo(client, b"moved\n") == b"moved\n"


def test_control_socket_modes(netns, workdir, procs):
    """Who may open the control socket file: the originator's admissions, and then the
    recipient's own (it republishes with what it was given, not what the originator had)."""
    sandbox = Sandbox(workdir, run_owner="root", run_group="root")
    cases = [
        ((), (0o600, 0, 0)),
        (("--admit-user", "nobody"), (0o666, 0, 0)),
        (("--admit-group", "nogroup"), (0o660, 0, gid("nogroup"))),
        (("--admit-user", "daemon", "--admit-group", "nogroup"), (0o666, 0, 0)),
        (("--admit-group", "users", "--admit-group", "nogroup"), (0o666, 0, 0)),
    ]
    origin: Proc | None = None
    for admit, expected in cases:
        if origin is None:
            origin = _serve_echo(sandbox, netns, procs, *admit)
        else:  # the recipient's own options decide the republished socket
            successor = as_root(sandbox, netns, ["-m", "takeover", "take", sandbox.control, *admit])
            procs.append(successor)
            successor.expect(r"^serving ")
            assert origin.wait() == 0
            origin = successor
        assert _mode(sandbox.control) == expected, admit


def test_group_the_originator_is_not_in(netns, workdir, procs):
    """An unprivileged originator can't give its socket to a group it is not in: it
    stops at startup saying so, and leaves no socket behind."""
    sandbox = Sandbox(workdir)
    argv = [sandbox.script("echo"), "--port", "8007", "--control", sandbox.control]
    origin = as_user(sandbox, netns, "nobody", "nogroup", [*argv, "--admit-group", "daemon"])
    procs.append(origin)
    assert origin.wait() != 0
    assert (
        f"cannot give the control socket {sandbox.control} to group daemon (--admit-group): "
        "only root or a member of the group can"
    ) in origin.output()
    assert not os.path.exists(sandbox.control)


def test_recipient_that_could_not_republish_takes_nothing(netns, workdir, procs):
    """A recipient of nobody admitted, but with a control directory it may not write to,
    is told so before anything moves (it could not publish the services again)."""
    sandbox = Sandbox(workdir, run_owner="root", run_group="root")
    origin = _serve_echo(sandbox, netns, procs, "--admit-user", "nobody")
    with _connect(netns) as client:
        before = list_fds(origin.pid)
        recipient = as_user(
            sandbox, netns, "nobody", "nogroup", ["-m", "takeover", "take", sandbox.control]
        )
        procs.append(recipient)
        line = _one_error(recipient)
        assert f"may not create files in {sandbox.run}; nothing was taken" in line
        wait_until(lambda: list_fds(origin.pid) == before, what="the channel closed")
        assert echo(client, b"still here\n") == b"still here\n"
    assert origin.popen.poll() is None


def test_user_to_user_both_sides_admit(netns, workdir, procs):
    """Between two unprivileged users both sides must admit the other: the recipient
    refuses an originator of another user unless it admits it too."""
    sandbox = Sandbox(workdir, run_owner="nobody", run_group="daemon", run_mode=0o770)
    argv = [sandbox.script("echo"), "--port", "8007", "--control", sandbox.control]
    origin = as_user(sandbox, netns, "nobody", "nogroup", [*argv, "--admit-user", "daemon"])
    procs.append(origin)
    origin.expect(r"^echo on ")
    assert _mode(sandbox.control) == (0o666, uid("nobody"), gid("nogroup"))
    take = ["-m", "takeover", "take", sandbox.control]
    distrustful = as_user(sandbox, netns, "daemon", "daemon", take)
    procs.append(distrustful)
    line = _one_error(distrustful)
    assert f"refused originator pid {origin.pid}: it runs as uid {uid('nobody')} (nobody)" in line
    assert "--admit-user nobody" in line
    recipient = as_user(sandbox, netns, "daemon", "daemon", [*take, "--admit-user", "nobody"])
    procs.append(recipient)
    recipient.expect(r"^took echo: 0 connections")
    assert origin.wait() == 0
    _assert_never_root(recipient.pid, "daemon", "daemon")
    # It republished admitting nobody (its own option), renaming over nobody's socket.
    assert _mode(sandbox.control) == (0o666, uid("daemon"), gid("daemon"))


def test_tcp_control_admits_on_the_descriptor_transport(netns, workdir, procs):
    """Over TCP (with a shared secret) the descriptors go over an AF_UNIX transport whose
    SO_PEERCRED check admits whom the migration server admits."""
    sandbox = Sandbox(workdir)
    secrets = {}
    for owner in ("root", "nobody"):
        path = os.path.join(sandbox.root, f"secret-{owner}")
        with open(path, "w") as f:
            f.write("shared between root and nobody\n")
        os.chown(path, uid(owner), -1)
        os.chmod(path, 0o600)
        secrets[owner] = path
    control = "tcp:127.0.0.1:7000"
    argv = [sandbox.script("echo"), "--port", "80", "--control", control]
    argv += ["--secret-file", secrets["root"], "--admit-user", "nobody"]
    origin = as_root(sandbox, netns, argv)
    procs.append(origin)
    origin.expect(r"^echo on ")
    with _connect(netns) as client:
        take = ["-m", "takeover", "take", control, "--secret-file", secrets["nobody"]]
        recipient = as_user(sandbox, netns, "nobody", "nogroup", take)
        procs.append(recipient)
        recipient.expect(r"^took echo: 1 connections")
        assert origin.wait() == 0
        assert echo(client, b"over tcp\n") == b"over tcp\n"


@pytest.mark.parametrize(
    ("command", "option"),
    [("example", "--admit-user"), ("take", "--admit-group")],
)
def test_unknown_name_is_a_usage_error(workdir, procs, command, option):
    """A user or group that does not exist stops the program at startup, saying which."""
    name = "no-such-name-here"
    control = os.path.join(workdir, "control.sock")
    if command == "example":
        argv = [PYTHON, os.path.join(EXAMPLES, "echo.py"), "--control", control, option, name]
        proc = Proc(argv)
    else:
        proc = takeover("take", control, option, name)
    procs.append(proc)
    assert proc.wait() == 2
    kind = "user" if option == "--admit-user" else "group"
    assert f"argument {option}: cannot admit {kind} '{name}': there is no such {kind}" in (
        proc.output()
    )
    assert not os.path.exists(control)


def test_numeric_ids_need_no_entry():
    """Ids are taken as given, names are looked up, and the lookups fail clearly."""
    from takeover._core.auth import Admission

    admission = Admission.of(["nobody", "4242", 4243], ["nogroup", "4244"])
    assert admission.users == (uid("nobody"), 4242, 4243)
    assert admission.groups == (grp.getgrnam("nogroup").gr_gid, 4244)
    with pytest.raises(ValueError, match="cannot admit group 'no-such-group'"):
        Admission.of(groups=["no-such-group"])
