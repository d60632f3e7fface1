"""The WebSocket benchmark's load: many `websockets` clients in one asyncio process.

    python benchmarks/_ws_client.py --port P --connections N --first-id I --total T
        --interval S --warmup S --duration S --samples PATH [--compression none]
        [--fill BYTES]

Talks to the driver (``websocket.py``) with JSON lines on stdout and lines on
stdin:

1. opens N connections to ``ws://127.0.0.1:P/ws`` with
   ``websockets.asyncio.client.connect`` (its defaults: permessage-deflate
   offered unless ``--compression none``); with ``--fill BYTES``, each sends a
   first message of BYTES of random text (SEQ 0), answered with the same,
   which fills both deflate windows as 32 KiB of history each way would; then
   prints ``connected``, with the extensions the server agreed to;
2. on ``go T`` (a time on the monotonic clock, which every process shares),
   each connection sends a text message every ``--interval`` s,
   ``ID SEQ SENT``: its id (``--first-id`` ... ``+N-1``), its sequence number
   from 0 and the monotonic time of the send. Connection ``ID`` sends first at
   ``T + interval * ID / TOTAL``, so that the ``--total`` connections of every
   client process are spread evenly over an interval. Messages sent in
   ``[T + warmup, T + warmup + duration)`` are measured; the others are checked
   only. At ``T + warmup + duration`` the connections stop sending, wait (up
   to ``--settle`` s) for the replies still due and print ``done``: the counts
   and checks below. The latency of every measured message (reply received
   minus ``SENT``) is written to ``--samples`` as pairs of doubles (sent,
   latency in s);
3. keeps every connection open, idle, until the line ``close``: then closes
   them (the close handshake, code 1000), prints ``closed`` and exits.

Every reply must be ``PID COUNT ID SEQ SENT`` for the next SEQ of that
connection (in order, each once), with COUNT = SEQ + 1 (the server's count,
which moves with the connection). A reply with a SEQ already answered is a
duplicate, one beyond the next is out of order, one that does not match is
wrong; a message never answered is lost. A connection that ends before the
line ``close`` (``ConnectionClosed``, or any error) is counted as closed, with
its code.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import collections
import json
import os
import resource
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

STALL = 0.05
"""A turn of the loop this much later than asked is a stall (the process did not run)."""
MAX_RECORDED = 20
"""Problems kept with their details (all are counted)."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


class Conn:
    """One WebSocket connection, its sender and its checks."""

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.ws: ClientConnection | None = None
        self.sent = 0  # messages sent (the next SEQ)
        self.expected = 0  # the next SEQ to be answered
        self.received = 0  # replies received, each SEQ once
        self.duplicates = 0
        self.out_of_order = 0
        self.wrong = 0
        self.pids: set[str] = set()
        self.closed: dict[str, Any] | None = None  # how it ended before `close`
        self.closing = False  # we began the close


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conns = [Conn(args.first_id + i) for i in range(args.connections)]
        self.samples = array.array("d")
        self.window = (float("inf"), float("inf"))
        self.stalls: list[list[float]] = []
        self.problems: list[str] = []
        self.send_lag_max = 0.0
        self.late_sends = 0  # sends more than an interval behind their schedule
        self.errors = 0
        self.measured = 0
        self.stop = asyncio.Event()
        self.receivers: list[asyncio.Future[None]] = []
        self.watcher: asyncio.Future[None] | None = None

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_RECORDED:
            self.problems.append(text)

    # -- connecting ------------------------------------------------------------------

    async def open_all(self) -> None:
        uri = f"ws://127.0.0.1:{self.args.port}/ws"
        compression = None if self.args.compression == "none" else "deflate"
        limit = asyncio.Semaphore(self.args.concurrency)

        async def one(conn: Conn) -> None:
            async with limit:
                try:
                    conn.ws = await connect(uri, compression=compression, open_timeout=30)
                    if self.args.fill:
                        await self.fill(conn)
                except Exception as exc:  # reported: the driver fails the run
                    self.errors += 1
                    self.problem(f"connection {conn.cid}: connect: {exc!r}")

        await asyncio.gather(*(one(conn) for conn in self.conns))

    async def fill(self, conn: Conn) -> None:
        """Message 0: ``--fill`` bytes of text each way, which fill the deflate windows
        (the last 32 KiB of each direction) as a connection's history would."""
        ws = conn.ws
        assert ws is not None
        size = self.args.fill
        pad = base64.b64encode(os.urandom(size)).decode()[:size]
        await ws.send(f"{conn.cid} 0 {time.monotonic()!r} {pad}")
        reply = await asyncio.wait_for(ws.recv(), 30)
        fields = reply.split(" ", 5) if isinstance(reply, str) else []
        if len(fields) != 6 or fields[1:4:2] != ["1", "0"] or fields[2] != str(conn.cid):
            raise AssertionError(f"wrong reply to the fill: {str(reply)[:100]!r}")
        if fields[5] != pad:
            raise AssertionError("the fill came back changed")
        conn.sent = conn.received = conn.expected = 1
        conn.pids.add(fields[0])

    # -- the load --------------------------------------------------------------------

    async def sender(self, conn: Conn, start: float, end: float) -> None:
        ws = conn.ws
        assert ws is not None
        interval = self.args.interval
        due = start + interval * (conn.cid % self.args.total) / self.args.total
        loop = asyncio.get_running_loop()
        while due < end and conn.closed is None:
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            lag = now - due
            if lag > self.send_lag_max:
                self.send_lag_max = lag
            try:
                await ws.send(f"{conn.cid} {conn.sent} {now!r}")
            except ConnectionClosed:
                return  # the receiver counts it
            conn.sent += 1
            due += interval
            if now - due > interval:
                self.late_sends += 1
                due = now  # no burst to catch up: the schedule slips

    async def receiver(self, conn: Conn) -> None:
        ws = conn.ws
        assert ws is not None
        try:
            async for message in ws:
                now = time.monotonic()
                self.check(conn, message, now)
        except ConnectionClosed as exc:
            if not conn.closing:
                self.closed(conn, exc.rcvd.code if exc.rcvd else None, repr(exc))
            return
        except Exception as exc:  # counted as a close: the connection is unusable
            self.errors += 1
            self.closed(conn, None, repr(exc))
            return
        if not conn.closing:  # the iteration ends on a normal close (1000/1001)
            self.closed(conn, ws.close_code, f"closed by the server: {ws.close_reason!r}")

    def closed(self, conn: Conn, code: int | None, why: str) -> None:
        conn.closed = {"code": code, "at": time.monotonic(), "why": why}
        self.problem(f"connection {conn.cid} closed (code {code}): {why}")

    def check(self, conn: Conn, message: str | bytes, now: float) -> None:
        try:
            assert isinstance(message, str)
            pid, count, cid, seq, sent = message.split(" ")
            ok = int(cid) == conn.cid and int(count) == int(seq) + 1
            number = int(seq)
            sent_at = float(sent)
        except (AssertionError, ValueError):
            ok, number, sent_at, pid = False, -1, 0.0, ""
        if not ok:
            conn.wrong += 1
            self.problem(f"connection {conn.cid}: wrong reply {message!r}")
            return
        if number < conn.expected:
            conn.duplicates += 1
            self.problem(f"connection {conn.cid}: duplicate {message!r}")
            return
        if number > conn.expected:
            conn.out_of_order += 1
            self.problem(f"connection {conn.cid}: expected {conn.expected}, got {message!r}")
        conn.expected = number + 1
        conn.received += 1
        conn.pids.add(pid)
        lo, hi = self.window
        if lo <= sent_at < hi:
            self.samples.append(sent_at)
            self.samples.append(now - sent_at)
            self.measured += 1

    async def watch(self) -> None:
        """Record the turns of the loop that came STALL s late."""
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            late = loop.time() - before - 0.01
            if late > STALL and len(self.stalls) < 100:
                self.stalls.append([time.monotonic() - late, late])

    def outstanding(self) -> int:
        return sum(c.sent - c.received for c in self.conns if c.ws and c.closed is None)

    async def run(self, start: float) -> dict[str, Any]:
        args = self.args
        lo = start + args.warmup
        hi = lo + args.duration
        self.window = (lo, hi)
        live = [c for c in self.conns if c.ws is not None]
        receivers = [asyncio.ensure_future(self.receiver(c)) for c in live]
        watcher = asyncio.ensure_future(self.watch())
        wait = start - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        await asyncio.gather(*(self.sender(c, start, hi) for c in live))
        sent_end = time.monotonic()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        deadline = sent_end + args.settle
        while self.outstanding() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.receivers = receivers
        self.watcher = watcher
        sent = sum(c.sent for c in self.conns)
        answered = sum(c.received for c in self.conns)
        pids = [len(c.pids) for c in live]
        return {
            "connections": len(live),
            "sent": sent,
            "answered": answered,
            "lost": sent - answered,  # never answered
            "measured": self.measured,
            "duplicates": sum(c.duplicates for c in self.conns),
            "out_of_order": sum(c.out_of_order for c in self.conns),
            "wrong": sum(c.wrong for c in self.conns),
            "closes": sum(1 for c in self.conns if c.closed is not None),
            "close_codes": dict(
                collections.Counter(
                    str(c.closed["code"]) for c in self.conns if c.closed is not None
                )
            ),
            "errors": self.errors,
            "pids_per_connection": [min(pids), max(pids)] if pids else [0, 0],
            "send_lag_max_ms": self.send_lag_max * 1000,
            "late_sends": self.late_sends,
            "stalls": self.stalls,
            "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "wall_s": sent_end - t0,
            "problems": list(self.problems),
        }

    async def close_all(self) -> dict[str, Any]:
        for conn in self.conns:
            conn.closing = True
        live = [c for c in self.conns if c.ws is not None and c.closed is None]

        async def one(conn: Conn) -> int | None:
            assert conn.ws is not None
            await conn.ws.close()
            return conn.ws.close_code

        codes = await asyncio.gather(*(one(c) for c in live), return_exceptions=True)
        self.stop.set()
        tasks = [*self.receivers, *([self.watcher] if self.watcher else [])]
        await asyncio.gather(*tasks, return_exceptions=True)
        unclean = [c for c in codes if c != 1000]
        for code in unclean[:MAX_RECORDED]:
            self.problem(f"the close handshake ended with {code!r}")
        return {"closed": len(live), "unclean": len(unclean)}


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    client = Client(args)
    await client.open_all()
    extensions = collections.Counter(
        (c.ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        if c.ws is not None and c.ws.response is not None
        else "(not open)"
        for c in client.conns
    )
    emit(
        "connected",
        opened=sum(1 for c in client.conns if c.ws is not None),
        extensions=dict(extensions),
        problems=client.problems,
        pid=os.getpid(),
    )
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if not line.startswith("go "):
        return 1
    done = await client.run(float(line.split()[1]))
    with open(args.samples, "wb") as f:
        client.samples.tofile(f)
    emit("done", **done)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    closed = await client.close_all()
    emit("closed", **closed, problems=client.problems[len(done["problems"]) :])
    return 0


if __name__ == "__main__":
    import _common

    _common.raise_nofile()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--first-id", type=int, default=0)
    parser.add_argument("--total", type=int, help="connections of all the client processes")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between messages")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait for replies")
    parser.add_argument("--samples", required=True)
    parser.add_argument("--compression", choices=("deflate", "none"), default="deflate")
    parser.add_argument(
        "--fill", type=int, default=0, help="bytes of a first message each way (deflate windows)"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes at once")
    parsed = parser.parse_args()
    parsed.total = parsed.total or parsed.connections
    sys.exit(asyncio.run(main(parsed)))
