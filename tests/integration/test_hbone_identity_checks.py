"""HBONE peer identity checks against hostile certificates, real TLS over loopback TCP.

Client side: `HboneClient.connect` against a plain `ssl` server presenting a crafted certificate.
Server side: `HboneServer.serve` against a plain `ssl` client presenting a crafted certificate.
Contexts: ProxyCore._context's caching when the trust bundle or the certificate changes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.proxy import tls
from agent.proxy.hbone import IpAddress
from agent.proxy.tls import PeerIdentityError
from agent.proxy.tunnel import HboneClient, HboneServer, TunnelError
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.ca import keystore
from controller.ca.authority import CertificateAuthority

TD = "cluster.local"
SERVER_ID = SpiffeId.for_workload(TD, "ns1", "server")
OTHER_ID = SpiffeId.for_workload(TD, "ns1", "other")
CLIENT_ID = SpiffeId.for_workload(TD, "ns2", "client")
NOW = datetime.now(UTC)


@dataclass
class Svid:
    chain: list[bytes]
    key: ec.EllipticCurvePrivateKey


def issue(ca: CertificateAuthority, sid: SpiffeId, ttl: timedelta | None = None) -> Svid:
    key, csr = new_workload_csr(sid)
    return Svid(ca.sign(ca.validate_csr(csr), ttl).chain_pem, key)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_root(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Another self-signed root, as the CA makes its own (not in the mesh's trust bundle)."""
    return keystore.new_root(name, NOW)


def leaf(
    issuer: tuple[x509.Certificate, object],
    sans: list[x509.GeneralName] | None,
    *,
    not_before: datetime = NOW - timedelta(minutes=5),
    not_after: datetime = NOW + timedelta(hours=1),
    ca: bool = False,
    key_cert_sign: bool = False,
) -> Svid:
    icert, ikey = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]) if sans else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(icert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, key_cert_sign, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(icert.public_key()), critical=False  # type: ignore[arg-type]
        )
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return Svid([pem(b.sign(ikey, hashes.SHA256()))], key)  # type: ignore[arg-type]


def uri(sid: SpiffeId | str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(str(sid))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


@pytest.fixture(scope="module")
def mesh(ca: CertificateAuthority) -> tuple[x509.Certificate, object]:
    m = ca._material
    return m.signing_cert, m.signing_key


# -- client side: the server presents something ----------------------------------------------------


class RawTlsServer:
    """Blocking `ssl` server on a thread: handshakes every connection, then holds it briefly."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.errors: list[Exception] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            raw.settimeout(3)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    s.recv(1)
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(exc)

    def close(self) -> None:
        self.listener.close()


def load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    """Give a stock `ssl` context this SVID (ssl loads a chain and key from a file only)."""
    key = svid.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tempfile.NamedTemporaryFile() as f:
        f.write(b"".join(svid.chain) + key)
        f.flush()
        ctx.load_cert_chain(f.name)


def raw_server_ctx(
    svid: Svid, bundle: bytes, *, alpn: tuple[str, ...] | None = ("h2",), tls12: bool = False
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=bundle.decode())
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    load_svid(ctx, svid)
    return ctx


async def client_against(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, expected: SpiffeId) -> None:
    srv = RawTlsServer(server_ctx)
    try:
        c = await HboneClient.connect(srv.addr, client_ctx, expected, handshake_timeout=3)
        await c.close()
    finally:
        srv.close()


def client_cases(ca: CertificateAuthority, mesh) -> dict[str, tuple[Svid, dict]]:
    foreign = new_root("foreign")
    return {
        "another identity": (issue(ca, OTHER_ID), {}),
        "DNS SAN only": (leaf(mesh, [x509.DNSName("server.ns1.svc")]), {}),
        "DNS SAN plus the expected URI as CN-less second name": (
            leaf(mesh, [x509.DNSName("x"), uri(OTHER_ID)]),
            {},
        ),
        "no SAN": (leaf(mesh, None), {}),
        "two URI SANs incl. expected": (leaf(mesh, [uri(SERVER_ID), uri(OTHER_ID)]), {}),
        "expired": (leaf(mesh, [uri(SERVER_ID)], not_after=NOW - timedelta(minutes=1),
                         not_before=NOW - timedelta(hours=2)), {}),
        "not yet valid": (leaf(mesh, [uri(SERVER_ID)], not_before=NOW + timedelta(hours=1),
                               not_after=NOW + timedelta(hours=2)), {}),
        "CA cert as leaf": (leaf(mesh, [uri(SERVER_ID)], ca=True, key_cert_sign=True), {}),
        "CA=true without keyCertSign": (leaf(mesh, [uri(SERVER_ID)], ca=True), {}),
        "foreign CA": (leaf(foreign, [uri(SERVER_ID)]), {}),
        "foreign trust domain": (leaf(mesh, [uri("spiffe://evil.org/ns/ns1/sa/server")]), {}),
        "uppercase trust domain": (leaf(mesh, [uri("spiffe://CLUSTER.local/ns/ns1/sa/server")]), {}),
        "no ALPN": (issue(ca, SERVER_ID), {"alpn": None}),
        "ALPN http/1.1": (issue(ca, SERVER_ID), {"alpn": ("http/1.1",)}),
        "TLS 1.2": (issue(ca, SERVER_ID), {"tls12": True}),
    }


CLIENT_CASES = [
    "another identity", "DNS SAN only", "DNS SAN plus the expected URI as CN-less second name", "no SAN",
    "two URI SANs incl. expected", "expired", "not yet valid", "CA cert as leaf",
    "CA=true without keyCertSign", "foreign CA", "foreign trust domain", "uppercase trust domain",
    "no ALPN", "ALPN http/1.1", "TLS 1.2",
]


async def test_client_accepts_the_expected_server(ca: CertificateAuthority) -> None:
    bundle = ca.trust_bundle_pem()
    cli = issue(ca, CLIENT_ID)
    await client_against(
        raw_server_ctx(issue(ca, SERVER_ID), bundle),
        tls.client_context(cli.chain, cli.key, bundle),
        SERVER_ID,
    )


@pytest.mark.parametrize("case", CLIENT_CASES)
async def test_client_refuses_server(ca: CertificateAuthority, mesh, case: str) -> None:
    bundle = ca.trust_bundle_pem()
    cli = issue(ca, CLIENT_ID)
    svid, opts = client_cases(ca, mesh)[case]
    with pytest.raises((PeerIdentityError, ssl.SSLError, TunnelError)):
        await client_against(
            raw_server_ctx(svid, bundle, **opts), tls.client_context(cli.chain, cli.key, bundle), SERVER_ID
        )


# -- server side: the client presents something ----------------------------------------------------


async def server_against(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    addr = listener.getsockname()
    accepted: list[bool] = []

    async def pick(_ip: IpAddress) -> ssl.SSLContext:
        return server_ctx

    async def on_stream(*_: object) -> int:
        return 503

    def established() -> bool:
        accepted.append(True)
        return False

    def client() -> None:
        raw = socket.create_connection(addr, timeout=3)
        try:
            with client_ctx.wrap_socket(raw, server_hostname=None) as s:
                s.recv(1024)
        except (ssl.SSLError, OSError):
            pass
        finally:
            raw.close()

    loop = asyncio.get_running_loop()
    t = asyncio.create_task(asyncio.to_thread(client))
    sock, _ = await loop.sock_accept(listener)
    await HboneServer(pick, on_stream, TD, handshake_timeout=3).serve(sock, established)
    await t
    listener.close()
    return bool(accepted)


def raw_client_ctx(
    svid: Svid | None, bundle: bytes, *, alpn: tuple[str, ...] | None = ("h2",)
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if svid is not None:
        load_svid(ctx, svid)
    return ctx


async def test_server_accepts_a_mesh_client(ca: CertificateAuthority) -> None:
    bundle = ca.trust_bundle_pem()
    srv = issue(ca, SERVER_ID)
    assert await server_against(
        tls.server_context(srv.chain, srv.key, bundle), raw_client_ctx(issue(ca, CLIENT_ID), bundle)
    )


@pytest.mark.parametrize(
    "case", ["no cert", "foreign trust domain", "foreign CA", "expired", "no ALPN", "DNS SAN only", "CA leaf"]
)
async def test_server_refuses_client(ca: CertificateAuthority, mesh, case: str) -> None:
    bundle = ca.trust_bundle_pem()
    srv = issue(ca, SERVER_ID)
    svid: Svid | None
    alpn: tuple[str, ...] | None = ("h2",)
    if case == "no cert":
        svid = None
    elif case == "foreign trust domain":
        svid = leaf(mesh, [uri("spiffe://evil.org/ns/ns2/sa/client")])
    elif case == "foreign CA":
        svid = leaf(new_root("foreign"), [uri(CLIENT_ID)])
    elif case == "expired":
        svid = leaf(
            mesh, [uri(CLIENT_ID)], not_before=NOW - timedelta(hours=2), not_after=NOW - timedelta(minutes=1)
        )
    elif case == "no ALPN":
        svid, alpn = issue(ca, CLIENT_ID), None
    elif case == "DNS SAN only":
        svid = leaf(mesh, [x509.DNSName("client")])
    else:
        svid = leaf(mesh, [uri(CLIENT_ID)], ca=True, key_cert_sign=True)
    accepted = await server_against(
        tls.server_context(srv.chain, srv.key, bundle), raw_client_ctx(svid, bundle, alpn=alpn)
    )
    assert not accepted, f"HBONE server authenticated a client with {case}"


# -- ProxyCore context cache -----------------------------------------------------------------------


async def test_cached_client_context_drops_a_removed_root(ca: CertificateAuthority, mesh) -> None:
    """After a root leaves the bundle, the cached client context must stop trusting it."""
    from agent.proxy.core import ProxyCore

    old_root = new_root("old-root")
    old_server = leaf(old_root, [uri(SERVER_ID)])
    cli = issue(ca, CLIENT_ID)
    state = {"bundle": ca.trust_bundle_pem() + pem(old_root[0])}

    class Certs:
        from agent.identity import WorkloadCertificate as _WC

        cert = _WC(spiffe_id=CLIENT_ID, chain_pem=cli.chain, key=cli.key,  # type: ignore[call-arg]
                   not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(hours=1))

        def certificate(self, identity: SpiffeId):
            return self.cert

    core = ProxyCore.__new__(ProxyCore)
    core.certs = Certs()  # type: ignore[assignment]
    core.bundle = lambda: state["bundle"]
    core._client_ctx = {}
    core._server_ctx = {}
    core.cert_wait = 0.1

    ctx1 = await core.client_context(CLIENT_ID)
    await client_against(raw_server_ctx(old_server, state["bundle"]), ctx1, SERVER_ID)  # trusted: fine

    state["bundle"] = ca.trust_bundle_pem()  # rotation done: old root removed
    ctx2 = await core.client_context(CLIENT_ID)
    assert ctx2 is not ctx1
    with pytest.raises(ssl.SSLError):
        await client_against(raw_server_ctx(old_server, state["bundle"]), ctx2, SERVER_ID)
