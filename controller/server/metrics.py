"""Prometheus metrics of the controller (one registry per server object, so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from api import logsink

disable_created_metrics()  # type: ignore[no-untyped-call]


class ControllerMetrics:
    """The controller's counters, gauges and histograms, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pushes = Counter(
            "nodemesh_controller_pushes", "Config pushes by node and result", ["node", "result"], registry=r
        )
        self.connected_agents = Gauge(
            "nodemesh_controller_connected_agents",
            "Config streams open (an agent with proxy workers opens one per process)",
            registry=r,
        )
        self.connected_nodes = Gauge(
            "nodemesh_controller_connected_nodes", "Nodes with at least one config stream open", registry=r
        )
        self.certificates_issued = Counter(
            "nodemesh_controller_certificates_issued", "Workload certificates signed", registry=r
        )
        self.certificates_refused = Counter(
            "nodemesh_controller_certificates_refused", "CSRs refused", ["reason"], registry=r
        )
        self.push_ack_seconds = Histogram(
            "nodemesh_controller_push_ack_seconds",
            "Time from a push to its ACK or NACK",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.config_errors = Gauge(
            "nodemesh_controller_config_errors", "Errors in the config sources right now", registry=r
        )
        r.register(_LogRecordsDropped())


class _LogRecordsDropped(Collector):
    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "nodemesh_controller_log_records_dropped",
            "Log records dropped because stderr did not take them fast enough (api/logsink.py)",
            value=logsink.records_dropped(),
        )
