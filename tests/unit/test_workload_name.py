"""The name of a pod's workload (Istio's `source_workload`/`destination_workload`) travels from the
registry to the agent as `Workload.workload_name`, never as a label the pod does not have: selectors
(AuthorizationPolicy, PeerAuthentication, Service) match the pod's own labels only, as in Istio."""

from __future__ import annotations

from typing import Any

from agent.proxy.metrics import TcpPeers, tcp_labels, workload_name
from api.authz import Connection, MtlsMode, PeerAuthIndex, PolicyIndex, PolicyRef, Reason, evaluate
from api.convert import from_proto, to_proto
from api.resources import Workload
from api.v1 import nodemesh_pb2 as pb
from controller.registry import WORKLOAD_NAME_LABEL, MeshState, build_state, parse_config_object

TD = "cluster.local"
CLIENT = f"{TD}/ns/shop/sa/client"
OWNED = "web-7d9f8c6b5-x2x4q"  # a pod of the Deployment `web`, without the workload-name label
LABELLED = "web-canary"  # a pod of no controller that carries `service.istio.io/workload-name: web`


def pod(name: str, ip: str, labels: dict[str, str], owner: str = "") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "shop", "labels": labels}
    if owner:  # as the ReplicaSet controller creates it: generated name, controller owner reference
        metadata["generateName"] = name.rsplit("-", 1)[0] + "-"
        metadata["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner, "uid": "u1", "controller": True}
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": "node1", "serviceAccountName": "web"},
        "status": {"podIP": ip},
    }


OWNED_POD = pod(OWNED, "10.1.0.2", {"app": "web", "pod-template-hash": "7d9f8c6b5"}, owner="web-7d9f8c6b5")
LABELLED_POD = pod(LABELLED, "10.1.0.3", {"app": "web", WORKLOAD_NAME_LABEL: "web"})
BY_WORKLOAD_NAME = {"matchLabels": {WORKLOAD_NAME_LABEL: "web"}}


def state_of(*bodies: dict[str, Any]) -> MeshState:
    objects = []
    for body in bodies:
        obj, errors = parse_config_object(body, file="t.yaml")
        assert obj is not None, errors
        objects.append(obj)
    return build_state(objects, TD)


def delivered(state: MeshState) -> dict[str, Workload]:
    """The state's workloads as an agent holds them: through the config stream's wire form."""
    out = {}
    for key, workload in state.workloads.items():
        wire = pb.Resource.FromString(to_proto(workload).SerializeToString())
        _, _, back = from_proto(wire)
        assert isinstance(back, Workload)
        out[key] = back
    return out


def test_an_owned_pods_workload_has_its_controllers_name_and_only_its_own_labels() -> None:
    workloads = delivered(state_of(OWNED_POD))
    owned = workloads[f"Workload/shop/{OWNED}"]
    assert owned.labels == (("app", "web"), ("pod-template-hash", "7d9f8c6b5"))
    assert (owned.name, owned.workload_name) == (OWNED, "web")
    labels = tcp_labels(TcpPeers("destination", owned, None, owned, None, None, True))
    assert (labels["source_workload"], labels["destination_workload"]) == ("web", "web")


def test_a_pods_own_workload_name_label_stays_a_label_and_names_its_workload() -> None:
    labelled = delivered(state_of(LABELLED_POD))[f"Workload/shop/{LABELLED}"]
    assert labelled.label_map()[WORKLOAD_NAME_LABEL] == "web"
    assert labelled.workload_name == "web"
    assert (
        tcp_labels(TcpPeers("destination", None, None, labelled, None, None, True))["destination_workload"]
        == "web"
    )


def authorization_policy(action: str, selector: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-web", "namespace": "shop"},
        "spec": {"action": action, "selector": selector, "rules": [{}]},
    }


def test_an_authorization_policy_on_the_workload_name_label_selects_only_pods_that_carry_it() -> None:
    # Istio: "selector ... matches the labels of the workload", the pod's own labels; a derived
    # workload name is no label of the owned pod
    state = state_of(OWNED_POD, LABELLED_POD, authorization_policy("DENY", BY_WORKLOAD_NAME))
    workloads = delivered(state)
    index = PolicyIndex.build(state.policies.values())

    def decide(pod_name: str) -> tuple[bool, Reason, PolicyRef | None]:
        workload = workloads[f"Workload/shop/{pod_name}"]
        conn = Connection(
            src_ip="10.1.0.9",
            src_identity=CLIENT,
            dst_ip=workload.ips[0],
            dst_port=8080,
            dst_workload=workload,
        )
        decision = evaluate(index, conn)
        return decision.allowed, decision.reason, decision.policy

    assert decide(OWNED) == (True, Reason.ALLOWED_NO_POLICY, None)
    assert decide(LABELLED) == (False, Reason.DENIED_BY_POLICY, PolicyRef("shop", "deny-web"))


def test_a_peer_authentication_on_the_workload_name_label_selects_only_pods_that_carry_it() -> None:
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict-web", "namespace": "shop"},
        "spec": {"selector": BY_WORKLOAD_NAME, "mtls": {"mode": "STRICT"}},
    }
    state = state_of(OWNED_POD, LABELLED_POD, strict)
    workloads = delivered(state)
    index = PeerAuthIndex.build(state.policies.values())
    owned = index.resolve(workloads[f"Workload/shop/{OWNED}"], 8080)
    labelled = index.resolve(workloads[f"Workload/shop/{LABELLED}"], 8080)
    assert owned.policy is None and owned.mode is not MtlsMode.STRICT
    assert (labelled.policy, labelled.mode) == (PolicyRef("shop", "strict-web"), MtlsMode.STRICT)


def test_a_service_selector_on_the_workload_name_label_has_only_pods_that_carry_it() -> None:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "selector": {WORKLOAD_NAME_LABEL: "web"},
            "ports": [{"port": 80}],
        },
    }
    (service,) = state_of(OWNED_POD, LABELLED_POD, svc).services.values()
    assert [e.workload_uid for e in service.endpoints] == [f"shop/{LABELLED}"]


def test_the_wire_form_carries_the_workload_name_in_a_field_of_its_own() -> None:
    # fields 1-9 are those of the first version; the workload name is a new number (10)
    numbers = {f.name: f.number for f in pb.Workload.DESCRIPTOR.fields}
    assert numbers == {
        "uid": 1,
        "name": 2,
        "namespace": 3,
        "service_account": 4,
        "node": 5,
        "ips": 6,
        "labels": 7,
        "protocol": 8,
        "netns": 9,
        "workload_name": 10,
    }
    (owned,) = state_of(OWNED_POD).workloads.values()
    assert to_proto(owned).workload.workload_name == "web"


def test_a_workload_from_a_controller_without_the_field_is_named_after_its_pod() -> None:
    # what a controller from before the field sends for a pod without owner: no field 10
    old = pb.Resource(
        key="Workload/shop/solo",
        version="v1",
        workload=pb.Workload(uid="shop/solo", name="solo", namespace="shop", service_account="sa", node="n1"),
    )
    _, _, workload = from_proto(pb.Resource.FromString(old.SerializeToString()))
    assert isinstance(workload, Workload)
    assert workload.workload_name == ""
    assert workload_name(workload) == "solo"


def test_a_controller_without_the_field_still_names_an_owned_pods_workload_by_its_label() -> None:
    # such a controller added the derived name to the labels; the agent's metrics keep reading it
    old = pb.Resource(
        key=f"Workload/shop/{OWNED}",
        version="v1",
        workload=pb.Workload(
            uid=f"shop/{OWNED}",
            name=OWNED,
            namespace="shop",
            labels=[pb.Label(key=WORKLOAD_NAME_LABEL, value="web")],
        ),
    )
    _, _, workload = from_proto(old)
    assert isinstance(workload, Workload)
    assert workload_name(workload) == "web"
