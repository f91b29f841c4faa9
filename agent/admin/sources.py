"""What the admin API serves, as a typed `AdminSources` Protocol the agent implements.

Every method returns a snapshot of state the agent already holds in memory; the admin server calls
them on the event loop, so they must be quick and must not block (no network, no disk). Times are
Unix seconds (`time.time()`); the server turns them into ages and countdowns with its own clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography import x509

from api.authz import DEFAULT_ROOT_NAMESPACE
from api.resources import PolicyObject, Service, Workload


class ProxyState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPED = "stopped"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    state: ProxyState
    listeners: int = 0  # listening sockets opened in pods' netns (15001/15006/15008 per pod)
    active_connections: int = 0
    detail: str = ""
    pods: int = 0  # pods served
    source_ip_pods: int = 0  # of which apps see their callers' IPs (source-IP preservation set up)
    slots_in_use: int = 0  # of `max_connections`: open connections and those still being set up
    slots: int = 0  # `max_connections`
    slots_per_source: int = 0  # `max_connections_per_source`: one source IP's share of `slots`


@dataclass(frozen=True, slots=True)
class DatapathStatus:
    """The eBPF side: what is attached and pinned, and the datapath's counters (map name → value)."""

    backend: str  # "bcc", "fake", ...
    programs: tuple[str, ...] = ()  # attached programs, e.g. "cgroup/connect4 nodemesh_connect4"
    maps: tuple[str, ...] = ()  # pinned maps
    counters: Mapping[str, int] = field(default_factory=dict)
    fast_path: bool = False  # same-node sockmap splice enabled
    pin_dir: str = ""


@dataclass(frozen=True, slots=True)
class ControllerLink:
    address: str
    connected: bool
    last_push_version: str = ""
    last_push_nonce: str = ""
    last_push_at: float | None = None  # Unix time of the last ACKed push
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """Mesh-wide settings the explain resolver needs (from the controller's snapshot)."""

    trust_domain: str
    root_namespace: str = DEFAULT_ROOT_NAMESPACE


@dataclass(frozen=True, slots=True)
class AgentStatus:
    node: str
    version: str
    started_at: float
    proxy: ProxyStatus
    datapath: DatapathStatus
    controller: ControllerLink
    enrolled_pods: int = 0


@dataclass(frozen=True, slots=True)
class CertInfo:
    """One workload certificate (SVID) held by the agent."""

    identity: str  # spiffe://td/ns/x/sa/y
    serial: str  # hex
    issuer: str  # RFC 4514 subject of the issuer
    not_before: float
    not_after: float
    renew_at: float | None  # None while the first issue is pending
    pods: int = 0  # local pods using it
    last_error: str = ""

    @classmethod
    def from_certificate(
        cls, identity: str, cert: x509.Certificate, renew_at: datetime | None = None, pods: int = 0,
        last_error: str = "",
    ) -> CertInfo:
        """From a parsed leaf; `renew_at` defaults to half-life, as the certificate manager renews."""
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
        renew = renew_at if renew_at is not None else nb + (na - nb) / 2
        return cls(
            identity=identity,
            serial=format(cert.serial_number, "x"),
            issuer=cert.issuer.rfc4514_string(),
            not_before=nb.timestamp(),
            not_after=na.timestamp(),
            renew_at=renew.timestamp(),
            pods=pods,
            last_error=last_error,
        )


class ConnPath(StrEnum):
    """How a live connection travels."""

    HBONE = "hbone"  # mTLS tunnel to another node's 15008
    SAME_NODE = "same-node"  # both ends on this node (spliced, or through the local proxy)
    PASSTHROUGH = "passthrough"  # destination outside the mesh: forwarded as is
    PLAINTEXT_INBOUND = "plaintext-inbound"  # inbound on 15006 from a peer without mTLS


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A connection the node proxy is carrying now."""

    id: str
    path: ConnPath
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    opened_at: float
    src_pod: str = ""  # <ns>/<name>
    src_identity: str = ""
    dst_service: str = ""  # hostname when a VIP was dialled
    dst_workload: str = ""  # <ns>/<name>
    bytes_sent: int = 0  # source → destination
    bytes_received: int = 0


class AdminSources(Protocol):
    """The agent's state, as the admin API reads it. Each call returns a fresh snapshot."""

    def status(self) -> AgentStatus: ...

    def mesh(self) -> MeshSettings: ...

    def workloads(self) -> Sequence[Workload]: ...

    def services(self) -> Sequence[Service]: ...

    def policies(self) -> Sequence[PolicyObject]: ...

    def certs(self) -> Sequence[CertInfo]: ...

    def connections(self) -> Sequence[ConnectionInfo]: ...

    def metrics_text(self) -> str:
        """Prometheus text exposition (`prometheus_client.generate_latest(registry).decode()`)."""
        ...


class ProxyWorker(Protocol):
    """One proxy worker process as the main process's supervisor reports it (`agent.workers.WorkerInfo`
    is one; a Protocol here keeps the admin package free of the supervisor)."""

    @property
    def index(self) -> int: ...  # 1..N-1 (0 is the main process)

    @property
    def pid(self) -> int | None: ...

    @property
    def admin_socket(self) -> Path: ...

    @property
    def up(self) -> bool: ...  # running and its admin socket exists

    @property
    def restarts(self) -> int: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def last_exit(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ProxyCounts:
    """What a proxy worker's own status says of its proxy (added to the node's in `/v1/status`)."""

    connections: int
    listeners: int
    slots_in_use: int = 0
    slots: int = 0
    slots_per_source: int = 0


Workers = Callable[[], Sequence[ProxyWorker]]  # the supervisor's `workers()`: their state now
