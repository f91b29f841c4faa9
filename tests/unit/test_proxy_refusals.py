"""Refused connections in Istio's TCP metrics, as ztunnel counts them, and the plaintext source's
labels: the inbound and outbound sides driven without sockets (a fake dial, pool and client ends).

ztunnel (`src/proxy/inbound.rs` `serve_connect`, `inbound_passthrough.rs`, `outbound.rs` `proxy_to`,
`metrics.rs` `ConnectionResult`) counts a connection opened once it knows both ends, before it
authorizes or dials; a refusal from then on is recorded closed, with `response_flags` `DENY`
(authorization), `CONNECT` (HBONE inbound: the app could not be connected to) or `-`. A refusal
before that (`log_early_deny`) is not counted at all.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from agent.admin.flows import FlowEvent
from agent.admin.sources import ConnPath
from agent.datapath.interface import EnrolledPod, PodRef
from agent.node import pod_key
from agent.proxy.conns import ConnTracker, Tracked, new_connection_id
from agent.proxy.core import ProxyCore, ProxyError
from agent.proxy.flows import FlowLog, FlowRecord
from agent.proxy.hbone import HboneError, Status
from agent.proxy.inbound import Inbound
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import ProxyMetrics, ResponseFlags, TcpPeers, tcp_labels
from agent.proxy.outbound import Outbound
from agent.proxy.pipe import SocketEnd
from api.resources import PolicyObject, TunnelProtocol, Workload
from api.spiffe import SpiffeId

TD = "cluster.local"
NODE = "n2"
APP_PORT = 8080
# a mesh pod on another node; two pods this proxy serves; a pod outside the mesh
A = Workload("front/a", "a", "front", "sa-a", "n1", ("10.1.0.1",), (("app", "a"),))
B = Workload("back/b", "b", "back", "sa-b", NODE, ("10.2.0.1",), (("app", "b"),))
C = Workload("back/c", "c", "back", "sa-c", NODE, ("10.2.0.3",), (("app", "c"),))
LEGACY = Workload(
    "legacy/old", "old", "legacy", "sa-old", "n3", ("10.3.0.7",), (("app", "old"),), TunnelProtocol.NONE
)
A_ID = SpiffeId.for_workload(TD, "front", "sa-a")
C_ID = SpiffeId.for_workload(TD, "back", "sa-c")
OPENED, CLOSED = "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"


def policy(kind: str, name: str, spec: dict[str, Any]) -> PolicyObject:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "back"},
        "spec": spec,
    }
    return PolicyObject.of(kind, "back", name, body)


DENY_A = policy(
    "AuthorizationPolicy",
    "deny-a",
    {"action": "DENY", "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/front/sa/sa-a"]}}]}]},
)
DENY_C = policy(
    "AuthorizationPolicy",
    "deny-c",
    {"action": "DENY", "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/back/sa/sa-c"]}}]}]},
)
STRICT = policy("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}})
# allows the legacy namespace only: a plaintext connection must not match it, whatever its IP says
ALLOW_LEGACY_NS = policy(
    "AuthorizationPolicy",
    "allow-legacy",
    {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]},
)


class Client:
    """An accepted socket as the proxy sees it: its addresses, and whether the proxy closed it."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self.peername = peer
        self.sockname = local
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Upstream:
    def close(self) -> None:
        pass


class Datapath:
    def __init__(self) -> None:
        self.orig: dict[int, tuple[str, int]] = {}  # source port -> what the app dialled

    def original_destination(self, netns_cookie: int, peer: tuple[str, int]) -> tuple[str, int] | None:
        return self.orig.get(peer[1])


class Pool:
    """An HBONE pool whose CONNECT always fails with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def open_stream(self, *args: Any) -> Any:
        raise self.error


class Node:
    """The proxy of node n2 (serving B and C) with its dials, pipes and HBONE pool faked."""

    def __init__(self, *policies: PolicyObject, dial_error: ProxyError | None = None) -> None:
        self.datapath = Datapath()
        self.core = ProxyCore(
            datapath=cast(Any, self.datapath),
            certs=cast(Any, None),
            bundle=lambda: b"",
            index=MeshIndex(node=NODE, trust_domain=TD, workloads=(A, B, C, LEGACY), policies=policies),
            tracker=ConnTracker(FlowLog()),
            metrics=ProxyMetrics(),
            hbone_port=15008,
        )
        self.eps = {
            w.name: EnrolledPod(PodRef(pod_key(w.uid), "/nonexistent", w.ips[0]), i, i)
            for i, w in enumerate((B, C), start=1)
        }
        for ep in self.eps.values():
            self.core.add_pod(ep)
        self.dial_error = dial_error
        self.dialled: list[tuple[str, int]] = []
        self.piped: list[Tracked] = []
        self.answers: list[int] = []
        self.core.dial = self._dial  # type: ignore[method-assign]
        self.core.pipe = self._pipe  # type: ignore[method-assign]
        self.inbound = Inbound(self.core)
        self.outbound = Outbound(self.core, self.inbound, keepalive=None)
        self.pool_error: Exception = HboneError(Status.UNAUTHORIZED, "denied")
        self.outbound.pool = lambda ep: cast(Any, Pool(self.pool_error))  # type: ignore[method-assign]

    async def _dial(self, netns_path: str, dst: tuple[str, int], source_ip: str | None = None) -> Any:
        self.dialled.append(dst)
        if self.dial_error is not None:
            raise self.dial_error
        return Upstream()

    async def _pipe(self, t: Tracked, client: Any, upstream: Any) -> None:
        self.piped.append(t)
        self.core.tracker.opened(t)
        self.core.tracker.closed(t)

    # -- connections --
    def hbone(self, port: int = APP_PORT) -> None:
        """A CONNECT from A (its certificate proves A_ID) to `B:port`, as `_hbone_stream` delivers it."""
        t = Tracked(
            new_connection_id(),
            ConnPath.HBONE,
            (),
            (A.ips[0], 40000),
            (B.ips[0], port),
            src_workload=A,
            src_identity=str(A_ID),
        )
        asyncio.run(
            self.inbound.deliver(
                t,
                ep=self.eps["b"],
                dst_workload=B,
                port=port,
                src_identity=A_ID,
                client=cast(Any, None),
                answer=self.answers.append,
                mtls=True,
            )
        )

    def plaintext(self, src_ip: str, port: int = APP_PORT) -> Client:
        """A connection from `src_ip` captured to B's 15006."""
        client = Client((src_ip, 40000), (B.ips[0], port))
        asyncio.run(self.inbound.plaintext(self.eps["b"], cast(SocketEnd, client)))
        return client

    def outgoing(self, dst: tuple[str, int] | None, src_port: int = 50000) -> Client:
        """C's app connecting to `dst` (None: the datapath has no original destination)."""
        if dst is not None:
            self.datapath.orig[src_port] = dst
        client = Client(("127.0.0.1", src_port), ("127.0.0.1", 15001))
        asyncio.run(self.outbound.handle(self.eps["c"], cast(SocketEnd, client)))
        return client

    # -- what it reported --
    def count(self, name: str, **labels: str) -> float:
        total = 0.0
        for metric in self.core.metrics.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def flags(self, name: str, **labels: str) -> dict[str, float]:
        """{response_flags: value} of the series of `name` with these labels (zeros left out)."""
        out: dict[str, float] = {}
        for metric in self.core.metrics.registry.collect():
            for s in metric.samples:
                if s.name == name and s.value and all(s.labels.get(k) == v for k, v in labels.items()):
                    flag = s.labels["response_flags"]
                    out[flag] = out.get(flag, 0.0) + s.value
        return out

    def flows(self) -> list[FlowRecord]:
        return list(self.core.tracker.flows.ring)


# --- labels and the series cache ---------------------------------------------------------------------


def test_response_flags_label_and_series_cached_per_flag() -> None:
    peers = TcpPeers("destination", A, str(A_ID), B, None, None, True)
    assert tcp_labels(peers)["response_flags"] == "-"
    assert tcp_labels(peers, ResponseFlags.DENY)["response_flags"] == "DENY"
    assert tcp_labels(peers, ResponseFlags.CONNECT)["response_flags"] == "CONNECT"
    m = ProxyMetrics()
    plain, deny = m.series(peers), m.series(peers, ResponseFlags.DENY)
    assert plain is m.series(peers) and deny is m.series(peers, ResponseFlags.DENY)  # resolved once
    assert deny is not plain
    deny.closed.inc()
    assert m.registry.get_sample_value(CLOSED, tcp_labels(peers, ResponseFlags.DENY)) == 1.0
    assert m.registry.get_sample_value(CLOSED, tcp_labels(peers)) == 0.0


def test_a_refusal_counted_opens_and_closes_once_with_one_deny_record() -> None:
    m, tracker = ProxyMetrics(), ConnTracker(FlowLog())
    peers = TcpPeers("destination", None, None, B, None, None, False)
    t = Tracked("c1", ConnPath.PLAINTEXT_INBOUND, ("b",), ("10.9.0.1", 1), ("10.2.0.1", APP_PORT))
    t.series = (m.series(peers),)
    tracker.denied(t, "DENIED_BY_POLICY", (m.series(peers, ResponseFlags.DENY),))
    assert m.registry.get_sample_value(OPENED, tcp_labels(peers)) == 1.0
    assert m.registry.get_sample_value(CLOSED, tcp_labels(peers, ResponseFlags.DENY)) == 1.0
    assert m.registry.get_sample_value(CLOSED, tcp_labels(peers)) == 0.0
    assert [r.event for r in tracker.flows.ring] == [FlowEvent.DENY]
    assert (tracker.stats["denied"], tracker.stats["opened"], tracker.stats["closed"]) == (1, 0, 0)
    assert tracker.open == {}
    # an early refusal (no `closed`): the flow record only
    tracker.denied(t, "PROXY_PORT")
    assert m.registry.get_sample_value(OPENED, tcp_labels(peers)) == 1.0


# --- inbound over HBONE (and same node) ----------------------------------------------------------------


def test_hbone_denied_by_authorization_policy_is_closed_with_deny() -> None:
    node = Node(DENY_A)
    node.hbone()
    assert node.answers == [Status.UNAUTHORIZED] and node.dialled == []
    src = {"reporter": "destination", "source_principal": str(A_ID), "destination_workload": "b"}
    assert node.flags(OPENED, **src) == {"-": 1.0}
    assert node.flags(CLOSED, **src) == {"DENY": 1.0}
    assert node.count(CLOSED, connection_security_policy="mutual_tls", source_workload="a") == 1
    # a CONNECT to one of the proxy's own ports is refused before ztunnel has its ConnectionResult
    # (`Error::SelfCall`, `log_early_deny`): the flow record only
    node.hbone(port=15006)
    assert node.answers[-1] == Status.SERVICE_UNAVAILABLE
    assert node.flags(OPENED) == {"-": 1.0} and node.flags(CLOSED) == {"DENY": 1.0}
    assert [(f.event, f.reason, f.policy) for f in node.flows()] == [
        (FlowEvent.DENY, "DENIED_BY_POLICY", "back/deny-a"),
        (FlowEvent.DENY, "PROXY_PORT", ""),
    ]


def test_hbone_app_port_closed_is_closed_with_connect() -> None:
    node = Node()
    node.hbone()  # allowed, opened and closed: "-" only, with its open and close records
    assert node.answers == [Status.OK] and len(node.piped) == 1
    assert node.flags(OPENED) == {"-": 1.0} and node.flags(CLOSED) == {"-": 1.0}
    node.dial_error = ProxyError("UPSTREAM_CONNECT_FAILED", "refused")
    node.hbone()
    assert node.answers[-1] == Status.SERVICE_UNAVAILABLE and node.dialled[-1] == (B.ips[0], APP_PORT)
    assert node.flags(OPENED, reporter="destination") == {"-": 2.0}
    assert node.flags(CLOSED, reporter="destination") == {"-": 1.0, "CONNECT": 1.0}
    assert [(f.event, f.reason) for f in node.flows()][2:] == [(FlowEvent.DENY, "UPSTREAM_CONNECT_FAILED")]


def test_same_node_denied_counts_both_sides_with_the_flags_each_side_reports() -> None:
    """The source side of an in-process hand-off is ztunnel's outbound (a refused CONNECT is
    recorded without a flag), the destination side its HBONE inbound (DENY)."""
    node = Node(DENY_C)
    assert node.outgoing((B.ips[0], APP_PORT)).closed
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.flags(OPENED, reporter="destination") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="destination", source_principal=str(C_ID)) == {"DENY": 1.0}
    assert [(f.event, f.reason) for f in node.flows()] == [(FlowEvent.DENY, "DENIED_BY_POLICY")]


def test_same_node_app_port_closed_is_connect_at_the_destination_only() -> None:
    node = Node(dial_error=ProxyError("UPSTREAM_CONNECT_FAILED", "refused"))
    assert node.outgoing((B.ips[0], APP_PORT)).closed
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="destination") == {"CONNECT": 1.0}


def test_same_node_to_a_proxy_port_counts_the_source_side_only() -> None:
    node = Node()
    assert node.outgoing((B.ips[0], 15008)).closed
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert node.flags(OPENED, reporter="destination") == {}


# --- inbound plaintext (15006) --------------------------------------------------------------------------


def test_plaintext_under_strict_is_closed_with_deny() -> None:
    node = Node(STRICT)
    client = node.plaintext("10.9.9.9")
    assert client.closed and node.dialled == []
    labels = {"reporter": "destination", "connection_security_policy": "none", "destination_workload": "b"}
    assert node.flags(OPENED, **labels) == {"-": 1.0}
    assert node.flags(CLOSED, **labels) == {"DENY": 1.0}
    assert [(f.event, f.reason) for f in node.flows()] == [(FlowEvent.DENY, "STRICT_MTLS_PLAINTEXT")]


def test_plaintext_app_port_closed_is_closed_without_a_flag() -> None:
    """ztunnel's inbound passthrough records a failed connect to the app with no flag."""
    node = Node(dial_error=ProxyError("UPSTREAM_CONNECT_FAILED", "refused"))
    assert node.plaintext("10.9.9.9").closed
    assert node.flags(OPENED, reporter="destination") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="destination") == {"-": 1.0}


def test_plaintext_to_a_proxy_port_is_not_counted_even_under_strict() -> None:
    """ztunnel checks its own ports (`illegal_ports`) before anything else, STRICT's rule included."""
    node = Node(STRICT)
    assert node.plaintext("10.9.9.9", port=15008).closed
    assert node.flags(OPENED) == {} and node.flags(CLOSED) == {}
    assert [f.reason for f in node.flows()] == ["PROXY_PORT"]


def test_plaintext_source_is_labelled_from_its_ip() -> None:
    node = Node()
    node.plaintext(LEGACY.ips[0])
    labels = {"reporter": "destination", "source_workload": "old", "source_workload_namespace": "legacy"}
    assert node.count(OPENED, **labels, source_app="old", source_principal="unknown") == 1
    assert node.count(OPENED, connection_security_policy="none") == 1
    opened = next(f for f in node.flows() if f.event is FlowEvent.OPEN)
    assert (opened.src_pod, opened.src_namespace, opened.src_identity) == ("old", "legacy", "")
    # an IP nothing claims stays unknown
    node.plaintext("10.9.9.9")
    assert node.count(OPENED, source_workload="unknown") == 1


def test_plaintext_source_ip_labels_telemetry_but_is_no_identity_to_policy() -> None:
    """A plaintext source address can be spoofed: the workload it names labels the series and the
    flow record, never the authorization, where the peer has no namespace to match."""
    node = Node(ALLOW_LEGACY_NS)
    client = node.plaintext(LEGACY.ips[0])
    assert client.closed and node.dialled == []
    (deny,) = node.flows()
    assert (deny.reason, deny.src_pod, deny.src_namespace, deny.src_identity) == (
        "NOT_ALLOWED",
        "old",
        "legacy",
        "",
    )
    assert node.flags(CLOSED, source_workload="old", source_principal="unknown") == {"DENY": 1.0}


def test_plaintext_source_pod_does_not_tie_the_connection_to_that_pod() -> None:
    """Stopping a pod closes its connections (`kill_pods`): not one that only claims its IP."""
    node = Node()
    node.plaintext(C.ips[0])
    (t,) = node.piped
    assert t.src_workload == C and t.pod_uids == (pod_key(B.uid),)


# --- outbound ----------------------------------------------------------------------------------------


def test_outbound_connect_refused_by_the_destination_is_closed_without_a_flag() -> None:
    node = Node()
    assert node.outgoing((A.ips[0], APP_PORT)).closed  # A is on n1: HBONE, answered 401
    labels = {"reporter": "source", "destination_workload": "a", "connection_security_policy": "mutual_tls"}
    assert node.flags(OPENED, **labels) == {"-": 1.0}
    assert node.flags(CLOSED, **labels, source_principal=str(C_ID)) == {"-": 1.0}
    assert [(f.event, f.reason) for f in node.flows()] == [(FlowEvent.DENY, "DENIED_BY_DESTINATION")]


@pytest.mark.parametrize(
    "error",
    [HboneError(Status.SERVICE_UNAVAILABLE, "x"), OSError("unreachable"), ProxyError("NO_CERTIFICATE")],
)
def test_outbound_hbone_failures_are_closed_without_a_flag(error: Exception) -> None:
    node = Node()
    node.pool_error = error
    assert node.outgoing((A.ips[0], APP_PORT)).closed
    assert node.flags(OPENED, reporter="source") == {"-": 1.0}
    assert node.flags(CLOSED, reporter="source") == {"-": 1.0}
    assert len([f for f in node.flows() if f.event is FlowEvent.DENY]) == 1


def test_outbound_passthrough_dial_failure_is_closed_without_a_flag() -> None:
    node = Node(dial_error=ProxyError("UPSTREAM_CONNECT_FAILED", "refused"))
    assert node.outgoing((LEGACY.ips[0], 80)).closed
    labels = {"reporter": "source", "destination_workload": "old", "connection_security_policy": "unknown"}
    assert node.flags(OPENED, **labels) == {"-": 1.0}
    assert node.flags(CLOSED, **labels) == {"-": 1.0}
    # no original destination: ztunnel's `log_early_deny` (no request could be built), not counted
    assert node.outgoing(None, src_port=50001).closed
    assert node.flags(OPENED) == {"-": 1.0} and node.flags(CLOSED) == {"-": 1.0}
    assert [f.reason for f in node.flows()] == ["UPSTREAM_CONNECT_FAILED", "NO_ORIGINAL_DESTINATION"]
