"""The controller server object: gRPC (TLS, cert from the CA) plus the metrics/health endpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from api.v1 import nodemesh_pb2_grpc as pb_grpc
from controller.ca import CertificateAuthority
from controller.server.http import MetricsEndpoint
from controller.server.metrics import ControllerMetrics
from controller.server.model import MeshModel
from controller.server.services import AdminService, CertificatesService, ConfigService

log = logging.getLogger("nodemesh.controller.server")


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) → (host, port); ValueError with the bad value otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(slots=True)
class ServerAddresses:
    grpc_port: int
    metrics_port: int | None


class ControllerServer:
    """Owns the grpc.aio server; call `notify_changed()` when the mesh state changes."""

    def __init__(
        self,
        model: MeshModel,
        ca: CertificateAuthority,
        *,
        admin_token: str | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.model = model
        self.ca = ca
        self.metrics = metrics or ControllerMetrics()
        self.config = ConfigService(model, self.metrics)
        self._admin_token = admin_token
        self._server: grpc.aio.Server | None = None
        self._http: MetricsEndpoint | None = None
        self.ready = False

    def notify_changed(self) -> None:
        self.config.notify_changed()

    async def start(self, listen: str, metrics_listen: str | None = None) -> ServerAddresses:
        host, port = split_host_port(listen)
        hosts = sorted({host, "localhost", "127.0.0.1"} - {"0.0.0.0", "::", ""})
        key_pem, chain = self.ca.issue_server_certificate(hosts)
        creds = grpc.ssl_server_credentials([(key_pem, b"".join(chain))])
        server = grpc.aio.server()
        pb_grpc.add_CertificatesServicer_to_server(
            CertificatesService(self.model, self.ca, self.metrics), server
        )
        pb_grpc.add_ConfigServicer_to_server(self.config, server)
        pb_grpc.add_AdminServicer_to_server(AdminService(self.model, self._admin_token), server)
        bound = server.add_secure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", creds)
        if bound == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        self._server = server
        log.info("grpc.listening address=%s port=%d", host, bound)
        metrics_port = None
        if metrics_listen:
            mhost, mport = split_host_port(metrics_listen)
            self._http = MetricsEndpoint(
                self.metrics.registry, lambda: self._server is not None, self._is_ready
            )
            metrics_port = await self._http.start(mhost, mport)
        return ServerAddresses(bound, metrics_port)

    def _is_ready(self) -> bool:
        return self.ready

    async def stop(self, grace: float = 2.0) -> None:
        if self._http is not None:
            await self._http.stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        log.info("server.stopped")
