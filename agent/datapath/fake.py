"""In-memory :class:`~agent.datapath.interface.Datapath` for unit tests: no kernel, no sockets.

It mirrors the real datapath's rules: idempotent enroll/unenroll, an enrolled key refuses another
ref, fail closed on unknown destinations, entries of a pod dropped on unenroll. ``capture()``
plays the role of connect4 + sockops for one connection.
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

from agent.datapath import abi
from agent.datapath.bcc_datapath import check_name, same_pod
from agent.datapath.errors import DatapathError
from agent.datapath.interface import EnrolledPod, PodRef


class FakeDatapath:
    """A datapath that keeps its maps in dicts."""

    def __init__(self) -> None:
        self.node: str | None = None
        self.pod_cgroup: Path | None = None
        self.pods: dict[str, EnrolledPod] = {}
        self.orig_dst_by_tuple: dict[tuple[int, int], tuple[str, int]] = {}
        self.inbound_listener: dict[str, str] = {}  # pod IP → uid of the pod whose 15006 listener it is
        self._cookies = itertools.count(4096)
        self._counters = dict.fromkeys(abi.COUNTERS, 0)

    def load(self, node: str, pod_cgroup: Path) -> None:
        check_name("node", node)
        if self.node not in (None, node):
            raise DatapathError(f"node {node}", f"datapath already loaded for node {self.node}")
        self.node, self.pod_cgroup = node, pod_cgroup

    def _loaded(self) -> None:
        if self.node is None:
            raise DatapathError("datapath", "not loaded: call load() first")

    def enroll(self, pod: PodRef) -> EnrolledPod:
        self._loaded()
        check_name("pod uid", pod.uid)
        try:
            ipaddress.IPv4Address(pod.ip)
        except ValueError as exc:
            raise DatapathError(f"pod {pod.uid}", f"ip {pod.ip!r} is not an IPv4 address") from exc
        if pod.uid in self.pods:
            return same_pod(self.pods[pod.uid], pod)
        clash = [p.pod.uid for p in self.pods.values() if p.pod.ip == pod.ip]
        if clash:
            raise DatapathError(f"pod {pod.uid}", f"ip {pod.ip} already belongs to enrolled pod {clash[0]}")
        used = {p.pod_index for p in self.pods.values()}
        index = next(i for i in range(abi.MAX_PODS + 1) if i not in used)
        if index >= abi.MAX_PODS:
            raise DatapathError(f"pod {pod.uid}", f"node already has {abi.MAX_PODS} enrolled pods")
        ep = EnrolledPod(pod=pod, netns_cookie=next(self._cookies), pod_index=index)
        self.pods[pod.uid] = ep
        self.inbound_listener[pod.ip] = pod.uid
        return ep

    def unenroll(self, pod: PodRef) -> None:
        self._loaded()
        ep = self.pods.pop(pod.uid, None)
        if ep is not None:
            # the entry of the enrolled ref (the real map's closes with its listener), never pod.ip's
            self.inbound_listener.pop(ep.pod.ip, None)
            for key in [k for k in self.orig_dst_by_tuple if k[0] == ep.netns_cookie]:
                del self.orig_dst_by_tuple[key]

    def capture(self, pod_uid: str, local_port: int, dst: tuple[str, int]) -> bool:
        """What connect4 + sockops do for a TCP connect from ``pod_uid``; False when untouched."""
        ep = self.pods.get(pod_uid)
        if ep is None:
            return False
        if ipaddress.IPv4Address(dst[0]).is_loopback:
            self._counters["connect_loopback"] += 1
            return False
        self.orig_dst_by_tuple[(ep.netns_cookie, local_port)] = dst
        self._counters["connect_redirected"] += 1
        self._counters["sockops_rekeyed"] += 1
        return True

    def original_destination(self, netns_cookie: int, peer: tuple[str, int]) -> tuple[str, int] | None:
        try:
            ipaddress.IPv4Address(peer[0])  # loopback, or the pod IP an app bound (as bcc's)
        except ValueError:
            return None
        return self.orig_dst_by_tuple.get((netns_cookie, peer[1]))

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def uninstall(self, node: str) -> None:
        if self.node == node:
            self.node, self.pod_cgroup = None, None
            self.pods.clear()
            self.orig_dst_by_tuple.clear()
            self.inbound_listener.clear()
