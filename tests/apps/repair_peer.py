"""One end of a connection checkpointed in one process and restored in another,
for tests/test_tcprepair.py. Driven by lines on stdin; prints what it did.

``origin PORT STATE``: listen on 127.0.0.1:PORT, accept one connection, read
the first READ bytes of the client's stream and send SENT_BEFORE bytes of its
own. On ``freeze``: drop the connection's packets, send SENT_FROZEN more (they
leave the socket but never reach the client: sent, not acknowledged), enter
repair mode, checkpoint into the file STATE (pickle), close the socket (in
repair mode: silently). On ``lift``: remove the drop, exit.

``recipient STATE``: rebuild the connection from STATE in repair mode; on
``start``: leave repair mode, write what the originator had never sent, then
the rest of the server's stream, and read the client's stream to its end,
checking every byte.
"""

from __future__ import annotations

import pickle
import random
import socket
import sys

from takeover._core import tcprepair

CLIENT_TOTAL = 60_000
READ = 3_000
SERVER_TOTAL = 400_000
SENT_BEFORE = 50_000
SENT_FROZEN = 150_000


def stream(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


CLIENT = stream(1, CLIENT_TOTAL)
SERVER = stream(2, SERVER_TOTAL)


def wait_for(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"expected {word!r}, got {line!r}")


def origin(port: int, path: str) -> None:
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
    got = b""
    while len(got) < READ:
        got += conn.recv(READ - len(got))
    assert got == CLIENT[:READ], "the client's stream is corrupt"
    conn.sendall(SERVER[:SENT_BEFORE])
    print("read", flush=True)
    wait_for("freeze")
    frozen = tcprepair.Freeze([conn])
    frozen.drop()
    conn.setblocking(False)
    sent = conn.send(SERVER[SENT_BEFORE : SENT_BEFORE + SENT_FROZEN])
    frozen.repair()
    (state,) = frozen.checkpoints()
    with open(path, "wb") as f:
        pickle.dump((SENT_BEFORE + sent, state), f)
    frozen.close_sockets()
    queued = len(state["send_queue"])
    print(
        f"frozen sent={queued - state['unsent']} unsent={state['unsent']}"
        f" inq={len(state['recv_queue'])}",
        flush=True,
    )
    wait_for("lift")
    frozen.lift()
    print("lifted", flush=True)


def recipient(path: str) -> None:
    with open(path, "rb") as f:
        written, state = pickle.load(f)
    assert tcprepair.unsent(state) == SERVER[written - state["unsent"] : written]
    conn = tcprepair.prepare(state)
    print("prepared", flush=True)
    wait_for("start")
    with conn:
        conn.sendall(tcprepair.start(conn, state))
        conn.sendall(SERVER[written:])
        conn.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
    assert bytes(got) == CLIENT[READ:], f"{len(got)} bytes of {CLIENT_TOTAL - READ}, or corrupt"
    print(f"received {len(got)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "origin":
        origin(int(sys.argv[2]), sys.argv[3])
    else:
        recipient(sys.argv[2])
