"""`policy explain`: resolving the source and destination, then deciding with the proxy's own evaluator."""

from __future__ import annotations

from typing import Any

import pytest

from agent.admin.explain import ExplainError, explain
from agent.admin.sources import MeshSettings
from api.authz import Connection, MtlsMode, PolicyIndex, Reason, evaluate
from api.resources import Endpoint, PolicyObject, Service, ServicePort, TunnelProtocol, Workload

MESH = MeshSettings(trust_domain="cluster.local")


def wl(
    ns: str, name: str, ip: str, node: str = "node1", sa: str = "", mesh: bool = True, **labels: str
) -> Workload:
    return Workload(
        uid=f"{ns}/{name}",
        name=name,
        namespace=ns,
        service_account=sa or name,
        node=node,
        ips=(ip,),
        labels=tuple(sorted(labels.items())),
        protocol=TunnelProtocol.HBONE if mesh else TunnelProtocol.NONE,
    )


def obj(kind: str, ns: str, name: str, spec: dict[str, Any], **meta: Any) -> PolicyObject:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, **meta},
        "spec": spec,
    }
    return PolicyObject.of(kind, ns, name, body)


WEB = wl("shop", "web", "10.1.0.2", sa="web", app="web")
DB0 = wl("shop", "db-0", "10.2.0.3", node="node2", sa="db", app="db", version="v1")
DB1 = wl("shop", "db-1", "10.2.0.4", node="node2", sa="db", app="db", version="v2")
LEGACY = wl("default", "legacy", "10.1.0.9", mesh=False)
OUTSIDE = wl("ext", "outside", "10.3.0.5", mesh=False)
OTHER_WEB = wl("staging", "web", "10.1.0.20", sa="web", app="web")
WORKLOADS = [WEB, DB0, DB1, LEGACY, OUTSIDE]

DB_SVC = Service(
    "db",
    "shop",
    "10.96.0.10",
    (ServicePort(5432, 5432, "pg"),),
    (Endpoint("shop/db-0", "10.2.0.3"), Endpoint("shop/db-1", "10.2.0.4")),
)
WEB_SVC = Service(
    "web", "shop", "10.96.0.11", (ServicePort(80, 8080, "http"),), (Endpoint("shop/web", "10.1.0.2"),)
)
EMPTY_SVC = Service("empty", "shop", "10.96.0.12", (ServicePort(80, 80),))
SERVICES = [DB_SVC, WEB_SVC, EMPTY_SVC]

POLICIES = [
    obj(
        "AuthorizationPolicy",
        "shop",
        "db-allow-web",
        {
            "selector": {"matchLabels": {"app": "db"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
                    "to": [{"operation": {"ports": ["5432"]}}],
                }
            ],
        },
    ),
    obj(
        "AuthorizationPolicy",
        "shop",
        "freeze-v2",
        {
            "selector": {"matchLabels": {"version": "v2"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}],
        },
    ),
    obj("PeerAuthentication", "shop", "strict", {"mtls": {"mode": "STRICT"}}),
    obj(
        "PeerAuthentication",
        "shop",
        "web-legacy-port",
        {
            "selector": {"matchLabels": {"app": "web"}},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
        },
    ),
]


def run(from_pod: str, to: str, port: int | None = None, **kw: Any) -> Any:
    return explain(
        kw.get("workloads", WORKLOADS),
        kw.get("services", SERVICES),
        kw.get("policies", POLICIES),
        MESH,
        from_pod,
        to,
        port,
    )


def test_service_is_resolved_to_each_endpoint_and_decided_by_the_proxy_evaluator() -> None:
    result = run("shop/web", "db:5432")
    assert result.service == "db.shop.svc.cluster.local" and result.service_port == 5432
    assert result.source_identity == "spiffe://cluster.local/ns/shop/sa/web"
    by_name = {e.workload: e for e in result.endpoints}
    assert set(by_name) == {"shop/db-0", "shop/db-1"}
    ok, frozen = by_name["shop/db-0"], by_name["shop/db-1"]
    assert ok.allowed and ok.transport == "mtls"
    assert ok.decision is not None and ok.decision.reason is Reason.ALLOWED_BY_POLICY
    assert str(ok.decision.policy) == "shop/db-allow-web" and ok.decision.rule_index == 0
    assert not frozen.allowed and frozen.decision is not None
    assert (
        frozen.decision.reason is Reason.DENIED_BY_POLICY and str(frozen.decision.policy) == "shop/freeze-v2"
    )
    assert result.verdict == "mixed"
    # The very decision the proxy makes for that connection.
    direct = evaluate(
        PolicyIndex.build(POLICIES),
        Connection(
            src_ip="10.1.0.2",
            src_identity="cluster.local/ns/shop/sa/web",
            dst_ip="10.2.0.4",
            dst_port=5432,
            dst_workload=DB1,
        ),
        explain=True,
    )
    assert frozen.decision == direct
    assert any("rules[0] matches" in line for line in direct.explanation)
    assert ok.peer_authentication is not None and ok.peer_authentication.mode is MtlsMode.STRICT


def test_plaintext_source_is_refused_by_strict_peer_authentication() -> None:
    result = run("legacy", "shop/db-0:5432")
    (ep,) = result.endpoints
    assert not ep.allowed and ep.transport == "plaintext" and ep.decision is None
    assert "STRICT" in ep.summary and "shop/strict" in ep.summary
    assert result.source_identity == "" and any("not in the mesh" in n for n in result.notes)
    assert result.verdict == "denied"


def test_port_level_permissive_lets_plaintext_through_to_the_authorization_policy() -> None:
    result = run("default/legacy", "web:80")  # service port 80 → target port 8080
    (ep,) = result.endpoints
    assert ep.port == 8080 and ep.transport == "plaintext"
    assert ep.peer_authentication is not None and ep.peer_authentication.mode is MtlsMode.PERMISSIVE
    assert str(ep.peer_authentication.level) == "workload-port"
    assert ep.allowed and ep.decision is not None and ep.decision.reason is Reason.ALLOWED_NO_POLICY


def test_plaintext_source_without_principal_does_not_match_a_principals_rule() -> None:
    policies = [p for p in POLICIES if p.name != "strict"]
    result = run("legacy", "shop/db-0", 5432, policies=policies)
    (ep,) = result.endpoints
    assert not ep.allowed and ep.decision is not None and ep.decision.reason is Reason.NOT_ALLOWED
    assert any("principals" in line for line in ep.decision.explanation)


def test_destination_outside_the_mesh_is_passthrough() -> None:
    result = run("web", "ext/outside:9000")
    (ep,) = result.endpoints
    assert ep.transport == "passthrough" and ep.allowed and ep.decision is None


@pytest.mark.parametrize(
    "to", ["db:5432", "shop/db:5432", "db.shop:5432", "db.shop.svc.cluster.local:5432", "10.96.0.10:5432"]
)
def test_service_spellings(to: str) -> None:
    assert run("web", to).service == "db.shop.svc.cluster.local"


def test_service_port_may_come_from_the_port_option() -> None:
    assert len(run("web", "db", 5432).endpoints) == 2


def test_pod_by_ip_and_port_option() -> None:
    (ep,) = run("10.1.0.2", "10.2.0.3", 5432).endpoints
    assert ep.workload == "shop/db-0" and ep.allowed


def test_bare_service_name_resolves_in_the_client_namespace_first() -> None:
    other = Service("db", "staging", "10.96.1.10", (ServicePort(5432, 5432),))
    assert run("web", "db:5432", services=[*SERVICES, other]).service == "db.shop.svc.cluster.local"


def test_service_without_endpoints_has_no_verdict() -> None:
    result = run("web", "empty:80")
    assert result.verdict == "no-endpoints" and any("no endpoints" in n for n in result.notes)


def test_targetref_policy_is_reported_as_not_applied() -> None:
    waypoint = obj(
        "AuthorizationPolicy",
        "shop",
        "at-waypoint",
        {
            "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}],
            "action": "DENY",
            "rules": [{}],
        },
    )
    result = run("web", "db-0:5432", policies=[*POLICIES, waypoint])
    assert any("shop/at-waypoint skipped" in n for n in result.notes)
    assert result.verdict == "allowed"


def test_json_form_carries_the_decision_and_the_chain() -> None:
    doc = run("web", "db:5432").to_dict()
    assert doc["verdict"] == "mixed" and doc["source"]["in_mesh"] is True
    ep = doc["endpoints"][0]
    assert ep["decision"]["policy"] == "shop/db-allow-web" and ep["peer_authentication"]["mode"] == "STRICT"


@pytest.mark.parametrize(
    ("from_pod", "to", "port", "message"),
    [
        ("nope", "db:5432", None, "no pod 'nope'; known pods: default/legacy, ext/outside"),
        ("web", "nothing:80", None, "no pod or service 'nothing'"),
        ("web", "db", None, "needs a port (one of: 5432)"),
        ("web", "db:80", None, "has no port 80 (ports: 5432)"),
        ("web", "db-0", None, "a pod destination needs a port"),
        ("web", "db:5432", 80, "names port 5432 but --port is 80"),
        ("web", "db-0", 70000, "port 70000 is out of range"),
    ],
)
def test_resolution_errors_say_what_exists(from_pod: str, to: str, port: int | None, message: str) -> None:
    with pytest.raises(ExplainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(from_pod, to, port)


def test_ambiguous_pod_name_asks_for_the_namespace() -> None:
    with pytest.raises(ExplainError, match=r"ambiguous \(shop/web, staging/web\): write NAMESPACE/NAME"):
        run("web", "db:5432", workloads=[*WORKLOADS, OTHER_WEB])
    assert run("staging/web", "db:5432", workloads=[*WORKLOADS, OTHER_WEB]).source == OTHER_WEB
