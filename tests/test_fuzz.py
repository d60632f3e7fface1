"""Property-based fuzzing of the control protocol against live processes.

A migration server (examples/echo.py with a shared secret and a 64 KiB frame
limit) is sent malformed, truncated and oversized frames, random sequences of
well-formed ones (before authentication, and after a correct one), stray
descriptors, and a GRAPH frame whose pickle would create a marker file if it
were ever unpickled. It must never crash, hang, leak a descriptor or unpickle
anything, and it must go on serving. A recipient (``takeover take``) facing a
fake originator that sends the same sentinel before authenticating must refuse
without unpickling it.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import select
import socket
import struct
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handshake import authenticate, write_secret
from harness.echo import echo
from harness.procs import list_fds, run_example, takeover
from harness.waiting import wait_until
from takeover._core import auth as _auth
from takeover._core import fds as _fds
from takeover._core import protocol as _protocol
from takeover._core.protocol import PROTOCOL_VERSION, Kind

MAX_FRAME = 65536
SERVER_EXAMPLES = 600
RECIPIENT_EXAMPLES = 20


class _Marker:
    """Pickles as ``open(path, "w")``: unpickling it creates the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.open, (self.path, "w"))


def sentinel(path: str) -> bytes:
    """A GRAPH frame whose blob creates ``path`` if anyone unpickles it."""
    blob = pickle.dumps(_Marker(path), protocol=2)
    return _protocol.encode(Kind.GRAPH, {"service": "echo", "fds": 0, "size": len(blob)}, blob)


def raw_frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    """A frame with any type byte and any claimed length."""
    return struct.pack("!BI", kind, len(payload) if length is None else length) + payload


# -- strategies ----------------------------------------------------------------

KEYS = [
    "protocol",
    "role",
    "pid",
    "pickle_protocol",
    "python",
    "auth",
    "nonce",
    "proof",
    "service",
    "count",
    "fds",
    "reason",
    "code",
    "message",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=20)
    | st.sampled_from(["echo", "recipient", "originator", _auth.AUTH_SCHEME, "nope"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)


@st.composite
def frames(draw) -> bytes:  # type: ignore[no-untyped-def]
    """One chunk: a well-formed frame, a broken one, an oversized one or noise."""
    choice = draw(st.integers(0, 10))
    if choice == 10:
        return b"SENTINEL"  # replaced by a GRAPH whose pickle would create the marker
    if choice <= 4:
        # COMMITTED included: without COMMITTED recorded in the move's
        # arbiter (which this fuzzer never does), it must not complete a move.
        kinds = list(Kind)
        kind = draw(st.sampled_from(kinds))
        body = draw(bodies)
        if kind is Kind.HELLO and draw(st.booleans()):
            body = {
                "protocol": PROTOCOL_VERSION,
                "role": "recipient",
                "pid": 1,
                "pickle_protocol": 5,
                "python": "x",
                **body,
            }
        if kind is Kind.TAKE and draw(st.booleans()):
            body = {"service": "echo"}
        blob = draw(st.binary(max_size=64)) if draw(st.booleans()) else b""
        return _protocol.encode(kind, body, blob)
    if choice == 5:  # a frame cut short
        whole = _protocol.encode(draw(st.sampled_from(list(Kind))), draw(bodies))
        return whole[: draw(st.integers(0, len(whole) - 1))]
    if choice == 6:  # a header claiming more than the limit, with some of it
        length = draw(st.integers(MAX_FRAME + 1, 2**32 - 1))
        return raw_frame(draw(st.integers(0, 255)), b"x" * draw(st.integers(0, 70000)), length)
    if choice == 7:  # an unknown type, or a body that is not JSON / not an object
        payload = draw(
            st.sampled_from([b"", b"\x00\x00", b"\x00\x00\x00\x05[1,2]", b"\xff\xff\xff\xff{}"])
        )
        text = draw(st.binary(max_size=30))
        return raw_frame(draw(st.integers(0, 255)), payload + text)
    if choice == 8:  # a JSON body with a lying length
        text = json.dumps(draw(bodies)).encode()
        payload = struct.pack("!I", draw(st.integers(0, 2**32 - 1))) + text
        return raw_frame(draw(st.sampled_from(list(Kind))), payload)
    return draw(st.binary(min_size=1, max_size=100))


@st.composite
def conversations(draw):  # type: ignore[no-untyped-def]
    """(authenticate first?, chunks, index of the chunk that carries a descriptor or None)."""
    authenticated = draw(st.booleans())
    chunks = draw(st.lists(frames(), min_size=1, max_size=6))
    with_fd = draw(st.none() | st.integers(0, len(chunks) - 1))
    return authenticated, chunks, with_fd


# -- talking to the server -------------------------------------------------------


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until EOF; descriptors that come along (a GRAPH's) are closed."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            raise AssertionError(f"the migration server neither answered nor closed: {data!r}")
        try:
            chunk, fds = _fds.recv_with_fds(sock, 1 << 20)
        except ConnectionResetError:
            return data
        _fds.close_all(fds)
        if not chunk:
            return data
        data += chunk


def send_chunks(sock: socket.socket, chunks: list[bytes], with_fd: int | None, marker: str) -> None:
    for i, chunk in enumerate(chunks):
        data = sentinel(marker) if chunk == b"SENTINEL" else chunk
        try:
            if i == with_fd and data:
                r, w = os.pipe()
                try:
                    sent = _fds.send_with_fds(sock, data, [r, w])
                finally:
                    os.close(r)
                    os.close(w)
                data = data[sent:]
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server gave up on us: fine


@pytest.fixture
def secret_path(workdir: str) -> str:
    return write_secret(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_migration_server_survives_fuzzing(
    transport, control, workdir, free_port, procs, secret_path
):
    """Random and hostile frames never crash, hang, leak fds or unpickle; the server serves on."""
    marker = os.path.join(workdir, "UNPICKLED")
    if transport == "tcp":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address: Any = ("127.0.0.1", s.getsockname()[1])
        control = f"tcp:127.0.0.1:{address[1]}"
    else:
        address = control
    server = run_example(
        "echo",
        free_port,
        control,
        "--secret-file",
        secret_path,
        "--max-frame-size",
        str(MAX_FRAME),
        "--step-timeout",
        # Over TCP a TAKE waits that long for the fd transport this fuzzer never opens.
        "5" if transport == "unix" else "0.3",
    )
    procs.append(server)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"before\n") == b"before\n"
        baseline = list_fds(server.pid)
        stats = {"examples": 0, "authenticated": 0}
        examples = SERVER_EXAMPLES if transport == "unix" else SERVER_EXAMPLES // 3

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(conversations())
        def fuzz(conversation) -> None:  # type: ignore[no-untyped-def]
            authenticated, chunks, with_fd = conversation
            family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(address)
                if transport == "tcp":
                    with_fd = None  # descriptors do not cross TCP
                if authenticated:
                    authenticate(sock)
                    stats["authenticated"] += 1
                send_chunks(sock, chunks, with_fd, marker)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                read_all(sock)
            stats["examples"] += 1
            assert server.popen.poll() is None, server.output()
            assert not os.path.exists(marker), "a frame was unpickled by the migration server"

        fuzz()
        assert stats["examples"] >= examples // 2 and stats["authenticated"] > 0, stats
        # Every conversation is over and nothing of it stays open.
        wait_until(lambda: list_fds(server.pid) == baseline, timeout=10, what="the fd table")
        assert not os.path.exists(marker)
        assert server.popen.poll() is None
        # It still serves: the old connection, a new one, and the control socket.
        assert echo(client, b"after\n") == b"after\n"
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as fresh:
            assert echo(fresh, b"fresh\n") == b"fresh\n"
        listing = takeover("list", "--json", control, "--secret-file", secret_path)
        procs.append(listing)
        assert listing.wait() == 0, listing.output()
        (line,) = listing.output().splitlines()
        described = json.loads(line)
        assert (described["name"], described["state"]) == ("echo", "available")
        assert list_fds(server.pid) == baseline
        # No conversation ended in an unexpected exception, only in refusals.
        output = server.output()
        assert "Traceback" not in output and "control connection failed" not in output, output


# -- a recipient facing a fake originator ------------------------------------------


def test_recipient_never_unpickles_before_authentication(workdir, procs, secret_path):
    """A fake originator sends a marker-making GRAPH before authenticating: nothing is unpickled."""
    marker = os.path.join(workdir, "UNPICKLED")
    path = os.path.join(workdir, "fake.sock")
    outcomes = []

    @settings(
        max_examples=RECIPIENT_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        hello=st.sampled_from(["none", "no auth", "bad proof", "garbage"]),
        before=st.lists(frames(), max_size=2),
    )
    def fuzz(hello: str, before: list[bytes]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            try:
                listener.listen(1)
                recipient = takeover("take", path, "--secret-file", secret_path)
                procs.append(recipient)
                ready, _, _ = select.select([listener], [], [], 20)
                assert ready, recipient.output()
                conn, _ = listener.accept()
                conn.settimeout(10)
                with conn:
                    conn.recv(65536)  # the recipient's HELLO
                    body = {
                        "protocol": PROTOCOL_VERSION,
                        "role": "originator",
                        "pid": os.getpid(),
                        "pickle_protocol": 5,
                        "python": "x",
                    }
                    if hello == "bad proof":
                        body.update(
                            auth=_auth.AUTH_SCHEME, nonce=_auth.new_nonce(), proof="00" * 32
                        )
                    chunks = [] if hello == "none" else [_protocol.encode(Kind.HELLO, body)]
                    if hello == "garbage":
                        chunks = [b"\x05\x00\x00\x00\x02{}"]
                    for chunk in [*chunks, *before, sentinel(marker), sentinel(marker)]:
                        try:
                            conn.sendall(chunk)
                        except (BrokenPipeError, ConnectionResetError):
                            break
                    # All is said: a frame cut short ends at EOF, not at the
                    # recipient's step timeout (longer than this wait).
                    try:
                        conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    status = recipient.wait()
            finally:
                os.unlink(path)
        outcomes.append(status)
        assert status == 1, recipient.output()
        assert "takeover: error: " in recipient.output()
        assert not os.path.exists(marker), "the recipient unpickled an unauthenticated GRAPH"

    fuzz()
    assert len(outcomes) >= RECIPIENT_EXAMPLES // 2
