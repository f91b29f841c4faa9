"""Every connection the node proxy handles ends in exactly one flow-record outcome (one `deny`, or
`open` then `close`), and once counted opened in Istio's TCP metrics, in exactly one close: also
when it ends in an unexpected error, is cancelled while being set up (its client gone, or the proxy
stopping), or its same-node destination is no longer served as routed. The outbound and inbound
sides driven without sockets (test_proxy_refusals' fake node: dials, pipes and HBONE pool faked).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, cast

import pytest
from test_proxy_refusals import (
    A_ID,
    APP_PORT,
    CLOSED,
    DENY_A,
    LEGACY,
    NODE,
    OPENED,
    TD,
    A,
    B,
    C,
    Client,
    Node,
)

from agent.admin.flows import FlowEvent
from agent.admin.sources import ConnPath
from agent.datapath.interface import EnrolledPod, PodRef
from agent.proxy.conns import ConnTracker, Tracked
from agent.proxy.flows import FlowLog
from agent.proxy.hbone import ConnectTarget, Status
from agent.proxy.index import MeshIndex
from agent.proxy.pipe import SocketEnd
from api.resources import Workload

ABANDONED, SHUTDOWN, INTERNAL = "ABANDONED_BEFORE_ESTABLISHED", "PROXY_SHUTDOWN", "INTERNAL_ERROR"


def outcomes(node: Node) -> list[tuple[FlowEvent, str]]:
    return [(f.event, f.reason) for f in node.flows()]


def settled(node: Node) -> None:
    """Nothing left behind: every slot given back, nothing open."""
    assert node.core.tracker.in_use == 0
    assert node.core.tracker.open == {}


class HeldPool:
    """An HBONE pool whose CONNECT is never answered (a slow peer)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def open_stream(self, *args: Any) -> Any:
        self.started.set()
        await asyncio.Event().wait()


def hold_dials(node: Node) -> asyncio.Event:
    """Make `node`'s dials (to an app, or passthrough) hang after setting the returned event."""
    started = asyncio.Event()

    async def dial(netns_path: str, dst: tuple[str, int], source_ip: str | None = None) -> Any:
        node.dialled.append(dst)
        started.set()
        await asyncio.Event().wait()

    node.core.dial = dial  # type: ignore[method-assign]
    return started


class FakeStream:
    """An inbound CONNECT stream as `Inbound._hbone_stream` uses it."""

    abandoned = False
    task: asyncio.Task[None] | None = None

    def __init__(self, fail_on: int | None = None) -> None:
        self.status: int | None = None
        self.fail_on = fail_on

    def respond(self, status: int) -> None:
        if status == self.fail_on:
            raise RuntimeError("respond failed")
        self.status = status

    def close(self) -> None:
        pass


class App:
    """The app's end of a dial: whether the proxy closed it."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def connect_to_b(node: Node, stream: FakeStream, src: tuple[str, int] = (A.ips[0], 40000)) -> Any:
    """A CONNECT from A (certificate A_ID) to B:APP_PORT arriving on 15008."""
    target = ConnectTarget(ipaddress.ip_address(B.ips[0]), APP_PORT, None, "")
    return node.inbound._hbone_stream(src, A_ID, target, cast(Any, stream))


# --- same node: the destination is not served as routed ---------------------------------------------


def test_same_node_destination_no_longer_served_as_routed_is_refused_with_a_record() -> None:
    """route() saw B's IP among the served pods, but the pod served there is not B's (being
    re-enrolled, say): as the destination's 15008 would, refused UNKNOWN_DESTINATION_WORKLOAD,
    counted at the source as a refused CONNECT, not at the destination."""
    node = Node()
    node.core.served[B.ips[0]] = EnrolledPod(PodRef("stale-uid", "/nonexistent", B.ips[0]), 9, 9)
    assert node.outgoing((B.ips[0], APP_PORT)).closed
    assert outcomes(node) == [(FlowEvent.DENY, "UNKNOWN_DESTINATION_WORKLOAD")]
    (deny,) = node.flows()
    assert (deny.dst_ip, deny.dst_port, deny.src_pod, deny.dst_pod) == (B.ips[0], APP_PORT, "c", "b")
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.flags(OPENED, reporter="destination") == {}
    assert node.dialled == []
    settled(node)


# --- unexpected errors ---------------------------------------------------------------------------------


def test_outbound_unexpected_error_once_routed_is_recorded_and_counted_closed() -> None:
    node = Node()
    node.pool_error = RuntimeError("a bug")  # none of the failures the HBONE path expects
    assert node.outgoing((A.ips[0], APP_PORT)).closed
    assert outcomes(node) == [(FlowEvent.DENY, INTERNAL)]
    assert node.flows()[0].dst_pod == "a"
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.core.tracker.stats["internal_error"] == 1
    settled(node)


def test_outbound_unexpected_error_before_routing_is_recorded_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def route(self: MeshIndex, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(MeshIndex, "route", route)
    node = Node()
    assert node.outgoing((A.ips[0], APP_PORT)).closed
    assert outcomes(node) == [(FlowEvent.DENY, INTERNAL)]
    (deny,) = node.flows()
    assert (deny.src_ip, deny.src_port, deny.dst_ip, deny.dst_port) == (C.ips[0], 50000, A.ips[0], APP_PORT)
    assert node.flags(OPENED) == {} and node.flags(CLOSED) == {}
    settled(node)


def break_authorize(monkeypatch: pytest.MonkeyPatch) -> None:
    def authorize(self: MeshIndex, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(MeshIndex, "authorize", authorize)


def test_plaintext_unexpected_error_is_recorded_and_the_client_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    break_authorize(monkeypatch)
    node = Node()
    assert node.plaintext(LEGACY.ips[0]).closed
    assert outcomes(node) == [(FlowEvent.DENY, INTERNAL)]
    assert node.flags(OPENED, reporter="destination") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="destination") == {"-": 1.0}
    assert node.core.tracker.stats["internal_error"] == 1
    settled(node)


def test_hbone_stream_unexpected_error_is_recorded_and_answered_503(monkeypatch: pytest.MonkeyPatch) -> None:
    break_authorize(monkeypatch)
    node = Node()
    assert asyncio.run(connect_to_b(node, FakeStream())) == Status.SERVICE_UNAVAILABLE
    assert outcomes(node) == [(FlowEvent.DENY, INTERNAL)]
    assert node.flags(CLOSED, reporter="destination") == {"-": 1.0}
    settled(node)


def test_same_node_unexpected_error_at_the_destination_is_recorded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    break_authorize(monkeypatch)
    node = Node()
    assert node.outgoing((B.ips[0], APP_PORT)).closed
    assert outcomes(node) == [(FlowEvent.DENY, INTERNAL)]
    assert node.flags(OPENED) == {"-": 2.0}  # both sides, once each
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="destination") == {"-": 1.0}
    settled(node)


def test_an_error_once_the_app_is_connected_closes_the_app_connection() -> None:
    """Between the dial and the pipe (here: answering the CONNECT fails), the app's socket must not
    be left open, and the connection is recorded."""
    node = Node()
    app = App()

    async def dial(*args: Any, **kwargs: Any) -> Any:
        return app

    node.core.dial = dial  # type: ignore[method-assign]
    assert asyncio.run(connect_to_b(node, FakeStream(fail_on=Status.OK))) == Status.SERVICE_UNAVAILABLE
    assert app.closed
    assert outcomes(node) == [(FlowEvent.DENY, INTERNAL)]
    assert node.piped == []
    settled(node)


def test_an_error_after_a_refusal_was_recorded_does_not_record_it_again() -> None:
    node = Node(DENY_A)
    assert asyncio.run(connect_to_b(node, FakeStream(fail_on=Status.UNAUTHORIZED))) == 503
    assert outcomes(node) == [(FlowEvent.DENY, "DENIED_BY_POLICY")]
    assert node.flags(CLOSED, reporter="destination") == {"DENY": 1.0}
    assert node.core.tracker.stats["internal_error"] == 1
    settled(node)


def test_unfinished_records_only_a_connection_without_an_outcome() -> None:
    tracker = ConnTracker(FlowLog())

    def conn(cid: str) -> Tracked:
        return Tracked(cid, ConnPath.HBONE, (), (A.ips[0], 1), (B.ips[0], APP_PORT))

    opened, refused, bare = conn("c1"), conn("c2"), conn("c3")
    tracker.opened(opened)
    tracker.unfinished(opened, INTERNAL)  # open: its close is pipe()'s to record
    tracker.closed(opened)
    tracker.denied(refused, "DENIED_BY_POLICY")
    tracker.unfinished(refused, INTERNAL)
    tracker.cancelled(bare)
    tracker.unfinished(bare, INTERNAL)
    assert [(r.connection_id, r.event, r.reason) for r in tracker.flows.ring] == [
        ("c1", FlowEvent.OPEN, ""),
        ("c1", FlowEvent.CLOSE, ""),
        ("c2", FlowEvent.DENY, "DENIED_BY_POLICY"),
        ("c3", FlowEvent.DENY, ABANDONED),
    ]


def test_a_source_ip_claimed_by_a_workload_without_a_valid_identity_is_just_not_labelled() -> None:
    """The workload owning the HBONE peer's IP only labels the connection when its identity is the
    certificate's; one whose identity cannot be formed (a stale namespace-less entry) must not fail
    the connection."""
    node = Node()
    stale = Workload("x/stale", "stale", "", "sa", "n1", A.ips[0:1])
    node.core.index = MeshIndex(node=NODE, trust_domain=TD, workloads=(stale, B, C, LEGACY))
    stream = FakeStream()
    assert asyncio.run(connect_to_b(node, stream)) is None
    assert stream.status == Status.OK
    assert [f.event for f in node.flows()] == [FlowEvent.OPEN, FlowEvent.CLOSE]
    assert node.flows()[0].src_pod == ""
    settled(node)


# --- cancelled while being set up: the client gone, or the proxy stopping ----------------------------


def connect_from_c(node: Node, dst: tuple[str, int]) -> tuple[Client, asyncio.Task[None]]:
    """Pod c's app connects to `dst` (its original destination) through 15001: the client end, and
    the outbound side's task handling it."""
    node.datapath.orig[50000] = dst
    client = Client(("127.0.0.1", 50000), ("127.0.0.1", 15001))
    return client, asyncio.create_task(node.outbound.handle(node.eps["c"], cast(SocketEnd, client)))


async def cancel_when(task: asyncio.Task[Any], started: asyncio.Event) -> None:
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("stopping, reason", [(False, ABANDONED), (True, SHUTDOWN)])
async def test_outbound_cancelled_while_its_hbone_stream_opens_is_recorded(
    stopping: bool, reason: str
) -> None:
    node = Node()
    node.core.tracker.stopping = stopping
    pool = HeldPool()
    node.outbound.pool = lambda ep: cast(Any, pool)  # type: ignore[method-assign]
    client, task = connect_from_c(node, (A.ips[0], APP_PORT))
    await cancel_when(task, pool.started)
    assert outcomes(node) == [(FlowEvent.DENY, reason)]
    assert client.closed
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    settled(node)


@pytest.mark.parametrize("stopping, reason", [(False, ABANDONED), (True, SHUTDOWN)])
async def test_outbound_cancelled_while_its_passthrough_dials_is_recorded(
    stopping: bool, reason: str
) -> None:
    node = Node()
    node.core.tracker.stopping = stopping
    started = hold_dials(node)
    client, task = connect_from_c(node, (LEGACY.ips[0], 80))
    await cancel_when(task, started)
    assert outcomes(node) == [(FlowEvent.DENY, reason)]
    assert client.closed
    assert node.flags(CLOSED, reporter="source", connection_security_policy="unknown") == {"-": 1.0}
    settled(node)


@pytest.mark.parametrize("stopping, reason", [(False, ABANDONED), (True, SHUTDOWN)])
async def test_same_node_cancelled_while_the_app_is_dialled_is_recorded_once(
    stopping: bool, reason: str
) -> None:
    node = Node()
    node.core.tracker.stopping = stopping
    started = hold_dials(node)
    client, task = connect_from_c(node, (B.ips[0], APP_PORT))
    await cancel_when(task, started)
    assert outcomes(node) == [(FlowEvent.DENY, reason)]
    assert client.closed
    assert node.flags(OPENED) == {"-": 2.0}
    assert node.flags(CLOSED) == {"-": 2.0}
    settled(node)


@pytest.mark.parametrize("stopping, reason", [(False, ABANDONED), (True, SHUTDOWN)])
async def test_hbone_stream_cancelled_while_the_app_is_dialled_is_recorded(
    stopping: bool, reason: str
) -> None:
    """Cancelled because the peer reset the stream (tunnel.ServerStream._abandon): the client gave
    up. Cancelled while the proxy stops: the proxy did."""
    node = Node()
    node.core.tracker.stopping = stopping
    started = hold_dials(node)
    task = asyncio.create_task(connect_to_b(node, FakeStream()))
    await cancel_when(task, started)
    assert outcomes(node) == [(FlowEvent.DENY, reason)]
    assert node.flags(CLOSED, reporter="destination") == {"-": 1.0}
    settled(node)


@pytest.mark.parametrize("stopping, reason", [(False, ABANDONED), (True, SHUTDOWN)])
async def test_plaintext_cancelled_while_the_app_is_dialled_is_recorded(stopping: bool, reason: str) -> None:
    node = Node()
    node.core.tracker.stopping = stopping
    started = hold_dials(node)
    client = Client((LEGACY.ips[0], 40000), (B.ips[0], APP_PORT))
    task = asyncio.create_task(node.inbound.plaintext(node.eps["b"], cast(SocketEnd, client)))
    await cancel_when(task, started)
    assert outcomes(node) == [(FlowEvent.DENY, reason)]
    assert client.closed
    settled(node)
