"""TLS for HBONE connections: an `ssl.SSLObject` over memory BIOs, driven by the loop's socket readiness.

Why not the loop's own TLS (`create_connection(ssl=...)`): uvloop's TLS receive path cost 1.25 s of CPU
per GB received where this one costs 0.55-0.75 s (a loopback TLS 1.3 transfer of 2 GB, 256 KiB writes;
`docs/proxy.md` "Hot path"). Ciphertext is received into a preallocated buffer, fed to the incoming
BIO a slice at a time and decrypted into a second preallocated buffer, so a read of many records is one
`recv(2)`, one copy into the BIO and one view handed to the protocol. The buffers are shared by every
connection of a thread (they are only used within one readable callback), so a connection holds no
receive buffer of its own beyond what its BIO keeps (at most one slice and a record). The protocol's
view stays valid for as long as it refers to it: a plaintext buffer someone still refers to is never
decrypted into again (`_Buffers.swap_if_kept`). Sending encrypts into the outgoing BIO and writes what it
holds with one `send(2)`.

It also owns the handshake, so a handshake that fails (a client certificate from another CA, none at
all) still sends the TLS alert OpenSSL produced before the socket closes.

The transport implements what `agent.proxy.tunnel`'s protocols use of `asyncio.Transport`: `write`,
`close` (close_notify, then the socket once the send buffer drained), `abort`, `is_closing`,
`get_extra_info`, pause/resume of reading and the write-buffer limits that call the protocol's
`pause_writing` / `resume_writing`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Iterable
from typing import Any, cast

log = logging.getLogger(__name__)

RECV_SIZE = 1024 * 1024  # ciphertext per recv(2)
BIO_FEED = 256 * 1024  # ciphertext written to the incoming BIO at a time (bounds what each BIO keeps)
PLAIN_SIZE = 1024 * 1024  # plaintext handed to the protocol per data_received, at most
RECORD = 16384  # TLS's largest record payload (RFC 8446 §5.1)
WRITE_HIGH = 1024 * 1024  # send buffer above which the protocol is told to pause writing
WRITE_LOW = 256 * 1024
CLOSE_LINGER = 10.0  # seconds close() waits for buffered bytes to drain before aborting
# after the last byte went out on close(): seconds to read and drop what the peer still sends before
# closing the socket (closing with unread bytes makes the kernel send a RST, and a RST can destroy
# what we sent last, a GOAWAY, before the peer read it)
DRAIN_LINGER = 2.0
_RETRY = (BlockingIOError, InterruptedError)


async def handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Run the TLS handshake on a connected non-blocking `sock`; the caller bounds it with a timeout.

    Raises `ssl.SSLError` (after sending the alert OpenSSL wrote, if any) or `OSError`. Bytes the peer
    sent after its last handshake message stay in the returned incoming BIO.
    """
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    while True:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            if outgoing.pending:  # the alert: tell the peer why (best effort, the socket closes next)
                with contextlib.suppress(OSError):
                    sock.send(outgoing.read())
            raise
        else:
            if outgoing.pending:
                await loop.sock_sendall(sock, outgoing.read())
            return obj, incoming, outgoing
        if outgoing.pending:
            await loop.sock_sendall(sock, outgoing.read())
        data = await loop.sock_recv(sock, RECV_SIZE)
        if not data:
            raise ConnectionResetError("connection closed during the TLS handshake")
        incoming.write(data)


LENT_MAX = 4  # plaintext buffers still referenced by a protocol that are tracked for reuse


class _Buffers:
    """A receive buffer and a plaintext buffer, and whether a callback is using them.

    The protocol gets views of the plaintext buffer, valid while it holds them: if it keeps one (a
    socket transport keeps what it could not write at once), the buffer is lent out (`swap_if_kept`) and
    the next chunk is decrypted into another, never into bytes someone still refers to."""

    def __init__(self) -> None:
        self.recv = bytearray(RECV_SIZE)
        self.recv_view = memoryview(self.recv)
        self.plain = bytearray(PLAIN_SIZE)
        self.lent: collections.deque[bytearray] = collections.deque()
        self.busy = False

    def give_back(self) -> None:
        """The callback is done with them (no view of `plain` left on its side)."""
        self.swap_if_kept()
        self.busy = False

    def swap_if_kept(self) -> None:
        """Call with no view of `plain` left on this side: lend it out if the protocol kept one."""
        # two references (the attribute, getrefcount's argument); a live view of it adds one more
        if sys.getrefcount(self.plain) <= 2:
            return
        self.lent.append(self.plain)
        for _ in range(len(self.lent)):
            buf = self.lent.popleft()
            if sys.getrefcount(buf) <= 2:  # only `buf` and the argument: given back, reuse it
                self.plain = buf
                return
            self.lent.append(buf)
        if len(self.lent) > LENT_MAX:
            self.lent.popleft()  # no longer tracked: freed once its views go
        self.plain = bytearray(PLAIN_SIZE)


class _Shared(threading.local):
    buffers: _Buffers | None = None


_shared = _Shared()


def _claim_buffers() -> _Buffers:
    """This thread's buffers, marked busy; fresh ones if a callback further up the stack holds them
    (a protocol that, from data_received, made another connection read: the shared ones must not
    change under it). Give them back with `buffers.give_back()`."""
    bufs = _shared.buffers
    if bufs is None:
        bufs = _shared.buffers = _Buffers()
    elif bufs.busy:
        bufs = _Buffers()
    bufs.busy = True
    return bufs


class TlsTransport(asyncio.Transport):
    """A TLS stream over a connected non-blocking socket whose handshake `handshake()` completed."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        tls: tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO],
        protocol: asyncio.Protocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._obj, self._in, self._out = tls
        # the C object's methods: SSLObject's Python wrappers cost a frame per call on the hot path
        self._write = self._obj._sslobj.write  # type: ignore[attr-defined]
        self._read = self._obj._sslobj.read  # type: ignore[attr-defined]
        self._pending = self._obj._sslobj.pending  # type: ignore[attr-defined]
        self._protocol = protocol
        self._wbuf: collections.deque[memoryview] = collections.deque()
        self._wsize = 0
        self._high, self._low = WRITE_HIGH, WRITE_LOW
        self._writing_paused = False
        self._reading = False
        self._closing = False  # close() or abort() called, or the connection failed
        self._lost = False  # connection_lost scheduled
        self._drain_timer: asyncio.TimerHandle | None = None
        self._extra: dict[str, Any] = {"socket": sock, "ssl_object": self._obj}
        with contextlib.suppress(OSError):
            self._extra["peername"] = sock.getpeername()
            self._extra["sockname"] = sock.getsockname()

    def start(self) -> None:
        """Tell the protocol it is connected, hand it what arrived with the handshake, start reading."""
        self._protocol.connection_made(self)
        if self._closing:
            return
        self.resume_reading()
        if self._in.pending:
            bufs = _claim_buffers()
            try:
                self._decrypt(bufs, None)
            finally:
                bufs.give_back()

    # -- reading --
    def _on_readable(self) -> None:
        # Under uvloop a reset queued behind the bytes read here is never reported to this callback
        # (the poll handle is closed on the POLLERR): the protocol's keepalive PING finds it
        # (`tunnel._H2Protocol.start_keepalive`)
        bufs = _claim_buffers()
        try:
            try:
                n = self._sock.recv_into(bufs.recv)
            except _RETRY:
                return
            except OSError as exc:
                self._fail(exc)
                return
            if n == 0:  # EOF without close_notify: a truncation as far as TLS is concerned
                truncated = ConnectionResetError("peer closed without TLS close_notify")
                self._fail(None if self._closing else truncated)
                return
            self._decrypt(bufs, bufs.recv_view[:n])
        finally:
            bufs.give_back()

    def _decrypt(self, bufs: _Buffers, cipher: memoryview | None) -> None:
        """Feed `cipher` (None: nothing more than the BIO holds) to the incoming BIO a `BIO_FEED` slice
        at a time and hand the plaintext to the protocol in pieces of up to `PLAIN_SIZE`, as views of
        `bufs.plain` (see `_Buffers`); the last piece goes before returning, since `bufs` belong to the
        next callback then. The caller calls `bufs.give_back()` after it returns."""
        read, pending, incoming = self._read, self._pending, self._in
        view = memoryview(bufs.plain)
        fed, total = 0, 0 if cipher is None else len(cipher)
        if cipher is not None:  # the first slice before decrypting: no SSLWantReadError for nothing
            fed = min(total, BIO_FEED)
            incoming.write(cipher if fed == total else cipher[:fed])
        got = 0
        while not self._closing:
            eof = want = False
            try:
                while got < PLAIN_SIZE:
                    # with a buffer, read() returns the count (typeshed only knows the bytes form)
                    k = cast(int, read(PLAIN_SIZE - got, view[got:]))
                    if not k:
                        eof = True
                        break
                    got += k
                    if not incoming.pending and not pending():
                        want = True  # all decrypted: skip the SSLWantReadError a further read would raise
                        break
            except ssl.SSLWantReadError:
                want = True
            except ssl.SSLZeroReturnError:
                eof = True
            except ssl.SSLError as exc:
                self._flush_out()
                self._fail(exc)
                return
            if self._out.pending:  # e.g. a KeyUpdate answer
                self._flush_out()
            more = want and fed < total
            if got and not more:  # the buffer is full, or this is all there is for now
                try:
                    # a view, not bytes: valid for as long as the protocol refers to it
                    self._protocol.data_received(cast(bytes, view[:got]))
                except Exception as exc:  # a protocol bug ends this connection, never the loop
                    log.warning("event=tls_protocol_error error=%r", exc, exc_info=True)
                    self._fail(exc)
                    return
                got = 0
                if not (want or eof):  # the buffer filled up: go on in one nobody refers to
                    with contextlib.suppress(BufferError):  # exported: swap_if_kept sees it kept
                        view.release()
                    bufs.swap_if_kept()
                    view = memoryview(bufs.plain)
            if eof:  # the peer's close_notify
                if not self._closing:
                    self._protocol.eof_received()
                    self.close()
                return
            if want:
                if not more:
                    return
                assert cipher is not None
                end = min(total, fed + BIO_FEED)
                incoming.write(cipher[fed:end])
                fed = end

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        try:
            self._write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush_out()

    def writelines(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Encrypt `buffers` as one stream: small ones are gathered into whole records, large ones are
        encrypted where they are (no join of a large payload)."""
        if self._closing:
            return
        write = self._write
        pending: list[bytes | bytearray | memoryview] = []
        size = 0
        try:
            for buf in buffers:
                n = len(buf)
                if size + n <= RECORD:
                    pending.append(buf)
                    size += n
                    continue
                if pending:  # top the gathered bytes up to a whole record from this buffer
                    view = memoryview(buf)
                    cut = RECORD - size
                    pending.append(view[:cut])
                    write(b"".join(pending))
                    pending, size = [], 0
                    buf, n = view[cut:], n - cut
                if n <= RECORD:
                    pending, size = [buf], n
                else:
                    write(buf)
            if pending:
                write(pending[0] if len(pending) == 1 else b"".join(pending))
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush_out()

    def _flush_out(self) -> None:
        data = self._out.read()
        if not data or self._lost:
            return
        if not self._wbuf:
            try:
                sent = self._sock.send(data)
            except _RETRY:
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            self._loop.add_writer(self._fd, self._on_writable)
            self._wbuf.append(memoryview(data)[sent:])
            self._wsize += len(data) - sent
        else:
            self._wbuf.append(memoryview(data))
            self._wsize += len(data)
        if not self._writing_paused and self._wsize > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        while self._wbuf:
            chunk = self._wbuf[0]
            try:
                sent = self._sock.send(chunk)
            except _RETRY:
                break
            except OSError as exc:
                self._fail(exc)
                return
            self._wsize -= sent
            if sent < len(chunk):
                self._wbuf[0] = chunk[sent:]
                break
            self._wbuf.popleft()
        if not self._wbuf:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._drain_then_finish()
                return
        if self._writing_paused and self._wsize <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._wsize

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_HIGH if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    # -- closing --
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """close_notify, then close the socket once what is buffered was sent."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()  # queues close_notify; raises SSLWantReadError waiting for the peer's
        self._flush_out()
        if not self._wbuf and not self._lost:
            self._drain_then_finish()
        elif not self._lost:  # a peer that stopped reading must not hold the socket for ever
            self._loop.call_later(CLOSE_LINGER, self._linger_expired)

    def _drain_then_finish(self) -> None:
        """All was sent (close_notify too): half-close, drop what the peer still sends until its EOF
        or `DRAIN_LINGER`, then close the socket."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(None)
            return
        self._loop.add_reader(self._fd, self._drop_incoming)
        self._drain_timer = self._loop.call_later(DRAIN_LINGER, self._finish, None)

    def _drop_incoming(self) -> None:
        bufs = _claim_buffers()
        try:
            n = self._sock.recv_into(bufs.recv)
        except _RETRY:
            return
        except OSError:
            n = 0
        finally:
            bufs.give_back()
        if n == 0:
            self._finish(None)

    def _linger_expired(self) -> None:
        if not self._lost:
            log.info("event=tls_close_linger_expired unsent=%d", self._wsize)
            self._fail(None)

    def abort(self) -> None:
        self._fail(None)

    def _fail(self, exc: BaseException | None) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._reading = False
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._wbuf.clear()
        self._wsize = 0
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)  # type: ignore[arg-type]

    # -- the rest of asyncio.BaseTransport --
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peercert":
            return self._obj.getpeercert()
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


async def start(
    sock: socket.socket,
    context: ssl.SSLContext,
    protocol: asyncio.Protocol,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> TlsTransport:
    """Handshake on `sock`, then connect `protocol` to a `TlsTransport` (which owns the socket from then)."""
    tls = await handshake(sock, context, server_side=server_side, server_hostname=server_hostname)
    transport = TlsTransport(asyncio.get_running_loop(), sock, tls, protocol)
    transport.start()
    return transport
