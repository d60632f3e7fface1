"""Is the originator still alive? Asked through a pidfd, never a pid number.

When the control channel breaks after the recipient holds the whole graph
and its descriptors but before COMMIT, two things can have happened: the
originator rolled back (and is serving the service again), or it died (and
nobody serves it). A pid number can't tell them apart safely, since it may
have been reused; a pidfd opened while the originator was known to be alive
refers to that process only, and becomes readable when it exits.
"""

from __future__ import annotations

import asyncio
import os
import select


class ProcessWatch:
    """A pidfd on one process, opened while it is known to be alive.

    Where pidfds are unavailable (kernels before 5.3, other systems), the
    watch never reports the process dead: the caller then takes the safe
    path and does not serve what the process might still serve.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        opener = getattr(os, "pidfd_open", None)
        if opener is not None and pid > 0:
            try:
                self._fd = opener(pid)
            except OSError:
                self._fd = None

    async def exited(self, timeout: float) -> bool:
        """Whether the process has exited, waiting up to ``timeout`` seconds.

        A process that closed its sockets is about to exit, or has; the
        pidfd becomes readable a moment after the channel reports EOF.
        """
        fd = self._fd
        if fd is None:
            return False
        if select.select([fd], [], [], 0)[0]:
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not future.done():
                future.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
