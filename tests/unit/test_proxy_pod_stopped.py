"""A pod stopped (unenrolled, opted out) while one of its connections is being set up: the
connection must not open afterwards, since `kill_pods` ran before it was open and nothing would
close it with the pod. The destination side has checked its pod after the dial to the app
(`DESTINATION_POD_STOPPED`); the source side checks the source pod after its passthrough dial, its
HBONE stream, or (same node) the destination's dial: `SOURCE_POD_STOPPED`. Driven without sockets
(test_proxy_refusals' fake node)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from test_proxy_refusals import APP_PORT, CLOSED, LEGACY, OPENED, A, B, Client, Node

from agent.admin.flows import FlowEvent
from agent.proxy.pipe import SocketEnd

STOPPED = "SOURCE_POD_STOPPED"


class Closable:
    """The upstream end a dial or an HBONE CONNECT returned: whether the proxy closed it."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Gate:
    """Holds a dial (or a CONNECT) until released; then it returns `upstream`."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.upstream = Closable()

    async def wait(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        await self.release.wait()
        return self.upstream


async def stop_source_mid_setup(node: Node, gate: Gate, dst: tuple[str, int]) -> Client:
    """C's app connects to `dst`; while its connection is held at `gate`, pod C stops."""
    node.datapath.orig[50000] = dst
    client = Client(("127.0.0.1", 50000), ("127.0.0.1", 15001))
    task = asyncio.create_task(node.outbound.handle(node.eps["c"], cast(SocketEnd, client)))
    await asyncio.wait_for(gate.started.wait(), 5)
    node.core.remove_pod(node.eps["c"].pod.uid)
    assert node.core.tracker.kill_pods([node.eps["c"].pod.uid], "pod_stopped") == 0  # nothing open yet
    gate.release.set()
    await asyncio.wait_for(task, 5)
    return client


def outcomes(node: Node) -> list[tuple[FlowEvent, str]]:
    return [(f.event, f.reason) for f in node.flows()]


async def test_passthrough_whose_source_pod_stopped_during_the_dial_is_refused() -> None:
    node, gate = Node(), Gate()
    node.core.dial = gate.wait  # type: ignore[method-assign]
    client = await stop_source_mid_setup(node, gate, (LEGACY.ips[0], 80))
    assert outcomes(node) == [(FlowEvent.DENY, STOPPED)]
    assert node.piped == []
    assert client.closed and gate.upstream.closed
    # counted at the source as any refusal once routed
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.core.tracker.in_use == 0 and node.core.tracker.open == {}


async def test_hbone_whose_source_pod_stopped_while_its_stream_opened_is_refused() -> None:
    node, gate = Node(), Gate()
    pool = type("HeldPool", (), {"open_stream": staticmethod(gate.wait)})()  # the CONNECT held
    node.outbound.pool = lambda ep: cast(Any, pool)  # type: ignore[method-assign]
    client = await stop_source_mid_setup(node, gate, (A.ips[0], APP_PORT))
    assert outcomes(node) == [(FlowEvent.DENY, STOPPED)]
    assert node.piped == []
    assert client.closed and gate.upstream.closed  # the stream is reset: the peer stops too
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.core.tracker.in_use == 0 and node.core.tracker.open == {}


async def test_same_node_whose_source_pod_stopped_while_the_app_was_dialled_is_refused() -> None:
    node, gate = Node(), Gate()
    node.core.dial = gate.wait  # type: ignore[method-assign]
    client = await stop_source_mid_setup(node, gate, (B.ips[0], APP_PORT))
    assert outcomes(node) == [(FlowEvent.DENY, STOPPED)]
    assert node.piped == []
    assert client.closed and gate.upstream.closed
    # both sides counted, closed without a flag (as DESTINATION_POD_STOPPED)
    assert node.flags(OPENED) == {"-": 2.0}
    assert node.flags(CLOSED) == {"-": 2.0}
    assert node.core.tracker.in_use == 0 and node.core.tracker.open == {}


async def test_a_source_pod_still_served_after_the_dial_opens() -> None:
    node, gate = Node(), Gate()
    node.core.dial = gate.wait  # type: ignore[method-assign]
    node.datapath.orig[50000] = (LEGACY.ips[0], 80)
    client = Client(("127.0.0.1", 50000), ("127.0.0.1", 15001))
    task = asyncio.create_task(node.outbound.handle(node.eps["c"], cast(SocketEnd, client)))
    gate.release.set()
    await asyncio.wait_for(task, 5)
    assert [f.event for f in node.flows()] == [FlowEvent.OPEN, FlowEvent.CLOSE]
    assert len(node.piped) == 1 and not gate.upstream.closed


async def test_hbone_whose_source_pod_stopped_before_it_was_routed_makes_no_pool() -> None:
    # accepted just before the pod's stop: `close_pool` has run, so a pool made now would stay in
    # `Outbound.pools` (with its HBONE connection) until the proxy stops
    node = Node()
    node.datapath.orig[50000] = (A.ips[0], APP_PORT)
    node.core.remove_pod(node.eps["c"].pod.uid)
    client = Client(("127.0.0.1", 50000), ("127.0.0.1", 15001))
    await asyncio.wait_for(node.outbound.handle(node.eps["c"], cast(SocketEnd, client)), 5)
    assert outcomes(node) == [(FlowEvent.DENY, STOPPED)]
    assert node.outbound.pools == {}
    assert client.closed and node.piped == []
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.core.tracker.in_use == 0 and node.core.tracker.open == {}
