"""MeshIndex without sockets: where an outbound connection goes, and the authorization plumbing;
NodeProxy without listeners: which workload (and identity) a served pod is across config pushes."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, cast

import pytest

from agent.admin.sources import ConnPath
from agent.datapath.interface import Datapath, EnrolledPod, PodRef
from agent.identity import CertificateManager
from agent.node import pod_key
from agent.proxy import tunnel
from agent.proxy.conns import Tracked
from agent.proxy.index import MeshIndex, RouteKind
from agent.proxy.server import NodeProxy, _Served
from api.authz import MtlsMode, Reason
from api.resources import Endpoint, PolicyObject, Service, ServicePort, TunnelProtocol, Workload
from api.spiffe import SpiffeId

TD = "cluster.local"


def wl(
    name: str, ns: str, ip: str, node: str = "n1", proto: TunnelProtocol = TunnelProtocol.HBONE
) -> Workload:
    return Workload(
        uid=f"{ns}/{name}",
        name=name,
        namespace=ns,
        service_account=name,
        node=node,
        ips=(ip,),
        labels=(("app", name),),
        protocol=proto,
    )


A = wl("a", "front", "10.1.0.1")
B = wl("b", "back", "10.2.0.1", node="n2")
C = wl("c", "front", "10.1.0.2")
LEGACY = wl("legacy", "old", "10.3.0.1", proto=TunnelProtocol.NONE)
SVC = Service(
    "echo",
    "back",
    "10.96.0.10",
    (ServicePort(80, 8080), ServicePort(443, 0), ServicePort(53, 53, protocol="UDP")),
    (Endpoint("back/b", "10.2.0.1"), Endpoint("front/c", "10.1.0.2"), Endpoint("x/v6", "fd00::1")),
)
EMPTY = Service("empty", "back", "10.96.0.11", (ServicePort(80, 8080),))


def policy(name: str, ns: str, spec: dict[str, Any], kind: str = "AuthorizationPolicy") -> PolicyObject:
    body = {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": ns}}
    return PolicyObject.of(kind, ns, name, {**body, "spec": spec})


def index(policies: tuple[PolicyObject, ...] = ()) -> MeshIndex:
    return MeshIndex(
        node="n1", trust_domain=TD, workloads=(A, B, C, LEGACY), services=(SVC, EMPTY), policies=policies
    )


LOCAL = frozenset({"10.1.0.1", "10.1.0.2"})


@pytest.mark.parametrize(
    ("dst", "kind", "target", "workload"),
    [
        (("10.2.0.1", 9000), RouteKind.HBONE, ("10.2.0.1", 9000), B),
        (("10.1.0.2", 9000), RouteKind.SAME_NODE, ("10.1.0.2", 9000), C),
        (("10.3.0.1", 80), RouteKind.PASSTHROUGH, ("10.3.0.1", 80), LEGACY),  # protocol NONE
        (("93.184.216.34", 443), RouteKind.PASSTHROUGH, ("93.184.216.34", 443), None),  # unknown IP
        (("10.96.0.11", 80), RouteKind.NO_ENDPOINT, ("10.96.0.11", 80), None),
        (("10.96.0.10", 8080), RouteKind.PASSTHROUGH, ("10.96.0.10", 8080), None),  # VIP, not a service port
    ],
)
def test_route(
    dst: tuple[str, int], kind: RouteKind, target: tuple[str, int], workload: Workload | None
) -> None:
    route = index().route(dst, local_ips=LOCAL)
    assert (route.kind, route.dst, route.workload) == (kind, target, workload)
    assert route.original == dst


def test_vip_round_robins_over_ipv4_endpoints_with_target_port() -> None:
    idx = index()
    routes = [idx.route(("10.96.0.10", 80), local_ips=LOCAL) for _ in range(4)]
    assert [r.dst for r in routes] == [("10.2.0.1", 8080), ("10.1.0.2", 8080)] * 2
    assert [r.kind for r in routes] == [RouteKind.HBONE, RouteKind.SAME_NODE] * 2
    assert all(r.service is SVC and r.service_host == "echo.back.svc.cluster.local" for r in routes)
    # targetPort 0 means "same as port"; UDP ports are not TCP VIPs
    assert idx.route(("10.96.0.10", 443)).dst[1] == 443
    assert idx.route(("10.96.0.10", 53)).kind is RouteKind.PASSTHROUGH


def test_round_robin_position_survives_a_push() -> None:
    idx = index()
    first = idx.route(("10.96.0.10", 80)).dst
    idx2 = idx.rebuilt(idx.workloads, idx.services, idx.policies)
    assert idx2.route(("10.96.0.10", 80)).dst != first


def test_identity_and_lookup() -> None:
    idx = index()
    assert idx.workload_by_ip("10.2.0.1") is B
    assert idx.workload_by_ip("10.9.9.9") is None
    assert idx.identity(B) == SpiffeId.for_workload(TD, "back", "b")


def test_inbound_service_is_the_service_whose_target_port_the_connection_reached() -> None:
    idx = index()
    assert idx.inbound_service(B, 8080) is SVC  # port 80 -> targetPort 8080
    assert idx.inbound_service(C, 8080) is SVC  # every endpoint, on any node
    assert idx.inbound_service(B, 443) is SVC  # targetPort 0: the port itself
    assert idx.inbound_service(B, 80) is None  # the Service port, not a target port
    assert idx.inbound_service(B, 53) is None  # UDP
    assert idx.inbound_service(B, 9000) is None


def test_inbound_service_without_a_service_is_none() -> None:
    idx = index()
    assert idx.inbound_service(A, 8080) is None  # not an endpoint of any Service
    assert idx.inbound_service(LEGACY, 8080) is None
    assert MeshIndex(node="n1", trust_domain=TD, workloads=(A, B)).inbound_service(B, 8080) is None


def test_inbound_service_of_several_is_the_first_by_uid_whatever_their_order() -> None:
    b_ep = (Endpoint("back/b", "10.2.0.1"),)
    zeta = Service("zeta", "back", "10.96.0.20", (ServicePort(80, 8080),), b_ep)
    alpha = Service("alpha", "back", "10.96.0.21", (ServicePort(8080, 8080),), b_ep)
    admin = Service("admin", "back", "10.96.0.22", (ServicePort(9090, 9090),), b_ep)
    for services in ((zeta, alpha, admin), (admin, alpha, zeta)):
        idx = MeshIndex(node="n1", trust_domain=TD, workloads=(A, B), services=services)
        assert idx.inbound_service(B, 8080) is alpha  # "back/alpha" < "back/zeta"
        assert idx.inbound_service(B, 9090) is admin  # only admin targets 9090
    # a push that removes alpha: the index is rebuilt, the lookup follows
    idx = idx.rebuilt((A, B), (zeta, admin), ())
    assert idx.inbound_service(B, 8080) is zeta


def test_inbound_service_of_an_endpoint_named_by_ip_only() -> None:
    """Explicit endpoints the controller could not match to a workload carry only the IP."""
    by_ip = Service("ext", "back", "10.96.0.30", (ServicePort(80, 8080),), (Endpoint("", "10.2.0.1"),))
    idx = MeshIndex(node="n1", trust_domain=TD, workloads=(A, B), services=(by_ip,))
    assert idx.inbound_service(B, 8080) is by_ip
    assert idx.inbound_service(A, 8080) is None


def test_authorize_deny_before_allow_and_recheck_after_a_push() -> None:
    deny = policy(
        "deny-front", "back", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}
    )
    allow = policy(
        "allow-a", "back", {"rules": [{"from": [{"source": {"principals": [f"{TD}/ns/front/sa/a"]}}]}]}
    )
    src = SpiffeId.for_workload(TD, "front", "a")
    conn, d = index((allow,)).authorize(
        dst_workload=B, src_ip="10.1.0.1", src_identity=src, dst_ip="10.2.0.1", dst_port=8080
    )
    assert (d.allowed, d.reason, str(d.policy)) == (True, Reason.ALLOWED_BY_POLICY, "back/allow-a")
    assert conn.principal == f"{TD}/ns/front/sa/a" and conn.src_namespace == "front"
    d2 = index((allow, deny)).recheck(conn)
    assert (d2.allowed, d2.reason, str(d2.policy)) == (False, Reason.DENIED_BY_POLICY, "back/deny-front")


def test_plaintext_has_no_principal() -> None:
    allow = policy("allow-a", "back", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})
    _, d = index((allow,)).authorize(
        dst_workload=B, src_ip="10.1.0.1", src_identity=None, dst_ip="10.2.0.1", dst_port=8080
    )
    assert (d.allowed, d.reason) == (False, Reason.NOT_ALLOWED)


def test_recheck_sees_new_labels_of_the_destination() -> None:
    sel = policy(
        "deny-v2", "back", {"selector": {"matchLabels": {"version": "v2"}}, "action": "DENY", "rules": [{}]}
    )
    idx = index((sel,))
    conn, d = idx.authorize(
        dst_workload=B, src_ip="10.1.0.1", src_identity=None, dst_ip="10.2.0.1", dst_port=1
    )
    assert d.allowed
    relabelled = Workload(**{**{f: getattr(B, f) for f in B.__slots__}, "labels": (("version", "v2"),)})
    idx2 = idx.rebuilt((A, relabelled, C), idx.services, idx.policies)
    assert not idx2.recheck(conn).allowed


@pytest.mark.parametrize(
    ("objects", "port", "mode"),
    [
        ((), 8080, MtlsMode.PERMISSIVE),
        ((policy("s", "back", {"mtls": {"mode": "STRICT"}}, "PeerAuthentication"),), 8080, MtlsMode.STRICT),
        ((policy("d", "back", {"mtls": {"mode": "DISABLE"}}, "PeerAuthentication"),), 8080, MtlsMode.DISABLE),
        (
            (
                policy(
                    "p",
                    "back",
                    {
                        "selector": {"matchLabels": {"app": "b"}},
                        "mtls": {"mode": "STRICT"},
                        "portLevelMtls": {"9000": {"mode": "PERMISSIVE"}},
                    },
                    "PeerAuthentication",
                ),
            ),
            9000,
            MtlsMode.PERMISSIVE,
        ),
    ],
)
def test_peer_auth(objects: tuple[PolicyObject, ...], port: int, mode: MtlsMode) -> None:
    assert index(objects).peer_auth(B, port) is mode


# --- NodeProxy: the workload of a served pod ---------------------------------------------------------


class FakeCerts:
    """What NodeProxy asks of the certificate manager: which identities it ensures."""

    trust_domain = TD

    def __init__(self) -> None:
        self.ensured: list[SpiffeId] = []

    def ensure(self, identity: SpiffeId) -> None:
        self.ensured.append(identity)

    def release(self, identity: SpiffeId) -> None:
        self.ensured.remove(identity)

    def certificate(self, identity: SpiffeId) -> None:
        return None


def serving(*workloads: Workload) -> tuple[NodeProxy, FakeCerts, list[EnrolledPod]]:
    """A NodeProxy on n1 serving pods enrolled as the agent enrolls them (key `pod_key(uid)`),
    recorded as `serve()` records them but without listeners."""
    certs = FakeCerts()
    proxy = NodeProxy(
        cast(Datapath, None), cast(CertificateManager, certs), TD, node="n1", bundle=lambda: b""
    )
    eps = []
    for w in workloads:
        ep = EnrolledPod(PodRef(pod_key(w.uid), "/proc/self/ns/net", w.ips[0]), netns_cookie=1, pod_index=0)
        proxy._served[ep.pod.uid] = _Served(ep)
        proxy.core.add_pod(ep)
        eps.append(ep)
    return proxy, certs, eps


# A finished Job pod (its uid sorts first) still reports the IP the node gave to a new pod since.
JOB = wl("batch-1", "front", "10.1.0.7")
WEB = wl("web", "front", "10.1.0.7")


def test_a_served_pod_is_looked_up_by_its_key_never_by_its_ip() -> None:
    idx = MeshIndex(node="n1", trust_domain=TD, workloads=(JOB, WEB, B))
    assert idx.workload_by_ip("10.1.0.7") is JOB  # by IP, the finished pod shadows the running one
    assert idx.pod_workload(pod_key(WEB.uid), "10.1.0.7") is WEB
    assert idx.pod_workload(pod_key(JOB.uid), "10.1.0.7") is JOB
    # no fallback to whoever else has the IP: the pod's workload left, or moved to another IP
    assert idx.pod_workload(pod_key("front/gone"), "10.1.0.7") is None
    assert idx.pod_workload(pod_key(WEB.uid), "10.1.0.8") is None
    assert idx.pod_workload(pod_key(B.uid), "10.2.0.1") is None  # not a workload of this node


async def test_a_served_pod_keeps_its_identity_when_another_workload_claims_its_ip() -> None:
    proxy, certs, _ = serving(WEB)
    proxy.update([JOB, WEB], [], [])
    hit = proxy.core.local_workload("10.1.0.7")  # 15008 picks the certificate with this, inbound authz too
    assert hit is not None and hit[1] is proxy.index.pod_workload(pod_key(WEB.uid), "10.1.0.7")
    assert hit[1].uid == WEB.uid
    assert certs.ensured == [SpiffeId.for_workload(TD, "front", "web")]
    proxy.update([JOB], [], [])  # the pod's own workload is gone: it fails closed, not as the job
    assert proxy.core.local_workload("10.1.0.7") is None
    assert certs.ensured == []


async def test_a_workload_without_a_valid_identity_is_skipped_and_the_push_still_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = replace(wl("odd", "back", "10.1.0.8"), service_account="web app")  # not a SPIFFE path segment
    good = wl("web", "back", "10.1.0.9")
    proxy, certs, (bad_ep, _) = serving(bad, good)
    proxy.core.index = proxy.index.rebuilt([bad, good], [], [])
    client = SpiffeId.for_workload(TD, "front", "client")
    authz, decision = proxy.index.authorize(
        dst_workload=good, src_ip="10.2.0.1", src_identity=client, dst_ip="10.1.0.9", dst_port=8080
    )
    assert decision.allowed  # no policy yet
    killed: list[bool] = []
    t = Tracked("c1", ConnPath.HBONE, (pod_key(good.uid),), ("10.2.0.1", 1234), ("10.1.0.9", 8080),
                dst_workload=good, src_identity=str(client), authz=authz, deciding=decision,
                closer=lambda: killed.append(True))  # fmt: skip
    proxy.tracker.opened(t)
    deny_all = policy("deny-all", "back", {"action": "DENY", "rules": [{}]})
    with caplog.at_level(logging.ERROR, logger="agent.proxy.server"):
        proxy.update([bad, good], [], [deny_all])
    assert killed, "the push was not applied: the now-denied connection stays open"
    assert certs.ensured == [SpiffeId.for_workload(TD, "back", "web")]
    assert f"event=identity_invalid pod={bad_ep.pod.uid}" in caplog.text
    # the bad pod is served as nothing: its connections fail closed (no workload, no certificate)
    assert proxy.core.workload_of(bad_ep) is None
    assert proxy.core.local_workload("10.1.0.8") is None


async def test_the_hbone_receive_budget_is_set_by_the_proxy_and_shown_in_its_stats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tunnel.RECEIVE_BUDGET, "limit", tunnel.RECEIVE_BUDGET.limit)  # restored after
    proxy = NodeProxy(
        cast(Datapath, None), cast(CertificateManager, FakeCerts()), TD, node="n1", bundle=lambda: b"",
        max_hbone_queued=64 * 1024 * 1024,
    )  # fmt: skip
    assert tunnel.RECEIVE_BUDGET.limit == 64 * 1024 * 1024  # one per process: the workers set theirs
    stats = proxy.stats()
    assert stats["hbone_queued_limit"] == 64 * 1024 * 1024
    assert stats["hbone_queued_bytes"] == tunnel.RECEIVE_BUDGET.used
    assert stats["cut_off_buffer_overflow"] == 0
