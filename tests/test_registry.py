"""The registry of published services and their states, with a fake service."""

from __future__ import annotations

from typing import Any

import pytest

from takeover import NoSuchServiceError, Registry, Service, ServiceBusyError, ServiceState


class FakeService:
    """The smallest thing that implements the Service protocol; it records its calls."""

    def __init__(self, service_name: str, **meta: Any) -> None:
        self.service_name = service_name
        self.meta = {"kind": "fake", "connections": 2, **meta}
        self.calls: list[str] = []

    def describe(self) -> dict[str, Any]:
        return dict(self.meta)

    def quiesce(self) -> None:
        self.calls.append("quiesce")

    def resume(self) -> None:
        self.calls.append("resume")

    def release(self) -> None:
        self.calls.append("release")

    def adopt(self, runtime: Any) -> None:
        self.calls.append("adopt")

    def start(self) -> None:
        self.calls.append("start")

    def discard(self) -> None:
        self.calls.append("discard")


def test_fake_service_implements_the_protocol():
    """The fake is a Service as far as runtime checks go."""
    assert isinstance(FakeService("echo"), Service)
    assert not isinstance(object(), Service)


def test_publish_makes_a_service_available():
    """A published service is listed, found by name and AVAILABLE."""
    registry = Registry()
    echo = FakeService("echo")
    registry.publish(echo)
    assert "echo" in registry
    assert len(registry) == 1
    assert registry.names() == ["echo"]
    assert registry.get("echo") is echo
    assert registry.state("echo") is ServiceState.AVAILABLE


def test_publish_keeps_the_order_of_publication():
    """names() and describe() list services in the order they were published."""
    registry = Registry()
    for name in ("web", "admin", "chat"):
        registry.publish(FakeService(name))
    assert registry.names() == ["web", "admin", "chat"]
    assert [s["name"] for s in registry.describe()] == ["web", "admin", "chat"]


def test_publish_refuses_a_duplicate_name():
    """A second service under a taken name is a ValueError; the first one stays."""
    registry = Registry()
    first = FakeService("echo")
    registry.publish(first)
    with pytest.raises(ValueError, match="a service named 'echo' is already published"):
        registry.publish(FakeService("echo"))
    assert registry.get("echo") is first
    assert len(registry) == 1


def test_describe_merges_metadata_name_and_state():
    """describe() gives each service's metadata plus the registry's name and state."""
    registry = Registry()
    # The registry's own name and state win over whatever the service claims.
    registry.publish(FakeService("echo", name="liar", state="bogus", address="127.0.0.1:1"))
    assert registry.describe() == [
        {
            "kind": "fake",
            "connections": 2,
            "address": "127.0.0.1:1",
            "name": "echo",
            "state": "available",
        }
    ]


def test_empty_registry_describes_nothing():
    """A registry with no services lists none."""
    registry = Registry()
    assert registry.describe() == []
    assert registry.names() == []
    assert len(registry) == 0


def test_begin_transit_marks_in_transit():
    """begin_transit returns the service and marks it IN_TRANSIT, also in describe()."""
    registry = Registry()
    echo = FakeService("echo")
    registry.publish(echo)
    assert registry.begin_transit("echo") is echo
    assert registry.state("echo") is ServiceState.IN_TRANSIT
    assert registry.describe()[0]["state"] == "in-transit"
    assert echo.calls == [], "the registry does not quiesce; the originator does"


def test_begin_transit_twice_is_busy():
    """A second recipient asking for a service in transit is told it is busy."""
    registry = Registry()
    registry.publish(FakeService("echo"))
    registry.begin_transit("echo")
    with pytest.raises(ServiceBusyError, match="service 'echo' is busy") as info:
        registry.begin_transit("echo")
    assert info.value.code == "busy"
    assert "try again" in str(info.value)
    assert registry.state("echo") is ServiceState.IN_TRANSIT


def test_busy_is_per_service():
    """One service in transit does not make another busy."""
    registry = Registry()
    registry.publish(FakeService("web"))
    registry.publish(FakeService("chat"))
    registry.begin_transit("web")
    registry.begin_transit("chat")
    assert registry.state("web") is registry.state("chat") is ServiceState.IN_TRANSIT


def test_no_such_service():
    """Asking for an unpublished name is a NoSuchServiceError (a LookupError) listing the rest."""
    registry = Registry()
    registry.publish(FakeService("web"))
    registry.publish(FakeService("admin"))
    for lookup in (registry.get, registry.state, registry.begin_transit):
        with pytest.raises(NoSuchServiceError, match=r"no service named 'nosuch'.*admin, web"):
            lookup("nosuch")
    assert issubclass(NoSuchServiceError, LookupError)


def test_no_such_service_when_nothing_is_published():
    """With nothing published the error says so."""
    with pytest.raises(NoSuchServiceError, match=r"published: none"):
        Registry().begin_transit("echo")


def test_end_transit_makes_it_available_again():
    """After a rollback (end_transit) the service is AVAILABLE and can be taken again."""
    registry = Registry()
    echo = FakeService("echo")
    registry.publish(echo)
    registry.begin_transit("echo")
    registry.end_transit("echo")
    assert registry.state("echo") is ServiceState.AVAILABLE
    assert registry.begin_transit("echo") is echo


def test_withdraw_forgets_the_service():
    """withdraw returns the service and forgets it; its name may be published again."""
    registry = Registry()
    echo = FakeService("echo")
    registry.publish(echo)
    registry.begin_transit("echo")
    assert registry.withdraw("echo") is echo
    assert "echo" not in registry
    assert len(registry) == 0
    with pytest.raises(NoSuchServiceError):
        registry.get("echo")
    again = FakeService("echo")
    registry.publish(again)
    assert registry.state("echo") is ServiceState.AVAILABLE


def test_withdraw_unknown_is_a_lookup_error():
    """Withdrawing a name that is not published raises a LookupError."""
    with pytest.raises(LookupError):
        Registry().withdraw("echo")


def test_when_empty_on_an_empty_registry_calls_at_once():
    """when_empty with nothing published calls back immediately."""
    called: list[str] = []
    Registry().when_empty(lambda: called.append("empty"))
    assert called == ["empty"]


def test_when_empty_waits_for_the_last_withdrawal():
    """when_empty fires once, when the last service leaves, not before and not again."""
    registry = Registry()
    registry.publish(FakeService("web"))
    registry.publish(FakeService("chat"))
    called: list[str] = []
    registry.when_empty(lambda: called.append("first"))
    registry.when_empty(lambda: called.append("second"))
    registry.withdraw("web")
    assert called == []
    registry.withdraw("chat")
    assert called == ["first", "second"]
    registry.publish(FakeService("again"))
    registry.withdraw("again")
    assert called == ["first", "second"]


def test_when_empty_is_not_fired_by_rollback():
    """A service that goes in transit and back does not count as leaving."""
    registry = Registry()
    registry.publish(FakeService("echo"))
    called: list[str] = []
    registry.when_empty(lambda: called.append("empty"))
    registry.begin_transit("echo")
    registry.end_transit("echo")
    assert called == []


def test_outcomes_of_moves_across_hosts_keep_the_last_256():
    """What an originator decided, by move id, for a recipient in doubt: a move
    is PENDING until decided, told once the recipient asked, and only the last
    256 are kept (the oldest forgotten first)."""
    from takeover._core.registry import Outcomes

    outcomes = Registry().outcomes
    outcomes.record("first", Outcomes.PENDING)
    assert outcomes.get("first") == Outcomes.PENDING
    outcomes.record("first", Outcomes.COMMITTED)
    assert outcomes.get("first") == Outcomes.COMMITTED and not outcomes.told("first")
    outcomes.tell("first")
    assert outcomes.told("first")
    for n in range(Outcomes.KEEP - 1):
        outcomes.record(f"m{n}", Outcomes.ROLLED_BACK)
    assert outcomes.get("first") == Outcomes.COMMITTED
    outcomes.record("one more", Outcomes.ROLLED_BACK)
    assert outcomes.get("first") is None and not outcomes.told("first")
    assert outcomes.get("m0") == Outcomes.ROLLED_BACK
    assert outcomes.get("unknown") is None
