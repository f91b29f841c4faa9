"""Admin API through the `nodemesh apply/get` helpers, and the metrics/health HTTP endpoint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import typer
from controller_fixtures import MemoryModel, pod, policy

from controller.ca import CertificateAuthority
from controller.server.app import ControllerServer
from nodemesh.client_cli import Connection, _call_apply, _call_list, resolve_connection


@pytest.fixture
def model() -> MemoryModel:
    return MemoryModel(
        workloads=[pod("a", "shop", "web", "node1", "10.1.0.2")],
        policies=[policy("shop", "allow-web")],
        tokens={"tok1": "node1"},
    )


async def _http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_apply_and_get_through_admin(model: MemoryModel, tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")
    srv = ControllerServer(model, ca, admin_token="admintok")
    addrs = await srv.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        conn = Connection(f"127.0.0.1:{addrs.grpc_port}", ca.trust_bundle_pem(), "admintok")
        assert await _call_apply(conn, "extra.yaml", "kind: AuthorizationPolicy\n") == ([], [])
        assert model.applied == [("extra.yaml", "kind: AuthorizationPolicy\n")]
        assert await _call_apply(conn, "empty.yaml", "") == (["empty document"], [])
        listed = await _call_list(conn, "AuthorizationPolicy")
        assert [r.key for r in listed] == ["AuthorizationPolicy/shop/allow-web"]
        assert addrs.metrics_port is not None
        assert (await _http_get(addrs.metrics_port, "/healthz"))[0] == 200
        assert (await _http_get(addrs.metrics_port, "/readyz"))[0] == 503
        srv.ready = True
        assert (await _http_get(addrs.metrics_port, "/readyz"))[0] == 200
        status, body = await _http_get(addrs.metrics_port, "/metrics")
        assert status == 200 and "nodemesh_controller_connected_agents 0.0" in body
        # this process never configured logging through api.logsink: nothing was dropped
        assert "nodemesh_controller_log_records_dropped_total 0.0" in body
        assert (await _http_get(addrs.metrics_port, "/nope"))[0] == 404
    finally:
        await srv.stop(0)


def test_connection_defaults_come_from_lab_state(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"PEM")
    (tmp_path / "token").write_text("tok\n")
    lab = tmp_path / "lab.json"
    lab.write_text(
        json.dumps(
            {
                "controller": "127.0.0.1:1",
                "ca": str(tmp_path / "ca.pem"),
                "admin_token_file": str(tmp_path / "token"),
            }
        )
    )
    assert resolve_connection(None, None, None, lab) == Connection("127.0.0.1:1", b"PEM", "tok")


def test_missing_connection_flags_are_named(tmp_path: Path) -> None:
    with pytest.raises(typer.BadParameter, match="--controller, --ca, --token-file"):
        resolve_connection(None, None, None, tmp_path / "absent.json")
