"""The commit arbiter: one byte both processes share, decided once.

The control channel alone cannot settle every failure after COMMIT: if it
breaks between the recipient writing COMMITTED and the originator reading it
(a relay that drops the frame, a TCP reset), the recipient serves while the
originator, seeing no COMMITTED, would resume too. So each move carries an
arbiter with its descriptors: a one-byte memfd that starts PENDING. Whichever
side decides first — the recipient to commit when it reads COMMIT, the
originator to roll back when it gives up — writes its decision under an
exclusive ``flock``; the other side then finds it and abides by it.

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

    def decide(self, wanted: bytes) -> bytes:
        """Record ``wanted`` unless the other side decided first; return the decision."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            state = os.pread(self.fd, 1, 0)
            if state == PENDING:
                os.pwrite(self.fd, wanted, 0)
                return wanted
            return state
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
