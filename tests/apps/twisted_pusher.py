"""tests/apps/pusher.py on the Twisted runtime: connections fed by a writer outside the service.

Line N of a connection reads ``N PID``; the count travels with the protocol,
the writer (a ``LoopingCall``, or SIGUSR1 with ``PUSHER_ON_SIGNAL=1``) does
not: each process runs its own. The environment variables are pusher.py's
(``PUSHER_INTERVAL``, ``PUSHER_POLITE``, ``PUSHER_ON_SIGNAL``,
``PUSHER_STATS``). A Twisted writer learns that a connection is gone from
``transport.connected`` (or, racing a move, from ``ConnectionMovedError``).

    python tests/apps/twisted_pusher.py --port PORT --control PATH [--secret-file PATH]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
from typing import Any

from twisted.internet import protocol, task

import takeover
import takeover.twisted as tko

INTERVAL = float(os.environ.get("PUSHER_INTERVAL", "0.001"))
POLITE = os.environ.get("PUSHER_POLITE") == "1"

# Outside the service: this process's own, never pickled.
FEEDS: dict[Feed, None] = {}
WRITTEN: dict[str, int] = {}
MOVED = [0]
PAUSED = [False]
STARTED = [False]


class Feed(protocol.Protocol):
    def __init__(self) -> None:
        self.sent = 0
        self.client = ""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.client = str(self.transport.getPeer().port)  # type: ignore[attr-defined]
        FEEDS[self] = None

    def connectionLost(self, reason: Any = None) -> None:
        FEEDS.pop(self, None)

    def takeover_quiesce(self) -> None:
        if POLITE:
            PAUSED[0] = True

    def takeover_resume(self) -> None:
        PAUSED[0] = False

    def takeover_adopted(self) -> None:
        FEEDS[self] = None
        PAUSED[0] = False
        start_pusher()


class FeedFactory(protocol.Factory):
    protocol = Feed


def push_once() -> tuple[int, int, int]:
    """One line to every connection; (written, moved, closed) as in pusher.py."""
    ok = moved = closed = 0
    for feed in list(FEEDS):
        transport: Any = feed.transport
        if not transport.connected or transport.disconnecting:
            FEEDS.pop(feed, None)
            closed += 1
            continue
        try:
            transport.write(f"{feed.sent} {os.getpid()}\n".encode())
        except takeover.ConnectionMovedError:
            MOVED[0] += 1
            moved += 1
            FEEDS.pop(feed, None)
            continue
        feed.sent += 1
        WRITTEN[feed.client] = WRITTEN.get(feed.client, 0) + 1
        ok += 1
    return ok, moved, closed


def push() -> None:
    if not PAUSED[0]:
        push_once()


def start_pusher() -> None:
    if STARTED[0]:
        return
    STARTED[0] = True
    atexit.register(write_stats)
    if os.environ.get("PUSHER_ON_SIGNAL") == "1":

        def on_signal() -> None:
            ok, moved, closed = push_once()
            print(f"pushed ok={ok} moved={moved} closed={closed}", flush=True)

        from twisted.internet import reactor

        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(on_signal))  # type: ignore[attr-defined]
    else:
        looping = task.LoopingCall(push)
        looping.start(INTERVAL, now=False)

        def slower() -> None:
            looping.interval *= 2
            print(f"pusher interval {looping.interval * 1000:g} ms", flush=True)

        from twisted.internet import reactor

        signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(slower))  # type: ignore[attr-defined]


def write_stats() -> None:
    where = os.environ.get("PUSHER_STATS")
    if where:
        with open(os.path.join(where, f"{os.getpid()}.json"), "w") as f:
            json.dump({"written": WRITTEN, "moved": MOVED[0]}, f)


def main(args: argparse.Namespace) -> None:
    reactor = tko.install_reactor()
    port = tko.listen_tcp(args.port, FeedFactory(), name="pusher", interface="127.0.0.1")
    reactor.callWhenRunning(start_pusher)
    done = tko.serve_until_moved(
        port,
        **tko.control_options(args),
        ready=lambda m: print(f"pusher on {args.port}, control {m.path}", flush=True),
    )
    done.addErrback(lambda failure: print(failure.getTraceback(), flush=True))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    tko.add_control_options(parser)
    main(parser.parse_args())
