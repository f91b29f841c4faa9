"""The registry's mapping of Kubernetes-form objects to the mesh state, node views and the signing rule."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from api.policy import Pod, parse_object
from api.resources import Endpoint, ServicePort, TunnelProtocol, Workload
from controller.registry import (
    WORKLOAD_NAME_LABEL,
    ConfigObject,
    MeshState,
    build_state,
    identity_on_node,
    node_view,
    parse_config_object,
    workload_name,
)


def pod(
    name: str,
    ns: str = "shop",
    node: str = "node1",
    ip: str | None = "10.1.0.2",
    sa: str | None = "web",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {"nodeName": node} if node else {},
    }
    if sa:
        body["spec"]["serviceAccountName"] = sa
    if ip:
        body["status"] = {"podIP": ip}
    return body


def service(
    name: str,
    ns: str = "shop",
    selector: dict[str, str] | None = None,
    vip: str = "10.96.0.10",
    **extra: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "clusterIP": vip,
        "ports": [{"port": 80, "targetPort": 8080}, {"port": 9090}],
    }
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, **extra},
        "spec": spec,
    }


def authz(ns: str, name: str, action: str = "ALLOW", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns, **meta},
        "spec": {"action": action, "rules": [{}]},  # a DENY without rules is refused, as by Istio
    }


def token_secret(node: str, token: str, *, encoded: bool = False) -> dict[str, Any]:
    data = {"node": node, "token": token}
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{node}-token", "namespace": "nodemesh-system"},
        "type": "nodemesh.io/node-token",
    }
    if encoded:
        body["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        body["stringData"] = data
    return body


def objects(*bodies: dict[str, Any]) -> list[ConfigObject]:
    out = []
    for body in bodies:
        obj, errors = parse_config_object(body, file="t.yaml")
        assert obj is not None, errors
        out.append(obj)
    return out


def state_of(*bodies: dict[str, Any]) -> MeshState:
    return build_state(objects(*bodies), "cluster.local")


def test_pod_becomes_a_workload() -> None:
    state = state_of(
        pod("web-1", labels={"b": "2", "a": "1"}, annotations={"nodemesh.io/netns": "/run/netns/web-1"})
    )
    assert state.workloads == {
        "Workload/shop/web-1": Workload(
            uid="shop/web-1",
            name="web-1",
            namespace="shop",
            service_account="web",
            node="node1",
            ips=("10.1.0.2",),
            labels=(("a", "1"), ("b", "2")),
            protocol=TunnelProtocol.HBONE,
            netns="/run/netns/web-1",
        )
    }


def test_pod_defaults_and_opt_out() -> None:
    state = state_of(pod("legacy", sa=None, labels={"nodemesh.io/dataplane-mode": "none"}))
    workload = state.workloads["Workload/shop/legacy"]
    assert workload.service_account == "default"
    assert workload.protocol is TunnelProtocol.NONE
    assert workload.netns == ""


def test_pod_ips_come_from_pod_ips_first() -> None:
    body = pod("dual")
    body["status"] = {"podIP": "10.1.0.2", "podIPs": [{"ip": "10.1.0.9"}, {"ip": "10.1.0.2"}]}
    assert state_of(body).workloads["Workload/shop/dual"].ips == ("10.1.0.9", "10.1.0.2")


def test_unscheduled_or_addressless_pods_are_skipped_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="nodemesh.controller.registry")
    state = state_of(pod("pending", node=""), pod("starting", ip=None), pod("ok"))
    assert list(state.workloads) == ["Workload/shop/ok"]
    assert "pod=shop/pending reason=unscheduled" in caplog.text
    assert "pod=shop/starting reason=no_ip" in caplog.text
    # A scheduled pod without an IP yet still runs on its node: its identity may get a certificate.
    assert identity_on_node(state, "node1", "shop", "web")


def test_terminated_pods_are_not_workloads(caplog: pytest.LogCaptureFixture) -> None:
    # Kubernetes keeps status.podIP on a finished pod while the node gives the address to a new one
    caplog.set_level("INFO", logger="nodemesh.controller.registry")
    done, failed, running = pod("job-1", sa="batch"), pod("job-2", ip="10.1.0.3", sa="batch"), pod("web")
    done["status"]["phase"] = "Succeeded"
    failed["status"]["phase"] = "Failed"
    running["status"]["phase"] = "Running"
    state = state_of(done, failed, running)
    assert list(state.workloads) == ["Workload/shop/web"]
    assert "pod=shop/job-1 reason=terminated" in caplog.text
    assert "pod=shop/job-2 reason=terminated" in caplog.text
    assert "registry.duplicate_ip" not in caplog.text  # the IP is the running pod's alone
    assert not identity_on_node(state, "node1", "shop", "batch")  # nothing to sign for a finished pod
    assert identity_on_node(state, "node1", "shop", "web")


def owned_pod(
    name: str, kind: str, owner: str, labels: dict[str, str] | None = None, *, controller: bool = True
) -> dict[str, Any]:
    """A pod as a Kubernetes controller creates it: generated name, controller owner reference."""
    body = pod(name, labels=labels)
    body["metadata"]["generateName"] = name.rsplit("-", 1)[0] + "-"
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "u1", "controller": controller}
    ]
    return body


WEB_POD, WEB_RS, WEB_HASH = "web-7d9f8c6b5-x2x4q", "web-7d9f8c6b5", {"pod-template-hash": "7d9f8c6b5"}


def test_a_deployment_pods_workload_name_is_its_deployment_and_its_name_stays_the_pods() -> None:
    (workload,) = state_of(owned_pod(WEB_POD, "ReplicaSet", WEB_RS, WEB_HASH)).workloads.values()
    # flows, `nodemesh conns` and the uid keep naming the pod; the metrics read workload_name
    assert (workload.uid, workload.name, workload.workload_name) == (f"shop/{WEB_POD}", WEB_POD, "web")
    # no label the pod does not have: selectors match the pod's own labels only, as in Istio
    assert workload.labels == (("pod-template-hash", "7d9f8c6b5"),)


def test_a_pods_own_workload_name_label_is_kept_as_it_is() -> None:
    for value, expected in (("storefront", "storefront"), ("", "web")):
        labels = WEB_HASH | {WORKLOAD_NAME_LABEL: value}
        (workload,) = state_of(owned_pod(WEB_POD, "ReplicaSet", WEB_RS, labels)).workloads.values()
        assert workload.label_map() == labels
        # nodemesh: an empty label names no workload, the controller does (Istio would report "")
        assert workload.workload_name == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Istio's GetWorkloadMetaFromPod (pkg/kube/util.go)
        (owned_pod(WEB_POD, "ReplicaSet", WEB_RS, WEB_HASH), "web"),
        (owned_pod(WEB_POD, "ReplicaSet", WEB_RS, {"pod-template-hash": "other"}), WEB_RS),
        (owned_pod(WEB_POD, "ReplicaSet", WEB_RS), WEB_RS),  # a ReplicaSet of its own
        # an Argo Rollout's ReplicaSet
        (owned_pod("ro-6f7b9-x", "ReplicaSet", "ro-6f7b9", {"rollouts-pod-template-hash": "6f7b9"}), "ro"),
        (owned_pod("db-0", "StatefulSet", "db"), "db"),
        (owned_pod("agent-x7k2p", "DaemonSet", "agent"), "agent"),
        (owned_pod("report-28930140-qz8n4", "Job", "report-28930140"), "report"),  # a CronJob's Job
        (owned_pod("migrate-7-qz8n4", "Job", "migrate-7"), "migrate-7"),  # a Job of its own
        (owned_pod("app-1-abcde", "ReplicationController", "app-1", {"deploymentconfig": "app"}), "app"),
        (owned_pod("web-1", "ReplicaSet", WEB_RS, WEB_HASH, controller=False), "web-1"),  # no controller
        (pod("web-1"), "web-1"),  # no owner: the lab's pods
        (owned_pod("db-0", "StatefulSet", "db", {WORKLOAD_NAME_LABEL: "storefront"}), "storefront"),
    ],
)
def test_workload_name_is_derived_from_the_pods_controller_as_istio_does(
    body: dict[str, Any], expected: str
) -> None:
    parsed, errors = parse_config_object(body)
    assert parsed is not None and isinstance(parsed.model, Pod), errors
    assert workload_name(parsed.model) == expected
    (workload,) = build_state([parsed], "cluster.local").workloads.values()
    # the Workload carries it, empty when it is the pod's own name
    assert workload.workload_name == ("" if expected == workload.name else expected)


def test_a_hand_named_pod_is_its_own_workload_whatever_its_owner() -> None:
    # Istio looks at the owner only for a generated name (metadata.generateName)
    body = owned_pod("web-1", "StatefulSet", "db")
    del body["metadata"]["generateName"]
    (workload,) = state_of(body).workloads.values()
    assert WORKLOAD_NAME_LABEL not in workload.label_map()
    assert workload.workload_name == ""  # the pod's own name


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        (pod("odd", sa="web app"), "spec.serviceAccountName", "'web app'"),
        (pod("odd", sa="a/sa/b"), "spec.serviceAccountName", "'a/sa/b'"),
        (pod("odd", sa=".."), "spec.serviceAccountName", "'..'"),
        (pod("odd", sa="x" * 254), "spec.serviceAccountName", "longer than 253"),
        (pod("odd", ns="shop lab"), "metadata.namespace", "'shop lab'"),
    ],
)
def test_pods_whose_identity_cannot_be_formed_are_errors(
    body: dict[str, Any], field: str, value: str
) -> None:
    parsed, errors = parse_config_object(body, file="f.yaml", line=3)
    assert parsed is None
    assert [(e.obj, e.field) for e in errors] == [(f"Pod {body['metadata']['namespace']}/odd", field)]
    assert value in errors[0].message and "cannot be part of the pod's SPIFFE ID" in errors[0].message


def test_service_endpoints_follow_the_selector_in_the_same_namespace() -> None:
    state = state_of(
        pod("web-1", labels={"app": "web", "v": "1"}),
        pod("web-2", node="node2", ip="10.2.0.2", labels={"app": "web"}),
        pod("other", ip="10.1.0.3", labels={"app": "db"}),
        pod("elsewhere", ns="bank", ip="10.1.0.4", labels={"app": "web"}),
        service("web", selector={"app": "web"}),
        service("noselector", vip="10.96.0.11"),
        service("empty", selector={}, vip="10.96.0.12"),
    )
    web = state.services["Service/shop/web"]
    assert web.vip == "10.96.0.10"
    assert web.ports == (ServicePort(80, 8080), ServicePort(9090, 9090))
    assert web.selector == (("app", "web"),)
    assert web.endpoints == (Endpoint("shop/web-1", "10.1.0.2"), Endpoint("shop/web-2", "10.2.0.2"))
    assert state.services["Service/shop/noselector"].endpoints == ()
    assert state.services["Service/shop/empty"].endpoints == ()


def test_explicit_endpoints_annotation_wins_and_names_known_workloads() -> None:
    svc = service(
        "ext", selector={"app": "web"}, annotations={"nodemesh.io/endpoints": "10.1.0.2, 192.0.2.7"}
    )
    state = state_of(pod("web-1", labels={"app": "web"}), svc)
    assert state.services["Service/shop/ext"].endpoints == (
        Endpoint("shop/web-1", "10.1.0.2"),
        Endpoint("", "192.0.2.7"),
    )


@pytest.mark.parametrize("encoded", [False, True])
def test_node_token_secrets(encoded: bool) -> None:
    other_secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"a": "b"}}
    state = state_of(token_secret("node1", "t" * 32, encoded=encoded), other_secret)
    assert state.node_tokens == {"t" * 32: "node1"}
    assert "t" * 32 not in repr(state)  # tokens never reach logs through the state's repr


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"stringData": {"node": "node1"}}, "stringData.token", "missing"),
        ({"stringData": {"node": "node1", "token": "a b"}}, "stringData.token", "whitespace"),
        ({"data": {"node": "bm9kZTE=", "token": "***"}}, "data.token", "base64"),
    ],
)
def test_bad_node_token_secrets_are_errors(body: dict[str, Any], field: str, message: str) -> None:
    full = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "n1", "namespace": "nodemesh-system"},
        "type": "nodemesh.io/node-token",
        **body,
    }
    obj, errors = parse_config_object(full, file="nodes.yaml", line=3)
    assert obj is None
    assert [(e.field, e.obj, e.file, e.line) for e in errors] == [
        (field, "Secret nodemesh-system/n1", "nodes.yaml", 3)
    ]
    assert message in errors[0].message


def test_policies_keep_their_body_and_stay_parseable() -> None:
    body = authz("shop", "allow", annotations={"istio.io/dry-run": "true"})
    body["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    no_ns = authz("shop", "nons")
    del no_ns["metadata"]["namespace"]
    state = state_of(body, no_ns)
    policy = state.policies["AuthorizationPolicy/shop/allow"]
    assert policy.body["metadata"]["annotations"] == {"istio.io/dry-run": "true"}
    assert policy.body["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
    assert parse_object(policy.body).kind == "AuthorizationPolicy"
    defaulted = state.policies["AuthorizationPolicy/default/nons"]
    assert defaulted.body["metadata"]["namespace"] == "default"


@pytest.mark.parametrize(
    ("body", "obj", "field", "needle"),
    [
        (authz("shop", "p", action="NOPE"), "AuthorizationPolicy shop/p", "spec.action", "'ALLOW'"),
        ({**authz("shop", "p"), "kind": "Deployment"}, "Deployment shop/p", "kind", "unknown kind"),
        (pod("bad", ip="10.1.0.999"), "Pod shop/bad", "status.podIP", "10.1.0.999"),
        (
            service("svc", annotations={"nodemesh.io/endpoints": "10.0.0.1,nope"}),
            "Service shop/svc",
            "metadata.annotations[nodemesh.io/endpoints]",
            "'nope'",
        ),
        (
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}},
            "Service default/s",
            "spec",
            "required",
        ),
    ],
)
def test_invalid_objects_name_object_and_field(
    body: dict[str, Any], obj: str, field: str, needle: str
) -> None:
    parsed, errors = parse_config_object(body, file="f.yaml", line=7)
    assert parsed is None
    assert errors[0].obj == obj
    assert errors[0].field == field
    assert needle in errors[0].message
    assert str(errors[0]).startswith(f"f.yaml:7: {obj}: {field}: ")


def test_rule_field_path_uses_the_yaml_names() -> None:
    body = authz("shop", "p")
    body["spec"]["rules"] = [{"from": [{"source": {"principal": ["x"]}}]}]
    _, errors = parse_config_object(body)
    assert [e.field for e in errors] == ["spec.rules[0].from[0].source.principal"]


def test_non_mapping_documents_are_errors() -> None:
    _, errors = parse_config_object(["a", "list"])
    assert len(errors) == 1 and "mapping" in errors[0].message


MESH = (
    pod("web-1", node="node1", labels={"app": "web"}),
    pod("api-1", ns="bank", node="node2", ip="10.2.0.2", sa="api"),
    service("web", selector={"app": "web"}),
    authz("shop", "shop-policy"),
    authz("bank", "bank-policy"),
    authz("istio-system", "mesh-wide"),
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "bank"},
        "spec": {"mtls": {"mode": "STRICT"}},
    },
    {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "bank-route", "namespace": "bank"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api"}]},
    },
    token_secret("node1", "a" * 32),
    token_secret("node2", "b" * 32),
)


def test_node_view_has_all_destinations_and_only_its_inbound_policies() -> None:
    state = state_of(*MESH)
    common = {
        "Workload/shop/web-1",
        "Workload/bank/api-1",
        "Service/shop/web",
        "AuthorizationPolicy/istio-system/mesh-wide",
        "HTTPRoute/bank/bank-route",
    }
    assert set(node_view(state, "node1")) == common | {"AuthorizationPolicy/shop/shop-policy"}
    assert set(node_view(state, "node2")) == common | {
        "AuthorizationPolicy/bank/bank-policy",
        "PeerAuthentication/bank/strict",
    }
    assert set(node_view(state, "node-without-pods")) == common
    assert node_view(state, "node1")["Workload/shop/web-1"] is state.workloads["Workload/shop/web-1"]


def test_identity_on_node_only_where_the_pod_runs() -> None:
    state = state_of(*MESH)
    assert identity_on_node(state, "node1", "shop", "web")
    assert identity_on_node(state, "node2", "bank", "api")
    assert not identity_on_node(state, "node2", "shop", "web")
    assert not identity_on_node(state, "node1", "shop", "default")
    assert not identity_on_node(state, "node1", "bank", "api")


def test_states_compare_by_content() -> None:
    assert state_of(*MESH) == state_of(*reversed(MESH))
    changed = [*MESH[:3], authz("shop", "shop-policy", "DENY"), *MESH[4:]]
    assert state_of(*MESH) != state_of(*changed)


def test_duplicates_given_to_build_state_keep_the_first(caplog: pytest.LogCaptureFixture) -> None:
    first, second = objects(authz("shop", "p", "ALLOW"), authz("shop", "p", "DENY"))
    state = build_state([first, second], "cluster.local")
    assert state.policies["AuthorizationPolicy/shop/p"].body["spec"]["action"] == "ALLOW"
    assert "registry.duplicate" in caplog.text


def test_a_second_service_with_the_same_cluster_ip_is_left_out_of_the_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Agents must agree which Service a VIP is (the datapath took the last, the proxy the first):
    sources report the repeat as an error; should one reach build_state, the first Service wins."""
    state = state_of(service("cart"), service("pay"), service("bank", vip="10.96.0.11"))
    assert sorted(state.services) == ["Service/shop/bank", "Service/shop/cart"]
    assert "duplicate_vip service=Service shop/pay vip=10.96.0.10 kept=Service shop/cart" in caplog.text
