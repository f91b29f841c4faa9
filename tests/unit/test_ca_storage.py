"""CA key storage: self-managed root across restarts, file permissions, operator roots/intermediates."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from api.csr import check_issued_chain, new_workload_csr
from api.spiffe import SpiffeId
from controller.ca import CaError, CaStorageError, CertificateAuthority
from controller.ca.keystore import BUNDLE_FILE, KEY_FILE, new_root

TD = "example.org"
SID = SpiffeId.for_workload(TD, "default", "web")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, mode: int = 0o600) -> Path:
    path.write_bytes(_key_pem(key))
    path.chmod(mode)
    return path


def _intermediate(
    parent: x509.Certificate, parent_key: ec.EllipticCurvePrivateKey, name: str, *, ca: bool = True
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(parent.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, ca, ca, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()), critical=False
        )
        .sign(parent_key, hashes.SHA256())
    )
    return cert, key


def _issue_and_check(ca: CertificateAuthority) -> list[bytes]:
    key, csr = new_workload_csr(SID)
    chain = ca.sign(ca.validate_csr(csr)).chain_pem
    check_issued_chain(chain, key, SID, ca.trust_bundle_pem())
    return chain


def test_first_start_creates_root_with_private_key_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = CertificateAuthority.load_or_create(state, TD)
    assert (state / BUNDLE_FILE).read_bytes() == ca.trust_bundle_pem()
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate(ca.trust_bundle_pem())
    assert root.subject == root.issuer
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    validity = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < validity < timedelta(days=3651)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    _issue_and_check(ca)


def test_restart_keeps_the_same_root(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, TD)
    chain = _issue_and_check(first)
    second = CertificateAuthority.load_or_create(tmp_path, TD)
    assert second.trust_bundle_pem() == first.trust_bundle_pem()
    # A leaf from before the restart still verifies against the reloaded bundle.
    leaf = x509.load_pem_x509_certificate(chain[0])
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(second.trust_bundle_pem()))
    _issue_and_check(second)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_key_refused(tmp_path: Path, mode: int) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    os.chmod(tmp_path / KEY_FILE, mode)
    with pytest.raises(CaStorageError, match=f"mode {mode:04o}.*chmod 600"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_key_not_matching_cert_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    _write_key(tmp_path / KEY_FILE, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CaStorageError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path, TD)


@pytest.mark.parametrize("missing", [BUNDLE_FILE, KEY_FILE])
def test_incomplete_state_refused(tmp_path: Path, missing: str) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / missing).unlink()
    with pytest.raises(CaStorageError, match="incomplete"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_garbage_files_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(CaStorageError, match="not an unencrypted PEM private key"):
        CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / BUNDLE_FILE).write_bytes(b"garbage")
    with pytest.raises(CaStorageError, match="not PEM certificates"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_operator_root(tmp_path: Path) -> None:
    root, key = new_root(TD, datetime.now(UTC))
    (tmp_path / "root.pem").write_bytes(_pem(root))
    ca = CertificateAuthority.load_or_create(
        tmp_path / "state", TD, root_cert=tmp_path / "root.pem", root_key=_write_key(tmp_path / "k.pem", key)
    )
    assert ca.trust_bundle_pem() == _pem(root)
    assert len(_issue_and_check(ca)) == 1
    assert not (tmp_path / "state" / KEY_FILE).exists()


def test_operator_root_key_permissions_checked(tmp_path: Path) -> None:
    root, key = new_root(TD, datetime.now(UTC))
    (tmp_path / "root.pem").write_bytes(_pem(root))
    with pytest.raises(CaStorageError, match="chmod 600"):
        CertificateAuthority.load_or_create(
            tmp_path, TD, root_cert=tmp_path / "root.pem", root_key=_write_key(tmp_path / "k.pem", key, 0o644)
        )


@pytest.mark.parametrize("depth", [1, 2])
def test_operator_intermediate_chain(tmp_path: Path, depth: int) -> None:
    root, root_key = new_root(TD, datetime.now(UTC))
    chain: list[x509.Certificate] = []
    parent, parent_key = root, root_key
    for i in range(depth):
        parent, parent_key = _intermediate(parent, parent_key, f"intermediate {i}")
        chain.insert(0, parent)
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "int.pem").write_bytes(b"".join(_pem(c) for c in chain))
    ca = CertificateAuthority.load_or_create(
        tmp_path,
        TD,
        root_cert=tmp_path / "root.pem",
        intermediate_cert=tmp_path / "int.pem",
        intermediate_key=_write_key(tmp_path / "int-key.pem", parent_key),
    )
    assert ca.trust_bundle_pem() == _pem(root)
    issued = _issue_and_check(ca)
    assert issued[1:] == [_pem(c) for c in chain]
    assert x509.load_pem_x509_certificate(issued[0]).issuer == chain[0].subject


def test_intermediate_from_another_root_refused(tmp_path: Path) -> None:
    root, _ = new_root(TD, datetime.now(UTC))
    other, other_key = new_root(TD, datetime.now(UTC))
    inter, inter_key = _intermediate(other, other_key, "intermediate")
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "int.pem").write_bytes(_pem(inter))
    # Same subject name, different key: only the signature check can tell.
    with pytest.raises(CaStorageError, match="is not signed by"):
        CertificateAuthority.load_or_create(
            tmp_path,
            TD,
            root_cert=tmp_path / "root.pem",
            intermediate_cert=tmp_path / "int.pem",
            intermediate_key=_write_key(tmp_path / "int-key.pem", inter_key),
        )


def test_non_ca_intermediate_refused(tmp_path: Path) -> None:
    root, root_key = new_root(TD, datetime.now(UTC))
    inter, inter_key = _intermediate(root, root_key, "leafish", ca=False)
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "int.pem").write_bytes(_pem(inter))
    with pytest.raises(CaStorageError, match="not a CA"):
        CertificateAuthority.load_or_create(
            tmp_path,
            TD,
            root_cert=tmp_path / "root.pem",
            intermediate_cert=tmp_path / "int.pem",
            intermediate_key=_write_key(tmp_path / "int-key.pem", inter_key),
        )


def test_inconsistent_operator_options_refused(tmp_path: Path) -> None:
    root, root_key = new_root(TD, datetime.now(UTC))
    (tmp_path / "root.pem").write_bytes(_pem(root))
    key_path = _write_key(tmp_path / "k.pem", root_key)
    with pytest.raises(CaError, match="need root_cert"):
        CertificateAuthority.load_or_create(tmp_path, TD, root_key=key_path)
    with pytest.raises(CaStorageError, match="without its key"):
        CertificateAuthority.load_or_create(tmp_path, TD, root_cert=tmp_path / "root.pem")
    with pytest.raises(CaStorageError, match="keep the root key offline"):
        CertificateAuthority.load_or_create(
            tmp_path,
            TD,
            root_cert=tmp_path / "root.pem",
            root_key=key_path,
            intermediate_cert=tmp_path / "root.pem",
            intermediate_key=key_path,
        )
