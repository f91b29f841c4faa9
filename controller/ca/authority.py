"""The controller's SPIFFE certificate authority: signs workload X.509-SVIDs and its own server cert.

Leaves follow the SPIFFE X.509-SVID spec (X509-SVID.md §4): one critical URI SAN, empty subject,
CA=false, keyUsage digitalSignature (keyEncipherment for RSA keys only), no keyCertSign/cRLSign.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from api.spiffe import SpiffeId
from controller.ca.csr_policy import SubjectPublicKey, ValidatedCsr, validate_csr
from controller.ca.errors import CaError
from controller.ca.keystore import SigningMaterial, load_operator_material, load_or_create_state

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=90)
# Back-date leaves so peers whose clocks run a little behind still accept them.
CLOCK_SKEW = timedelta(minutes=1)
CONTROLLER_NAMESPACE = "nodemesh-system"
CONTROLLER_SERVICE_ACCOUNT = "controller"

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A signed SVID: ``chain_pem`` is the leaf then intermediates; the root is the trust bundle."""

    spiffe_id: SpiffeId
    serial: int
    not_before: datetime
    not_after: datetime
    chain_pem: list[bytes]


def _key_usage(digital_signature: bool, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
_KU_EC = _key_usage(digital_signature=True, key_encipherment=False)
_KU_RSA = _key_usage(digital_signature=True, key_encipherment=True)


class CertificateAuthority:
    """Validates CSRs and issues X.509-SVIDs for one trust domain, with an injectable clock."""

    def __init__(
        self,
        trust_domain: str,
        material: SigningMaterial,
        *,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        clock: Clock = _utc_now,
    ) -> None:
        # Validates the trust domain with the SPIFFE rules.
        SpiffeId(trust_domain, "")
        if default_ttl <= timedelta(0) or max_ttl <= timedelta(0):
            raise CaError(f"CA TTLs must be positive (default_ttl={default_ttl}, max_ttl={max_ttl})")
        self._trust_domain = trust_domain
        self._material = material
        self._default_ttl = min(default_ttl, max_ttl)
        self._max_ttl = max_ttl
        self._clock = clock
        self._issuer_name = material.signing_cert.subject
        self._hash = hashes.SHA256()
        try:
            ski = material.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(material.signing_key.public_key())
        self._intermediates_pem = [c.public_bytes(serialization.Encoding.PEM) for c in material.intermediates]
        self._bundle_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in material.roots)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: str,
        *,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        root_cert: Path | None = None,
        root_key: Path | None = None,
        intermediate_cert: Path | None = None,
        intermediate_key: Path | None = None,
        clock: Clock = _utc_now,
    ) -> CertificateAuthority:
        """Open the CA: an operator-supplied root/intermediate if given, else the root in ``state_dir``.

        Raises :class:`controller.ca.errors.CaStorageError` with the file and the fix when the material
        is missing, mismatched or its key file is readable by group or others.
        """
        SpiffeId(trust_domain, "")
        if root_cert is not None:
            material = load_operator_material(root_cert, root_key, intermediate_cert, intermediate_key, clock)
        elif root_key is not None or intermediate_cert is not None or intermediate_key is not None:
            raise CaError("root_key/intermediate_cert/intermediate_key need root_cert (the trust bundle)")
        else:
            material = load_or_create_state(state_dir, trust_domain, clock)
        return cls(trust_domain, material, default_ttl=default_ttl, max_ttl=max_ttl, clock=clock)

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def trust_bundle_pem(self) -> bytes:
        """The root certificate(s) agents and proxies trust, PEM."""
        return self._bundle_pem

    def validate_csr(self, csr_pem: bytes) -> ValidatedCsr:
        """Check a workload CSR; raises :class:`controller.ca.errors.CsrRejected` with the reason."""
        return validate_csr(csr_pem, self._trust_domain)

    def _window(self, ttl: timedelta | None) -> tuple[datetime, datetime]:
        if ttl is None:
            ttl = self._default_ttl
        if ttl <= timedelta(0):
            raise CaError(f"requested certificate TTL {ttl} must be positive")
        ttl = min(ttl, self._max_ttl)
        now = self._clock()
        issuer = self._material.signing_cert
        not_after = min(now + ttl, issuer.not_valid_after_utc)
        not_before = max(now - CLOCK_SKEW, issuer.not_valid_before_utc)
        if not_after <= now:
            raise CaError(
                f"CA certificate {issuer.subject.rfc4514_string()!r} expired at "
                f"{issuer.not_valid_after_utc.isoformat()}: rotate the CA"
            )
        return not_before, not_after

    def _build(
        self,
        public_key: SubjectPublicKey,
        san: list[x509.GeneralName],
        not_before: datetime,
        not_after: datetime,
        serial: int,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer_name)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # Empty subject: RFC 5280 §4.2.1.6 requires the SAN to be critical.
            .add_extension(x509.SubjectAlternativeName(san), critical=True)
            .add_extension(_LEAF_BC, critical=True)
            .add_extension(_KU_RSA if isinstance(public_key, rsa.RSAPublicKey) else _KU_EC, critical=True)
            .add_extension(_EKU, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._material.signing_key, self._hash)
        )

    def sign(self, csr: ValidatedCsr, ttl: timedelta | None = None) -> IssuedCertificate:
        """Issue an X.509-SVID for a validated CSR (TTL defaults, then capped by max_ttl and the issuer)."""
        not_before, not_after = self._window(ttl)
        serial = x509.random_serial_number()
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(csr.spiffe_id))]
        cert = self._build(csr.public_key, san, not_before, not_after, serial)
        log.info(
            "ca.issued spiffe_id=%s serial=%x not_after=%s", csr.spiffe_id, serial, not_after.isoformat()
        )
        return IssuedCertificate(
            spiffe_id=csr.spiffe_id,
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            chain_pem=[cert.public_bytes(serialization.Encoding.PEM), *self._intermediates_pem],
        )

    def issue_server_certificate(
        self, hosts: list[str], ttl: timedelta | None = None
    ) -> tuple[bytes, list[bytes]]:
        """A new key and chain for the controller's gRPC TLS endpoint: DNS/IP SANs plus its SPIFFE ID.

        Returns ``(key_pem, chain_pem)``; the key is unencrypted PKCS#8 PEM.
        """
        if not hosts:
            raise CaError("the controller server certificate needs at least one host name or IP")
        spiffe_id = SpiffeId.for_workload(
            self._trust_domain, CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT
        )
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not host or any(c.isspace() or c in "/@:" for c in host):
                    raise CaError(
                        f"server certificate host {host!r} is neither an IP address nor a DNS name"
                    ) from None
                san.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = self._window(ttl)
        serial = x509.random_serial_number()
        cert = self._build(key.public_key(), san, not_before, not_after, serial)
        log.info(
            "ca.issued_server spiffe_id=%s hosts=%s serial=%x not_after=%s",
            spiffe_id,
            ",".join(hosts),
            serial,
            not_after.isoformat(),
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, [cert.public_bytes(serialization.Encoding.PEM), *self._intermediates_pem]
