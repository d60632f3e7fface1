"""Waiting for a condition under a deadline, instead of sleeping and hoping.

A test or a benchmark that needs something to have happened (a process to
stop, a descriptor to close, a connection to be accepted) polls for exactly
that and fails, saying what it waited for, when the deadline passes. The
deadlines are generous: they bound a hang, they do not time anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Deadline:
    """When to give up waiting for ``what``, and the error that says so."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout, self.what = timeout, what
        self.at = time.monotonic() + timeout

    def met(self, value: object) -> bool:
        """Whether ``value`` is what was awaited; raises once the deadline has passed."""
        if value:
            return True
        if time.monotonic() >= self.at:
            raise AssertionError(f"timed out after {self.timeout} s waiting for {self.what}")
        return False


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Raises:
        AssertionError: ``timeout`` seconds passed first.
    """
    deadline = _Deadline(timeout, what)
    while not deadline.met(value := predicate()):
        time.sleep(interval)
    return value


async def wait_until_async(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    interval: float = 0.005,
    what: str = "condition",
) -> T:
    """:func:`wait_until` for a coroutine: the event loop runs between the polls.

    Raises:
        AssertionError: ``timeout`` seconds passed first.
    """
    deadline = _Deadline(timeout, what)
    while not deadline.met(value := predicate()):
        await asyncio.sleep(interval)
    return value
