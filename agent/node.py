"""The node agent's sans-IO core: what the controller pushed, which pods to enroll, the VIP map.

``NodeConfig`` holds the resources of this node's view as the config stream delivered them.
``desired_pods`` turns workloads into the pods this node must capture, ``vip_map`` services into
the relay's VIP table, and ``Reconciler`` diffs desired pods against enrolled ones and records
outcomes. No sockets, no datapath calls: ``agent.main`` executes the plans.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.datapath.interface import PodRef
from api.resources import Resource, Service, TunnelProtocol, Workload

Addr = tuple[str, int]
# Pod keys become bpffs path components (``links/sk_lookup-<key>``). The datapath's check_name
# allows dots, but bpffs refuses any name with a dot (EPERM on lookup and create), so keys have none.
_POD_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def pod_key(workload_uid: str) -> str:
    """The datapath key of a workload: its uid when that is a valid name, else a stable derivative.

    YAML mode uids are ``<namespace>/<name>``. Kubernetes names never hold ``_``, so mapping ``/``
    and ``.`` to ``_`` keeps them unique (``shop/web-1`` → ``shop_web-1``). Anything still invalid
    or too long gets a readable prefix plus a hash.
    """
    if _POD_KEY_RE.match(workload_uid):
        return workload_uid
    mapped = workload_uid.replace("/", "_").replace(".", "_")
    if _POD_KEY_RE.match(mapped):
        return mapped
    digest = hashlib.sha256(workload_uid.encode()).hexdigest()[:12]
    prefix = _BAD_CHARS.sub("-", mapped).lstrip("_-")[:48] or "pod"
    return f"{prefix}-{digest}"


@dataclass(frozen=True, slots=True)
class Skipped:
    """A workload of this node that asks for capture but cannot be enrolled, and why."""

    workload_uid: str
    reason: str


@dataclass(slots=True)
class NodeConfig:
    """The node's view as pushed by the controller, keyed by stream key (``Workload/ns/name``)."""

    resources: dict[str, Resource] = field(default_factory=dict)
    synced: bool = False  # a snapshot arrived: until then, never unenroll anything
    trust_domain: str = ""

    def apply(self, upserts: Iterable[tuple[str, str, Resource]], removals: Iterable[str],
              snapshot: bool, trust_domain: str = "") -> None:
        """Apply one push: a snapshot replaces everything, a delta upserts then removes."""
        if snapshot:
            self.resources.clear()
            self.synced = True
        for key, _version, res in upserts:
            self.resources[key] = res
        for key in removals:
            self.resources.pop(key, None)
        if trust_domain:
            self.trust_domain = trust_domain

    def workloads(self) -> list[Workload]:
        return [r for r in self.resources.values() if isinstance(r, Workload)]

    def services(self) -> list[Service]:
        return [r for r in self.resources.values() if isinstance(r, Service)]


def desired_pods(workloads: Iterable[Workload], node: str) -> tuple[dict[str, PodRef], list[Skipped]]:
    """Pods to enroll on ``node`` (by pod key) and the capture-wanting workloads that cannot be.

    Enrolled: on this node, protocol HBONE, a netns path and an IPv4. ``protocol: NONE`` means
    "not in the mesh" and is not a problem; a missing netns or IPv4 is.
    """
    pods: dict[str, PodRef] = {}
    skipped: list[Skipped] = []
    for w in sorted(workloads, key=lambda w: w.uid):
        if w.node != node or w.protocol != TunnelProtocol.HBONE:
            continue
        if not w.netns:
            skipped.append(Skipped(w.uid, "no netns path (pod annotation nodemesh.io/netns)"))
            continue
        ip = next((a for a in w.ips if _is_ipv4(a)), None)
        if ip is None:
            skipped.append(Skipped(w.uid, f"no IPv4 address in {list(w.ips)}"))
            continue
        key = pod_key(w.uid)
        if key in pods:
            skipped.append(Skipped(w.uid, f"pod key {key} already used by another workload"))
            continue
        pods[key] = PodRef(uid=key, netns_path=w.netns, ip=ip)
    return pods, skipped


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def vip_map(services: Iterable[Service]) -> dict[Addr, Addr]:
    """(VIP, port) → (first IPv4 endpoint, target port) for the placeholder relay.

    The first endpoint is enough until the proxy does real load balancing; a service without an
    IPv4 endpoint gets no entry, so the relay dials the VIP itself and fails visibly.
    """
    out: dict[Addr, Addr] = {}
    for svc in sorted(services, key=lambda s: s.uid):
        if not _is_ipv4(svc.vip):
            continue
        backend = next((e.ip for e in svc.endpoints if _is_ipv4(e.ip)), None)
        if backend is None:
            continue
        for p in svc.ports:
            if p.protocol.upper() == "TCP":
                out[(svc.vip, p.port)] = (backend, p.target_port or p.port)
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do, in order: unenroll first (frees IPs a replacement pod may reuse), then enroll."""

    unenroll: tuple[PodRef, ...] = ()
    enroll: tuple[PodRef, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.unenroll or self.enroll)


@dataclass(slots=True)
class Reconciler:
    """Level-triggered enrollment state of one node.

    ``enrolled``: pods this process enrolled (listeners held). ``leftover``: pods with datapath
    state that nothing serves: those a previous agent process enrolled (their pins survive it),
    and those the datapath enrolled but the proxy failed to serve; each is either enrolled again
    (re-using its pinned link, then served) or unenrolled. ``failures``: pod key → last error,
    retried by the next ``plan``.
    """

    enrolled: dict[str, PodRef] = field(default_factory=dict)
    leftover: dict[str, PodRef] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def plan(self, desired: Mapping[str, PodRef], vanished: Iterable[str] = ()) -> Plan:
        """Diff ``desired`` against what is enrolled; ``vanished``: keys of enrolled pods whose
        netns path no longer exists (they are released, and retried like any failed enroll)."""
        gone = set(vanished)
        unenroll = [ref for key, ref in sorted(self.enrolled.items())
                    if key in gone or desired.get(key) != ref]
        unenroll += [ref for key, ref in sorted(self.leftover.items()) if desired.get(key) != ref]
        released = {r.uid for r in unenroll}
        enroll = [ref for key, ref in sorted(desired.items())
                  if key in released or self.enrolled.get(key) != ref]
        # A failure of a pod neither wanted nor holding datapath state is moot: forget it.
        known = self.known()
        self.failures = {k: e for k, e in self.failures.items() if k in desired or k in known}
        return Plan(tuple(unenroll), tuple(enroll))

    def known(self) -> dict[str, PodRef]:
        """Every pod with datapath state on this node (what a restart must reconcile)."""
        return {**self.leftover, **self.enrolled}

    def enroll_succeeded(self, ref: PodRef) -> None:
        self.enrolled[ref.uid] = ref
        self.leftover.pop(ref.uid, None)
        self.failures.pop(ref.uid, None)

    def enroll_failed(self, ref: PodRef, error: str) -> None:
        # Only this ref: another one under the key (its unenroll failed) still holds the datapath.
        if self.enrolled.get(ref.uid) == ref:
            del self.enrolled[ref.uid]
        self.failures[ref.uid] = error

    def serve_failed(self, ref: PodRef, error: str) -> None:
        """The datapath enrolled ``ref`` but the proxy could not serve it: the pod holds datapath
        state, so it stays known (a leftover) for a later pass to serve again or to unenroll."""
        self.enroll_failed(ref, error)
        self.leftover[ref.uid] = ref

    def unenroll_succeeded(self, ref: PodRef) -> None:
        if self.enrolled.get(ref.uid) == ref:
            del self.enrolled[ref.uid]
        if self.leftover.get(ref.uid) == ref:
            del self.leftover[ref.uid]
        self.failures.pop(ref.uid, None)

    def unenroll_failed(self, ref: PodRef, error: str) -> None:
        self.failures[ref.uid] = error
