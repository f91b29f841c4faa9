"""A proxied connection end to end, under random app behaviour: app ↔ pipe ↔ HBONE (real TLS) ↔ pipe ↔ app.

The path of a connection between nodes, minus the eBPF steering: a client app's TCP connection
spliced to an HBONE stream (the outbound side), the stream carried over a real TLS connection with
real mesh certificates to an `HboneServer`, whose handler splices the stream to the server app's
TCP connection (the inbound side). Hypothesis plays the two apps and the proxies: sends,
reads, half-closes, closes (graceful or reset), a proxy closing its pipe (as on a policy change
that now denies the connection), a dropped HBONE connection, in any order. Afterwards:
- what each app received is a prefix of what the other sent, in order; with no close, reset, kill
  or drop, all of it, and each app sees the other's half-close;
- both pipes end, and once a pipe ends its app sees the connection end (EOF or reset);
- every byte counted in the process's receive budget is given back, and the server's connection
  ends once the client's closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy import tls
from agent.proxy.hbone import ConnectTarget, IpAddress, Status, canonical_ip
from agent.proxy.pipe import SocketEnd, StreamEnd, splice
from agent.proxy.tunnel import RECEIVE_BUDGET, HboneClient, HboneServer, ServerStream
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"
SERVER_ID = SpiffeId.for_workload(TD, "default", "server")
CLIENT_ID = SpiffeId.for_workload(TD, "default", "client")
SETTLE = 5.0  # seconds anything may take to happen once it is due (a bound, not a sleep)
SEND_FOR = 0.1  # seconds an app keeps sending what the path takes
# both ends PING as the proxy's do (outbound.HBONE_KEEPALIVE_*), faster: under uvloop that is what
# notices a peer's reset on a connection writing nothing (tunnel._H2Protocol.start_keepalive)
KEEPALIVE = (0.2, 1.0)


@dataclass
class Contexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> Contexts:
    ca = CertificateAuthority.load_or_create(Path(tmp_path_factory.mktemp("ca")), TD)

    def context(spiffe_id: SpiffeId, server: bool) -> ssl.SSLContext:
        key, csr = new_workload_csr(spiffe_id)
        issued = ca.sign(ca.validate_csr(csr))
        make = tls.server_context if server else tls.client_context
        return make(issued.chain_pem, key, ca.trust_bundle_pem())

    return Contexts(context(SERVER_ID, True), context(CLIENT_ID, False))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair, both non-blocking."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


@dataclass
class App:
    """The test's end of an app's TCP connection (the proxy holds the other)."""

    sock: socket.socket
    sent: bytearray = field(default_factory=bytearray)
    got: bytearray = field(default_factory=bytearray)
    eof: bool = False  # the proxy's side ended (EOF or reset)
    shut: bool = False
    closed: bool = False

    async def send(self, n: int) -> None:
        """Send up to `n` bytes: what the path takes within `SEND_FOR` (a side that does not read
        fills the buffers on the way, and then the path must push back, not take more)."""
        if self.shut or self.closed:
            return
        data = bytes((len(self.sent) + i) % 251 for i in range(n))  # position-dependent: order shows
        loop = asyncio.get_running_loop()
        deadline, done = loop.time() + SEND_FOR, 0
        while done < n:
            try:
                done += self.sock.send(data[done:])
            except BlockingIOError:
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.002)
            except OSError:  # the proxy reset it
                self.eof = True
                break
        self.sent += data[:done]

    def read(self) -> None:
        while not self.eof and not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return
            self.got += data

    def shutdown(self) -> None:
        if not self.shut and not self.closed:
            self.shut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def close(self, reset: bool) -> None:
        if not self.closed:
            if reset:  # RST instead of FIN
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
            self.closed = True


async def eventually(cond: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    while not cond():
        assert loop.time() < deadline, f"not in {SETTLE} s: {what}"
        await asyncio.sleep(0.002)


@dataclass
class Proxied:
    """One proxied connection: the apps, the two pipes and the HBONE connection under them."""

    client_app: App
    server_app: App
    client: HboneClient
    client_pipe: asyncio.Task[str]
    server_pipe: asyncio.Future[str]
    # what the proxy does to a connection a policy change now denies (`Tracked.kill`): both ends closed
    kills: dict[str, Callable[[], None]]
    serve: asyncio.Task[None]


async def open_path(contexts: Contexts) -> Proxied:
    loop = asyncio.get_running_loop()
    server_app_sock: asyncio.Future[socket.socket] = loop.create_future()
    server_pipe: asyncio.Future[str] = loop.create_future()
    kills: dict[str, Callable[[], None]] = {}

    def killer(*ends: SocketEnd | StreamEnd) -> Callable[[], None]:
        def kill() -> None:
            for end in ends:
                end.close()

        return kill

    async def pick(ip: IpAddress) -> ssl.SSLContext | None:
        return contexts.server if ip == canonical_ip("127.0.0.1") else None

    async def to_app(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
        proxy_side, app_side = tcp_pair()
        _, end = await loop.connect_accepted_socket(SocketEnd, sock=proxy_side)
        server_app_sock.set_result(app_side)
        stream.respond(Status.OK)
        hbone_end = StreamEnd(stream)
        kills["s"] = killer(hbone_end, end)
        server_pipe.set_result(await splice(hbone_end, end, lambda n: None, lambda n: None))
        return None

    server = HboneServer(pick, to_app, TD, keepalive=KEEPALIVE)
    hbone_client_sock, hbone_server_sock = tcp_pair()
    serve = loop.create_task(server.serve(hbone_server_sock))
    client = await HboneClient.connect(
        hbone_server_sock.getsockname(), contexts.client, SERVER_ID, sock=hbone_client_sock
    )
    client.start_keepalive(*KEEPALIVE)
    stream = await client.open_stream(("127.0.0.1", 9))
    proxy_side, app_side = tcp_pair()
    _, end = await loop.connect_accepted_socket(SocketEnd, sock=proxy_side)
    hbone_end = StreamEnd(stream)
    kills["c"] = killer(end, hbone_end)
    client_pipe = loop.create_task(splice(end, hbone_end, lambda n: None, lambda n: None))
    return Proxied(App(app_side), App(await server_app_sock), client, client_pipe, server_pipe, kills, serve)


# what hypothesis does: (kind, side, amount); `close` with amount 1 resets the connection
actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("send"),
            st.sampled_from(["c", "s"]),
            st.sampled_from([1, 1000, 60000, 1_000_000, 4_000_000]),
        ),
        st.tuples(st.just("read"), st.sampled_from(["c", "s"]), st.just(0)),
        st.tuples(st.just("shut"), st.sampled_from(["c", "s"]), st.just(0)),
        st.tuples(st.just("close"), st.sampled_from(["c", "s"]), st.sampled_from([0, 1])),
        st.tuples(st.just("kill"), st.sampled_from(["c", "s"]), st.just(0)),
        st.tuples(st.just("drop_hbone"), st.just("c"), st.just(0)),
        st.tuples(st.just("pause"), st.just("c"), st.sampled_from([0, 5])),
    ),
    max_size=12,
)


async def play(contexts: Contexts, steps: list[tuple[str, str, int]]) -> None:
    baseline = RECEIVE_BUDGET.used
    path = await open_path(contexts)
    apps = {"c": path.client_app, "s": path.server_app}
    broken = False  # a close, reset, kill or drop happened: delivery may stop short
    severed = False  # a reset, kill or drop: both pipes must end on their own, whatever the apps do next
    try:
        for kind, side, amount in steps:
            app = apps[side]
            if kind == "send":
                await app.send(amount)
            elif kind == "read":
                app.read()
            elif kind == "shut":
                app.shutdown()
            elif kind == "close":
                # a reset severs, unless the app had half-closed: the proxy no longer reads a socket
                # that sent its EOF, so it sees the reset only when it next writes there
                severed = bool(amount) and not (app.shut or app.closed)
                app.close(reset=bool(amount))
                broken = True
            elif kind == "kill":
                path.kills[side]()
                broken = severed = True
            elif kind == "drop_hbone":
                transport = path.client._proto.transport
                assert transport is not None
                transport.abort()
                broken = severed = True
            else:
                await asyncio.sleep(amount / 1000)
            await asyncio.sleep(0)
            if severed:  # the apps do nothing more: neither may be what ends the pipes
                await eventually(path.client_pipe.done, "the client pipe ends on its own")
                await eventually(path.server_pipe.done, "the server pipe ends on its own")
                break
        if not broken:  # both half-close; each must get all the other sent, then the other's EOF
            for app in apps.values():
                app.shutdown()
            await eventually(lambda: all((a.read(), a.eof)[1] for a in apps.values()), "both EOFs")
            assert path.client_app.got == path.server_app.sent
            assert path.server_app.got == path.client_app.sent
            assert await path.client_pipe == "" and await path.server_pipe == ""
        else:
            # a broken connection ends both pipes once the apps end their sides and take what is
            # still on its way (a graceful close lets it all through first); each app sees the end
            for app in apps.values():
                app.shutdown()

            def ended() -> bool:
                for app in apps.values():
                    app.read()
                pipes = path.client_pipe.done() and path.server_pipe.done()
                return pipes and all(a.closed or a.eof for a in apps.values())

            await eventually(ended, "both pipes end and the apps see it")
            # whatever arrived came in order and nothing was made up
            assert path.server_app.sent.startswith(path.client_app.got)
            assert path.client_app.sent.startswith(path.server_app.got)
    finally:
        for app in apps.values():
            app.close(reset=False)
        await path.client.close()
        await asyncio.wait_for(path.serve, SETTLE)  # the server's connection ends with the client's
        await asyncio.wait_for(asyncio.shield(path.client_pipe), SETTLE)
    assert RECEIVE_BUDGET.used == baseline, f"receive budget off by {RECEIVE_BUDGET.used - baseline}"


def run(coro: Coroutine[None, None, None], loop: str) -> None:
    """On the event loop the agent runs on (uvloop, `--event-loop auto`) or asyncio's."""
    bounded = asyncio.wait_for(coro, 30)
    if loop == "uvloop":
        uvloop.run(bounded)
    else:
        asyncio.run(bounded)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions)
def test_a_proxied_connection_delivers_in_order_and_ends_cleanly_whatever_the_apps_do(
    contexts: Contexts, loop: str, steps: list[tuple[str, str, int]]
) -> None:
    run(play(contexts, steps), loop)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_reset_tunnel_ends_the_serving_pipe_while_its_app_is_idle(contexts: Contexts, loop: str) -> None:
    """The client's HBONE connection is reset (aborted with bytes unread) after 4 MB went to a
    server app that reads nothing and sends nothing, so the serving side has nothing to write. Under
    uvloop, when the reset comes with the last bytes read, the poll handle is closed at the next poll
    (POLLERR) without calling the reader, and the pipe and the app's connection stayed open for
    good; the serving side's keepalive PING now finds the reset."""
    run(play(contexts, [("send", "c", 4_000_000), ("drop_hbone", "c", 0)]), loop)


def test_a_clean_exchange_delivers_everything_both_ways(contexts: Contexts) -> None:
    steps = [("send", "c", 60000), ("send", "s", 20000), ("read", "s", 0), ("read", "c", 0)]
    run(play(contexts, steps), "uvloop")
