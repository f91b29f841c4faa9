"""The agent's Prometheus endpoint (`:15020/metrics` in the node netns, as Istio's agents serve it).

One registry holds the proxy's Istio TCP metrics plus an `AgentCollector` that, at scrape time,
reads the process (RSS, CPU, open fds, via psutil) and the datapath's BPF counters. Served by
prometheus-client's own HTTP server on a thread: a scrape never runs on the proxy's event loop.

With proxy workers (agent/workers.py) the main process serves one exposition for the node:
`WorkerMetrics` wraps the main registry and merges each up worker's `/metrics` (read from its admin
socket, parsed with prometheus-client's parser) into it, family by family, as `merge_rule` says:
per-proxy traffic is summed, per-process values get a `worker` label, node-wide values are the main
process's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from agent.admin import client
from agent.admin.client import PeerError
from agent.admin.sources import ProxyWorker, Workers

log = logging.getLogger("nodemesh.agent.metrics")

METRICS_PORT = 15020
SCRAPE_TIMEOUT = 0.75  # seconds a worker has to answer `/metrics`
SCRAPE_THREADS = 8  # workers scraped at once


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


# --- one exposition for the main process and its proxy workers -----------------------------------


class MergeRule(StrEnum):
    """How a worker's sample joins the main process's exposition."""

    SUM = "sum"  # per-proxy traffic: the node's value is the sum over the processes
    PER_PROCESS = "per_process"  # the process's own (memory, CPU, GC): kept apart, labelled `worker`
    MAIN_ONLY = "main_only"  # node-wide (the BPF maps, the pods served): the main process's value


# Families named `istio_*` or `nodemesh_proxy_*` count a proxy's traffic: connections, bytes,
# refusals (`nodemesh_proxy_stat{stat="opened"|"overload"|...}`), so the node's value is the sum.
SUMMED_PREFIXES = ("istio_", "nodemesh_proxy_")
# Read from the pinned BPF maps every process shares: a worker reports the same values again.
MAIN_ONLY_FAMILIES = frozenset({"nodemesh_datapath_events"})
# The main process's view of its workers (supervision, flow feed, these scrapes).
MAIN_ONLY_PREFIXES = ("nodemesh_proxy_worker",)
# `nodemesh_proxy_stat` values that count pods, not traffic: every worker serves every pod.
MAIN_ONLY_PROXY_STATS = frozenset({"pods", "pods_source_ip"})
WORKER_LABEL = "worker"


def merge_rule(family: str, labels: Mapping[str, str]) -> MergeRule:
    """The rule for one sample of `family`. What is not known to be traffic or node-wide (process
    metrics, GC pauses, a family added later) is kept per process: never counted twice, never lost."""
    if family in MAIN_ONLY_FAMILIES or family.startswith(MAIN_ONLY_PREFIXES):
        return MergeRule.MAIN_ONLY
    if family.endswith("_created"):  # a counter's start time (parsed as a gauge family): not a count
        return MergeRule.MAIN_ONLY
    if family == "nodemesh_proxy_stat" and labels.get("stat") in MAIN_ONLY_PROXY_STATS:
        return MergeRule.MAIN_ONLY
    if family.startswith(SUMMED_PREFIXES):
        return MergeRule.SUM
    return MergeRule.PER_PROCESS


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and its sorted labels


def _series(sample: Sample) -> SeriesKey:
    return sample.name, tuple(sorted(sample.labels.items()))


def merge_families(
    own: Iterable[Metric], workers: Iterable[tuple[int, Iterable[Metric]]]
) -> tuple[list[Metric], list[tuple[int, str]]]:
    """The main process's families with each worker's merged in (`merge_rule`), one family per name
    (main's first, in its order; then families only workers have), and the families that could not
    be merged, as (worker index, why): a worker gave a name another type; its part is left out.

    Summing adds samples of the same name and labels: counters, gauges, histogram buckets, `_sum`
    and `_count` alike (workers run the same code, so their buckets are the main process's).
    """
    merged: dict[str, Metric] = {}
    for family in own:
        target = merged.get(family.name)
        if target is None:
            target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        target.samples.extend(family.samples)
    positions: dict[str, dict[SeriesKey, int]] = {}
    conflicts: list[tuple[int, str]] = []
    for index, families in workers:
        worker = str(index)
        for family in families:
            rules = [(s, merge_rule(family.name, s.labels)) for s in family.samples]
            taken = [(s, rule) for s, rule in rules if rule is not MergeRule.MAIN_ONLY]
            if not taken:
                continue
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            elif target.type != family.type:
                conflicts.append((index, f"{family.name} is a {family.type}, here a {target.type}: left out"))
                continue
            at = positions.get(family.name)
            if at is None:
                at = positions[family.name] = {_series(s): i for i, s in enumerate(target.samples)}
            created = family.name + "_created"  # a start time, not a count
            for s, rule in taken:
                if rule is MergeRule.PER_PROCESS:
                    target.samples.append(Sample(s.name, {**s.labels, WORKER_LABEL: worker}, s.value))
                    continue
                if s.name == created:
                    continue
                key = _series(s)
                i = at.get(key)
                if i is None:
                    at[key] = len(target.samples)
                    target.samples.append(Sample(s.name, dict(s.labels), s.value))
                else:
                    old = target.samples[i]
                    target.samples[i] = Sample(old.name, old.labels, old.value + s.value)
    return list(merged.values()), conflicts


# How long a summed counter series that no process reports any more (a removed pod's, a worker's that
# stays down) is still exported with its held value; then its state is dropped. This bounds the
# state: series are held only while some process reported them within this time.
HELD_SERIES_TTL = 600.0
HELD_PART = -1  # the index `merge_families` is given for the held values (they are no worker's)


def _counting_samples(family: Metric) -> Iterator[Sample]:
    """The samples of `family` that are summed over the processes and only ever grow: counters,
    and histogram and summary buckets, counts and sums (not gauges, nor a summary's quantiles)."""
    if family.type not in ("counter", "histogram", "summary"):
        return
    for s in family.samples:
        if family.type == "counter":
            counting = not s.name.endswith("_created")  # a start time
        else:
            counting = s.name.endswith(("_bucket", "_count", "_sum"))
        if counting and merge_rule(family.name, s.labels) is MergeRule.SUM:
            yield s


@dataclass(slots=True)
class _Held:
    """One summed counter series that workers reported: its family, and what its sum rests on."""

    family: str
    documentation: str
    type: str
    base: float = 0.0  # the last values of worker processes that restarted, or of series reset
    last: dict[int, float] = field(default_factory=dict)  # per worker index: its last value
    reported: float = 0.0  # monotonic time any process last reported the series


class HeldCounters:
    """Keeps the node's summed counters from going down: Prometheus reads any decrease as a reset to
    0, and `rate()`/`increase()` then count the whole total again.

    Each worker's last value of each summed counter series is held, and stands in for it while the
    worker (or the series in it) is missing from a scrape: no answer in time, down, restarting. When
    a worker restarts (another pid or restart count), or a series of it goes down (a restart its pid
    did not show), its held values are folded into the series' `base`, which stays in the sum: the
    node's counter goes on from where it was. Gauges are not held: a missing worker's are left out.
    The main process's own values are never held (a new main process is a new agent: a real reset).

    Not thread-safe: `WorkerMetrics` calls `held` for one collection at a time.
    """

    def __init__(self, *, ttl: float = HELD_SERIES_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._series: dict[SeriesKey, _Held] = {}
        self._processes: dict[int, tuple[int | None, int]] = {}  # per worker index: (pid, restarts)

    def held(
        self, own: Sequence[Metric], scraped: Sequence[tuple[ProxyWorker, Sequence[Metric]]]
    ) -> list[Metric]:
        """Record the counters of the workers just scraped; return the families to add to the sum
        besides `own` and `scraped`: the held values of what is missing, and the bases."""
        now = self._clock()
        fresh: dict[int, set[SeriesKey]] = {}
        for w, families in scraped:
            process = (w.pid, w.restarts)
            if self._processes.setdefault(w.index, process) != process:
                self._retire(w.index)  # a new process: its counters started again from 0
                self._processes[w.index] = process
            fresh[w.index] = seen = set()
            for family in families:
                for s in _counting_samples(family):
                    key = _series(s)
                    held = self._series.get(key)
                    if held is None:
                        held = self._series[key] = _Held(family.name, family.documentation, family.type)
                    last = held.last.get(w.index)
                    if last is not None and s.value < last:
                        held.base += last
                    held.last[w.index] = s.value
                    held.reported = now
                    seen.add(key)
        for family in own:
            for s in _counting_samples(family):
                if (held := self._series.get(_series(s))) is not None:
                    held.reported = now
        out: dict[str, Metric] = {}
        for key, held in list(self._series.items()):
            if now - held.reported > self._ttl:
                del self._series[key]
                continue
            missing = [value for index, value in held.last.items() if key not in fresh.get(index, ())]
            if not missing and not held.base:
                continue
            target = out.get(held.family)
            if target is None:
                target = out[held.family] = Metric(held.family, held.documentation, held.type)
            target.samples.append(Sample(key[0], dict(key[1]), held.base + sum(missing)))
        return list(out.values())

    def __len__(self) -> int:
        """The series held."""
        return len(self._series)

    def _retire(self, index: int) -> None:
        for held in self._series.values():
            if (last := held.last.pop(index, None)) is not None:
                held.base += last


class WorkerMetrics:
    """The main process's registry `own` merged with every up proxy worker's `/metrics`, collected
    as one exposition; plus the workers' up/down gauge and scrape errors. Register it alone in a
    registry of its own (`merged_registry`): registered beside `own`'s collectors it would repeat
    their families.

    Collecting blocks (each worker has `timeout` seconds, read at once on a few threads): call it on
    a scrape thread or `asyncio.to_thread`, never on the event loop. A worker that does not answer, or
    answers what does not parse, is left out of that collection, logged and counted; its summed
    counters keep their last values (`HeldCounters`), so the node's never go down.
    """

    def __init__(
        self,
        own: Collector,
        workers: Workers,
        *,
        timeout: float = SCRAPE_TIMEOUT,
        fetch: Callable[[ProxyWorker], str] | None = None,
    ) -> None:
        self._own = own
        self._workers = workers
        self._timeout = timeout
        self._fetch = fetch or self._fetch_admin
        self._lock = threading.Lock()  # the :15020 thread and the admin route may collect at once
        # ... but one at a time: a scrape recorded in `_held` after a newer one would look like a reset
        self._collecting = threading.Lock()
        self._held = HeldCounters()
        self.scrape_errors: Counter[int] = Counter()

    def _fetch_admin(self, w: ProxyWorker) -> str:
        return client.get_blocking(w.admin_socket, "/metrics", timeout=self._timeout).decode()

    def _failed(self, index: int, error: str) -> None:
        with self._lock:
            self.scrape_errors[index] += 1
        log.warning("event=proxy_worker_scrape_failed worker=%d error=%r", index, error)

    def _merged(self) -> tuple[list[ProxyWorker], list[ProxyWorker], list[Metric]]:
        """The workers, those up, and the merged families (own, the up workers' and the held)."""
        workers = list(self._workers())
        up = [w for w in workers if w.up]
        if len(up) > 1:
            with ThreadPoolExecutor(min(len(up), SCRAPE_THREADS), thread_name_prefix="worker-scrape") as pool:
                scraped = list(pool.map(self._scrape, up))
        else:
            scraped = [self._scrape(w) for w in up]
        own = list(self._own.collect())
        answered = [(w, f) for w, f in zip(up, scraped, strict=True) if f is not None]
        held = self._held.held(own, answered)
        families, conflicts = merge_families(own, [*((w.index, f) for w, f in answered), (HELD_PART, held)])
        for index, conflict in conflicts:
            if index != HELD_PART:  # a held value's conflict was reported when it was scraped
                self._failed(index, conflict)
        return workers, up, families

    def _scrape(self, w: ProxyWorker) -> list[Metric] | None:
        try:
            return list(text_string_to_metric_families(self._fetch(w)))
        except PeerError as exc:
            self._failed(w.index, str(exc))
        except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad text
            self._failed(w.index, f"unparsable metrics: {exc!r}")
        return None

    def collect(self) -> Iterator[Metric]:
        with self._collecting:
            workers, up, families = self._merged()
        yield from families
        state = GaugeMetricFamily("nodemesh_proxy_workers", "Proxy worker processes by state (the main "
                                  "process not counted)", labels=["state"])
        state.add_metric(["up"], len(up))
        state.add_metric(["down"], len(workers) - len(up))
        yield state
        errors = CounterMetricFamily(
            "nodemesh_proxy_worker_scrape_errors",
            "Reads of a proxy worker's metrics that failed (no answer in time, unparsable, not mergeable)",
            labels=["worker"],
        )
        with self._lock:
            counts = {w.index: self.scrape_errors[w.index] for w in workers} | dict(self.scrape_errors)
        for index, count in sorted(counts.items()):
            errors.add_metric([str(index)], count)
        yield errors


def merged_registry(
    own: CollectorRegistry, workers: Workers, *, timeout: float = SCRAPE_TIMEOUT
) -> CollectorRegistry:
    """A registry whose one collector is `WorkerMetrics(own, workers)`: give it to `MetricsServer`
    and to `AdminServer(metrics=...)`; the agent's collectors stay registered in `own`."""
    exposed = CollectorRegistry(auto_describe=False)
    exposed.register(WorkerMetrics(own, workers, timeout=timeout))
    return exposed
