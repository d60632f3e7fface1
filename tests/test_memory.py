"""What a recipient keeps per connection once a service it took has started.

Not the sizes themselves (``benchmarks/scale.py`` measures those): that the
move's own objects do not outlive the take, that the connections that came
as twins have no instance dict object of their own (CPython builds one when
``__dict__`` is read, and keeps it), and that the heap the move borrowed is
handed back after a large move.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

import pythons
from takeover._core import heap, recipient
from takeover._core.ahead import Twins
from test_spread import CONNECTIONS, serving, take_and_check


@pythons.instance_values
def test_the_move_keeps_nothing_of_its_own_and_gives_the_heap_back(
    control: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[weakref.ref[Any]] = []

    class Recorded(Twins):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.extend((weakref.ref(self), weakref.ref(self.unpickler)))

    monkeypatch.setattr(recipient, "Twins", Recorded)
    trims: list[int] = []
    real_give_back = heap.give_back

    def give_back(moved: int) -> bool:
        # Every twin released by now: their memo, the sockets' lists, the blob.
        assert made and all(ref() is None for ref in made)
        trims.append(moved)
        return real_give_back(moved)

    monkeypatch.setattr(heap, "give_back", give_back)
    monkeypatch.setattr(heap, "TRIM_AFTER", 1)
    kept: list[Any] = []
    real_commit = recipient.RecipientSession._commit

    async def commit(self: Any, name: str, service: Any, arrival: Any) -> Any:
        taken = await real_commit(self, name, service, arrival)
        arrival.finish()  # what _take does next: close_leftovers asks each twin
        # Started: twins all, and nothing has asked their __dict__.
        kept.extend(t for t in service.connections if not has_dict(t))
        return taken

    monkeypatch.setattr(recipient.RecipientSession, "_commit", commit)

    async def main() -> None:
        gc.disable()  # a cycle would keep the twins' unpickler alive until a collection
        try:
            _, migration, clients = await serving(control, CONNECTIONS)
            await take_and_check(control, migration, clients, CONNECTIONS)
        finally:
            gc.enable()

    asyncio.run(main())
    assert trims == [CONNECTIONS + 1]  # and the listener
    assert len(kept) == CONNECTIONS


def has_dict(obj: Any) -> bool:
    """Whether CPython has built ``obj`` an instance dict object (its values else)."""
    return any(type(r) is dict for r in gc.get_referents(obj))


def test_a_small_move_does_not_trim() -> None:
    assert heap.give_back(heap.TRIM_AFTER - 1) is False
    heap.give_back(heap.TRIM_AFTER)  # glibc: trims; elsewhere nothing, and no error
