"""HbonePool without sockets: stream limit, idle release, dropping failed connections."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import HboneClient, StreamLimitReached, StreamRefused, TunnelError
from api.spiffe import SpiffeId

KEY = PoolKey(
    SpiffeId.for_workload("td", "a", "src"), SpiffeId.for_workload("td", "b", "dst"), ("10.0.0.2", 15008)
)


@dataclass
class FakeStream:
    _response: asyncio.Future[int]
    stream_id: int = 1


@dataclass
class FakeClient:
    """Stands in for HboneClient: the same capacity accounting, no I/O."""

    limit: int
    streams: list[FakeStream] = field(default_factory=list)
    usable: bool = True
    closed_calls: int = 0
    close_gate: asyncio.Event | None = None  # close() waits for it (GOAWAY flushed, TLS shut down)
    refuse: bool = False  # a GOAWAY arrives after its first CONNECT: the stream is above its last ID

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    @property
    def available_streams(self) -> int:
        return max(0, self.limit - len(self.streams)) if self.usable else 0

    def start_stream(self, target: Any, source: Any = None, *, traceparent: str | None = None) -> FakeStream:
        if self.available_streams <= 0:
            raise StreamLimitReached("full")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.refuse:  # as _H2Protocol on the GOAWAY: draining, the stream refused
            self.usable = False
            fut.set_exception(StreamRefused("connection GOAWAY code=0 last=0"))
        else:
            fut.set_result(200)
        stream = FakeStream(fut)
        self.streams.append(stream)
        return stream

    async def close(self) -> None:
        self.closed_calls += 1
        self.usable = False  # as HboneClient: draining from the start of close()
        if self.close_gate is not None:
            await self.close_gate.wait()


@dataclass
class Dialer:
    limit: int = 3
    made: list[FakeClient] = field(default_factory=list)
    gate: asyncio.Event | None = None  # a dial waits for it (a handshake under way)
    close_gate: asyncio.Event | None = None  # given to the clients it makes
    refusing: int = 0  # the first this many clients it makes get GOAWAY after their first CONNECT

    async def __call__(self, key: PoolKey) -> HboneClient:
        await asyncio.sleep(0)  # let concurrent callers pile up on the pool's lock
        if self.gate is not None:
            await self.gate.wait()
        client = FakeClient(self.limit, close_gate=self.close_gate, refuse=len(self.made) < self.refusing)
        self.made.append(client)
        return cast(HboneClient, client)


async def test_concurrent_streams_fill_a_connection_before_dialling_another() -> None:
    dial = Dialer(limit=3)
    pool = HbonePool(dial)
    await asyncio.gather(*(pool.open_stream(KEY, ("10.0.0.2", 80)) for _ in range(7)))
    assert [c.active_streams for c in dial.made] == [3, 3, 1]
    assert pool.connection_count(KEY) == 3


async def test_failed_connection_is_not_reused() -> None:
    dial = Dialer(limit=10)
    pool = HbonePool(dial)
    await pool.open_stream(KEY, ("10.0.0.2", 80))
    dial.made[0].usable = False  # GOAWAY or connection error
    await pool.open_stream(KEY, ("10.0.0.2", 80))
    assert len(dial.made) == 2
    assert pool.connection_count(KEY) == 1


async def test_idle_connection_is_released_after_the_timeout() -> None:
    now = [0.0]
    dial = Dialer(limit=10)
    pool = HbonePool(dial, idle_timeout=300, clock=lambda: now[0])
    await pool.open_stream(KEY, ("10.0.0.2", 80))
    client = dial.made[0]
    assert await pool.reap() == 0  # busy
    client.streams.clear()
    assert await pool.reap() == 0  # idle clock starts
    now[0] = 299
    assert await pool.reap() == 0
    now[0] = 300
    assert await pool.reap() == 1
    assert client.closed_calls == 1
    assert pool.connection_count(KEY) == 0


@pytest.mark.parametrize("keys", [2, 5])
async def test_keys_do_not_share_connections(keys: int) -> None:
    dial = Dialer(limit=100)
    pool = HbonePool(dial)
    for i in range(keys):
        await pool.open_stream(
            PoolKey(KEY.src_identity, KEY.dst_identity, (f"10.0.0.{i + 1}", 15008)), ("x", 1)
        )
    assert len(dial.made) == keys


async def idle_for_reaping(pool: HbonePool, dial: Dialer, now: list[float]) -> FakeClient:
    """One connection for KEY, idle for the pool's whole idle timeout (300 s) at the next reap."""
    await pool.open_stream(KEY, ("10.0.0.2", 80))
    client = dial.made[-1]
    client.streams.clear()
    assert await pool.reap() == 0  # the idle clock starts
    now[0] += 300
    return client


async def test_a_connection_added_while_the_reaper_closes_an_idle_one_stays_pooled() -> None:
    now = [0.0]
    dial = Dialer(limit=10, close_gate=asyncio.Event())
    pool = HbonePool(dial, idle_timeout=300, clock=lambda: now[0])
    idle = await idle_for_reaping(pool, dial, now)
    reaper = asyncio.create_task(pool.reap())
    await asyncio.sleep(0)  # the reaper waits in the idle connection's close()
    assert idle.closed_calls == 1
    await pool.open_stream(KEY, ("10.0.0.2", 81))  # a new connection meanwhile
    assert dial.close_gate is not None
    dial.close_gate.set()
    assert await reaper == 1
    assert pool.connection_count(KEY) == 1  # the new one is still pooled, and reused:
    await pool.open_stream(KEY, ("10.0.0.2", 82))
    assert len(dial.made) == 2 and dial.made[1].active_streams == 2


async def test_closing_the_pool_while_the_reaper_closes_a_connection_closes_every_other() -> None:
    """close() must not iterate the pool's slots across awaits: the reaper removes emptied ones."""
    now = [0.0]
    dial = Dialer(limit=10, close_gate=asyncio.Event())
    pool = HbonePool(dial, idle_timeout=300, clock=lambda: now[0])
    other = PoolKey(SpiffeId.for_workload("td", "a", "src2"), KEY.dst_identity, KEY.dst_addr)
    await pool.open_stream(other, ("10.0.0.2", 80))
    busy = dial.made[-1]  # still carrying its stream
    await idle_for_reaping(pool, dial, now)
    reaper = asyncio.create_task(pool.reap())
    await asyncio.sleep(0)  # the reaper waits in the idle connection's close()
    closing = asyncio.create_task(pool.close())
    await asyncio.sleep(0)
    assert dial.close_gate is not None
    dial.close_gate.set()
    await asyncio.wait_for(asyncio.gather(reaper, closing), 1)
    assert busy.closed_calls == 1
    assert all(not c.usable for c in dial.made)


async def test_a_connection_dialled_while_the_pool_closes_is_closed_too() -> None:
    """Outbound.close_pool (the pod was removed) while a handler of the pod is still dialling (TLS
    handshake, source certificate): the new connection, with its keepalive, would be out of every
    pool and never closed. It is closed and the stream fails with TunnelError (a deny record)."""
    dial = Dialer(gate=asyncio.Event())
    pool = HbonePool(dial)
    opener = asyncio.create_task(pool.open_stream(KEY, ("10.0.0.2", 80)))
    await asyncio.sleep(0)
    await pool.close()  # the pod goes away
    assert dial.gate is not None
    dial.gate.set()
    with pytest.raises(TunnelError, match="pool closed"):
        await opener
    assert len(dial.made) == 1 and dial.made[0].closed_calls == 1
    with pytest.raises(TunnelError, match="pool closed"):
        await pool.open_stream(KEY, ("10.0.0.2", 80))  # a later one does not dial at all
    assert len(dial.made) == 1


async def test_a_connect_a_goaway_refused_is_sent_again_on_a_new_connection() -> None:
    """The peer's agent stops (GOAWAY) while a CONNECT is on its way: the stream is above the
    GOAWAY's last stream ID, never processed, so the pool sends it again on a new connection
    (RFC 9113 §8.7) instead of failing the caller's connection."""
    dial = Dialer(refusing=1)
    pool = HbonePool(dial)
    stream = await pool.open_stream(KEY, ("10.0.0.2", 80))
    assert len(dial.made) == 2 and stream is dial.made[1].streams[0]
    assert pool.connection_count(KEY) == 1


async def test_a_connect_refused_twice_fails() -> None:
    dial = Dialer(refusing=2)
    pool = HbonePool(dial)
    with pytest.raises(StreamRefused):
        await pool.open_stream(KEY, ("10.0.0.2", 80))
    assert len(dial.made) == 2  # one retry, not a loop


async def test_closing_the_pool_closes_its_connections_at_once() -> None:
    """A stopping proxy closes its pools: each connection's close (GOAWAY, close_notify, then up to
    the linger for a silent peer) runs alongside the others, not after them."""
    dial = Dialer(limit=1, close_gate=asyncio.Event())
    pool = HbonePool(dial)
    for port in (80, 81, 82):
        await pool.open_stream(KEY, ("10.0.0.2", port))
    assert len(dial.made) == 3
    closing = asyncio.create_task(pool.close())
    for _ in range(3):  # pool.close, then the closes it started
        await asyncio.sleep(0)
    assert [c.closed_calls for c in dial.made] == [1, 1, 1]
    assert not closing.done()
    assert dial.close_gate is not None
    dial.close_gate.set()
    await asyncio.wait_for(closing, 1)
