"""HBONE TLS contexts and SPIFFE peer checks, with both ends handshaking over memory BIOs (no sockets)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.proxy import tls
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"
SERVER_ID = SpiffeId.for_workload(TD, "ns1", "server")
CLIENT_ID = SpiffeId.for_workload(TD, "ns2", "client")


@dataclass
class Svid:
    chain: list[bytes]
    key: ec.EllipticCurvePrivateKey


def issue(ca: CertificateAuthority, sid: SpiffeId) -> Svid:
    key, csr = new_workload_csr(sid)
    return Svid(ca.sign(ca.validate_csr(csr)).chain_pem, key)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake in memory; raises ssl.SSLError from whichever side refuses."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=None)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(10):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            return server, client
    raise AssertionError("handshake did not finish")


def test_mutual_tls13_h2_without_sni(ca: CertificateAuthority) -> None:
    srv, cli = issue(ca, SERVER_ID), issue(ca, CLIENT_ID)
    bundle = ca.trust_bundle_pem()
    server, client = handshake(
        tls.server_context(srv.chain, srv.key, bundle), tls.client_context(cli.chain, cli.key, bundle)
    )
    assert client.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == "h2"
    assert server.server_hostname is None  # no SNI reached the server
    assert tls.peer_spiffe_id(server, TD) == CLIENT_ID
    assert tls.check_server_identity(client, SERVER_ID) == SERVER_ID


def test_client_rejects_unexpected_server_identity(ca: CertificateAuthority) -> None:
    srv, cli = issue(ca, SERVER_ID), issue(ca, CLIENT_ID)
    bundle = ca.trust_bundle_pem()
    _, client = handshake(
        tls.server_context(srv.chain, srv.key, bundle), tls.client_context(cli.chain, cli.key, bundle)
    )
    with pytest.raises(tls.PeerIdentityError, match="not the expected identity") as err:
        tls.check_server_identity(client, [CLIENT_ID])
    assert err.value.peer == str(SERVER_ID)


def test_server_rejects_other_trust_domain(ca: CertificateAuthority) -> None:
    srv, cli = issue(ca, SERVER_ID), issue(ca, CLIENT_ID)
    bundle = ca.trust_bundle_pem()
    server, _ = handshake(
        tls.server_context(srv.chain, srv.key, bundle), tls.client_context(cli.chain, cli.key, bundle)
    )
    with pytest.raises(tls.PeerIdentityError, match="trust domain"):
        tls.peer_spiffe_id(server, "other.domain")


def test_certificate_from_an_untrusted_ca_fails_the_handshake(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(tmp_path, TD)
    srv, rogue = issue(ca, SERVER_ID), issue(other, CLIENT_ID)
    bundle = ca.trust_bundle_pem()
    with pytest.raises(ssl.SSLError):
        handshake(
            tls.server_context(srv.chain, srv.key, bundle), tls.client_context(rogue.chain, rogue.key, bundle)
        )


def test_bad_material_gives_a_clear_error(ca: CertificateAuthority) -> None:
    srv = issue(ca, SERVER_ID)
    other_key, _ = new_workload_csr(SERVER_ID)
    with pytest.raises(ValueError, match="do not load or do not match"):
        tls.server_context(srv.chain, other_key, ca.trust_bundle_pem())
    with pytest.raises(ValueError, match="unusable trust bundle"):
        tls.client_context(srv.chain, srv.key, b"not a pem")
