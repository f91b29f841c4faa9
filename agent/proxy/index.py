"""The node proxy's view of the mesh as pure values: who owns an IP, where a connection goes, may it.

`MeshIndex` is computed once per config push from the controller's workloads, services and
policies. The proxy asks it these questions, none of which does I/O:

- `route(dst)`: where an outbound connection goes (a Service VIP picks an endpoint round robin;
  a mesh workload on another node is reached over HBONE, one on this node in-process, anything else
  is passed through as is);
- `authorize(...)`: the Istio AuthorizationPolicy verdict for a new inbound connection;
- `peer_auth(...)`: the PeerAuthentication mode of a destination port (STRICT refuses plaintext);
- `inbound_service(workload, port)`: the Service an inbound connection that names none is reported under.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from agent.node import pod_key
from api.authz import (
    DEFAULT_ROOT_NAMESPACE,
    Connection,
    Decision,
    MtlsMode,
    PeerAuthIndex,
    PolicyIndex,
    evaluate,
)
from api.resources import PolicyObject, Service, TunnelProtocol, Workload
from api.spiffe import SpiffeId

Addr = tuple[str, int]


class RouteKind(StrEnum):
    """How an outbound connection travels (the admin API's `ConnPath` values)."""

    HBONE = "hbone"  # mTLS tunnel to the destination pod's 15008
    SAME_NODE = "same-node"  # destination pod served by this proxy: handed to the inbound side in-process
    PASSTHROUGH = "passthrough"  # not in the mesh: dialled as is, plaintext
    NO_ENDPOINT = "no-endpoint"  # a Service VIP:port without a usable endpoint: refused


@dataclass(frozen=True, slots=True)
class Route:
    """The decision for one outbound connection: the address to reach and what is known about it."""

    kind: RouteKind
    dst: Addr  # the pod (or outside) address and port to reach
    original: Addr  # what the app dialled
    workload: Workload | None = None  # the destination workload, when in the registry
    service: Service | None = None  # the Service whose VIP was dialled

    @property
    def service_host(self) -> str:
        return self.service.hostname if self.service is not None else ""


def workload_identity(workload: Workload, trust_domain: str) -> SpiffeId:
    """`spiffe://<td>/ns/<ns>/sa/<sa>` of a workload."""
    return _identity(trust_domain, workload.namespace, workload.service_account)


@functools.lru_cache(maxsize=4096)
def _identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    # validated once per (td, ns, sa), not on every connection (SpiffeId is frozen)
    return SpiffeId.for_workload(trust_domain, namespace, service_account)


def _ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


class RoundRobin:
    """A per-(VIP, port) counter; survives config pushes so a push does not reset the rotation."""

    def __init__(self) -> None:
        self._counters: dict[Addr, Iterator[int]] = {}

    def next(self, key: Addr) -> int:
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = itertools.count()
        return next(counter)

    def retain(self, keys: set[Addr]) -> None:
        for key in [k for k in self._counters if k not in keys]:
            del self._counters[key]


class MeshIndex:
    """Workloads by IP, services by VIP:port, compiled policies; rebuilt on every config push."""

    def __init__(
        self,
        *,
        node: str,
        trust_domain: str,
        workloads: Iterable[Workload] = (),
        services: Iterable[Service] = (),
        policies: Iterable[PolicyObject] = (),
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        round_robin: RoundRobin | None = None,
    ) -> None:
        self.node = node
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.workloads: tuple[Workload, ...] = tuple(workloads)
        self.services: tuple[Service, ...] = tuple(services)
        self.policies: tuple[PolicyObject, ...] = tuple(policies)
        self._by_ip: dict[str, Workload] = {}
        for w in sorted(self.workloads, key=lambda w: w.uid):
            for ip in w.ips:
                self._by_ip.setdefault(ip, w)
        self._by_uid = {w.uid: w for w in self.workloads}
        # This node's workloads by the key their pod is enrolled under (`agent.node.desired_pods`,
        # same order, so the same workload wins a key). A served pod's workload is looked up here,
        # never by IP: a finished pod may still report the IP a new pod now has.
        self._by_pod_key: dict[str, Workload] = {}
        for w in sorted(self.workloads, key=lambda w: w.uid):
            if w.node == node:
                self._by_pod_key.setdefault(pod_key(w.uid), w)
        self._vips: dict[Addr, tuple[Service, int]] = {}
        for svc in sorted(self.services, key=lambda s: s.uid):
            for p in svc.ports:
                if p.protocol.upper() == "TCP":
                    self._vips.setdefault((svc.vip, p.port), (svc, p.target_port or p.port))
        # The destination side's Service of a connection that does not name one (HBONE, 15006): the
        # first Service by uid with the workload among its endpoints and the port as a target port
        # (ztunnel's `guess_inbound_service`). Keyed by workload uid; an endpoint without one is
        # resolved by its IP. One dict lookup per connection.
        self._inbound_services: dict[tuple[str, int], Service] = {}
        for svc in sorted(self.services, key=lambda s: s.uid):
            target_ports = [p.target_port or p.port for p in svc.ports if p.protocol.upper() == "TCP"]
            for e in svc.endpoints:
                uid = e.workload_uid
                if not uid:
                    owner = self._by_ip.get(e.ip)
                    if owner is None:
                        continue
                    uid = owner.uid
                for port in target_ports:
                    self._inbound_services.setdefault((uid, port), svc)
        self.authz = PolicyIndex.build(self.policies, root_namespace)
        self.peer_authn = PeerAuthIndex.build(self.policies, root_namespace)
        self._rr = round_robin or RoundRobin()
        self._rr.retain(set(self._vips))

    def rebuilt(
        self,
        workloads: Iterable[Workload],
        services: Iterable[Service],
        policies: Iterable[PolicyObject],
        *,
        trust_domain: str | None = None,
    ) -> MeshIndex:
        """The index of a new push, keeping the round-robin positions."""
        return MeshIndex(
            node=self.node,
            trust_domain=trust_domain or self.trust_domain,
            workloads=workloads,
            services=services,
            policies=policies,
            root_namespace=self.root_namespace,
            round_robin=self._rr,
        )

    # -- lookups --
    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)

    def pod_workload(self, pod_uid: str, ip: str) -> Workload | None:
        """The workload of the served pod enrolled as `pod_uid` with `ip` (its `PodRef`), or None:
        never another workload that claims the same IP (the caller fails closed)."""
        workload = self._by_pod_key.get(pod_uid)
        # a pod whose workload no longer has this IP is about to be re-enrolled: not served meanwhile
        return workload if workload is not None and ip in workload.ips else None

    def identity(self, workload: Workload) -> SpiffeId:
        """The workload's SPIFFE ID; SpiffeIdError when its namespace or service account cannot
        form one (the controller refuses such pods, a stale or foreign one may not)."""
        return workload_identity(workload, self.trust_domain)

    def service_at(self, dst: Addr) -> tuple[Service, int] | None:
        return self._vips.get(dst)

    def inbound_service(self, workload: Workload, port: int) -> Service | None:
        """The Service an inbound connection to `port` of `workload` is reported under when the client's
        choice is not known: the first (by uid) that has the workload as an endpoint and `port` as a
        target port; None when there is none."""
        return self._inbound_services.get((workload.uid, port))

    # -- outbound --
    def route(self, dst: Addr, *, local_ips: frozenset[str] | set[str] = frozenset()) -> Route:
        """Where a connection the app dialled to `dst` goes.

        `local_ips` are the pod IPs this proxy serves (enrolled on this node): a mesh workload there
        is reached in-process. A VIP without endpoints gives NO_ENDPOINT (the proxy closes it, as
        kube-proxy rejects a Service without endpoints).
        """
        service: Service | None = None
        target = dst
        hit = self._vips.get(dst)
        if hit is not None:
            service, target_port = hit
            endpoints = [e for e in service.endpoints if _ipv4(e.ip)]
            if not endpoints:
                return Route(RouteKind.NO_ENDPOINT, dst, dst, service=service)
            endpoint = endpoints[self._rr.next(dst) % len(endpoints)]
            target = (endpoint.ip, target_port)
        workload = self._by_ip.get(target[0])
        if workload is None or workload.protocol != TunnelProtocol.HBONE:
            return Route(RouteKind.PASSTHROUGH, target, dst, workload, service)
        if target[0] in local_ips:
            return Route(RouteKind.SAME_NODE, target, dst, workload, service)
        return Route(RouteKind.HBONE, target, dst, workload, service)

    # -- inbound --
    def authorize(
        self,
        *,
        dst_workload: Workload,
        src_ip: str,
        src_identity: SpiffeId | None,
        dst_ip: str,
        dst_port: int,
    ) -> tuple[Connection, Decision]:
        """The AuthorizationPolicy verdict (DENY before ALLOW, see docs/authorization.md)."""
        conn = Connection(
            src_ip=src_ip,
            src_identity=str(src_identity) if src_identity is not None else None,
            dst_ip=dst_ip,
            dst_port=dst_port,
            dst_workload=dst_workload,
        )
        return conn, evaluate(self.authz, conn)

    def recheck(self, conn: Connection) -> Decision:
        """Re-decide an open connection under this index's policies (after a push).

        The destination workload is looked up again by uid so that label changes count.
        """
        workload = self.current(conn.dst_workload)
        if workload is not conn.dst_workload:
            conn = Connection(
                src_ip=conn.src_ip,
                src_identity=conn.src_identity,
                dst_ip=conn.dst_ip,
                dst_port=conn.dst_port,
                dst_workload=workload,
            )
        return evaluate(self.authz, conn)

    def current(self, workload: Workload) -> Workload:
        """`workload` as this index has it (looked up by uid: labels may have changed), or itself
        when the index no longer has it."""
        return self._by_uid.get(workload.uid, workload)

    def peer_auth(self, workload: Workload, port: int) -> MtlsMode:
        """The effective PeerAuthentication mode of `port` of `workload`."""
        return self.peer_authn.resolve(workload, port).mode
