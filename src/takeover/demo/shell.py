"""The paper's demonstration: a telnet server with a Python shell, migratable.

    takeover demo serve [--port 8023] [--control PATH] [--user NAME:PASSWORD]...

Users log in with a name and password (the password is not echoed), then
each gets a Python console of their own (:mod:`takeover.demo.console`).
``takeover take --allow takeover.demo PATH`` (the shell's graph carries
code, which a recipient runs only when told to), under any interpreter that
can import takeover, moves the server, every session and everything in it (namespaces, imported
modules, functions and classes defined at the prompt, a block typed halfway,
who is logged in) to a new process. A session holding something that cannot
move is told why, and the move is refused.

The code a user runs runs in the server's event loop: a long computation
stalls every session (and a move) until it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import platform
import secrets
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .. import asyncio as takeover
from .._core.errors import TakeoverError
from .._core.options import add_limit_options, add_security_options, limits, security_options
from .console import Console, Logout
from .telnet import EOF, INTERRUPT, LINE, TelnetCodec

MAX_FAILURES = 3


def _digest(salt: bytes, password: str) -> bytes:
    return hashlib.sha256(salt + password.encode()).digest()


class ShellFactory:
    """The server's shared state: accounts, and a counter naming sessions.

    Args:
        users: user name to password.
    """

    def __init__(self, users: dict[str, str]) -> None:
        self.salt = secrets.token_bytes(16)
        self.users = {name: _digest(self.salt, password) for name, password in users.items()}
        self.sessions = 0

    def __call__(self) -> ShellProtocol:
        self.sessions += 1
        return ShellProtocol(self, self.sessions)

    def check(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        given = _digest(self.salt, password)
        return expected is not None and hmac.compare_digest(expected, given)


def _banner() -> str:
    return (
        f"takeover shell: Python {platform.python_version()} "
        f"({platform.python_implementation()}), pid {os.getpid()}\n"
    )


class ShellProtocol(asyncio.Protocol):
    """One telnet connection: login, then a console."""

    def __init__(self, factory: ShellFactory, number: int) -> None:
        self.factory = factory
        self.number = number
        self.telnet = TelnetCodec()
        self.stage = "username"  # username, password, shell, closed
        self.user = ""
        self.failures = 0
        self.console: Console | None = None
        self.transport: asyncio.Transport | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.console is not None:
            self.console.notify = self._notice

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._say(_banner() + "username: ")

    def data_received(self, data: bytes) -> None:
        events, replies = self.telnet.feed(data)
        if replies:
            self._send(replies)
        for kind, payload in events:
            if self.stage == "closed":
                return
            if kind == LINE:
                self._line(payload.decode("utf-8", "replace"))
            elif kind == INTERRUPT:
                self._interrupt()
            elif kind == EOF:
                self._close("\nlogout\n")

    def eof_received(self) -> bool | None:
        return False

    # -- the takeover hooks ---------------------------------------------------------

    def takeover_resume(self) -> None:
        """A move was rolled back: this session goes on here."""
        if self.stage == "shell":
            self._notice(
                "*** A move to another process was rolled back; this session stays here.\n"
            )

    # -- internals ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _say(self, text: str, negotiation: bytes = b"") -> None:
        self._send(negotiation + TelnetCodec.encode(text))

    def _notice(self, text: str) -> None:
        """Tell the user something between two prompts."""
        prompt = self.console.prompt if self.console is not None else ""
        self._say("\n" + text + prompt)

    def _line(self, text: str) -> None:
        if self.stage == "username":
            self.user = text.strip()
            if not self.user:
                self._say("username: ")
                return
            self.stage = "password"
            self._say("password: ", self.telnet.set_echo(True))
        elif self.stage == "password":
            # The client did not echo the Enter either.
            off = self.telnet.set_echo(False)
            if self.factory.check(self.user, text):
                self.stage = "shell"
                self.console = Console(f"{self.user}#{self.number}")
                self.console.notify = self._notice
                self._say(
                    f"\nPython {sys.version} on {sys.platform}\n"
                    f"Logged in as {self.user}. Your namespace is your own; "
                    "exit() logs out.\n>>> ",
                    off,
                )
                return
            self.failures += 1
            if self.failures >= MAX_FAILURES:
                self._say("\nLogin incorrect\n", off)
                self._close("")
                return
            self.stage = "username"
            self._say("\nLogin incorrect\nusername: ", off)
        elif self.stage == "shell":
            assert self.console is not None
            try:
                output = self.console.push(text)
            except Logout:
                self._close("logout\n")
                return
            self._say(output + self.console.prompt)

    def _interrupt(self) -> None:
        if self.stage == "shell" and self.console is not None:
            self._say("\n" + self.console.interrupt() + self.console.prompt)
        else:
            self._close("\n")

    def _close(self, text: str) -> None:
        self.stage = "closed"
        self._say(text)
        if self.transport is not None:
            self.transport.close()


def default_control() -> str:
    """The control path when none is given: one per user in the temporary directory."""
    return os.path.join(tempfile.gettempdir(), f"takeover-shell.{os.getuid()}.sock")


def _parse_users(specs: Sequence[str]) -> dict[str, str]:
    users: dict[str, str] = {}
    for spec in specs:
        name, sep, password = spec.partition(":")
        if not sep or not name or not password:
            raise SystemExit(f"takeover demo serve: --user wants NAME:PASSWORD, not {spec!r}")
        users[name] = password
    return users


async def serve(host: str, port: int, control: str, users: dict[str, str], **options: Any) -> None:
    """Serve the shell until it has moved away (or SIGINT/SIGTERM).

    ``options`` are ``serve_until_moved``'s ``secret``, ``tls`` and ``limits``.
    """
    server = await takeover.start_server(ShellFactory(users), host, port, name="shell")

    def ready(migration: takeover.MigrationServer) -> None:
        print(
            f"telnet shell on {host}:{port}, pid {os.getpid()}, Python "
            f"{platform.python_version()} ({platform.python_implementation()}), "
            f"control {migration.path}"
        )
        for name, password in users.items():
            print(f"log in as {name}, password {password}")
        print(f"move it with: takeover take --allow takeover.demo {migration.path}", flush=True)

    loop = asyncio.get_running_loop()
    moved = asyncio.ensure_future(
        takeover.serve_until_moved(server, control=control, ready=ready, **options)
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, moved.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await moved
    if moved.cancelled():
        server.close_connections()
        server.close()
        await asyncio.sleep(0)


def main(argv: Sequence[str]) -> int:
    """``takeover demo serve``."""
    parser = argparse.ArgumentParser(
        prog="takeover demo serve",
        description="A telnet server with a Python shell for each user, movable with "
        "`takeover take --allow takeover.demo CONTROL`.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8023)
    parser.add_argument(
        "--control", default=None, help=f"the control socket (default: {default_control()})"
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="an account (repeatable; default: admin with a random password, printed)",
    )
    add_security_options(parser)
    add_limit_options(parser)
    args = parser.parse_args(list(argv))
    users = _parse_users(args.user) or {"admin": secrets.token_urlsafe(6)}
    try:
        options = {**security_options(args), "limits": limits(args)}
    except (ValueError, OSError, TakeoverError) as exc:
        raise SystemExit(f"takeover demo serve: {exc}") from exc
    asyncio.run(serve(args.host, args.port, args.control or default_control(), users, **options))
    return 0
