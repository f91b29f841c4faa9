"""The main agent process answers for its proxy workers: real admin servers on temporary Unix sockets
(the main one and one per worker), as `agent run --proxy-workers N` runs them.

`/v1/connections` and `/v1/status` of the main socket include the workers' (a worker that does not
answer is named, never a failed request), the main flow ring receives every worker's records across
worker restarts (no duplicate, no gap), `/metrics` is one merged exposition, and the node CLI shows
which worker carries which connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from controller_fixtures import assert_eventually
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner
from unix_peer import answering, http_200

from agent.admin import client
from agent.admin.flow_feed import WorkerFlowFeed
from agent.admin.flows import FlowEvent, FlowRecord, FlowRing, Verdict
from agent.admin.peers import WorkerPeers
from agent.admin.server import AdminServer
from agent.admin.sources import (
    AgentStatus,
    CertInfo,
    ConnectionInfo,
    ConnPath,
    ControllerLink,
    DatapathStatus,
    MeshSettings,
    ProxyState,
    ProxyStatus,
)
from agent.proxy.metrics import ProxyMetrics, TcpPeers
from agent.telemetry import AgentCollector, MetricsServer, merged_registry
from agent.workers import WorkerInfo
from api.resources import PolicyObject, Service, Workload
from nodemesh.cli import app

NODE = "demo"


class ProcessSources:
    """The admin data of one agent process (the main one or a proxy worker): its connections and a
    metrics registry holding the proxy's istio counters and the agent collector, as the agent's."""

    def __init__(
        self, conns: Sequence[ConnectionInfo] = (), opened: int = 0, certs: Sequence[CertInfo] = ()
    ) -> None:
        self.conns = list(conns)
        self.cert_list = list(certs)
        self.metrics = ProxyMetrics(CollectorRegistry(auto_describe=True))
        self.stats = {"opened": opened, "pods": 2}
        self.metrics.registry.register(AgentCollector(NODE, lambda: {"connect_redirected": 50},
                                                      lambda: self.stats))
        for _ in range(opened):
            self.metrics.series(TcpPeers("source", None, None, None, None, None, True)).opened.inc()

    def status(self) -> AgentStatus:
        return AgentStatus(
            node=NODE,
            version="0.1.0",
            started_at=time.time() - 60,
            proxy=ProxyStatus(ProxyState.RUNNING, listeners=3, active_connections=len(self.conns), pods=1,
                              slots_in_use=len(self.conns) + 1, slots=100, slots_per_source=50),
            datapath=DatapathStatus(backend="fake"),
            controller=ControllerLink("10.0.0.1:15012", True),
        )

    def mesh(self) -> MeshSettings:
        return MeshSettings("cluster.local")

    def workloads(self) -> Sequence[Workload]:
        return []

    def services(self) -> Sequence[Service]:
        return []

    def policies(self) -> Sequence[PolicyObject]:
        return []

    def certs(self) -> Sequence[CertInfo]:
        return self.cert_list

    def connections(self) -> Sequence[ConnectionInfo]:
        return self.conns

    def metrics_text(self) -> str:
        return self.metrics.text()


def conn(cid: str, age: float, src_pod: str = "shop/web-7d9f") -> ConnectionInfo:
    return ConnectionInfo(cid, ConnPath.HBONE, "10.1.0.2", 41234, "10.2.0.3", 5432, time.time() - age,
                          src_pod=src_pod, dst_workload="shop/db-0", bytes_sent=100)


def cert(identity: str, serial: str) -> CertInfo:
    now = time.time()
    return CertInfo(identity, serial, "O=lab,CN=nodemesh root", now - 60, now + 86_400, now + 43_200, pods=1)


def rec(cid: str) -> FlowRecord:
    return FlowRecord(time=time.time(), event=FlowEvent.OPEN, verdict=Verdict.ALLOWED, src_ip="10.1.0.2",
                      src_port=40000, dst_ip="10.2.0.3", dst_port=5432, src_pod="web", src_namespace="shop",
                      connection_id=cid)


def ids(ring: FlowRing) -> list[str]:
    return [r.connection_id for r in ring]


def info(index: int, sock: Path, up: bool = True, **kw: Any) -> WorkerInfo:
    return WorkerInfo(index=index, pid=4240 + index if up else None, admin_socket=sock, up=up,
                      started_at=time.time() - 30 if up else None, **kw)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nm-workers-"))  # short: AF_UNIX paths hold 107 bytes
    (path / NODE).mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sock(run_dir: Path, index: int) -> Path:
    return run_dir / NODE / ("admin.sock" if index == 0 else f"worker-{index}.sock")


@contextlib.asynccontextmanager
async def serving(*servers: AdminServer) -> AsyncIterator[None]:
    for s in servers:
        await s.start()
    try:
        yield
    finally:
        for s in servers:
            await s.close()


# --- connections and status -----------------------------------------------------------------------


async def test_connections_of_every_up_worker_are_merged_with_their_index(run_dir: Path) -> None:
    workers = [info(1, sock(run_dir, 1)), info(2, sock(run_dir, 2)), info(3, sock(run_dir, 3), up=False)]
    main = AdminServer(ProcessSources([conn("c1", 30)]), FlowRing(), sock(run_dir, 0),
                       peers=WorkerPeers(lambda: workers))
    w1 = AdminServer(ProcessSources([conn("w1c1", 20)]), FlowRing(), sock(run_dir, 1), worker_index=1)
    w2 = AdminServer(ProcessSources([conn("w2c1", 40), conn("w2c2", 5)]), FlowRing(), sock(run_dir, 2),
                     worker_index=2)
    async with serving(main, w1, w2):
        doc = await client.get_json(sock(run_dir, 0), "/v1/connections", timeout=5)
        direct = await client.get_json(sock(run_dir, 1), "/v1/connections", timeout=5)
    rows = doc["connections"]
    assert [(r["id"], r["worker"]) for r in rows] == [("w2c1", 2), ("c1", 0), ("w1c1", 1), ("w2c2", 2)]
    assert doc["workers_unreachable"] == []  # worker 3 is down: it carries nothing, it is not asked
    assert rows[2]["src_pod"] == "shop/web-7d9f" and rows[2]["bytes_sent"] == 100 and 19 < rows[2]["age"] < 30
    assert direct["connections"][0]["worker"] == 1  # a worker's own answer says which it is


async def test_certificates_of_every_up_worker_are_listed_with_their_index(run_dir: Path) -> None:
    """Each process holds its own key and certificate per identity: `/v1/certs` lists them all."""
    web, db = "spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/db"
    workers = [info(1, sock(run_dir, 1)), info(2, sock(run_dir, 2)), info(3, sock(run_dir, 3), up=False)]
    main = AdminServer(ProcessSources(certs=[cert(web, "0a"), cert(db, "0b")]), FlowRing(), sock(run_dir, 0),
                       peers=WorkerPeers(lambda: workers, timeout=0.3))
    w1 = AdminServer(ProcessSources(certs=[cert(web, "1a"), cert(db, "1b")]), FlowRing(), sock(run_dir, 1),
                     worker_index=1)
    async with serving(main, w1), answering(sock(run_dir, 2), http_200(b'{"certs": [{"serial": 7}]}')):
        doc = await client.get_json(sock(run_dir, 0), "/v1/certs", timeout=5)
    rows = [(r["identity"], r["serial"], r["worker"]) for r in doc["certs"]]
    assert rows == [(db, "0b", 0), (db, "1b", 1), (web, "0a", 0), (web, "1a", 1)]
    assert all(r["state"] == "valid" and 43_000 < r["renews_in"] < 43_300 for r in doc["certs"])
    assert doc["workers_unreachable"] == [2]  # answered, but not with certificates


async def test_a_worker_that_hangs_or_answers_garbage_is_left_out_and_named(run_dir: Path) -> None:
    workers = [info(1, sock(run_dir, 1)), info(2, sock(run_dir, 2)), info(3, sock(run_dir, 3)),
               info(4, sock(run_dir, 4))]  # worker 4: up, but its socket is not there (yet)
    peers = WorkerPeers(lambda: workers, timeout=0.3)
    main = AdminServer(ProcessSources([conn("c1", 30)]), FlowRing(), sock(run_dir, 0), peers=peers)
    w1 = AdminServer(ProcessSources([conn("w1c1", 20)]), FlowRing(), sock(run_dir, 1), worker_index=1)
    async with serving(main, w1), answering(sock(run_dir, 2)), \
            answering(sock(run_dir, 3), http_200(b"<html>oops</html>")):
        began = time.monotonic()
        doc = await client.get_json(sock(run_dir, 0), "/v1/connections", timeout=5)
        elapsed = time.monotonic() - began
        status = await client.get_json(sock(run_dir, 0), "/v1/status", timeout=5)
    assert [(r["id"], r["worker"]) for r in doc["connections"]] == [("c1", 0), ("w1c1", 1)]
    assert doc["workers_unreachable"] == [2, 3, 4]
    assert elapsed < 2.0  # the hung worker cost its timeout (asked at once with the others), no more
    counts = [(w["index"], w["connections"]) for w in status["workers"]]
    assert counts == [(1, 1), (2, None), (3, None), (4, None)]
    assert status["proxy"]["active_connections"] == 2
    assert peers.failures == 6


@pytest.mark.parametrize("garbage", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    http_200(b"[" * 100_000 + b"]" * 100_000),
], ids=["101-upgrade", "deeply-nested-json"])
async def test_a_worker_answering_an_upgrade_or_too_deep_json_is_named_not_a_500(
    run_dir: Path, garbage: bytes
) -> None:
    """httptools raises HttpParserUpgrade (no HttpParserError) on a 101, json.loads RecursionError (no
    ValueError) on deep nesting: both are a worker left out, never the main process's 500."""
    peers = WorkerPeers(lambda: [info(1, sock(run_dir, 1))], timeout=0.5)
    main = AdminServer(ProcessSources([conn("c1", 3)]), FlowRing(), sock(run_dir, 0), peers=peers)
    async with serving(main), answering(sock(run_dir, 1), garbage):
        doc = await client.get_json(sock(run_dir, 0), "/v1/connections", timeout=5)
        certs = await client.get_json(sock(run_dir, 0), "/v1/certs", timeout=5)
        status = await client.get_json(sock(run_dir, 0), "/v1/status", timeout=5)
    assert [r["id"] for r in doc["connections"]] == ["c1"]
    assert doc["workers_unreachable"] == certs["workers_unreachable"] == [1]
    assert status["workers"][0]["connections"] is None
    assert (main.errors, peers.failures) == (0, 3)


async def test_an_unforeseen_error_asking_a_worker_leaves_it_out_and_is_logged(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The last resort: whatever reading one worker raises (a bug here) costs that worker's part only."""
    w1 = AdminServer(ProcessSources([conn("w1c1", 2)]), FlowRing(), sock(run_dir, 1), worker_index=1)
    peers = WorkerPeers(lambda: [info(1, sock(run_dir, 1)), info(2, sock(run_dir, 2))], timeout=0.5)
    main = AdminServer(ProcessSources([conn("c1", 3)]), FlowRing(), sock(run_dir, 0), peers=peers)
    real = client.get_json

    async def get_json(path: Path, target: str, *, timeout: float) -> Any:
        if path == sock(run_dir, 2):
            raise RuntimeError("a bug")
        return await real(path, target, timeout=timeout)

    monkeypatch.setattr(client, "get_json", get_json)
    async with serving(main, w1):
        doc = await client.get_json(sock(run_dir, 0), "/v1/connections", timeout=5)
    assert [r["id"] for r in doc["connections"]] == ["c1", "w1c1"]
    assert doc["workers_unreachable"] == [2]
    assert (main.errors, peers.failures) == (0, 1)
    (logged,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "worker=2" in logged.getMessage() and logged.exc_info is not None


async def test_status_lists_the_workers_and_counts_their_connections(run_dir: Path) -> None:
    workers = [info(1, sock(run_dir, 1), restarts=1, last_exit="signal 9"),
               info(2, sock(run_dir, 2), up=False, restarts=2, last_exit="exit 1")]
    main = AdminServer(ProcessSources([conn("c1", 30)]), FlowRing(), sock(run_dir, 0),
                       peers=WorkerPeers(lambda: workers))
    w1 = AdminServer(ProcessSources([conn("w1c1", 20), conn("w1c2", 2)]), FlowRing(), sock(run_dir, 1))
    async with serving(main, w1):
        doc = await client.get_json(sock(run_dir, 0), "/v1/status", timeout=5)
        alone = await client.get_json(sock(run_dir, 1), "/v1/status", timeout=5)
    assert doc["proxy"]["active_connections"] == 3
    # each process has its own cap: the node's is the sum of those that answered (worker 2 is down)
    assert (doc["proxy"]["connection_slots_in_use"], doc["proxy"]["connection_slots"]) == (2 + 3, 200)
    # a source may hold its share in each process
    assert doc["proxy"]["connection_slots_per_source"] == 100
    w = doc["workers"]
    assert [(x["index"], x["pid"], x["up"], x["restarts"], x["last_exit"], x["connections"]) for x in w] == [
        (1, 4241, True, 1, "signal 9", 2),
        (2, None, False, 2, "exit 1", None),
    ]
    assert w[0]["started_at"] == workers[0].started_at
    assert alone["workers"] == [] and alone["proxy"]["active_connections"] == 2


@pytest.mark.parametrize(
    ("slots", "counted"),
    [
        ({}, (0, 0)),  # an agent from before the slot counts: only its connections are summed
        ({"connection_slots_in_use": 4, "connection_slots": 10_000}, (4, 10_000)),
        ({"connection_slots_in_use": "4", "connection_slots": 10_000}, None),
        ({"connection_slots_in_use": 4, "connection_slots": -1}, None),
        ({"connection_slots_in_use": True, "connection_slots": 10_000}, None),
    ],
)
def test_a_workers_slot_counts_are_checked_like_its_connections(
    slots: dict[str, Any], counted: tuple[int, int] | None
) -> None:
    from agent.admin.peers import _proxy_counts

    got = _proxy_counts({"proxy": {"active_connections": 2, "listeners": 3, **slots}})
    assert (None if got is None else (got.slots_in_use, got.slots)) == counted


# --- flows ------------------------------------------------------------------------------------------


def feed_for(workers: Callable[[], Sequence[WorkerInfo]], ring: FlowRing) -> WorkerFlowFeed:
    return WorkerFlowFeed(workers, ring, poll_interval=0.02, backoff=(0.01, 0.05))


async def test_workers_flows_reach_the_main_ring_and_its_followers_unchanged(run_dir: Path) -> None:
    main_ring, w1_ring, w2_ring = FlowRing(), FlowRing(), FlowRing()
    w1_ring.add(rec("w1c1"))  # before the main process reads: history
    workers = [info(1, sock(run_dir, 1)), info(2, sock(run_dir, 2))]
    main = AdminServer(ProcessSources(), main_ring, sock(run_dir, 0))
    feed = feed_for(lambda: workers, main_ring)
    async with serving(main, AdminServer(ProcessSources(), w1_ring, sock(run_dir, 1)),
                       AdminServer(ProcessSources(), w2_ring, sock(run_dir, 2))):
        await feed.start()
        try:
            await assert_eventually(lambda: ids(main_ring) == ["w1c1"], what="worker 1's stored flow")
            await assert_eventually(lambda: w2_ring.subscribers == 1, what="worker 2 followed")
            lines = client.stream_lines(sock(run_dir, 0), "/v1/flows?follow=1&last=0", timeout=5)
            async with contextlib.aclosing(lines):
                assert json.loads(await anext(lines))["kind"] == "start"
                live = rec("w2c1")
                w2_ring.add(live)
                shown = json.loads(await asyncio.wait_for(anext(lines), 5))
        finally:
            await feed.close()
    assert shown == {"kind": "flow", "flow": live.to_dict()}  # `nodemesh flows -f` on the main socket
    assert list(main_ring) == [w1_ring.snapshot()[0], live]
    assert (feed.flows["received"][1], feed.flows["received"][2]) == (1, 1)


async def test_flow_feed_resumes_after_worker_restarts_without_duplicates_or_gaps(run_dir: Path) -> None:
    main_ring, ring = FlowRing(), FlowRing()
    path = sock(run_dir, 1)
    workers = [info(1, path)]
    ring.add(rec("a1"))
    ring.add(rec("a2"))
    feed = feed_for(lambda: workers, main_ring)
    await feed.start()
    try:
        async with serving(AdminServer(ProcessSources(), ring, path)):
            await assert_eventually(lambda: ids(main_ring) == ["a1", "a2"])
            ring.add(rec("a3"))
            await assert_eventually(lambda: ids(main_ring) == ["a1", "a2", "a3"])
        # the same process's socket comes back (its stream broke): what it added meanwhile arrives once
        ring.add(rec("a4"))
        async with serving(AdminServer(ProcessSources(), ring, path)):
            await assert_eventually(lambda: "a4" in ids(main_ring))
            ring.add(rec("a5"))  # after a5 arrived, a duplicate from the reconnect would be in already
            await assert_eventually(lambda: "a5" in ids(main_ring))
            assert ids(main_ring) == ["a1", "a2", "a3", "a4", "a5"]
            workers[0] = info(1, path, up=False, restarts=1, last_exit="signal 9")
        # a new process (a new ring): all of its records are new, even those before it was followed
        new_ring = FlowRing()
        new_ring.add(rec("b1"))
        async with serving(AdminServer(ProcessSources(), new_ring, path)):
            new_ring.add(rec("b2"))
            workers[0] = info(1, path, restarts=1)
            await assert_eventually(lambda: "b2" in ids(main_ring))
            new_ring.add(rec("b3"))
            await assert_eventually(lambda: "b3" in ids(main_ring))
    finally:
        await feed.close()
    assert ids(main_ring) == ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3"]
    assert feed.flows["lost"][1] == 0 and feed.flows["malformed"][1] == 0


async def test_flows_a_worker_dropped_or_evicted_are_counted_lost(run_dir: Path) -> None:
    main_ring = FlowRing()
    ring = FlowRing(capacity=4, subscriber_queue=2)  # a follower may fall 2 records behind
    path = sock(run_dir, 1)
    feed = feed_for(lambda: [info(1, path)], main_ring)
    await feed.start()
    try:
        async with serving(AdminServer(ProcessSources(), ring, path)):
            await assert_eventually(lambda: ring.subscribers == 1, what="the feed follows the worker")
            for i in range(10):  # at once: the worker's queue for the feed overflows after 2
                ring.add(rec(f"r{i}"))
            ring_after_burst = ids(ring)
            await assert_eventually(lambda: feed.flows["lost"][1] == 8)
            ring.add(rec("r10"))
            await assert_eventually(lambda: "r10" in ids(main_ring))
        assert ids(main_ring) == ["r0", "r1", "r10"]
        assert ring_after_burst == ["r6", "r7", "r8", "r9"]
        # while the feed is away, the worker's ring (4 records) moves past what it had read
        for i in range(11, 17):
            ring.add(rec(f"r{i}"))
        async with serving(AdminServer(ProcessSources(), ring, path)):
            await assert_eventually(lambda: "r16" in ids(main_ring))
    finally:
        await feed.close()
    assert ids(main_ring) == ["r0", "r1", "r10", "r13", "r14", "r15", "r16"]
    assert feed.flows["lost"][1] == 8 + 2  # r11 and r12 left the worker's ring unread
    assert feed.flows["received"][1] == 7


async def test_malformed_flow_lines_are_skipped_and_counted(run_dir: Path) -> None:
    main_ring = FlowRing()
    good = rec("w1c7")
    lines = [
        {"kind": "start", "ring": {"added": 0, "stored": 0}, "ring_id": "abc"},
        "{not json",
        {"kind": "flow", "flow": {**good.to_dict(), "event": "exploded"}},
        {"kind": "mystery"},
        {"kind": "dropped", "count": float("inf")},  # int(inf): OverflowError
        "[" * 10_000 + "]" * 10_000,  # nested deeper than json.loads goes: RecursionError
        {"kind": "flow", "flow": good.to_dict()},
    ]
    body = b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
              b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body))  # and no end: streaming
    feed = feed_for(lambda: [info(1, sock(run_dir, 1))], main_ring)
    async with answering(sock(run_dir, 1), answer):
        await feed.start()
        try:
            await assert_eventually(lambda: ids(main_ring) == ["w1c7"])
        finally:
            await feed.close()
    assert list(main_ring) == [good]
    assert feed.flows["malformed"][1] == 5
    assert feed.stream_errors[1] == 0  # one stream: the bad lines were skipped, not fatal
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in feed.collect() for s in f.samples}
    assert metrics["nodemesh_proxy_worker_flows_total", (("outcome", "malformed"), ("worker", "1"))] == 5
    assert metrics["nodemesh_proxy_worker_flows_total", (("outcome", "received"), ("worker", "1"))] == 1


async def test_a_negative_or_fractional_dropped_count_is_malformed_not_counted(run_dir: Path) -> None:
    """A `dropped` line with count -5 moved the stream's cursor back and the `lost` counter down (a
    counter that goes down reads as a reset); the records after it were then taken for ones already
    seen."""
    main_ring = FlowRing()
    lines = [
        {"kind": "start", "ring": {"added": 0, "stored": 0}, "ring_id": "abc"},
        {"kind": "flow", "flow": rec("w1c1").to_dict()},
        {"kind": "dropped", "count": 2},
        {"kind": "dropped", "count": -5},
        {"kind": "dropped", "count": 1.5},
        {"kind": "dropped", "count": True},
        {"kind": "flow", "flow": rec("w1c2").to_dict()},
    ]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body)
    feed = feed_for(lambda: [info(1, sock(run_dir, 1))], main_ring)
    async with answering(sock(run_dir, 1), answer):
        await feed.start()
        try:
            await assert_eventually(lambda: ids(main_ring) == ["w1c1", "w1c2"])
        finally:
            await feed.close()
    assert feed.flows["lost"][1] == 2
    assert feed.flows["malformed"][1] == 3
    assert feed.flows["received"][1] == 2


@pytest.mark.parametrize(
    "ring", [{"added": -1, "stored": 0}, {"added": 3, "stored": 5}], ids=["negative", "stored-more"]
)
async def test_a_start_line_with_impossible_ring_counts_breaks_the_stream(
    run_dir: Path, ring: dict[str, int]
) -> None:
    first = json.dumps({"kind": "start", "ring": ring, "ring_id": "abc"}).encode()
    body = first + b"\n" + json.dumps({"kind": "flow", "flow": rec("w1c1").to_dict()}).encode() + b"\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body)
    main_ring = FlowRing()
    feed = feed_for(lambda: [info(1, sock(run_dir, 1))], main_ring)
    async with answering(sock(run_dir, 1), answer):
        await feed.start()
        try:
            await assert_eventually(lambda: feed.stream_errors[1] >= 1)
        finally:
            await feed.close()
    assert list(main_ring) == []


async def test_a_worker_flow_with_a_wrongly_typed_field_is_malformed_not_stored(run_dir: Path) -> None:
    """A record whose `time` is not a number, once in the main ring, would make every `/v1/flows?since=`
    (`nodemesh flows --since 5m`) answer 500 until 10,000 newer records evict it."""
    ring = FlowRing()
    ring.add(rec("c1"))
    lines = [{"kind": "start", "ring": {"added": 0, "stored": 0}, "ring_id": "abc"},
             {"kind": "flow", "flow": {**rec("w1c1").to_dict(), "time": "yesterday"}},
             {"kind": "flow", "flow": {**rec("w1c2").to_dict(), "dst_port": "5432"}}]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body)
    main = AdminServer(ProcessSources(), ring, sock(run_dir, 0))
    feed = feed_for(lambda: [info(1, sock(run_dir, 1))], ring)
    async with serving(main), answering(sock(run_dir, 1), answer):
        await feed.start()
        try:
            await assert_eventually(lambda: feed.flows["malformed"][1] == 2)
        finally:
            await feed.close()
        since = await client.get_json(sock(run_dir, 0), f"/v1/flows?since={time.time() - 300}", timeout=5)
    assert [f["connection_id"] for f in since["flows"]] == ["c1"]
    assert feed.flows["received"][1] == 0


@pytest.mark.parametrize("first", [
    b'{"kind":"flow","flow":{}}',
    b'{"kind":"start","ring":{"added":Infinity,"stored":0},"ring_id":"abc"}',  # int(inf): OverflowError
    b"[" * 10_000 + b"]" * 10_000,  # RecursionError
], ids=["not-start", "infinite-count", "deeply-nested"])
async def test_a_bad_first_line_breaks_the_stream_and_it_is_retried(run_dir: Path, first: bytes) -> None:
    body = first + b"\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    feed = feed_for(lambda: [info(1, sock(run_dir, 1))], FlowRing())
    async with answering(sock(run_dir, 1), answer):
        await feed.start()
        try:
            await assert_eventually(lambda: feed.stream_errors[1] >= 2, what="retried after a bad stream")
        finally:
            await feed.close()


# --- metrics ---------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_metrics_of_the_main_socket_and_port_are_merged_with_the_workers(run_dir: Path) -> None:
    workers = [info(1, sock(run_dir, 1)), info(2, sock(run_dir, 2)), info(3, sock(run_dir, 3))]
    own = ProcessSources(opened=3)
    feed = WorkerFlowFeed(lambda: workers, FlowRing())  # its counters are the main process's own
    feed.flows["lost"][1] = 4
    own.metrics.registry.register(feed)  # as agent/main.py registers it: beside AgentCollector
    exposed = merged_registry(own.metrics.registry, lambda: workers, timeout=0.3)
    main = AdminServer(own, FlowRing(), sock(run_dir, 0), metrics=exposed)
    w1, w2 = ProcessSources(opened=5), ProcessSources(opened=1)
    port = MetricsServer(exposed, "127.0.0.1:0")
    try:
        async with serving(main, AdminServer(w1, FlowRing(), sock(run_dir, 1)),
                           AdminServer(w2, FlowRing(), sock(run_dir, 2))), answering(sock(run_dir, 3)):
            # a scrape is blocking I/O, on threads: the loop goes on serving the workers meanwhile
            admin = (await client.get(sock(run_dir, 0), "/metrics", timeout=5)).decode()
            scraped = await asyncio.to_thread(_http_get, port.port)
    finally:
        port.close()
    for text in (admin, scraped):
        values = samples(text)
        opened = [v for (name, _), v in values.items() if name == "istio_tcp_connections_opened_total"]
        assert opened == [3 + 5 + 1]
        assert values["nodemesh_proxy_stat", (("stat", "opened"),)] == 9
        assert values["nodemesh_proxy_stat", (("stat", "pods"),)] == 2  # the main process's, not 6
        redirected = (("counter", "connect_redirected"), ("node", NODE))
        assert values["nodemesh_datapath_events_total", redirected] == 50  # node-wide: not 150
        assert values["nodemesh_proxy_workers", (("state", "up"),)] == 3
        assert values["nodemesh_proxy_worker_scrape_errors_total", (("worker", "1"),)] == 0
        assert values["nodemesh_proxy_worker_scrape_errors_total", (("worker", "3"),)] >= 1  # it hangs
        assert ("nodemesh_agent_open_fds", (("worker", "2"),)) in values
        assert values["nodemesh_proxy_worker_flows_total", (("outcome", "lost"), ("worker", "1"))] == 4
        assert text.count("# TYPE istio_tcp_connections_opened_total ") == 1


def _http_get(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


# --- the node CLI -----------------------------------------------------------------------------------


class NodeThread:
    """The main admin server (with its workers' peers) and the workers' servers on a loop in a
    thread, as in the agent, so the blocking CLI can ask them."""

    def __init__(self, run_dir: Path, workers: list[WorkerInfo], servers: list[AdminServer]) -> None:
        self.loop = asyncio.new_event_loop()
        self.servers = servers
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.workers = workers

    def __enter__(self) -> NodeThread:
        self._thread.start()
        for s in self.servers:
            asyncio.run_coroutine_threadsafe(s.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.servers:
            asyncio.run_coroutine_threadsafe(s.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def node(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeThread]:
    monkeypatch.setenv("NODEMESH_RUN_DIR", str(run_dir))
    monkeypatch.delenv("NODEMESH_ADMIN_SOCKET", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    workers = [info(1, sock(run_dir, 1), restarts=1, last_exit="signal 9"),
               info(2, sock(run_dir, 2), up=False, restarts=2, last_exit="exit 1")]
    main = AdminServer(ProcessSources([conn("c1", 30)]), FlowRing(), sock(run_dir, 0),
                       peers=WorkerPeers(lambda: workers))
    w1 = AdminServer(ProcessSources([conn("w1c1", 20, src_pod="default/legacy")],
                                    certs=[cert("spiffe://cluster.local/ns/default/sa/legacy", "1a")]),
                     FlowRing(), sock(run_dir, 1), worker_index=1)
    with NodeThread(run_dir, workers, [main, w1]) as n:
        yield n


def test_cli_conns_shows_which_worker_carries_each_connection(node: NodeThread) -> None:
    result = CliRunner().invoke(app, ["conns"])
    assert result.exit_code == 0, result.output
    header, first, second = result.output.splitlines()[:3]
    assert header.split()[:2] == ["WORKER", "SOURCE"]
    assert first.split()[:2] == ["0", "shop/web-7d9f"]
    assert second.split()[:2] == ["1", "default/legacy"]
    rows = json.loads(CliRunner().invoke(app, ["conns", "-o", "json"]).output)
    assert [(r["id"], r["worker"]) for r in rows] == [("c1", 0), ("w1c1", 1)]


def test_cli_certs_shows_which_worker_holds_each_certificate(node: NodeThread) -> None:
    result = CliRunner().invoke(app, ["certs"])
    assert result.exit_code == 0, result.output
    header, first = result.output.splitlines()[:2]
    assert header.split()[:2] == ["WORKER", "IDENTITY"]
    assert first.split()[:3] == ["1", "spiffe://cluster.local/ns/default/sa/legacy", "1a"]


def test_cli_status_has_one_line_for_the_workers(node: NodeThread) -> None:
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    # the main process's and worker 1's (worker 2 is down)
    assert "running, 6 listeners, 2 connections" in result.output
    lines = [line.strip() for line in result.output.splitlines() if "proxy workers" in line]
    assert lines == ["proxy workers: 1 of 2 up (pids 4241), 3 restarts; worker 2 down (last exit: exit 1)"]
