"""The recipient's first steps, played by hand: a correct HELLO and AUTH.

For the tests that then speak the control protocol frame by frame to a real
originator (tests/test_fuzz.py, tests/test_commit.py): the originator runs with
``--secret-file`` :func:`write_secret`, and :func:`authenticate` proves it.
"""

from __future__ import annotations

import os
import socket

from takeover._core import auth as _auth
from takeover._core import protocol as _protocol
from takeover._core.protocol import Kind, Message, Role

SECRET = b"fuzzing secret"


def write_secret(workdir: str) -> str:
    """A secret file holding SECRET, which :func:`authenticate` proves."""
    path = os.path.join(workdir, "secret")
    with open(path, "wb") as f:
        f.write(SECRET + b"\n")
    os.chmod(path, 0o600)
    return path


def recipient_hello(nonce: str) -> bytes:
    """A recipient's HELLO with ``nonce``, saying it authenticates with a secret."""
    hello = _protocol.hello(
        Role.RECIPIENT,
        pid=os.getpid(),
        pickle_protocol=5,
        python="x",
        nonce=nonce,
        auth=_auth.AUTH_SCHEME,
    )
    return hello.encode()


def authenticate(sock: socket.socket) -> None:
    """A correct HELLO and AUTH; wait for AUTHED."""
    nonce = _auth.new_nonce()
    sock.sendall(recipient_hello(nonce))
    decoder = _protocol.FrameDecoder()
    messages: list[Message] = []
    while len(messages) < 1:
        messages += decoder.feed(sock.recv(65536))
    theirs = messages[0]
    proof = _auth.proof(SECRET, "recipient", nonce, theirs.body["nonce"])
    sock.sendall(Message(Kind.AUTH, {"proof": proof}).encode())
    while len(messages) < 2:
        messages += decoder.feed(sock.recv(65536))
    assert messages[1].kind is Kind.AUTHED, messages
