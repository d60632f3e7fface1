"""The commit arbiter: one byte both processes share, decided once.

It is the commit point of a move. The originator sends it, a one-byte memfd
that starts PENDING, ahead of the service's descriptors. Whichever side
decides first — the recipient to commit, once it has adopted the graph and
before it starts any I/O (it answers COMMITTED after starting); the originator to roll back, when it
gives up for any reason (a refusal, its step timeout, a broken channel) —
writes its decision under an exclusive ``flock``; the other side then finds
it and abides by it. So the control channel may lose or garble any frame, and
either process may die, and still at most one of them serves the service:
an originator that finds COMMITTED releases instead of resuming, a recipient
that finds ROLLED_BACK discards its copy. The originator writes why it
rolled back after the byte (:meth:`Arbiter.note`), so the recipient can say
why even when the channel is gone.

``flock`` locks belong to an open file description, and a descriptor passed
with SCM_RIGHTS shares the sender's, so the recipient reopens the memfd
through ``/proc/self/fd`` to get a description, and a lock, of its own.
"""

from __future__ import annotations

import fcntl
import os

PENDING = b"P"
COMMITTED = b"C"
ROLLED_BACK = b"R"

NOTE_LIMIT = 2000
"""Bytes of a decision's note kept (after the decision byte)."""


class Arbiter:
    """One side's handle on a move's shared decision."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> Arbiter:
        """A new arbiter, PENDING (originator side)."""
        create = getattr(os, "memfd_create", None)
        if create is not None:
            fd = create("takeover-arbiter", os.MFD_CLOEXEC)
        else:
            import tempfile  # only where there is no memfd_create

            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        os.pwrite(fd, PENDING, 0)
        return cls(fd)

    @classmethod
    def adopt(cls, received: int) -> Arbiter:
        """The recipient's own handle on a received arbiter (closes ``received``)."""
        try:
            fd = os.open(f"/proc/self/fd/{received}", os.O_RDWR | os.O_CLOEXEC)
        finally:
            os.close(received)
        return cls(fd)

    def decide(self, wanted: bytes, note: str = "") -> bytes:
        """Record ``wanted`` (with ``note``, why) unless the other side decided
        first; return the decision."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            state = os.pread(self.fd, 1, 0)
            if state == PENDING:
                text = note.encode("utf-8", "replace")[:NOTE_LIMIT]
                # The note first: the decision byte is what the other side reads.
                if text:
                    os.pwrite(self.fd, text, 1)
                os.pwrite(self.fd, wanted, 0)
                return wanted
            return state
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def note(self) -> str:
        """Why the decision was taken, as its taker wrote it ('' if it did not say)."""
        data = os.pread(self.fd, NOTE_LIMIT, 1)
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
