"""The telnet side of the shell, sans I/O: bytes in, lines and replies out.

The server keeps the client in its default line mode (it never offers
SUPPRESS-GO-AHEAD or LINEMODE, so the client edits and echoes each line
locally and sends it whole) and switches the client's echo off for the
password by offering ECHO (``IAC WILL ECHO``), then back on (``IAC WONT
ECHO``). Every other option the client asks for is refused, acknowledgements
are not answered (no negotiation loops), ``IAC IAC`` is a literal 255 and
subnegotiations are skipped. ``IAC IP`` (Ctrl-C) is an interrupt. The codec
is plain data, so it travels with the session, halfway through a command if
need be.
"""

from __future__ import annotations

IAC = 255
DONT = 254
DO = 253
WONT = 252
WILL = 251
SB = 250
GA = 249
EL = 248
EC = 247
AYT = 246
AO = 245
IP = 244
BRK = 243
DM = 242
NOP = 241
SE = 240

ECHO = 1

LINE = "line"
INTERRUPT = "interrupt"
EOF = "eof"

_CTRL_D = 4


class TelnetCodec:
    """Parses what a telnet client sends; frames what the server writes."""

    def __init__(self) -> None:
        self.state = "data"  # data, iac, option, sb, sb-iac
        self.command = 0
        self.line = bytearray()
        self.after_cr = False
        self.echo = False  # the server echoes (the client does not): password entry

    def set_echo(self, on: bool) -> bytes:
        """The negotiation that makes the server (on) or the client (off) echo."""
        if on == self.echo:
            return b""
        self.echo = on
        return bytes((IAC, WILL if on else WONT, ECHO))

    def feed(self, data: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
        """Parse ``data``; return the events (line, interrupt, eof) and the replies to send."""
        events: list[tuple[str, bytes]] = []
        replies = bytearray()
        for byte in data:
            state = self.state
            if state == "data":
                if byte == IAC:
                    self.state = "iac"
                else:
                    self._data(byte, events)
            elif state == "iac":
                self.state = "data"
                if byte == IAC:
                    self._data(byte, events)
                elif byte in (WILL, WONT, DO, DONT):
                    self.command = byte
                    self.state = "option"
                elif byte == SB:
                    self.state = "sb"
                elif byte in (IP, BRK):
                    self.line.clear()
                    events.append((INTERRUPT, b""))
                elif byte == EC:
                    del self.line[-1:]
                elif byte == EL:
                    self.line.clear()
                elif byte == AYT:
                    replies += b"\r\n[yes]\r\n"
            elif state == "option":
                self.state = "data"
                replies += self._negotiate(self.command, byte)
            elif state == "sb":
                if byte == IAC:
                    self.state = "sb-iac"
            elif state == "sb-iac":
                self.state = "data" if byte == SE else "sb"
        return events, bytes(replies)

    def _data(self, byte: int, events: list[tuple[str, bytes]]) -> None:
        if self.after_cr:
            self.after_cr = False
            if byte in (0, 10):  # CR NUL and CR LF both end one line
                return
        if byte in (13, 10):
            self.after_cr = byte == 13
            events.append((LINE, bytes(self.line)))
            self.line.clear()
        elif byte == _CTRL_D and not self.line:
            events.append((EOF, b""))
        elif byte in (8, 127):
            del self.line[-1:]
        else:
            self.line.append(byte)

    def _negotiate(self, command: int, option: int) -> bytes:
        if option == ECHO and command in (DO, DONT):
            wanted = command == DO
            if wanted == self.echo:
                return b""  # an acknowledgement
            if not wanted:
                self.echo = False
                return bytes((IAC, WONT, ECHO))
            return bytes((IAC, WONT, ECHO))  # we offer echo only for passwords
        if command == DO:
            return bytes((IAC, WONT, option))
        if command == WILL:
            return bytes((IAC, DONT, option))
        return b""  # WONT / DONT: already off

    @staticmethod
    def encode(text: str) -> bytes:
        """Text for the client: CR LF line ends, IAC doubled."""
        data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace")
        return data.replace(b"\xff", b"\xff\xff")
