"""Certificates.Sign over loopback TLS: hostile inputs must get a clean gRPC status.

An unhandled exception in the servicer surfaces as StatusCode.UNKNOWN ("Unexpected <class ...>")
plus a traceback in the controller log; every refusal must be INVALID_ARGUMENT,
PERMISSION_DENIED or UNAUTHENTICATED instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from controller_fixtures import MemoryModel, pod
from cryptography import x509

from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from api.v1 import nodemesh_pb2 as pb
from api.v1 import nodemesh_pb2_grpc as pb_grpc
from controller.ca import CertificateAuthority
from controller.ca.authority import MAX_TTL
from controller.server.app import ControllerServer

WEB = SpiffeId.for_workload("cluster.local", "shop", "web")


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[pb_grpc.CertificatesStub]:
    model = MemoryModel(
        workloads=[
            pod("a", "shop", "web", "node1", "10.1.0.2"),
            pod("b", "bank", "api", "node2", "10.2.0.2"),
        ],
        policies=[],
        tokens={"tok1-0123456789abcdef": "node1", "tok2-0123456789abcdef": "node2"},
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")
    srv = ControllerServer(model, ca)
    addrs = await srv.start("127.0.0.1:0")
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{addrs.grpc_port}", grpc.ssl_channel_credentials(root_certificates=ca.trust_bundle_pem())
    )
    yield pb_grpc.CertificatesStub(channel)
    await channel.close(None)
    await srv.stop(0)


def _auth(token: str = "tok1-0123456789abcdef") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _code(stub: pb_grpc.CertificatesStub, request: pb.SignRequest, metadata: object) -> grpc.StatusCode:
    try:
        await stub.Sign(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_authentication_is_not_bypassable(stub: pb_grpc.CertificatesStub) -> None:
    _, csr = new_workload_csr(WEB)
    request = pb.SignRequest(csr_pem=csr.decode())
    for metadata in (
        (),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer"),),
        (("authorization", "tok1-0123456789abcdef"),),
        (("authorization", "Basic tok1-0123456789abcdef"),),
        (("authorization", "Bearer tok1-0123456789abcde"),),  # prefix of a real token
        (("authorization", "Bearer TOK1-0123456789ABCDEF"),),
        (("x-authorization", "Bearer tok1-0123456789abcdef"),),
    ):
        assert await _code(stub, request, metadata) == grpc.StatusCode.UNAUTHENTICATED, metadata
    # another node's token: authenticated as that node, which runs no shop/web pod
    assert await _code(stub, request, _auth("tok2-0123456789abcdef")) == grpc.StatusCode.PERMISSION_DENIED
    assert await _code(stub, request, _auth()) == grpc.StatusCode.OK


async def test_malformed_csrs_are_invalid_argument_not_unknown(stub: pb_grpc.CertificatesStub) -> None:
    _, good = new_workload_csr(WEB)
    bodies = [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        good.decode().replace("CERTIFICATE REQUEST", "CERTIFICATE"),
        good.decode()[:200],
        "A" * 1_000_000,
        "\u00e9" * 10_000,
    ]
    for body in bodies:
        code = await _code(stub, pb.SignRequest(csr_pem=body), _auth())
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (body[:40], code)


async def test_a_huge_ttl_is_capped_not_a_crash(stub: pb_grpc.CertificatesStub) -> None:
    """docs/security.md: "a requested TTL is capped to max_ttl". An int64 ttl_seconds beyond what
    datetime.timedelta holds (~8.6e13 s) raised OverflowError (StatusCode.UNKNOWN)."""
    _, csr = new_workload_csr(WEB)
    got = await stub.Sign(
        pb.SignRequest(csr_pem=csr.decode(), ttl_seconds=2**63 - 1), metadata=_auth(), timeout=10
    )
    leaf = x509.load_pem_x509_certificate(got.cert_chain_pem[0].encode())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= MAX_TTL + timedelta(minutes=1)


async def test_an_expired_ca_refuses_with_a_status_not_a_traceback(tmp_path: Path) -> None:
    """docs/security.md: "A CA whose certificate has expired refuses to sign and says so": as
    FAILED_PRECONDITION (its CaError escaped Sign: UNKNOWN and a traceback per renewal attempt)."""
    from datetime import UTC, datetime

    offset = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + offset[0]

    model = MemoryModel(
        workloads=[pod("a", "shop", "web", "node1", "10.1.0.2")], policies=[], tokens={"tok1": "node1"}
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local", clock=clock)
    srv = ControllerServer(model, ca)
    addrs = await srv.start("127.0.0.1:0")
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{addrs.grpc_port}", grpc.ssl_channel_credentials(root_certificates=ca.trust_bundle_pem())
    )
    try:
        offset[0] = timedelta(days=3660)  # past the 10-year root
        _, csr = new_workload_csr(WEB)
        code = await _code(
            pb_grpc.CertificatesStub(channel), pb.SignRequest(csr_pem=csr.decode()), _auth("tok1")
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION, code
    finally:
        await channel.close(None)
        await srv.stop(0)
