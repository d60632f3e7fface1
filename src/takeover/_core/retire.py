"""What a process does once every service it held has moved away.

Its successor usually runs on the same machine, often on the same core, and
is serving from the moment it committed. Everything the old process still
does competes with it for the CPU: above all the interpreter's teardown,
whose garbage collections walk the whole heap (16 ms of CPU for a small
server that imported takeover; proportional to the heap for a large one).
Clients of the successor see that time as latency.
"""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger("takeover")


def retire(*, idle_priority: bool = True) -> None:
    """Make this process's exit cheap and unobtrusive; call it just before exiting.

    * Freezes the garbage collector's heap (:func:`gc.freeze`, CPython): the
      collections of the interpreter's teardown skip every object that
      exists now, which is where that teardown spends its time. Objects
      are still freed by reference counting; only cyclic garbage that
      exists now is left for the operating system to reclaim.
    * With ``idle_priority``, the calling thread runs from now on under
      ``SCHED_IDLE`` (Linux): only when the CPU would otherwise be idle, so
      the successor, at normal priority, preempts it at once. Where that
      class is not available (PyPy's ``os`` lacks the constant, other
      systems lack the call) it takes the lowest nice level instead.
      Lowering a priority needs no privilege; raising it back does, so call
      this only when the process has nothing urgent left to do.

    Not for a process that goes on working for long afterwards: cyclic
    garbage among today's objects would never be collected.
    """
    freeze = getattr(gc, "freeze", None)
    if freeze is not None:
        freeze()
    if not idle_priority:
        return
    try:
        if hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_setscheduler"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif hasattr(os, "nice"):
            os.nice(19)
    except OSError as exc:  # a seccomp filter, say: the exit is only slower
        log.debug("could not lower this process's priority: %s", exc)
