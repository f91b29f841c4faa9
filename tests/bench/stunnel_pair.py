"""The stunnel baseline of tests/bench/bench_l4.py: certificates and the two stunnel configurations.

Mutual TLS 1.3 with ECDSA P-256 certificates from a throwaway CA: the client-side stunnel verifies
the server's chain and name (`verifyChain`, `checkHost`), the server-side one requires and verifies
the client's certificate (`requireCert`, `verifyChain`). Nagle is off on both legs, as a proxy that
carries request/response traffic would configure it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "httpbin-v2.bench.nodemesh"


@dataclass(frozen=True)
class Tunnel:
    """One forwarded port: the client app dials 127.0.0.1:`port` in the client pod, stunnel carries it
    over TLS to `server_ip`:`tls_port`, and the server-side stunnel hands it to 127.0.0.1:`port`."""

    name: str
    port: int
    tls_port: int


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def write_certificates(directory: Path, server_ip: str) -> None:
    """ca.pem, server.{pem,key} (SAN: SERVER_NAME, `server_ip`) and client.{pem,key} in `directory`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodemesh bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaves: dict[str, tuple[list[x509.GeneralName], x509.ObjectIdentifier]] = {
        "server": (
            [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(server_ip))],
            ExtendedKeyUsageOID.SERVER_AUTH,
        ),
        "client": ([x509.DNSName("client.bench.nodemesh")], ExtendedKeyUsageOID.CLIENT_AUTH),
    }
    for name, (sans, usage) in leaves.items():
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, directory / f"{name}.key")


def _common(directory: Path, side: str) -> list[str]:
    return [
        "foreground = yes",
        "pid =",
        "debug = 4",  # warnings only: one line per connection would cost as much as the relay
        f"output = {directory / f'stunnel-{side}.log'}",
        "",
    ]


def _service(directory: Path, side: str) -> list[str]:
    return [
        f"cert = {directory / f'{side}.pem'}",
        f"key = {directory / f'{side}.key'}",
        f"CAfile = {directory / 'ca.pem'}",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
    ]


def client_config(directory: Path, server_ip: str, tunnels: list[Tunnel]) -> Path:
    lines = _common(directory, "client")
    for t in tunnels:
        lines += [
            f"[{t.name}]",
            "client = yes",
            f"accept = 127.0.0.1:{t.port}",
            f"connect = {server_ip}:{t.tls_port}",
            f"checkHost = {SERVER_NAME}",
            *_service(directory, "client"),
            "",
        ]
    path = directory / "stunnel-client.conf"
    path.write_text("\n".join(lines))
    return path


def server_config(directory: Path, tunnels: list[Tunnel]) -> Path:
    lines = _common(directory, "server")
    for t in tunnels:
        lines += [
            f"[{t.name}]",
            f"accept = 0.0.0.0:{t.tls_port}",
            f"connect = 127.0.0.1:{t.port}",
            "requireCert = yes",
            *_service(directory, "server"),
            "",
        ]
    path = directory / "stunnel-server.conf"
    path.write_text("\n".join(lines))
    return path
