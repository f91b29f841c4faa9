"""The SVID leaf checks the project promises (shared/design/ecosystem.md "SPIFFE checks":
"keyUsage critical with digitalSignature"; X509-SVID.md §4.3: the key usage extension MUST be
marked critical)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from api.csr import IssuedChainError, check_issued_chain
from api.spiffe import SpiffeId, SpiffeIdError, svid_spiffe_id
from controller.ca.keystore import new_root

WEB = SpiffeId.for_workload("cluster.local", "shop", "web")


def _leaf(ku_critical: bool) -> tuple[bytes, ec.EllipticCurvePrivateKey, bytes]:
    now = datetime.now(UTC)
    root, root_key = new_root("cluster.local", now)
    key = ec.generate_private_key(ec.SECP256R1())
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=ku_critical)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), key, root.public_bytes(pem)


def test_the_control_leaf_with_critical_key_usage_is_accepted() -> None:
    leaf, key, bundle = _leaf(ku_critical=True)
    assert svid_spiffe_id(check_issued_chain([leaf], key, WEB, bundle)) == WEB


def test_svid_check_refuses_a_non_critical_key_usage() -> None:
    leaf, _, _ = _leaf(ku_critical=False)
    with pytest.raises(SpiffeIdError):
        svid_spiffe_id(x509.load_pem_x509_certificate(leaf))


def test_agent_refuses_an_issued_leaf_with_non_critical_key_usage() -> None:
    leaf, key, bundle = _leaf(ku_critical=False)
    with pytest.raises(IssuedChainError):
        check_issued_chain([leaf], key, WEB, bundle)
