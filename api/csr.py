"""Agent side of certificate issuance: make a workload key and CSR, check what the CA sent back.

Pure: no I/O. The CSR carries the SPIFFE ID as its only, critical URI SAN and an empty subject,
which is what the controller's CSR policy requires (X509-SVID.md §2, §4).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification

from api.spiffe import SpiffeId, SpiffeIdError, svid_spiffe_id

WorkloadKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class IssuedChainError(ValueError):
    """The certificate chain returned by the CA is unusable for the key and identity we asked for."""


def new_workload_csr(spiffe_id: SpiffeId) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh ECDSA P-256 key and a PEM CSR for ``spiffe_id``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def _spki(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise IssuedChainError(f"unsupported public key type {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_issued_chain(
    chain_pem: list[bytes],
    key: WorkloadKey,
    expected: SpiffeId,
    bundle_pem: bytes,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> x509.Certificate:
    """Return the leaf of ``chain_pem`` after checking it is for ``key`` and ``expected`` and that it
    chains to a root of ``bundle_pem`` and is valid now (signatures, validity windows, CA constraints).

    Raises :class:`IssuedChainError` saying which check failed.
    """
    if not chain_pem:
        raise IssuedChainError("the CA returned an empty certificate chain")
    try:
        certs = [c for pem in chain_pem for c in x509.load_pem_x509_certificates(pem)]
    except (ValueError, x509.InvalidVersion) as exc:
        raise IssuedChainError(f"the CA returned a chain that is not PEM certificates: {exc}") from None
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise IssuedChainError(f"the trust bundle is not PEM certificates: {exc}") from None
    leaf = certs[0]
    try:
        leaf_key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IssuedChainError(f"the issued certificate's public key cannot be loaded: {exc}") from None
    if _spki(leaf_key) != _spki(key.public_key()):
        raise IssuedChainError(f"the issued certificate for {expected} is not for our private key")
    try:
        got = svid_spiffe_id(leaf)
    except SpiffeIdError as exc:
        raise IssuedChainError(f"the issued certificate is not a valid X.509-SVID: {exc}") from None
    if got != expected:
        raise IssuedChainError(f"the issued certificate is for {got}, we asked for {expected}")
    # The client-verifier profile of cryptography's webpki path builder accepts URI-only leaves and
    # checks signatures, validity windows, basicConstraints and the clientAuth EKU along the path.
    verifier = (
        verification.PolicyBuilder().store(verification.Store(roots)).time(now()).build_client_verifier()
    )
    try:
        verifier.verify(leaf, certs[1:])
    except verification.VerificationError as exc:
        raise IssuedChainError(f"the issued certificate for {expected} does not verify: {exc}") from None
    return leaf
