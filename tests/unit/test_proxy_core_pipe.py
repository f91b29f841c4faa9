"""`ProxyCore.pipe`: once a connection is recorded open, whatever happens next it is recorded
closed and both of its ends are closed (an unexpected error between the open record and the copy
must not leave the app's or the remote end open, nor the connection open in the tracker)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from test_proxy_refusals import APP_PORT, CLOSED, LEGACY, OPENED, A, B, Client, Node

from agent.admin.flows import FlowEvent, FlowRing
from agent.admin.sources import ConnPath
from agent.proxy import core as core_module
from agent.proxy.conns import ConnTracker, Tracked
from agent.proxy.core import ProxyCore
from agent.proxy.flows import FlowLog
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.pipe import SocketEnd


class Side:
    """A proxied end that only records how it was released."""

    def __init__(self) -> None:
        self.closed = False
        self.finished = False

    async def read(self) -> bytes:
        return b""

    async def write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def finish(self) -> None:
        self.finished = True


def core() -> ProxyCore:
    return ProxyCore(
        datapath=cast(Any, None),
        certs=cast(Any, None),
        bundle=lambda: b"",
        index=MeshIndex(node="n2", trust_domain="cluster.local", workloads=(A, B)),
        tracker=ConnTracker(FlowLog(FlowRing())),
        metrics=ProxyMetrics(),
        hbone_port=15008,
    )


def conn() -> Tracked:
    return Tracked("c1", ConnPath.HBONE, (), (A.ips[0], 40000), (B.ips[0], APP_PORT))


def records(c: ProxyCore) -> list[FlowEvent]:
    return [f.event for f in c.tracker.flows.ring]


def test_a_clean_pipe_is_recorded_open_then_closed() -> None:
    c, client, upstream = core(), Side(), Side()
    asyncio.run(c.pipe(conn(), cast(Any, client), cast(Any, upstream)))
    assert records(c) == [FlowEvent.OPEN, FlowEvent.CLOSE]
    assert client.finished and upstream.finished
    assert c.tracker.open == {}


def test_an_error_right_after_the_open_record_closes_both_ends_and_records_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, client, upstream = core(), Side(), Side()
    opened = c.tracker.opened

    def opened_then_fail(t: Tracked) -> None:
        opened(t)
        raise RuntimeError("a bug after the open record")

    monkeypatch.setattr(c.tracker, "opened", opened_then_fail)
    with pytest.raises(RuntimeError):
        asyncio.run(c.pipe(conn(), cast(Any, client), cast(Any, upstream)))
    assert records(c) == [FlowEvent.OPEN, FlowEvent.CLOSE]
    assert list(c.tracker.flows.ring)[-1].reason == "INTERNAL_ERROR"
    assert client.closed and upstream.closed
    assert c.tracker.open == {} and c.tracker.stats["closed"] == 1


def test_an_error_before_the_copy_starts_closes_both_ends_and_records_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, client, upstream = core(), Side(), Side()

    def splice(*args: Any) -> Any:
        raise RuntimeError("a bug before the copy")

    monkeypatch.setattr(core_module, "splice", splice)
    with pytest.raises(RuntimeError):
        asyncio.run(c.pipe(conn(), cast(Any, client), cast(Any, upstream)))
    assert records(c) == [FlowEvent.OPEN, FlowEvent.CLOSE]
    assert client.closed and upstream.closed
    assert c.tracker.open == {}


def test_an_open_record_that_fails_before_recording_leaves_the_outcome_to_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing recorded yet: no close record for it, and the entry point's `unfinished` records it."""
    c, client, upstream = core(), Side(), Side()

    def fail(t: Tracked) -> None:
        raise RuntimeError("a bug before the open record")

    monkeypatch.setattr(c.tracker, "opened", fail)
    t = conn()
    with pytest.raises(RuntimeError):
        asyncio.run(c.pipe(t, cast(Any, client), cast(Any, upstream)))
    assert client.closed and upstream.closed
    assert records(c) == []
    c.tracker.unfinished(t, "INTERNAL_ERROR")
    assert [(f.event, f.reason) for f in c.tracker.flows.ring] == [(FlowEvent.DENY, "INTERNAL_ERROR")]


def test_an_outbound_connection_failing_once_open_has_one_outcome_and_no_end_left_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the entry point (15001, passthrough): open and close records, counted closed once,
    the error counted, the client and the dialled upstream both closed."""
    node = Node()
    del node.core.pipe  # the real one
    upstream = Side()

    async def dial(*args: Any, **kwargs: Any) -> Any:
        return upstream

    def splice(*args: Any) -> Any:
        raise RuntimeError("a bug before the copy")

    node.core.dial = dial  # type: ignore[method-assign]
    monkeypatch.setattr(core_module, "splice", splice)
    node.datapath.orig[50000] = (LEGACY.ips[0], 80)
    client = Client(("127.0.0.1", 50000), ("127.0.0.1", 15001))
    asyncio.run(node.outbound.handle(node.eps["c"], cast(SocketEnd, client)))
    assert [(f.event, f.reason) for f in node.flows()] == [
        (FlowEvent.OPEN, ""),
        (FlowEvent.CLOSE, "INTERNAL_ERROR"),
    ]
    assert client.closed and upstream.closed
    assert node.core.tracker.stats["internal_error"] == 1
    assert node.flags(OPENED) == {"-": 1.0} and node.flags(CLOSED) == {"-": 1.0}
    assert node.core.tracker.in_use == 0 and node.core.tracker.open == {}
