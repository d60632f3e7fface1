"""A line echo server on a simulated host whose connections move to another host
by TCP_REPAIR, for tests/test_crosshost.py. Driven by lines on stdin.

``serve ADDRESS PORT``: listen on ADDRESS:PORT and echo complete lines.
``adopt STATE``: rebuild the connections (and the listener) from STATE in
repair mode, sending nothing; serve once told ``start``.

Commands: ``freeze STATE`` (stop serving, drop the connections' packets,
repair mode, checkpoint into STATE), ``thaw`` (rollback: serve again),
``close`` (commit: close the sockets silently), ``lift`` (remove the drop and
exit), ``start`` (an adopter: leave repair mode, write what the originator had
not sent, serve).
"""

from __future__ import annotations

import pickle
import selectors
import socket
import sys
from typing import Any

from takeover._core import tcprepair


class Server:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.address: tuple[str, int] = ("", 0)
        self.conns: dict[socket.socket, list[bytes]] = {}  # [pending line, output]
        self.frozen: tcprepair.Freeze | None = None
        self.adopted: list[tuple[socket.socket, dict[str, Any]]] = []
        self.serving = False
        self.running = True
        self.selector.register(sys.stdin, selectors.EVENT_READ)

    def listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_IP, tcprepair.IP_FREEBIND, 1)
        listener.bind(self.address)
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener

    def serve(self) -> None:
        assert self.listener is not None
        self.selector.register(self.listener, selectors.EVENT_READ)
        for conn in self.conns:
            conn.setblocking(False)
            self.selector.register(conn, self._events(conn))
        self.serving = True

    def pause(self) -> None:
        for sock in [self.listener, *self.conns]:
            if sock is not None:
                self.selector.unregister(sock)
        self.serving = False

    def _events(self, conn: socket.socket) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if self.conns[conn][1] else 0)

    def accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.conns[conn] = [b"", b""]
            self.selector.register(conn, selectors.EVENT_READ)

    def on_conn(self, conn: socket.socket, mask: int) -> None:
        state = self.conns[conn]
        if mask & selectors.EVENT_READ:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                self.selector.unregister(conn)
                del self.conns[conn]
                conn.close()
                return
            if data:
                *lines, state[0] = (state[0] + data).split(b"\n")
                if lines:
                    state[1] += b"\n".join(lines) + b"\n"
        if state[1]:
            try:
                sent = conn.send(state[1])
            except BlockingIOError:
                sent = 0
            state[1] = state[1][sent:]
        self.selector.modify(conn, self._events(conn))

    def command(self, line: str) -> None:
        word, *args = line.split()
        if word == "serve":
            self.address = (args[0], int(args[1]))
            self.listen()
            self.serve()
            print("serving", flush=True)
        elif word == "freeze":
            self.pause()
            self.frozen = tcprepair.freeze(list(self.conns))
            states = self.frozen.checkpoints()
            carried = [[*self.conns[c], s] for c, s in zip(self.conns, states)]
            with open(args[0], "wb") as f:
                pickle.dump({"address": self.address, "connections": carried}, f)
            print(f"frozen {len(states)}", flush=True)
        elif word == "thaw":
            assert self.frozen is not None
            self.frozen.thaw()
            self.frozen = None
            self.serve()
            print("thawed", flush=True)
        elif word == "close":
            assert self.frozen is not None and self.listener is not None
            self.frozen.close_sockets()
            self.listener.close()
            self.conns.clear()
            print("closed", flush=True)
        elif word == "lift":
            assert self.frozen is not None
            self.frozen.lift()
            print("lifted", flush=True)
            self.running = False
        elif word == "adopt":
            with open(args[0], "rb") as f:
                carried = pickle.load(f)
            self.address = tuple(carried["address"])  # type: ignore[assignment]
            for pending, output, state in carried["connections"]:
                conn = tcprepair.prepare(state, freebind=True)
                self.adopted.append((conn, state))
                self.conns[conn] = [pending, output]
            self.listen()
            print(f"prepared {len(self.adopted)}", flush=True)
        elif word == "start":
            for conn, state in self.adopted:
                # What the originator's kernel never sent goes out first.
                self.conns[conn][1] = tcprepair.start(conn, state) + self.conns[conn][1]
            self.adopted.clear()
            self.serve()
            print("started", flush=True)

    def run(self) -> None:
        while self.running:
            for key, mask in self.selector.select():
                if key.fileobj is sys.stdin:
                    line = sys.stdin.readline()
                    if not line:
                        return
                    self.command(line)
                elif key.fileobj is self.listener:
                    self.accept()
                elif self.serving and key.fileobj in self.conns:
                    self.on_conn(key.fileobj, mask)  # type: ignore[arg-type]


if __name__ == "__main__":
    Server().run()
