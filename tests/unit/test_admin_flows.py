"""The flow ring: bounded history, server-side filters, followers, and how slow followers lose records."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.admin.flows import Dropped, FlowEvent, FlowFilter, FlowRecord, FlowRing, Verdict


def rec(
    i: int = 0,
    *,
    src: str = "shop/web",
    dst: str = "shop/db",
    verdict: Verdict = Verdict.ALLOWED,
    t: float = 1000.0,
    event: FlowEvent = FlowEvent.OPEN,
) -> FlowRecord:
    sns, _, spod = src.partition("/")
    dns, _, dpod = dst.partition("/")
    return FlowRecord(
        time=t,
        event=event,
        verdict=verdict,
        src_ip="10.1.0.2",
        src_port=40000 + i,
        dst_ip="10.1.0.3",
        dst_port=5432,
        src_pod=spod,
        src_namespace=sns,
        dst_pod=dpod,
        dst_namespace=dns,
        connection_id=str(i),
    )


def ids(items: list[FlowRecord]) -> list[str]:
    return [r.connection_id for r in items]


def test_ring_keeps_only_the_newest_capacity_records() -> None:
    ring = FlowRing(capacity=3)
    for i in range(5):
        ring.add(rec(i))
    assert ids(ring.snapshot()) == ["2", "3", "4"]
    assert (len(ring), ring.added, ring.evicted) == (3, 5, 2)
    assert ring.stats()["stored"] == 3


def test_snapshot_last_gives_the_newest() -> None:
    ring = FlowRing(capacity=10)
    for i in range(5):
        ring.add(rec(i))
    assert ids(ring.snapshot(last=2)) == ["3", "4"]
    assert ring.snapshot(last=0) == []


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (FlowFilter(), ["0", "1", "2", "3"]),
        (FlowFilter(pod="web"), ["0", "2"]),  # either end
        (FlowFilter(pod="db"), ["0", "1"]),
        (FlowFilter(pod="shop/web"), ["0", "2"]),
        (FlowFilter(pod="other/web"), ["2"]),
        (FlowFilter(namespace="other"), ["2", "3"]),
        (FlowFilter(verdict=Verdict.DENIED), ["1", "3"]),
        (FlowFilter(since=1002.0), ["2", "3"]),
        (FlowFilter(namespace="shop", verdict=Verdict.DENIED), ["1"]),
    ],
)
def test_filters(flt: FlowFilter, expected: list[str]) -> None:
    ring = FlowRing()
    ring.add(rec(0, src="shop/web", dst="shop/db", t=1000))
    ring.add(rec(1, src="shop/api", dst="shop/db", verdict=Verdict.DENIED, t=1001))
    ring.add(rec(2, src="shop/web", dst="other/web", t=1002))
    ring.add(rec(3, src="other/x", dst="other/y", verdict=Verdict.DENIED, t=1003))
    assert ids(ring.snapshot(flt)) == expected


def test_record_round_trips_through_json_dict() -> None:
    r = rec(7, verdict=Verdict.DENIED, event=FlowEvent.DENY)
    d = r.to_dict()
    assert d["verdict"] == "denied" and d["event"] == "deny"
    assert FlowRecord.from_dict({**d, "future_field": 1}) == r


@pytest.mark.parametrize("field", [
    {"time": "yesterday"}, {"time": float("nan")}, {"time": float("inf")}, {"src_port": "40007"},
    {"dst_port": True}, {"dst_port": 5432.0}, {"src_ip": None}, {"rule": "0"}, {"duration": "1s"},
    {"event": 1}, {"connection_id": ["7"]},
], ids=str)
def test_a_wrongly_typed_field_is_refused(field: dict[str, object]) -> None:
    """A worker's record joins the main ring as is (agent/admin/flow_feed.py, which counts the error as
    malformed): a `time` that is no number would break `?since=` filters and the CLI's table later."""
    with pytest.raises(TypeError, match=f"flow field {next(iter(field))} is"):
        FlowRecord.from_dict({**rec(7).to_dict(), **field})


def test_optional_and_whole_number_fields_are_read_as_json_writes_them() -> None:
    d = {**rec(7).to_dict(), "time": 1000, "rule": 2, "duration": 3}
    r = FlowRecord.from_dict(d)
    assert (r.time, r.rule, r.duration) == (1000, 2, 3)
    assert FlowRecord.from_dict({**d, "rule": None, "duration": None}).rule is None


async def test_follower_gets_records_added_after_it_subscribed() -> None:
    ring = FlowRing()
    ring.add(rec(0))
    with ring.subscribe() as sub:
        ring.add(rec(1))
        ring.add(rec(2))
        got = [await asyncio.wait_for(sub.next(), 1), await asyncio.wait_for(sub.next(), 1)]
        assert ids([g for g in got if isinstance(g, FlowRecord)]) == ["1", "2"]
        waiter = asyncio.ensure_future(sub.next())
        await asyncio.sleep(0)
        assert not waiter.done()
        ring.add(rec(3))
        item = await asyncio.wait_for(waiter, 1)
        assert isinstance(item, FlowRecord) and item.connection_id == "3"
    assert ring.subscribers == 0
    ring.add(rec(4))  # no follower left: nothing to deliver, nothing to fail


async def test_follower_filter_is_applied_server_side() -> None:
    ring = FlowRing()
    with ring.subscribe(FlowFilter(verdict=Verdict.DENIED)) as sub:
        ring.add(rec(0))
        ring.add(rec(1, verdict=Verdict.DENIED))
        assert sub.pending() == 1
        item = await sub.next()
        assert isinstance(item, FlowRecord) and item.connection_id == "1"


def test_slow_follower_never_blocks_the_producer_and_drops_are_counted() -> None:
    ring = FlowRing(capacity=100, subscriber_queue=4)
    fast = ring.subscribe(maxsize=100)
    slow = ring.subscribe()
    start = time.perf_counter()
    for i in range(10):
        ring.add(rec(i))
    assert time.perf_counter() - start < 1  # add() returned every time: nobody waited for `slow`
    assert fast.pending() == 10 and fast.dropped == 0
    assert slow.pending() == 4 and slow.dropped == 6 and ring.dropped == 6
    # The follower sees the 4 records it had room for, then the gap.
    items = [slow.get_nowait() for _ in range(4)]
    assert ids([i for i in items if isinstance(i, FlowRecord)]) == ["0", "1", "2", "3"]
    assert slow.get_nowait() == Dropped(6, 6)
    assert slow.get_nowait() is None


def test_drop_marker_comes_before_the_next_record_after_the_gap() -> None:
    ring = FlowRing(subscriber_queue=3)
    sub = ring.subscribe()
    for i in range(5):  # 0..2 queued, 3 and 4 lost
        ring.add(rec(i))
    assert [sub.get_nowait() for _ in range(3)] != [None] * 3
    ring.add(rec(5))  # room again: marker, then record 5
    assert sub.get_nowait() == Dropped(2, 2)
    item = sub.get_nowait()
    assert isinstance(item, FlowRecord) and item.connection_id == "5"
    assert (sub.delivered, sub.dropped) == (4, 2)


def test_queue_with_one_free_slot_does_not_let_a_record_overtake_the_marker() -> None:
    ring = FlowRing(subscriber_queue=3)
    sub = ring.subscribe()
    for i in range(4):  # 0..2 queued, 3 lost
        ring.add(rec(i))
    sub.get_nowait()  # one slot free: the marker needs it, so record 4 is lost as well
    ring.add(rec(4))
    assert sub.dropped == 2
    rest = [sub.get_nowait() for _ in range(3)]
    assert ids([r for r in rest if isinstance(r, FlowRecord)]) == ["1", "2"]
    assert rest[2] == Dropped(2, 2)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        FlowRing(capacity=0)
    with pytest.raises(ValueError):
        FlowRing(subscriber_queue=1)
