"""The proxy's admission cap and each source's share of it (`ConnTracker.reserve`/`release`):
one source IP (a pod in a retry storm, a remote peer) cannot take every slot of the node."""

from __future__ import annotations

import logging

import pytest

from agent.admin.flows import FlowRing
from agent.proxy.conns import DEFAULT_MAX_CONNECTIONS, Admission, ConnTracker
from agent.proxy.flows import FlowLog

NOISY, QUIET = "10.1.0.1", "10.1.0.2"


def tracker(total: int, per_source: int | None) -> ConnTracker:
    return ConnTracker(FlowLog(FlowRing()), max_connections=total, max_per_source=per_source)


def test_a_source_at_its_share_is_refused_and_counted_while_others_connect() -> None:
    t = tracker(10, 3)
    assert all(t.reserve(NOISY) for _ in range(3))
    got = t.reserve(NOISY)
    assert got is Admission.SOURCE_OVERLOAD and not got
    assert t.stats["source_overload"] == 1 and t.stats["overload"] == 0
    assert t.in_use == 3 and t.source_slots(NOISY) == 3  # a refusal takes nothing
    assert t.reserve(QUIET) is Admission.ADMITTED and t.source_slots(QUIET) == 1


def test_release_gives_the_source_its_slot_back() -> None:
    t = tracker(10, 2)
    assert t.reserve(NOISY) and t.reserve(NOISY)
    assert not t.reserve(NOISY)
    t.release(NOISY)
    assert t.source_slots(NOISY) == 1 and t.in_use == 1
    assert t.reserve(NOISY)
    t.release(NOISY)
    t.release(NOISY)
    assert t.source_slots(NOISY) == 0 and t.in_use == 0
    assert t._by_source == {}  # no entry kept for a source with nothing open


def test_the_total_cap_still_applies_below_every_share() -> None:
    t = tracker(3, 2)
    assert t.reserve("10.0.0.1") and t.reserve("10.0.0.2") and t.reserve("10.0.0.3")
    assert t.reserve("10.0.0.4") is Admission.OVERLOAD
    assert t.stats["overload"] == 1 and t.stats["source_overload"] == 0


def test_the_default_share_is_half_of_the_cap() -> None:
    assert tracker(DEFAULT_MAX_CONNECTIONS, None).max_per_source == 5_000
    assert tracker(1, None).max_per_source == 1
    assert ConnTracker(FlowLog(FlowRing())).gauges() == {
        "connection_slots_in_use": 0,
        "connection_slots": 10_000,
        "connection_slots_per_source": 5_000,
    }


def test_refusing_a_source_is_logged_when_it_starts_and_ends_not_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = tracker(100, 20)
    caplog.set_level(logging.WARNING, logger="agent.proxy.conns")
    for _ in range(20):
        assert t.reserve(NOISY)
    for _ in range(50):
        assert not t.reserve(NOISY)
    t.release(NOISY)  # churning at its share: admitted again, then refused, and no new line
    assert t.reserve(NOISY) and not t.reserve(NOISY)
    assert t.reserve(QUIET)
    t.release(QUIET)
    t.release(NOISY)
    t.release(NOISY)  # 18 held: 90% of its share, still refusing
    assert len(caplog.records) == 1
    t.release(NOISY)  # 17: under 90% of its share, refusing has ended
    assert t.reserve(NOISY)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"event=source_overload source={NOISY} slots=20 per_source_cap=20 slots_in_use=20",
        f"event=source_overload_ended source={NOISY} refused=51",
    ]
    assert t.stats["source_overload"] == 51


def test_refusing_at_the_cap_is_logged_when_it_starts_and_ends_not_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At `max_connections` a busy node refuses thousands of connections a second: one line when
    refusing starts, one (with the count) when it is back under 90% of the cap, as a source's share."""
    t = tracker(20, 20)
    caplog.set_level(logging.WARNING, logger="agent.proxy.conns")
    for i in range(20):
        assert t.reserve(f"10.0.0.{i}")
    for _ in range(50):
        assert t.reserve(QUIET) is Admission.OVERLOAD
    t.release("10.0.0.0")  # churning at the cap: admitted again, then refused, and no new line
    assert t.reserve(QUIET) and t.reserve(NOISY) is Admission.OVERLOAD
    t.release(QUIET)
    t.release("10.0.0.1")  # 18 in use: 90% of the cap, still refusing
    assert len(caplog.records) == 1
    t.release("10.0.0.2")  # 17: under 90% of the cap, refusing has ended
    assert t.reserve(NOISY)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["event=overload slots_in_use=20 slots=20", "event=overload_ended refused=51"]
    assert t.stats["overload"] == 51  # every refusal counted
    assert t.stats["source_overload"] == 0
    # refusing again later logs again
    t.max_connections = t.in_use
    assert not t.reserve(QUIET)
    assert [r.getMessage() for r in caplog.records][2:] == ["event=overload slots_in_use=18 slots=18"]
