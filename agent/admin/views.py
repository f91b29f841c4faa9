"""The admin API's JSON documents, built from `AdminSources` snapshots (pure, no I/O).

The shapes here are the contract with `nodemesh` (node CLI) and with scripts using `-o json`;
docs/cli.md shows each one. `now` is passed in so that ages and countdowns are testable.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

from agent.admin.flows import FlowRing
from agent.admin.sources import AdminSources, AgentStatus, CertInfo, ConnectionInfo, ProxyCounts, ProxyWorker
from api.authz import PeerAuthIndex, PolicyIndex
from api.resources import PolicyObject, Service, Workload

API_VERSION = "v1"


def package_version() -> str:
    try:
        return metadata.version("nodemesh")
    except metadata.PackageNotFoundError:
        return "unknown"


def cert_dict(c: CertInfo, now: float) -> dict[str, Any]:
    if now >= c.not_after:
        state = "expired"
    elif c.renew_at is None:
        state = "pending"
    elif now >= c.renew_at:
        state = "renewing"
    else:
        state = "valid"
    return {
        "identity": c.identity,
        "serial": c.serial,
        "issuer": c.issuer,
        "not_before": c.not_before,
        "not_after": c.not_after,
        "renew_at": c.renew_at,
        "expires_in": round(c.not_after - now, 1),
        "renews_in": None if c.renew_at is None else round(c.renew_at - now, 1),
        "state": state,
        "pods": c.pods,
        "last_error": c.last_error,
    }


def cert_summary(certs: Sequence[CertInfo], now: float) -> dict[str, Any]:
    rows = [cert_dict(c, now) for c in certs]
    states = [r["state"] for r in rows]
    renews = [r["renews_in"] for r in rows if r["renews_in"] is not None]
    return {
        "count": len(rows),
        "valid": states.count("valid"),
        "renewing": states.count("renewing"),
        "expired": states.count("expired"),
        "pending": states.count("pending"),
        "next_renewal_in": min(renews) if renews else None,
        "soonest_expiry_in": min((r["expires_in"] for r in rows), default=None),
    }


def worker_dict(w: ProxyWorker, counts: ProxyCounts | None) -> dict[str, Any]:
    """One proxy worker in `/v1/status`; `connections` is its active count, None when it did not answer."""
    return {
        "index": w.index,
        "pid": w.pid,
        "up": w.up,
        "restarts": w.restarts,
        "started_at": w.started_at,
        "last_exit": w.last_exit,
        "connections": None if counts is None else counts.connections,
        "listeners": None if counts is None else counts.listeners,
    }


def status_dict(
    st: AgentStatus,
    certs: Sequence[CertInfo],
    ring: FlowRing,
    now: float,
    workers: Sequence[tuple[ProxyWorker, ProxyCounts | None]] = (),
) -> dict[str, Any]:
    """The agent's status; with proxy workers (each with its proxy's counts, None if it did not
    answer), the proxy's connections and listeners are the node's: this process's plus the workers'."""
    ctl = st.controller
    answered = [c for _, c in workers if c is not None]
    return {
        "node": st.node,
        "version": st.version,
        "uptime": round(now - st.started_at, 1),
        "started_at": st.started_at,
        "enrolled_pods": st.enrolled_pods,
        "proxy": {
            "state": str(st.proxy.state),
            "listeners": st.proxy.listeners + sum(c.listeners for c in answered),
            "active_connections": st.proxy.active_connections + sum(c.connections for c in answered),
            # of `max_connections`, which each process has on its own: summed as the metric is
            "connection_slots_in_use": st.proxy.slots_in_use + sum(c.slots_in_use for c in answered),
            "connection_slots": st.proxy.slots + sum(c.slots for c in answered),
            # a source may hold its share in each process (SO_REUSEPORT spreads its connections)
            "connection_slots_per_source": st.proxy.slots_per_source
            + sum(c.slots_per_source for c in answered),
            "detail": st.proxy.detail,
            "pods": st.proxy.pods,
            "source_ip_pods": st.proxy.source_ip_pods,
        },
        "datapath": {
            "backend": st.datapath.backend,
            "programs": list(st.datapath.programs),
            "maps": list(st.datapath.maps),
            "counters": dict(st.datapath.counters),
            "fast_path": st.datapath.fast_path,
            "pin_dir": st.datapath.pin_dir,
        },
        "controller": {
            "address": ctl.address,
            "connected": ctl.connected,
            "last_push_version": ctl.last_push_version,
            "last_push_nonce": ctl.last_push_nonce,
            "since_last_push": None if ctl.last_push_at is None else round(now - ctl.last_push_at, 1),
            "last_error": ctl.last_error,
        },
        "certificates": cert_summary(certs, now),
        "flows": ring.stats(),
        "workers": [worker_dict(w, n) for w, n in sorted(workers, key=lambda wn: wn[0].index)],
    }


def workload_dict(w: Workload) -> dict[str, Any]:
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "node": w.node,
        "service_account": w.service_account,
        "ips": list(w.ips),
        "labels": dict(w.labels),
        "protocol": str(w.protocol),
        # the workload the metrics name (source_workload...): the pod's controller, or the pod
        "workload_name": w.workload_name or w.name,
    }


def service_dict(s: Service) -> dict[str, Any]:
    return {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vip": s.vip,
        "ports": [
            {"port": p.port, "target_port": p.target_port, "name": p.name, "protocol": p.protocol}
            for p in s.ports
        ],
        "endpoints": [{"workload": e.workload_uid, "ip": e.ip} for e in s.endpoints],
    }


def _selector(spec: dict[str, Any]) -> dict[str, str] | None:
    sel = spec.get("selector")
    if isinstance(sel, dict) and isinstance(sel.get("matchLabels"), dict):
        return {str(k): str(v) for k, v in sel["matchLabels"].items()}
    return None


def policies_list(objects: Sequence[PolicyObject], root_namespace: str) -> list[dict[str, Any]]:
    """Every policy object with what it does and whether the L4 evaluator accepted it."""
    authz = PolicyIndex.build(objects, root_namespace)
    peer = PeerAuthIndex.build(objects, root_namespace)
    problems = {(e.kind, e.namespace, e.name): f"rejected: {e.field_path}: {e.problem}"
                for e in (*authz.errors, *peer.errors)}
    skipped = {(r.namespace, r.name) for r in authz.skipped}
    rows: list[dict[str, Any]] = []
    for obj in sorted(objects, key=lambda o: (o.kind, o.namespace, o.name)):
        spec = obj.body.get("spec") or {}
        if not isinstance(spec, dict):
            spec = {}
        row: dict[str, Any] = {
            "kind": obj.kind,
            "namespace": obj.namespace,
            "name": obj.name,
            "scope": "mesh" if obj.namespace == root_namespace else "namespace",
            "selector": _selector(spec),
            "state": problems.get((obj.kind, obj.namespace, obj.name), "active"),
        }
        if obj.kind == "AuthorizationPolicy":
            annotations = (obj.body.get("metadata") or {}).get("annotations") or {}
            rules = spec.get("rules")
            row["action"] = spec.get("action", "ALLOW")
            row["rules"] = len(rules) if isinstance(rules, list) else 0
            row["dry_run"] = str(annotations.get("istio.io/dry-run", "")).lower() in ("1", "t", "true")
            if (obj.namespace, obj.name) in skipped:
                row["state"] = "skipped: targetRef (not enforced at L4)"
        elif obj.kind == "PeerAuthentication":
            mtls = spec.get("mtls") or {}
            row["mode"] = mtls.get("mode", "UNSET") if isinstance(mtls, dict) else "UNSET"
            plm = spec.get("portLevelMtls") or {}
            row["port_level"] = {str(k): (v or {}).get("mode", "UNSET") for k, v in plm.items()} \
                if isinstance(plm, dict) else {}
        elif obj.kind == "HTTPRoute":
            refs = spec.get("parentRefs") or []
            row["parents"] = [str(r.get("name", "")) for r in refs if isinstance(r, dict)]
        rows.append(row)
    return rows


def connection_dict(c: ConnectionInfo, now: float, worker: int = 0) -> dict[str, Any]:
    return {
        "id": c.id,
        "path": str(c.path),
        "src_pod": c.src_pod,
        "src_identity": c.src_identity,
        "src": f"{c.src_ip}:{c.src_port}",
        "dst_service": c.dst_service,
        "dst_workload": c.dst_workload,
        "dst": f"{c.dst_ip}:{c.dst_port}",
        "bytes_sent": c.bytes_sent,
        "bytes_received": c.bytes_received,
        "age": round(now - c.opened_at, 1),
        "opened_at": c.opened_at,
        "worker": worker,
    }


def connections_list(sources: AdminSources, now: float, worker: int = 0) -> list[dict[str, Any]]:
    """This process's connections, oldest first; `worker` is its proxy worker index (0: the main one)."""
    return [connection_dict(c, now, worker) for c in sorted(sources.connections(), key=lambda c: c.opened_at)]
