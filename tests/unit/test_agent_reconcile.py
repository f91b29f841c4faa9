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
    """The fake, plus the real datapath's refusal of a netns path that does not exist; counts calls
    (``unenrolled``: the refs released), fails the next unenroll of the pods in ``fail_unenroll``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.unenrolled: list[PodRef] = []
        self.explode: set[str] = set()
        self.fail_unenroll: set[str] = set()

    def enroll(self, pod: PodRef) -> EnrolledPod:
        self.calls.append(("enroll", pod.uid))
        if pod.uid in self.explode:
            raise RuntimeError("unexpected datapath bug")
        if pod.uid not in self.pods and not Path(pod.netns_path).exists():
            raise DatapathError(f"netns {pod.netns_path}", "cannot open: No such file or directory")
        return super().enroll(pod)

    def unenroll(self, pod: PodRef) -> None:
        self.calls.append(("unenroll", pod.uid))
        if pod.uid in self.fail_unenroll:
            self.fail_unenroll.discard(pod.uid)
            raise RuntimeError("injected unenroll failure")
        super().unenroll(pod)
        self.unenrolled.append(pod)


class FlakyRelay(Relay):
    """The relay, failing the next serve of the pods in ``fail_serve``; with ``hold_stop`` set,
    stopping a pod waits for that event (a release in progress)."""

    def __init__(self, dp: FakeDatapath) -> None:
        super().__init__(dp)
        self.fail_serve: set[str] = set()
        self.hold_stop: asyncio.Event | None = None
        self.stopping = asyncio.Event()

    async def serve(self, ep: EnrolledPod) -> None:
        if ep.pod.uid in self.fail_serve:
            self.fail_serve.discard(ep.pod.uid)
            raise OSError("injected serve failure")
        await super().serve(ep)

    async def stop(self, pod_uid: str | None = None) -> None:
        self.stopping.set()
        if self.hold_stop is not None and pod_uid is not None:
            await self.hold_stop.wait()
        await super().stop(pod_uid)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dp = NetnsCheckingDatapath()
        self.dp.load(NODE, tmp / "cgroup")
        self.relay = FlakyRelay(self.dp)
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


async def test_stop_while_releasing_a_changed_pod_keeps_its_old_netns_on_record(env: Env) -> None:
    # The record is what a restarted agent unenrolls: while the old netns still holds the pod's
    # datapath state it must name that netns, not the new one.
    old = env.wl("a", "10.1.0.2", netns=env.netns("a-sandbox-1"))
    env.push([old], snapshot=True)
    await env.reconcile()
    new = env.wl("a", "10.1.0.2", netns=env.netns("a-sandbox-2"))  # the sandbox was recreated
    env.push([new])
    env.relay.hold_stop = asyncio.Event()
    task = asyncio.create_task(env.reconcile())
    await asyncio.wait_for(env.relay.stopping.wait(), 5)
    task.cancel()  # SIGTERM mid-release: main.run cancels the reconcile task
    await asyncio.gather(task, return_exceptions=True)
    assert env.dp.unenrolled == []
    assert env.store.load() == {"shop_a": PodRef("shop_a", old.netns, "10.1.0.2")}

    env2 = Env(env.tmp)  # the next process releases the old netns, then enrolls the new one
    env2.agent.restore(leftover_pods(NODE, env2.store, env.tmp / "bpffs"))
    env2.push([new], snapshot=True)
    await env2.reconcile()
    assert env2.dp.unenrolled == [PodRef("shop_a", old.netns, "10.1.0.2")]
    assert env2.dp.pods["shop_a"].pod == PodRef("shop_a", new.netns, "10.1.0.2")
    assert env2.store.load() == {"shop_a": PodRef("shop_a", new.netns, "10.1.0.2")}


async def test_record_names_the_new_netns_once_the_old_one_is_released(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.push([env.wl("a", "10.1.0.2", netns=env.netns("a-sandbox-1"))], snapshot=True)
    await env.reconcile()
    new = env.wl("a", "10.1.0.2", netns=env.netns("a-sandbox-2"))
    env.push([new])
    recorded: list[dict[str, PodRef]] = []
    enroll = env.dp.enroll
    monkeypatch.setattr(env.dp, "enroll", lambda pod: (recorded.append(env.store.load()), enroll(pod))[1])
    await env.reconcile()
    # While the new ref is being enrolled (a crash here), its netns may get pins: it is on record.
    assert recorded == [{"shop_a": PodRef("shop_a", new.netns, "10.1.0.2")}]
    assert env.dp.unenrolled[-1].netns_path == env.netns("a-sandbox-1")


async def test_changed_pod_is_not_enrolled_until_its_old_enrollment_is_released(env: Env) -> None:
    # The datapath enrolls by key: enrolling the new ref while the old one is held would leave the
    # old netns captured and the new one not, while the agent believes the new one enrolled.
    env.push([env.wl("a", "10.1.0.2", netns=env.netns("a-sandbox-1"))], snapshot=True)
    await env.reconcile()
    new = env.wl("a", "10.1.0.3", netns=env.netns("a-sandbox-2"))
    want = PodRef("shop_a", new.netns, "10.1.0.3")
    env.dp.fail_unenroll.add("shop_a")
    env.push([new])
    await env.reconcile()
    assert env.dp.calls[-1] == ("unenroll", "shop_a")  # the enroll of the new ref waits
    assert env.agent.reconciler.enrolled["shop_a"].netns_path.endswith("a-sandbox-1")
    assert "injected unenroll failure" in env.agent.reconciler.failures["shop_a"]
    await env.reconcile()  # the retry releases the old ref, then enrolls the new one
    assert env.agent.reconciler.enrolled == {"shop_a": want}
    assert env.dp.pods["shop_a"].pod == want
    assert env.agent.reconciler.failures == {}


async def test_pod_whose_serve_failed_stays_known_and_is_released_when_removed(env: Env) -> None:
    # The datapath enrolled it: forgetting it would leave its state there for good, and a new pod
    # with its IP would be refused ("already belongs to enrolled pod").
    a = env.wl("a", "10.1.0.2")
    env.relay.fail_serve.add("shop_a")
    env.push([a], snapshot=True)
    await env.reconcile()
    assert "injected serve failure" in env.agent.reconciler.failures["shop_a"]
    assert env.agent.reconciler.leftover == {"shop_a": PodRef("shop_a", a.netns, "10.1.0.2")}
    assert set(env.store.load()) == {"shop_a"}
    env.push([env.wl("b", "10.1.0.2")], removals=(resource_key(a),))  # a deleted, b gets its IP
    await env.reconcile()
    assert env.enrolled() == {"shop_b"}
    assert env.agent.reconciler.failures == {}
    assert set(env.store.load()) == {"shop_b"}


async def test_pod_whose_serve_failed_is_served_by_the_next_pass(env: Env) -> None:
    env.relay.fail_serve.add("shop_a")
    env.push([env.wl("a", "10.1.0.2")], snapshot=True)
    await env.reconcile()
    await env.reconcile()
    # the second pass gets the pod the datapath holds (idempotent enroll) and serves it
    assert env.dp.calls == [("enroll", "shop_a"), ("enroll", "shop_a")]
    assert env.agent.stats["enrolled"] == 1 and env.agent.stats["enroll_errors"] == 1
    assert set(env.agent.reconciler.enrolled) == {"shop_a"}
    assert env.agent.reconciler.leftover == {} and env.agent.reconciler.failures == {}


async def test_releasing_a_leftover_keeps_the_listener_of_the_pod_now_holding_its_ip(env: Env) -> None:
    # After a restart a leftover whose netns is gone cannot be re-enrolled; another pod gets its IP.
    # Releasing the leftover must not drop that pod's inbound_listener entry (SK_DROP of its SYNs).
    gone = str(env.tmp / "netns" / "a-gone")
    env.store.save({"shop_a": PodRef("shop_a", gone, "10.1.0.2")})
    env.agent.restore(leftover_pods(NODE, env.store, env.tmp / "bpffs"))
    a = env.wl("a", "10.1.0.2", netns=gone)
    env.push([a, env.wl("b", "10.1.0.2")], snapshot=True)
    await env.reconcile()
    assert env.enrolled() == {"shop_b"}
    env.push([], removals=(resource_key(a),))
    await env.reconcile()
    assert env.dp.unenrolled == [PodRef("shop_a", gone, "10.1.0.2")]
    assert env.dp.inbound_listener == {"10.1.0.2": "shop_b"}


async def test_failures_of_pods_no_longer_wanted_are_dropped(env: Env) -> None:
    ghost = env.wl("ghost", "10.1.0.9", netns=str(env.tmp / "netns" / "ghost"))
    env.push([ghost, env.wl("a", "10.1.0.2")], snapshot=True)
    await env.reconcile()
    assert set(env.agent.reconciler.failures) == {"shop_ghost"}
    env.push([], removals=(resource_key(ghost),))
    await env.reconcile()
    assert env.agent.reconciler.failures == {}


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
