"""The lab's pure parts: topology validation, address planning, rendered controller objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.policy import parse_object
from nodemesh.lab.lab import ANNOTATION_NETNS, LABEL_DATAPLANE_MODE, plan, render_objects
from nodemesh.lab.system import LabError
from nodemesh.lab.topology import TopologyError, load_topology

CG = Path("/sys/fs/cgroup/unified")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topo.yaml"
    path.write_text(text)
    return path


def test_default_topology_plans_the_documented_addresses() -> None:
    p = plan(load_topology(), CG)
    assert [(n.name, n.underlay_ip, n.pod_cidr, n.gateway) for n in p.nodes] == [
        ("node1", "10.99.0.1", "10.100.1.0/24", "10.100.1.1"),
        ("node2", "10.99.0.2", "10.100.2.0/24", "10.100.2.1"),
    ]
    assert {x.name: (x.node, x.ip, x.enrolled) for x in p.pods} == {
        "client": ("node1", "10.100.1.10", True),
        "httpbin-v1": ("node1", "10.100.1.11", True),
        "httpbin-v2": ("node2", "10.100.2.10", True),
        "outsider": ("node2", "10.100.2.11", False),
    }
    assert p.pod("default/httpbin-v2").netns_path == "/var/run/netns/nm-pod-default-httpbin-v2"
    assert p.pod("client").cgroup == str(CG / "nodemesh-lab/node1/pods/default_client")
    assert p.node("node2").pod_cgroup == str(CG / "nodemesh-lab/node2/pods")


def test_lookup_errors_name_what_exists() -> None:
    p = plan(load_topology(), CG)
    with pytest.raises(LabError, match=r"no single pod 'nope'.*default/client"):
        p.pod("nope")
    with pytest.raises(LabError, match=r"no node 'node9'.*node1, node2"):
        p.node("node9")


def test_rendered_objects_are_valid_kubernetes_objects_for_the_registry() -> None:
    p = plan(load_topology(), CG)
    objs = render_objects(p, {"node1": "t1", "node2": "t2"})
    kinds = [o["kind"] for o in objs]
    assert kinds.count("Secret") == 2 and kinds.count("Pod") == 4 and kinds.count("Service") == 1
    for obj in objs:
        parse_object(obj)  # raises on an invalid object
    pods = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Pod"}
    v2 = pods["httpbin-v2"]
    assert v2["spec"]["nodeName"] == "node2" and v2["spec"]["serviceAccountName"] == "httpbin"
    assert v2["status"]["podIP"] == "10.100.2.10"
    assert v2["metadata"]["annotations"][ANNOTATION_NETNS] == "/var/run/netns/nm-pod-default-httpbin-v2"
    assert LABEL_DATAPLANE_MODE not in v2["metadata"]["labels"]
    assert pods["outsider"]["metadata"]["labels"][LABEL_DATAPLANE_MODE] == "none"
    secrets = {o["stringData"]["node"]: o for o in objs if o["kind"] == "Secret"}
    assert (
        secrets["node1"]["type"] == "nodemesh.io/node-token"
        and secrets["node1"]["stringData"]["token"] == "t1"
    )
    svc = next(o for o in objs if o["kind"] == "Service")
    assert svc["spec"]["clusterIP"] == "10.96.0.10" and svc["spec"]["selector"] == {"app": "httpbin"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: [", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("nodes: []\n", "nodes: List should have at least 1 item"),
        ("nodes: [{name: n1}]\npods: [{name: p, node: n2}]\n", "node 'n2' is not one of"),
        ("nodes: [{name: n1}, {name: n1}]\n", "node names must be unique"),
        ("nodes: [{name: N_1}]\n", "not a DNS label"),
        ("nodes: [{name: n1, colour: red}]\n", "nodes.0.colour: Extra inputs are not permitted"),
        ("nodes: [{name: n1}]\npods: [{name: p, node: n1}, {name: p, node: n1}]\n", "defined twice"),
        ("nodes: [{name: n1}]\npods: [{name: p, node: n1, serve: [70000]}]\n", "pods.0.serve.0"),
    ],
)
def test_bad_topologies_are_refused_with_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "absent.yaml")


def test_pod_ip_outside_its_node_cidr_or_reused_is_refused(tmp_path: Path) -> None:
    topo = load_topology(
        write(tmp_path, "nodes: [{name: n1}]\npods: [{name: p, node: n1, ip: 10.100.9.5}]\n")
    )
    with pytest.raises(LabError, match="outside node n1's pod CIDR"):
        plan(topo, CG)
    topo = load_topology(
        write(
            tmp_path,
            "nodes: [{name: n1}]\npods: [{name: a, node: n1, ip: 10.100.1.10}, {name: b, node: n1}]\n",
        )
    )
    with pytest.raises(LabError, match="used twice"):
        plan(topo, CG)


def test_explicit_addresses_are_kept(tmp_path: Path) -> None:
    topo = load_topology(
        write(
            tmp_path,
            "nodes: [{name: a, podCIDR: 10.200.0.0/16, underlayIP: 10.99.0.50}]\n"
            "pods: [{name: p, node: a, ip: 10.200.3.4, namespace: shop, serviceAccount: web}]\n",
        )
    )
    p = plan(topo, CG)
    assert (p.nodes[0].underlay_ip, p.nodes[0].gateway) == ("10.99.0.50", "10.200.0.1")
    assert (p.pods[0].ip, p.pods[0].namespace, p.pods[0].service_account) == ("10.200.3.4", "shop", "web")
