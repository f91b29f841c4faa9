"""Pure validation of workload CSRs against the CA's rules (what may be signed, not who may ask).

Rules follow the SPIFFE X.509-SVID spec (exactly one URI SAN holding the SPIFFE ID) and Istio's
identity layout (``spiffe://<td>/ns/<namespace>/sa/<service account>``). Node authorization (may this
caller get this identity) is decided by the server, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api.spiffe import SpiffeId, SpiffeIdError
from controller.ca.errors import CsrRejected

MIN_RSA_BITS = 2048
ALLOWED_CURVES: tuple[type[ec.EllipticCurve], ...] = (ec.SECP256R1, ec.SECP384R1)
# Bounds the work a caller can make us do before we even parse it.
MAX_CSR_PEM_BYTES = 16 * 1024

SubjectPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class ValidatedCsr:
    """A CSR that passed every rule: the identity it asks for and the key to certify."""

    spiffe_id: SpiffeId
    public_key: SubjectPublicKey


def _check_key(key: object) -> SubjectPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CsrRejected(f"unsupported ECDSA curve {key.curve.name}: use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrRejected(f"RSA key of {key.key_size} bits is too small: at least {MIN_RSA_BITS}")
        return key
    raise CsrRejected(
        f"unsupported key type {type(key).__name__}: use ECDSA P-256/P-384 or RSA >= {MIN_RSA_BITS}"
    )


def validate_csr(csr_pem: bytes, trust_domain: str) -> ValidatedCsr:
    """Check ``csr_pem`` and return what to sign; raise :class:`CsrRejected` with the first broken rule."""
    if len(csr_pem) > MAX_CSR_PEM_BYTES:
        raise CsrRejected(f"CSR is {len(csr_pem)} bytes, more than the {MAX_CSR_PEM_BYTES} allowed")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CsrRejected(f"CSR is not a parsable PEM certificate request: {exc}") from None
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(f"CSR public key cannot be loaded: {exc}") from None
    public_key = _check_key(key)
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(f"CSR signature cannot be checked: {exc}") from None
    if not signature_ok:
        raise CsrRejected("CSR signature does not verify with its own public key")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected("CSR has no subjectAltName: it must carry exactly one SPIFFE ID URI SAN") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrRejected(f"CSR extensions cannot be parsed: {exc}") from None
    names = list(san)
    if len(names) != 1:
        kinds = ", ".join(type(n).__name__ for n in names) or "none"
        raise CsrRejected(f"CSR must have exactly one SAN (a SPIFFE ID URI), found {len(names)}: {kinds}")
    name = names[0]
    if not isinstance(name, x509.UniformResourceIdentifier):
        raise CsrRejected(f"CSR SAN must be a SPIFFE ID URI, found {type(name).__name__}")
    try:
        spiffe_id = SpiffeId.parse(name.value)
    except SpiffeIdError as exc:
        raise CsrRejected(f"CSR URI SAN {name.value!r} is not a valid SPIFFE ID: {exc}") from None
    if spiffe_id.trust_domain != trust_domain:
        raise CsrRejected(
            f"CSR asks for trust domain {spiffe_id.trust_domain!r}, this CA signs only {trust_domain!r}"
        )
    if not spiffe_id.is_workload:
        raise CsrRejected(
            f"CSR SPIFFE ID {spiffe_id} must have the path /ns/<namespace>/sa/<service account>"
        )
    return ValidatedCsr(spiffe_id=spiffe_id, public_key=public_key)
