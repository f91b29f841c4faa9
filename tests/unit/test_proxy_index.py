"""MeshIndex without sockets: where an outbound connection goes, and the authorization plumbing."""

from __future__ import annotations

from typing import Any

import pytest

from agent.proxy.index import MeshIndex, RouteKind
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
