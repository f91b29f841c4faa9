"""The admin API's client side in the agent: one GET over a Unix socket, within a deadline.

The main agent process reads its proxy workers' admin sockets with it (agent/workers.py): `get`
(asyncio, for the admin server's routes), `stream_lines` (asyncio, the newline-delimited JSON of
`/v1/flows?follow=1`) and `get_blocking` (for the metrics collector, which runs on a scrape thread,
never on the event loop). Responses are parsed by httptools, as the server parses requests, and their
size is capped: a worker that answers too slowly, too much or nonsense costs a `PeerError`, nothing
more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httptools

MAX_BODY = 64 * 1024 * 1024  # a worker's /metrics or /v1/connections; far above what 10,000 connections take
MAX_LINE = 1024 * 1024  # one line of a stream
READ_SIZE = 65536


class PeerError(Exception):
    """A worker's admin socket gave no usable answer: refused, timed out, not 200, too large, bad JSON."""


def _request(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: nodemesh-agent\r\nConnection: close\r\n\r\n".encode("ascii")


class _Response:
    """httptools callbacks: status, body (de-chunked) and whether the answer is complete."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.body = bytearray()
        self._parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise PeerError(f"bad HTTP answer: {exc}") from None
        except httptools.HttpParserUpgrade:  # not an HttpParserError: a 101 or an answer to CONNECT
            raise PeerError("bad HTTP answer: it switches protocols") from None
        if len(self.body) > self.limit:
            raise PeerError(f"answer larger than {self.limit} bytes")

    def result(self) -> bytes:
        if self.status != 200:
            raise PeerError(f"answered {self.status}: {error_message(bytes(self.body))}")
        return bytes(self.body)

    def take_lines(self) -> list[bytes]:
        """The complete lines received so far (without their newline); the rest stays buffered."""
        end = self.body.rfind(b"\n")
        if end < 0:
            if len(self.body) > MAX_LINE:
                raise PeerError(f"a line longer than {MAX_LINE} bytes")
            return []
        lines = bytes(self.body[:end]).split(b"\n")
        del self.body[: end + 1]
        return lines


def error_message(body: bytes, empty: str = "(no body)") -> str:
    """The message of an admin API error answer (`{"error": "..."}`), or the start of whatever the
    body is; `empty` when there is none. Shared with the node CLI's client."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip() or empty


@contextlib.contextmanager
def _peer_errors(timeout: float) -> Iterator[None]:
    """A deadline passed or a socket error, as the `PeerError` every caller handles."""
    try:
        yield
    except TimeoutError:
        raise PeerError(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise PeerError(f"socket error: {exc}") from None


async def get(path: Path, target: str, *, timeout: float, limit: int = MAX_BODY) -> bytes:
    """The body of `GET target` on the admin socket `path`; the whole exchange takes at most `timeout`."""
    with _peer_errors(timeout):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(_request(target))
                response = _Response(limit)
                while not response.complete:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        raise PeerError("connection closed before the end of the answer")
                    response.feed(data)
            finally:
                writer.close()
    return response.result()


async def get_json(path: Path, target: str, *, timeout: float) -> Any:
    body = await get(path, target, timeout=timeout)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise PeerError(f"invalid JSON: {exc}") from None


async def stream_lines(path: Path, target: str, *, timeout: float) -> AsyncGenerator[bytes, None]:
    """The lines of a streamed answer (`/v1/flows?follow=1`) as they arrive, until the server ends it.

    `timeout` bounds the connection and the response head only: a follower may wait for hours
    between lines. Use it inside `contextlib.aclosing` so the connection closes when the caller stops.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
    except TimeoutError:
        raise PeerError(f"no connection within {timeout:g}s") from None
    except OSError as exc:
        raise PeerError(f"cannot connect: {exc}") from None
    try:
        writer.write(_request(target))
        response = _Response(MAX_BODY)
        async with asyncio.timeout(timeout):
            while not response.headers_done:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise PeerError("connection closed before the answer's head")
                response.feed(data)
        if response.status != 200:
            while not response.complete:
                data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
                if not data:
                    break
                response.feed(data)
            response.result()  # raises with the server's message
        while True:
            for line in response.take_lines():
                yield line
            if response.complete:
                return
            data = await reader.read(READ_SIZE)
            if not data:
                raise PeerError("the stream broke (no last chunk)")
            response.feed(data)
    except TimeoutError:
        raise PeerError(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise PeerError(f"the stream broke: {exc}") from None
    finally:
        writer.close()


def get_blocking(path: Path, target: str, *, timeout: float, limit: int = MAX_BODY) -> bytes:
    """`get` for a thread that may block (a metrics scrape); the whole exchange takes at most `timeout`."""
    deadline = time.monotonic() + timeout
    with _peer_errors(timeout), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(_request(target))
        response = _Response(limit)
        while not response.complete:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(READ_SIZE)
            if not data:
                raise PeerError("connection closed before the end of the answer")
            response.feed(data)
    return response.result()
