"""The HBONE server makes every client show (and OpenSSL verify) its certificate: no resumption.

With TLS 1.3 in OpenSSL >= 1.1.1, OP_NO_TICKET alone does not stop tickets: it switches to
stateful ones (the session stays in the server context's cache, 7200 s, 2 tickets per handshake).
A client could resume with the ticket's key and present no certificate; the server reported the
original session's certificate without checking it again, so an expired SVID kept passing as its
identity. tls.server_context sets num_tickets = 0.

Real TLS over loopback TCP, `HboneServer.serve` (tls_transport handshake + peer_spiffe_id) on the
server side, the stock `ssl` client (with `session=`) on the other.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from datetime import timedelta

import pytest
from test_hbone_identity_checks import issue

from agent.proxy import tls
from agent.proxy.hbone import IpAddress
from agent.proxy.tunnel import HboneServer
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"
SERVER_ID = SpiffeId.for_workload(TD, "ns1", "server")
CLIENT_ID = SpiffeId.for_workload(TD, "ns2", "client")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


class Harness:
    """One HboneServer context (as ProxyCore caches it per identity) on a loopback listener."""

    def __init__(self, server_ctx: ssl.SSLContext) -> None:
        self.server_ctx = server_ctx
        self.peers: list[SpiffeId | None] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.addr = self.listener.getsockname()

    async def pick(self, _ip: IpAddress) -> ssl.SSLContext:
        return self.server_ctx

    async def serve_one(self) -> HboneServer:
        loop = asyncio.get_running_loop()
        sock, _ = await loop.sock_accept(self.listener)
        server = HboneServer(self.pick, self._on_stream, TD, handshake_timeout=5)
        accepted: list[bool] = []

        def established() -> bool:
            accepted.append(True)
            return False  # authenticated: that is all we want to know; close (GOAWAY)

        await server.serve(sock, established)
        self.accepted = bool(accepted)
        return server

    async def _on_stream(self, *_: object) -> int:
        return 503


def client_connect(
    ctx: ssl.SSLContext, addr: tuple[str, int], session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession | None, Exception | None]:
    """Blocking client: handshake, read the server's first bytes (which carries the tickets)."""
    raw = socket.create_connection(addr, timeout=5)
    try:
        s = ctx.wrap_socket(raw, server_hostname=None, session=session)
        try:
            s.recv(1024)  # SETTINGS from the server; processes NewSessionTicket messages
        except (ssl.SSLError, OSError) as exc:
            return s.session_reused, s.session, exc
        return s.session_reused, s.session, None
    except (ssl.SSLError, OSError) as exc:
        return False, None, exc
    finally:
        raw.close()


async def connect(h: Harness, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None):
    server_task = asyncio.create_task(h.serve_one())
    reused, sess, err = await asyncio.to_thread(client_connect, ctx, h.addr, session)
    server = await server_task
    return reused, sess, err, server


async def test_server_never_resumes_a_session(ca: CertificateAuthority) -> None:
    """Every HBONE connection must run a full handshake with a client certificate (tls.py:69)."""
    srv, cli = issue(ca, SERVER_ID), issue(ca, CLIENT_ID)
    bundle = ca.trust_bundle_pem()
    h = Harness(tls.server_context(srv.chain, srv.key, bundle))
    cctx = tls.client_context(cli.chain, cli.key, bundle)

    _, session, err, _ = await connect(h, cctx)
    assert err is None and h.accepted
    reused, _, _, _ = await connect(h, cctx, session)
    assert not reused, "the HBONE server resumed a TLS 1.3 session: the client showed no certificate"


async def test_expired_client_svid_is_refused_even_when_resuming(ca: CertificateAuthority) -> None:
    """A client whose SVID expired must not be authenticated, by a full handshake or a resumption."""
    srv = issue(ca, SERVER_ID)
    # not_before is back-dated by a minute (CLOCK_SKEW); valid for the next 2 s only
    cli = issue(ca, CLIENT_ID, ttl=timedelta(seconds=2))
    bundle = ca.trust_bundle_pem()
    h = Harness(tls.server_context(srv.chain, srv.key, bundle))
    cctx = tls.client_context(cli.chain, cli.key, bundle)

    _, session, err, _ = await connect(h, cctx)
    assert err is None and h.accepted and session is not None

    time.sleep(3)  # the client certificate has now expired

    # sanity: a full handshake with the expired certificate is refused by OpenSSL
    _, _, _, server = await connect(h, tls.client_context(cli.chain, cli.key, bundle))
    assert not h.accepted and server.handshake_failures == 1

    # the same expired client, resuming the session it got while valid
    reused, _, _, server = await connect(h, cctx, session)
    assert not h.accepted, (
        f"expired client SVID authenticated as {CLIENT_ID} through TLS 1.3 resumption (reused={reused})"
    )
