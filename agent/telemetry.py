"""The agent's Prometheus endpoint (`:15020/metrics` in the node netns, as Istio's agents serve it).

One registry holds the proxy's Istio TCP metrics plus an `AgentCollector` that, at scrape time,
reads the process (RSS, CPU, open fds, via psutil) and the datapath's BPF counters. Served by
prometheus-client's own HTTP server on a thread: a scrape never runs on the proxy's event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("nodemesh.agent.metrics")

METRICS_PORT = 15020


class AgentCollector(Collector):
    """Process and datapath metrics, read when scraped (a failed read is logged, not raised)."""

    def __init__(
        self,
        node: str,
        datapath_counters: Callable[[], Mapping[str, int]],
        proxy_stats: Callable[[], Mapping[str, int]],
        log_records_dropped: Callable[[], int] = lambda: 0,
    ) -> None:
        self._node = node
        self._counters = datapath_counters
        self._proxy_stats = proxy_stats
        self._log_dropped = log_records_dropped
        self._proc = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        with self._proc.oneshot():
            mem = self._proc.memory_info()
            cpu = self._proc.cpu_times()
            fds = self._proc.num_fds()
        yield GaugeMetricFamily("nodemesh_agent_resident_memory_bytes", "Agent RSS", value=mem.rss)
        yield CounterMetricFamily(
            "nodemesh_agent_cpu_seconds", "Agent CPU time (user+system)", value=cpu.user + cpu.system
        )
        yield GaugeMetricFamily("nodemesh_agent_open_fds", "Agent open file descriptors", value=fds)
        yield CounterMetricFamily(
            "nodemesh_agent_log_records_dropped",
            "Log records dropped because stderr did not take them fast enough (api/logsink.py)",
            value=self._log_dropped(),
        )
        dp = CounterMetricFamily(
            "nodemesh_datapath_events", "Datapath counters from the BPF maps", labels=["node", "counter"]
        )
        try:
            for name, value in sorted(self._counters().items()):
                dp.add_metric([self._node, name], value)
        except Exception as exc:  # a scrape must not fail because a map read did
            log.warning("event=datapath_counters_failed error=%r", exc)
        yield dp
        proxy = GaugeMetricFamily("nodemesh_proxy_stat", "Node proxy counters and gauges", labels=["stat"])
        for name, value in sorted(self._proxy_stats().items()):
            proxy.add_metric([name], value)
        yield proxy


class MetricsServer:
    """`GET /metrics` of one registry on HOST:PORT, on a daemon thread; `close()` stops it."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
        self.port = int(self._httpd.server_port)
        log.info("event=metrics_listening address=%s port=%d", host or "0.0.0.0", self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
