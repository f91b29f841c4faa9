"""HbonePool without sockets: stream limit, idle release, dropping failed connections."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import HboneClient, StreamLimitReached
from api.spiffe import SpiffeId

KEY = PoolKey(
    SpiffeId.for_workload("td", "a", "src"), SpiffeId.for_workload("td", "b", "dst"), ("10.0.0.2", 15008)
)


@dataclass
class FakeStream:
    _response: asyncio.Future[int]


@dataclass
class FakeClient:
    """Stands in for HboneClient: the same capacity accounting, no I/O."""

    limit: int
    streams: list[FakeStream] = field(default_factory=list)
    usable: bool = True
    closed_calls: int = 0

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
        fut.set_result(200)
        stream = FakeStream(fut)
        self.streams.append(stream)
        return stream

    async def close(self) -> None:
        self.closed_calls += 1
        self.usable = False


@dataclass
class Dialer:
    limit: int = 3
    made: list[FakeClient] = field(default_factory=list)

    async def __call__(self, key: PoolKey) -> HboneClient:
        await asyncio.sleep(0)  # let concurrent callers pile up on the pool's lock
        client = FakeClient(self.limit)
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
