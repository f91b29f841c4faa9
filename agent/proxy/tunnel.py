"""The asyncio layer around the HBONE core: one TLS+HTTP/2 connection carrying many CONNECT streams.

`HboneClient` dials (or adopts a socket made inside the source pod's netns), checks the server's SPIFFE
ID before sending a byte, and opens CONNECT streams. `HboneServer` takes an accepted socket, presents
the destination workload's certificate (picked by the local IP), checks the client's SVID, validates
each CONNECT with `hbone.validate_connect` and hands it to `on_stream`. HTTP/2 flow control is the
backpressure: received bytes are acknowledged only when the consumer reads them, and `write` waits for
window and for the transport's buffer to drain.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable

import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from agent.proxy import hbone, tls_transport
from agent.proxy.hbone import ConnectTarget, HboneError, IpAddress, Status
from agent.proxy.netns_sockets import connect
from agent.proxy.tls import PeerIdentityError, check_server_identity, peer_spiffe_id
from api.spiffe import SpiffeId

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# A peer that stops reading while it keeps sending frames that are owed an answer (PING, SETTINGS,
# frames on closed streams: CVE-2019-9512/9514/9515) would grow the write buffer without bound.
# Writing pauses at tls_transport.WRITE_HIGH; answers owed beyond this much more end the connection.
MAX_OWED_WHILE_PAUSED = 1024 * 1024
# CONNECTs reset by the peer before their handler started, at once (CVE-2023-44487, rapid reset: a
# reset stream leaves the concurrency limit at once); more end the connection with GOAWAY
# ENHANCE_YOUR_CALM. The Rust h2 crate's limit on streams reset before the server accepted them,
# with its default. A reset while the handler runs (a client giving up on a slow dial) is not counted.
MAX_PENDING_RESETS = 20
# Frames that cost the receiver work and the sender next to nothing (CVE-2019-9513 priority
# shuffling, -9518 empty frames, and WINDOW_UPDATEs nothing was sent for), bounded as Envoy bounds
# them with its defaults (`http2_protocol_options`): at most this many DATA frames in a row with an
# empty payload and no END_STREAM (`max_consecutive_inbound_frames_with_empty_payload`); PRIORITY
# frames up to this many per stream opened, plus one stream (`max_inbound_priority_frames_per_stream`);
# WINDOW_UPDATE frames up to 5 + 2 * (streams opened + this many per DATA frame sent)
# (`max_inbound_window_update_frames_per_data_frame_sent`). More end the connection with GOAWAY
# ENHANCE_YOUR_CALM.
MAX_EMPTY_DATA_FRAMES = 1
MAX_PRIORITY_FRAMES_PER_STREAM = 100
MAX_WINDOW_UPDATES_PER_DATA_FRAME_SENT = 10
# Received DATA queued for readers that have not taken it yet (an app that reads slowly or not at
# all), over every HBONE connection of this process: the HTTP/2 windows bound one connection's share
# (16 MiB), not how many connections a peer opens. Past it, the connection holding most is cut off.
DEFAULT_RECEIVE_BUDGET = 1024 * 1024 * 1024


class ReceiveBudget:
    """Bytes received on HBONE streams and queued for their readers, over the process's connections.

    A stream queues what its reader has not taken, up to its HTTP/2 window (4 MiB; 16 MiB per
    connection): with an app that does not read, a peer can make each of its connections hold that
    much, and with enough connections (its share of `max_connections`: thousands) exhaust the
    agent's memory. Past `limit`, the live connection holding the most is cut off (GOAWAY
    ENHANCE_YOUR_CALM, `buffer_overflow`): its queued bytes are dropped, the others keep theirs.
    """

    def __init__(self, limit: int = DEFAULT_RECEIVE_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        self.overflows = 0  # connections cut off for it
        self._conns: set[_H2Protocol] = set()

    def stats(self) -> dict[str, int]:
        """For `NodeProxy.stats()`: what is queued now, and the limit."""
        return {"hbone_queued_bytes": self.used, "hbone_queued_limit": self.limit}

    def _over(self) -> None:
        victim = max(self._conns, key=lambda proto: proto.held, default=None)
        if victim is None or victim.held <= 0:
            return  # what is queued belongs to ended streams whose readers still take it
        self.overflows += 1
        log.warning(
            "event=hbone_buffer_overflow queued=%d limit=%d connection_queued=%d peer=%s",
            self.used,
            self.limit,
            victim.held,
            victim.peer,
        )
        victim._cut_off("buffer_overflow", goaway=True)


RECEIVE_BUDGET = ReceiveBudget()  # the process's (the agent sets its limit: --max-hbone-queued-mib)


class TunnelError(ConnectionError):
    """The HBONE connection failed or closed under a stream (handshake, identity, reset, GOAWAY)."""


class StreamRefused(TunnelError):
    """The peer did not process this stream: it was above the last stream ID of the peer's GOAWAY.
    Safe to retry on another connection (RFC 9113 §8.7)."""


class StreamLimitReached(TunnelError):
    """The connection already carries its maximum number of concurrent streams."""


class _Signal:
    """`asyncio.Event` bound to a known loop: its `wait` skips the running-loop lookup (a getpid(2)
    per call in CPython 3.11) that Event does on every wait. Same semantics otherwise."""

    __slots__ = ("_flag", "_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop, flag: bool = False) -> None:
        self._loop = loop
        self._flag = flag
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._flag = False

    @property
    def waiting(self) -> bool:
        """Someone waits and was not woken yet."""
        return bool(self._waiters)

    async def wait(self, *others: _Signal) -> None:
        """Until this signal, or one of `others`, is set (one future parked in each)."""
        if self._flag or any(o._flag for o in others):
            return
        fut = self._loop.create_future()
        self._waiters.append(fut)
        for o in others:
            o._waiters.append(fut)
        try:
            await fut
        finally:
            # `set` hands its list out: only a signal that did not wake this wait still holds it
            for signal in (self, *others):
                if signal is not self or not fut.done() or fut.cancelled():
                    with contextlib.suppress(ValueError):
                        signal._waiters.remove(fut)


class Stream:
    """One CONNECT stream: `read()` / `write()` / `write_eof()` / `close()`, flow controlled both ways."""

    def __init__(self, proto: _H2Protocol, stream_id: int) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = _Signal(proto._loop)
        self._writable = _Signal(proto._loop, True)
        self._eof = False
        self._local_closed = False
        self._error: BaseException | None = None
        self.status: int | None = None
        self._response: asyncio.Future[int] = proto._loop.create_future()
        self._sink: Callable[[bytes | memoryview], int] | None = None
        # called (on the next loop turn) when the stream fails on its own: reset by the peer, its
        # connection gone or cut off; not when closed locally (`on_failure`)
        self._on_fail: Callable[[BaseException], None] | None = None

    # -- fed by the protocol --
    def _feed(self, data: bytes | memoryview) -> None:
        """Received DATA; a memoryview (a large payload, see `hbone._FrameBuffer`) points into the
        received chunk and is only valid to hand on now: what is queued is copied."""
        if not data:
            return
        if self._sink is not None and self._readable.waiting and not self._chunks:
            # the reader waits with nothing queued: hand the bytes on now (pipe's direct path)
            taken = self._sink(data)
            if taken:  # acknowledged now; written with what data_received flushes after its events
                self._proto._consumed(self.stream_id, taken, flush=False)
            if taken == len(data):
                return
            data = data[taken:]
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._readable.set()
        self._proto._hold(len(data))  # last: it may cut this connection off (ReceiveBudget)

    def _feed_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def _discard_unread(self) -> None:
        """Drop what is queued for the reader: it still holds connection window (given back) and
        the process's receive budget."""
        if self._chunks:
            unread = sum(len(c) for c in self._chunks)
            self._chunks.clear()
            self._proto._release(unread)
            self._proto._consumed(self.stream_id, unread)

    def _fail(self, exc: BaseException) -> None:
        notify = None
        if self._error is None:
            self._error = exc
            if not isinstance(exc, EOFError):  # not closed locally
                notify = self._on_fail
        self._discard_unread()
        self._eof = True
        self._readable.set()
        self._writable.set()
        if not self._response.done():
            self._response.set_exception(exc)
            self._response.exception()  # mark retrieved: nobody may be waiting
        if notify is not None:  # after the wake-ups: a reader waiting on this stream sees it first
            self._proto._loop.call_soon(notify, exc)

    # -- user API --
    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (a whole received chunk when n < 0); b"" at end of stream."""
        while not self._chunks:
            if self._eof:
                if self._error is not None and not isinstance(self._error, EOFError):
                    raise TunnelError(str(self._error)) from self._error
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        if 0 <= n < len(chunk):
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._proto._release(len(chunk))
        self._proto._consumed(self.stream_id, len(chunk))
        return chunk

    def on_failure(self, callback: Callable[[BaseException], None] | None) -> None:
        """Call `callback(error)` once if the stream fails on its own (reset by the peer, its
        connection gone): a copy blocked on the other end (an app that does not read) would not
        see it otherwise."""
        self._on_fail = callback

    def set_sink(self, sink: Callable[[bytes | memoryview], int] | None) -> None:
        """While the reader waits in `read()` with nothing queued, received DATA goes to `sink`
        (which returns how much it took; the rest is queued for `read()`)."""
        self._sink = sink

    def write_nowait(self, data: bytes | memoryview) -> int:
        """Send what the HTTP/2 window allows of `data` now (0 when the transport is paused or the
        stream cannot send); the caller sends the rest with `write`."""
        if self._error is not None or self._local_closed or not self._proto._can_write.is_set():
            return 0
        try:
            return self._proto._send_data(self.stream_id, data, 0)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return 0

    async def write(self, data: bytes) -> None:
        """Send `data`, waiting for HTTP/2 window and transport buffer space (backpressure)."""
        offset, total = 0, len(data)
        while offset < total:
            if self._error is not None:
                raise TunnelError(str(self._error)) from self._error
            if self._local_closed:
                raise TunnelError(f"stream {self.stream_id} is closed for writing")
            try:
                sent = self._proto._send_data(self.stream_id, data, offset)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
                self._fail(TunnelError(f"stream {self.stream_id} closed: {exc!r}"))
                raise TunnelError(f"stream {self.stream_id} is closed") from exc
            if sent:
                offset += sent
                await self._proto._drain(self)
                if self._error is not None:  # failed while parked: what was written is lost
                    raise TunnelError(str(self._error)) from self._error
            else:
                self._writable.clear()
                await self._writable.wait()

    def write_eof(self) -> None:
        """Half-close: END_STREAM after what was written."""
        if not self._local_closed and self._error is None:
            self._local_closed = True
            self._proto._end_stream(self.stream_id)

    def close(self) -> None:
        """Tear the stream down (RST_STREAM CANCEL unless both sides already ended)."""
        if self._error is None:
            self._proto._reset(self.stream_id)
        self._fail(EOFError("closed locally"))

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet (bounded by the 4 MiB stream window)."""
        return sum(len(c) for c in self._chunks)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks


class ServerStream(Stream):
    """An inbound CONNECT stream: answer it with `respond(status)` before piping bytes."""

    handling = False  # its handler task started
    abandoned = False  # its handler was cancelled: the peer went away before the answer
    task: asyncio.Task[None] | None = None  # its handler

    def _abandon(self) -> None:
        """The peer reset this stream, or the connection went away, before the handler answered:
        cancel the handler (authorization, the dial to the app), which nobody waits for any more.
        Without it a peer could reset 100 streams at a time once their handlers dial a slow app, and
        keep any number of dials (each holding a connection slot) running. After the answer the
        copying task sees the reset and ends on its own. The handler's owner counts it
        (`abandoned`)."""
        task = self.task
        if self.handling and self.status is None and task is not None and not task.done():
            self.abandoned = True
            task.cancel()

    def respond(self, status: int) -> None:
        if self.status is not None:
            return
        self.status = int(status)
        self._proto._respond(self.stream_id, self.status, end_stream=self.status != Status.OK)
        if self.status != Status.OK:
            self._local_closed = True
            # DATA the peer sent ahead of the answer is never read now: without this it kept its
            # connection window (and receive budget) for as long as the connection lived
            self._discard_unread()


class _H2Protocol(asyncio.Protocol):
    """Shared HTTP/2 plumbing of both ends: event dispatch, windows, transport backpressure."""

    def __init__(self, *, client_side: bool, max_streams: int) -> None:
        self.conn = hbone.new_h2_connection(client_side=client_side, max_streams=max_streams)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.max_streams = max_streams
        self.peer: SpiffeId | None = None
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._can_write = _Signal(self._loop, True)
        self.goaway = False
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._owed = 0  # bytes of answers written while writing was paused (reset on resume)
        self.abuse: str | None = None  # why the connection was cut off for abusing HTTP/2
        self._empty_data = 0  # DATA frames in a row with an empty payload and no END_STREAM
        self._priority_frames = 0  # PRIORITY frames received
        self._window_updates = 0  # WINDOW_UPDATE frames received
        self._data_frames_sent = 0
        self.held = 0  # bytes its streams queued for their readers (ReceiveBudget)
        self._ended = False  # `_shutdown` ran
        self._budget = RECEIVE_BUDGET
        self.pings_acked = 0  # keepalive PINGs answered
        self._keepalive: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a tls_transport.TlsTransport
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            self.peer = self._check_peer(ssl_object)
        except PeerIdentityError as exc:
            log.warning("event=hbone_peer_rejected reason=%r", exc.reason)
            self._set_ready_error(exc)
            self.transport.abort()
            return
        hbone.start(self.conn)
        self._flush()
        self._budget._conns.add(self)
        if not self.ready.done():
            self.ready.set_result(None)

    def _check_peer(self, ssl_object: ssl.SSLObject) -> SpiffeId:
        raise NotImplementedError

    def _set_ready_error(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()

    def data_received(self, data: bytes) -> None:
        paused = not self._can_write._flag  # the peer does not read what we write
        if paused:
            before = self._buffered()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            # a header block over the limit (hbone.MAX_HEADER_BLOCK: the CONTINUATION flood) or a
            # header list over the advertised size: GOAWAY ENHANCE_YOUR_CALM is queued already
            log.info("event=hbone_header_flood peer=%s error=%r", self.peer, exc)
            self._cut_off("header_flood", goaway=True)
            return
        except h2.exceptions.ProtocolError as exc:
            log.warning("event=hbone_protocol_error error=%r", exc)
            self._flush()
            self._shutdown(TunnelError(f"HTTP/2 protocol error: {exc}"))
            return
        for event in events:
            self._dispatch(event)
            if self.abuse is not None:  # cut off: the rest of this receive is not handled
                return
        self._flush()
        if paused:  # what this receive made us write is owed to a peer that does not read
            self._owed += self._buffered() - before
            if self._owed > MAX_OWED_WHILE_PAUSED:
                self._cut_off("control_flood", goaway=False)

    def _buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _cut_off(self, reason: str, *, goaway: bool) -> None:
        """End the connection of a peer abusing HTTP/2: GOAWAY ENHANCE_YOUR_CALM and close, or (for
        a peer that does not read) abort, dropping what waits to be written."""
        if self.abuse is not None:
            return
        self.abuse = reason
        log.warning("event=hbone_abuse reason=%s peer=%s streams=%d", reason, self.peer, len(self.streams))
        if goaway:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._flush()
        elif self.transport is not None:
            self.transport.abort()
        self._shutdown(TunnelError(f"connection cut off: {reason}"))

    def _streams_opened(self) -> int:
        """CONNECT streams opened on this connection so far (client-initiated: odd ids, no push)."""
        conn = self.conn
        return (max(conn.highest_inbound_stream_id, conn.highest_outbound_stream_id) + 1) // 2

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                self._empty_data = 0
            elif event.stream_ended is None:
                self._empty_data += 1
                if self._empty_data > MAX_EMPTY_DATA_FRAMES:
                    self._cut_off("empty_frames", goaway=True)
                    return
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream._feed(event.data)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.conn.acknowledge_received_data(padding, event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_updates += 1
            allowed = 5 + 2 * (
                self._streams_opened() + MAX_WINDOW_UPDATES_PER_DATA_FRAME_SENT * self._data_frames_sent
            )
            if self._window_updates > allowed:
                self._cut_off("window_update_flood", goaway=True)
                return
            if event.stream_id == 0:
                for stream in self.streams.values():
                    stream._writable.set()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream._writable.set()
        elif isinstance(event, h2.events.PriorityUpdated):
            self._priority_frames += 1
            if self._priority_frames > MAX_PRIORITY_FRAMES_PER_STREAM * (1 + self._streams_opened()):
                self._cut_off("priority_flood", goaway=True)
        elif isinstance(event, h2.events.PingAckReceived):
            waiter = self._pings.pop(event.ping_data, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream._writable.set()
        elif isinstance(event, h2.events.StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream._feed_eof()
                self._forget_if_done(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            if (stream := self.streams.pop(event.stream_id, None)) is not None:
                stream._fail(TunnelError(f"stream {event.stream_id} reset by peer code={event.error_code}"))
                self._peer_reset(stream)
                self._close_if_drained()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            # last_stream_id names streams *we* initiated that the peer processed (RFC 9113 §6.8);
            # only a client initiates streams here. After a graceful GOAWAY (NO_ERROR) those keep
            # going (hbone.DrainingH2Connection) and the connection closes with the last of them.
            last = event.last_stream_id or 0
            for sid, stream in list(self.streams.items()):
                if self.conn.config.client_side and sid > last:
                    stream._fail(StreamRefused(f"connection GOAWAY code={event.error_code} last={last}"))
                    del self.streams[sid]
            if not self.streams and self.transport is not None:
                self.transport.close()
        else:
            self._dispatch_side(event)

    def _dispatch_side(self, event: h2.events.Event) -> None:
        pass

    def _peer_reset(self, stream: Stream) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        err = TunnelError(f"connection lost: {exc}" if exc else "connection closed")
        self._set_ready_error(exc if isinstance(exc, ssl.SSLError) else err)
        self._shutdown(err)

    def _shutdown(self, err: BaseException) -> None:
        self._ended = True  # no WINDOW_UPDATE for what its failing streams drop: the connection is over
        for stream in self.streams.values():
            stream._fail(err)
        self.streams.clear()
        # what its ended streams still queue for their readers stays counted until they take it
        self._budget._conns.discard(self)
        self.goaway = True
        for waiter in self._pings.values():  # nobody answers them now
            if not waiter.done():
                waiter.set_exception(TunnelError("connection closed"))
                waiter.exception()
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        # the failed streams woke their own writers; this also wakes anyone else parked in _drain
        # (the failed transport never calls resume_writing) and keeps later writes from parking
        self._can_write.set()
        if self.transport is not None:
            self.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if not self.closed.done():  # after _shutdown nobody may wait for a resume
            self._can_write.clear()

    def resume_writing(self) -> None:
        self._owed = 0
        self._can_write.set()

    # -- used by Stream --
    def _flush(self) -> None:
        buffers = self.conn.buffers_to_send()
        if buffers and self.transport is not None and not self.transport.is_closing():
            if len(buffers) == 1:
                self.transport.write(buffers[0])
            else:
                self.transport.writelines(buffers)

    async def _drain(self, stream: Stream) -> None:
        """Wait until the transport takes more (resume_writing), or until `stream` fails: its close,
        a reset or the connection's end (a failed transport never resumes writing) must not leave
        its writer parked. `_writable` also wakes on window updates, hence the loop."""
        while not self._can_write._flag and stream._error is None:
            stream._writable.clear()  # write() tries to send before it waits on it: nothing is lost
            await self._can_write.wait(stream._writable)

    def _hold(self, n: int) -> None:
        self.held += n
        budget = self._budget
        budget.used += n
        if budget.used > budget.limit:
            budget._over()

    def _release(self, n: int) -> None:
        self.held -= n
        self._budget.used -= n

    def _consumed(self, stream_id: int, n: int, *, flush: bool = True) -> None:
        if n and not self._ended and self.transport is not None and not self.transport.is_closing():
            self.conn.acknowledge_received_data(
                n, stream_id
            )  # a closed stream: h2 credits the connection only
            if flush:
                self._flush()

    def _send_data(self, stream_id: int, data: bytes | memoryview, offset: int) -> int:
        window = self.conn.local_flow_control_window(stream_id)
        size = min(window, self.conn.max_outbound_frame_size, len(data) - offset)
        if size <= 0:
            return 0
        # the common case (a read chunk that fits the window) goes out without a copy
        chunk = data if offset == 0 and size == len(data) else data[offset : offset + size]
        self.conn.send_data(stream_id, chunk)
        self._data_frames_sent += 1
        # written at once: deferring to the end of the loop turn (to coalesce streams) cost a loop
        # iteration per crossing, 15% of keep-alive requests/s at 32 connections (bench_l4)
        self._flush()
        return size

    def _end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self._data_frames_sent += 1  # an empty DATA frame with END_STREAM
        self._flush()
        self._forget_if_done(stream_id)

    def _reset(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        try:
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        else:
            self._flush()
        self._close_if_drained()

    def _respond(self, stream_id: int, status: int, *, end_stream: bool) -> None:
        try:
            self.conn.send_headers(stream_id, hbone.response_headers(status), end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.info("event=hbone_respond_failed stream=%d status=%d error=%r", stream_id, status, exc)
            # failed, not only forgotten: its handler may go on to read or write it (a pipe to the
            # app), and a stream nobody fails wakes nobody, not even when the connection ends
            if (stream := self.streams.pop(stream_id, None)) is not None:
                stream._fail(TunnelError(f"stream {stream_id} could not be answered: {exc!r}"))
            self._close_if_drained()
            return
        self._flush()
        if end_stream:
            self.streams.pop(stream_id, None)
            self._close_if_drained()

    def _forget_if_done(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream._eof and stream._local_closed:
            del self.streams[stream_id]
            self._close_if_drained()

    def _close_if_drained(self) -> None:
        """After a GOAWAY the connection takes no new streams: it ends with its last one."""
        if (
            self.goaway
            and not self.streams
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.transport.close()

    async def ping(self, timeout: float) -> None:
        """An HTTP/2 PING round trip (RFC 9113 §6.7); TimeoutError when unanswered in `timeout`."""
        opaque = os.urandom(8)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[opaque] = waiter
        try:
            self.conn.ping(opaque)
            self._flush()
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            self._pings.pop(opaque, None)

    def start_keepalive(self, interval: float, timeout: float) -> None:
        """PING every `interval` s; a PING unanswered within `timeout` s ends the connection.

        Besides a peer gone silent (a node lost without FIN or RST), this is what notices a peer's
        reset on a connection that writes nothing meanwhile under uvloop: when the reset is already
        queued as a read callback returns (it came with the last bytes read), libuv reports the next
        poll as an error (POLLERR) and uvloop closes the poll handle without calling the reader, so
        the reset is seen only when the connection next writes; the PING is that write. Reading
        until EAGAIN in every callback would see it at once, for one more recv(2) per wake-up."""
        if self._keepalive is None and not self.closed.done():
            self._keepalive = self._loop.create_task(self._run_keepalive(interval, timeout))

    async def _run_keepalive(self, interval: float, timeout: float) -> None:
        # until closed, not only while usable: a draining connection (GOAWAY received) still
        # carries streams, and a peer gone silent must not leave them hanging
        while not self.closed.done():
            await asyncio.sleep(interval)
            if self.closed.done():
                return
            try:
                await self.ping(timeout)
            except TunnelError:  # the connection ended meanwhile (the PING's write may have ended it)
                return
            except (TimeoutError, h2.exceptions.ProtocolError) as exc:
                addr = self.transport.get_extra_info("peername") if self.transport is not None else None
                log.warning("event=hbone_keepalive_failed peer=%s addr=%s error=%r", self.peer, addr, exc)
                self._shutdown(TunnelError(f"keepalive PING unanswered for {timeout}s"))
                return
            self.pings_acked += 1

    def close(self) -> None:
        # draining from now on, not from connection_lost: a pool must not hand it out meanwhile
        self.goaway = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.conn.close_connection()
            self._flush()
            self.transport.close()


class _ClientProtocol(_H2Protocol):
    def __init__(self, expected: SpiffeId | Iterable[SpiffeId], max_streams: int) -> None:
        super().__init__(client_side=True, max_streams=max_streams)
        self.expected = expected

    def _check_peer(self, ssl_object: ssl.SSLObject) -> SpiffeId:
        return check_server_identity(ssl_object, self.expected)

    def _dispatch_side(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                return
            try:
                status = hbone.response_status(event.headers)
            except ValueError as exc:
                stream._fail(TunnelError(f"bad response: {exc}"))
                self._reset(event.stream_id)
                return
            stream.status = status
            if not stream._response.done():
                stream._response.set_result(status)
            if status != Status.OK:
                self._reset(event.stream_id)


class HboneClient:
    """One HBONE connection from a source workload to a destination address (port 15008)."""

    def __init__(self, proto: _ClientProtocol, dst: tuple[str, int]) -> None:
        self._proto = proto
        self.dst = dst

    @classmethod
    async def connect(
        cls,
        dst: tuple[str, int],
        ssl_context: ssl.SSLContext,
        expected: SpiffeId | Iterable[SpiffeId],
        *,
        sock: socket.socket | None = None,
        sock_factory: Callable[[], socket.socket] | None = None,
        max_streams: int = hbone.MAX_STREAMS_PER_CONNECTION,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> HboneClient:
        """Dial `dst` (or adopt `sock`, or one `sock_factory` makes, e.g. in a pod netns) and handshake.

        Raises TunnelError (or PeerIdentityError, ssl.SSLError) before any HTTP/2 byte is sent when the
        server is not one of `expected`.
        """
        loop = asyncio.get_running_loop()
        expected_ids = expected if isinstance(expected, SpiffeId) else tuple(expected)
        if sock is None and sock_factory is not None:
            sock = sock_factory()
        if sock is None:
            sock = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # see HboneServer.serve
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = _ClientProtocol(expected_ids, max_streams)
        try:
            async with asyncio.timeout(handshake_timeout):
                try:
                    sock.getpeername()
                except OSError:  # not connected yet (a socket made in a pod netns keeps that netns)
                    await connect(sock, dst, loop)
                # no SNI: the server picks its certificate by IP
                await tls_transport.start(sock, ssl_context, proto, server_side=False)
                await proto.ready
        except (OSError, TimeoutError, PeerIdentityError) as exc:
            sock.close()
            if isinstance(exc, ssl.SSLError | TunnelError | PeerIdentityError):
                raise
            raise TunnelError(f"HBONE connect to {dst[0]}:{dst[1]} failed: {exc!r}") from exc
        except BaseException:
            sock.close()
            raise
        log.debug("event=hbone_connected dst=%s:%s peer=%s", dst[0], dst[1], proto.peer)
        return cls(proto, dst)

    @property
    def peer(self) -> SpiffeId | None:
        return self._proto.peer

    @property
    def active_streams(self) -> int:
        return len(self._proto.streams)

    @property
    def usable(self) -> bool:
        """Open, not draining (no GOAWAY): may take new streams."""
        return not self._proto.goaway and not self._proto.closed.done()

    @property
    def available_streams(self) -> int:
        limit = min(self._proto.max_streams, self._proto.conn.remote_settings.max_concurrent_streams)
        return max(0, limit - len(self._proto.streams)) if self.usable else 0

    @property
    def closed(self) -> asyncio.Future[None]:
        return self._proto.closed

    def start_stream(
        self,
        target: tuple[str | IpAddress, int],
        source: tuple[str | IpAddress, int] | None = None,
        *,
        traceparent: str | None = None,
    ) -> Stream:
        """Send a CONNECT now (synchronously: the slot is taken before any await); see `Stream.accepted`."""
        if not self.usable:
            raise TunnelError(f"HBONE connection to {self.dst[0]}:{self.dst[1]} is closed or draining")
        if self.available_streams <= 0:
            raise StreamLimitReached(f"{self.active_streams} streams open to {self.dst[0]}:{self.dst[1]}")
        conn = self._proto.conn
        stream_id = conn.get_next_available_stream_id()
        try:
            conn.send_headers(stream_id, hbone.connect_headers(target, source, traceparent=traceparent))
        except h2.exceptions.ProtocolError as exc:  # the connection is closing (h2 state machine)
            dst = f"{self.dst[0]}:{self.dst[1]}"
            raise TunnelError(f"HBONE connection to {dst} cannot open a stream: {exc!r}") from exc
        # registered once the CONNECT is out: a failed one must not hold a stream slot
        stream = Stream(self._proto, stream_id)
        self._proto.streams[stream_id] = stream
        self._proto._flush()
        return stream

    async def open_stream(
        self,
        target: tuple[str | IpAddress, int],
        source: tuple[str | IpAddress, int] | None = None,
        *,
        traceparent: str | None = None,
    ) -> Stream:
        """CONNECT to `target` and wait for the answer; HboneError(status) unless it is 200."""
        stream = self.start_stream(target, source, traceparent=traceparent)
        await accepted(stream)
        return stream

    def start_keepalive(self, interval: float, timeout: float) -> None:
        """PING every `interval` s; a PING unanswered within `timeout` s closes the connection (the pool
        then drops it). See `_H2Protocol.start_keepalive`."""
        self._proto.start_keepalive(interval, timeout)

    @property
    def pings_acked(self) -> int:
        return self._proto.pings_acked

    async def close(self) -> None:
        self._proto.close()
        await asyncio.shield(self._proto.closed)


class AnswerTimeout(TunnelError):
    """The HBONE server did not answer a CONNECT in time; the stream was reset."""


async def accepted(stream: Stream, timeout: float | None = None) -> None:
    """Wait for the server's answer to a CONNECT; raise HboneError unless it is 200.

    `timeout`: give up after that many seconds, reset the stream (RST_STREAM CANCEL, so the server
    stops working on it) and raise AnswerTimeout. A server answers within its own dial timeout
    (503 when the app does not accept), so only a peer that is stuck or hostile runs into it.
    Cancelled while waiting: the stream is reset the same way."""
    try:
        if timeout is None:
            status = await stream._response
        else:
            async with asyncio.timeout(timeout):
                status = await stream._response
    except TimeoutError:
        stream.close()
        sid = stream.stream_id
        raise AnswerTimeout(f"no answer to CONNECT on stream {sid} in {timeout:g} s") from None
    except asyncio.CancelledError:
        # the caller gave up (its own client went away, the proxy stops): nobody will read this
        # stream, so the server must stop working on it (it cancels the handler and counts the
        # stream abandoned) and the stream slot is free again
        stream.close()
        raise
    if status != Status.OK:
        raise HboneError(status, "refused by the HBONE server")


IdentityPicker = Callable[[IpAddress], Awaitable[ssl.SSLContext | None]]
StreamHandler = Callable[[SpiffeId, ConnectTarget, ServerStream], Awaitable[int | None]]


class _ServerProtocol(_H2Protocol):
    def __init__(self, server: HboneServer, local_ip: IpAddress) -> None:
        super().__init__(client_side=False, max_streams=server.max_streams)
        self.server = server
        self.local_ip = local_ip
        self.tasks: set[asyncio.Task[None]] = set()
        self._reset_unhandled: set[int] = set()  # reset by the peer before their handler started

    def _peer_reset(self, stream: Stream) -> None:
        if not isinstance(stream, ServerStream):
            return
        if stream.handling:
            stream._abandon()
            return
        self._reset_unhandled.add(stream.stream_id)
        if len(self._reset_unhandled) > MAX_PENDING_RESETS:
            self._cut_off("rapid_reset", goaway=True)

    def _shutdown(self, err: BaseException) -> None:
        streams = [s for s in self.streams.values() if isinstance(s, ServerStream)]
        super()._shutdown(err)
        for stream in streams:
            stream._abandon()

    def _check_peer(self, ssl_object: ssl.SSLObject) -> SpiffeId:
        return peer_spiffe_id(ssl_object, self.server.trust_domain)

    def _dispatch_side(self, event: h2.events.Event) -> None:
        if not isinstance(event, h2.events.RequestReceived):
            return
        if self.goaway:  # the client sent GOAWAY (draining): it gets no new streams either
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        decision = hbone.validate_connect(event.headers or [], self.local_ip)
        if isinstance(decision, HboneError):
            log.info(
                "event=hbone_connect_rejected peer=%s status=%d reason=%r",
                self.peer,
                decision.status,
                decision.reason,
            )
            self.server.rejected += 1
            self._respond(event.stream_id, decision.status, end_stream=True)
            return
        stream = ServerStream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        if event.stream_ended:
            stream._feed_eof()
        task = asyncio.get_running_loop().create_task(self._handle(stream, decision))
        stream.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, stream: ServerStream, target: ConnectTarget) -> None:
        assert self.peer is not None
        if self.transport is None or self.transport.is_closing():
            # the connection is being closed (refused once authenticated: at the cap, or its
            # source's share; or the proxy stopping): a stream that came with it is neither handled,
            # which would only refuse it once more and count that refusal twice, nor answered (the
            # connection's end does that: `_shutdown`)
            self._reset_unhandled.discard(stream.stream_id)
            return
        status: int | None = None
        stream.handling = True
        try:
            if stream._error is not None:  # reset (or the connection gone) before it was handled
                return
            status = await self.server.on_stream(self.peer, target, stream)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not stream.abandoned or (task is not None and task.uncancel() > 0):
                raise  # cancelled from outside as well (shutdown): not ours to swallow
            log.debug("event=hbone_stream_abandoned peer=%s target=%s", self.peer, target.authority)
        except TunnelError as exc:  # the peer reset the stream or the connection went away
            log.info(
                "event=hbone_stream_aborted peer=%s target=%s error=%r", self.peer, target.authority, exc
            )
        except Exception as exc:
            log.warning(
                "event=hbone_handler_failed peer=%s target=%s error=%r", self.peer, target.authority, exc
            )
            status = Status.SERVICE_UNAVAILABLE
        finally:
            self._reset_unhandled.discard(stream.stream_id)
            if stream.status is None and stream._error is None and not self.closed.done():
                stream.respond(status if status is not None else Status.SERVICE_UNAVAILABLE)
            elif stream.status == Status.OK and not self.closed.done():
                stream.write_eof()
                if stream.at_eof:
                    self._forget_if_done(stream.stream_id)
                else:
                    # the handler is done and left data unread, or the peer still sends: nobody
                    # reads this stream now. Without the reset, what it queued stayed counted
                    # in the receive budget for good once the peer ended its side
                    stream.close()


class HboneServer:
    """Serves HBONE on accepted sockets: TLS with the destination's certificate, then CONNECT streams.

    `await pick_identity(local_ip)` gives the server context of the workload owning `local_ip` (None: refuse).
    `on_stream(peer, target, stream)` answers with `stream.respond(200|401|503)` then pipes bytes; if it
    returns without answering, its return value (or 503) is sent. `keepalive`: (interval, timeout) of
    the PINGs each connection sends once established (`_H2Protocol.start_keepalive`), or None.
    """

    def __init__(
        self,
        pick_identity: IdentityPicker,
        on_stream: StreamHandler,
        trust_domain: str,
        *,
        max_streams: int = hbone.MAX_STREAMS_PER_CONNECTION,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        keepalive: tuple[float, float] | None = None,
    ) -> None:
        self.pick_identity = pick_identity
        self.keepalive = keepalive
        self.on_stream = on_stream
        self.trust_domain = trust_domain
        self.max_streams = max_streams
        self.handshake_timeout = handshake_timeout
        self.handshake_failures = 0
        self.rejected = 0
        self.abuse: dict[str, int] = {}  # connections cut off, by reason (_H2Protocol._cut_off)
        self._conns: set[_ServerProtocol] = set()

    async def serve(self, sock: socket.socket, established: Callable[[], bool] | None = None) -> None:
        """Handle one accepted TCP socket until its connection ends. Never raises for a bad peer.

        `established()` runs when the handshake is done and the peer's identity checked; False
        closes the connection (GOAWAY); a stream that came with the handshake fails with it."""
        try:
            local_ip = hbone.canonical_ip(sock.getsockname()[0])
            peer_addr = sock.getpeername()
        except OSError as exc:
            log.info("event=hbone_accept_failed error=%r", exc)
            sock.close()
            return
        context = await self.pick_identity(local_ip)
        if context is None:
            log.info("event=hbone_no_identity local_ip=%s peer_addr=%s", local_ip, peer_addr)
            sock.close()
            return
        sock.setblocking(False)
        # Without it, a small frame (a CONNECT's 200) written while an earlier one is unacknowledged
        # waits for the peer's delayed ACK: ~40 ms per new stream on a busy connection (measured).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = _ServerProtocol(self, local_ip)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await tls_transport.start(sock, context, proto, server_side=True)
                await proto.ready
        except (OSError, TimeoutError, PeerIdentityError) as exc:
            self.handshake_failures += 1
            log.info(
                "event=hbone_handshake_failed local_ip=%s peer_addr=%s error=%r", local_ip, peer_addr, exc
            )
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        if established is not None and not established():
            proto.close()
            return
        if self.keepalive is not None:
            proto.start_keepalive(*self.keepalive)
        self._conns.add(proto)
        try:
            # shielded: cancelling this task (the proxy stopping) must not cancel `closed`, which
            # the connection's own end sets; the connection is ended below instead
            await asyncio.shield(proto.closed)
            if proto.tasks:
                await asyncio.gather(*proto.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # The proxy stops: GOAWAY NO_ERROR naming the last stream it took (RFC 9113 §6.8), then
            # close_notify. Without it the connection stayed open until the process exited and the
            # peer kept sending new CONNECTs into it, each waiting for its answer timeout; with it
            # the peer's pool dials anew at once. The handlers were cancelled first (NodeProxy.stop).
            proto.close()
            raise
        finally:
            self._conns.discard(proto)
            if proto.abuse is not None:
                self.abuse[proto.abuse] = self.abuse.get(proto.abuse, 0) + 1

    async def close(self) -> None:
        """Send GOAWAY on every connection and close it."""
        for proto in list(self._conns):
            proto.close()
