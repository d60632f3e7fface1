"""The chat and HTTP counter examples moved between real processes, with real clients."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator

from harness.procs import Proc, run_example, takeover
from harness.waiting import wait_until

TIMEOUT = 10.0


class Client:
    """A blocking TCP client with a read buffer, for line and HTTP conversations."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_until(self, separator: bytes) -> bytes:
        """Bytes up to and including ``separator``; fails on EOF before it."""
        while separator not in self.buffer:
            assert self._fill(), f"EOF before {separator!r}; got {self.buffer!r}"
        end = self.buffer.index(separator) + len(separator)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert self._fill(), f"EOF after {len(self.buffer)} of {size} bytes"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def at_eof(self) -> bool:
        """True once the server closed the connection and everything was read."""
        return not self.buffer and not self._fill()

    # -- chat ----------------------------------------------------------------------

    def line(self) -> str:
        return self.read_until(b"\n")[:-1].decode()

    def say(self, text: str) -> None:
        self.send(text.encode() + b"\n")

    # -- HTTP ----------------------------------------------------------------------

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read one HTTP response: status, headers (lower-case names) and body.

        ``head``: the answer to a HEAD request (no body, whatever Content-Length says).
        """
        header_block = self.read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = header_block[:-4].split("\r\n")
        version, status, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b"" if head else self.read_exactly(int(headers["content-length"]))
        return int(status), headers, body

    def get(self, path: str = "/", *headers: str) -> tuple[int, dict[str, str], dict[str, str]]:
        """GET ``path`` on this connection; the body's ``key: value`` lines as a dict."""
        extra = "".join(f"{h}\r\n" for h in headers)
        self.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        status, response_headers, body = self.response()
        return status, response_headers, parse_body(body)


def _proc_net_tcp_address(address: tuple[str, int]) -> str:
    host, port = address[:2]
    raw = int.from_bytes(socket.inet_aton(host), sys.byteorder)
    return f"{raw:08X}:{port:04X}"


def _tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) of the IPv4 TCP socket ``local`` -> ``remote`` in /proc/net/tcp."""
    wanted = (_proc_net_tcp_address(local), _proc_net_tcp_address(remote))
    with open("/proc/net/tcp") as table:
        for row in table:
            fields = row.split()
            if (fields[1], fields[2]) == wanted:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def server_read_everything(client: Client) -> bool:
    """True once the server process has read every byte ``client`` sent.

    The client's send queue is empty (every byte acknowledged, so it reached
    the server's socket) and the server's receive queue is empty (the
    process read it): what was sent now lives in the server's user space.
    """
    mine, theirs = client.sock.getsockname(), client.sock.getpeername()
    sending, receiving = _tcp_queues(mine, theirs), _tcp_queues(theirs, mine)
    assert sending is not None and receiving is not None, "connection not in /proc/net/tcp"
    return sending[0] == 0 and receiving[1] == 0


def parse_body(body: bytes) -> dict[str, str]:
    fields = {}
    for line in body.decode().splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[list[Client]]:
    """``count`` connections to ``port``, all closed on the way out."""
    with contextlib.ExitStack() as stack:
        opened = []
        for _ in range(count):
            client = Client(port)
            stack.callback(client.close)
            opened.append(client)
        yield opened


def join(client: Client, name: str) -> str:
    """Send ``name`` as the first line; return the room's welcome line."""
    assert client.line() == "* welcome to the room; what is your name?"
    client.say(name)
    welcome = client.line()
    assert welcome.startswith(f"* welcome {name},"), welcome
    return welcome


def move(control: str, service: str, connections: int, procs: list[Proc]) -> Proc:
    """Take every service at ``control`` with ``takeover take``; wait until it serves."""
    recipient = takeover("take", control)
    procs.append(recipient)
    recipient.expect(rf"took {service}: {connections} connections")
    recipient.expect(r"^serving 1 service\(s\) at ")
    return recipient


# -- chat --------------------------------------------------------------------------------


def test_chat_members_keep_talking_after_a_move(control, free_port, procs):
    """Members connected before a move keep their names, history and each other after it."""
    origin = run_example("chat", free_port, control)
    procs.append(origin)
    with clients(free_port, 3) as (alice, bob, carol):
        assert join(alice, "alice") == "* welcome alice, 0 others here: "
        assert join(bob, "bob") == "* welcome bob, 1 others here: alice"
        assert alice.line() == "* bob joined"
        assert join(carol, "carol") == "* welcome carol, 2 others here: alice, bob"
        assert alice.line() == "* carol joined"
        assert bob.line() == "* carol joined"

        alice.say("hello before the move")
        assert bob.line() == "alice: hello before the move"
        assert carol.line() == "alice: hello before the move"
        # Half a line read by the originator, finished after the move.
        bob.send(b"this line crosses ")
        wait_until(lambda: server_read_everything(bob), what="the originator to read bob")

        recipient = move(control, "chat", 3, procs)
        assert origin.wait() == 0

        bob.say("the move")
        assert alice.line() == "bob: this line crosses the move"
        assert carol.line() == "bob: this line crosses the move"
        carol.say("after the move")
        assert alice.line() == "carol: after the move"
        assert bob.line() == "carol: after the move"
        # The sender does not hear its own message: its next line answers /who.
        for member in (alice, bob, carol):
            member.say("/who")
            assert member.line() == "* members: alice, bob, carol"

        carol.say("/history")
        assert carol.line() == "* history: 3 messages"
        assert [carol.line() for _ in range(3)] == [
            "alice: hello before the move",
            "bob: this line crosses the move",
            "carol: after the move",
        ]

        with clients(free_port, 1) as (dave,):
            assert join(dave, "dave") == "* welcome dave, 3 others here: alice, bob, carol"
            for member in (alice, bob, carol):
                assert member.line() == "* dave joined"
            alice.say("/quit")
            assert alice.line() == "* bye"
            assert alice.at_eof()
            for member in (bob, carol, dave):
                assert member.line() == "* alice left"
            dave.say("/who")
            assert dave.line() == "* members: bob, carol, dave"
        for member in (bob, carol):
            assert member.line() == "* dave left"
    assert recipient.popen.poll() is None


def test_chat_history_keeps_the_last_50_messages_across_a_move(control, free_port, procs):
    """/history after a move replays exactly the last 50 messages, old ones dropped."""
    origin = run_example("chat", free_port, control)
    procs.append(origin)
    with clients(free_port, 2) as (talker, listener):
        join(talker, "talker")
        join(listener, "listener")
        assert talker.line() == "* listener joined"
        talker.send(b"".join(f"message {i}\n".encode() for i in range(60)))
        for i in range(60):
            assert listener.line() == f"talker: message {i}"

        move(control, "chat", 2, procs)
        assert origin.wait() == 0

        listener.say("/history")
        assert listener.line() == "* history: 50 messages"
        assert [listener.line() for _ in range(50)] == [
            f"talker: message {i}" for i in range(10, 60)
        ]


# -- HTTP counter ------------------------------------------------------------------------


def test_http_counter_continues_after_a_move(control, free_port, procs):
    """A keep-alive connection survives a move and the shared counter goes on, not reset."""
    origin = run_example("http_counter", free_port, control)
    procs.append(origin)
    with clients(free_port, 2) as (keep, other):
        for expected in (1, 2, 3):
            status, headers, body = keep.get("/a")
            assert (status, headers["connection"]) == (200, "keep-alive")
            assert body == {"hits": str(expected), "pid": str(origin.pid), "path": "/a"}
        # Another connection shares the counter.
        assert other.get("/b")[2]["hits"] == "4"
        # Half a request (line and one header) parsed by the originator...
        keep.send(b"GET /crossing HTTP/1.1\r\nHost: test\r\n")
        # ...and a POST with half its body, whose answer doesn't count as a hit.
        other.send(b"POST /b HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello ")
        for client in (keep, other):
            wait_until(lambda c=client: server_read_everything(c), what="the originator to read")

        recipient = move(control, "http", 2, procs)
        assert origin.wait() == 0

        other.send(b"world")
        status, headers, body = other.response()
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        assert body == b"POST is not allowed here\n"
        keep.send(b"\r\n")
        status, _headers, raw = keep.response()
        assert status == 200
        assert parse_body(raw) == {"hits": "5", "pid": str(recipient.pid), "path": "/crossing"}
        assert keep.get("/a")[2]["hits"] == "6"
        assert other.get("/b")[2]["hits"] == "7"

    with clients(free_port, 1) as (fresh,):
        status, headers, body = fresh.get("/new", "Connection: close")
        assert (status, headers["connection"]) == (200, "close")
        assert body == {"hits": "8", "pid": str(recipient.pid), "path": "/new"}
        assert fresh.at_eof()


def test_http_counter_pipelined_requests_and_errors(control, free_port, procs):
    """Pipelined requests are answered in order; HTTP/1.0 and malformed requests close."""
    procs.append(run_example("http_counter", free_port, control))
    with clients(free_port, 3) as (pipelined, old, bad):
        pipelined.send(b"GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
        assert parse_body(pipelined.response()[2])["hits"] == "1"
        status, headers, body = pipelined.response(head=True)
        assert (status, body, headers["content-type"]) == (200, b"", "text/plain; charset=utf-8")
        assert parse_body(pipelined.response()[2]) == {
            "hits": "3",
            "pid": str(procs[0].pid),
            "path": "/3",
        }

        old.send(b"GET / HTTP/1.0\r\n\r\n")
        status, headers, _body = old.response()
        assert (status, headers["connection"]) == (200, "close")
        assert old.at_eof()

        bad.send(b"NONSENSE\r\n\r\n")
        assert bad.response()[0] == 400
        assert bad.at_eof()


# -- chains ------------------------------------------------------------------------------


def test_http_counter_moves_along_a_chain(control, free_port, procs):
    """A -> B -> C -> D: one keep-alive connection and the counter survive every hop."""
    holder = run_example("http_counter", free_port, control)
    procs.append(holder)
    with clients(free_port, 1) as (client,):
        assert client.get()[2] == {"hits": "1", "pid": str(holder.pid), "path": "/"}
        for hop in range(3):
            client.send(b"GET /hop HTTP/1.1\r\n")  # cut in half by the move
            wait_until(lambda: server_read_everything(client), what="the holder to read")
            recipient = move(control, "http", 1, procs)
            assert holder.wait() == 0, f"hop {hop}: the previous holder failed"
            holder = recipient
            client.send(b"\r\n")
            assert parse_body(client.response()[2]) == {
                "hits": str(2 * hop + 2),
                "pid": str(holder.pid),
                "path": "/hop",
            }
            assert client.get()[2]["hits"] == str(2 * hop + 3)
        assert len({p.pid for p in procs}) == 4
    holder.signal(15)
    assert holder.wait() == 0


def test_chat_moves_along_a_chain(control, free_port, procs):
    """A -> B -> C -> D: two members keep talking, history growing, across every hop."""
    holder = run_example("chat", free_port, control)
    procs.append(holder)
    with clients(free_port, 2) as (ann, ben):
        join(ann, "ann")
        join(ben, "ben")
        assert ann.line() == "* ben joined"
        for hop in range(3):
            ann.say(f"before hop {hop}")
            assert ben.line() == f"ann: before hop {hop}"
            recipient = move(control, "chat", 2, procs)
            assert holder.wait() == 0, f"hop {hop}: the previous holder failed"
            holder = recipient
            ben.say(f"after hop {hop}")
            assert ann.line() == f"ben: after hop {hop}"
        ann.say("/history")
        assert ann.line() == "* history: 6 messages"
        assert [ann.line() for _ in range(6)] == [
            line for hop in range(3) for line in (f"ann: before hop {hop}", f"ben: after hop {hop}")
        ]
        ben.say("/who")
        assert ben.line() == "* members: ann, ben"
    holder.signal(15)
    assert holder.wait() == 0
