"""E2e: the real eBPF datapath captures enrolled pods' traffic in a mini topology (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dpnet import CLIENT, ECHO_SERVER, DpNet, Pod, assert_eventually, sh

from agent.datapath import DatapathError, PodRef, abi, bpfsys
from agent.datapath.bcc_datapath import BccDatapath
from agent.datapath.interface import EnrolledPod
from agent.relay import Relay

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, cgroups, eBPF"),
]
T = TypeVar("T")
VIP = ("10.96.0.10", 8000)


class LoopThread:
    """An asyncio loop on a thread, for the relay; datapath calls stay on the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._t.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._t.join(5)
        self.loop.close()


class Lab:
    """The topology, a loaded datapath and a relay."""

    def __init__(self) -> None:
        self.net = DpNet()
        self.dp = BccDatapath()
        self.loop = LoopThread()
        self.relay = Relay(self.dp, vips={VIP: (self.net.pods["server"].ip, 8000)})
        self.dp.load(self.net.node, self.net.pod_cgroup)

    def pod(self, name: str) -> Pod:
        return self.net.pods[name]

    def ref(self, name: str) -> PodRef:
        p = self.pod(name)
        return PodRef(uid=f"uid-{name}", netns_path=p.netns_path, ip=p.ip)

    def enroll(self, name: str) -> EnrolledPod:
        ep = self.dp.enroll(self.ref(name))
        self.loop.run(self.relay.serve(ep))
        return ep

    def echo_server(self, name: str, port: int = 8000) -> subprocess.Popen[str]:
        proc = self.net.run_in_pod(self.pod(name), ECHO_SERVER, str(port))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def connect(self, name: str, ip: str, port: int, msg: str = "hello") -> dict[str, Any]:
        return self.net.run_json(self.pod(name), CLIENT, ip, str(port), msg)

    def close(self) -> None:
        try:
            self.loop.run(self.relay.stop())
        finally:
            self.loop.close()
            try:
                self.dp.uninstall(self.net.node)
            finally:
                self.net.close()


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def test_enrolled_client_goes_through_relay_and_sees_dialled_address(lab: Lab) -> None:
    lab.enroll("client")
    lab.enroll("server")
    lab.echo_server("server")
    server = lab.pod("server")
    out = lab.connect("client", server.ip, 8000, "ping-1")
    assert out["getpeername"] == [server.ip, 8000]
    assert '"data": "ping-1"' in out["reply"]
    relayed = lab.relay.relayed()
    outbound = [c for c in relayed if c.direction == "outbound"]
    assert [(c.pod_uid, c.original_dst, c.peer[1]) for c in outbound] == [
        ("uid-client", (server.ip, 8000), out["local"][1])
    ]
    inbound = [c for c in relayed if c.direction == "inbound"]
    assert [(c.pod_uid, c.original_dst) for c in inbound] == [("uid-server", (server.ip, 8000))]
    counters = lab.dp.counters()
    assert counters["connect_redirected"] >= 1
    assert counters["sockops_rekeyed"] >= 1
    assert counters["getpeername_restored"] >= 1
    assert counters["sklookup_redirected"] >= 1


def test_connection_to_vip_is_captured_and_relayed_to_backend(lab: Lab) -> None:
    lab.enroll("client")
    lab.echo_server("server")
    out = lab.connect("client", *VIP[:1], VIP[1], "to-vip")
    assert out["getpeername"] == list(VIP)
    assert '"data": "to-vip"' in out["reply"]
    (conn,) = lab.relay.relayed()
    assert conn.original_dst == VIP
    assert conn.upstream == (lab.pod("server").ip, 8000)


def test_outsider_traffic_is_untouched(lab: Lab) -> None:
    lab.enroll("client")
    lab.echo_server("server")  # server not enrolled: only the outsider's own path matters
    before = lab.dp.counters()["connect_redirected"]
    out = lab.connect("outsider", lab.pod("server").ip, 8000, "plain")
    assert f'"peer": ["{lab.pod("outsider").ip}"' in out["reply"]
    assert lab.relay.relayed() == []
    assert lab.dp.counters()["connect_redirected"] == before


def test_inbound_from_outsider_lands_on_15006_with_original_port(lab: Lab) -> None:
    lab.enroll("server")
    lab.echo_server("server", 8123)
    server = lab.pod("server")
    out = lab.connect("outsider", server.ip, 8123, "in")
    assert '"data": "in"' in out["reply"]
    (conn,) = lab.relay.relayed()
    assert conn.direction == "inbound"
    assert conn.original_dst == (server.ip, 8123)
    assert conn.peer[0] == lab.pod("outsider").ip


def test_unknown_original_destination_is_closed(lab: Lab) -> None:
    lab.enroll("client")
    out = lab.connect("client", "127.0.0.1", abi.PORT_OUTBOUND, "direct")
    assert out["reply"] == ""  # closed (FIN or RST) without a byte relayed
    assert_eventually(lambda: _check(lab.relay.stats["fail_closed"] == 1))
    assert lab.relay.relayed() == []


def _check(cond: bool) -> None:
    assert cond


def _node_state(lab: Lab) -> tuple[int, int, int]:
    """(programs pinned for the node, links using them, cgroup attachments on the pod cgroup)."""
    pdir = lab.dp.node_dir(lab.net.node) / "progs"
    ids = {bpfsys.bpftool_json("prog", "show", "pinned", str(p))["id"] for p in pdir.iterdir()}
    links = [lk for lk in bpfsys.bpftool_json("link", "show") or [] if lk.get("prog_id") in ids]
    cg = bpfsys.bpftool_json("cgroup", "show", str(lab.net.pod_cgroup)) or []
    return len(ids), len(links), len(cg)


def test_agent_restart_reuses_pins_without_duplicates(lab: Lab) -> None:
    lab.dp.enroll(lab.ref("client"))
    before = _node_state(lab)
    assert before == (4, 4, 3)  # 4 programs; 3 cgroup links + 1 sk_lookup link
    lab.dp.close()
    lab.dp = BccDatapath()
    lab.relay = Relay(lab.dp)
    lab.dp.load(lab.net.node, lab.net.pod_cgroup)
    lab.enroll("client")
    assert _node_state(lab) == before
    lab.echo_server("server")
    out = lab.connect("client", lab.pod("server").ip, 8000, "after-restart")
    assert '"data": "after-restart"' in out["reply"]


def test_uninstall_leaves_nothing_pinned_or_attached(lab: Lab) -> None:
    lab.dp.enroll(lab.ref("client"))
    pdir = lab.dp.node_dir(lab.net.node) / "progs"
    ids = {bpfsys.bpftool_json("prog", "show", "pinned", str(p))["id"] for p in pdir.iterdir()}
    lab.dp.uninstall(lab.net.node)
    assert not lab.dp.node_dir(lab.net.node).exists()
    assert (bpfsys.bpftool_json("cgroup", "show", str(lab.net.pod_cgroup)) or []) == []

    def progs_gone() -> None:
        live = {p["id"] for p in bpfsys.bpftool_json("prog", "show")}
        assert not ids & live

    assert_eventually(progs_gone)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_fds() -> set[tuple[str, str]]:
    """(fd, what it refers to) for this process. A descriptor left open shows as an entry that was
    not there before, even when it got the number of one that something else (the collector
    finalizing an earlier test's socket, another thread) closed meanwhile: counting them cannot tell
    those apart, and failed when an unrelated descriptor closed during the loop."""
    fds: set[tuple[str, str]] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return fds


def test_enroll_unenroll_100_netns_leaks_nothing(lab: Lab) -> None:
    lab.dp.enroll(lab.ref("client"))  # warm up allocations once
    lab.dp.unenroll(lab.ref("client"))
    fds0 = _open_fds()
    rss0 = _rss_kib()
    links0 = _node_state(lab)[1]
    for i in range(100):
        ns = f"{lab.net.prefix}-churn"
        sh("ip", "netns", "add", ns)
        try:
            ref = PodRef(uid=f"churn-{i}", netns_path=f"/var/run/netns/{ns}", ip=f"10.252.0.{1 + i}")
            lab.dp.enroll(ref)
            assert lab.dp.map_entries("pod_by_netns") == 1
            lab.dp.unenroll(ref)
        finally:
            sh("ip", "netns", "del", ns)
    assert lab.dp.map_entries("pod_by_netns") == 0
    assert _open_fds() - fds0 == set()  # nothing opened by the churn is still open
    assert _node_state(lab)[1] == links0
    assert not list((lab.dp.node_dir(lab.net.node) / "links").glob("sk_lookup-*"))
    assert _rss_kib() - rss0 < 16 * 1024


def test_bad_pod_gives_clear_error_and_datapath_keeps_working(lab: Lab) -> None:
    missing = PodRef(uid="ghost", netns_path="/var/run/netns/nmdp-does-not-exist", ip="10.251.9.9")
    with pytest.raises(DatapathError, match="cannot open"):
        lab.dp.enroll(missing)
    with pytest.raises(DatapathError, match="not an IPv4"):
        lab.dp.enroll(PodRef(uid="bad-ip", netns_path=lab.pod("client").netns_path, ip="::1"))
    assert lab.dp.map_entries("pod_by_netns") == 0
    lab.enroll("client")
    lab.echo_server("server")
    out = lab.connect("client", lab.pod("server").ip, 8000, "still-works")
    assert '"data": "still-works"' in out["reply"]
