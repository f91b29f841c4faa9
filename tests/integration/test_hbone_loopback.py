"""HBONE over real TLS on loopback: real CA certificates, HboneServer, HboneClient, HbonePool, plain h2."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from h2client import h2_connect

from agent.proxy import tls
from agent.proxy.hbone import (
    STREAM_WINDOW,
    ConnectTarget,
    HboneError,
    IpAddress,
    Status,
    canonical_ip,
    connect_headers,
)
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import HboneClient, HboneServer, ServerStream, TunnelError
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"
SERVER_ID = SpiffeId.for_workload(TD, "default", "server")
CLIENT_ID = SpiffeId.for_workload(TD, "default", "client")


@dataclass
class Svid:
    chain: list[bytes]
    key: ec.EllipticCurvePrivateKey
    bundle: bytes


def issue(ca: CertificateAuthority, spiffe_id: SpiffeId) -> Svid:
    key, csr = new_workload_csr(spiffe_id)
    issued = ca.sign(ca.validate_csr(csr))
    return Svid(issued.chain_pem, key, ca.trust_bundle_pem())


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(Path(tmp_path_factory.mktemp("ca")), TD)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(Path(tmp_path_factory.mktemp("other-ca")), TD)


@pytest.fixture(scope="module")
def server_svid(ca: CertificateAuthority) -> Svid:
    return issue(ca, SERVER_ID)


@pytest.fixture(scope="module")
def client_svid(ca: CertificateAuthority) -> Svid:
    return issue(ca, CLIENT_ID)


async def echo(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
    stream.respond(Status.OK)
    while chunk := await stream.read():
        await stream.write(chunk)
    return None


@dataclass
class Running:
    server: HboneServer
    addr: tuple[str, int]
    seen: list[tuple[SpiffeId, ConnectTarget]]


Handler = Callable[[SpiffeId, ConnectTarget, ServerStream], Awaitable[int | None]]


@pytest.fixture
async def running(server_svid: Svid) -> AsyncIterator[Callable[[Handler], Running]]:
    listeners: list[socket.socket] = []
    tasks: set[asyncio.Task[None]] = set()
    context = tls.server_context(server_svid.chain, server_svid.key, server_svid.bundle)

    def start(handler: Handler) -> Running:
        seen: list[tuple[SpiffeId, ConnectTarget]] = []

        async def recording(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
            seen.append((peer, target))
            return await handler(peer, target, stream)

        async def pick(ip: IpAddress) -> ssl.SSLContext | None:
            return context if ip == canonical_ip("127.0.0.1") else None

        server = HboneServer(pick, recording, TD)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(256)
        lsock.setblocking(False)
        listeners.append(lsock)

        async def accept_loop() -> None:
            loop = asyncio.get_running_loop()
            while True:
                conn, _ = await loop.sock_accept(lsock)
                t = loop.create_task(server.serve(conn))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        t = asyncio.get_running_loop().create_task(accept_loop())
        tasks.add(t)
        return Running(server, lsock.getsockname(), seen)

    yield start
    for t in list(tasks):
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for lsock in listeners:
        lsock.close()


async def assert_eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def client_ctx(svid: Svid) -> ssl.SSLContext:
    return tls.client_context(svid.chain, svid.key, svid.bundle)


async def test_echo_one_mebibyte_with_marker(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    srv = running(echo)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    assert client.peer == SERVER_ID
    stream = await client.open_stream(("127.0.0.1", 8080), ("10.0.0.7", 41000))
    payload = b"MARK" + bytes(range(256)) * 4096 + b"END!"
    writer = asyncio.create_task(stream.write(payload))
    received = bytearray()
    while len(received) < len(payload):
        chunk = await stream.read()
        assert chunk, "stream ended early"
        received += chunk
    await writer
    stream.write_eof()
    assert await stream.read() == b""
    assert bytes(received) == payload
    await assert_eventually(lambda: client.active_streams == 0)  # both ends done: the slot is free
    peer, target = srv.seen[0]
    assert peer == CLIENT_ID
    assert (str(target.ip), target.port) == ("127.0.0.1", 8080)
    assert target.forwarded_for == (canonical_ip("10.0.0.7"), 41000)
    await client.close()


async def test_authority_not_the_tls_destination_gets_400(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    srv = running(echo)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    with pytest.raises(HboneError) as err:
        await client.open_stream(("127.0.0.2", 8080))
    assert err.value.status == Status.BAD_REQUEST
    assert srv.seen == []
    # the connection stays usable for good requests
    stream = await client.open_stream(("127.0.0.1", 8080))
    await stream.write(b"ping")
    assert await stream.read() == b"ping"
    await client.close()


async def test_handler_deny_gives_401(running: Callable[[Handler], Running], client_svid: Svid) -> None:
    async def deny(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int:
        return Status.UNAUTHORIZED

    srv = running(deny)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    with pytest.raises(HboneError) as err:
        await client.open_stream(("127.0.0.1", 8080))
    assert err.value.status == Status.UNAUTHORIZED
    await client.close()


async def test_client_refuses_server_with_unexpected_identity(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    srv = running(echo)
    with pytest.raises(tls.PeerIdentityError):
        await HboneClient.connect(srv.addr, client_ctx(client_svid), SpiffeId.for_workload(TD, "x", "y"))


async def assert_refused(srv: Running, ctx: ssl.SSLContext) -> None:
    before = srv.server.handshake_failures
    with pytest.raises((TunnelError, ssl.SSLError, OSError, HboneError)):
        client = await HboneClient.connect(srv.addr, ctx, SERVER_ID)
        # TLS 1.3: the client finishes its side first; the server's refusal arrives as an alert
        await client.open_stream(("127.0.0.1", 8080))
    await assert_eventually(lambda: srv.server.handshake_failures == before + 1)
    assert srv.seen == []


async def test_client_cert_from_another_ca_is_refused(
    running: Callable[[Handler], Running], other_ca: CertificateAuthority, ca: CertificateAuthority
) -> None:
    srv = running(echo)
    rogue = issue(other_ca, CLIENT_ID)
    # trusts the real root (so the client side is fine) but presents a certificate from another CA
    await assert_refused(srv, tls.client_context(rogue.chain, rogue.key, ca.trust_bundle_pem()))


async def test_no_client_cert_is_refused(
    running: Callable[[Handler], Running], ca: CertificateAuthority
) -> None:
    srv = running(echo)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.trust_bundle_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    await assert_refused(srv, ctx)


async def test_independent_h2_client_talks_to_handler(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    srv = running(echo)
    status, body = await asyncio.to_thread(
        h2_connect, srv.addr, client_ctx(client_svid), "127.0.0.1:9000", b"hello mesh"
    )
    assert (status, body) == (200, b"hello mesh")
    assert srv.seen[0][0] == CLIENT_ID
    assert srv.seen[0][1].port == 9000


async def test_150_concurrent_streams_use_two_pooled_connections(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    srv = running(echo)
    ctx = client_ctx(client_svid)

    async def dial(key: PoolKey) -> HboneClient:
        return await HboneClient.connect(key.dst_addr, ctx, key.dst_identity)

    pool = HbonePool(dial)
    key = PoolKey(CLIENT_ID, SERVER_ID, srv.addr)
    streams = await asyncio.gather(*(pool.open_stream(key, ("127.0.0.1", 7000 + i)) for i in range(150)))
    assert pool.connection_count(key) == 2
    for i, s in enumerate(streams[:5]):
        await s.write(b"n%d" % i)
        assert await s.read() == b"n%d" % i
    for s in streams:
        s.close()
    await pool.close()


async def test_a_reader_that_stops_reading_stalls_the_writer_at_the_stream_window(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    opened: asyncio.Queue[ServerStream] = asyncio.Queue()
    done = asyncio.Event()

    async def slow(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> None:
        stream.respond(Status.OK)
        await opened.put(stream)
        await done.wait()

    srv = running(slow)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    stream = await client.open_stream(("127.0.0.1", 5002))
    server_stream = await opened.get()
    writer = asyncio.create_task(stream.write(b"z" * (3 * STREAM_WINDOW)))
    await assert_eventually(lambda: server_stream.buffered == STREAM_WINDOW)
    assert not writer.done()  # backpressure: nothing beyond the window is sent
    total = 0
    while total < 3 * STREAM_WINDOW:
        total += len(await server_stream.read())
    await asyncio.wait_for(writer, 10)
    assert server_stream.buffered == 0
    done.set()
    await client.close()


@pytest.mark.parametrize("how", ["sock_factory", "connected_sock"])
async def test_caller_supplied_sockets(
    running: Callable[[Handler], Running], client_svid: Svid, how: str
) -> None:
    srv = running(echo)
    if how == "sock_factory":  # the proxy makes the socket inside the source pod's netns, unconnected
        client = await HboneClient.connect(
            srv.addr, client_ctx(client_svid), SERVER_ID, sock_factory=lambda: socket.socket()
        )
    else:
        sock = await asyncio.to_thread(socket.create_connection, srv.addr)
        client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID, sock=sock)
    stream = await client.open_stream(("127.0.0.1", 1234))
    await stream.write(b"via " + how.encode())
    assert await stream.read() == b"via " + how.encode()
    await client.close()


async def test_plaintext_garbage_does_not_hurt_the_server(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    srv = running(echo)
    _reader, writer = await asyncio.open_connection(*srv.addr)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await assert_eventually(lambda: srv.server.handshake_failures == 1)
    writer.close()
    # still serving real clients
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    stream = await client.open_stream(("127.0.0.1", 1))
    await stream.write(b"ok")
    assert await stream.read() == b"ok"
    await client.close()


async def test_keepalive_pings_are_answered(running: Callable[[Handler], Running], client_svid: Svid) -> None:
    srv = running(echo)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    client.start_keepalive(interval=0.01, timeout=5)
    await assert_eventually(lambda: client.pings_acked >= 3)
    assert client.usable
    await client.close()


async def test_an_unanswered_ping_closes_the_connection(server_svid: Svid, client_svid: Svid) -> None:
    """A peer that completed TLS and then went silent (a node gone without FIN/RST): the keepalive
    notices and the connection stops being usable, so the pool drops it."""
    context = tls.server_context(server_svid.chain, server_svid.key, server_svid.bundle)
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=context)
    addr = server.sockets[0].getsockname()[:2]
    try:
        client = await HboneClient.connect(addr, client_ctx(client_svid), SERVER_ID)
        assert client.usable
        client.start_keepalive(interval=0.02, timeout=0.2)
        await assert_eventually(lambda: not client.usable, timeout=3)
        assert client.pings_acked == 0
        await client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_single_stream_throughput_64_mib(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    async def sink(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> None:
        stream.respond(Status.OK)
        total = 0
        while chunk := await stream.read():
            total += len(chunk)
        await stream.write(str(total).encode())

    srv = running(sink)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    stream = await client.open_stream(("127.0.0.1", 5001))
    block = b"x" * (1024 * 1024)
    start = time.perf_counter()
    for _ in range(64):
        await stream.write(block)
    stream.write_eof()
    reply = await stream.read()
    elapsed = time.perf_counter() - start
    assert int(reply) == 64 * 1024 * 1024
    print(f"\nHBONE single stream, 64 MiB over loopback mTLS: {64 / elapsed:.1f} MiB/s ({elapsed:.2f} s)")
    await client.close()


def test_connect_headers_are_what_the_independent_client_would_send() -> None:
    headers = dict(connect_headers(("127.0.0.1", 9000), ("10.0.0.1", 5)))
    assert headers[b":method"] == b"CONNECT"
    assert headers[b"forwarded"] == b'for="10.0.0.1:5"'


async def test_silent_peer_is_dropped_after_the_handshake_timeout(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """A peer that connects and never says anything costs one socket for `handshake_timeout` only."""
    srv = running(echo)
    srv.server.handshake_timeout = 0.3
    reader, writer = await asyncio.open_connection(*srv.addr)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(100), 5) == b""  # the server closed it
    assert 0.25 < asyncio.get_running_loop().time() - started < 3
    await assert_eventually(lambda: srv.server.handshake_failures == 1)
    writer.close()
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)  # still serving
    await client.close()
