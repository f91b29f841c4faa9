"""Issued X.509-SVIDs checked by independent implementations: `openssl verify` and py-spiffe."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from api.csr import new_workload_csr
from api.spiffe import SpiffeId, SpiffeIdError
from controller.ca import CertificateAuthority
from controller.ca.keystore import new_root

spiffe = pytest.importorskip("spiffe")

TD = "example.org"
SID = SpiffeId.for_workload(TD, "bookinfo", "reviews")
OPENSSL = shutil.which("openssl")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _with_intermediate(tmp_path: Path) -> CertificateAuthority:
    now = datetime.now(UTC)
    root, root_key = new_root(TD, now)
    key = ec.generate_private_key(ec.SECP256R1())
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodemesh intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "int.pem").write_bytes(_pem(inter))
    (tmp_path / "int-key.pem").write_bytes(_pkcs8(key))
    (tmp_path / "int-key.pem").chmod(0o600)
    return CertificateAuthority.load_or_create(
        tmp_path,
        TD,
        root_cert=tmp_path / "root.pem",
        intermediate_cert=tmp_path / "int.pem",
        intermediate_key=tmp_path / "int-key.pem",
    )


@pytest.fixture(params=["self-managed root", "operator intermediate"])
def ca(request: pytest.FixtureRequest, tmp_path: Path) -> CertificateAuthority:
    if request.param == "self-managed root":
        return CertificateAuthority.load_or_create(tmp_path / "state", TD)
    return _with_intermediate(tmp_path)


def _issue(ca: CertificateAuthority) -> tuple[ec.EllipticCurvePrivateKey, list[bytes]]:
    key, csr = new_workload_csr(SID)
    return key, ca.sign(ca.validate_csr(csr)).chain_pem


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
def test_openssl_verifies_issued_svid(ca: CertificateAuthority, tmp_path: Path) -> None:
    assert OPENSSL is not None
    _, chain = _issue(ca)
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle_pem())
    (tmp_path / "leaf.pem").write_bytes(chain[0])
    (tmp_path / "untrusted.pem").write_bytes(b"".join(chain[1:]))
    cmd = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(tmp_path / "ca.pem")]
    if len(chain) > 1:
        cmd += ["-untrusted", str(tmp_path / "untrusted.pem")]
    for purpose in ("sslclient", "sslserver"):
        result = subprocess.run(
            [*cmd, "-purpose", purpose, str(tmp_path / "leaf.pem")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": OK")


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
def test_openssl_rejects_svid_against_foreign_root(ca: CertificateAuthority, tmp_path: Path) -> None:
    assert OPENSSL is not None
    _, chain = _issue(ca)
    other = CertificateAuthority.load_or_create(tmp_path / "other", TD)
    (tmp_path / "other.pem").write_bytes(other.trust_bundle_pem())
    (tmp_path / "chain.pem").write_bytes(b"".join(chain))
    result = subprocess.run(
        [
            OPENSSL,
            "verify",
            "-CAfile",
            str(tmp_path / "other.pem"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            str(tmp_path / "chain.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0


def test_py_spiffe_parses_svid_and_accepts_it_against_the_bundle(ca: CertificateAuthority) -> None:
    key, chain = _issue(ca)
    svid = spiffe.X509Svid.parse(b"".join(chain), _pkcs8(key))
    assert str(svid.spiffe_id) == str(SID)
    assert len(svid.cert_chain) == len(chain)

    bundle = spiffe.X509Bundle.parse(spiffe.TrustDomain(TD), ca.trust_bundle_pem())
    assert str(bundle.trust_domain) == TD
    # py-spiffe has no path validation: walk the chain it parsed up to one of the bundle's authorities.
    certs = svid.cert_chain
    for child, parent in itertools.pairwise(certs):
        child.verify_directly_issued_by(parent)
    top = certs[-1]
    issuers = [a for a in bundle.x509_authorities if a.subject == top.issuer]
    assert len(issuers) == 1
    top.verify_directly_issued_by(issuers[0])


def test_py_spiffe_accepts_the_controller_server_certificate(ca: CertificateAuthority) -> None:
    key_pem, chain = ca.issue_server_certificate(["localhost", "127.0.0.1"])
    svid = spiffe.X509Svid.parse(b"".join(chain), key_pem)
    assert str(svid.spiffe_id) == f"spiffe://{TD}/ns/nodemesh-system/sa/controller"


URI_ALPHABET = "abcxyz09._-/:@?#%"


# py-spiffe lower-cases an uppercase trust domain where the spec (and go-spiffe) reject it, so
# uppercase only appears after the first "/" here.
@given(st.text(URI_ALPHABET, max_size=20), st.text(URI_ALPHABET + "AZ", max_size=20))
def test_parse_agrees_with_py_spiffe(head: str, tail: str) -> None:
    uri = f"spiffe://{head}/{tail}" if "/" not in head else f"spiffe://{head}{tail}"
    try:
        ours: str | None = str(SpiffeId.parse(uri))
    except SpiffeIdError:
        ours = None
    try:
        theirs: str | None = str(spiffe.SpiffeId(uri))
    except spiffe.spiffe_id.spiffe_id.SpiffeIdError:
        theirs = None
    assert ours == theirs
