"""What the runtimes tell the core about themselves.

The core never imports a runtime: a runtime package (``takeover.asyncio``,
``takeover.twisted``) registers itself here when it is imported, with

* the modules whose classes travel in its graphs (its transports, servers
  and ports): the unpickling policy admits their classes as the
  application's own (see ``policy``);
* the twins it can build (see ``ahead.Twins``): a kind of twin names the
  functions that build the twins of sockets sent ahead on the recipient, and
  that tell whether the graph took one.

A recipient serves its services in a runtime, so that runtime is imported,
and registered, before any graph of its kind arrives.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TwinKind:
    """How a runtime builds the twins of sockets sent ahead.

    Attributes:
        name: the kind's name, as the batches sent ahead give it.
        build: the twins of a batch of sockets, one per socket, in order.
        claimed: whether the rebuilt graph took a twin as one of its objects.
    """

    name: str
    build: Callable[[Sequence[socket.socket]], list[Any]]
    claimed: Callable[[Any], bool]


_twin_kinds: dict[str, TwinKind] = {}
_graph_modules: set[str] = set()


def register_runtime(*, graph_modules: Iterable[str], twins: TwinKind | None = None) -> None:
    """Register a runtime's graph modules and its kind of twin (called on its import)."""
    _graph_modules.update(graph_modules)
    if twins is not None:
        _twin_kinds[twins.name] = twins


def twin_kind(name: object) -> TwinKind | None:
    """The registered kind of twin called ``name`` (None: no such kind here)."""
    return _twin_kinds.get(name) if isinstance(name, str) else None


def is_graph_module(module: str) -> bool:
    """Whether a registered runtime named ``module`` among its graph modules."""
    return module in _graph_modules
