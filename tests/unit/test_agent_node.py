"""The agent's sans-IO core: config view, desired pods, VIP map and the reconcile plan."""

from __future__ import annotations

import pytest

from agent.datapath.bcc_datapath import check_name
from agent.datapath.interface import PodRef
from agent.node import NodeConfig, Plan, Reconciler, desired_pods, pod_key, vip_map
from api.resources import Endpoint, Service, ServicePort, TunnelProtocol, Workload

NODE = "node-a"


def wl(name: str, node: str = NODE, ip: str = "10.1.0.2", netns: str | None = None,
       protocol: TunnelProtocol = TunnelProtocol.HBONE, ns: str = "shop") -> Workload:
    return Workload(f"{ns}/{name}", name, ns, "sa", node, (ip,), protocol=protocol,
                    netns=f"/var/run/netns/{name}" if netns is None else netns)


def ref(name: str, ip: str = "10.1.0.2", ns: str = "shop") -> PodRef:
    return PodRef(f"{ns}_{name}", f"/var/run/netns/{name}", ip)


# -- pod keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("uid, key", [
    ("0b5e3c1a-9d1f-4c1e-8b8a-2f4f6f0e9a11", "0b5e3c1a-9d1f-4c1e-8b8a-2f4f6f0e9a11"),
    ("shop/web-1", "shop_web-1"),
])
def test_pod_key_keeps_valid_uids_and_dots_yaml_uids(uid: str, key: str) -> None:
    assert pod_key(uid) == key


@pytest.mark.parametrize("uid", ["ns/web.v1", "ns/" + "x" * 80, "ns/a b", "/odd", "ns/ünï", "a/b/c"])
def test_pod_key_is_always_a_valid_datapath_name_and_stable(uid: str) -> None:
    key = pod_key(uid)
    assert check_name("pod uid", key) == key
    assert "." not in key  # bpffs refuses names with a dot (EPERM)
    assert pod_key(uid) == key


def test_pod_keys_of_long_uids_differ() -> None:
    assert pod_key("ns/" + "x" * 80) != pod_key("ns/" + "x" * 79 + "y")


# -- config view ------------------------------------------------------------------------------
def test_snapshot_replaces_and_delta_upserts_then_removes() -> None:
    cfg = NodeConfig()
    a, b = wl("a"), wl("b", ip="10.1.0.3")
    cfg.apply([("Workload/shop/a", "v1", a)], [], snapshot=True, trust_domain="td")
    assert cfg.synced and cfg.trust_domain == "td"
    cfg.apply([("Workload/shop/b", "v1", b)], ["Workload/shop/a"], snapshot=False)
    assert cfg.workloads() == [b]
    cfg.apply([("Workload/shop/a", "v1", a)], [], snapshot=True)
    assert cfg.workloads() == [a]


def test_delta_before_any_snapshot_is_not_synced() -> None:
    cfg = NodeConfig()
    cfg.apply([("Workload/shop/a", "v1", wl("a"))], [], snapshot=False)
    assert not cfg.synced


# -- desired pods -----------------------------------------------------------------------------
def test_desired_pods_are_this_nodes_hbone_pods_with_netns() -> None:
    pods, skipped = desired_pods([
        wl("mine"),
        wl("other-node", node="node-b", ip="10.2.0.2"),
        wl("plain", ip="10.1.0.4", protocol=TunnelProtocol.NONE),
        wl("nonetns", ip="10.1.0.5", netns=""),
        Workload("shop/v6", "v6", "shop", "sa", NODE, ("fd00::1",), netns="/var/run/netns/v6"),
    ], NODE)
    assert pods == {"shop_mine": ref("mine")}
    assert [(s.workload_uid, s.reason.split()[0]) for s in skipped] == [
        ("shop/nonetns", "no"), ("shop/v6", "no")]
    assert "nodemesh.io/netns" in skipped[0].reason


def test_dual_stack_workload_uses_its_ipv4() -> None:
    w = Workload("shop/ds", "ds", "shop", "sa", NODE, ("fd00::2", "10.1.0.9"), netns="/n")
    pods, _ = desired_pods([w], NODE)
    assert pods["shop_ds"].ip == "10.1.0.9"


# -- VIP map ----------------------------------------------------------------------------------
def test_vip_map_points_each_tcp_port_at_the_first_ipv4_endpoint() -> None:
    svc = Service("web", "shop", "10.96.0.10",
                  (ServicePort(80, 8080, "http"), ServicePort(53, 53, "dns", "UDP"), ServicePort(81, 0)),
                  (Endpoint("shop/v6", "fd00::1"), Endpoint("shop/a", "10.1.0.2"),
                   Endpoint("shop/b", "10.1.0.3")))
    empty = Service("none", "shop", "10.96.0.11", (ServicePort(80, 80),))
    headless = Service("hl", "shop", "None", (ServicePort(80, 80),), (Endpoint("shop/a", "10.1.0.2"),))
    assert vip_map([svc, empty, headless]) == {
        ("10.96.0.10", 80): ("10.1.0.2", 8080),
        ("10.96.0.10", 81): ("10.1.0.2", 81),
    }


# -- reconcile plan ---------------------------------------------------------------------------
def test_plan_enrolls_new_and_unenrolls_removed_pods() -> None:
    r = Reconciler()
    a, b = ref("a"), ref("b", "10.1.0.3")
    assert r.plan({a.uid: a, b.uid: b}) == Plan(enroll=(a, b))
    r.enroll_succeeded(a)
    r.enroll_succeeded(b)
    assert not r.plan({a.uid: a, b.uid: b})  # idempotent: same desired state, nothing to do
    assert r.plan({a.uid: a}) == Plan(unenroll=(b,))


def test_changed_pod_is_unenrolled_then_enrolled_again() -> None:
    r = Reconciler()
    old = ref("a")
    r.enroll_succeeded(old)
    new = PodRef(old.uid, "/var/run/netns/a-2", "10.1.0.7")
    assert r.plan({new.uid: new}) == Plan(unenroll=(old,), enroll=(new,))


def test_failed_enroll_is_planned_again() -> None:
    r = Reconciler()
    a = ref("a")
    r.enroll_failed(a, "netns /var/run/netns/a: cannot open")
    assert r.failures == {a.uid: "netns /var/run/netns/a: cannot open"}
    assert r.plan({a.uid: a}) == Plan(enroll=(a,))
    r.enroll_succeeded(a)
    assert r.failures == {}


def test_vanished_netns_releases_the_pod_and_retries_it() -> None:
    r = Reconciler()
    a = ref("a")
    r.enroll_succeeded(a)
    assert r.plan({a.uid: a}, vanished=[a.uid]) == Plan(unenroll=(a,), enroll=(a,))


def test_failed_unenroll_stays_enrolled_and_is_retried() -> None:
    r = Reconciler()
    a = ref("a")
    r.enroll_succeeded(a)
    r.unenroll_failed(a, "boom")
    assert r.plan({}) == Plan(unenroll=(a,))


def test_restart_reenrolls_wanted_leftovers_and_unenrolls_the_rest() -> None:
    keep, gone = ref("keep"), ref("gone", "10.1.0.3")
    moved_old, moved_new = ref("moved", "10.1.0.4"), PodRef("shop_moved", "/var/run/netns/moved2", "10.1.0.4")
    r = Reconciler(leftover={p.uid: p for p in (keep, gone, moved_old)})
    plan = r.plan({keep.uid: keep, moved_new.uid: moved_new})
    assert plan == Plan(unenroll=(gone, moved_old), enroll=(keep, moved_new))
    for p in plan.unenroll:
        r.unenroll_succeeded(p)
    for p in plan.enroll:
        r.enroll_succeeded(p)
    assert r.leftover == {}
    assert r.known() == {keep.uid: keep, moved_new.uid: moved_new}
    assert not r.plan({keep.uid: keep, moved_new.uid: moved_new})


def test_unenroll_of_old_ref_keeps_the_new_enrollment() -> None:
    r = Reconciler(leftover={"shop_a": ref("a")})
    new = PodRef("shop_a", "/var/run/netns/a2", "10.1.0.2")
    r.enroll_succeeded(new)
    r.unenroll_succeeded(ref("a"))
    assert r.enrolled == {"shop_a": new}


def test_failed_enroll_of_a_new_ref_keeps_the_old_ref_enrolled() -> None:
    # The old ref's unenroll failed, so the datapath still holds it: it must stay on record.
    r = Reconciler()
    old, new = ref("a"), PodRef("shop_a", "/var/run/netns/a2", "10.1.0.2")
    r.enroll_succeeded(old)
    r.enroll_failed(new, "already enrolled with netns /var/run/netns/a")
    assert r.enrolled == {old.uid: old}
    assert r.plan({new.uid: new}) == Plan(unenroll=(old,), enroll=(new,))


def test_served_failed_pod_stays_known_and_is_retried_or_released() -> None:
    r = Reconciler()
    a = ref("a")
    r.serve_failed(a, "serve failed")
    assert r.enrolled == {} and r.known() == {a.uid: a}
    assert r.plan({a.uid: a}) == Plan(enroll=(a,))
    assert r.plan({}) == Plan(unenroll=(a,))


def test_plan_drops_failures_of_pods_neither_wanted_nor_held() -> None:
    r = Reconciler()
    a, b, c = ref("a"), ref("b", "10.1.0.3"), ref("c", "10.1.0.4")
    r.enroll_failed(a, "no netns")
    r.enroll_succeeded(b)
    r.unenroll_failed(b, "busy")
    r.enroll_failed(c, "no netns")
    r.plan({c.uid: c})
    assert set(r.failures) == {b.uid, c.uid}  # b still holds datapath state, c is still wanted
