"""Copying bytes both ways between two ends of a proxied connection, with bounded buffers.

An end is either a TCP socket (`SocketEnd`, asyncio streams) or an HBONE CONNECT stream
(`StreamEnd`). `splice` copies until both directions reached end of stream (half-closes are
forwarded), or until either fails, in which case both ends are torn down. Backpressure: a chunk is
written and drained (socket buffer, or HTTP/2 window) before the next read, so at most one chunk
plus the transports' own bounded buffers are held per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from agent.proxy.tunnel import Stream, TunnelError

log = logging.getLogger(__name__)

CHUNK = 64 * 1024  # bytes read per call; also the StreamReader limit of proxied sockets


class End(Protocol):
    """One side of a proxied connection."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None:
        """Tear down now (reset / abort); idempotent."""

    def finish(self) -> None:
        """Release after both directions ended normally."""


class SocketEnd:
    """A TCP connection as asyncio streams."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> None:
        if not self.writer.transport.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()

    def close(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()
        # a pending read() must end too: abort() reports connection_lost only on the next loop turn
        self.reader.feed_eof()

    def finish(self) -> None:
        self.writer.close()


class StreamEnd:
    """An HBONE CONNECT stream (either side)."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def read(self) -> bytes:
        return await self.stream.read(CHUNK)

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    def write_eof(self) -> None:
        self.stream.write_eof()

    def close(self) -> None:
        self.stream.close()

    def finish(self) -> None:
        """END_STREAM went both ways: nothing left to tear down."""


Counter = Callable[[int], None]


async def _copy(src: End, dst: End, count: Counter) -> None:
    while data := await src.read():
        await dst.write(data)
        count(len(data))
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

    clean = False
    try:
        await asyncio.gather(
            direction(client, upstream, up, "client->upstream"),
            direction(upstream, client, down, "upstream->client"),
        )
        clean = not error
    finally:
        for end in (client, upstream):
            if clean:
                end.finish()
            else:
                end.close()
    return error
