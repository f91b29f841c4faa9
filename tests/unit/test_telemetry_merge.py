"""One exposition for the main agent process and its proxy workers (`agent.telemetry`): which samples
are summed, which stay per process, which are the main process's alone, and what a worker that
does not answer or answers garbage costs (nothing but a counted, logged scrape error)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.admin.client import PeerError
from agent.heap import GcPauses
from agent.telemetry import (
    AgentCollector,
    HeldCounters,
    MergeRule,
    WorkerMetrics,
    merge_families,
    merge_rule,
    merged_registry,
)
from agent.workers import WorkerInfo

LABELS = ("reporter", "source_workload", "destination_workload")


class Process:
    """One process's registry as the agent builds it: the proxy's istio counters, AgentCollector
    (process, datapath and proxy stats) and the GC pause histogram."""

    def __init__(self, opened: dict[tuple[str, ...], int], stats: dict[str, int], datapath: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter = Counter("istio_tcp_connections_opened", "Total TCP connections opened", LABELS,
                          registry=self.registry)
        for labels, n in opened.items():
            counter.labels(*labels).inc(n)
        self.registry.register(AgentCollector("node1", lambda: {"connect_redirected": datapath},
                                              lambda: stats, lambda: 0))
        self.gc = GcPauses()
        self.registry.register(self.gc)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def worker(index: int, up: bool = True) -> WorkerInfo:
    return WorkerInfo(index=index, pid=1000 + index if up else None,
                      admin_socket=Path(f"/nonexistent/worker-{index}.sock"), up=up)


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in an exposition, parsed back (None when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return None


WEB_DB = ("source", "web", "db")
API_DB = ("source", "api", "db")


Node = tuple[Process, dict[int, Process]]


@pytest.fixture
def node() -> Node:
    def stats(opened: int, overload: int, active: int) -> dict[str, int]:
        return {"opened": opened, "overload": overload, "active": active, "pods": 4, "pods_source_ip": 4}

    main = Process({WEB_DB: 3}, stats(3, 0, 1), 100)
    workers = {
        1: Process({WEB_DB: 5, API_DB: 2}, stats(7, 2, 2), 100),  # API_DB: a label set only worker 1 has
        2: Process({WEB_DB: 1}, stats(1, 0, 0), 100),
    }
    return main, workers


def exposition(main: Process, workers: dict[int, Process], infos: list[WorkerInfo] | None = None) -> str:
    infos = infos if infos is not None else [worker(i) for i in workers]
    exposed = CollectorRegistry()
    exposed.register(WorkerMetrics(main.registry, lambda: infos, fetch=lambda w: workers[w.index].text()))
    return generate_latest(exposed).decode()


@pytest.mark.parametrize(
    ("family", "labels", "rule"),
    [
        ("istio_tcp_connections_opened", {}, MergeRule.SUM),
        ("istio_tcp_received_bytes", {}, MergeRule.SUM),
        ("nodemesh_proxy_stat", {"stat": "overload"}, MergeRule.SUM),
        ("nodemesh_proxy_stat", {"stat": "active"}, MergeRule.SUM),
        ("nodemesh_proxy_stat", {"stat": "pods"}, MergeRule.MAIN_ONLY),
        ("nodemesh_proxy_stat", {"stat": "pods_source_ip"}, MergeRule.MAIN_ONLY),
        ("nodemesh_datapath_events", {"counter": "connect_redirected"}, MergeRule.MAIN_ONLY),
        ("nodemesh_proxy_workers", {"state": "up"}, MergeRule.MAIN_ONLY),
        ("nodemesh_proxy_worker_scrape_errors", {}, MergeRule.MAIN_ONLY),
        ("nodemesh_agent_resident_memory_bytes", {}, MergeRule.PER_PROCESS),
        ("nodemesh_agent_cpu_seconds", {}, MergeRule.PER_PROCESS),
        ("nodemesh_agent_gc_pause_seconds", {"generation": "2"}, MergeRule.PER_PROCESS),
        ("something_new", {}, MergeRule.PER_PROCESS),
    ],
)
def test_merge_rules(family: str, labels: dict[str, str], rule: MergeRule) -> None:
    assert merge_rule(family, labels) is rule


def test_traffic_counters_are_summed_per_label_set(node: Node) -> None:
    main, workers = node
    text = exposition(main, workers)
    web = dict(zip(LABELS, WEB_DB, strict=True))
    api = dict(zip(LABELS, API_DB, strict=True))
    assert sample(text, "istio_tcp_connections_opened_total", web) == 3 + 5 + 1
    assert sample(text, "istio_tcp_connections_opened_total", api) == 2  # a label set only worker 1 has
    assert sample(text, "nodemesh_proxy_stat", {"stat": "opened"}) == 3 + 7 + 1
    assert sample(text, "nodemesh_proxy_stat", {"stat": "overload"}) == 2
    assert sample(text, "nodemesh_proxy_stat", {"stat": "active"}) == 3


def test_node_wide_values_are_the_main_process_s(node: Node) -> None:
    main, workers = node
    text = exposition(main, workers)
    assert sample(text, "nodemesh_proxy_stat", {"stat": "pods"}) == 4
    assert sample(text, "nodemesh_proxy_stat", {"stat": "pods_source_ip"}) == 4
    redirected = {"node": "node1", "counter": "connect_redirected"}
    assert sample(text, "nodemesh_datapath_events_total", redirected) == 100
    assert sample(text, "nodemesh_datapath_events_total", {**redirected, "worker": "1"}) is None


def test_per_process_values_are_labelled_not_summed(node: Node) -> None:
    main, workers = node
    main.gc._on_gc("start", {"generation": 0})
    main.gc._on_gc("stop", {"generation": 0})
    for _ in range(3):
        workers[1].gc._on_gc("start", {"generation": 2})
        workers[1].gc._on_gc("stop", {"generation": 2})
    text = exposition(main, workers)
    count = "nodemesh_agent_gc_pause_seconds_count"
    assert sample(text, count, {"generation": "0"}) == 1
    assert sample(text, count, {"generation": "2"}) == 0
    assert sample(text, count, {"generation": "2", "worker": "1"}) == 3
    assert sample(text, count, {"generation": "0", "worker": "2"}) == 0
    bucket = "nodemesh_agent_gc_pause_seconds_bucket"
    assert sample(text, bucket, {"generation": "2", "le": "+Inf", "worker": "1"}) == 3
    assert sample(text, "nodemesh_agent_resident_memory_bytes") is not None
    assert sample(text, "nodemesh_agent_resident_memory_bytes", {"worker": "2"}) is not None


def test_the_exposition_is_valid_with_one_help_and_type_per_family(node: Node) -> None:
    main, workers = node
    text = exposition(main, workers)
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    helps = re.findall(r"^# HELP (\S+) ", text, re.M)
    assert len(types) == len(set(types)) and sorted(types) == sorted(helps)
    assert "istio_tcp_connections_opened_total" in types
    assert {"nodemesh_proxy_workers", "nodemesh_proxy_worker_scrape_errors_total"} <= set(types)
    names = [f.name for f in text_string_to_metric_families(text)]  # parses back
    assert len(names) == len(set(names))


def test_histograms_sum_buckets_sum_and_count() -> None:
    def histogram(buckets: list[tuple[str, float]], total: float, **labels: str) -> Metric:
        family = HistogramMetricFamily("nodemesh_proxy_setup_seconds", "setup", labels=list(labels))
        family.add_metric(list(labels.values()), buckets=buckets, sum_value=total)
        return family

    own = [histogram([("0.1", 1), ("1", 2), ("+Inf", 2)], 0.5, path="hbone")]
    theirs = [histogram([("0.1", 0), ("1", 3), ("+Inf", 4)], 3.0, path="hbone"),
              histogram([("0.1", 1), ("1", 1), ("+Inf", 1)], 0.05, path="passthrough")]
    (merged,), conflicts = merge_families(own, [(1, theirs[:1]), (2, theirs[1:])])
    assert conflicts == []
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in merged.samples}
    hbone = (("path", "hbone"),)
    assert values["nodemesh_proxy_setup_seconds_bucket", (("le", "0.1"), *hbone)] == 1
    assert values["nodemesh_proxy_setup_seconds_bucket", (("le", "1"), *hbone)] == 5
    assert values["nodemesh_proxy_setup_seconds_bucket", (("le", "+Inf"), *hbone)] == 6
    assert values["nodemesh_proxy_setup_seconds_count", hbone] == 6
    assert values["nodemesh_proxy_setup_seconds_sum", hbone] == 3.5
    assert values["nodemesh_proxy_setup_seconds_count", (("path", "passthrough"),)] == 1


def test_a_family_only_a_worker_has_is_added_once() -> None:
    own = [CounterMetricFamily("istio_tcp_sent_bytes", "sent", labels=["reporter"])]  # no samples yet
    def fam(v: float) -> list[Metric]:
        f = CounterMetricFamily("istio_tcp_connections_closed", "Total TCP connections closed",
                                labels=["reporter"])
        f.add_metric(["source"], v)
        return [f]
    merged, _ = merge_families(own, [(1, fam(2)), (2, fam(5))])
    assert [f.name for f in merged] == ["istio_tcp_sent_bytes", "istio_tcp_connections_closed"]
    assert [(s.name, s.value) for s in merged[1].samples] == [("istio_tcp_connections_closed_total", 7)]


def test_a_family_of_another_type_is_left_out_and_reported() -> None:
    own = [GaugeMetricFamily("nodemesh_proxy_stat", "stats", labels=["stat"])]
    own[0].add_metric(["opened"], 1)
    bad = CounterMetricFamily("nodemesh_proxy_stat", "stats", labels=["stat"])
    bad.add_metric(["opened"], 100)
    merged, conflicts = merge_families(own, [(3, [bad])])
    assert [s.value for s in merged[0].samples] == [1]
    assert [index for index, _ in conflicts] == [3] and "counter" in conflicts[0][1]


def test_a_worker_that_does_not_answer_is_skipped_and_counted(node: Node) -> None:
    main, workers = node

    def fetch(w: WorkerInfo) -> str:
        if w.index == 2:
            raise PeerError("no answer within 0.75s")
        return workers[w.index].text()

    collector = WorkerMetrics(main.registry, lambda: [worker(1), worker(2), worker(3, up=False)], fetch=fetch)
    exposed = CollectorRegistry()
    exposed.register(collector)
    text = generate_latest(exposed).decode()
    web = dict(zip(LABELS, WEB_DB, strict=True))
    assert sample(text, "istio_tcp_connections_opened_total", web) == 3 + 5  # worker 2 left out
    assert sample(text, "nodemesh_proxy_worker_scrape_errors_total", {"worker": "2"}) == 1
    assert sample(text, "nodemesh_proxy_worker_scrape_errors_total", {"worker": "1"}) == 0
    assert sample(text, "nodemesh_proxy_worker_scrape_errors_total", {"worker": "3"}) == 0  # down: not asked
    assert sample(text, "nodemesh_proxy_workers", {"state": "up"}) == 2
    assert sample(text, "nodemesh_proxy_workers", {"state": "down"}) == 1
    generate_latest(exposed)
    assert collector.scrape_errors == {2: 2}


@pytest.mark.parametrize(
    "garbage",
    [
        "<html>502 Bad Gateway</html>",
        "# TYPE istio_tcp_connections_opened_total counter\nistio_tcp_connections_opened_total{x=\"1 2\n",
        "\x00\xff binary",
    ],
)
def test_a_worker_that_answers_garbage_is_skipped_and_counted(
    node: Node, garbage: str
) -> None:
    main, workers = node
    collector = WorkerMetrics(main.registry, lambda: [worker(1), worker(2)],
                              fetch=lambda w: garbage if w.index == 1 else workers[2].text())
    exposed = CollectorRegistry()
    exposed.register(collector)
    text = generate_latest(exposed).decode()
    assert sample(text, "istio_tcp_connections_opened_total", dict(zip(LABELS, WEB_DB, strict=True))) == 3 + 1
    assert collector.scrape_errors == {1: 1}


def test_without_workers_the_exposition_is_main_s_plus_the_worker_gauges(
    node: Node,
) -> None:
    main, _ = node
    exposed = merged_registry(main.registry, list)
    text = generate_latest(exposed).decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    own = [f.name for f in text_string_to_metric_families(main.text())]
    assert names == [*own, "nodemesh_proxy_workers", "nodemesh_proxy_worker_scrape_errors"]
    assert sample(text, "nodemesh_proxy_workers", {"state": "up"}) == 0
    assert sample(text, "nodemesh_proxy_workers", {"state": "down"}) == 0


# --- summed counters never go down: Prometheus reads a decrease as a reset and counts it all again ---


class Scrapes:
    """A main process's merged exposition over time: workers come and go, restart, miss scrapes."""

    def __init__(self, main: Process, workers: dict[int, Process]) -> None:
        self.workers = workers
        self.infos = {i: worker(i) for i in workers}
        self.missing: set[int] = set()  # answer nothing within the deadline
        exposed = CollectorRegistry()
        exposed.register(WorkerMetrics(main.registry, lambda: list(self.infos.values()), fetch=self._fetch))
        self.registry = exposed

    def _fetch(self, w: WorkerInfo) -> str:
        if w.index in self.missing:
            raise PeerError("no answer within 0.75s")
        return self.workers[w.index].text()

    def restart(self, index: int, process: Process) -> None:
        old = self.infos[index]
        self.infos[index] = WorkerInfo(index=index, pid=old.pid + 100 if old.pid else 1, up=True,
                                       admin_socket=old.admin_socket, restarts=old.restarts + 1)
        self.workers[index] = process

    def text(self) -> str:
        return generate_latest(self.registry).decode()


WEB = dict(zip(LABELS, WEB_DB, strict=True))
API = dict(zip(LABELS, API_DB, strict=True))
OPENED = "istio_tcp_connections_opened_total"


def test_a_worker_missing_a_scrape_keeps_its_last_counters_in_the_sum(node: Node) -> None:
    scrapes = Scrapes(*node)
    first = scrapes.text()
    assert (sample(first, OPENED, WEB), sample(first, OPENED, API)) == (3 + 5 + 1, 2)
    scrapes.missing = {1}  # busy for 0.75 s: its last values stand in, the sums stay
    second = scrapes.text()
    assert (sample(second, OPENED, WEB), sample(second, OPENED, API)) == (3 + 5 + 1, 2)
    # gauges are not held: a missing worker's are left out (`opened` is a gauge family's sample)
    assert sample(second, "nodemesh_proxy_stat", {"stat": "opened"}) == 3 + 1
    scrapes.infos[2] = worker(2, up=False)  # down: its counters are held too
    scrapes.missing = set()  # worker 1 answers again
    third = scrapes.text()
    assert (sample(third, OPENED, WEB), sample(third, OPENED, API)) == (3 + 5 + 1, 2)


def test_a_restarted_worker_s_counters_go_on_from_the_node_s_sum(node: Node) -> None:
    main, workers = node
    scrapes = Scrapes(main, workers)
    assert sample(scrapes.text(), OPENED, WEB) == 3 + 5 + 1
    # worker 1 restarted and has opened 7 web→db connections since, more than before: only its new
    # pid tells; and none api→db, whose 2 stay in the sum
    scrapes.restart(1, Process({WEB_DB: 7}, {}, 100))
    text = scrapes.text()
    assert sample(text, OPENED, WEB) == 3 + 5 + 7 + 1
    assert sample(text, OPENED, API) == 2
    # worker 2 restarted unseen (its pid read before, its metrics after the restart): its counter
    # went down, from 1 to 0
    scrapes.workers[2] = Process({WEB_DB: 0}, {}, 100)
    assert sample(scrapes.text(), OPENED, WEB) == 3 + 5 + 7 + 1
    scrapes.workers[2] = Process({WEB_DB: 4}, {}, 100)
    assert sample(scrapes.text(), OPENED, WEB) == 3 + 5 + 7 + 1 + 4


def test_held_histograms_keep_buckets_count_and_sum() -> None:
    def setup(count: float, **labels: str) -> list[Metric]:
        family = HistogramMetricFamily("nodemesh_proxy_setup_seconds", "setup", labels=list(labels))
        buckets = [("1", count), ("+Inf", count)]
        family.add_metric(list(labels.values()), buckets=buckets, sum_value=count / 10)
        return [family]

    held = HeldCounters()
    assert held.held([], [(worker(1), setup(4, path="hbone"))]) == []  # all there: nothing to add
    (family,) = held.held([], [])  # worker 1 missing
    assert family.type == "histogram"
    assert sorted((s.name, s.labels.get("le"), s.value) for s in family.samples) == [
        ("nodemesh_proxy_setup_seconds_bucket", "+Inf", 4),
        ("nodemesh_proxy_setup_seconds_bucket", "1", 4),
        ("nodemesh_proxy_setup_seconds_count", None, 4),
        ("nodemesh_proxy_setup_seconds_sum", None, 0.4),
    ]


def test_held_series_no_process_reports_are_dropped_after_a_while() -> None:
    """A removed pod's series (its label set) would otherwise be held for ever: memory is bounded by
    the series some process reported within the TTL."""
    now = [0.0]
    held = HeldCounters(ttl=600, clock=lambda: now[0])

    def opened(value: float, pod: str) -> list[Metric]:
        family = CounterMetricFamily("istio_tcp_connections_opened", "opened", labels=["source_workload"])
        family.add_metric([pod], value)
        return [family]

    def held_values(families: list[Metric]) -> dict[str, float]:
        return {s.labels["source_workload"]: s.value for f in families for s in f.samples}

    assert held.held([], [(worker(1), opened(5, "web") + opened(2, "gone"))]) == []
    now[0] = 300
    # worker 1 misses scrapes from now on; the main process reports `web` (it opened one too)
    assert held_values(held.held(opened(1, "web"), [])) == {"web": 5, "gone": 2}
    now[0] = 700
    assert held_values(held.held([], [])) == {"web": 5}  # `gone`: no process reported it for 700 s
    assert len(held) == 1
