"""Load clients for load.py and sidebyside.py: many connections in one process, on selectors.

    python benchmarks/_client.py --port P --app echo|http --connections N --duration S
        [--interval MS] [--reconnect] [--hold] [--samples PATH] [--id-base K]
    python benchmarks/_client.py --port P --churn --duration S [--samples PATH]

Connects every connection (blocking), prints ``{"event": "connected"}``, waits
for a line ``go`` on stdin, runs ``--warmup`` seconds unrecorded (answers still
checked), prints ``{"event": "started", "t0": T}`` and runs
for S seconds: each connection sends a request, waits for its whole answer,
checks it and sends the next (at once, or ``--interval`` ms after the previous
one was sent). A connection stops by itself at T + S once its request in
flight is answered. Then it prints ``{"event": "done", ...}`` with the counts
and checks; with ``--samples`` every request's (send time, latency) pair, in
seconds on the shared monotonic clock, is written there as native doubles.
With ``--hold`` the connections then stay open, idle, until a line (or EOF)
on stdin: a driver that moves the service until the end of the run (load.py)
moves every connection each time, however late its last move ends.

* ``echo``: variable-length lines (``examples/echo.py``): the answer must be the
  request, byte for byte; a CRC32 of everything sent and of everything received
  on each connection must agree, and no byte may arrive unasked.
* ``http``: ``GET /cK/SEQ`` keep-alive requests (``examples/http_counter.py``):
  200, the right ``Content-Length``, the request's own path in the body; the
  hit numbers of all answers are reported so the driver can check that they
  are 1..n, each once (no request lost or served twice).

Without ``--reconnect`` any connection error is an error. With it (the side
by side), a connection the server closes or resets is counted as broken and
reopened (refused attempts are retried every 10 ms) and its unanswered request
is sent again; its latency runs from its first send. Each break is reported
(``breaks``: when, and how: ``eof`` for a close, else the exception's name). With ``--interval`` the
latency of every request runs from when it was due, so that a request that
could not be sent while the connection was being reopened counts the wait.

``--churn``: one connection per request (connect, one echo line, close) in a
loop, one every 2 ms; refused, reset and timed-out attempts are counted.
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time
import zlib
from typing import Any

REQUEST_TIMEOUT = 10.0
RETRY = 0.01
CHURN_GAP = 0.002
STALL = 0.05
"""A turn of the client loop took this much longer than its wait: this process was
not running (or was busy), which the latency of that turn's answers includes."""
FILLER = b"abcdefghijklmnopqrstuvwxyz0123456789" * 8
MAX_BREAKS = 10000


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


class Conn:
    __slots__ = (
        "buf",
        "cid",
        "crc_recv",
        "crc_sent",
        "due_at",
        "next_at",
        "recv_bytes",
        "req",
        "sent_at",
        "sent_bytes",
        "seq",
        "sock",
        "state",
    )

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.sock: socket.socket | None = None
        self.seq = 0
        self.req = b""
        self.sent_at = 0.0
        self.next_at = 0.0  # when to retry connecting
        self.due_at = 0.0  # when the next request is due (with --interval)
        self.buf = bytearray()
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.crc_sent = 0
        self.crc_recv = 0
        self.state = "idle"  # idle, waiting, connecting, retry, done, dead


class Clients:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.addr = ("127.0.0.1", args.port)
        self.http = args.app == "http"
        self.interval = args.interval / 1000.0
        self.sel = selectors.DefaultSelector()
        self.conns = [Conn(args.id_base + i) for i in range(args.connections)]
        self.samples = array.array("d")
        self.hits: list[int] = []
        self.errors: dict[str, int] = {}
        self.first_errors: list[str] = []
        self.broken = 0
        self.breaks: list[list[Any]] = []
        self.reconnects = 0
        self.refused = 0
        self.completed = 0
        self.warmup_completed = 0
        self.end = 0.0
        self.stalls: list[list[float]] = []

    # -- requests -------------------------------------------------------------------

    def request(self, c: Conn) -> bytes:
        if self.http:
            return f"GET /c{c.cid}/{c.seq} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        head = f"{c.cid}:{c.seq}:".encode()
        return head + FILLER[: (c.seq * 37 + c.cid * 11) % 200] + b"\n"

    def error(self, c: Conn, kind: str, detail: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"connection {c.cid} request {c.seq}: {kind} {detail}")

    def send(self, c: Conn, now: float, again: bool = False) -> None:
        if not again:
            c.req = self.request(c)
            # With --interval, latency runs from when the request was due, so that
            # time spent unable to send (reconnecting) counts too.
            c.sent_at = c.due_at if self.interval > 0 else now
        assert c.sock is not None
        try:
            n = c.sock.send(c.req)
        except OSError as exc:
            self.lost(c, type(exc).__name__)
            return
        if n != len(c.req):  # small requests on an idle socket: never seen
            self.error(c, "short-send")
            self.kill(c)
            return
        c.sent_bytes += n
        c.crc_sent = zlib.crc32(c.req, c.crc_sent)
        c.state = "waiting"

    def kill(self, c: Conn) -> None:
        if c.sock is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.sock = None
        c.state = "dead"

    def lost(self, c: Conn, kind: str) -> None:
        """The server closed or reset the connection."""
        if not self.args.reconnect:
            self.error(c, kind)
            self.kill(c)
            return
        pending = c.state == "waiting"
        self.broken += 1
        if len(self.breaks) < MAX_BREAKS:
            self.breaks.append([time.monotonic(), kind])
        self.kill(c)
        c.buf.clear()
        c.state = "retry"
        c.next_at = time.monotonic()
        if not pending:  # else the unanswered request is sent again
            c.req = b""

    def reconnect(self, c: Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.addr)
        c.sock = sock
        if err in (0, errno.EINPROGRESS):
            c.state = "connecting"
            self.sel.register(sock, selectors.EVENT_WRITE, c)
        else:
            self.refused_again(c)

    def refused_again(self, c: Conn) -> None:
        self.refused += 1
        if c.sock is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.sock = None
        c.state = "retry"
        c.next_at = time.monotonic() + RETRY

    def connected(self, c: Conn, now: float) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.refused_again(c)
            return
        self.reconnects += 1
        self.sel.modify(c.sock, selectors.EVENT_READ, c)
        if c.req:
            self.send(c, now, again=True)
        elif self.interval > 0 and now < self.end:
            c.state = "idle"  # the next request keeps the time it was due
        else:
            self.due(c, now)

    def due(self, c: Conn, now: float) -> None:
        """The previous request is answered (or there was none): next one, or stop."""
        if now >= self.end:
            c.state = "done"
        elif self.interval <= 0:
            self.send(c, now)
        else:
            c.state = "idle"
            c.due_at = c.sent_at + self.interval

    # -- answers --------------------------------------------------------------------

    def readable(self, c: Conn) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lost(c, type(exc).__name__)
            return
        if not data:
            self.lost(c, "eof")
            return
        now = time.monotonic()
        c.recv_bytes += len(data)
        c.crc_recv = zlib.crc32(data, c.crc_recv)
        if c.state != "waiting":
            self.error(c, "unasked-bytes", repr(data[:40]))
            return
        c.buf += data
        done = self.http_answer(c) if self.http else self.echo_answer(c)
        if done:
            self.samples.append(c.sent_at)
            self.samples.append(now - c.sent_at)
            self.completed += 1
            c.buf.clear()
            c.seq += 1
            c.req = b""
            self.due(c, now)

    def echo_answer(self, c: Conn) -> bool:
        if len(c.buf) < len(c.req):
            return False
        if bytes(c.buf) != c.req:
            self.error(c, "echo-mismatch", f"{bytes(c.buf[:60])!r} for {c.req[:60]!r}")
        return True

    def http_answer(self, c: Conn) -> bool:
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(c.buf[:end]).decode("latin-1").split("\r\n")
        length = -1
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if length < 0:
            self.error(c, "http-no-length", head[0])
            return True
        if len(c.buf) < end + 4 + length:
            return False
        body = bytes(c.buf[end + 4 :]).decode("latin-1")
        if len(c.buf) > end + 4 + length:
            self.error(c, "http-extra-bytes", repr(body[length:][:40]))
        if not head[0].startswith("HTTP/1.1 200"):
            self.error(c, "http-status", head[0])
        fields = dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)
        if fields.get("path") != f"/c{c.cid}/{c.seq}":
            self.error(c, "http-wrong-answer", f"path {fields.get('path')!r}")
        try:
            self.hits.append(int(fields["hits"]))
        except (KeyError, ValueError):
            self.error(c, "http-no-hits", repr(body[:60]))
        return True

    # -- the loop -------------------------------------------------------------------

    def connect_all(self) -> None:
        for c in self.conns:
            sock = socket.create_connection(self.addr, timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            c.sock = sock
            self.sel.register(sock, selectors.EVENT_READ, c)

    def run(self, t0: float, duration: float) -> None:
        self.end = t0 + duration
        now = time.monotonic()
        for i, c in enumerate(self.conns):  # with --interval: spread over one interval
            c.due_at = now + self.interval * i / len(self.conns)
            c.sent_at = c.due_at - self.interval
            self.due(c, now)
        last_check = now
        while True:
            active = False
            wake = now + 0.05
            for c in self.conns:
                state = c.state
                if state == "idle":
                    active = True
                    if c.due_at <= now:
                        self.send(c, now)
                    else:
                        wake = min(wake, c.due_at)
                elif state == "retry":
                    active = True
                    if c.next_at <= now:
                        if now < self.end or c.req:
                            self.reconnect(c)
                        else:
                            c.state = "done"
                    else:
                        wake = min(wake, c.next_at)
                elif state in ("waiting", "connecting"):
                    active = True
            if not active:
                break
            before = time.monotonic()
            timeout = max(0.0, wake - before)
            for key, _mask in self.sel.select(timeout):
                c = key.data
                if c.state == "connecting":
                    self.connected(c, time.monotonic())
                else:
                    self.readable(c)
            now = time.monotonic()
            late = now - before - timeout
            if late > STALL and len(self.stalls) < 100:
                self.stalls.append([before, late])
            if now - last_check > 0.5:
                last_check = now
                for c in self.conns:
                    if c.state == "waiting" and now - c.sent_at > REQUEST_TIMEOUT:
                        self.error(c, "timeout", f"no answer in {REQUEST_TIMEOUT} s")
                        self.kill(c)

    def drain_extra(self, grace: float) -> None:
        """After the last answers: no byte may still arrive (a duplicate)."""
        deadline = time.monotonic() + grace
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _mask in self.sel.select(left):
                c = key.data
                try:
                    data = c.sock.recv(65536)
                except OSError as exc:
                    if not self.args.reconnect:
                        self.error(c, type(exc).__name__, "after the run")
                    self.kill(c)
                    continue
                if not data:
                    if not self.args.reconnect:
                        self.error(c, "eof", "after the run")
                    self.kill(c)
                    continue
                c.recv_bytes += len(data)
                c.crc_recv = zlib.crc32(data, c.crc_recv)
                self.error(c, "unasked-bytes", f"after the run: {data[:40]!r}")

    def result(self) -> dict[str, Any]:
        crc_mismatch = 0
        byte_diff = 0
        sent = received = 0
        for c in self.conns:
            sent += c.sent_bytes
            received += c.recv_bytes
            if not self.http and not self.args.reconnect:
                byte_diff += abs(c.sent_bytes - c.recv_bytes)
                crc_mismatch += c.crc_sent != c.crc_recv
        return {
            "completed": self.completed,
            "warmup_completed": self.warmup_completed,
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "first_errors": self.first_errors,
            "broken": self.broken,
            "breaks": self.breaks,
            "reconnects": self.reconnects,
            "refused": self.refused,
            "bytes_sent": sent,
            "bytes_received": received,
            "echo_byte_difference": byte_diff,
            "echo_crc_mismatches": crc_mismatch,
            "hits": self.hits,
            "client_stalls": self.stalls,
            "unfinished": sum(c.state not in ("done",) for c in self.conns),
        }


def churn(args: argparse.Namespace, t0: float, samples: array.array[float]) -> dict[str, Any]:
    """One connection per request until t0 + duration."""
    addr = ("127.0.0.1", args.port)
    counts = {"ok": 0, "refused": 0, "reset": 0, "timeout": 0, "other": 0}
    failures: list[list[Any]] = []
    end = t0 + args.duration
    linger = struct.pack("ii", 1, 0)
    n = 0
    next_at = t0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if next_at > now:
            time.sleep(next_at - now)  # one new connection every CHURN_GAP: the load itself
        start = time.monotonic()
        next_at = start + CHURN_GAP
        line = f"churn {n}\n".encode()
        n += 1
        kind = "ok"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(addr)
            sock.sendall(line)
            got = b""
            while len(got) < len(line):
                chunk = sock.recv(4096)
                if not chunk:
                    kind = "reset"
                    break
                got += chunk
            if kind == "ok" and got != line:
                kind = "other"
        except ConnectionRefusedError:
            kind = "refused"
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            kind = "reset"
        except socket.timeout:
            kind = "timeout"
        except OSError:
            kind = "other"
        finally:
            try:  # close with RST: no TIME_WAIT piling up on the client side
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
            sock.close()
        counts[kind] += 1
        if kind == "ok":
            samples.append(start)
            samples.append(time.monotonic() - start)
        else:
            failures.append([start, kind])
            next_at = start + max(CHURN_GAP, 0.005)
    return {"counts": counts, "failures": failures, "attempts": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app", choices=("echo", "http"), default="echo")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.0, help="ms between requests")
    parser.add_argument("--reconnect", action="store_true")
    parser.add_argument(
        "--hold", action="store_true", help="after the done line, keep the connections until stdin"
    )
    parser.add_argument("--churn", action="store_true")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of unrecorded load")
    parser.add_argument("--samples")
    parser.add_argument("--id-base", type=int, default=0)
    args = parser.parse_args()
    clients = None if args.churn else Clients(args)
    if clients is not None:
        clients.connect_all()
    emit("connected", pid=os.getpid())
    if sys.stdin.readline().strip() != "go":
        return
    if clients is not None and args.warmup > 0:
        # The same load, unrecorded, so that the server process is warm: on this
        # kind of machine a fresh process serves its first second or two slower.
        clients.run(time.monotonic(), args.warmup)
        clients.samples = array.array("d")
        clients.warmup_completed, clients.completed = clients.completed, 0
    t0 = time.monotonic()
    emit("started", t0=t0)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    if clients is not None:
        clients.run(t0, args.duration)
        clients.drain_extra(0.1)
        result = clients.result()
        samples = clients.samples
    else:
        samples = array.array("d")
        result = churn(args, t0, samples)
    wall = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime - usage0.ru_utime + usage.ru_stime - usage0.ru_stime
    if args.samples:
        with open(args.samples, "wb") as f:
            samples.tofile(f)
    emit("done", wall_s=wall, cpu_s=cpu, **result)
    if args.hold:
        sys.stdin.readline()


if __name__ == "__main__":
    main()
