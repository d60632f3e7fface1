"""``takeover demo``: the paper's story, told by itself.

It starts the telnet shell server, logs in with the real ``telnet`` client
(driven through a pseudo-terminal, so the transcript is exactly what a user's
terminal shows; without ``telnet`` installed it speaks telnet itself), types
the paper's commands, moves the server to the newest other interpreter it
finds with ``takeover take`` run under that interpreter (and on to PyPy, when
that is another one), types them again, and logs out. Everything it started
is stopped before it returns.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from . import interpreters
from .telnet import DO, DONT, ECHO, IAC, SB, SE, WILL, WONT

TIMEOUT = 20.0


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class Failure(Exception):
    """A step of the story did not go as it should."""


class _Reader:
    """Reads a descriptor with a deadline and finds patterns in what came."""

    def __init__(self, fd: int, show: Callable[[str], None]) -> None:
        self.fd = fd
        self.show = show
        self.text = ""
        self.pos = 0

    def feed(self, data: bytes) -> None:
        chunk = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
        self.text += chunk
        self.show(chunk)

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            return False
        self.feed(data)
        return True

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(f"no {pattern!r} within {timeout:g} s")
            if not self.read(remaining):
                match = regex.search(self.text, self.pos)
                if match:
                    self.pos = match.end()
                    return match
                raise Failure(f"the stream ended before {pattern!r}")


class PtyTelnet:
    """The ``telnet`` program on a pseudo-terminal, as a person would run it."""

    def __init__(self, host: str, port: int, show: Callable[[str], None]) -> None:
        telnet = shutil.which("telnet")
        assert telnet is not None
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [telnet, host, str(port)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.fd = master
        self.reader = _Reader(master, show)

    def sendline(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        return self.reader.expect(pattern, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # Drain and close the terminal.
        os.close(self.fd)


class SocketTelnet:
    """A small telnet client of our own, for machines without ``telnet``.

    It agrees to the server echoing (password entry) and echoes each line it
    sends itself otherwise, so the transcript reads as a terminal would.
    """

    def __init__(self, host: str, port: int, show: Callable[[str], None]) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.show = show
        self.server_echo = False
        self.reader = _Reader(self.sock.fileno(), show)
        self.reader.read = self._read  # type: ignore[method-assign]
        show(f"Trying {host}...\nConnected to {host}.\nEscape character is '^]'.\n")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return True
        data = self.sock.recv(65536)
        if not data:
            return False
        self.reader.feed(self._strip(data))
        return True

    def _strip(self, data: bytes) -> bytes:
        out = bytearray()
        i = 0
        while i < len(data):
            byte = data[i]
            if byte != IAC or i + 1 >= len(data):
                out.append(byte)
                i += 1
                continue
            command = data[i + 1]
            if command == IAC:
                out.append(IAC)
                i += 2
            elif command in (WILL, WONT, DO, DONT) and i + 2 < len(data):
                option = data[i + 2]
                if option == ECHO and command in (WILL, WONT):
                    on = command == WILL
                    if on != self.server_echo:
                        self.server_echo = on
                        self.sock.sendall(bytes((IAC, DO if on else DONT, ECHO)))
                elif command == WILL:
                    self.sock.sendall(bytes((IAC, DONT, option)))
                elif command == DO:
                    self.sock.sendall(bytes((IAC, WONT, option)))
                i += 3
            elif command == SB:
                end = data.find(bytes((IAC, SE)), i)
                i = len(data) if end < 0 else end + 2
            else:
                i += 2
        return bytes(out)

    def sendline(self, line: str) -> None:
        if not self.server_echo:
            self.show(line + "\n")
        self.sock.sendall(line.encode() + b"\r\n")

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        return self.reader.expect(pattern, timeout)

    def close(self) -> None:
        self.sock.close()


class _Process:
    """A child whose output lines are shown indented as they arrive."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert self.popen.stdout is not None
        self.pid = self.popen.pid
        self.reader = _Reader(self.popen.stdout.fileno(), self._show)
        self._partial = ""

    def _show(self, chunk: str) -> None:
        self._partial += chunk
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            _out(f"    | {line}\n")

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        try:
            return self.reader.expect(pattern, timeout)
        except Failure as exc:
            raise Failure(f"{' '.join(map(str, self.popen.args))}: {exc}") from None  # type: ignore[arg-type]

    def wait(self, timeout: float = TIMEOUT) -> int:
        status = self.popen.wait(timeout)
        # Show whatever it printed last.
        while self.reader.read(0):
            if not select.select([self.reader.fd], [], [], 0)[0]:
                break
        return status

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _type(client: PtyTelnet | SocketTelnet, lines: Sequence[str]) -> None:
    """Type ``lines`` at the prompt, each once the prompt for it is shown."""
    for line in lines:
        client.sendline(line)
        client.expect(r"(>>>|\.\.\.) $")


def _after_move(client: PtyTelnet | SocketTelnet, old_pid: int) -> None:
    _type(
        client,
        [
            "os.getpid()",
            "try:",
            f"    os.kill({old_pid}, 0)",
            "except OSError as e:",
            "    print(e)",
            "else:",
            "    print('No exception occurred')",
            "",
            "sys.version",
            "where()",
            "x",
        ],
    )


def _log_in(server: _Process, port: int) -> PtyTelnet | SocketTelnet:
    """Log in to the shell ``server`` prints the account of, and type a few things."""
    login = server.expect(r"log in as (\S+), password (\S+)")
    user, password = login.group(1), login.group(2)
    server.expect(r"move it with: .*\n")
    client: PtyTelnet | SocketTelnet
    if shutil.which("telnet"):
        _out(f"\n$ telnet 127.0.0.1 {port}\n")
        client = PtyTelnet("127.0.0.1", port, _out)
    else:
        _out(f"\n$ telnet 127.0.0.1 {port}     # (no telnet installed: the demo speaks telnet)\n")
        client = SocketTelnet("127.0.0.1", port, _out)
    client.expect("username: ")
    client.sendline(user)
    client.expect("password: ")
    client.sendline(password)
    client.expect(">>> ")
    _type(
        client,
        [
            "import sys, os",
            "sys.version",
            "os.getpid()",
            "x = 42",
            "def where():",
            "    v = sys.version.split()[0]",
            "    return f'{sys.implementation.name} {v}, pid {os.getpid()}'",
            "",
            "where()",
            "for i in range(2):",
        ],
    )
    return client


def _move(
    step: int,
    target: interpreters.Interpreter,
    control: str,
    env: dict[str, str],
    previous: _Process,
    client: PtyTelnet | SocketTelnet,
    note: str,
    procs: list[_Process],
) -> _Process:
    """Move the shell to ``target`` with ``takeover take``; the new server process."""
    why = "while admin is halfway through a for block" if step == 1 else "again"
    _out(
        f"\n\n$ {target.path} -m takeover take --allow takeover.demo {control}"
        f"     # {target.label}, {why}\n"
    )
    recipient = _Process(
        [target.path, "-m", "takeover", "take", "--allow", "takeover.demo", control], env
    )
    procs.append(recipient)  # stopped at the end, whatever happens
    recipient.expect(r"^took shell", timeout=TIMEOUT)
    recipient.expect(r"serving ")
    status = previous.wait()
    _out(f"    (pid {previous.pid}, the server before, has exited with status {status})\n")
    if step == 1 and note:
        _out(f"    {note}\n")
    # The session's prompt, shown before the move, again after the narration.
    _out("\n" + ("... " if step == 1 else ">>> "))
    if step == 1:
        _type(client, ["    print(i, where())", ""])
    _after_move(client, previous.pid)
    return recipient


def run(argv: Sequence[str] = ()) -> int:
    """Tell the whole story; 0 when every step went as it should."""
    started = time.monotonic()
    python = sys.executable
    me = interpreters.current()
    workdir = tempfile.mkdtemp(prefix="takeover-demo-")
    control = os.path.join(workdir, "shell.sock")
    port = _free_port()
    env = interpreters.environment()
    procs: list[_Process] = []
    client: PtyTelnet | SocketTelnet | None = None
    try:
        _out(f"$ takeover demo serve --port {port} --control {control}     # {me.label}\n")
        server = _Process(
            [python, "-m", "takeover", "demo", "serve", "--port", str(port), "--control", control],
            env,
        )
        procs.append(server)
        # Look for interpreters while the server starts.
        route = interpreters.route()
        note = ""
        if not route:
            route = [me]
            note = (
                f"(no other interpreter found: moving to {me.label} again; install pypy3 "
                "or another CPython to see sys.version change)"
            )
        client = _log_in(server, port)
        previous = server
        for step, target in enumerate(route, 1):
            previous = _move(step, target, control, env, previous, client, note, procs)
        client.sendline("exit()")
        client.expect(r"logout")
        elapsed = time.monotonic() - started
        names = " -> ".join([me.label, *(t.label for t in route)])
        _out(
            f"\n\nThe session moved {names}, with its namespace, its functions and a "
            f"half-typed block; {elapsed:.1f} s in all.\n"
        )
        return 0
    except Failure as exc:
        _out(f"\ntakeover demo: failed: {exc}\n")
        return 1
    finally:
        if client is not None:
            client.close()
        for proc in procs:
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
