"""Open-loop HTTP/1.1 load at a fixed request rate, for tests/bench/bench_l4.py (wrk2 is not in Debian).

Request *i* is due at `start + i / rate` whatever happened to the earlier ones, and its latency is
measured from that due time, not from when it was actually written, so a stall shows up in the
percentiles instead of silently lowering the rate (no coordinated omission). Run inside the client
pod as a script; prints one JSON object.

- `--connection keep-alive`: a due request takes an idle connection, or opens a new one when all
  are busy (up to `--max-connections`, then it waits; the wait is part of its latency).
- `--connection close`: every request opens its own connection and sends `Connection: close`.

The loop uses `select()` (microsecond timeouts) rather than epoll (millisecond timeouts): with
epoll every send would start up to 1 ms late, which is as large as the effect being measured.
The process also sets its timer slack to 1 ns (default 50 us), which halves how late sends start.
`send_lag_*_ms` report how late sends started, so an overloaded generator is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import selectors
import socket
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)  # seconds from due time to full response
    send_lags: list[float] = field(default_factory=list)  # seconds from due time to write()
    ok: int = 0
    bad_status: int = 0
    conn_errors: int = 0
    connections_opened: int = 0
    last_done: float = 0.0


class _Exchange(asyncio.Protocol):
    """One client connection carrying one request at a time; parses just enough HTTP/1.1."""

    def __init__(
        self,
        on_idle: Callable[[_Exchange], None],
        on_result: Callable[[float, bool], None],
        on_lost: Callable[[_Exchange, float | None], None],
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due: float | None = None  # due time of the request in flight
        self.pending: tuple[bytes, float] | None = None  # written once connected
        self._on_idle, self._on_result, self._on_lost = on_idle, on_result, on_lost
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.pending is not None:
            request, due = self.pending
            self.pending = None
            self.send(request, due)

    def send(self, request: bytes, due: float) -> None:
        if self.transport is None:
            self.pending = (request, due)
            return
        self.due = due
        self.buf.clear()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.due is None:
            return
        head = bytes(self.buf[:end]).split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        parts = head[0].split(b" ", 2)
        ok = len(parts) >= 2 and parts[1] == b"200"
        due, self.due = self.due, None
        self._on_result(due, ok)
        self._on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        in_flight = self.due if self.due is not None else self.pending[1] if self.pending else None
        self.due = self.pending = None
        self._on_lost(self, in_flight)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class OpenLoop:
    """Sends `rate` requests per second for `warmup + seconds`; only the last `seconds` count."""

    def __init__(
        self,
        host: str,
        port: int,
        rate: float,
        seconds: float,
        warmup: float,
        keep_alive: bool,
        max_connections: int,
    ) -> None:
        self.host, self.port, self.rate = host, port, rate
        self.keep_alive, self.max_connections = keep_alive, max_connections
        self.warm_n = int(rate * warmup)
        self.total = self.warm_n + int(rate * seconds)
        header = b"keep-alive" if keep_alive else b"close"
        self.request = (
            b"GET / HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nConnection: "
            + header
            + b"\r\nUser-Agent: nodemesh-open-loop\r\n\r\n"
        )
        self.idle: list[_Exchange] = []
        self.open: set[_Exchange] = set()
        self.queue: deque[float] = deque()  # due times waiting for a connection
        self.measuring_from = 0.0
        self.res = Results()
        self.outstanding = 0
        self.finished = False
        self.loop = asyncio.get_running_loop()

    # ---- results -----------------------------------------------------------------------------
    def _result(self, due: float, ok: bool) -> None:
        if self.finished:
            return
        now = self.loop.time()
        self.outstanding -= 1
        if due < self.measuring_from:
            return
        if ok:
            self.res.ok += 1
            self.res.latencies.append(now - due)
            self.res.last_done = now
        else:
            self.res.bad_status += 1

    def _idle(self, ex: _Exchange) -> None:
        if not self.keep_alive:
            ex.close()
            return
        if self.queue:
            ex.send(self.request, self.queue.popleft())
            return
        self.idle.append(ex)

    def _lost(self, ex: _Exchange, in_flight: float | None) -> None:
        """A connection closed; a request still in flight on it failed."""
        if self.finished:
            return
        self.open.discard(ex)
        if ex in self.idle:
            self.idle.remove(ex)
        if in_flight is not None:
            self.outstanding -= 1
            if in_flight >= self.measuring_from:
                self.res.conn_errors += 1
        if self.queue and len(self.open) < self.max_connections:
            self._connect(self.queue.popleft())

    # ---- sending -----------------------------------------------------------------------------
    def _connect(self, due: float) -> None:
        ex = _Exchange(self._idle, self._result, self._lost)
        ex.pending = (self.request, due)
        self.open.add(ex)
        self.res.connections_opened += 1

        async def dial() -> None:
            try:
                await self.loop.create_connection(lambda: ex, self.host, self.port)
            except OSError:
                if self.finished:
                    return
                self.open.discard(ex)
                self.outstanding -= 1
                if due >= self.measuring_from:
                    self.res.conn_errors += 1

        self.loop.create_task(dial())

    def _dispatch(self, due: float) -> None:
        self.outstanding += 1
        if due >= self.measuring_from:
            self.res.send_lags.append(self.loop.time() - due)
        while self.idle:
            ex = self.idle.pop()
            if not ex.closed:
                ex.send(self.request, due)
                return
        if len(self.open) < self.max_connections:
            self._connect(due)
        else:
            self.queue.append(due)

    async def run(self, drain: float) -> dict[str, Any]:
        interval = 1.0 / self.rate
        start = self.loop.time() + 0.05
        self.measuring_from = start + self.warm_n * interval
        i = 0
        while i < self.total:
            now = self.loop.time()
            while i < self.total and start + i * interval <= now:
                self._dispatch(start + i * interval)
                i += 1
            if i < self.total:
                await asyncio.sleep(max(0.0, start + i * interval - self.loop.time()))
        end_sched = start + self.total * interval
        deadline = self.loop.time() + drain
        while self.outstanding > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.005)
        self.finished = True  # what is still in flight now is a timeout, not a connection error
        for ex in list(self.open):
            ex.close()
        await asyncio.sleep(0.01)
        measured = self.total - self.warm_n
        lat = sorted(self.res.latencies)
        lags = sorted(self.res.send_lags)
        window = max(self.res.last_done, end_sched) - self.measuring_from
        return {
            "target_rps": self.rate,
            "requests": measured,
            "ok": self.res.ok,
            "errors": measured - self.res.ok,
            "bad_status": self.res.bad_status,
            "conn_errors": self.res.conn_errors,
            "timeouts": measured - self.res.ok - self.res.bad_status - self.res.conn_errors,
            "achieved_rps": round(self.res.ok / window, 1) if window > 0 else 0.0,
            "p50_ms": _pct_ms(lat, 0.50),
            "p90_ms": _pct_ms(lat, 0.90),
            "p99_ms": _pct_ms(lat, 0.99),
            "max_ms": _pct_ms(lat, 1.0),
            "send_lag_p50_ms": _pct_ms(lags, 0.50),
            "send_lag_p99_ms": _pct_ms(lags, 0.99),
            "connections_opened": self.res.connections_opened,
        }


def _pct_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q))] * 1000, 3)


def _tight_timers() -> None:
    """prctl(PR_SET_TIMERSLACK, 1): wake-ups from select() within ~1 us of the due time (Linux)."""
    # elsewhere sends just start a little later, and send_lag_* shows by how much
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured lead-in, seconds")
    parser.add_argument("--connection", choices=("keep-alive", "close"), default="keep-alive")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--drain", type=float, default=2.0, help="wait for late responses, seconds")
    args = parser.parse_args(argv)

    async def go() -> dict[str, Any]:
        gen = OpenLoop(
            args.host,
            args.port,
            args.rate,
            args.seconds,
            args.warmup,
            args.connection == "keep-alive",
            args.max_connections,
        )
        return await gen.run(args.drain)

    _tight_timers()
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        out = loop.run_until_complete(go())
    finally:
        loop.close()
    out["connection"] = args.connection
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
