"""A man in the middle of the control channel, for the fault matrix.

:class:`Relay` listens on an AF_UNIX path, accepts one recipient, connects
to the originator's control socket and relays frames both ways, passing
SCM_RIGHTS descriptors through (``recvmsg``/``sendmsg``). At one chosen
frame it acts instead of relaying:

* ``cut``: close both sides before the frame is passed on (or, with
  ``inside``, after passing on the first half of its bytes);
* ``corrupt``: flip one byte of the frame (the middle of its JSON body, or
  with ``inside`` the middle of a GRAPH frame's pickle) and relay the rest
  as usual.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from dataclasses import dataclass

from takeover._core import fds as _fds
from takeover._core.protocol import Kind

_HEADER = struct.Struct("!BI")
TO_ORIGINATOR, TO_RECIPIENT = "recipient->originator", "originator->recipient"


@dataclass(frozen=True)
class Trigger:
    """Act on the first frame of ``kind`` going ``direction``."""

    direction: str
    kind: Kind
    action: str  # "cut" or "corrupt"
    inside: bool = False


def flip(frame: bytes, inside: bool) -> bytes:
    """``frame`` with one byte inverted: mid-JSON, or mid-blob when ``inside``."""
    (json_length,) = struct.unpack_from("!I", frame, _HEADER.size)
    body_start = _HEADER.size + 4
    if inside:
        blob_start = body_start + json_length
        at = blob_start + (len(frame) - blob_start) // 2
    else:
        at = body_start + json_length // 2
    return frame[:at] + bytes([frame[at] ^ 0xFF]) + frame[at + 1 :]


class Relay(threading.Thread):
    """Relays one control connection from ``path`` to ``target``; see the module."""

    def __init__(self, path: str, target: str, trigger: Trigger) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.target = target
        self.trigger = trigger
        self.seen: list[tuple[str, str]] = []  # (direction, kind) of every whole frame
        self.fired = threading.Event()
        self.done = threading.Event()
        self.failure: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.failure = exc
        finally:
            self._listener.close()
            self.done.set()

    def stop(self) -> None:
        """Wait for the relay to end (it ends when both sides have closed)."""
        self.join(30)
        assert not self.is_alive(), f"the relay is still running; frames: {self.seen}"
        assert self.failure is None, self.failure

    def _run(self) -> None:
        ready, _, _ = select.select([self._listener], [], [], 30)
        if not ready:
            raise AssertionError("no recipient connected to the relay")
        recipient, _ = self._listener.accept()
        originator = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peers = {TO_ORIGINATOR: (recipient, originator), TO_RECIPIENT: (originator, recipient)}
        buffers = {TO_ORIGINATOR: bytearray(), TO_RECIPIENT: bytearray()}
        pending: dict[str, list[int]] = {TO_ORIGINATOR: [], TO_RECIPIENT: []}
        open_ = {TO_ORIGINATOR, TO_RECIPIENT}
        try:
            originator.connect(self.target)
            while open_:
                readable, _, _ = select.select([peers[d][0] for d in open_], [], [], 30)
                if not readable:
                    raise AssertionError(f"the control channel went quiet; frames: {self.seen}")
                for direction in list(open_):
                    source, sink = peers[direction]
                    if source not in readable:
                        continue
                    try:
                        data, fds = _fds.recv_with_fds(source, 256 * 1024)
                    except ConnectionResetError:
                        data, fds = b"", []
                    pending[direction].extend(fds)
                    if not data:
                        # EOF: pass on what is left (a partial frame) and the EOF.
                        self._pass(sink, bytes(buffers[direction]), pending[direction])
                        buffers[direction].clear()
                        open_.discard(direction)
                        try:
                            sink.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    buffers[direction] += data
                    if not self._frames(direction, buffers[direction], pending[direction], sink):
                        return  # cut
        finally:
            for fds in pending.values():
                _fds.close_all(fds)
            recipient.close()
            originator.close()

    def _frames(
        self, direction: str, buffer: bytearray, fds: list[int], sink: socket.socket
    ) -> bool:
        """Pass on every whole frame in ``buffer``; False once the channel is cut."""
        while len(buffer) >= _HEADER.size:
            kind_number, length = _HEADER.unpack_from(buffer)
            size = _HEADER.size + length
            try:
                kind = Kind(kind_number)
            except ValueError:
                kind = None
            if kind is None or len(buffer) < size:
                return True
            frame = bytes(buffer[:size])
            del buffer[:size]
            self.seen.append((direction, kind.name))
            trigger = self.trigger
            if not self.fired.is_set() and direction == trigger.direction and kind is trigger.kind:
                self.fired.set()
                if trigger.action == "cut":
                    if trigger.inside:
                        self._pass(sink, frame[: size // 2], fds)
                    return False
                frame = flip(frame, trigger.inside)
            self._pass(sink, frame, fds)
        return True

    @staticmethod
    def _pass(sink: socket.socket, data: bytes, fds: list[int]) -> None:
        """Send ``data`` with the descriptors waiting in ``fds`` (then closed here)."""
        try:
            if fds and data:
                sent = _fds.send_with_fds(sink, data, fds)
                _fds.close_all(fds)
                fds.clear()
                data = data[sent:]
            if data:
                sink.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
