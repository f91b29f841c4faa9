"""Metric labels, flow records and the connection tracker, without sockets."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from agent.admin.flows import FlowEvent, FlowRecord, FlowRing, Verdict
from agent.admin.sources import ConnPath
from agent.proxy.conns import ConnTracker, HandshakeBudget, Tracked
from agent.proxy.flows import FlowLog, format_flow
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import TCP_LABELS, ProxyMetrics, TcpPeers, tcp_labels
from api.resources import PolicyObject, Service, ServicePort, Workload
from controller.registry import build_state, parse_config_object

TD = "cluster.local"
A = Workload("front/a", "a", "front", "sa-a", "n1", ("10.1.0.1",), (("app", "web"), ("version", "v2")))
B = Workload(
    "back/b",
    "b",
    "back",
    "sa-b",
    "n2",
    ("10.2.0.1",),
    (("service.istio.io/canonical-name", "api"), ("app.kubernetes.io/version", "1.4")),
)
SVC = Service("api", "back", "10.96.0.1", (ServicePort(80, 8080),))


def test_labels_of_an_outbound_hbone_connection_to_a_service() -> None:
    labels = tcp_labels(
        TcpPeers(
            "source", A, f"spiffe://{TD}/ns/front/sa/sa-a", B, f"spiffe://{TD}/ns/back/sa/sa-b", SVC, True
        )
    )
    assert set(labels) == set(TCP_LABELS)
    assert labels == labels | {
        "reporter": "source",
        "source_workload": "a",
        "source_workload_namespace": "front",
        "source_principal": f"spiffe://{TD}/ns/front/sa/sa-a",
        "source_app": "web",
        "source_version": "v2",
        "source_canonical_service": "web",
        "source_canonical_revision": "v2",
        "source_cluster": "Kubernetes",
        "destination_workload": "b",
        "destination_principal": f"spiffe://{TD}/ns/back/sa/sa-b",
        # ztunnel's app/version are the canonical service/revision, not the raw labels (B has none)
        "destination_app": "api",
        "destination_version": "1.4",
        "destination_canonical_service": "api",
        "destination_canonical_revision": "1.4",
        "destination_service": "api.back.svc.cluster.local",
        "destination_service_name": "api",
        "destination_service_namespace": "back",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }


def test_labels_of_plaintext_passthrough_to_an_unknown_destination() -> None:
    labels = tcp_labels(TcpPeers("destination", None, None, None, None, None, False))
    assert labels["connection_security_policy"] == "none"
    assert all(labels[k] == "unknown" for k in TCP_LABELS if k.startswith(("source_", "destination_")))


def test_canonical_service_falls_back_to_the_workload_name() -> None:
    bare = Workload("x/y", "y", "x", "sa", "n", ("10.0.0.9",))
    labels = tcp_labels(TcpPeers("destination", None, None, bare, None, None, True))
    assert (labels["destination_canonical_service"], labels["destination_canonical_revision"]) == (
        "y",
        "latest",
    )
    assert (labels["destination_app"], labels["destination_version"]) == ("y", "latest")
    assert labels["destination_service_namespace"] == "x"


def test_source_reported_plaintext_has_connection_security_policy_unknown() -> None:
    # Istio's reference: `unknown` when the source reports (ztunnel's passthrough); Envoy's
    # destination side reports `none` for plaintext
    for dst in (None, B):  # passthrough, or a mesh workload reached in plaintext (dataplane-mode none)
        labels = tcp_labels(TcpPeers("source", A, None, dst, None, None, False))
        assert labels["connection_security_policy"] == "unknown"
    labels = tcp_labels(TcpPeers("destination", None, None, B, None, None, False))
    assert labels["connection_security_policy"] == "none"


def deployment_pod_labels(labels: dict[str, str]) -> dict[str, str]:
    """The destination labels of a connection to a Deployment's pod, its Workload from the registry."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-7d9f8c6b5-x2x4q",
            "generateName": "web-7d9f8c6b5-",
            "namespace": "shop",
            "labels": {"pod-template-hash": "7d9f8c6b5", **labels},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d9f8c6b5",
                    "uid": "1",
                    "controller": True,
                }
            ],
        },
        "spec": {"nodeName": "node1", "serviceAccountName": "web"},
        "status": {"podIP": "10.1.0.2"},
    }
    obj, errors = parse_config_object(body, file="t.yaml")
    assert obj is not None, errors
    (workload,) = build_state([obj], TD).workloads.values()
    return tcp_labels(TcpPeers("destination", None, None, workload, None, None, True))


def test_workload_labels_name_a_deployment_pods_deployment_not_the_pod() -> None:
    # Istio's dashboards and Kiali group by source_workload/destination_workload: not one per replica
    labels = deployment_pod_labels({})
    assert labels["destination_workload"] == "web"
    assert labels["destination_canonical_service"] == "web"  # the fallback is the workload name too


def test_workload_name_label_names_the_workload_in_the_metrics() -> None:
    labels = deployment_pod_labels({"service.istio.io/workload-name": "storefront", "app": "shop"})
    assert labels["destination_workload"] == "storefront"
    assert labels["destination_canonical_service"] == "shop"


def test_registry_has_istio_names_and_no_created_series() -> None:
    m = ProxyMetrics()
    s = m.series(TcpPeers("source", A, None, B, None, SVC, False))
    s.opened.inc()
    s.sent.inc(10)
    text = m.text()
    assert "istio_tcp_connections_opened_total{" in text
    assert "istio_tcp_sent_bytes_total{" in text
    assert "_created" not in text


def record(**kw: Any) -> FlowRecord:
    base: dict[str, Any] = {
        "time": 1.0,
        "event": FlowEvent.DENY,
        "verdict": Verdict.DENIED,
        "src_ip": "10.1.0.1",
        "src_port": 40000,
        "dst_ip": "10.2.0.1",
        "dst_port": 8080,
    }
    return FlowRecord(**(base | kw))


def test_flow_line_is_logfmt_with_the_deciding_policy() -> None:
    line = format_flow(
        record(
            src_pod="a",
            src_namespace="front",
            src_identity="spiffe://td/ns/front/sa/a",
            reason="DENIED_BY_POLICY",
            policy="back/deny",
            rule=0,
            connection_id="c1",
        )
    )
    assert line == (
        "flow event=deny verdict=denied conn=c1 src=10.1.0.1:40000 dst=10.2.0.1:8080 src_pod=front/a "
        "src_identity=spiffe://td/ns/front/sa/a reason=DENIED_BY_POLICY policy=back/deny rule=0"
    )
    close = format_flow(
        record(
            event=FlowEvent.CLOSE,
            verdict=Verdict.ALLOWED,
            bytes_sent=3,
            duration=0.5,
            reason='has "quotes" and spaces',
        )
    )
    assert 'reason="has \\"quotes\\" and spaces"' in close
    assert close.endswith("bytes_sent=3 bytes_received=0 duration=0.500")


def test_flow_log_keeps_a_bounded_ring_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    log = FlowLog(FlowRing(capacity=2))
    with caplog.at_level(logging.INFO, logger="nodemesh.flow"):
        for port in (1, 2, 3):
            log.add(record(src_port=port))
    assert [r.src_port for r in log.ring] == [2, 3]
    assert [r.getMessage().split()[0] for r in caplog.records] == ["flow"] * 3


def policy(name: str, spec: dict[str, Any]) -> PolicyObject:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "back"},
        "spec": spec,
    }
    return PolicyObject.of("AuthorizationPolicy", "back", name, body)


def test_tracker_counts_bytes_and_closes_connections_a_push_denies() -> None:
    metrics = ProxyMetrics()
    tracker = ConnTracker(FlowLog(FlowRing()), max_connections=2)
    idx = MeshIndex(node="n2", trust_domain=TD, workloads=(A, B))
    killed: list[str] = []
    conns = []
    for src_ip, identity in (("10.1.0.1", f"spiffe://{TD}/ns/front/sa/sa-a"), ("10.9.0.1", None)):
        assert tracker.reserve(src_ip)
        t = Tracked(
            f"c-{src_ip}",
            ConnPath.HBONE,
            ("b",),
            (src_ip, 1),
            ("10.2.0.1", 8080),
            dst_workload=B,
            src_identity=identity or "",
        )
        from api.spiffe import SpiffeId

        sid = SpiffeId.parse(identity) if identity else None
        t.authz, t.deciding = idx.authorize(
            dst_workload=B, src_ip=src_ip, src_identity=sid, dst_ip="10.2.0.1", dst_port=8080
        )
        t.series = (
            metrics.series(TcpPeers("destination", None, identity, B, None, None, identity is not None)),
        )
        t.closer = lambda t=t: killed.append(t.id)
        tracker.opened(t)
        conns.append(t)
    assert not tracker.reserve("10.1.0.2") and tracker.stats["overload"] == 1
    conns[0].count_up(5)
    conns[0].count_down(7)
    deny_front = policy(
        "deny-front", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}
    )
    closed = tracker.recheck(idx.rebuilt((A, B), (), (deny_front,)))
    assert [t.id for t in closed] == killed == ["c-10.1.0.1"]
    tracker.closed(conns[0])
    events = [(r.event, r.reason, r.policy) for r in tracker.flows.ring]
    assert events[-2:] == [
        (FlowEvent.DENY, "DENIED_BY_POLICY", "back/deny-front"),
        (FlowEvent.CLOSE, "policy_changed:DENIED_BY_POLICY", "back/deny-front"),
    ]
    last = list(tracker.flows.ring)[-1]
    assert (last.bytes_sent, last.bytes_received) == (5, 7)
    text = metrics.text()
    assert "istio_tcp_received_bytes_total{" in text and "} 5.0" in text and "} 7.0" in text
    assert [i.id for i in tracker.infos()] == ["c-10.9.0.1"]


def test_open_connection_bytes_are_in_every_scrape_and_counted_once() -> None:
    """Bytes are counted per chunk as ints and reach the counters when collected (scrape thread or
    loop) and at close: never lost, never twice."""
    metrics = ProxyMetrics()
    tracker = ConnTracker(FlowLog(FlowRing()))
    metrics.before_collect(tracker.report_bytes)
    t = Tracked("c-1", ConnPath.HBONE, ("b",), ("10.1.0.1", 1), ("10.2.0.1", 8080), dst_workload=B)
    peers = TcpPeers("destination", None, None, B, None, None, False)
    t.series = (metrics.series(peers),)
    tracker.opened(t)

    def received() -> float:
        return metrics.registry.get_sample_value("istio_tcp_received_bytes_total", tcp_labels(peers)) or 0.0

    t.count_up(5)
    assert received() == 5.0  # collected while open
    assert received() == 5.0  # nothing new: not counted again
    scrapes = [threading.Thread(target=metrics.text) for _ in range(4)]
    for th in scrapes:
        th.start()
    for _ in range(1000):  # the loop thread counts while other threads scrape
        t.count_up(1)
    for th in scrapes:
        th.join()
    t.count_down(3)
    tracker.closed(t)
    assert received() == 1005.0
    assert metrics.registry.get_sample_value("istio_tcp_sent_bytes_total", tcp_labels(peers)) == 3.0


def test_handshake_budget_caps_pending_handshakes_node_wide_and_per_source_ip() -> None:
    budget = HandshakeBudget(total=5, per_ip=3)
    assert [budget.take("10.0.0.1") for _ in range(4)] == [True, True, True, False]  # its IP's cap
    assert [budget.take("10.0.0.2") for _ in range(3)] == [True, True, False]  # the node's cap: 5
    budget.give_back("10.0.0.1")
    assert budget.take("10.0.0.2")  # the freed slot goes to whoever asks next
    assert not budget.take("10.0.0.3")
    assert budget.pending == 5
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.2"):
        budget.give_back(ip)
    assert budget.pending == 0 and budget._by_ip == {}  # nothing kept for addresses gone
