"""SPIFFE IDs and X.509-SVID leaf checks, shared by the agent, the proxy and the controller's CA.

Implements the SPIFFE ID rules of the SPIFFE standard (SPIFFE-ID.md §2) and the leaf rules of
X509-SVID.md §4 (exactly one URI SAN, CA=false, digitalSignature, no keyCertSign/cRLSign).
Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

SCHEME = "spiffe"
_PREFIX = "spiffe://"
# SPIFFE-ID.md §2.1: the trust domain is lowercase letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
# SPIFFE-ID.md §2.2: path segments use the same set plus uppercase letters.
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+")
# SPIFFE-ID.md §2.3: the whole ID must fit in 2048 bytes.
MAX_ID_LENGTH = 2048


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID, or a certificate is not a valid X.509-SVID leaf."""


def _check_trust_domain(td: str) -> None:
    if not td:
        raise SpiffeIdError("SPIFFE ID trust domain is empty")
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        raise SpiffeIdError(
            f"SPIFFE ID trust domain {td!r} has characters outside [a-z0-9._-] "
            "(no uppercase, port, userinfo or percent-encoding)"
        )


def _check_path(path: str) -> None:
    if path == "":
        return
    if not path.startswith("/"):
        raise SpiffeIdError(f"SPIFFE ID path {path!r} must start with '/'")
    if path.endswith("/"):
        raise SpiffeIdError(f"SPIFFE ID path {path!r} must not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError(f"SPIFFE ID path {path!r} has an empty segment")
        if segment in (".", ".."):
            raise SpiffeIdError(f"SPIFFE ID path {path!r} has a relative segment {segment!r}")
        if not _SEGMENT_RE.fullmatch(segment):
            raise SpiffeIdError(
                f"SPIFFE ID path segment {segment!r} has characters outside [a-zA-Z0-9._-] "
                "(no query, fragment or percent-encoding)"
            )


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID: ``spiffe://<trust_domain><path>`` (path is "" or starts with "/")."""

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_path(self.path)
        if len(_PREFIX) + len(self.trust_domain) + len(self.path) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse and validate ``uri``; raise :class:`SpiffeIdError` naming the rule it breaks."""
        if not isinstance(uri, str):
            raise SpiffeIdError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
        if not uri:
            raise SpiffeIdError("SPIFFE ID is empty")
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme != SCHEME:
            raise SpiffeIdError(f"{uri!r} is not a SPIFFE ID: scheme must be 'spiffe://'")
        if "?" in rest or "#" in rest:
            raise SpiffeIdError(f"SPIFFE ID {uri!r} must not have a query or fragment")
        td, slash, path = rest.partition("/")
        if "@" in td:
            raise SpiffeIdError(f"SPIFFE ID {uri!r} must not have userinfo")
        if ":" in td:
            raise SpiffeIdError(f"SPIFFE ID {uri!r} must not have a port")
        return cls(td, slash + path)

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """The Istio-style workload identity ``spiffe://<td>/ns/<namespace>/sa/<service_account>``."""
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    def _ns_sa(self) -> tuple[str, str] | None:
        parts = self.path.split("/")
        # "/ns/X/sa/Y".split("/") == ["", "ns", "X", "sa", "Y"]
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def is_workload(self) -> bool:
        """True when the path has the form /ns/<namespace>/sa/<service account>."""
        return self._ns_sa() is not None

    @property
    def namespace(self) -> str | None:
        ns_sa = self._ns_sa()
        return ns_sa[0] if ns_sa else None

    @property
    def service_account(self) -> str | None:
        ns_sa = self._ns_sa()
        return ns_sa[1] if ns_sa else None

    @property
    def principal(self) -> str:
        """The ID without ``spiffe://``, as Istio AuthorizationPolicy ``principals`` are written."""
        return f"{self.trust_domain}{self.path}"

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}{self.path}"


def svid_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """Check ``cert`` as an X.509-SVID leaf (X509-SVID.md §4, §5) and return its SPIFFE ID.

    This checks the leaf's shape only; the chain must be verified separately (by TLS or
    :func:`api.csr.check_issued_chain`).
    """
    try:
        # Peer-controlled input after a handshake: a malformed extension must become SpiffeIdError.
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise SpiffeIdError(f"X.509-SVID extensions cannot be parsed: {exc}") from None
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SpiffeIdError("X.509-SVID has no subjectAltName extension") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SpiffeIdError(f"X.509-SVID must have exactly one URI SAN, found {len(uris)}")
    spiffe_id = SpiffeId.parse(uris[0])
    if not spiffe_id.path:
        raise SpiffeIdError(f"X.509-SVID leaf SPIFFE ID {spiffe_id} has no path (trust domain root)")
    try:
        bc = extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        bc = None
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise SpiffeIdError(f"X.509-SVID leaf for {spiffe_id} is a CA certificate (basicConstraints CA=true)")
    try:
        ku_ext = extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise SpiffeIdError(f"X.509-SVID leaf for {spiffe_id} has no keyUsage extension") from None
    if not ku_ext.critical:  # X509-SVID §4.3
        raise SpiffeIdError(f"X.509-SVID leaf for {spiffe_id} has a keyUsage extension not marked critical")
    ku = ku_ext.value
    if not ku.digital_signature:
        raise SpiffeIdError(f"X.509-SVID leaf for {spiffe_id} lacks keyUsage digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise SpiffeIdError(f"X.509-SVID leaf for {spiffe_id} must not have keyCertSign or cRLSign")
    return spiffe_id
