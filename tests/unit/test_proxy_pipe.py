"""splice() with in-memory ends, and the inbound side's certificate choice, without sockets."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any, cast

from agent.datapath.interface import EnrolledPod, PodRef
from agent.identity import CertificateManager
from agent.node import pod_key
from agent.proxy.conns import ConnTracker
from agent.proxy.core import ProxyCore
from agent.proxy.flows import FlowLog
from agent.proxy.hbone import canonical_ip
from agent.proxy.inbound import Inbound
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.pipe import CHUNK, HIGH_WATER, SocketEnd, splice
from api.resources import Workload
from api.spiffe import SpiffeId


class FakeEnd:
    """Reads from a script; records writes, EOF and how it was torn down."""

    def __init__(self, chunks: list[bytes | Exception], *, hold: bool = False) -> None:
        self.script: deque[bytes | Exception] = deque(chunks)
        self.hold = hold  # after the script: wait until closed instead of EOF
        self.written = bytearray()
        self.eof = False
        self.closed = False
        self.finished = False
        self._closed = asyncio.Event()

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        if self.script:
            item = self.script.popleft()
            if isinstance(item, Exception):
                raise item
            return item
        if self.hold:
            await self._closed.wait()
        return b""

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("closed")
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True
        self._closed.set()

    def finish(self) -> None:
        self.finished = True


async def test_copies_both_ways_and_forwards_half_close() -> None:
    client, upstream = FakeEnd([b"abc", b"de"]), FakeEnd([b"12345678"])
    up: list[int] = []
    down: list[int] = []
    assert await splice(client, upstream, up.append, down.append) == ""
    assert (bytes(upstream.written), bytes(client.written)) == (b"abcde", b"12345678")
    assert (up, down) == ([3, 2], [8])
    assert client.eof and upstream.eof and client.finished and upstream.finished
    assert not client.closed and not upstream.closed


async def test_an_error_on_one_side_tears_down_both() -> None:
    client = FakeEnd([b"x"], hold=True)  # the client would wait forever
    upstream = FakeEnd([ConnectionResetError("peer reset")])
    error = await asyncio.wait_for(splice(client, upstream, lambda n: None, lambda n: None), 2)
    assert "upstream->client" in error and "peer reset" in error
    assert client.closed and upstream.closed


async def test_killing_the_ends_ends_the_splice() -> None:
    client, upstream = FakeEnd([], hold=True), FakeEnd([], hold=True)
    task = asyncio.create_task(splice(client, upstream, lambda n: None, lambda n: None))
    await asyncio.sleep(0.01)
    assert not task.done()
    client.close()
    upstream.close()
    await asyncio.wait_for(task, 2)


# --- certificate choice on 15008 --------------------------------------------------------------------

TD = "cluster.local"
B = Workload("back/b", "b", "back", "sa-b", "n1", ("10.2.0.1",))
OTHER = Workload("back/o", "o", "back", "sa-o", "n9", ("10.2.0.9",))


class Certs:
    """`certificate` from a set; `wait_ready` until `arrive` adds one (KeyError: not managed)."""

    def __init__(self, have: set[SpiffeId], managed: set[SpiffeId] | None = None) -> None:
        self.have = have
        self.managed = set(have) if managed is None else managed
        self.asked: list[SpiffeId] = []
        self.changed = asyncio.Event()

    def certificate(self, identity: SpiffeId) -> Any:
        self.asked.append(identity)
        return object() if identity in self.have else None

    async def wait_ready(self, identity: SpiffeId) -> Any:
        while True:
            if identity not in self.managed:
                raise KeyError(identity)
            if identity in self.have:
                return object()
            self.changed.clear()
            await self.changed.wait()

    def arrive(self, identity: SpiffeId) -> None:
        self.have.add(identity)
        self.changed.set()


def core_with(certs: Certs, cert_wait: float = 5.0) -> tuple[ProxyCore, list[tuple[Any, ...]]]:
    made: list[tuple[Any, ...]] = []
    core = ProxyCore(
        datapath=cast(Any, None),
        certs=cast(CertificateManager, certs),
        bundle=lambda: b"bundle",
        index=MeshIndex(node="n1", trust_domain=TD, workloads=(B, OTHER)),
        tracker=ConnTracker(FlowLog()),
        metrics=ProxyMetrics(),
        hbone_port=15008,
        cert_wait=cert_wait,
    )
    core.add_pod(EnrolledPod(PodRef(pod_key(B.uid), "/nonexistent", "10.2.0.1"), 1, 0))  # as enrolled

    def fake_context(identity: SpiffeId, cert: Any) -> Any:
        made.append((identity, cert))
        return ("ctx", identity)

    core._context = lambda cache, identity, cert, make: fake_context(identity, cert)  # type: ignore[method-assign]
    return core, made


B_ID = SpiffeId.for_workload(TD, "back", "sa-b")


def test_the_certificate_is_chosen_by_the_local_ip() -> None:
    certs = Certs({B_ID})
    core, _ = core_with(certs)
    inbound = Inbound(core)
    assert asyncio.run(inbound.pick_identity(canonical_ip("10.2.0.1"))) == ("ctx", B_ID)
    assert certs.asked == [B_ID]
    # a known workload that this proxy does not serve, and an unknown IP: no certificate, refused
    assert asyncio.run(inbound.pick_identity(canonical_ip("10.2.0.9"))) is None
    assert asyncio.run(inbound.pick_identity(canonical_ip("10.7.7.7"))) is None
    assert certs.asked == [B_ID]


def test_a_first_certificate_signed_meanwhile_is_waited_for() -> None:
    certs = Certs(set(), managed={B_ID})
    core, made = core_with(certs)

    async def scenario() -> Any:
        pick = asyncio.ensure_future(Inbound(core).pick_identity(canonical_ip("10.2.0.1")))
        await asyncio.sleep(0.05)
        assert not pick.done()  # waiting, not refused
        certs.arrive(B_ID)
        return await asyncio.wait_for(pick, 1)

    assert asyncio.run(scenario()) == ("ctx", B_ID)
    assert len(made) == 1


def test_no_certificate_in_time_refuses_the_handshake() -> None:
    core, made = core_with(Certs(set(), managed={B_ID}), cert_wait=0.05)
    assert asyncio.run(Inbound(core).pick_identity(canonical_ip("10.2.0.1"))) is None
    core, made = core_with(Certs(set(), managed=set()))  # not managed on this node: no wait at all
    assert asyncio.run(asyncio.wait_for(Inbound(core).pick_identity(canonical_ip("10.2.0.1")), 1)) is None
    assert made == []


# --- SocketEnd over a real (local) socket pair ---------------------------------------------------------


async def socket_end_pair() -> tuple[SocketEnd, socket.socket]:
    ours, theirs = socket.socketpair()
    _, end = await asyncio.get_running_loop().connect_accepted_socket(SocketEnd, ours)
    theirs.setblocking(False)
    return end, theirs


async def test_socket_end_reads_what_was_sent_then_eof_and_can_still_write() -> None:
    end, peer = await socket_end_pair()
    loop = asyncio.get_running_loop()
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers and HIGH_WATER hold

    async def send() -> None:
        await loop.sock_sendall(peer, payload)
        peer.shutdown(socket.SHUT_WR)

    sender = asyncio.create_task(send())
    got = bytearray()
    while data := await asyncio.wait_for(end.read(), 2):
        assert len(data) <= CHUNK
        got += data
    await asyncio.wait_for(sender, 2)
    assert bytes(got) == payload
    await end.write(b"after half-close")  # the other direction stays open
    end.write_eof()
    assert await asyncio.wait_for(loop.sock_recv(peer, 100), 2) == b"after half-close"
    assert await asyncio.wait_for(loop.sock_recv(peer, 100), 2) == b""
    end.finish()
    peer.close()


async def test_socket_end_stops_reading_at_the_high_water_mark() -> None:
    end, peer = await socket_end_pair()
    loop = asyncio.get_running_loop()
    total = 16 * 1024 * 1024
    sender = asyncio.create_task(loop.sock_sendall(peer, bytes(total)))
    await asyncio.sleep(0.3)
    # nobody reads `end`: it stops reading at HIGH_WATER, the kernel buffers fill, the sender stalls
    assert not sender.done()
    assert end._paused
    assert HIGH_WATER <= end._buffered < HIGH_WATER + 256 * 1024
    got = 0
    while got < total:
        got += len(await asyncio.wait_for(end.read(), 2))
    await asyncio.wait_for(sender, 2)
    assert got == total and not end._paused
    end.close()
    peer.close()


async def test_socket_end_write_waits_for_a_slow_reader() -> None:
    end, peer = await socket_end_pair()
    loop = asyncio.get_running_loop()
    chunk = bytes(1024 * 1024)
    writes = asyncio.create_task(asyncio.wait_for(_write_many(end, chunk, 64), 10))
    await asyncio.sleep(0.1)
    assert not writes.done()  # 64 MiB do not fit the socket buffers: write() waits for the reader
    assert end.transport is not None and end.transport.get_write_buffer_size() <= 2 * len(chunk)
    got = 0
    while got < 64 * len(chunk):
        got += len(await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 2))
    await writes
    end.close()
    peer.close()


async def _write_many(end: SocketEnd, chunk: bytes, n: int) -> None:
    for _ in range(n):
        await end.write(chunk)


async def test_a_closed_socket_end_ends_a_pending_read() -> None:
    end, peer = await socket_end_pair()
    reader = asyncio.create_task(end.read())
    await asyncio.sleep(0)
    end.close()
    assert await asyncio.wait_for(reader, 2) == b""
    peer.close()


# --- the direct path (a receive callback hands bytes straight to the other end) ---------------------


class NibblingEnd(FakeEnd):
    """Takes at most `bite` bytes per write_nowait (like a small HTTP/2 window), the rest via write()."""

    def __init__(self, bite: int) -> None:
        super().__init__([], hold=True)
        self.bite = bite
        self.direct = 0

    def write_nowait(self, data: bytes) -> int:
        taken = data[: self.bite]
        self.written += taken
        self.direct += len(taken)
        return len(taken)


async def test_direct_path_keeps_order_when_the_other_end_takes_part_of_each_chunk() -> None:
    end, peer = await socket_end_pair()
    loop = asyncio.get_running_loop()
    dst = NibblingEnd(bite=7)
    counted: list[int] = []
    copy = asyncio.create_task(splice(end, dst, counted.append, lambda n: None))
    payload = b"".join(b"%06d|" % i for i in range(40_000))  # 280 kB, every position distinct
    for i in range(0, len(payload), 1000):
        await loop.sock_sendall(peer, payload[i : i + 1000])
        if i % 10_000 == 0:
            await asyncio.sleep(0.001)  # let the copying task go back to waiting: direct path again
    peer.shutdown(socket.SHUT_WR)
    for _ in range(200):
        if dst.eof:
            break
        await asyncio.sleep(0.01)
    assert bytes(dst.written) == payload
    assert sum(counted) == len(payload)
    assert dst.direct > 0  # some bytes did take the direct path
    dst.close()
    await asyncio.wait_for(copy, 2)
    peer.close()


async def test_direct_path_between_real_sockets_carries_everything_both_ways() -> None:
    a, a_peer = await socket_end_pair()
    b, b_peer = await socket_end_pair()
    loop = asyncio.get_running_loop()
    up: list[int] = []
    down: list[int] = []
    spliced = asyncio.create_task(splice(a, b, up.append, down.append))
    one_way = bytes(range(256)) * 8192  # 2 MiB each way, more than HIGH_WATER and the socket buffers

    async def send(sock: socket.socket) -> None:
        await loop.sock_sendall(sock, one_way)
        sock.shutdown(socket.SHUT_WR)

    async def receive(sock: socket.socket) -> bytes:
        got = bytearray()
        while data := await loop.sock_recv(sock, 1 << 16):
            got += data
        return bytes(got)

    results = await asyncio.wait_for(
        asyncio.gather(send(a_peer), send(b_peer), receive(a_peer), receive(b_peer)), 10
    )
    assert results[2] == one_way and results[3] == one_way
    assert await asyncio.wait_for(spliced, 2) == ""
    assert sum(up) == sum(down) == len(one_way)
    a_peer.close()
    b_peer.close()
