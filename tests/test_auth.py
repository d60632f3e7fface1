"""Shared-secret authentication, TCP and TLS control channels, same-host descriptors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

import pythons
from handshake import recipient_hello
from harness.echo import echo
from harness.procs import EXAMPLES, PYTHON, Proc, run_example, takeover
from takeover._core import auth as _auth
from takeover._core import protocol as _protocol
from takeover._core.protocol import Kind, Message


def _secret(workdir: str, name: str, value: str, mode: int = 0o600) -> str:
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(value + "\n")
    os.chmod(path, mode)
    return path


def _tcp_control() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


def _single_error(proc: Proc) -> str:
    assert proc.wait() != 0
    lines = proc.output().splitlines()
    assert len(lines) == 1 and lines[0].startswith("takeover: error: "), lines
    return lines[0]


def test_move_with_shared_secret(control, free_port, workdir, procs):
    """Both sides given the same secret: the move goes through and the connection survives."""
    secret = _secret(workdir, "s", "correct horse battery staple")
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"before\n") == b"before\n"
        recipient = takeover("take", control, "--secret-file", secret)
        procs.append(recipient)
        recipient.expect(r"^took echo: 1 connections")
        assert origin.wait() == 0
        assert echo(client, b"after\n") == b"after\n"


@pytest.mark.parametrize(
    ("recipient_args", "message"),
    [
        (["--secret-file", "WRONG"], "failed the shared-secret challenge"),
        ([], "requires a shared secret"),
    ],
)
def test_wrong_or_missing_secret_refused(
    control, free_port, workdir, procs, recipient_args, message
):
    """A recipient with a wrong or no secret is refused before anything moves."""
    secret = _secret(workdir, "s", "the right one")
    wrong = _secret(workdir, "w", "the wrong one")
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        args = [wrong if a == "WRONG" else a for a in recipient_args]
        refused = takeover("take", control, *args)
        procs.append(refused)
        assert message in _single_error(refused)
        assert echo(client, b"still here\n") == b"still here\n"
        listing = takeover("list", "--json", control, "--secret-file", secret)
        procs.append(listing)
        listing.expect(r'"state": "available"')
    assert origin.popen.poll() is None


def test_originator_without_secret_is_not_trusted(control, free_port, workdir, procs):
    """A recipient given a secret refuses an originator that proves nothing."""
    secret = _secret(workdir, "s", "only the recipient has it")
    origin = run_example("echo", free_port, control)
    procs.append(origin)
    refused = takeover("take", control, "--secret-file", secret)
    procs.append(refused)
    assert "does not authenticate with a shared secret" in _single_error(refused)
    listing = takeover("list", "--json", control)
    procs.append(listing)
    listing.expect(r'"state": "available"')


def test_secret_file_readable_by_others_rejected(control, free_port, workdir, procs):
    """A secret file that others can read is rejected, by the CLI and by an application."""
    loose = _secret(workdir, "loose", "too public", mode=0o644)
    refused = takeover("list", control, "--secret-file", loose)
    procs.append(refused)
    assert "accessible to other users (mode 0644)" in _single_error(refused)
    app = Proc(
        [
            PYTHON,
            "examples/echo.py",
            "--port",
            str(free_port),
            "--control",
            control,
            "--secret-file",
            loose,
        ],
    )
    procs.append(app)
    assert app.wait() != 0
    assert "accessible to other users" in app.output()


def _raw_connect(control: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(control)
    return sock


def _read_message(sock: socket.socket, decoder: _protocol.FrameDecoder) -> Message:
    while True:
        messages = decoder.feed(sock.recv(65536))
        if messages:
            return messages[0]


def test_replayed_authentication_refused(control, free_port, workdir, procs):
    """Bytes of a successful exchange, replayed on a new connection, are refused."""
    value = "replay me if you can"
    secret = _secret(workdir, "s", value)
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    nonce = _auth.new_nonce()
    hello = recipient_hello(nonce)
    with _raw_connect(control) as first:
        first.sendall(hello)
        theirs = _read_message(first, _protocol.FrameDecoder())
        assert theirs.kind is Kind.HELLO
        answer = Message(
            Kind.AUTH,
            {"proof": _auth.proof(value.encode(), "recipient", nonce, theirs.body["nonce"])},
        ).encode()
        first.sendall(answer)
        assert _read_message(first, _protocol.FrameDecoder()).kind is Kind.AUTHED
    with _raw_connect(control) as replay:
        replay.sendall(hello)
        fresh = _read_message(replay, _protocol.FrameDecoder())
        assert fresh.body["nonce"] != theirs.body["nonce"]
        replay.sendall(answer)
        refusal = _read_message(replay, _protocol.FrameDecoder())
        assert refusal.kind is Kind.ERROR and refusal.body["code"] == "permission"
        assert "failed the shared-secret challenge" in refusal.body["message"]
    listing = takeover("list", "--json", control, "--secret-file", secret)
    procs.append(listing)
    listing.expect(r'"state": "available"')


def test_move_over_tcp_twice(free_port, workdir, procs):
    """A TCP control channel with a secret: two moves, the second on the republished port."""
    secret = _secret(workdir, "s", "tcp secret")
    control = _tcp_control()
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"zero\n") == b"zero\n"
        previous = origin
        for hop in (1, 2):
            recipient = takeover("take", control, "--secret-file", secret)
            procs.append(recipient)
            recipient.expect(r"^took echo: 1 connections")
            recipient.expect(rf"^serving 1 service\(s\) at {control} ")
            assert previous.wait() == 0
            assert echo(client, b"hop %d\n" % hop) == b"hop %d\n" % hop
            previous = recipient


def test_tcp_without_secret_or_tls_refused(free_port, procs):
    """Neither side agrees to a TCP control channel with no secret and no TLS."""
    control = _tcp_control()
    app = Proc(
        [PYTHON, os.path.join(EXAMPLES, "echo.py"), "--port", str(free_port), "--control", control]
    )
    procs.append(app)
    assert app.wait() != 0
    assert "needs a shared secret or TLS" in app.output()
    refused = takeover("list", control)
    procs.append(refused)
    assert "needs a shared secret" in _single_error(refused)


@pytest.fixture
def pki(workdir) -> dict[str, str]:
    """A CA, an originator and a recipient certificate signed by it, and a stranger's.

    With the extensions Python 3.13's default context requires (VERIFY_X509_STRICT):
    key usage on the CA, key identifiers on the leaves.
    """

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    with open(os.path.join(workdir, "leaf.ext"), "w") as f:
        f.write(
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth, clientAuth\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid, issuer\n"
        )
    for ca in ("ca", "other-ca"):
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
            "-addext",
            "keyUsage = critical, keyCertSign, cRLSign",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
        )
    for name, ca in (("originator", "ca"), ("recipient", "ca"), ("stranger", "other-ca")):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.pem",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            f"{name}.pem",
        )
    return {
        name: os.path.join(workdir, name)
        for name in ("ca", "originator", "recipient", "stranger", "other-ca")
    }


def _tls(pki: dict[str, str], who: str, ca: str = "ca") -> list[str]:
    return [
        "--tls-cert",
        pki[who] + ".pem",
        "--tls-key",
        pki[who] + ".key",
        "--tls-ca",
        pki[ca] + ".pem",
    ]


def test_move_over_tls_and_stranger_refused(free_port, pki, procs):
    """Mutual TLS: a certificate from the CA moves the service; a stranger's is refused."""
    control = _tcp_control()
    origin = run_example("echo", free_port, control, *_tls(pki, "originator"))
    procs.append(origin)
    stranger = takeover("list", control, *_tls(pki, "stranger", ca="ca"))
    procs.append(stranger)
    assert "probably refused this side's certificate" in _single_error(stranger)
    wrong_ca = takeover("list", control, *_tls(pki, "recipient", ca="other-ca"))
    procs.append(wrong_ca)
    assert "TLS handshake with" in _single_error(wrong_ca)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"tls\n") == b"tls\n"
        recipient = takeover("take", control, *_tls(pki, "recipient"))
        procs.append(recipient)
        recipient.expect(r"^took echo: 1 connections")
        assert origin.wait() == 0
        assert echo(client, b"moved\n") == b"moved\n"


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (name, host addr, ns addr)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pythons.skip_or_fail("creating a network namespace needs root and iproute2")
    name = f"tk{os.getpid()}"
    host_if, ns_if = f"{name}a", f"{name}b"
    host_addr, ns_addr = "10.213.7.1", "10.213.7.2"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", name],
        ["ip", "addr", "add", f"{host_addr}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if],
        ["ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield name, host_addr, ns_addr
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_recipient_on_another_host_is_told_so(free_port, workdir, procs, netns):
    """Over TCP from another network namespace, the take fails clearly and nothing is paused."""
    name, host_addr, _ = netns
    secret = _secret(workdir, "s", "cross host")
    control = f"tcp:{host_addr}:{free_port + 1 if free_port < 65000 else free_port - 1}"
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        remote = Proc(
            [
                "ip",
                "netns",
                "exec",
                name,
                PYTHON,
                "-m",
                "takeover",
                "take",
                control,
                "--secret-file",
                secret,
            ]
        )
        procs.append(remote)
        assert "runs on another host" in _single_error(remote)
        assert echo(client, b"unmoved\n") == b"unmoved\n"
    assert origin.popen.poll() is None


def test_large_frame_before_authentication_refused_at_once(control, free_port, workdir, procs):
    """A frame header announcing megabytes before authentication is refused from the header."""
    secret = _secret(workdir, "s", "small frames first")
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    with _raw_connect(control) as raw:
        raw.sendall(bytes([Kind.HELLO]) + (80 * 1024 * 1024).to_bytes(4, "big"))
        # The originator gives up on the connection at once: no 80 MB wait, no buffering.
        assert raw.recv(65536) == b""
    listing = takeover("list", "--json", control, "--secret-file", secret)
    procs.append(listing)
    listing.expect(r'"state": "available"')


def test_demo_server_takes_a_secret_too(control, free_port, workdir, procs):
    """`takeover demo serve --secret-file` moves only to a recipient with the same secret."""
    secret = _secret(workdir, "s", "demo secret")
    server = takeover(
        "demo", "serve", "--port", str(free_port), "--control", control, "--secret-file", secret
    )
    procs.append(server)
    server.expect(r"^move it with: ")
    refused = takeover("take", "--allow", "takeover.demo", control)
    procs.append(refused)
    assert "requires a shared secret" in _single_error(refused)
    recipient = takeover("take", "--allow", "takeover.demo", control, "--secret-file", secret)
    procs.append(recipient)
    recipient.expect(r"^took shell: 0 connections")
    assert server.wait() == 0
