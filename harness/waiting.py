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
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


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
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
