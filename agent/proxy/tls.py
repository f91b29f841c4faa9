"""TLS settings for HBONE: mutual TLS 1.3, ALPN h2, mesh-root verification, SPIFFE identity checks.

Both ends require a certificate that chains to the mesh trust bundle (OpenSSL verifies the chain);
the hostname check is off and no SNI is sent, because peers are named by SPIFFE ID, which Python's
`ssl` does not check: `peer_spiffe_id` does it after the handshake, before a single byte is forwarded.
Certificates and keys stay in memory: `ssl` loads them from an anonymous memfd, never a file on disk.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.proxy.hbone import ALPN_H2
from api.spiffe import SpiffeId, svid_spiffe_id


class PeerIdentityError(Exception):
    """The TLS peer is not who it must be: no certificate, not an SVID, wrong trust domain or identity."""

    def __init__(self, reason: str, *, peer: str = "") -> None:
        super().__init__(f"peer identity rejected: {reason}" + (f" peer={peer}" if peer else ""))
        self.reason = reason
        self.peer = peer


def _key_pem(key: PrivateKeyTypes | bytes) -> bytes:
    if isinstance(key, bytes):
        return key
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _chain_pem(chain: bytes | Iterable[bytes]) -> bytes:
    if isinstance(chain, bytes):
        return chain
    return b"".join(part if part.endswith(b"\n") else part + b"\n" for part in chain)


@contextlib.contextmanager
def _memfd_path(data: bytes) -> Iterator[str]:
    """A path `ssl` can open that names an anonymous in-memory file (closed on exit)."""
    fd = os.memfd_create("nodemesh-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _context(
    protocol: int, chain: bytes | Iterable[bytes], key: PrivateKeyTypes | bytes, bundle_pem: bytes
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are SPIFFE IDs, checked by peer_spiffe_id after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN_H2])
    # No resumption: every connection shows its certificate (a resumed one shows none, and OpenSSL
    # checks no expiry on it). On TLS 1.3 OP_NO_TICKET alone only makes the tickets stateful; the
    # server context also issues none (`num_tickets = 0`, server_context).
    ctx.options |= ssl.OP_NO_TICKET
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise ValueError(f"unusable trust bundle: {exc}") from exc
    cert_and_key = _chain_pem(chain) + b"\n" + _key_pem(key)
    with _memfd_path(cert_and_key) as path:
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as exc:
            raise ValueError(f"certificate chain and key do not load or do not match: {exc}") from exc
    return ctx


def server_context(
    cert_chain_pem: bytes | Iterable[bytes], key: PrivateKeyTypes | bytes, bundle_pem: bytes
) -> ssl.SSLContext:
    """The context a destination workload's HBONE listener presents (client certificate required)."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, cert_chain_pem, key, bundle_pem)
    # No TLS 1.3 session tickets at all: a client resuming one would skip its certificate, so an
    # expired SVID (expiry is how the mesh revokes) would still pass as its identity.
    ctx.num_tickets = 0
    return ctx


def client_context(
    cert_chain_pem: bytes | Iterable[bytes], key: PrivateKeyTypes | bytes, bundle_pem: bytes
) -> ssl.SSLContext:
    """The context a source workload's HBONE connection uses; wrap with `server_hostname=None` (no SNI)."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, cert_chain_pem, key, bundle_pem)


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str | None = None) -> SpiffeId:
    """The SPIFFE ID of a handshaken peer, checked as an SVID verifier does; PeerIdentityError if not.

    OpenSSL has already verified the chain against the bundle (CERT_REQUIRED); here the leaf is checked
    for SVID rules (one URI SAN, CA=false, key usage) and, when given, the trust domain.
    """
    if ssl_object.selected_alpn_protocol() != ALPN_H2:
        raise PeerIdentityError(f"ALPN {ssl_object.selected_alpn_protocol()!r} negotiated, need 'h2'")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("no peer certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        spiffe_id = svid_spiffe_id(cert)
    except ValueError as exc:  # api.spiffe's errors derive from ValueError
        raise PeerIdentityError(f"not a valid X.509-SVID: {exc}") from exc
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"trust domain {spiffe_id.trust_domain!r} is not {trust_domain!r}", peer=str(spiffe_id)
        )
    return spiffe_id


def check_server_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: SpiffeId | Iterable[SpiffeId]
) -> SpiffeId:
    """Client side: the server must be (one of) the destination's expected identities."""
    allowed = {expected} if isinstance(expected, SpiffeId) else set(expected)
    peer = peer_spiffe_id(ssl_object)
    if peer not in allowed:
        names = ", ".join(sorted(str(s) for s in allowed))
        raise PeerIdentityError(f"server is not the expected identity ({names})", peer=str(peer))
    return peer
