"""The application's migration hooks.

A protocol, and a factory that is an instance, may define
``takeover_quiesce()`` (originator, before the graph is pickled: cancel
timers), ``takeover_resume()`` (originator, after a rollback: re-arm them)
and ``takeover_adopted()`` (recipient, after commit, before any I/O: re-arm
them there). Every runtime calls them the same way, through this module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("takeover.hooks")


def run_service_hooks(factory: Any, protocols: Iterable[Any], name: str) -> None:
    """Hook ``name`` of a service: its factory's, then each connection's protocol's."""
    run_hook(factory, name)
    run_hooks(protocols, name)


def run_hooks(objects: Iterable[Any], name: str) -> None:
    """:func:`run_hook` on each object, looking the hook up once per class.

    An object whose class has no such attribute (and no ``__getattr__``)
    has the hook only if its own ``__dict__`` does.
    """
    verdicts: dict[type, bool] = {}
    for obj in objects:
        cls = type(obj)
        may = verdicts.get(cls)
        if may is None:
            may = verdicts[cls] = hasattr(cls, name) or hasattr(cls, "__getattr__")
        if may or name in getattr(obj, "__dict__", ()):
            run_hook(obj, name)


def run_hook(obj: Any, name: str) -> None:
    """Call ``obj``'s migration hook ``name``, if it has one.

    A failing ``takeover_quiesce`` aborts the move (the originator rolls
    back); the other hooks run when there is no going back, so their failure
    is logged and the service goes on.
    """
    if isinstance(obj, type):
        return
    method = getattr(obj, name, None)
    if not callable(method):
        return
    try:
        method()
    except Exception:
        if name == "takeover_quiesce":
            raise
        log.exception("%s() of %r failed", name, obj)
