"""The floor under a move of N connections: the same work with nothing else.

    python benchmarks/_floor.py N

* descriptors: N + 1 TCP sockets (one per connection, plus the listener)
  passed from this process to a forked child over an AF_UNIX stream socket
  with SCM_RIGHTS, in batches of 253, as ``takeover._core.fds`` sends them (a
  short frame per batch, ``MSG_CMSG_CLOEXEC`` on receipt). Timed from the
  first ``sendmsg`` to the child's last ``recvmsg`` on the shared monotonic
  clock.
* pickle, two ways, each with ``pickle.dumps`` at the highest protocol and
  ``pickle.loads``, in this process, with the cyclic GC paused (as a move
  pauses it; a collection is not part of the work, and how long one takes
  depends on what else the process imported):

  - **app objects**: N bare protocol objects of the benchmark's ``Echo``
    class (no transport): the application's state alone, the strictest floor.
  - **same graph**: the service's own objects, as a move pickles them: a
    quiesced ``MigratableServer`` with N ``MigratableTransport``s, each with
    its ``Echo``, pickled by a plain ``pickle.Pickler`` whose only addition
    is that a socket pickles as its descriptor number.

Prints ``{"event": "floor", "fds_ms": ..., "dumps_ms": ..., "loads_ms": ...,
"pickle_bytes": ..., "graph_dumps_ms": ..., "graph_loads_ms": ...,
"graph_bytes": ...}``.
"""

from __future__ import annotations

import array
import asyncio
import copyreg
import gc
import io
import os
import pickle
import socket
import struct
import sys
import time
from typing import Any

import _common
from _echo_app import Echo

from takeover.asyncio import MigratableServer, MigratableTransport

BATCH = 253
_INT = array.array("i").itemsize
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_FRAME = struct.pack("!BII", 6, 4, 0)  # an FDS frame's header and its JSON length


def receive(sock: socket.socket, count: int) -> None:
    """The child: take ``count`` descriptors, report when the last arrived, close them."""
    received: list[int] = []
    space = socket.CMSG_SPACE(BATCH * _INT)
    while len(received) < count:
        data, ancdata, flags, _ = sock.recvmsg(64 * 1024, space, _CLOEXEC)
        if not data and not ancdata:
            raise RuntimeError("sender went away")
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError("MSG_CTRUNC")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.extend(array.array("i", payload[: len(payload) - len(payload) % _INT]))
    done = time.monotonic()
    sock.sendall(struct.pack("d", done))
    for fd in received:
        os.close(fd)


def pass_fds(count: int) -> float:
    """Milliseconds to pass ``count`` socket descriptors to another process."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            parent.close()
            child.sendall(b"r")
            receive(child, count)
        except BaseException:
            status = 1
        os._exit(status)
    child.close()
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        fds = [s.fileno() for s in sockets]
        assert parent.recv(1) == b"r"
        start = time.monotonic()
        for i in range(0, count, BATCH):
            batch = fds[i : i + BATCH]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch).tobytes())]
            parent.sendmsg([_FRAME], rights)
        reply = b""
        while len(reply) < 8:
            chunk = parent.recv(8 - len(reply))
            if not chunk:
                raise RuntimeError("the receiving child died")
            reply += chunk
        (done,) = struct.unpack("d", reply)
    finally:
        for s in sockets:
            s.close()
        parent.close()
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the receiving child failed ({status})")
    return (done - start) * 1000


def timed_pickle(graph: Any, pickler: type[pickle.Pickler]) -> tuple[float, float, int]:
    """Milliseconds to pickle and unpickle ``graph`` (GC paused), and the size."""
    buffer = io.BytesIO()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.monotonic()
        pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(graph)
        blob = buffer.getvalue()
        dumped = time.monotonic()
        pickle.loads(blob)
        loaded = time.monotonic()
    finally:
        if enabled:
            gc.enable()
    return (dumped - start) * 1000, (loaded - dumped) * 1000, len(blob)


class _FdPickler(pickle.Pickler):
    """Plain pickle, except that a socket pickles as its descriptor number."""

    dispatch_table = {**copyreg.dispatch_table, socket.socket: lambda s: (int, (s.fileno(),))}


def same_graph(count: int) -> tuple[float, float, int]:
    """The service's objects as a move of ``count`` connections pickles them."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count + 1)]
    loop = asyncio.new_event_loop()
    try:
        server = MigratableServer(sockets[0], Echo, "echo", loop)
        for sock in sockets[1:]:
            protocol = Echo()
            transport = MigratableTransport(sock, protocol, server)
            server._transports[transport] = None
            protocol.connection_made(transport)
        server.quiesce()
        return timed_pickle(server, _FdPickler)
    finally:
        loop.close()
        for sock in sockets:
            sock.close()


def main(count: int) -> None:
    fds_ms = pass_fds(count + 1)
    dumps_ms, loads_ms, size = timed_pickle([Echo() for _ in range(count)], pickle.Pickler)
    graph_dumps_ms, graph_loads_ms, graph_bytes = same_graph(count)
    _common.emit(
        "floor",
        connections=count,
        fds=count + 1,
        fds_ms=fds_ms,
        dumps_ms=dumps_ms,
        loads_ms=loads_ms,
        pickle_bytes=size,
        graph_dumps_ms=graph_dumps_ms,
        graph_loads_ms=graph_loads_ms,
        graph_bytes=graph_bytes,
        memory=_common.memory(),
    )


if __name__ == "__main__":
    _common.raise_nofile()
    main(int(sys.argv[1]))
