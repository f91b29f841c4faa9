"""Copying bytes both ways between two ends of a proxied connection, with bounded buffers.

An end is either a TCP socket (`SocketEnd`, an asyncio protocol) or an HBONE CONNECT stream
(`StreamEnd`). `splice` copies until both directions reached end of stream (half-closes are
forwarded), or until either fails, in which case both ends are torn down. Backpressure: a chunk is
written and drained (socket buffer, or HTTP/2 window) before the next read, so at most one chunk
plus the transports' own bounded buffers are held per direction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Protocol, cast

from agent.proxy.tunnel import Stream, TunnelError

log = logging.getLogger(__name__)

Addr = tuple[str, int]

CHUNK = 256 * 1024  # most bytes handed over per read (an HBONE stream gives whole DATA frames, <= 1 MiB)
HIGH_WATER = 2 * CHUNK  # a socket stops reading while this much waits to be read

# takes what it can of a received chunk now; returns how many bytes
Sink = Callable[[bytes | memoryview], int]


class End(Protocol):
    """One side of a proxied connection."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None:
        """Tear down now (reset / abort); idempotent."""

    def finish(self) -> None:
        """Release after both directions ended normally."""


class SocketEnd(asyncio.Protocol):
    """A TCP connection as an asyncio protocol: received chunks are handed over as they came (no
    StreamReader, which copies every byte in and out of its buffer), reading pauses while `HIGH_WATER`
    bytes wait to be read, and `write` waits for the transport's buffer to drain."""

    __slots__ = (
        "_buffered", "_can_write", "_chunks", "_eof", "_error", "_loop", "_on_made", "_paused", "_sink",
        "_waiter", "transport",
    )  # fmt: skip

    def __init__(self, on_made: Callable[[SocketEnd], object] | None = None) -> None:
        """`on_made(end)` runs once connected (a listener starts its handler there)."""
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None  # set while the transport is paused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: Sink | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # once: get_running_loop() costs a getpid(2) per call (asyncio's fork check)
        self._loop = asyncio.get_running_loop()
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._sink is not None and self._waiter is not None and not self._chunks:
            # the copying task waits in read() with nothing queued: pass it on right here
            taken = self._sink(data)
            if taken == len(data):
                return
            data = data[taken:]  # the rest waits for the task (window or buffer full)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open for writing: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()
        waiter, self._can_write = self._can_write, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None:
            self._can_write = (self._loop or asyncio.get_running_loop()).create_future()

    def resume_writing(self) -> None:
        waiter, self._can_write = self._can_write, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- End --
    @property
    def peername(self) -> Addr | None:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return (peer[0], peer[1]) if peer else None

    @property
    def sockname(self) -> Addr | None:
        local = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return (local[0], local[1]) if local else None

    async def read(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise ConnectionResetError(f"socket failed: {self._error!r}") from self._error
                return b""
            self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
            await self._waiter
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 or len(chunks[0]) >= CHUNK else self._take()
        self._buffered -= len(data)
        if self._paused and self._buffered < HIGH_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _take(self) -> bytes:
        """Small chunks queued together: up to CHUNK bytes of them as one."""
        parts: list[bytes] = []
        size = 0
        while self._chunks and size + len(self._chunks[0]) <= CHUNK:
            part = self._chunks.popleft()
            parts.append(part)
            size += len(part)
        return b"".join(parts) if parts else self._chunks.popleft()

    def set_sink(self, sink: Sink | None) -> None:
        self._sink = sink

    def write_nowait(self, data: bytes | memoryview) -> int:
        """Write all of `data` if the transport takes it without waiting, else nothing (0)."""
        transport = self.transport
        if transport is None or self._can_write is not None or transport.is_closing():
            return 0
        transport.write(data)
        return len(data)

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("socket closed")
        transport.write(data)
        if self._can_write is not None:
            await self._can_write

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
        # a pending read() must end too: abort() reports connection_lost only on the next loop turn
        self._chunks.clear()
        self._eof = True
        self._wake()

    def finish(self) -> None:
        if self.transport is not None:
            self.transport.close()


class StreamEnd:
    """An HBONE CONNECT stream (either side)."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def read(self) -> bytes:
        # a whole DATA frame as received: splitting it would copy; the stream window bounds it anyway
        return await self.stream.read()

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    def set_sink(self, sink: Sink | None) -> None:
        self.stream.set_sink(sink)

    def on_failure(self, callback: Callable[[BaseException], None] | None) -> None:
        self.stream.on_failure(callback)

    def write_nowait(self, data: bytes | memoryview) -> int:
        return self.stream.write_nowait(data)

    def write_eof(self) -> None:
        self.stream.write_eof()

    def close(self) -> None:
        self.stream.close()

    def finish(self) -> None:
        """END_STREAM went both ways: nothing left to tear down."""


Counter = Callable[[int], None]


async def _copy(src: End, dst: End, count: Counter) -> None:
    """Read `src`, write `dst`, then forward the end of stream.

    Direct path: when both ends support it, `src` hands what it receives straight to `dst` from its
    receive callback while this task waits in `read()` with nothing queued, as far as `dst` takes it
    without waiting (`write_nowait`); what is left is queued and comes through `read()` in order, with
    backpressure as before. That saves a task wake-up per chunk and crossing.
    """
    set_sink = getattr(src, "set_sink", None)
    write_nowait = getattr(dst, "write_nowait", None)
    if set_sink is not None and write_nowait is not None:

        def sink(data: bytes | memoryview) -> int:
            try:
                taken: int = write_nowait(data)
            except Exception:  # leave it to the task's write(), which reports the failure
                return 0
            if taken:
                count(taken)
            return taken

        set_sink(sink)
    try:
        while data := await src.read():
            await dst.write(data)
            count(len(data))
    finally:
        if set_sink is not None:
            set_sink(None)
    dst.write_eof()


async def splice(client: End, upstream: End, up: Counter, down: Counter) -> str:
    """Copy client→upstream (counted by `up`) and upstream→client (`down`) until both end.

    Returns "" after a clean close, else a short reason (the first error). Both ends are closed
    when it returns; it never raises for I/O errors.
    """
    error = ""

    async def direction(src: End, dst: End, count: Counter, name: str) -> None:
        nonlocal error
        try:
            await _copy(src, dst, count)
        except (ConnectionError, OSError, TunnelError, asyncio.IncompleteReadError) as exc:
            if not error:
                error = f"{name}: {exc!r}"
            client.close()
            upstream.close()

    def failed(name: str, exc: BaseException) -> None:
        # an HBONE stream failed on its own (reset, its connection gone or cut off) while neither
        # copy was reading it, e.g. one waiting for an app that does not read: end both now, as a
        # copy that saw it would, rather than whenever that app reads or writes again
        nonlocal error
        if not error:
            error = f"{name}: {exc!r}"
        client.close()
        upstream.close()

    watched: list[Callable[[Callable[[BaseException], None] | None], None]] = []
    for end, name in ((client, "client"), (upstream, "upstream")):
        watch = getattr(end, "on_failure", None)
        if watch is not None:
            watch(functools.partial(failed, name))
            watched.append(watch)
    clean = False
    # one direction in a new task, the other in this one (not gather: a task and a future fewer)
    other = asyncio.get_running_loop().create_task(direction(upstream, client, down, "upstream->client"))
    try:
        await direction(client, upstream, up, "client->upstream")
        await other
        clean = not error
    finally:
        for watch in watched:
            watch(None)
        if not other.done():  # cancelled: take the other direction down too
            other.cancel()
        for end in (client, upstream):
            if clean:
                end.finish()
            else:
                end.close()
    return error
