"""The agent's admin client (how the main process reads its proxy workers' sockets): deadlines, error
answers, size caps and streams, against canned answers on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from unix_peer import answering, head

from agent.admin import client
from agent.admin.client import PeerError


@pytest.fixture
def sock() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nm-client-"))  # short: AF_UNIX paths hold 107 bytes
    try:
        yield path / "worker-1.sock"
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_get_returns_the_body_and_sends_one_get(sock: Path) -> None:
    async with answering(sock, head("200 OK", 12), b'{"ok": tru', b"e}") as requests:
        assert await client.get_json(sock, "/v1/connections", timeout=2) == {"ok": True}
    assert requests[0].startswith(b"GET /v1/connections HTTP/1.1\r\n")


async def test_an_error_answer_carries_the_server_s_message(sock: Path) -> None:
    body = b'{"error":"no such endpoint /v2"}'
    async with answering(sock, head("404 Not Found", len(body)) + body):
        with pytest.raises(PeerError, match="answered 404: no such endpoint /v2"):
            await client.get(sock, "/v2", timeout=2)


async def test_the_deadline_covers_the_whole_answer(sock: Path) -> None:
    parts = [head("200 OK", 100)] + [b"x"] * 100  # a byte every 50 ms: 5 s in all
    async with answering(sock, *parts, pause=0.05):
        began = time.monotonic()
        with pytest.raises(PeerError, match=r"no answer within 0\.3s"):
            await client.get(sock, "/metrics", timeout=0.3)
        assert time.monotonic() - began < 1.0


async def test_a_missing_socket_and_garbage_are_peer_errors(sock: Path) -> None:
    with pytest.raises(PeerError, match="socket error"):
        await client.get(sock, "/metrics", timeout=1)
    async with answering(sock, b"SSH-2.0-OpenSSH\r\n\r\n"):
        with pytest.raises(PeerError, match="bad HTTP answer"):
            await client.get(sock, "/metrics", timeout=1)
    async with answering(sock, head("200 OK", 3) + b"abc"):
        with pytest.raises(PeerError, match="invalid JSON"):
            await client.get_json(sock, "/v1/status", timeout=1)


async def test_a_protocol_switch_and_too_deep_json_are_peer_errors(sock: Path) -> None:
    """httptools raises HttpParserUpgrade (no HttpParserError) on a 101, json.loads RecursionError (no
    ValueError) on deep nesting: the main process's callers handle PeerError alone."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    async with answering(sock, switch):
        with pytest.raises(PeerError, match="switches protocols"):
            await client.get(sock, "/v1/status", timeout=1)
        lines = client.stream_lines(sock, "/v1/flows?follow=1", timeout=1)
        with pytest.raises(PeerError, match="switches protocols"):
            async with contextlib.aclosing(lines):
                await anext(lines)
        with pytest.raises(PeerError, match="switches protocols"):
            await asyncio.to_thread(client.get_blocking, sock, "/metrics", timeout=1)
    deep = b"[" * 100_000 + b"]" * 100_000
    async with answering(sock, head("200 OK", len(deep)) + deep):
        with pytest.raises(PeerError, match="invalid JSON"):
            await client.get_json(sock, "/v1/connections", timeout=1)


async def test_a_body_over_the_limit_is_refused(sock: Path) -> None:
    async with answering(sock, head("200 OK", 5000) + b"x" * 5000):
        with pytest.raises(PeerError, match="larger than 1000 bytes"):
            await client.get(sock, "/metrics", timeout=1, limit=1000)


async def test_stream_lines_yields_lines_across_chunks(sock: Path) -> None:
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    parts = [head("200 OK", None), chunk(b'{"a":1}'), chunk(b'\n{"b":'), chunk(b"2}\n"), b"0\r\n\r\n"]
    async with answering(sock, *parts, pause=0.01):
        lines = client.stream_lines(sock, "/v1/flows?follow=1", timeout=1)
        async with contextlib.aclosing(lines):
            got = [line async for line in lines]
    assert got == [b'{"a":1}', b'{"b":2}']


async def test_stream_lines_reports_an_error_answer(sock: Path) -> None:
    body = b'{"error":"verdict must be allowed or denied"}'
    async with answering(sock, head("400 Bad Request", len(body)) + body):
        lines = client.stream_lines(sock, "/v1/flows?follow=1&verdict=x", timeout=1)
        with pytest.raises(PeerError, match="answered 400: verdict must be"):
            async with contextlib.aclosing(lines):
                await anext(lines)


def test_get_blocking_has_the_same_deadline(sock: Path) -> None:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    done = asyncio.Event()

    async def serve() -> None:
        async with answering(sock, head("200 OK", 10), b"partial", pause=5):
            ready.set()
            await done.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        began = time.monotonic()
        with pytest.raises(PeerError, match=r"no answer within 0\.2s"):
            client.get_blocking(sock, "/metrics", timeout=0.2)
        assert time.monotonic() - began < 1.0
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(10)
        loop.close()
