"""`agent.proxy.tls_transport` over real loopback TCP sockets with real mesh certificates (TLS 1.3)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import ssl
import threading
from dataclasses import dataclass, field

import pytest
import uvloop

from agent.proxy import tls, tls_transport
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"


@dataclass
class Recorder(asyncio.Protocol):
    """Keeps what arrived and what happened to the connection."""

    chunks: list[bytes] = field(default_factory=list)
    got_eof: bool = False
    lost: asyncio.Future[Exception | None] | None = None
    paused: int = 0
    resumed: int = 0
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def eof_received(self) -> None:
        self.got_eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.lost is not None
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ssl.SSLContext]:
    ca = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)
    other = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("other-ca"), TD)
    bundle = ca.trust_bundle_pem()
    out = {}
    for name, authority, server in (
        ("server", ca, True),
        ("client", ca, False),
        ("stranger", other, False),
    ):
        key, csr = new_workload_csr(SpiffeId.for_workload(TD, "ns", name))
        chain = authority.sign(authority.validate_csr(csr)).chain_pem
        out[name] = (tls.server_context if server else tls.client_context)(chain, key, bundle)
    return out


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of a loopback TCP connection, non-blocking."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for s in (client, server):
        s.setblocking(False)
    return server, client


async def _pair(
    contexts: dict[str, ssl.SSLContext], server: Recorder | None = None
) -> tuple[Recorder, Recorder]:
    """A connected mesh server and client over loopback TCP, both on `TlsTransport`."""
    server_sock, client_sock = _socket_pair()
    srv, cli = server or Recorder(), Recorder()
    async with asyncio.timeout(5):
        await asyncio.gather(
            tls_transport.start(server_sock, contexts["server"], srv, server_side=True),
            tls_transport.start(client_sock, contexts["client"], cli, server_side=False),
        )
    return srv, cli


async def _until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.001)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _run(kind: str, coro_fn: object) -> None:
    if kind == "uvloop":
        uvloop.run(coro_fn())  # type: ignore[operator]
    else:
        asyncio.run(coro_fn())  # type: ignore[operator]


def test_bytes_arrive_intact_both_ways_with_backpressure(
    contexts: dict[str, ssl.SSLContext], loop_kind: str
) -> None:
    async def main() -> None:
        srv, cli = await _pair(contexts)
        assert srv.transport is not None and cli.transport is not None
        up = os.urandom(8 << 20)
        down = os.urandom(3 << 20)
        srv.transport.pause_reading()  # the server does not read: the client's buffer must fill
        view = memoryview(up)
        for i in range(0, len(up), 1 << 20):
            cli.transport.write(view[i : i + (1 << 20)])
        assert cli.paused == 1 and cli.transport.get_write_buffer_size() > tls_transport.WRITE_HIGH
        srv.transport.resume_reading()
        srv.transport.write(down)
        await _until(lambda: len(srv.received) == len(up) and len(cli.received) == len(down))
        assert hashlib.sha256(srv.received).digest() == hashlib.sha256(up).digest()
        assert cli.received == down
        assert cli.resumed == 1 and cli.transport.get_write_buffer_size() == 0
        assert max(len(c) for c in srv.chunks) <= tls_transport.PLAIN_SIZE
        cli.transport.close()
        srv.transport.close()
        assert cli.lost is not None and srv.lost is not None
        assert await cli.lost is None and await srv.lost is None

    _run(loop_kind, main)


def test_connections_sharing_the_receive_buffers_each_get_their_own_bytes(
    contexts: dict[str, ssl.SSLContext], loop_kind: str
) -> None:
    """The receive and plaintext buffers are one per thread; three connections receiving at once
    (each more than a recv and a plaintext buffer's worth) still get exactly their own bytes."""

    async def main() -> None:
        pairs = [await _pair(contexts) for _ in range(3)]
        payloads = [os.urandom((3 << 20) + 12345 * i) for i in range(3)]
        for (_, cli), data in zip(pairs, payloads, strict=True):
            assert cli.transport is not None
            cli.transport.write(data)
        await _until(
            lambda: all(len(s.received) >= len(d) for (s, _), d in zip(pairs, payloads, strict=True))
        )
        for (srv, cli), data in zip(pairs, payloads, strict=True):
            assert srv.received == data
            assert max(len(c) for c in srv.chunks) <= tls_transport.PLAIN_SIZE
            assert cli.transport is not None
            cli.transport.abort()

    _run(loop_kind, main)


def test_a_read_started_from_data_received_does_not_overwrite_the_shared_buffers(
    contexts: dict[str, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a protocol's data_received makes another connection read (the buffers are in use further up
    the stack), that read gets buffers of its own: both connections' bytes stay intact. Small slices
    and pieces make A hand data on while ciphertext of the same recv is still to be fed."""
    monkeypatch.setattr(tls_transport, "BIO_FEED", 16 * 1024)
    monkeypatch.setattr(tls_transport, "PLAIN_SIZE", 32 * 1024)

    class Nested(Recorder):
        other: tls_transport.TlsTransport | None = None

        def data_received(self, data: bytes) -> None:
            if self.other is not None:
                self.other._on_readable()
            super().data_received(data)

    async def main() -> None:
        nested = Nested()
        _, a_cli = await _pair(contexts, server=nested)
        b_srv, b_cli = await _pair(contexts)
        assert isinstance(b_srv.transport, tls_transport.TlsTransport)
        assert nested.transport is not None and a_cli.transport is not None and b_cli.transport is not None
        b_srv.transport.pause_reading()  # B is read only from within A's data_received
        nested.transport.pause_reading()  # until both sent: A's reads are then large
        nested.other = b_srv.transport
        a_data, b_data = os.urandom(2 << 20), os.urandom(2 << 20)
        b_cli.transport.write(b_data)
        a_cli.transport.write(a_data)
        await _until(lambda: a_cli.transport.get_write_buffer_size() < len(a_data) // 2)
        await asyncio.sleep(0.05)
        nested.transport.resume_reading()
        await _until(lambda: len(nested.received) >= len(a_data))
        nested.other = None
        assert b_srv.received  # B was read from within A's callback
        b_srv.transport.resume_reading()
        await _until(lambda: len(b_srv.received) >= len(b_data))
        assert nested.received == a_data
        assert b_srv.received == b_data
        a_cli.transport.abort()
        b_cli.transport.abort()

    uvloop.run(main())


def test_a_view_the_protocol_keeps_is_never_written_over(contexts: dict[str, ssl.SSLContext]) -> None:
    """The protocol gets views of the decrypt buffer. One that keeps them (as a socket transport keeps
    what it could not write at once) must find them unchanged later: a kept buffer is lent out and
    the next chunks go elsewhere; one that keeps nothing gets the same buffer back every time."""

    class Keeper(Recorder):
        kept: list[memoryview]

        def data_received(self, data: bytes) -> None:
            self.kept.append(memoryview(data))  # no copy

    async def main() -> None:
        keeper = Keeper()
        keeper.kept = []
        _, cli = await _pair(contexts, server=keeper)
        assert cli.transport is not None
        payload = os.urandom(6 << 20)
        for i in range(0, len(payload), 700_001):
            cli.transport.write(payload[i : i + 700_001])
            await asyncio.sleep(0.001)
        await _until(lambda: sum(len(v) for v in keeper.kept) >= len(payload))
        assert len(keeper.kept) > 1
        assert b"".join(bytes(v) for v in keeper.kept) == payload
        cli.transport.abort()

        copier, plains = Recorder(), set()
        _, cli = await _pair(contexts, server=copier)
        assert cli.transport is not None
        for i in range(0, len(payload), 700_001):
            cli.transport.write(payload[i : i + 700_001])
            await asyncio.sleep(0.001)
            shared = tls_transport._shared.buffers
            assert shared is not None
            plains.add(id(shared.plain))
        await _until(lambda: len(copier.received) >= len(payload))
        assert copier.received == payload
        assert len(plains) == 1  # nothing kept: one buffer, reused
        cli.transport.abort()

    uvloop.run(main())


def test_claimed_buffers_are_per_thread_and_never_handed_out_twice() -> None:
    first = tls_transport._claim_buffers()
    nested = tls_transport._claim_buffers()
    assert nested is not first and nested.recv is not first.recv
    nested.busy = False
    first.busy = False
    assert tls_transport._claim_buffers() is first  # the thread's own set comes back once free
    first.busy = False
    elsewhere: list[object] = []
    thread = threading.Thread(target=lambda: elsewhere.append(tls_transport._claim_buffers()))
    thread.start()
    thread.join()
    assert elsewhere and elsewhere[0] is not first


def test_writelines_equals_the_concatenation(contexts: dict[str, ssl.SSLContext]) -> None:
    rng = random.Random(7)
    pieces = [os.urandom(rng.choice([0, 1, 9, 100, 5000, 16384, 16385, 70000])) for _ in range(60)]

    async def main() -> None:
        srv, cli = await _pair(contexts)
        assert cli.transport is not None
        expected = b"".join(pieces)
        for i in range(0, len(pieces), 7):
            cli.transport.writelines(pieces[i : i + 7])
        await _until(lambda: len(srv.received) >= len(expected))
        assert srv.received == expected
        cli.transport.abort()

    uvloop.run(main())


def test_close_sends_close_notify_and_the_peer_sees_eof(contexts: dict[str, ssl.SSLContext]) -> None:
    async def main() -> None:
        srv, cli = await _pair(contexts)
        assert cli.transport is not None and srv.lost is not None and cli.lost is not None
        cli.transport.write(b"last words")
        cli.transport.close()
        assert cli.transport.is_closing()
        assert await asyncio.wait_for(srv.lost, 5) is None
        assert srv.received == b"last words" and srv.got_eof  # data, then close_notify
        assert await cli.lost is None

    uvloop.run(main())


def test_abort_and_a_vanished_peer_end_the_connection_with_an_error(
    contexts: dict[str, ssl.SSLContext],
) -> None:
    async def main() -> None:
        srv, cli = await _pair(contexts)
        assert cli.transport is not None and srv.lost is not None
        cli.transport.abort()  # FIN without close_notify: a truncation to TLS
        exc = await asyncio.wait_for(srv.lost, 5)
        assert isinstance(exc, ConnectionResetError) and "close_notify" in str(exc)
        assert not srv.got_eof
        assert srv.transport is not None and srv.transport.is_closing()
        srv.transport.write(b"ignored")  # writing after the end is a no-op, not an error

    uvloop.run(main())


@pytest.mark.parametrize("client", ["stranger", "none"])
def test_refused_client_certificate_gets_the_alert(contexts: dict[str, ssl.SSLContext], client: str) -> None:
    """The server's handshake fails and sends OpenSSL's alert; the client learns why, not just EOF."""
    if client == "none":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = contexts["stranger"]
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the stranger does not trust our CA; only the server refuses here

    async def main() -> None:
        s, c = _socket_pair()
        cli = Recorder()
        server_task = asyncio.ensure_future(
            tls_transport.start(s, contexts["server"], Recorder(), server_side=True)
        )
        async with asyncio.timeout(5):
            await tls_transport.start(c, ctx, cli, server_side=False)  # TLS 1.3: the client finishes first
            with pytest.raises(ssl.SSLError) as refused:
                await server_task
            assert cli.lost is not None
            alert = await cli.lost
        s.close()
        expected = "CERTIFICATE_REQUIRED" if client == "none" else "UNKNOWN_CA"
        assert expected in str(refused.value).upper() or "CERTIFICATE" in str(refused.value).upper()
        assert isinstance(alert, ssl.SSLError), alert
        assert expected in str(alert).upper(), alert

    uvloop.run(main())


def test_a_failing_protocol_ends_only_its_connection(contexts: dict[str, ssl.SSLContext]) -> None:
    class Broken(Recorder):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("bug in the protocol")

    async def main() -> None:
        srv, cli = await _pair(contexts, Broken())
        async with asyncio.timeout(5):
            assert cli.transport is not None and srv.lost is not None and cli.lost is not None
            cli.transport.write(b"trigger")
            exc = await srv.lost
            assert isinstance(exc, RuntimeError)
            assert isinstance(await cli.lost, ConnectionResetError)  # the server's socket went away
            await asyncio.sleep(0)  # and the loop goes on

    uvloop.run(main())


def test_close_gives_up_on_a_peer_that_stopped_reading(
    contexts: dict[str, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_transport, "CLOSE_LINGER", 0.3)

    async def main() -> None:
        srv, cli = await _pair(contexts)
        assert srv.transport is not None and cli.transport is not None and cli.lost is not None
        srv.transport.pause_reading()
        chunk = os.urandom(1 << 20)
        while cli.transport.get_write_buffer_size() == 0:  # until the kernel buffers are full
            cli.transport.write(chunk)
        loop = asyncio.get_running_loop()
        started = loop.time()
        cli.transport.close()
        assert await asyncio.wait_for(cli.lost, 5) is None
        assert 0.25 < loop.time() - started < 3
        srv.transport.abort()

    uvloop.run(main())


def test_close_reaches_a_peer_that_is_still_sending(
    contexts: dict[str, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing a socket with unread bytes makes the kernel send a RST, which can destroy what was sent
    last (an HTTP/2 GOAWAY) before the peer read it. close() therefore half-closes and drops what
    still arrives until the peer's EOF, or for `DRAIN_LINGER` at most."""
    monkeypatch.setattr(tls_transport, "DRAIN_LINGER", 0.5)

    class SaysGoodbye(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"goodbye")
                self.transport.close()

    async def main() -> None:
        for _ in range(5):
            srv, cli = await _pair(contexts, SaysGoodbye())
            assert cli.transport is not None and cli.lost is not None and srv.lost is not None
            cli.transport.pause_reading()  # reads only once the server closed, into a full buffer
            cli.transport.write(os.urandom(8 << 20))  # still sending when the server closes
            await asyncio.sleep(0.1)
            cli.transport.resume_reading()
            await asyncio.wait_for(cli.lost, 5)
            assert cli.received == b"goodbye" and cli.got_eof
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await asyncio.wait_for(srv.lost, 5) is None
            assert loop.time() - started < 1.5

    uvloop.run(main())
