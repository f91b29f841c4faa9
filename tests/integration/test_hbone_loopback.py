"""HBONE over real TLS on loopback: real CA certificates, HboneServer, HboneClient, HbonePool, plain h2."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from h2client import h2_connect

from agent.proxy import tls, tls_transport
from agent.proxy.hbone import (
    MAX_STREAMS_PER_CONNECTION,
    STREAM_WINDOW,
    ConnectTarget,
    HboneError,
    IpAddress,
    Status,
    canonical_ip,
    connect_headers,
)
from agent.proxy.pipe import SocketEnd, StreamEnd, splice
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import (
    MAX_EMPTY_DATA_FRAMES,
    MAX_OWED_WHILE_PAUSED,
    MAX_PENDING_RESETS,
    MAX_PRIORITY_FRAMES_PER_STREAM,
    RECEIVE_BUDGET,
    AnswerTimeout,
    HboneClient,
    HboneServer,
    ServerStream,
    Stream,
    TunnelError,
    accepted,
)
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
Start = Callable[..., Running]  # start(handler, sndbuf=0, rcvbuf=0, keepalive=None)


@pytest.fixture
async def running(server_svid: Svid) -> AsyncIterator[Start]:
    listeners: list[socket.socket] = []
    tasks: set[asyncio.Task[None]] = set()
    context = tls.server_context(server_svid.chain, server_svid.key, server_svid.bundle)

    def start(
        handler: Handler, sndbuf: int = 0, rcvbuf: int = 0, keepalive: tuple[float, float] | None = None
    ) -> Running:
        seen: list[tuple[SpiffeId, ConnectTarget]] = []

        async def recording(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
            seen.append((peer, target))
            return await handler(peer, target, stream)

        async def pick(ip: IpAddress) -> ssl.SSLContext | None:
            return context if ip == canonical_ip("127.0.0.1") else None

        server = HboneServer(pick, recording, TD, keepalive=keepalive)
        lsock = socket.socket()
        if sndbuf:  # accepted sockets inherit it
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if rcvbuf:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
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


async def assert_still_serving(srv: Running, client_svid: Svid) -> None:
    """A well-behaved client still gets its bytes echoed (after a bad peer was dealt with)."""
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    await assert_echoes(client)
    await client.close()


async def assert_echoes(client: HboneClient, data: bytes = b"ok") -> None:
    """A new stream on `client` (to port 1: the echo handler's) gets `data` back."""
    stream = await client.open_stream(("127.0.0.1", 1))
    await stream.write(data)
    assert await stream.read() == data
    stream.close()


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
    await assert_still_serving(srv, client_svid)


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


async def test_the_server_pings_and_keeps_a_client_that_answers(running: Start, client_svid: Svid) -> None:
    srv = running(echo, keepalive=(0.01, 5))
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    await assert_eventually(lambda: len(srv.server._conns) == 1)
    (proto,) = srv.server._conns
    await assert_eventually(lambda: proto.pings_acked >= 3)
    await assert_echoes(client, b"still here")
    await client.close()


async def test_the_server_closes_a_connection_whose_client_went_silent(
    running: Start, client_svid: Svid
) -> None:
    """The serving side PINGs too (NodeProxy gives 15008 the pool's keepalive): a source node gone
    without FIN or RST, or whose reset uvloop's poll dropped, does not hold the connection, its
    streams and their app connections for ever."""
    srv = running(echo, keepalive=(0.02, 0.2))
    s, _conn = await asyncio.to_thread(_flood_session, srv.addr, client_ctx(client_svid))  # then silence
    try:
        await assert_eventually(lambda: len(srv.server._conns) == 1)
        await assert_eventually(lambda: not srv.server._conns, timeout=3)
    finally:
        s.close()


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


# ---- abusive peers (the HTTP/2 floods of CVE-2019-9512/9514/9515 and CVE-2023-44487) ------------
def _flood_session(
    addr: tuple[str, int], ctx: ssl.SSLContext, rcvbuf: int = 0
) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    """A mesh client speaking bare h2 over a blocking TLS socket (none of nodemesh's I/O code)."""
    raw = socket.socket()
    if rcvbuf:  # before connect, so the window stays small: the server's answers back up sooner
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect(addr)
    s = ctx.wrap_socket(raw, server_hostname=None)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def _ping_flood(addr: tuple[str, int], ctx: ssl.SSLContext, pings: int) -> bool:
    """Send `pings` PINGs and never read the answers; True when the server hung up (within 10 s)."""
    s, _conn = _flood_session(addr, ctx, rcvbuf=4096)
    frame = hyperframe.frame.PingFrame(0)
    frame.opaque_data = b"12345678"
    batch = frame.serialize() * 1000
    try:
        for _ in range(pings // 1000):
            s.sendall(batch)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server may still be working through its backlog
            s.sendall(batch[:17])
            time.sleep(0.01)
    except OSError:  # reset, broken pipe, or the TLS layer seeing either
        return True
    finally:
        s.close()
    return False


async def test_a_ping_flood_from_a_peer_that_does_not_read_is_cut_off(
    running: Start, client_svid: Svid
) -> None:
    """Every PING is owed an answer; a peer that never reads them must not grow the server's buffer
    without bound (CVE-2019-9512): past `MAX_OWED_WHILE_PAUSED` of answers it is disconnected."""
    srv = running(echo, sndbuf=64 * 1024)  # the kernel takes only a little of the answers
    pings = 400_000  # 6.8 MB of PINGs, as many bytes of answers
    flood = asyncio.create_task(asyncio.to_thread(_ping_flood, srv.addr, client_ctx(client_svid), pings))
    peak = 0
    while not flood.done():
        for proto in list(srv.server._conns):
            if proto.transport is not None:
                peak = max(peak, proto.transport.get_write_buffer_size())
        await asyncio.sleep(0.001)
    assert await flood, "the server answered every PING into its buffer and never hung up"
    limit = tls_transport.WRITE_HIGH + MAX_OWED_WHILE_PAUSED + 1024 * 1024  # + what one receive answers
    assert 0 < peak <= limit, f"write buffer peaked at {peak} bytes"
    await assert_eventually(lambda: srv.server.abuse == {"control_flood": 1})
    await assert_still_serving(srv, client_svid)



def _continuation_flood(addr: tuple[str, int], ctx: ssl.SSLContext, frames: int) -> list[h2.events.Event]:
    """A CONNECT's HEADERS without END_HEADERS, then `frames` CONTINUATIONs of 256 KiB, none ending
    the block (64 MiB in all at h2's backlog); returns what the server said."""
    s, conn = _flood_session(addr, ctx)
    block = conn.encoder.encode([(":method", "CONNECT"), (":authority", "127.0.0.1:9000")])
    chunk = 256 * 1024
    with contextlib.suppress(OSError):  # the server may hang up while frames still go out
        s.sendall(conn.data_to_send())
        s.sendall(len(block).to_bytes(3, "big") + b"\x01\x00" + (1).to_bytes(4, "big") + block)
        continuation = chunk.to_bytes(3, "big") + b"\x09\x00" + (1).to_bytes(4, "big") + b"\x00" * chunk
        for _ in range(frames):
            s.sendall(continuation)
    return _until_goaway(s, conn)


def _until_goaway(
    s: ssl.SSLSocket, conn: h2.connection.H2Connection, events: list[h2.events.Event] | None = None
) -> list[h2.events.Event]:
    """Read what the server says (after `events`) until its GOAWAY, its close, or the socket's
    timeout; then close the socket. Returns the events."""
    events = [] if events is None else events
    try:
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            data = s.recv(65536)
            if not data:
                break
            events += conn.receive_data(data)
    except OSError:  # (the timeout too: the server kept the connection)
        pass
    finally:
        s.close()
    return events


async def test_a_continuation_flood_gets_goaway_enhance_your_calm(running: Start, client_svid: Svid) -> None:
    """HEADERS, then CONTINUATIONs that never end the header block (CVE-2024-27316 and kin): h2 would
    keep up to 64 of them, 1 MiB each at HBONE's frame size, per connection and for as long as the
    peer likes. The block is refused once over `hbone.MAX_HEADER_BLOCK`: GOAWAY ENHANCE_YOUR_CALM,
    the connection closed, no handler run, and the server keeps serving."""
    srv = running(echo)
    events = await asyncio.to_thread(_continuation_flood, srv.addr, client_ctx(client_svid), 60)
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert srv.seen == []
    await assert_eventually(lambda: srv.server.abuse == {"header_flood": 1})
    await assert_still_serving(srv, client_svid)



def _cheap_frames(addr: tuple[str, int], ctx: ssl.SSLContext, frames: list[bytes]) -> list[h2.events.Event]:
    """Open one CONNECT stream (to the echo handler's port 1), read its answer, then send `frames`
    as they are, reading until the server ends the connection (or 1 s of silence); what it said."""
    s, conn = _flood_session(addr, ctx)
    events: list[h2.events.Event] = []
    with contextlib.suppress(OSError):
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
        s.sendall(conn.data_to_send())
        while not any(isinstance(e, h2.events.ResponseReceived) for e in events):
            events += conn.receive_data(s.recv(65536))
            s.sendall(conn.data_to_send())
        s.sendall(b"".join(frames))
        s.settimeout(1)
    return _until_goaway(s, conn, events)


def _terminated(events: list[h2.events.Event]) -> int | None:
    """The error code of the server's GOAWAY among `events`, if it sent one."""
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    return goaways[0].error_code if goaways else None


def _raw(kind: type[hyperframe.frame.Frame], sid: int, **fields: object) -> bytes:
    frame = kind(sid)
    for name, value in fields.items():
        setattr(frame, name, value)
    return frame.serialize()


@pytest.mark.parametrize(
    ("reason", "frames"),
    [
        # CVE-2019-9518: DATA frames with nothing in them (no window spent), one after another
        ("empty_frames", [_raw(hyperframe.frame.DataFrame, 1)] * (MAX_EMPTY_DATA_FRAMES + 1)),
        # CVE-2019-9513: PRIORITY frames, far more than streams opened (one here)
        (
            "priority_flood",
            [_raw(hyperframe.frame.PriorityFrame, 3, depends_on=1, stream_weight=7)]
            * (MAX_PRIORITY_FRAMES_PER_STREAM * 2 + 1),
        ),
        # WINDOW_UPDATEs for data the server never sent (it sent no DATA frame yet)
        ("window_update_flood", [_raw(hyperframe.frame.WindowUpdateFrame, 0, window_increment=1)] * 12),
    ],
)
async def test_frames_that_cost_the_sender_nothing_are_bounded(
    running: Start, client_svid: Svid, reason: str, frames: list[bytes]
) -> None:
    """Frames that cost the server work and the sender next to nothing, bounded as Envoy's defaults
    bound them: past the limit, GOAWAY ENHANCE_YOUR_CALM and the connection closed."""
    srv = running(echo)
    events = await asyncio.to_thread(_cheap_frames, srv.addr, client_ctx(client_svid), frames)
    assert _terminated(events) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await assert_eventually(lambda: srv.server.abuse == {reason: 1})
    await assert_still_serving(srv, client_svid)


async def test_frames_within_those_limits_keep_the_connection(running: Start, client_svid: Svid) -> None:
    """One empty DATA frame at a time between real ones, a PRIORITY frame per stream, a few
    WINDOW_UPDATEs: a well-behaved client's share, and the connection stays."""
    srv = running(echo)
    frames = [
        _raw(hyperframe.frame.DataFrame, 1),
        _raw(hyperframe.frame.DataFrame, 1, data=b"x"),
        _raw(hyperframe.frame.DataFrame, 1),
        _raw(hyperframe.frame.PriorityFrame, 1, depends_on=0, stream_weight=15),
        _raw(hyperframe.frame.WindowUpdateFrame, 0, window_increment=1000),
        _raw(hyperframe.frame.WindowUpdateFrame, 1, window_increment=1000),
    ]
    events = await asyncio.to_thread(_cheap_frames, srv.addr, client_ctx(client_svid), frames)
    assert _terminated(events) is None
    assert srv.server.abuse == {}
    assert any(isinstance(e, h2.events.DataReceived) and e.data == b"x" for e in events)  # echoed



async def test_the_connection_queueing_most_is_cut_off_past_the_receive_budget(
    running: Start, client_svid: Svid, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that does not read: each stream queues up to its 4 MiB window (16 MiB a connection),
    and a peer with many connections could queue any multiple of that in the agent. Past the
    process's receive budget, the connection queueing most is cut off (GOAWAY ENHANCE_YOUR_CALM);
    another connection's streams keep what they queued and keep working."""
    monkeypatch.setattr(RECEIVE_BUDGET, "limit", 6 * 1024 * 1024)
    base, overflows = RECEIVE_BUDGET.used, RECEIVE_BUDGET.overflows
    stalled = asyncio.Event()

    async def app_reads_late(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        stream.respond(Status.OK)
        while target.port == 2 and not stalled.is_set() and not stream.at_eof:
            await asyncio.sleep(0.01)  # the app does not read (until the test lets it, or the stream fails)
        return await echo_rest(stream)

    async def echo_rest(stream: ServerStream) -> None:
        while chunk := await stream.read():
            await stream.write(chunk)

    srv = running(app_reads_late)
    quiet = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    small = await quiet.open_stream(("127.0.0.1", 2))
    await small.write(b"q" * 1024 * 1024)  # 1 MiB queued for the stalled app
    await assert_eventually(lambda: RECEIVE_BUDGET.used - base >= 1024 * 1024)
    greedy = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    streams = [await greedy.open_stream(("127.0.0.1", 2)) for _ in range(2)]
    writes = [asyncio.create_task(st.write(b"g" * 4 * 1024 * 1024)) for st in streams]
    await assert_eventually(lambda: srv.server.abuse == {"buffer_overflow": 1})
    await asyncio.gather(*writes, return_exceptions=True)  # (they fail with the connection)
    await assert_eventually(lambda: greedy.closed.done())
    assert RECEIVE_BUDGET.overflows == overflows + 1
    assert RECEIVE_BUDGET.used - base == 1024 * 1024  # the quiet connection's bytes are still queued
    stalled.set()  # the app reads now: the quiet stream gets all of its bytes back
    got = b""
    while len(got) < 1024 * 1024:
        got += await small.read()
    assert got == b"q" * 1024 * 1024
    await assert_echoes(quiet)
    small.close()
    await quiet.close()
    await greedy.close()
    await assert_eventually(lambda: RECEIVE_BUDGET.used == base)


async def test_data_sent_ahead_of_a_refusal_gives_its_window_and_budget_back(
    running: Start, client_svid: Svid
) -> None:
    """DATA a client sends before the answer to its CONNECT, which is then refused (401): nobody
    reads it. It used to keep its connection window (16 MiB) for the connection's life, so enough
    refused streams stalled the connection; now it is given back, and so is its receive budget."""
    base = RECEIVE_BUDGET.used
    early = asyncio.Event()

    async def refuse_after_data(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        if target.port == 9:
            await assert_eventually(lambda: stream.buffered >= 3 * 1024 * 1024)
            early.set()
            return int(Status.UNAUTHORIZED)
        return await echo(peer, target, stream)

    srv = running(refuse_after_data)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    for _ in range(8):  # 8 x 3 MiB: more than the 16 MiB connection window, were it kept
        early.clear()
        stream = client.start_stream(("127.0.0.1", 9))
        await asyncio.wait_for(stream.write(b"e" * 3 * 1024 * 1024), 5)  # sent before the answer
        await asyncio.wait_for(early.wait(), 5)
        with pytest.raises(HboneError):
            await accepted(stream, 5)
        stream.close()
    await assert_eventually(lambda: RECEIVE_BUDGET.used == base)
    # the connection window is intact: 4 MiB more go through (16 MiB would not fit, were 24 MiB kept)
    stream = await client.open_stream(("127.0.0.1", 1))
    writing = asyncio.create_task(stream.write(b"x" * 4 * 1024 * 1024))
    got = 0
    while got < 4 * 1024 * 1024:
        got += len(await asyncio.wait_for(stream.read(), 5))
    await writing
    stream.close()
    await client.close()


def _rapid_reset(addr: tuple[str, int], ctx: ssl.SSLContext, streams: int) -> list[h2.events.Event]:
    """CONNECT then RST_STREAM at once, `streams` times, 50 to a write; returns what the server said."""
    s, conn = _flood_session(addr, ctx)
    with contextlib.suppress(OSError):
        for first in range(1, 2 * streams, 100):
            for sid in range(first, min(first + 100, 2 * streams), 2):
                conn.send_headers(sid, [(":method", "CONNECT"), (":authority", "127.0.0.1:9000")])
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            s.sendall(conn.data_to_send())
    return _until_goaway(s, conn)


async def test_rapid_reset_gets_goaway_enhance_your_calm(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """CONNECT + immediate RST_STREAM, over and over (CVE-2023-44487): each reset stream leaves the
    stream limit at once, but its handler (authorization, a connection to the app) would still run.
    A stream reset before its handler started is not handled at all, and more than
    `MAX_PENDING_RESETS` such resets at once end the connection with GOAWAY ENHANCE_YOUR_CALM."""
    dialled = 0

    async def slow_dial(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        nonlocal dialled
        dialled += 1
        await asyncio.sleep(0.05)  # connecting to the app
        return await echo(peer, target, stream)

    srv = running(slow_dial)
    events = await asyncio.to_thread(_rapid_reset, srv.addr, client_ctx(client_svid), 2000)
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert dialled <= MAX_PENDING_RESETS + 1, f"{dialled} of 2000 reset streams reached the handler"
    await assert_eventually(lambda: srv.server.abuse == {"rapid_reset": 1})
    await assert_still_serving(srv, client_svid)


async def test_resets_below_the_limit_keep_the_connection(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """A client cancelling a few CONNECTs (a timeout, a caller gone) is not an attack."""
    srv = running(echo)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    for _ in range(3):
        for _ in range(MAX_PENDING_RESETS // 2):
            client.start_stream(("127.0.0.1", 7)).close()
        stream = await client.open_stream(("127.0.0.1", 8))
        await stream.write(b"still here")
        assert await stream.read() == b"still here"
        stream.close()
    assert client.usable and srv.server.abuse == {}
    await client.close()


async def test_cancelling_many_connects_stuck_in_a_slow_dial_is_not_rapid_reset(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """An overloaded app: CONNECTs wait in their handler's dial and the client gives up on 40 of them
    at once. Those resets came after the handlers started: no GOAWAY, and the connection's other
    stream keeps working."""

    async def slow_app(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        if target.port == 7:
            await asyncio.sleep(1.0)  # the app does not accept in time
        return await echo(peer, target, stream)

    srv = running(slow_app)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    busy = await client.open_stream(("127.0.0.1", 8))
    stuck = [client.start_stream(("127.0.0.1", 7)) for _ in range(2 * MAX_PENDING_RESETS)]
    await assert_eventually(lambda: len(srv.seen) == 1 + len(stuck))  # every handler is dialling
    for stream in stuck:
        stream.close()  # RST_STREAM CANCEL
    await busy.write(b"still here")
    assert await busy.read() == b"still here"
    assert client.usable and srv.server.abuse == {}
    await client.close()


class StuckDials:
    """A handler whose app never accepts (port 7): counts the dials in progress."""

    def __init__(self) -> None:
        self.running = 0
        self.started = 0
        self.cancelled = 0  # dials ended by the server cancelling their handler

    async def __call__(self, peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        if target.port != 7:
            return await echo(peer, target, stream)
        self.started += 1
        self.running += 1
        try:
            await asyncio.sleep(60)  # far beyond the test: only a cancel ends it
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return None

    async def wait_started(self, n: int) -> None:
        """Until `n` handlers in all have started dialling."""
        await assert_eventually(lambda: self.started == n)


async def test_streams_reset_while_their_handler_dials_stop_the_dial(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """Rapid reset that waits for each handler to start, so the resets are not counted as rapid:
    100 CONNECTs to an app that does not accept, RST_STREAM for all once their handlers dial, ten
    times. A reset stream's handler is cancelled, so the dials still running never exceed the
    stream limit (before: 1,000 dials, each holding a connection slot for the connect timeout)."""
    dials = StuckDials()
    srv = running(dials)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    peak = 0
    for round_ in range(1, 11):
        stuck = [client.start_stream(("127.0.0.1", 7)) for _ in range(MAX_STREAMS_PER_CONNECTION)]
        await dials.wait_started(round_ * MAX_STREAMS_PER_CONNECTION)
        peak = max(peak, dials.running)
        for stream in stuck:
            stream.close()  # RST_STREAM CANCEL
    await assert_eventually(lambda: dials.running == 0)
    assert peak <= MAX_STREAMS_PER_CONNECTION, f"{peak} dials at once"
    assert dials.cancelled == 10 * MAX_STREAMS_PER_CONNECTION
    assert client.usable and srv.server.abuse == {}
    await assert_echoes(client, b"still here")
    await client.close()


async def test_a_connection_that_goes_away_stops_its_streams_dials(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """The same with the TCP connection dropped instead of each stream reset: nobody is left to
    answer, so the handlers still dialling are cancelled."""
    dials = StuckDials()
    srv = running(dials)
    for round_ in range(1, 4):
        client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
        for _ in range(50):
            client.start_stream(("127.0.0.1", 7))
        await dials.wait_started(round_ * 50)
        transport = client._proto.transport
        assert transport is not None
        transport.abort()  # gone without GOAWAY
        await assert_eventually(lambda: dials.running == 0)
        await client.close()
    assert dials.cancelled == 150 and srv.server.abuse == {}
    await assert_still_serving(srv, client_svid)


async def test_a_connect_the_server_never_answers_times_out_and_is_reset(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """A peer node whose handler hangs (stuck, or hostile) must not hold the caller for ever: after
    the pool's answer timeout the CONNECT fails with AnswerTimeout and its stream is reset, which
    cancels the server's handler; the connection serves the next stream."""
    dials = StuckDials()
    srv = running(dials)
    ctx = client_ctx(client_svid)

    async def dial(key: PoolKey) -> HboneClient:
        return await HboneClient.connect(key.dst_addr, ctx, key.dst_identity)

    pool = HbonePool(dial, answer_timeout=0.3)
    key = PoolKey(CLIENT_ID, SERVER_ID, srv.addr)
    started = time.monotonic()
    with pytest.raises(AnswerTimeout):
        await pool.open_stream(key, ("127.0.0.1", 7))
    assert 0.3 <= time.monotonic() - started < 2.0
    await assert_eventually(lambda: dials.cancelled == 1 and dials.running == 0)
    stream = await pool.open_stream(key, ("127.0.0.1", 8))
    await stream.write(b"next")
    assert await stream.read() == b"next"
    assert pool.connection_count(key) == 1
    stream.close()
    await pool.close()


def _resets_then_echo(
    addr: tuple[str, int], ctx: ssl.SSLContext, resets: int
) -> tuple[bytes, list[h2.events.Event]]:
    """`resets` CONNECT + RST_STREAM pairs in one TLS record, then one CONNECT that is used."""
    s, conn = _flood_session(addr, ctx)
    try:
        for sid in range(1, 2 * resets, 2):
            conn.send_headers(sid, [(":method", "CONNECT"), (":authority", "127.0.0.1:9000")])
            conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        s.sendall(conn.data_to_send())
        sid = 2 * resets + 1
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", "127.0.0.1:9001")])
        conn.send_data(sid, b"used", end_stream=True)
        s.sendall(conn.data_to_send())
        body, events = b"", list[h2.events.Event]()
        while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in events):
            data = s.recv(65536)
            if not data:
                break
            for e in conn.receive_data(data):
                events.append(e)
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                    body += e.data
            s.sendall(conn.data_to_send())
        return body, events
    finally:
        s.close()


async def test_a_stream_reset_before_its_handler_ran_is_not_handled(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """The reset arrived with the CONNECT: no authorization and no connection to the app for it."""
    srv = running(echo)
    body, events = await asyncio.to_thread(_resets_then_echo, srv.addr, client_ctx(client_svid), 10)
    assert body == b"used"
    assert [target.port for _, target in srv.seen] == [9001]
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    assert srv.server.abuse == {}


async def test_a_server_flooding_pings_at_a_client_that_it_does_not_read_is_cut_off(
    server_svid: Svid, client_svid: Svid
) -> None:
    """The same limit on the dialling side: a peer node that sends PINGs and never reads the
    answers does not grow the client's buffer without bound; the pool then drops the connection."""

    class Flooder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # never reads a byte the client sends
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            frame = hyperframe.frame.PingFrame(0)
            frame.opaque_data = b"12345678"
            transport.write(conn.data_to_send() + frame.serialize() * 400_000)  # 6.8 MB of PINGs

    context = tls.server_context(server_svid.chain, server_svid.key, server_svid.bundle)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    server = await asyncio.get_running_loop().create_server(Flooder, sock=lsock, ssl=context)

    def small_sndbuf() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        return s

    try:
        client = await HboneClient.connect(
            lsock.getsockname(), client_ctx(client_svid), SERVER_ID, sock_factory=small_sndbuf
        )
        await assert_eventually(lambda: not client.usable, timeout=10)
        assert client._proto.abuse == "control_flood"
        transport = client._proto.transport
        assert transport is not None and transport.is_closing()
        await client.close()
    finally:
        server.close()
        await server.wait_closed()


# -- a writer parked on a paused transport (the peer does not read) ---------------------------------

SMALL_BUF = 64 * 1024


def small_buffers() -> socket.socket:
    """Small kernel buffers: a peer that stops reading pauses the TLS transport after little data."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
    return s


@dataclass
class Freezer:
    """A handler that answers 200, then stops reading its socket (a frozen peer node: no PING is
    answered either) until `thaw`."""

    thawed: asyncio.Event = field(default_factory=asyncio.Event)
    transports: list[asyncio.Transport] = field(default_factory=list)

    async def __call__(self, peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> None:
        stream.respond(Status.OK)
        assert stream._proto.transport is not None
        stream._proto.transport.pause_reading()
        self.transports.append(stream._proto.transport)
        await self.thawed.wait()

    async def hang_up(self, client: HboneClient) -> None:
        """End the test's connection on both sides without leaving a socket open."""
        if client._proto.transport is not None:  # its close would wait CLOSE_LINGER to flush
            client._proto.transport.abort()
        await client.close()
        for transport in self.transports:  # read again: see the client gone
            if not transport.is_closing():
                transport.resume_reading()
        self.thawed.set()
        await assert_eventually(lambda: all(t.is_closing() for t in self.transports))
        await asyncio.sleep(0)  # the server's connection_lost


async def frozen_stream(running: Start, client_svid: Svid) -> tuple[Freezer, HboneClient, Stream]:
    freezer = Freezer()
    srv = running(freezer, rcvbuf=SMALL_BUF)
    client = await HboneClient.connect(
        srv.addr, client_ctx(client_svid), SERVER_ID, sock_factory=small_buffers
    )
    return freezer, client, await client.open_stream(("127.0.0.1", 9))


async def test_a_writer_parked_on_a_paused_transport_fails_when_the_keepalive_drops_the_connection(
    running: Start, client_svid: Svid
) -> None:
    """The TLS transport of a connection that failed never calls resume_writing: a write parked for
    it must fail with the connection, or its pipe (and the connection slot) would never end."""
    freezer, client, stream = await frozen_stream(running, client_svid)
    writer = asyncio.create_task(stream.write(b"x" * (3 * 1024 * 1024)))  # within the stream window
    try:
        await assert_eventually(lambda: not client._proto._can_write.is_set())  # parked in _drain
        client.start_keepalive(interval=0.05, timeout=0.3)
        await assert_eventually(lambda: client.closed.done())
        with pytest.raises(TunnelError):
            await asyncio.wait_for(writer, 2)
    finally:
        writer.cancel()
        await freezer.hang_up(client)


async def test_closing_a_stream_wakes_its_writer_parked_on_a_paused_transport(
    running: Start, client_svid: Svid
) -> None:
    """Stream.close() (pipe's other side ended) while the connection, shared with other streams,
    stays paused: the writer ends now, the connection stays."""
    freezer, client, stream = await frozen_stream(running, client_svid)
    writer = asyncio.create_task(stream.write(b"x" * (3 * 1024 * 1024)))
    try:
        await assert_eventually(lambda: not client._proto._can_write.is_set())
        stream.close()
        with pytest.raises(TunnelError):
            await asyncio.wait_for(writer, 2)
        assert not client.closed.done()
    finally:
        writer.cancel()
        await freezer.hang_up(client)


async def test_the_pipe_of_a_stream_parked_on_a_lost_connection_ends(
    running: Start, client_svid: Svid
) -> None:
    """The same through pipe.splice as ProxyCore.pipe runs it (app socket <-> HBONE stream): the
    splice returns, so the flow is closed and its slot given back."""
    freezer, client, stream = await frozen_stream(running, client_svid)
    app, proxy_side = socket.socketpair()
    app.setblocking(False)
    proxy_side.setblocking(False)
    loop = asyncio.get_running_loop()
    _, end = await loop.create_connection(SocketEnd, sock=proxy_side)
    spliced = asyncio.create_task(splice(end, StreamEnd(stream), lambda n: None, lambda n: None))
    sender = asyncio.create_task(loop.sock_sendall(app, b"z" * (3 * 1024 * 1024)))
    try:
        await assert_eventually(lambda: not client._proto._can_write.is_set())
        client.start_keepalive(interval=0.05, timeout=0.3)
        await assert_eventually(lambda: client.closed.done())
        assert await asyncio.wait_for(asyncio.shield(spliced), 2) != ""  # ended, with a reason
    finally:
        spliced.cancel()
        sender.cancel()
        await asyncio.gather(spliced, sender, return_exceptions=True)
        app.close()
        await freezer.hang_up(client)



class StuckApp:
    """The app side of a pipe for an app that neither reads nor writes: `write` never completes."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.written = 0

    async def read(self) -> bytes:
        await self.closed.wait()
        return b""

    async def write(self, data: bytes) -> None:
        self.written += len(data)
        await self.closed.wait()  # the app does not read: its socket stays full
        raise ConnectionResetError("closed")

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed.set()

    def finish(self) -> None:
        self.closed.set()


async def test_a_stream_reset_while_its_app_does_not_read_ends_the_pipe_and_the_app_connection(
    running: Start, client_svid: Svid
) -> None:
    """The serving side of a stream whose app does not read: one copy waits for the app to take a
    write, the other for the app to send, so neither reads the stream when the client resets it.
    The pipe ends all the same (the stream reports its failure: `on_failure`) and closes the app's
    connection, which otherwise stayed open until the app read or wrote again."""
    apps: list[StuckApp] = []
    results: list[str] = []

    async def to_stuck_app(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        stream.respond(Status.OK)
        app = StuckApp()
        apps.append(app)
        results.append(await splice(StreamEnd(stream), app, lambda n: None, lambda n: None))
        return None

    srv = running(to_stuck_app)
    client = await HboneClient.connect(srv.addr, client_ctx(client_svid), SERVER_ID)
    stream = await client.open_stream(("127.0.0.1", 9))
    await stream.write(b"w" * 1000)
    await assert_eventually(lambda: bool(apps) and apps[0].written == 1000)  # the copy waits on the app
    stream.close()  # RST_STREAM CANCEL
    await assert_eventually(lambda: apps[0].closed.is_set())
    await assert_eventually(lambda: bool(results))
    assert "reset by peer" in results[0]
    await client.close()


async def test_a_connect_that_cannot_be_answered_ends_the_pipe_and_the_app_connection(
    running: Start, client_svid: Svid
) -> None:
    """A client sends a CONNECT and, before the answer, GOAWAY with an error code: h2 takes no more
    frames from the server, so the 200 cannot be sent once the handler has dialled the app. The
    stream now fails, so the pipe ends and closes the app's connection. Before, the stream was only
    forgotten: the pipe waited on it for ever, holding the app's connection (and, in the proxy, a
    connection slot), even after the client had gone."""
    apps: list[StuckApp] = []
    results: list[str] = []

    async def dial_then_pipe(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        await asyncio.sleep(0.2)  # the dial to the app
        app = StuckApp()
        apps.append(app)
        stream.respond(Status.OK)
        results.append(await splice(StreamEnd(stream), app, lambda n: None, lambda n: None))
        return None

    srv = running(dial_then_pipe)

    def connect_then_goaway() -> ssl.SSLSocket:
        s, conn = _flood_session(srv.addr, client_ctx(client_svid))
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:9")])
        conn.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
        s.sendall(conn.data_to_send())
        return s

    s = await asyncio.to_thread(connect_then_goaway)
    try:
        await assert_eventually(lambda: bool(apps) and apps[0].closed.is_set())  # the client is still there
        await assert_eventually(lambda: bool(results))
        assert "could not be answered" in results[0]
    finally:
        s.close()


async def test_a_handler_parked_on_a_client_that_went_away_ends_and_serve_returns(
    running: Start, client_svid: Svid
) -> None:
    """The same on the serving side: a handler writing to a client that stopped reading, then the
    client's connection is reset. The handler's write fails and HboneServer.serve returns (it
    holds one of NodeProxy's connection slots)."""
    ended: list[BaseException | None] = []

    async def blast(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> None:
        stream.respond(Status.OK)
        try:
            await stream.write(b"y" * (3 * 1024 * 1024))
            ended.append(None)
        except TunnelError as exc:
            ended.append(exc)

    srv = running(blast, sndbuf=SMALL_BUF)
    client = await HboneClient.connect(
        srv.addr, client_ctx(client_svid), SERVER_ID, sock_factory=small_buffers
    )
    await client.open_stream(("127.0.0.1", 9))
    assert client._proto.transport is not None
    client._proto.transport.pause_reading()  # the client stops reading
    await assert_eventually(lambda: len(srv.server._conns) == 1)
    server_proto = next(iter(srv.server._conns))
    await assert_eventually(lambda: not server_proto._can_write.is_set())  # the handler is parked
    client._proto.transport.abort()  # RST: the client is gone
    await assert_eventually(lambda: not srv.server._conns, timeout=2)  # serve returned
    assert len(ended) == 1 and isinstance(ended[0], TunnelError)
    await client.close()


# -- the pool and connections it closes itself -----------------------------------------------------


def pool_dialling(client_svid: Svid, made: list[HboneClient]) -> Callable[[PoolKey], Awaitable[HboneClient]]:
    ctx = client_ctx(client_svid)

    async def dial(key: PoolKey) -> HboneClient:
        client = await HboneClient.connect(key.dst_addr, ctx, key.dst_identity)
        made.append(client)
        return client

    return dial


async def test_a_connection_the_reaper_is_closing_is_not_handed_out(
    running: Start, client_svid: Svid
) -> None:
    """A stream asked for while the reaper closes the idle connection of its key gets a new
    connection, not the closing one (whose CONNECT h2 would refuse with a ProtocolError)."""
    srv = running(echo)
    made: list[HboneClient] = []
    now = [0.0]
    pool = HbonePool(pool_dialling(client_svid, made), idle_timeout=300, clock=lambda: now[0])
    key = PoolKey(CLIENT_ID, SERVER_ID, srv.addr)
    (await pool.open_stream(key, ("127.0.0.1", 1))).close()
    assert await pool.reap() == 0  # the idle clock starts
    now[0] = 300
    reaper = asyncio.create_task(pool.reap())
    try:
        await asyncio.sleep(0)  # the reaper is in the idle connection's close()
        transport = made[0]._proto.transport
        assert transport is not None and transport.is_closing()
        assert not made[0].usable  # draining from close(), not only from connection_lost
        with pytest.raises(TunnelError):
            made[0].start_stream(("127.0.0.1", 1))
        assert made[0].active_streams == 0  # the refused CONNECT holds no stream slot
        stream = await pool.open_stream(key, ("127.0.0.1", 2))
        await stream.write(b"hello")
        assert await asyncio.wait_for(stream.read(), 5) == b"hello"
        stream.close()
        assert await reaper == 1
        assert len(made) == 2 and pool.connection_count(key) == 1
    finally:
        await asyncio.gather(reaper, return_exceptions=True)
        await pool.close()


async def test_closing_the_pool_while_the_reaper_closes_a_connection_closes_them_all(
    running: Start, client_svid: Svid
) -> None:
    """A pod removed (Outbound.close_pool) while the reaper closes one of its idle connections: the
    pool's close does not trip over the reaper's changes and closes every connection."""
    srv = running(echo)
    made: list[HboneClient] = []
    now = [0.0]
    pool = HbonePool(pool_dialling(client_svid, made), idle_timeout=300, clock=lambda: now[0])
    idle = PoolKey(CLIENT_ID, SERVER_ID, srv.addr)
    busy = PoolKey(SpiffeId.for_workload(TD, "default", "client2"), SERVER_ID, srv.addr)
    (await pool.open_stream(idle, ("127.0.0.1", 1))).close()
    carried = await pool.open_stream(busy, ("127.0.0.1", 2))  # still carrying a stream
    assert await pool.reap() == 0
    now[0] = 300
    reaper = asyncio.create_task(pool.reap())
    try:
        await asyncio.sleep(0)  # the reaper is in the idle connection's close()
        await pool.close()
        assert len(made) == 2 and not any(c.usable for c in made)
        with pytest.raises(TunnelError):
            await carried.read()  # its connection was closed under it
        assert await reaper == 1
    finally:
        await asyncio.gather(reaper, return_exceptions=True)
        for c in made:
            await c.close()


# -- a graceful GOAWAY from the peer (RFC 9113 §6.8) ----------------------------------------------


class DrainingServer(asyncio.Protocol):
    """Plain h2: answers a CONNECT with 200, then drains as ztunnel (Rust h2) does: GOAWAY NO_ERROR
    naming that stream as processed, then the stream's last bytes and END_STREAM, and it still
    takes the stream's bytes (the GOAWAY is written as a raw frame: h2 would stop receiving)."""

    def __init__(self) -> None:
        self.received: list[h2.events.Event] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        events = self.conn.receive_data(data)
        self.received += events
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.conn.send_headers(event.stream_id, [(b":status", b"200")])
                asyncio.get_running_loop().call_later(0.05, self.drain, event.stream_id)
        self.transport.write(self.conn.data_to_send())

    def drain(self, sid: int) -> None:
        self.transport.write(hyperframe.frame.GoAwayFrame(0, last_stream_id=sid, error_code=0).serialize())
        self.conn.send_data(sid, b"last bytes", end_stream=True)
        self.transport.write(self.conn.data_to_send())


async def test_a_stream_a_graceful_goaway_spares_completes_then_the_connection_closes(
    server_svid: Svid, client_svid: Svid
) -> None:
    servers: list[DrainingServer] = []

    def make() -> DrainingServer:
        servers.append(DrainingServer())
        return servers[-1]

    context = tls.server_context(server_svid.chain, server_svid.key, server_svid.bundle)
    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0, ssl=context)
    try:
        client = await HboneClient.connect(
            server.sockets[0].getsockname()[:2], client_ctx(client_svid), SERVER_ID
        )
        stream = await client.open_stream(("127.0.0.1", 9))
        async with asyncio.timeout(2):
            assert await stream.read() == b"last bytes"
            assert await stream.read() == b""
        assert not client.usable and not client.closed.done()  # draining: no new stream
        with pytest.raises(TunnelError):
            client.start_stream(("127.0.0.1", 10))
        await stream.write(b"our last bytes")  # the spared stream still sends
        stream.write_eof()  # its last stream ended: the connection closes
        await asyncio.wait_for(asyncio.shield(client.closed), 2)
        terminated = [e for e in servers[0].received if isinstance(e, h2.events.ConnectionTerminated)]
        assert all(e.error_code == h2.errors.ErrorCodes.NO_ERROR for e in terminated)  # no PROTOCOL_ERROR
        assert any(
            isinstance(e, h2.events.DataReceived) and e.data == b"our last bytes" for e in servers[0].received
        )
        await client.close()
    finally:
        server.close()
        await server.wait_closed()


# -- a stopping server, a cancelled CONNECT ----------------------------------------------------------


async def test_a_server_whose_connection_task_is_cancelled_sends_goaway_and_the_pool_redials(
    server_svid: Svid, client_svid: Svid
) -> None:
    """The agent stopping cancels the tasks serving its 15008 sockets (NodeProxy.stop). Each of
    their connections then ends with GOAWAY NO_ERROR and is closed, so the peer's pool stops using it
    at once and dials a new one for its next stream (before: the connection stayed open without
    GOAWAY until the process exited, and a new CONNECT on it waited for the answer timeout)."""
    context = tls.server_context(server_svid.chain, server_svid.key, server_svid.bundle)

    async def pick(ip: IpAddress) -> ssl.SSLContext | None:
        return context

    server = HboneServer(pick, echo, TD)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    serving: list[asyncio.Task[None]] = []

    async def accept_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(lsock)
            serving.append(loop.create_task(server.serve(conn)))

    acceptor = loop.create_task(accept_loop())
    made: list[HboneClient] = []
    pool = HbonePool(pool_dialling(client_svid, made), answer_timeout=10)
    key = PoolKey(CLIENT_ID, SERVER_ID, lsock.getsockname())
    try:
        first = await pool.open_stream(key, ("127.0.0.1", 1))
        await first.write(b"one")
        assert await first.read() == b"one"
        first.close()
        await assert_eventually(lambda: made[0].active_streams == 0)
        old = made[0]
        assert len(serving) == 1
        stopped = time.monotonic()
        serving[0].cancel()  # what NodeProxy.stop() does to the task serving a 15008 socket
        await asyncio.gather(serving[0], return_exceptions=True)
        async with asyncio.timeout(2):  # far under the 10 s answer timeout
            await asyncio.shield(old.closed)
        assert old._proto.goaway and not old.usable
        assert time.monotonic() - stopped < 1.0
        async with asyncio.timeout(2):
            second = await pool.open_stream(key, ("127.0.0.1", 2))
        assert len(made) == 2 and made[1] is not old  # a new connection, not the stopped one
        await second.write(b"two")
        assert await second.read() == b"two"
        second.close()
    finally:
        await pool.close()
        acceptor.cancel()
        for t in serving:
            t.cancel()
        await asyncio.gather(acceptor, *serving, return_exceptions=True)
        lsock.close()


async def test_a_cancelled_connect_waiting_for_its_answer_resets_its_stream(
    running: Callable[[Handler], Running], client_svid: Svid
) -> None:
    """A caller that gives up on `HbonePool.open_stream` (its own client went away, its task was
    cancelled) while the CONNECT waits for the answer: the stream is reset (RST_STREAM CANCEL), so
    the server cancels the handler still dialling (counted abandoned) instead of serving a stream
    nobody reads; the connection serves the next stream."""
    dials = StuckDials()
    srv = running(dials)
    made: list[HboneClient] = []
    pool = HbonePool(pool_dialling(client_svid, made), answer_timeout=60)
    key = PoolKey(CLIENT_ID, SERVER_ID, srv.addr)
    opener = asyncio.create_task(pool.open_stream(key, ("127.0.0.1", 7)))
    try:
        await dials.wait_started(1)
        opener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opener
        await assert_eventually(lambda: dials.cancelled == 1 and dials.running == 0, timeout=2)
        assert made[0].active_streams == 0  # its slot is free too
        stream = await pool.open_stream(key, ("127.0.0.1", 8))
        await stream.write(b"next")
        assert await stream.read() == b"next"
        assert len(made) == 1
        stream.close()
    finally:
        await pool.close()
