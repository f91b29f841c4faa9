"""`agent.datapath.source_ip` in a real netns: the set-up, its undoing, and that it is what makes a
transparent connection from a foreign IP work (the app's answers come back over `lo`).

One netns with `lo` and a veth `eth0` whose default route points off-host, so an answer that is
not steered back leaves through `eth0` and the connection never completes. Removed by the fixture,
also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

from agent.datapath import source_ip
from agent.datapath.netns import in_netns

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, policy routing"),
]
POD_IP = "10.201.7.5"
FOREIGN_IP = "10.201.9.9"  # another pod's address, not on this netns
T = TypeVar("T")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


@dataclass
class Pod:
    netns_path: str

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` inside the netns (this thread enters it and comes back, `in_netns`)."""
        with in_netns(self.netns_path):
            return fn()

    def sysctl(self) -> str:
        """Both sysctls the set-up owns, "1" or "0" when they agree."""
        values = {self.run(lambda p=p: p.read_text().strip())  # type: ignore[misc]
                  for p in (source_ip.FWMARK_ACCEPT, source_ip.FWMARK_REFLECT)}
        return values.pop() if len(values) == 1 else f"mixed {sorted(values)}"

    def ip(self, *args: str) -> str:
        """`ip -n <this netns> ARGS`' output."""
        proc = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True, check=True)
        return proc.stdout

    def rules(self) -> str:
        return self.ip("rule")

    @property
    def name(self) -> str:
        return os.path.basename(self.netns_path)


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag = uuid.uuid4().hex[:6]
    ns, host_end = f"nmsip-{tag}", f"nmsip{tag}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "10.201.7.1", "dev", "eth0", "onlink")
        yield Pod(f"/var/run/netns/{ns}")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "link", "del", host_end)
        sh("ip", "netns", "del", ns)


def transparent_exchange(pod: Pod) -> str:
    """An app on the pod IP, a transparent connection to it from FOREIGN_IP: the peer address the
    app saw (TimeoutError when the answers do not come back)."""
    return pod.run(lambda: source_ip.exchange(POD_IP, FOREIGN_IP, 1.5))


def test_install_makes_a_transparent_connection_work_and_remove_undoes_it(pod: Pod) -> None:
    assert pod.sysctl() == "0" and not pod.run(source_ip.installed)
    with pytest.raises(TimeoutError):  # the control: without the set-up the SYN-ACK leaves via eth0
        transparent_exchange(pod)

    pod.run(source_ip.install)
    pod.run(source_ip.install)  # idempotent: one rule, one route
    assert pod.run(source_ip.installed) and pod.sysctl() == "1"
    assert pod.rules().count(f"fwmark {source_ip.MARK:#x}/{source_ip.MASK:#x} lookup {source_ip.TABLE}") == 1
    assert transparent_exchange(pod) == FOREIGN_IP

    assert pod.run(source_ip.remove) is True
    assert pod.run(source_ip.remove) is False  # nothing left to undo
    assert pod.sysctl() == "0" and not pod.run(source_ip.installed)
    assert f"lookup {source_ip.TABLE}" not in pod.rules()
    with pytest.raises(TimeoutError):
        transparent_exchange(pod)


def test_remove_leaves_a_netns_it_never_set_up_alone(pod: Pod) -> None:
    for setting in (source_ip.FWMARK_ACCEPT, source_ip.FWMARK_REFLECT):  # somebody else's settings
        pod.run(lambda p=setting: p.write_text("1"))  # type: ignore[misc]
    assert pod.run(source_ip.remove) is False
    assert pod.sysctl() == "1"
    # a half-done install (the route, no rule): the route in our table goes, the sysctl stays
    pod.ip("route", "add", "local", "default", "dev", "lo", "table", str(source_ip.TABLE))
    assert pod.run(source_ip.remove) is False
    assert pod.ip("route", "show", "table", str(source_ip.TABLE)).strip() == "" and pod.sysctl() == "1"


def test_the_sysctl_is_per_netns(pod: Pod) -> None:
    before = source_ip.FWMARK_ACCEPT.read_text().strip()  # this thread's (the host's) netns
    pod.run(source_ip.install)
    try:
        assert source_ip.FWMARK_ACCEPT.read_text().strip() == before
    finally:
        pod.run(source_ip.remove)


def test_the_port_is_chosen_at_connect_so_one_caller_ip_is_not_limited_to_the_port_range(pod: Pod) -> None:
    """150 connections held open from one caller IP to two apps, with 100 local ports: each port may
    serve one connection per destination. Chosen at bind, the 101st bind failed (EADDRINUSE)."""
    sh("ip", "netns", "exec", pod.name, "sysctl", "-q", "net.ipv4.ip_local_port_range=40000 40099")
    pod.run(source_ip.install)

    def run() -> tuple[int, int]:
        apps = [socket.socket() for _ in range(2)]
        held: list[socket.socket] = []
        try:
            for app in apps:
                app.bind((POD_IP, 0))
                app.listen(256)
            for i in range(150):
                sock = socket.socket()
                held.append(sock)
                source_ip.transparent(sock, FOREIGN_IP)
                sock.settimeout(2)
                sock.connect(apps[i % 2].getsockname())
            assert {s.getsockname()[0] for s in held} == {FOREIGN_IP}
            return len(held), len({s.getsockname()[1] for s in held})
        finally:
            for s in (*held, *apps):
                s.close()

    opened, ports = pod.run(run)
    assert opened == 150 and ports <= 100
