"""WebSocket connections (takeover.websocket) moved between real processes, cut anywhere.

The server is tests/apps/ws_app.py (each text message is answered ``PID N
TEXT``); the client is wsproto on a blocking socket (tests/wsclient.py), so a
request, a frame, a fragmented message, a ping or a close can be cut in two
around a move: the first half read by the originator, the second by the
recipient. Every move is a real ``takeover take`` in another process, with
the default unpickling policy (no ``--trust``, no ``--allow``).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator

import pytest
from wsproto.events import CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from harness.procs import APPS, PYTHON, ROOT, Proc, takeover
from harness.waiting import wait_until
from test_examples import _tcp_queues
from wsclient import BINARY, CONTINUATION, PING, TEXT, WsClient, frame

# Made by `make twisted-interpreters` (a dependency of `make test`), with the ws extra.
PYTHON_313 = os.path.join(ROOT, ".venv-3.13", "bin", "python")


def start(procs: list[Proc], port: int, control: str, *extra: str) -> Proc:
    proc = Proc(
        [PYTHON, os.path.join(APPS, "ws_app.py"), "--port", str(port), "--control", control, *extra]
    )
    procs.append(proc)
    proc.expect(r"control")
    return proc


def move(control: str, procs: list[Proc], connections: int, python: str = PYTHON) -> Proc:
    """``takeover take`` with the strict policy; waits until the recipient serves."""
    recipient = takeover("take", control, python=python)
    procs.append(recipient)
    recipient.expect(rf"^took ws: {connections} connections")
    recipient.expect(r"^serving 1 service\(s\) at ")
    return recipient


def read_by_server(client: WsClient) -> bool:
    """Whether the server process has read every byte ``client`` sent (see test_examples)."""
    mine, theirs = client.sock.getsockname(), client.sock.getpeername()
    sending, receiving = _tcp_queues(mine, theirs), _tcp_queues(theirs, mine)
    assert sending is not None and receiving is not None
    return sending[0] == 0 and receiving[1] == 0


def cut(client: WsClient, data: bytes, at: int) -> bytes:
    """Send ``data[:at]``, wait until the server read it; return the rest."""
    client.send(data[:at])
    wait_until(lambda: read_by_server(client), what="the server to read the first half")
    return data[at:]


@pytest.fixture(params=["deflate", "plain"])
def deflate(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "deflate")


@pytest.fixture
def served(procs: list[Proc], free_port: int, control: str) -> Iterator[Proc]:
    yield start(procs, free_port, control)


# -- HTTP ------------------------------------------------------------------------------


def test_an_http_request_cut_by_a_move_is_answered_by_the_recipient(
    served, free_port, control, procs
):
    """The head of a GET half read by the originator: the recipient's h11 reads the rest."""
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        client = WsClient.__new__(WsClient)
        client.sock = sock
        wait_until(lambda: read_by_server(client), what="the originator to read the head")
        recipient = move(control, procs, 1)
        sock.sendall(b"\r\n")
        answer = b""
        while not answer.endswith(f"pid {recipient.pid}\n".encode()):
            data = sock.recv(4096)
            assert data, answer
            answer += data
        assert answer.startswith(b"HTTP/1.1 200 ")
        # Keep-alive: the next request on the same connection, and a pipelined pair.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        answer = b""
        while answer.count(b"pid ") < 2:
            data = sock.recv(4096)
            assert data, answer
            answer += data
        assert answer.count(f"pid {recipient.pid}\n".encode()) == 2


def test_bad_requests_get_an_answer_and_the_service_goes_on(served, free_port):
    for request, status in [
        (b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"405"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            b"426",
        ),
        (
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            b"404",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", b"400"),
        (b"\x16\x03\x01 not http at all\r\n\r\n", b"400"),
    ]:
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while data := sock.recv(4096):
                answer += data
            assert answer.split(b" ", 2)[1] == status, (request, answer)
    with WsClient(free_port) as client:
        client.say("still here")
        assert client.message().endswith(" 1 still here")


# -- frames ----------------------------------------------------------------------------


def test_frames_cut_anywhere_complete_after_moves(served, free_port, control, procs, deflate):
    """Each of these is cut in two by a move, its first half read by the old process:
    a frame's header, a 300 kB message's payload, a fragmented message between its
    fragments, a UTF-8 character between two fragments, a ping. With permessage-deflate
    (context takeover, the client's default) the compression windows move too."""
    origin = served
    with WsClient(free_port, deflate=deflate) as client:
        assert client.deflate == deflate
        pids = [origin.pid]
        count = 0

        def ask(text: str) -> str:
            nonlocal count
            count += 1
            client.say(text)
            return str(client.message())

        # Enough repetition for back-references into earlier messages' windows.
        for i in range(3):
            assert (
                ask(f"warm up {i} the quick brown fox")
                == f"{origin.pid} {count} warm up {i} the quick brown fox"
            )

        # 1. A frame cut after its first byte.
        data = client.frame_bytes(TextMessage(data="cut after one byte, the quick brown fox"))
        rest = cut(client, data, 1)
        pids.append(move(control, procs, 1).pid)
        client.send(rest)
        count += 1
        assert client.message() == f"{pids[-1]} {count} cut after one byte, the quick brown fox"

        # 2. A large message cut in the middle of its payload (compressed or not).
        big = "".join(f"{i:07d} the quick brown fox " for i in range(12_000))
        data = client.frame_bytes(TextMessage(data=big))
        rest = cut(client, data, len(data) // 2)
        pids.append(move(control, procs, 1).pid)
        client.send(rest)
        count += 1
        assert client.message() == f"{pids[-1]} {count} {big}"

        # 3. A fragmented message: the first fragment before the move, the last after.
        client.send(
            client.frame_bytes(TextMessage(data="first fragment, ", message_finished=False))
        )
        wait_until(lambda: read_by_server(client), what="the first fragment to be read")
        pids.append(move(control, procs, 1).pid)
        client.say("last fragment")
        count += 1
        assert client.message() == f"{pids[-1]} {count} first fragment, last fragment"

        # 4. A character cut between two fragments (hand-made, uncompressed frames).
        euro = "€".encode()
        client.send(frame(TEXT, b"price: 5" + euro[:1], fin=False))
        wait_until(lambda: read_by_server(client), what="half a character to be read")
        pids.append(move(control, procs, 1).pid)
        client.send(frame(CONTINUATION, euro[1:] + b" each"))
        count += 1
        assert client.message() == f"{pids[-1]} {count} price: 5€ each"

        # 5. A ping cut in two: answered by the recipient.
        rest = cut(client, frame(PING, b"are you there?"), 3)
        pids.append(move(control, procs, 1).pid)
        client.send(rest)
        assert client.pong() == b"are you there?"

        # 6. Binary messages are echoed as they are.
        payload = os.urandom(70_000)
        client.send(frame(BINARY, payload))
        assert client.message() == payload

        assert ask("after five moves, the quick brown fox") == (
            f"{pids[-1]} {count} after five moves, the quick brown fox"
        )
        assert len(set(pids)) == 6


def test_a_message_half_sent_at_the_pause_arrives_whole(served, free_port, control, procs):
    """The server wrote 8 MB the client does not read: most of it waits in the
    originator's transport buffer. It moves, and the recipient finishes sending it."""
    origin = served
    with WsClient(free_port, deflate=False, rcvbuf=4096) as client:
        client.say("big 8000000")
        # The kernel buffers hold a few hundred kB at most: the rest is in user space.
        recipient = move(control, procs, 1)
        message = client.message()
        assert len(message) == 8_000_000
        assert message.startswith(f"{origin.pid} 1 big\n")
        assert message.count("x") == 8_000_000 - len(f"{origin.pid} 1 big\n")
        client.say("then")
        assert client.message() == f"{recipient.pid} 2 then"


def test_close_handshakes_cross_a_move(served, free_port, control, procs, deflate):
    """The server begins a close and the client answers after the move; and a
    client's CLOSE cut in two is answered by the recipient, which closes TCP."""
    origin = served
    with (
        WsClient(free_port, deflate=deflate) as first,
        WsClient(free_port, deflate=deflate) as second,
    ):
        first.say("close")
        closing = first.closing()
        assert (closing.code, closing.reason) == (4000, f"closed by {origin.pid}")
        second.send(second.frame_bytes(TextMessage(data="hello")))
        assert second.message() == f"{origin.pid} 1 hello"
        data = second.frame_bytes(CloseConnection(code=CloseReason.NORMAL_CLOSURE, reason="bye"))
        rest = cut(second, data, 4)
        move(control, procs, 2)
        # The first client's answer reaches the recipient, which closes the connection.
        first.send(first.frame_bytes(closing.response()))
        assert first.at_eof()
        second.send(rest)
        answer = second.closing()
        assert (answer.code, answer.reason) == (1000, "bye")
        assert second.at_eof()


def test_pings_are_answered_and_sent_across_moves(served, free_port, control, procs):
    with WsClient(free_port) as client:
        client.send(client.frame_bytes(Ping(payload=b"one")))
        assert client.pong() == b"one"
        recipient = move(control, procs, 1)
        client.say("ping")
        event = client.next_event()
        assert isinstance(event, Ping) and event.payload == str(recipient.pid).encode()


def test_to_another_interpreter_with_deflate_state(served, free_port, control, procs):
    """The windows of permessage-deflate move to CPython 3.13 (and back) as zlib
    preset dictionaries, with a compressed message half received at each move."""
    assert os.access(PYTHON_313, os.X_OK), (
        f"{PYTHON_313} is missing: run `make twisted-interpreters` (part of `make test`)"
    )
    with WsClient(free_port) as client:
        assert client.deflate
        text = "".join(f"line {i}: all work and no play " for i in range(400))
        client.say(text)
        count = 1
        assert client.message().endswith(f" {count} {text}")
        for python in (PYTHON_313, PYTHON, PYTHON_313):
            data = client.frame_bytes(TextMessage(data=text + python))
            rest = cut(client, data, len(data) // 2)
            recipient = move(control, procs, 1, python=python)
            client.send(rest)
            count += 1
            assert client.message() == f"{recipient.pid} {count} {text}{python}"
            listing = takeover("list", control)
            procs.append(listing)
            assert listing.wait() == 0


def test_a_client_without_deflate_and_a_server_that_declines_it(procs, free_port, control):
    start(procs, free_port, control, "--no-deflate")
    with WsClient(free_port, deflate=True) as client:
        assert not client.deflate
        client.say("plain")
        assert client.message().endswith(" 1 plain")
        recipient = move(control, procs, 1)
        client.say("still plain")
        assert client.message() == f"{recipient.pid} 2 still plain"


def test_the_ws_extra_is_installed():
    """make test installs the ws extra: none of these tests may skip for lack of it."""
    import h11
    import wsproto

    assert h11.__version__ == "0.16.0"
    expected = "1.3.2" if sys.version_info >= (3, 10) else "1.2.0"
    assert re.sub(r"\+.*", "", wsproto.__version__) == expected


def test_a_compressed_message_half_sent_is_refused_by_name_or_drains(
    served, free_port, control, procs
):
    """The one state that cannot move: a compressed message the application left half
    sent. Without a drain the move is refused saying why, and everything goes on; with
    --drain that connection stays behind, the others move, and at the deadline it is
    closed with 1001 (going away) so that its client reconnects."""
    origin = served
    with WsClient(free_port) as stuck, WsClient(free_port) as fine:
        assert stuck.deflate
        stuck.say("fragment")
        event = stuck.next_event()
        # (Its text may still be inside the compressor: deflate had no reason to flush.)
        assert isinstance(event, TextMessage) and not event.message_finished
        refused = takeover("take", control)
        procs.append(refused)
        assert refused.wait() == 1
        output = refused.output()
        assert "permessage-deflate message is half sent" in output, output
        assert "--drain" in output, output
        fine.say("after the refusal")
        assert fine.message() == f"{origin.pid} 1 after the refusal"

        recipient = takeover("take", "--drain", "1", control)
        procs.append(recipient)
        recipient.expect(r"^took ws: 1 connections \(1 draining in the old process for up to 1 s\)")
        fine.say("moved")
        assert fine.message() == f"{recipient.pid} 2 moved"
        closing = stuck.closing()
        assert (closing.code, closing.reason) == (1001, "the server moved; reconnect")
        stuck.send(stuck.frame_bytes(closing.response()))
        assert stuck.at_eof()
        assert origin.wait(10) == 0
