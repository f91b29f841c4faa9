"""SpiffeId parsing (SPIFFE-ID.md §2) and X.509-SVID leaf checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from api.spiffe import SpiffeId, SpiffeIdError, svid_spiffe_id

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._-"
SEG_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(SEG_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))
spiffe_ids = st.builds(SpiffeId, trust_domains, paths)


@given(spiffe_ids)
def test_parse_roundtrips_str(sid: SpiffeId) -> None:
    assert SpiffeId.parse(str(sid)) == sid
    assert str(sid).startswith("spiffe://" + sid.trust_domain)


@given(trust_domains, segments, segments)
def test_workload_properties(td: str, ns: str, sa: str) -> None:
    sid = SpiffeId.for_workload(td, ns, sa)
    assert (sid.namespace, sid.service_account) == (ns, sa)
    assert sid.principal == f"{td}/ns/{ns}/sa/{sa}"
    assert SpiffeId.parse("spiffe://" + sid.principal) == sid


@given(spiffe_ids, st.sampled_from(["?q=1", "#frag", "/", "//x", "/./x", "/../x", "/a b", "/%41"]))
def test_parse_rejects_bad_suffixes(sid: SpiffeId, suffix: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(str(sid) + suffix)


@given(st.text(max_size=30).filter(lambda s: not s.startswith("spiffe://")))
def test_parse_rejects_other_schemes(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(text)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://",
        "spiffe:///ns/a/sa/b",
        "SPIFFE://td/ns/a/sa/b",
        "https://td/ns/a/sa/b",
        "spiffe:td/ns/a",
        "spiffe://Example.org/x",
        "spiffe://td:8080/x",
        "spiffe://user@td/x",
        "spiffe://td/x/",
        "spiffe://td/x//y",
        "spiffe://td/x/./y",
        "spiffe://td/x/../y",
        "spiffe://td/x?y=1",
        "spiffe://td/x#y",
        "spiffe://td/caf\u00e9",
        "spiffe://td/" + "a" * 2048,
    ],
)
def test_parse_rejects(uri: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(uri)


@pytest.mark.parametrize(
    ("uri", "ns", "sa"),
    [
        ("spiffe://cluster.local/ns/default/sa/bookinfo", "default", "bookinfo"),
        ("spiffe://td/ns/a/sa/b/extra", None, None),
        ("spiffe://td/ns/a/x/b", None, None),
        ("spiffe://td", None, None),
    ],
)
def test_namespace_service_account(uri: str, ns: str | None, sa: str | None) -> None:
    sid = SpiffeId.parse(uri)
    assert (sid.namespace, sid.service_account) == (ns, sa)
    assert sid.is_workload == (ns is not None)


def _leaf(
    sans: list[x509.GeneralName],
    *,
    ca: bool = False,
    digital_signature: bool = True,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
    key_usage: bool = True,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature, False, False, False, False, key_cert_sign, crl_sign, False, False
            ),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256())


URI = x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b")


def test_svid_spiffe_id_accepts_valid_leaf() -> None:
    assert svid_spiffe_id(_leaf([URI, x509.DNSName("x.example")])) == SpiffeId("td", "/ns/a/sa/b")


@pytest.mark.parametrize(
    ("cert_kwargs", "sans", "message"),
    [
        ({}, [], "no subjectAltName"),
        ({}, [URI, x509.UniformResourceIdentifier("spiffe://td/x")], "exactly one URI SAN"),
        ({}, [x509.UniformResourceIdentifier("spiffe://td")], "no path"),
        ({}, [x509.UniformResourceIdentifier("https://td/x")], "scheme"),
        ({"ca": True}, [URI], "CA"),
        ({"digital_signature": False}, [URI], "digitalSignature"),
        ({"key_cert_sign": True}, [URI], "keyCertSign"),
        ({"crl_sign": True}, [URI], "cRLSign"),
        ({"key_usage": False}, [URI], "no keyUsage"),
    ],
)
def test_svid_spiffe_id_rejects(
    cert_kwargs: dict[str, bool], sans: list[x509.GeneralName], message: str
) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        svid_spiffe_id(_leaf(sans, **cert_kwargs))


_VALID_LEAF_DER = _leaf([URI]).public_bytes(serialization.Encoding.DER)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=300)
@given(st.integers(0, len(_VALID_LEAF_DER) - 1), st.integers(1, 255))
def test_corrupted_leaf_gives_spiffe_id_error_never_a_crash(index: int, flip: int) -> None:
    der = bytearray(_VALID_LEAF_DER)
    der[index] ^= flip
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion):
        return  # the TLS stack would already have refused it
    try:
        sid = svid_spiffe_id(cert)
    except SpiffeIdError:
        return
    # Accepted: then the leaf still has exactly one URI SAN and the result is that URI (a flipped
    # byte inside the URI can make another valid ID; only the chain signature check catches that).
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(sid)]
