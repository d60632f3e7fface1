"""Giving back to the system the heap memory a move borrowed.

Taking a service builds, next to the objects that stay, temporaries the
size of the service: the pickle, the unpickler's memo, the lists and dicts
of the sockets sent ahead, the set of their registrations. Once the service
has started they are freed, but glibc's ``malloc`` keeps the free pages of
its heap resident unless they lie at its very top: after a move of 10,000
connections about 240 bytes per connection stayed resident, free. glibc's
``malloc_trim(0)`` hands every free page back (well under a millisecond).

Only after a large move (ctypes costs a few hundred kilobytes the first
time) and only on CPython over glibc; elsewhere this does nothing.
"""

from __future__ import annotations

import sys
from typing import Any

TRIM_AFTER = 1_000
"""Descriptors a move must have brought for :func:`give_back` to trim."""

_trim: Any = None  # malloc_trim, once found; False: there is none


def give_back(moved: int) -> bool:
    """Return the heap's free pages to the system after a move of ``moved``
    descriptors, if that is large; whether it trimmed anything."""
    global _trim
    if moved < TRIM_AFTER or _trim is False:
        return False
    if _trim is None:
        _trim = _find_trim()
        if _trim is False:
            return False
    return bool(_trim(0))


def _find_trim() -> Any:
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim  # glibc only (musl has none)
    except (ImportError, OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
