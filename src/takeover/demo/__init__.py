"""``takeover demo``: a live service moved twice while two clients talk to it.

The story, printed as a transcript: a counter service starts; alice and bob
connect and send lines; ``takeover take`` moves the listener, both
connections and the counts to a new process, twice; each answer after a move
comes from a new pid, with the counts carried on and no connection dropped.
Everything it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        print(f"    | {line.rstrip()}")
        if re.search(pattern, line):
            return line
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"{proc.args!r} did not print {pattern!r} (status {proc.poll()})")


def _say(client: socket.socket, who: str, text: str) -> None:
    client.sendall(text.encode() + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = client.recv(4096)
        if not chunk:
            raise RuntimeError(f"{who}'s connection closed")
        reply += chunk
    print(f"  {who:>5} > {text}")
    print(f"  {who:>5} < {reply.decode().rstrip()}")


def run(args: argparse.Namespace) -> int:
    """Run the whole story; return 0 when every step went as it should."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="takeover-demo-")
    control = os.path.join(workdir, "control.sock")
    python = sys.executable
    procs: list[subprocess.Popen[str]] = []
    clients: list[socket.socket] = []
    try:
        print(
            f"$ {os.path.basename(python)} -m takeover.demo.counter"
            f" --port {port} --control {control}"
        )
        origin = _start(
            [python, "-m", "takeover.demo.counter", "--port", str(port), "--control", control]
        )
        procs.append(origin)
        _read_until(origin, "control")
        alice = socket.create_connection(("127.0.0.1", port))
        bob = socket.create_connection(("127.0.0.1", port))
        clients += [alice, bob]
        _say(alice, "alice", "hello")
        _say(bob, "bob", "hi alice")
        previous = origin
        for move in (1, 2):
            print(
                f"\n$ takeover take {control}"
                f"        # move {move}: while alice and bob stay connected"
            )
            recipient = _start([python, "-m", "takeover", "take", control])
            procs.append(recipient)
            _read_until(recipient, "^took ")
            _read_until(recipient, "^serving ")
            previous.wait(10)
            print(f"  (pid {previous.pid} has exited with status {previous.returncode})")
            _say(alice, "alice", f"still here after move {move}?")
            _say(bob, "bob", "me too")
            previous = recipient
        print("\nBoth connections crossed two processes; the counts carried on.")
        return 0
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
