"""Agent-side CSR creation and checks of the chain the CA returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from api.csr import IssuedChainError, check_issued_chain, new_workload_csr
from api.spiffe import SpiffeId
from controller.ca import CertificateAuthority

TD = "example.org"
SID = SpiffeId.for_workload(TD, "default", "web")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


def test_new_workload_csr_shape() -> None:
    key, pem = new_workload_csr(SID)
    csr = x509.load_pem_x509_csr(pem)
    assert isinstance(key.curve, ec.SECP256R1)
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    assert csr.public_key() == key.public_key()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(SID))]


def test_each_csr_has_a_fresh_key() -> None:
    assert new_workload_csr(SID)[0].public_key() != new_workload_csr(SID)[0].public_key()


def test_check_issued_chain_accepts_what_the_ca_signed(ca: CertificateAuthority) -> None:
    key, pem = new_workload_csr(SID)
    issued = ca.sign(ca.validate_csr(pem))
    leaf = check_issued_chain(issued.chain_pem, key, SID, ca.trust_bundle_pem())
    assert leaf.serial_number == issued.serial


def test_wrong_key(ca: CertificateAuthority) -> None:
    _, pem = new_workload_csr(SID)
    other_key, _ = new_workload_csr(SID)
    chain = ca.sign(ca.validate_csr(pem)).chain_pem
    with pytest.raises(IssuedChainError, match="not for our private key"):
        check_issued_chain(chain, other_key, SID, ca.trust_bundle_pem())


def test_wrong_identity(ca: CertificateAuthority) -> None:
    key, pem = new_workload_csr(SID)
    chain = ca.sign(ca.validate_csr(pem)).chain_pem
    with pytest.raises(IssuedChainError, match="we asked for"):
        check_issued_chain(chain, key, SpiffeId.for_workload(TD, "default", "db"), ca.trust_bundle_pem())


def test_foreign_bundle(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path, TD)
    key, pem = new_workload_csr(SID)
    chain = ca.sign(ca.validate_csr(pem)).chain_pem
    with pytest.raises(IssuedChainError, match="does not verify"):
        check_issued_chain(chain, key, SID, other.trust_bundle_pem())


@pytest.mark.parametrize("offset", [timedelta(hours=25), timedelta(minutes=-5)])
def test_outside_validity_window(ca: CertificateAuthority, offset: timedelta) -> None:
    key, pem = new_workload_csr(SID)
    chain = ca.sign(ca.validate_csr(pem)).chain_pem
    later = datetime.now(UTC) + offset
    with pytest.raises(IssuedChainError, match="does not verify"):
        check_issued_chain(chain, key, SID, ca.trust_bundle_pem(), now=lambda: later)


@pytest.mark.parametrize(("chain", "bundle"), [([], None), ([b"junk"], None), (None, b"junk")])
def test_malformed_inputs(ca: CertificateAuthority, chain: list[bytes] | None, bundle: bytes | None) -> None:
    key, pem = new_workload_csr(SID)
    good_chain = ca.sign(ca.validate_csr(pem)).chain_pem
    with pytest.raises(IssuedChainError):
        check_issued_chain(good_chain if chain is None else chain, key, SID, bundle or ca.trust_bundle_pem())
