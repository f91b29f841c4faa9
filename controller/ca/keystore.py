"""Loading and creating the CA's signing material on disk (the thin I/O layer of the CA).

YAML/lab mode keeps a self-generated root in ``state_dir`` (``ca.pem`` is the trust bundle,
``ca-key.pem`` is mode 0600). Operators may instead supply a root, or an intermediate signed by
their root, in which case the root key never has to reach the controller.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from controller.ca.errors import CaStorageError

log = logging.getLogger(__name__)

BUNDLE_FILE = "ca.pem"
KEY_FILE = "ca-key.pem"
ROOT_VALIDITY = timedelta(days=3650)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """What the CA signs with: the issuing cert and key, intermediates to send, and the root bundle."""

    signing_cert: x509.Certificate
    signing_key: SigningKey
    # Certificates sent after the leaf: signing_cert first (if it is not the root), up to the root.
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise TypeError(type(key).__name__)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_key_file_mode(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CaStorageError(
            f"CA key file {path} has mode {stat.S_IMODE(mode):04o}: it must not be readable by group or "
            f"others; fix with: chmod 600 {path}"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaStorageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _load_certs(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaStorageError(f"{what} {path} is not PEM certificates: {exc}") from None
    return certs


def _load_key(path: Path) -> SigningKey:
    _check_key_file_mode(path)
    data = _read(path, "CA key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CaStorageError(f"CA key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaStorageError(f"CA key {path} is a {type(key).__name__}: use ECDSA or RSA")
    return key


def _check_pair(cert: x509.Certificate, key: SigningKey, cert_path: Path, key_path: Path) -> None:
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise CaStorageError(f"CA key {key_path} does not match the certificate {cert_path}")


def _check_is_ca(cert: x509.Certificate, path: Path, now: datetime) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaStorageError(f"certificate {path} is not a CA (basicConstraints CA=true is required)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise CaStorageError(f"certificate {path} lacks keyUsage keyCertSign")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CaStorageError(
            f"CA certificate {path} is not valid now ({now.isoformat()}): valid from "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}"
        )


def _check_issued_by(child: x509.Certificate, parent: x509.Certificate, path: Path) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CaStorageError(
            f"certificate {child.subject.rfc4514_string()!r} in {path} is not signed by "
            f"{parent.subject.rfc4514_string()!r}: {exc or type(exc).__name__}"
        ) from None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def new_root(trust_domain: str, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 root for ``trust_domain``, valid 10 years from ``now``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root CA {trust_domain}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_or_create_state(
    state_dir: Path, trust_domain: str, clock: Callable[[], datetime]
) -> SigningMaterial:
    """Load the self-managed root from ``state_dir``, generating it on first start."""
    cert_path, key_path = state_dir / BUNDLE_FILE, state_dir / KEY_FILE
    if not cert_path.exists() and not key_path.exists():
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CaStorageError(f"cannot create CA state directory {state_dir}: {exc.strerror}") from None
        cert, key = new_root(trust_domain, clock())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            # Key first: a crash in between leaves no bundle without its key, which the next
            # start reports instead of silently minting a second root.
            _write_private(key_path, key_pem)
            _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        except OSError as exc:
            raise CaStorageError(f"cannot write CA files in {state_dir}: {exc.strerror}") from None
        log.info(
            "ca.root_created trust_domain=%s bundle=%s serial=%x not_after=%s",
            trust_domain,
            cert_path,
            cert.serial_number,
            cert.not_valid_after_utc.isoformat(),
        )
        return SigningMaterial(cert, key, (), (cert,))
    if not cert_path.exists() or not key_path.exists():
        missing = cert_path if not cert_path.exists() else key_path
        raise CaStorageError(
            f"CA state in {state_dir} is incomplete: {missing} is missing; restore it from backup, or "
            "remove both files to create a new root (every workload certificate must then be re-issued)"
        )
    certs = _load_certs(cert_path, "CA bundle")
    stored_key = _load_key(key_path)
    root = certs[0]
    _check_pair(root, stored_key, cert_path, key_path)
    _check_is_ca(root, cert_path, clock())
    log.info(
        "ca.root_loaded trust_domain=%s bundle=%s serial=%x", trust_domain, cert_path, root.serial_number
    )
    return SigningMaterial(root, stored_key, (), tuple(certs))


def load_operator_material(
    root_cert: Path,
    root_key: Path | None,
    intermediate_cert: Path | None,
    intermediate_key: Path | None,
    clock: Callable[[], datetime],
) -> SigningMaterial:
    """Load an operator-supplied root (with its key) or intermediate chain (with the intermediate's key).

    ``intermediate_cert`` may hold several certificates, the signing one first, each signed by the next
    and the last signed by a certificate of ``root_cert``.
    """
    now = clock()
    roots = _load_certs(root_cert, "root certificate")
    for root in roots:
        _check_is_ca(root, root_cert, now)
    if intermediate_cert is None:
        if intermediate_key is not None:
            raise CaStorageError("an intermediate key was given without the intermediate certificate")
        if root_key is None:
            raise CaStorageError(f"root certificate {root_cert} given without its key (or an intermediate)")
        key = _load_key(root_key)
        _check_pair(roots[0], key, root_cert, root_key)
        return SigningMaterial(roots[0], key, (), tuple(roots))
    if intermediate_key is None:
        raise CaStorageError(f"intermediate certificate {intermediate_cert} given without its key")
    if root_key is not None:
        raise CaStorageError(
            f"root key {root_key} given together with an intermediate: the CA signs with the "
            "intermediate, keep the root key offline"
        )
    chain = _load_certs(intermediate_cert, "intermediate certificate")
    key = _load_key(intermediate_key)
    _check_pair(chain[0], key, intermediate_cert, intermediate_key)
    for cert in chain:
        _check_is_ca(cert, intermediate_cert, now)
    for child, parent in itertools.pairwise(chain):
        _check_issued_by(child, parent, intermediate_cert)
    top = chain[-1]
    issuers = [r for r in roots if r.subject == top.issuer]
    if not issuers:
        raise CaStorageError(
            f"intermediate chain {intermediate_cert} ends with issuer {top.issuer.rfc4514_string()!r}, "
            f"which is not a certificate of {root_cert}"
        )
    _check_issued_by(top, issuers[0], intermediate_cert)
    return SigningMaterial(chain[0], key, tuple(chain), tuple(roots))
