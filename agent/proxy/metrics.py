"""Istio's standard TCP metrics for the node proxy, with Istio's label names and values.

Counters `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
`istio_tcp_sent_bytes_total` (bytes sent to the client: the response direction) and
`istio_tcp_received_bytes_total` (bytes received from the client: the request direction), as Istio's
"Standard Metrics" reference defines them, so Grafana's Istio dashboards and Kiali work unchanged.
`tcp_labels` is pure (label values from workloads); `ProxyMetrics` owns a per-proxy registry.

`response_flags` are ztunnel's (`src/proxy/metrics.rs` `ResponseFlags`): a connection refused once
ztunnel has counted it open (after it knows both ends, before authorizing and dialling) is counted
opened with `-` and closed with the flag that says why (`DENY`, `CONNECT`), as ztunnel's
`ConnectionResult::record_with_flag`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import prometheus_client
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from api.resources import Service, Workload

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"
# Istio's pod label naming the pod's workload. A controller from before `Workload.workload_name`
# added it to the labels of pods created by a controller; read it only when that field is empty.
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"

TCP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class ResponseFlags(StrEnum):
    """The `response_flags` label values ztunnel reports (its `ResponseFlags` and their encoding)."""

    NONE = "-"
    DENY = "DENY"  # AuthorizationPolicyDenied: refused by authorization (STRICT included)
    CONNECT = "CONNECT"  # ConnectionFailure: the app could not be connected to (HBONE inbound)


def workload_name(workload: Workload) -> str:
    """The name of the pod's workload (Istio's `source_workload`/`destination_workload`): what the
    controller derived (the pod's `service.istio.io/workload-name` label, else its controller:
    controller.registry.workload_name), else that label as an older controller sent it, else the
    pod's name (a pod without an owner)."""
    return workload.workload_name or workload.label_map().get(WORKLOAD_NAME_LABEL) or workload.name


def canonical_service(workload: Workload) -> str:
    """`service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the
    workload name."""
    labels = workload.label_map()
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return workload_name(workload)


def canonical_revision(workload: Workload) -> str:
    labels = workload.label_map()
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        if labels.get(key):
            return labels[key]
    return "latest"


def _side(prefix: str, workload: Workload | None, principal: str | None) -> dict[str, str]:
    if workload is None:
        return {
            f"{prefix}_workload": UNKNOWN,
            f"{prefix}_workload_namespace": UNKNOWN,
            f"{prefix}_principal": principal or UNKNOWN,
            f"{prefix}_app": UNKNOWN,
            f"{prefix}_version": UNKNOWN,
            f"{prefix}_canonical_service": UNKNOWN,
            f"{prefix}_canonical_revision": UNKNOWN,
            f"{prefix}_cluster": UNKNOWN,
        }
    service, revision = canonical_service(workload), canonical_revision(workload)
    return {
        # Istio names the workload after its controller (Deployment...), not the pod
        f"{prefix}_workload": workload_name(workload),
        f"{prefix}_workload_namespace": workload.namespace,
        f"{prefix}_principal": principal or UNKNOWN,
        # as ztunnel (`CommonTrafficLabels::with_source`/`with_destination`): app and version are
        # the canonical service and revision, not the raw `app`/`version` labels a sidecar reports
        f"{prefix}_app": service,
        f"{prefix}_version": revision,
        f"{prefix}_canonical_service": service,
        f"{prefix}_canonical_revision": revision,
        f"{prefix}_cluster": DEFAULT_CLUSTER,
    }


@dataclass(frozen=True, slots=True)
class TcpPeers:
    """Who talks to whom, as known when a connection opens: enough to label its series."""

    reporter: str  # "source" (outbound side) | "destination" (inbound side)
    src_workload: Workload | None
    src_principal: str | None  # spiffe://...; None for plaintext
    dst_workload: Workload | None
    dst_principal: str | None
    service: Service | None
    mtls: bool


def tcp_labels(peers: TcpPeers, flags: ResponseFlags = ResponseFlags.NONE) -> dict[str, str]:
    """The label values of one connection's series (missing values are `unknown`, as Istio's)."""
    labels = {"reporter": peers.reporter}
    labels |= _side("source", peers.src_workload, peers.src_principal)
    labels |= _side("destination", peers.dst_workload, peers.dst_principal)
    svc = peers.service
    if svc is not None:
        labels["destination_service"] = svc.hostname
        labels["destination_service_name"] = svc.name
        labels["destination_service_namespace"] = svc.namespace
    else:
        labels["destination_service"] = UNKNOWN
        labels["destination_service_name"] = UNKNOWN
        # Istio without a Service: the service namespace is still the pod's
        labels["destination_service_namespace"] = (
            peers.dst_workload.namespace if peers.dst_workload is not None else UNKNOWN
        )
    labels["request_protocol"] = "tcp"
    labels["response_flags"] = str(flags)
    labels["connection_security_policy"] = _security_policy(peers)
    return labels


def _security_policy(peers: TcpPeers) -> str:
    """`mutual_tls` over HBONE (and same node); plaintext is `none` when the destination reports it
    (as Envoy's), `unknown` when the source does (Istio's reference; ztunnel's passthrough)."""
    if peers.mtls:
        return "mutual_tls"
    return "none" if peers.reporter == "destination" else UNKNOWN


SERIES_CACHE = 4096  # label sets whose counters ProxyMetrics keeps resolved


class TcpSeries:
    """The four counters of one connection's label set, resolved once (no label lookups per chunk)."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self, metrics: ProxyMetrics, labels: dict[str, str]) -> None:
        values = [labels[name] for name in TCP_LABELS]
        self.opened = metrics.opened.labels(*values)
        self.closed = metrics.closed.labels(*values)
        self.sent = metrics.sent.labels(*values)
        self.received = metrics.received.labels(*values)


class _BeforeCollect(Collector):
    """A collector with no metrics of its own: runs hooks (bringing counters up to date) when a
    collection starts."""

    def __init__(self, hooks: list[Callable[[], None]]) -> None:
        self.hooks = hooks

    def collect(self) -> Iterable[Metric]:
        for hook in self.hooks:
            hook()
        return ()


class ProxyMetrics:
    """The proxy's Prometheus registry (the agent exposes it at `:15020/metrics` / the admin API)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._before_collect: list[Callable[[], None]] = []
        # registered before the counters, so a collection runs the hooks first (registration order)
        self.registry.register(_BeforeCollect(self._before_collect))
        self._series: dict[tuple[TcpPeers, ResponseFlags], TcpSeries] = {}
        self.opened = Counter(
            "istio_tcp_connections_opened", "Total TCP connections opened", TCP_LABELS, registry=self.registry
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "Total TCP connections closed", TCP_LABELS, registry=self.registry
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes",
            "Total bytes sent during response in case of a TCP connection (to the client)",
            TCP_LABELS,
            registry=self.registry,
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "Total bytes received during request in case of a TCP connection (from the client)",
            TCP_LABELS,
            registry=self.registry,
        )

    def before_collect(self, hook: Callable[[], None]) -> None:
        """Run `hook` at the start of every collection (a scrape, `text()`), in the collecting thread."""
        self._before_collect.append(hook)

    def series(self, peers: TcpPeers, flags: ResponseFlags = ResponseFlags.NONE) -> TcpSeries:
        """The counters of a label set; resolved once per distinct (`peers`, `flags`) (the label
        children live in the registry for good anyway), so a new connection costs one dict lookup here."""
        key = (peers, flags)
        hit = self._series.get(key)
        if hit is None:
            if len(self._series) >= SERIES_CACHE:  # bounded: pod churn makes new keys forever
                self._series.clear()
            hit = self._series[key] = TcpSeries(self, tcp_labels(peers, flags))
        return hit

    def text(self) -> str:
        """Prometheus text exposition of this registry."""
        return prometheus_client.generate_latest(self.registry).decode()
