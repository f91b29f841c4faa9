"""The agent's `AdminSources`: what `nodemesh status/workloads/certs/conns/...` read, from memory.

Every method is a quick snapshot of state the agent already holds (the config view, the proxy's
tracker, the certificate manager); nothing here blocks, because the admin server calls it on the
event loop. Datapath counters are read from the pinned map on each `status()` (a few syscalls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata

from cryptography import x509

from agent.admin.sources import (
    AgentStatus,
    CertInfo,
    ConnectionInfo,
    ControllerLink,
    DatapathStatus,
    MeshSettings,
    ProxyState,
    ProxyStatus,
)
from agent.identity import CertificateManager
from agent.node import NodeConfig
from agent.proxy.server import NodeProxy
from api.resources import PolicyObject, Service, Workload
from api.spiffe import SpiffeId

log = logging.getLogger("nodemesh.agent.admin")

PROGRAMS = (
    "cgroup/connect4 nm_connect4",
    "sockops nm_sockops",
    "cgroup/getpeername4 nm_getpeername4",
    "sk_lookup nm_sk_lookup (per pod netns)",
)


@dataclass(slots=True)
class LinkState:
    """What the agent knows of its controller link (updated by the config handler)."""

    address: str
    connected: Callable[[], bool]
    last_push_version: str = ""
    last_push_nonce: str = ""
    last_push_at: float | None = None
    last_error: str = ""
    started_at: float = field(default_factory=time.time)


def _version() -> str:
    try:
        return metadata.version("nodemesh")
    except metadata.PackageNotFoundError:
        return "dev"


class AgentSources:
    def __init__(
        self,
        node: str,
        config: NodeConfig,
        proxy: NodeProxy,
        certs: CertificateManager,
        link: LinkState,
        datapath_counters: Callable[[], dict[str, int]],
        enrolled: Callable[[], int],
        pin_dir: str,
    ) -> None:
        self._node = node
        self._config = config
        self._proxy = proxy
        self._certs = certs
        self._link = link
        self._counters = datapath_counters
        self._enrolled = enrolled
        self._pin_dir = pin_dir
        self._version = _version()

    def status(self) -> AgentStatus:
        stats = self._proxy.stats()
        try:
            counters = self._counters()
        except Exception as exc:
            log.warning("event=datapath_counters_failed error=%r", exc)
            counters = {}
        link = self._link
        return AgentStatus(
            node=self._node,
            version=self._version,
            started_at=link.started_at,
            proxy=ProxyStatus(
                state=ProxyState.RUNNING,
                listeners=3 * stats.get("pods", 0),
                active_connections=stats.get("active", 0),
                pods=stats.get("pods", 0),
                source_ip_pods=stats.get("pods_source_ip", 0),
                slots_in_use=stats.get("connection_slots_in_use", 0),
                slots=stats.get("connection_slots", 0),
                slots_per_source=stats.get("connection_slots_per_source", 0),
            ),
            datapath=DatapathStatus(
                backend="bcc", programs=PROGRAMS, maps=(), counters=counters, pin_dir=self._pin_dir
            ),
            controller=ControllerLink(
                address=link.address,
                connected=link.connected(),
                last_push_version=link.last_push_version,
                last_push_nonce=link.last_push_nonce,
                last_push_at=link.last_push_at,
                last_error=link.last_error,
            ),
            enrolled_pods=self._enrolled(),
        )

    def mesh(self) -> MeshSettings:
        return MeshSettings(self._config.trust_domain or "cluster.local")

    def workloads(self) -> Sequence[Workload]:
        return self._config.workloads()

    def services(self) -> Sequence[Service]:
        return self._config.services()

    def policies(self) -> Sequence[PolicyObject]:
        return [r for r in self._config.resources.values() if isinstance(r, PolicyObject)]

    def certs(self) -> Sequence[CertInfo]:
        out: list[CertInfo] = []
        for row in self._certs.status():
            identity = str(row["identity"])
            cert = self._certs.certificate(SpiffeId.parse(identity))
            if cert is None:
                continue
            leaf = x509.load_pem_x509_certificate(cert.chain_pem[0])
            out.append(
                CertInfo.from_certificate(
                    identity,
                    leaf,
                    cert.renew_at,
                    pods=int(str(row["pods"])),
                    last_error=str(row["last_error"]),
                )
            )
        return out

    def connections(self) -> Sequence[ConnectionInfo]:
        return self._proxy.connections()

    def metrics_text(self) -> str:
        return self._proxy.metrics_text()
