"""A pool of HBONE connections keyed by (source identity, destination identity, destination address).

Streams share a connection up to its stream limit (100 by default), then a new connection is dialled;
a connection without streams for `idle_timeout` is closed, and a failed or draining one is dropped.
Connection setup for one key is serialised, so a burst of new streams fills one connection before the
next is made (as ztunnel's pool does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.proxy.hbone import IpAddress
from agent.proxy.tunnel import HboneClient, Stream, StreamRefused, TunnelError, accepted
from api.spiffe import SpiffeId

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0
# how long a CONNECT may wait for its answer: twice the server's default dial timeout to the app
# (agent.proxy.core.CONNECT_TIMEOUT, after which it answers 503), so only a stuck or hostile server
# runs into it
ANSWER_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Which connections may carry a stream: same source and destination identities, same address."""

    src_identity: SpiffeId
    dst_identity: SpiffeId
    dst_addr: tuple[str, int]


@dataclass(slots=True)
class _Entry:
    client: HboneClient
    idle_since: float | None = None


@dataclass(slots=True)
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    entries: list[_Entry] = field(default_factory=list)


Dialer = Callable[[PoolKey], Awaitable[HboneClient]]


class HbonePool:
    """Shares HBONE connections between streams; `open_stream` is the only call the proxy needs."""

    def __init__(
        self,
        dial: Dialer,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        answer_timeout: float = ANSWER_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dial = dial
        self._idle_timeout = idle_timeout
        self._answer_timeout = answer_timeout
        self._clock = clock
        self._slots: dict[PoolKey, _Slot] = {}
        self._closed = False

    def connection_count(self, key: PoolKey) -> int:
        slot = self._slots.get(key)
        return 0 if slot is None else sum(1 for e in slot.entries if e.client.usable)

    async def open_stream(
        self,
        key: PoolKey,
        target: tuple[str | IpAddress, int],
        source: tuple[str | IpAddress, int] | None = None,
        *,
        traceparent: str | None = None,
    ) -> Stream:
        """A CONNECT stream to `target` over a pooled connection; HboneError unless answered 200,
        TunnelError when the pool is (or gets) closed.

        A CONNECT the peer's GOAWAY shows it never processed (StreamRefused: sent while the GOAWAY
        was on its way, as when the peer's agent stops) is sent once more, on another connection:
        the GOAWAY made its own connection unusable (RFC 9113 §8.7: such a request is safe to retry)."""
        stream = await self._start(key, target, source, traceparent)
        try:
            await accepted(stream, self._answer_timeout)
        except StreamRefused as exc:
            log.info("event=hbone_pool_retry key=%s stream=%d error=%r", key, stream.stream_id, exc)
            stream = await self._start(key, target, source, traceparent)
            await accepted(stream, self._answer_timeout)
        return stream

    async def _start(
        self,
        key: PoolKey,
        target: tuple[str | IpAddress, int],
        source: tuple[str | IpAddress, int] | None,
        traceparent: str | None,
    ) -> Stream:
        """Send the CONNECT on a usable connection of `key` with a free slot, dialling one if none."""
        if self._closed:
            raise TunnelError("pool closed")
        slot = self._slots.setdefault(key, _Slot())
        async with slot.lock:
            if self._closed:  # closed while this waited for the lock
                raise TunnelError("pool closed")
            self._prune(slot)
            entry = next((e for e in slot.entries if e.client.available_streams > 0), None)
            if entry is None:
                client = await self._dial(key)
                if self._closed or self._slots.get(key) is not slot:
                    # the pool closed during the dial: nothing would ever close this connection
                    # (its keepalive would keep it open for ever)
                    await client.close()
                    raise TunnelError("pool closed")
                entry = _Entry(client)
                slot.entries.append(entry)
                log.info("event=hbone_pool_connect key=%s connections=%d", key, len(slot.entries))
            # taken synchronously, under the lock: the next waiter sees this slot as used
            stream = entry.client.start_stream(target, source, traceparent=traceparent)
            entry.idle_since = None
        return stream

    @staticmethod
    def _prune(slot: _Slot) -> None:
        slot.entries = [e for e in slot.entries if e.client.usable]

    async def reap(self) -> int:
        """Close connections idle for `idle_timeout` and forget dead ones; returns how many were closed."""
        now = self._clock()
        idle: list[_Entry] = []
        # slots are updated before any await: a connection open_stream adds while an idle one is
        # being closed stays in its slot, and the slot stays in the pool
        for key, slot in list(self._slots.items()):
            keep: list[_Entry] = []
            for entry in slot.entries:
                if not entry.client.usable:
                    continue
                if entry.client.active_streams:
                    entry.idle_since = None
                elif entry.idle_since is None:
                    entry.idle_since = now
                elif now - entry.idle_since >= self._idle_timeout:
                    idle.append(entry)
                    continue
                keep.append(entry)
            slot.entries = keep
            if not keep and not slot.lock.locked():
                del self._slots[key]
        for entry in idle:
            await entry.client.close()
        return len(idle)

    async def run_reaper(self, interval: float = 30.0) -> None:
        """Reap forever (run as a task; cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            await self.reap()

    async def close(self) -> None:
        """Close every pooled connection; later (and in-flight) `open_stream` calls fail."""
        self._closed = True
        # detached before any await: a reap (or open_stream) running meanwhile cannot change what
        # is iterated, and a dial in flight sees its slot gone
        slots, self._slots = list(self._slots.values()), {}
        entries = [e for slot in slots for e in slot.entries]
        for slot in slots:
            slot.entries = []
        # each close sends GOAWAY (NO_ERROR) and close_notify, then waits for the peer's end of the
        # connection (up to tls_transport's linger): all at once, so a stopping proxy with many
        # connections to peers gone silent does not wait for them one after the other
        await asyncio.gather(*(e.client.close() for e in entries))
