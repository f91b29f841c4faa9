"""NodeAgent over the fake datapath: pushes in, enrollments out, errors logged and retried."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.config_client import ConfigUpdate
from agent.datapath.errors import DatapathError
from agent.datapath.fake import FakeDatapath
from agent.datapath.interface import EnrolledPod, PodRef
from agent.enrolled_store import EnrolledStore
from agent.main import NodeAgent, leftover_pods, pinned_pod_keys, uninstall
from agent.relay import Relay
from api.resources import Endpoint, Resource, Service, ServicePort, TunnelProtocol, Workload, resource_key

NODE = "node-a"


class NetnsCheckingDatapath(FakeDatapath):
    """The fake, plus the real datapath's refusal of a netns path that does not exist; counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.explode: set[str] = set()

    def enroll(self, pod: PodRef) -> EnrolledPod:
        self.calls.append(("enroll", pod.uid))
        if pod.uid in self.explode:
            raise RuntimeError("unexpected datapath bug")
        if pod.uid not in self.pods and not Path(pod.netns_path).exists():
            raise DatapathError(f"netns {pod.netns_path}", "cannot open: No such file or directory")
        return super().enroll(pod)

    def unenroll(self, pod: PodRef) -> None:
        self.calls.append(("unenroll", pod.uid))
        super().unenroll(pod)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dp = NetnsCheckingDatapath()
        self.dp.load(NODE, tmp / "cgroup")
        self.relay = Relay(self.dp)
        self.store = EnrolledStore(tmp / "state" / NODE)
        self.agent = NodeAgent(NODE, self.dp, self.relay, self.store, resync_interval=0.05)
        self.nonce = 0

    def netns(self, name: str) -> str:
        p = self.tmp / "netns" / name
        p.parent.mkdir(exist_ok=True)
        p.touch()
        return str(p)

    def wl(self, name: str, ip: str, *, protocol: TunnelProtocol = TunnelProtocol.HBONE,
           netns: str | None = None, node: str = NODE) -> Workload:
        return Workload(f"shop/{name}", name, "shop", "sa", node, (ip,), protocol=protocol,
                        netns=self.netns(name) if netns is None else netns)

    def push(self, upserts: list[Resource], removals: tuple[str, ...] = (), snapshot: bool = False) -> None:
        self.nonce += 1
        update = ConfigUpdate(tuple((resource_key(r), "v", r) for r in upserts), tuple(removals), snapshot,
                              "cluster.local", str(self.nonce))
        assert self.agent.on_update(update) is None

    async def reconcile(self) -> None:
        await self.agent.reconcile()

    def enrolled(self) -> set[str]:
        return set(self.dp.pods)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def test_snapshot_enrolls_this_nodes_hbone_pods(env: Env) -> None:
    env.push([env.wl("a", "10.1.0.2"), env.wl("b", "10.1.0.3"),
              env.wl("plain", "10.1.0.4", protocol=TunnelProtocol.NONE)], snapshot=True)
    await env.reconcile()
    assert env.enrolled() == {"shop_a", "shop_b"}
    assert set(env.store.load()) == {"shop_a", "shop_b"}


async def test_nothing_happens_before_the_first_snapshot(env: Env) -> None:
    env.push([env.wl("a", "10.1.0.2")], snapshot=False)
    await env.reconcile()
    assert env.dp.calls == []


async def test_identical_pushes_do_not_touch_the_datapath_again(env: Env) -> None:
    a = env.wl("a", "10.1.0.2")
    env.push([a], snapshot=True)
    await env.reconcile()
    calls = list(env.dp.calls)
    env.push([a], snapshot=True)
    env.push([a])
    await env.reconcile()
    await env.reconcile()
    assert env.dp.calls == calls


async def test_removal_and_protocol_none_unenroll(env: Env) -> None:
    a, b = env.wl("a", "10.1.0.2"), env.wl("b", "10.1.0.3")
    env.push([a, b], snapshot=True)
    await env.reconcile()
    env.push([], removals=("Workload/shop/a",))
    env.push([env.wl("b", "10.1.0.3", protocol=TunnelProtocol.NONE)])
    await env.reconcile()
    assert env.enrolled() == set()
    assert env.store.load() == {}
    assert ("unenroll", "shop_a") in env.dp.calls and ("unenroll", "shop_b") in env.dp.calls


async def test_missing_netns_is_logged_the_rest_enrolls_and_the_next_push_retries(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    ghost = env.wl("ghost", "10.1.0.9", netns=str(env.tmp / "netns" / "ghost"))
    env.push([env.wl("a", "10.1.0.2"), ghost], snapshot=True)
    with caplog.at_level(logging.ERROR):
        await env.reconcile()
    assert env.enrolled() == {"shop_a"}
    assert "shop_ghost" in env.agent.reconciler.failures
    (line,) = [r.getMessage() for r in caplog.records if "pod_enroll_failed" in r.getMessage()]
    assert "pod=shop_ghost" in line and "No such file or directory" in line
    env.netns("ghost")  # the pod's netns appears; the next push retries
    env.push([env.wl("b", "10.1.0.3")])
    await env.reconcile()
    assert env.enrolled() == {"shop_a", "shop_b", "shop_ghost"}
    assert env.agent.reconciler.failures == {}


async def test_vanished_netns_of_an_enrolled_pod_is_released(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    a = env.wl("a", "10.1.0.2")
    env.push([a, env.wl("b", "10.1.0.3")], snapshot=True)
    await env.reconcile()
    Path(a.netns).unlink()
    with caplog.at_level(logging.ERROR):
        await env.reconcile()
    assert env.enrolled() == {"shop_b"}
    assert any("pod_netns_vanished pod=shop_a" in r.getMessage() for r in caplog.records)
    assert "shop_a" in env.agent.reconciler.failures


async def test_bad_input_never_raises(env: Env) -> None:
    weird = Workload("shop/we ird/x", "x", "shop", "sa", NODE, ("not-an-ip",), netns=env.netns("x"))
    noip = Workload("shop/noip", "noip", "shop", "sa", NODE, (), netns=env.netns("noip"))
    clash1, clash2 = env.wl("c1", "10.1.0.7"), env.wl("c2", "10.1.0.7")
    env.push([weird, noip, clash1, clash2, env.wl("ok", "10.1.0.2")], snapshot=True)
    await env.reconcile()
    assert env.enrolled() == {"shop_c1", "shop_ok"}
    assert set(env.agent.reconciler.failures) == {"shop_c2"}  # IP clash: reported by the datapath


async def test_unexpected_datapath_exception_is_counted_and_retried(env: Env) -> None:
    env.dp.explode.add("shop_a")
    env.push([env.wl("a", "10.1.0.2")], snapshot=True)
    await env.reconcile()
    assert env.agent.stats["enroll_errors"] == 1
    env.dp.explode.clear()
    await env.reconcile()
    assert env.enrolled() == {"shop_a"}


async def test_run_loop_retries_failures_without_a_push(env: Env) -> None:
    env.dp.explode.add("shop_a")
    task = asyncio.create_task(env.agent.run())
    try:
        env.push([env.wl("a", "10.1.0.2")], snapshot=True)
        for _ in range(100):
            if env.agent.stats["enroll_errors"]:
                break
            await asyncio.sleep(0.01)
        env.dp.explode.clear()
        for _ in range(100):
            if env.enrolled():
                break
            await asyncio.sleep(0.01)
        assert env.enrolled() == {"shop_a"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_services_become_the_relays_vip_map(env: Env) -> None:
    svc = Service("web", "shop", "10.96.0.10", (ServicePort(80, 8080),), (Endpoint("shop/a", "10.1.0.2"),))
    env.push([svc], snapshot=True)
    assert env.relay._vips == {("10.96.0.10", 80): ("10.1.0.2", 8080)}
    env.push([], removals=(resource_key(svc),))
    assert env.relay._vips == {}


async def test_restart_reconciles_leftovers_with_the_first_snapshot(env: Env) -> None:
    keep, gone = env.wl("keep", "10.1.0.2"), env.wl("gone", "10.1.0.3")
    env.push([keep, gone], snapshot=True)
    await env.reconcile()
    # A new process: new datapath object (pins would be re-used), leftovers from the state file.
    env2 = Env(env.tmp)
    env2.agent.restore(leftover_pods(NODE, env2.store, env.tmp / "bpffs"))
    assert set(env2.agent.reconciler.leftover) == {"shop_keep", "shop_gone"}
    await env2.reconcile()
    assert env2.dp.calls == []  # no snapshot yet: keep everything as it is
    env2.push([keep], snapshot=True)
    await env2.reconcile()
    assert env2.dp.calls == [("unenroll", "shop_gone"), ("enroll", "shop_keep")]
    assert set(env2.store.load()) == {"shop_keep"}
    assert env2.agent.reconciler.leftover == {}


def test_leftovers_include_pinned_links_missing_from_the_state_file(tmp_path: Path) -> None:
    links = tmp_path / "bpffs" / NODE / "links"
    links.mkdir(parents=True)
    for name in ("nm_connect4", "sk_lookup-shop_a", "sk_lookup-shop_b"):
        (links / name).touch()
    store = EnrolledStore(tmp_path / "state" / NODE)
    store.save({"shop_a": PodRef("shop_a", "/var/run/netns/a", "10.1.0.2")})
    assert pinned_pod_keys(NODE, tmp_path / "bpffs") == {"shop_a", "shop_b"}
    assert leftover_pods(NODE, store, tmp_path / "bpffs") == {
        "shop_a": PodRef("shop_a", "/var/run/netns/a", "10.1.0.2"),
        "shop_b": PodRef("shop_b", "", ""),
    }


def test_corrupt_state_file_is_ignored(tmp_path: Path) -> None:
    store = EnrolledStore(tmp_path)
    store.path.write_text("{not json")
    assert store.load() == {}


def test_uninstall_removes_pins_and_state(tmp_path: Path) -> None:
    ndir = tmp_path / "bpffs" / NODE
    for sub, name in (("links", "sk_lookup-x"), ("progs", "nm_connect4"), ("maps", "counters")):
        (ndir / sub).mkdir(parents=True)
        (ndir / sub / name).touch()
    store = EnrolledStore(tmp_path / "state" / NODE)
    store.save({})
    uninstall(NODE, tmp_path / "state", tmp_path / "bpffs")
    assert not ndir.exists()
    assert not store.path.parent.exists()
    uninstall(NODE, tmp_path / "state", tmp_path / "bpffs")  # idempotent
