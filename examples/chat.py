"""A line-based chat room that moves to another process with every member connected.

    python examples/chat.py --port 8023 --control /tmp/chat.sock
    nc 127.0.0.1 8023                    # first line: your name; then talk
    takeover take /tmp/chat.sock         # another process takes the room; nobody notices

Every connection's protocol refers to one :class:`Room`, and the room holds
every member's protocol: the whole web of connections, names and history
moves as one graph. Commands: ``/who`` lists the members, ``/history``
replays the last 50 messages, ``/quit`` leaves.
"""

from __future__ import annotations

import argparse
import asyncio

import takeover.asyncio as takeover

HISTORY = 50
MAX_LINE = 4096
MAX_NAME = 32


class Room:
    """The members (their protocols, in join order) and the last messages."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.history: list[str] = []

    def names(self) -> list[str]:
        return [m.name for m in self.members if m.name is not None]

    def join(self, member: Member, name: str) -> str | None:
        """Admit ``member`` as ``name``; the reason it can't be, if it can't."""
        if not name or len(name) > MAX_NAME or any(c.isspace() for c in name):
            return f"a name is 1 to {MAX_NAME} characters without spaces"
        if name.startswith("/"):
            return "a name can't start with /"
        if name in self.names():
            return f"{name} is taken, try another"
        member.name = name
        others = self.names()
        self.members.append(member)
        member.send(f"* welcome {name}, {len(others)} others here: {', '.join(others)}")
        self.announce(f"* {name} joined", exclude=member)
        return None

    def leave(self, member: Member) -> None:
        if member in self.members:
            self.members.remove(member)
            self.announce(f"* {member.name} left", exclude=member)

    def say(self, member: Member, text: str) -> None:
        line = f"{member.name}: {text}"
        self.history.append(line)
        del self.history[:-HISTORY]
        self.announce(line, exclude=member)

    def announce(self, line: str, exclude: Member | None = None) -> None:
        for other in self.members:
            if other is not exclude:
                other.send(line)


class Member(asyncio.Protocol):
    """One connection: nameless until its first line, then a member of the room."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.name: str | None = None
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def send(self, line: str) -> None:
        if self.transport is not None:
            self.transport.write(line.encode() + b"\n")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send("* welcome to the room; what is your name?")

    def data_received(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for raw in lines:
            if self.transport is None or self.transport.is_closing():
                return
            self.line_received(raw.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self.pending) > MAX_LINE:
            self.send(f"* lines are limited to {MAX_LINE} bytes; goodbye")
            self.pending = b""
            self.quit()

    def line_received(self, line: str) -> None:
        if self.name is None:
            refused = self.room.join(self, line.strip())
            if refused:
                self.send(f"* {refused}")
            return
        if line == "/who":
            self.send(f"* members: {', '.join(self.room.names())}")
        elif line == "/history":
            self.send(f"* history: {len(self.room.history)} messages")
            for message in self.room.history:
                self.send(message)
        elif line == "/quit":
            self.send("* bye")
            self.quit()
        elif line.startswith("/"):
            self.send(f"* unknown command {line.split()[0]}; try /who, /history or /quit")
        elif line.strip():
            self.room.say(self, line)

    def quit(self) -> None:
        self.room.leave(self)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.leave(self)


class RoomFactory:
    """The protocol factory: a picklable object that seats every new connection in the room."""

    def __init__(self, room: Room) -> None:
        self.room = room

    def __call__(self) -> Member:
        return Member(self.room)


async def main(args: argparse.Namespace) -> None:
    server = await takeover.start_server(RoomFactory(Room()), args.host, args.port, name="chat")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"chat on {args.host}:{args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8023)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
