"""Clients of tests/apps/mixed.py: a blocking line client that can switch to TLS."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

from harness.procs import APPS, PYTHON, Proc


def certificate(workdir: str) -> tuple[str, str]:
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class LineClient:
    """A blocking line client (plain, or TLS after ``starttls``)."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=10
        )
        self.buffer = b""

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\n")
        return self.line()

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(f"closed; had {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def starttls(self, cert: str) -> None:
        assert self.ask(b"starttls") == b"ok"
        context = ssl.create_default_context(cafile=cert)
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()


def start_mixed(
    workdir: str, control: str, port: int, procs: list[Proc], env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    """tests/apps/mixed.py on ``port``, with a fresh certificate; (process, certificate)."""
    cert, key = certificate(workdir)
    argv = [PYTHON, os.path.join(APPS, "mixed.py"), "--port", str(port), "--control", control]
    origin = Proc([*argv, "--cert", cert, "--key", key], env=env)
    procs.append(origin)
    origin.expect("control")
    return origin, cert
