"""`nodemesh policy explain`: which policy and rule decide a connection from a pod to a pod or service.

Pure: it takes the agent's current workloads, services and policy objects, resolves the source pod
and the destination (a pod, or `service:port` to the service's endpoints, through the target port),
then runs the same code the proxy runs for every new inbound connection: `PeerAuthIndex.resolve` for
the mTLS mode and `api.authz.evaluate(..., explain=True)` for the AuthorizationPolicy verdict.
Transport assumptions follow the datapath: a pod enrolled in the mesh (`protocol: HBONE`) connects
with its SPIFFE identity over HBONE; a pod outside the mesh arrives as plaintext on 15006; a
destination outside the mesh is reached by passthrough and no policy applies there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.admin.sources import MeshSettings
from api.authz import (
    Connection,
    Decision,
    MtlsMode,
    PeerAuthDecision,
    PeerAuthIndex,
    PolicyIndex,
    evaluate,
)
from api.resources import PolicyObject, Service, ServicePort, TunnelProtocol, Workload

_LIST_MAX = 12


class ExplainError(ValueError):
    """The source or destination cannot be resolved; the message says what exists instead."""


@dataclass(frozen=True, slots=True)
class EndpointVerdict:
    """The decision for the connection to one destination workload."""

    workload: str  # <ns>/<name>
    node: str
    ip: str
    port: int
    transport: str  # "mtls" | "plaintext" | "passthrough"
    allowed: bool
    summary: str
    peer_authentication: PeerAuthDecision | None = None
    decision: Decision | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "node": self.node,
            "ip": self.ip,
            "port": self.port,
            "transport": self.transport,
            "allowed": self.allowed,
            "summary": self.summary,
            "peer_authentication": self.peer_authentication.to_dict() if self.peer_authentication else None,
            "decision": self.decision.to_dict() if self.decision else None,
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    source: Workload
    source_identity: str  # spiffe://..., empty for plaintext
    destination: str  # as asked
    service: str  # hostname, empty for a pod destination
    service_port: int | None
    endpoints: tuple[EndpointVerdict, ...]
    notes: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        """`allowed`, `denied`, `mixed` (endpoints disagree) or `no-endpoints`."""
        if not self.endpoints:
            return "no-endpoints"
        verdicts = {e.allowed for e in self.endpoints}
        if len(verdicts) == 2:
            return "mixed"
        return "allowed" if verdicts.pop() else "denied"

    def to_dict(self) -> dict[str, Any]:
        src = self.source
        return {
            "source": {
                "pod": f"{src.namespace}/{src.name}",
                "node": src.node,
                "ip": src.ips[0] if src.ips else "",
                "identity": self.source_identity,
                "in_mesh": src.protocol is TunnelProtocol.HBONE,
            },
            "destination": self.destination,
            "service": self.service,
            "service_port": self.service_port,
            "verdict": self.verdict,
            "endpoints": [e.to_dict() for e in self.endpoints],
            "notes": list(self.notes),
        }


def _names(items: Sequence[Workload | Service]) -> str:
    names = sorted(f"{i.namespace}/{i.name}" for i in items)
    more = f", ... ({len(names) - _LIST_MAX} more)" if len(names) > _LIST_MAX else ""
    return ", ".join(names[:_LIST_MAX]) + more or "none"


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def resolve_pod(workloads: Sequence[Workload], ref: str, prefer_namespace: str = "") -> Workload:
    """`name`, `namespace/name` or a pod IP → the one workload; errors list the candidates."""
    if _is_ip(ref):
        found = [w for w in workloads if ref in w.ips]
    else:
        ns, sep, name = ref.rpartition("/")
        found = [w for w in workloads if w.name == name and (not sep or w.namespace == ns)]
        if len(found) > 1 and prefer_namespace:
            local = [w for w in found if w.namespace == prefer_namespace]
            found = local or found
    if len(found) == 1:
        return found[0]
    if not found:
        raise ExplainError(f"no pod {ref!r}; known pods: {_names(workloads)}")
    raise ExplainError(f"pod {ref!r} is ambiguous ({_names(found)}): write NAMESPACE/NAME")


def _find_services(services: Sequence[Service], ref: str, client_namespace: str) -> list[Service]:
    if _is_ip(ref):
        return [s for s in services if s.vip == ref]
    if ref.endswith(".svc.cluster.local"):
        return [s for s in services if s.hostname == ref]
    ns, sep, name = ref.rpartition("/")
    if sep:
        return [s for s in services if s.namespace == ns and s.name == name]
    if "." in ref:  # name.namespace, as DNS would resolve it
        name, _, ns = ref.partition(".")
        return [s for s in services if s.namespace == ns and s.name == name]
    found = [s for s in services if s.name == ref]
    # A bare name resolves in the client's namespace first (the DNS search path does the same).
    return [s for s in found if s.namespace == client_namespace] or found


def _pod_matches(workloads: Sequence[Workload], ref: str) -> bool:
    if _is_ip(ref):
        return any(ref in w.ips for w in workloads)
    ns, sep, name = ref.rpartition("/")
    return any(w.name == name and (not sep or w.namespace == ns) for w in workloads)


def _split_port(to: str, port: int | None) -> tuple[str, int | None]:
    target, sep, tail = to.rpartition(":")
    if sep and tail.isdigit() and ":" not in target:  # not an IPv6 literal
        given = int(tail)
        if port is not None and port != given:
            raise ExplainError(f"--to {to!r} names port {given} but --port is {port}")
        return target, given
    return to, port


def explain(
    workloads: Sequence[Workload],
    services: Sequence[Service],
    policies: Sequence[PolicyObject],
    mesh: MeshSettings,
    from_pod: str,
    to: str,
    port: int | None = None,
) -> Explanation:
    """Resolve `from_pod` → `to` (`POD`, `NS/POD`, `SERVICE:PORT`, `NS/SERVICE:PORT`,
    `SERVICE.NS:PORT`, a hostname or an IP, optionally with `:PORT`) and decide it per endpoint."""
    if port is not None and not 0 < port <= 65535:
        raise ExplainError(f"port {port} is out of range")
    src = resolve_pod(workloads, from_pod)
    if not src.ips:
        raise ExplainError(f"pod {src.namespace}/{src.name} has no IP yet")
    target, dst_port = _split_port(to, port)
    svcs = _find_services(services, target, src.namespace)
    is_pod = _pod_matches(workloads, target)
    # `x:80` prefers a service named x; a bare `x` prefers a pod named x.
    use_service = bool(svcs) and ((dst_port is not None and to != target) or not is_pod)
    notes: list[str] = []
    authz = PolicyIndex.build(policies, mesh.root_namespace)
    peer = PeerAuthIndex.build(policies, mesh.root_namespace)
    notes += (f"policy not loaded: {e}" for e in (*authz.errors, *peer.errors))
    notes += (f"policy {ref} skipped: targetRef policies do not apply at L4" for ref in authz.skipped)

    service_name = ""
    service_port: int | None = None
    targets: list[tuple[Workload, str, int]] = []
    if use_service:
        if len(svcs) > 1:
            raise ExplainError(f"service {target!r} is ambiguous ({_names(svcs)}): write NAMESPACE/NAME:PORT")
        svc = svcs[0]
        if dst_port is None:
            ports = ", ".join(str(p.port) for p in svc.ports) or "none"
            raise ExplainError(f"service {svc.namespace}/{svc.name} needs a port (one of: {ports})")
        sp: ServicePort | None = next((p for p in svc.ports if p.port == dst_port), None)
        if sp is None:
            ports = ", ".join(str(p.port) for p in svc.ports) or "none"
            raise ExplainError(f"service {svc.namespace}/{svc.name} has no port {dst_port} (ports: {ports})")
        service_name, service_port = svc.hostname, sp.port
        target_port = sp.target_port or sp.port
        by_uid = {w.uid: w for w in workloads}
        for ep in svc.endpoints:
            wl = by_uid.get(ep.workload_uid)
            if wl is None:
                notes.append(f"endpoint {ep.ip} ({ep.workload_uid}) is not a known workload: not evaluated")
                continue
            targets.append((wl, ep.ip, target_port))
        if not svc.endpoints:
            notes.append(f"service {svc.namespace}/{svc.name} has no endpoints: connections fail")
    else:
        if not is_pod and not svcs:
            raise ExplainError(
                f"no pod or service {target!r}; known pods: {_names(workloads)}; "
                f"known services: {_names(services)}"
            )
        dst = resolve_pod(workloads, target, src.namespace)
        if dst_port is None:
            raise ExplainError(f"a pod destination needs a port: --to {target}:PORT or --port N")
        if not dst.ips:
            raise ExplainError(f"pod {dst.namespace}/{dst.name} has no IP yet")
        dst_ip = target if _is_ip(target) else dst.ips[0]
        targets.append((dst, dst_ip, dst_port))

    src_in_mesh = src.protocol is TunnelProtocol.HBONE
    identity = f"spiffe://{src.principal(mesh.trust_domain)}" if src_in_mesh else ""
    if not src_in_mesh:
        notes.append(
            f"source {src.namespace}/{src.name} is not in the mesh: "
            "it connects in plaintext, without identity"
        )
    verdicts = tuple(
        _decide(src, identity, wl, ip, p, authz, peer) for wl, ip, p in targets
    )
    return Explanation(src, identity, to, service_name, service_port, verdicts, tuple(notes))


def _decide(
    src: Workload,
    identity: str,
    dst: Workload,
    dst_ip: str,
    port: int,
    authz: PolicyIndex,
    peer: PeerAuthIndex,
) -> EndpointVerdict:
    name = f"{dst.namespace}/{dst.name}"
    if dst.protocol is not TunnelProtocol.HBONE:
        return EndpointVerdict(
            name, dst.node, dst_ip, port, "passthrough", True,
            "destination is not in the mesh: passthrough, no policy is enforced at the destination",
        )
    pa = peer.resolve(dst, port)
    if not identity and pa.mode is MtlsMode.STRICT:
        where = f"{pa.level} policy {pa.policy}" if pa.policy else str(pa.level)
        return EndpointVerdict(
            name, dst.node, dst_ip, port, "plaintext", False,
            f"DENY: plaintext refused, PeerAuthentication STRICT ({where})", pa,
        )
    conn = Connection(
        src_ip=src.ips[0], src_identity=identity or None, dst_ip=dst_ip, dst_port=port, dst_workload=dst
    )
    decision = evaluate(authz, conn, explain=True)
    where = f" by {decision.policy}" if decision.policy else ""
    rule = f" rules[{decision.rule_index}]" if decision.rule_index is not None else ""
    summary = f"{'ALLOW' if decision.allowed else 'DENY'}: {decision.reason}{where}{rule}"
    transport = "mtls" if identity else "plaintext"
    return EndpointVerdict(name, dst.node, dst_ip, port, transport, decision.allowed, summary, pa, decision)
