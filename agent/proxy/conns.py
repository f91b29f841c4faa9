"""The node proxy's open connections: admission cap, metrics and flow records, policy re-checks.

Every proxied connection is a `Tracked` from the moment it is established until it closes: the
tracker increments Istio's opened/closed counters, counts bytes as they are written, adds the
open/close/deny flow records, and keeps the authorization input of inbound connections so that a
policy push can re-decide them and close the ones now denied (as ztunnel does). A refused
connection is a `Tracked` too: one `deny` record and, when refused after ztunnel would have counted
it, one open and one close in the counters, the close with the refusal's `response_flags`. One that
ends any other way before it opened (an unexpected error, cancelled while being set up) gets its
`deny` record from `ConnTracker.unfinished`: each connection has exactly one outcome.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.admin.sources import ConnectionInfo, ConnPath
from agent.proxy.flows import FlowEvent, FlowLog, FlowRecord, Verdict
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import TcpSeries
from api.authz import Connection, Decision, MtlsMode
from api.resources import Service, Workload

log = logging.getLogger(__name__)

Addr = tuple[str, int]
DEFAULT_MAX_CONNECTIONS = 10_000
# accepted 15008 sockets still in their TLS handshake (unauthenticated): node-wide and per source IP
MAX_PENDING_HANDSHAKES = 1024
MAX_PENDING_HANDSHAKES_PER_IP = 256

# flow-record reasons of the inbound side
REASON_STRICT = "STRICT_MTLS_PLAINTEXT"  # plaintext to a port under PeerAuthentication STRICT
# flow-record reasons of a connection that ended before it opened, other than refused (`unfinished`):
# cancelled while being set up, because its client gave up (an inbound HBONE stream reset, or its
# connection gone: docs/hbone.md "Abusive peers")...
REASON_ABANDONED = "ABANDONED_BEFORE_ESTABLISHED"
# ... or because the proxy is stopping (`ConnTracker.stopping`)
REASON_PROXY_SHUTDOWN = "PROXY_SHUTDOWN"
# an unexpected exception (a bug): logged with its traceback and counted (`stats()["internal_error"]`)
REASON_INTERNAL_ERROR = "INTERNAL_ERROR"
# the source pod stopped being served (removed, opted out) while its connection was being set up (its
# passthrough dial, its HBONE stream, the same-node destination's dial): `kill_pods` ran before it
# was open, so nothing would close it with the pod (the destination side's: DESTINATION_POD_STOPPED)
REASON_SOURCE_POD_STOPPED = "SOURCE_POD_STOPPED"


def default_max_per_source(max_connections: int) -> int:
    """One source's share of `max_connections` unless configured: half of it."""
    return max(1, max_connections // 2)


_ids = itertools.count(1)
_id_prefix = "c"


def set_id_prefix(prefix: str) -> None:
    """Proxy workers (`agent/workers.py`) prefix their connection ids (`w1c1f`): one node's ids
    stay unique across its processes."""
    global _id_prefix
    _id_prefix = f"{prefix}c"


def new_connection_id() -> str:
    return f"{_id_prefix}{next(_ids):x}"


@dataclass(slots=True, eq=False)
class Tracked:
    """One proxied connection: established, or refused while being set up."""

    id: str
    path: ConnPath
    pod_uids: tuple[str, ...]  # enrolled pods this connection belongs to (closed with them)
    src: Addr
    dst: Addr
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    src_identity: str = ""  # spiffe://...; "" for plaintext or unknown
    service: Service | None = None
    authz: Connection | None = None  # inbound side: what the policy decided on
    series: tuple[TcpSeries, ...] = ()  # the label sets it is counted under (response_flags `-`)
    opened_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0  # client → server (Istio: received)
    bytes_down: int = 0  # server → client (Istio: sent)
    closer: Callable[[], None] | None = None
    close_reason: str = ""
    deciding: Decision | None = None
    recorded: bool = False  # its outcome is in the flow log: a deny, or an open (the close follows)

    reported_up: int = 0  # of bytes_up, what the Prometheus counters have
    reported_down: int = 0

    # per chunk only an int grows; the counters are brought up to date when collected and at close
    def count_up(self, n: int) -> None:
        self.bytes_up += n

    def count_down(self, n: int) -> None:
        self.bytes_down += n

    def report_bytes(self) -> None:
        """Add the bytes counted since the last report to the series (the tracker holds its lock)."""
        up, down = self.bytes_up, self.bytes_down
        if up != self.reported_up:
            for s in self.series:
                s.received.inc(up - self.reported_up)
            self.reported_up = up
        if down != self.reported_down:
            for s in self.series:
                s.sent.inc(down - self.reported_down)
            self.reported_down = down

    def kill(self, reason: str) -> None:
        """Close both ends now (policy change, pod gone, shutdown)."""
        if not self.close_reason:
            self.close_reason = reason
        if self.closer is not None:
            self.closer()


def refusal(index: MeshIndex, t: Tracked) -> str | None:
    """Why an inbound connection (open, or admitted and still dialling the app) is refused under
    `index`, a push newer than the one that admitted it; None while it is still admitted. As ztunnel
    (where istiod turns STRICT into an authorization rule), both the AuthorizationPolicies and a
    plaintext connection's PeerAuthentication count; a policy refusal updates `t.deciding`."""
    conn = t.authz
    if conn is None:  # not an inbound connection
        return None
    plaintext = t.path is ConnPath.PLAINTEXT_INBOUND
    if plaintext and index.peer_auth(index.current(conn.dst_workload), conn.dst_port) is MtlsMode.STRICT:
        return REASON_STRICT
    decision = index.recheck(conn)
    if decision.allowed:
        return None
    t.deciding = decision
    return str(decision.reason)


class HandshakeBudget:
    """Accepted 15008 sockets whose TLS handshake is not done yet, capped node-wide and per source IP.

    Until its handshake completes, a peer is unauthenticated and costs one idle socket. These
    sockets do not take `max_connections` slots, so idle ones (each held for up to the handshake
    timeout) cannot starve the pods' own connections. One source IP cannot take the whole budget
    either.
    """

    def __init__(
        self, total: int = MAX_PENDING_HANDSHAKES, per_ip: int = MAX_PENDING_HANDSHAKES_PER_IP
    ) -> None:
        self.total = total
        self.per_ip = per_ip
        self.pending = 0
        self._by_ip: dict[str, int] = {}

    def take(self, ip: str) -> bool:
        """A slot for a new handshake from `ip`; False: over a cap, refuse the socket."""
        n = self._by_ip.get(ip, 0)
        if self.pending >= self.total or n >= self.per_ip:
            return False
        self.pending += 1
        self._by_ip[ip] = n + 1
        return True

    def give_back(self, ip: str) -> None:
        self.pending -= 1
        n = self._by_ip[ip] - 1
        if n:
            self._by_ip[ip] = n
        else:
            del self._by_ip[ip]


class Refusals:
    """Refusals counted per key (a source IP; "" for one limit as a whole) while they last, and
    logged once when they start and once when they end, never once each: a proxy at a limit
    refuses thousands a second."""

    __slots__ = ("_counts", "_log")

    def __init__(self, logger: logging.Logger) -> None:
        self._counts: dict[str, int] = {}
        self._log = logger

    def __bool__(self) -> bool:
        return bool(self._counts)

    def __contains__(self, key: str) -> bool:
        return key in self._counts

    def refused(self, key: str, start: str, *args: object) -> None:
        """Count one refusal of `key`; the first of an episode logs `start % args`."""
        n = self._counts.get(key, 0)
        if not n:
            self._log.warning(start, *args)
        self._counts[key] = n + 1

    def ended(self, key: str, end: str, *args: object) -> None:
        """End `key`'s episode, if it has one: logs `end % (*args, refusals)`."""
        n = self._counts.pop(key, 0)
        if n:
            self._log.warning(end, *args, n)


class Admission(enum.Enum):
    """What `ConnTracker.reserve` decided; only `ADMITTED` is true, so `if not reserve(...)` refuses."""

    ADMITTED = "admitted"
    OVERLOAD = "overload"  # the proxy's cap (`max_connections`) is reached
    SOURCE_OVERLOAD = "source_overload"  # the source's share (`max_per_source`) is reached

    def __bool__(self) -> bool:
        return self is Admission.ADMITTED


class ConnTracker:
    """Open connections of one proxy, with the admission cap and the telemetry they produce."""

    def __init__(
        self,
        flows: FlowLog,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_source: int | None = None,
    ) -> None:
        self.flows = flows
        self.max_connections = max_connections
        # One source IP's share of the cap: the cap is shared by every pod of the node and every
        # remote peer, and one of them (a retry storm, a client opening connections in a loop) must
        # not take all of it and lock the others out.
        self.max_per_source = (
            default_max_per_source(max_connections) if max_per_source is None else max_per_source
        )
        self.in_use = 0  # admitted sockets and streams, including those still being set up
        self._by_source: dict[str, int] = {}  # source IP → its slots in `in_use`
        self._at_share = Refusals(log)  # sources refused at their share, by IP
        self._at_cap = Refusals(log)  # refusals at `max_connections` (key "")
        self.open: dict[str, Tracked] = {}
        # the proxy is stopping (`NodeProxy.stop()`): what it cancels while still being set up is
        # recorded PROXY_SHUTDOWN, not as abandoned by its client
        self.stopping = False
        self._report_lock = threading.Lock()  # a scrape reports from the metrics server's thread
        self.stats: dict[str, int] = {
            "opened": 0,
            "closed": 0,
            "denied": 0,
            "overload": 0,
            "source_overload": 0,
            "fail_closed": 0,
            "upstream_error": 0,
            "policy_closed": 0,
            "internal_error": 0,
        }

    # -- admission --
    def reserve(self, source: str) -> Admission:
        """Take a slot for a new accepted socket or stream from `source` (an IP); refused (false)
        when the proxy is at its cap or `source` at its share. Give it back with `release(source)`."""
        if self.in_use >= self.max_connections:
            self.stats["overload"] += 1
            self._at_cap.refused(
                "", "event=overload slots_in_use=%d slots=%d", self.in_use, self.max_connections
            )
            return Admission.OVERLOAD
        n = self._by_source.get(source, 0)
        if n >= self.max_per_source:
            self.stats["source_overload"] += 1
            self._at_share.refused(
                source,
                "event=source_overload source=%s slots=%d per_source_cap=%d slots_in_use=%d",
                source,
                n,
                self.max_per_source,
                self.in_use,
            )
            return Admission.SOURCE_OVERLOAD
        self.in_use += 1
        self._by_source[source] = n + 1
        return Admission.ADMITTED

    def release(self, source: str) -> None:
        """Give back a slot `reserve(source)` admitted."""
        self.in_use -= 1
        n = self._by_source[source] - 1
        if n:
            self._by_source[source] = n
        else:
            del self._by_source[source]
        # Refusing ends once back under 90% of the cap (or of the source's share), not at the first
        # slot freed: a proxy (a source) churning at it would otherwise log a start and an end per
        # connection.
        if self._at_cap and self.in_use < self.max_connections - self.max_connections // 10:
            self._at_cap.ended("", "event=overload_ended refused=%d")
        share = self.max_per_source
        if self._at_share and source in self._at_share and n < share - share // 10:
            self._at_share.ended(source, "event=source_overload_ended source=%s refused=%d", source)

    def source_slots(self, source: str) -> int:
        """Slots `source` holds now."""
        return self._by_source.get(source, 0)

    def gauges(self) -> dict[str, int]:
        """How full the admission cap is: slots taken (open connections and those still being set
        up: authorizing, dialling), slots in all, and one source's share of them."""
        return {
            "connection_slots_in_use": self.in_use,
            "connection_slots": self.max_connections,
            "connection_slots_per_source": self.max_per_source,
        }

    # -- lifecycle --
    def _record(self, t: Tracked, event: FlowEvent, verdict: Verdict, **extra: object) -> FlowRecord:
        src, dst = t.src_workload, t.dst_workload
        decision = t.deciding
        values: dict[str, object] = {
            "time": time.time(),
            "event": event,
            "verdict": verdict,
            "src_ip": t.src[0],
            "src_port": t.src[1],
            "dst_ip": t.dst[0],
            "dst_port": t.dst[1],
            "src_pod": src.name if src else "",
            "src_namespace": src.namespace if src else "",
            "src_identity": t.src_identity,
            "dst_pod": dst.name if dst else "",
            "dst_namespace": dst.namespace if dst else "",
            "dst_service": t.service.hostname if t.service else "",
            "connection_id": t.id,
        }
        if decision is not None:
            values["policy"] = str(decision.policy) if decision.policy else ""
            values["rule"] = decision.rule_index
            values["reason"] = str(decision.reason)
        values.update(extra)
        return FlowRecord(**values)  # type: ignore[arg-type]

    def opened(self, t: Tracked) -> None:
        t.recorded = True
        self.open[t.id] = t
        self.stats["opened"] += 1
        for s in t.series:
            s.opened.inc()
        self.flows.add(self._record(t, FlowEvent.OPEN, Verdict.ALLOWED, reason=self._reason(t, "")))

    def report_bytes(self) -> None:
        """Bring every open connection's byte counters up to date (runs before each collection)."""
        with self._report_lock:
            for t in list(self.open.values()):  # one C-level copy: safe against the loop's changes
                t.report_bytes()

    def closed(self, t: Tracked, error: str = "") -> None:
        if self.open.pop(t.id, None) is None:
            return
        with self._report_lock:
            t.report_bytes()
        self.stats["closed"] += 1
        for s in t.series:
            s.closed.inc()
        self.flows.add(
            self._record(
                t,
                FlowEvent.CLOSE,
                Verdict.ALLOWED,
                reason=t.close_reason or self._reason(t, error),
                bytes_sent=t.bytes_up,
                bytes_received=t.bytes_down,
                duration=time.monotonic() - t.started,
            )
        )

    @staticmethod
    def _reason(t: Tracked, fallback: str) -> str:
        if fallback:
            return fallback
        return str(t.deciding.reason) if t.deciding is not None else ""

    def denied(self, t: Tracked, reason: str, closed: tuple[TcpSeries, ...] = ()) -> None:
        """A connection refused before it was established (policy, STRICT, fail closed...): one
        `deny` flow record, never an open or close one.

        `closed`: refused after ztunnel would have counted it (its `ConnectionResult` exists once
        both ends are known, before authorization and the dial): opened under `t.series` (`-`) and
        closed under these, the same label sets with the refusal's `response_flags`. Without them,
        an early refusal (ztunnel's `log_early_deny`), it is not in the metrics.
        """
        t.recorded = True
        self.stats["denied"] += 1
        for s in t.series if closed else ():
            s.opened.inc()
        for s in closed:
            s.closed.inc()
        self.flows.add(self._record(t, FlowEvent.DENY, Verdict.DENIED, reason=reason))

    def unfinished(self, t: Tracked, reason: str) -> None:
        """A connection that ended before it opened without being refused (an unexpected error,
        cancelled while being set up): one `deny` record, counted opened and closed with `-` under
        `t.series` when it has them (ztunnel: a `ConnectionResult` dropped unrecorded is recorded
        closed, no flag), not counted before. Nothing when its outcome is recorded already (refused,
        or opened: `ProxyCore.pipe` records its close)."""
        if not t.recorded:
            self.denied(t, reason, t.series)

    def failed(self, t: Tracked) -> None:
        """`unfinished` for a connection an unexpected exception ended (a bug): INTERNAL_ERROR,
        counted in `stats()["internal_error"]`. The caller logs the traceback."""
        self.stats["internal_error"] += 1
        self.unfinished(t, REASON_INTERNAL_ERROR)

    def cancelled(self, t: Tracked) -> None:
        """`unfinished` for a connection cancelled while being set up: by the proxy stopping
        (PROXY_SHUTDOWN), else because its client gave up (ABANDONED_BEFORE_ESTABLISHED)."""
        self.unfinished(t, REASON_PROXY_SHUTDOWN if self.stopping else REASON_ABANDONED)

    # -- policy pushes and pod removal --
    def recheck(self, index: MeshIndex) -> list[Tracked]:
        """Re-decide every open inbound connection; close (and report) those now denied."""
        killed: list[Tracked] = []
        for t in list(self.open.values()):
            if t.close_reason:  # already being closed (an earlier push, its pod gone): reported then
                continue
            reason = refusal(index, t)
            if reason is None:
                continue
            self.stats["policy_closed"] += 1
            self.flows.add(self._record(t, FlowEvent.DENY, Verdict.DENIED, reason=reason))
            log.info(
                "event=connection_closed_by_policy conn=%s policy=%s reason=%s",
                t.id,
                t.deciding.policy if t.deciding is not None else None,
                reason,
            )
            t.kill(f"policy_changed:{reason}")
            killed.append(t)
        return killed

    def kill_pods(self, pod_uids: Iterable[str] | None, reason: str) -> int:
        """Close the connections of these pods (all when None)."""
        wanted = None if pod_uids is None else set(pod_uids)
        n = 0
        for t in list(self.open.values()):
            if wanted is None or wanted.intersection(t.pod_uids):
                t.kill(reason)
                n += 1
        return n

    def infos(self) -> list[ConnectionInfo]:
        """The open connections, for the admin API (`nodemesh conns`)."""
        rows: list[ConnectionInfo] = []
        for t in self.open.values():
            rows.append(
                ConnectionInfo(
                    id=t.id,
                    path=t.path,
                    src_ip=t.src[0],
                    src_port=t.src[1],
                    dst_ip=t.dst[0],
                    dst_port=t.dst[1],
                    opened_at=t.opened_at,
                    src_pod=f"{t.src_workload.namespace}/{t.src_workload.name}" if t.src_workload else "",
                    src_identity=t.src_identity,
                    dst_service=t.service.hostname if t.service else "",
                    dst_workload=f"{t.dst_workload.namespace}/{t.dst_workload.name}"
                    if t.dst_workload
                    else "",
                    bytes_sent=t.bytes_up,
                    bytes_received=t.bytes_down,
                )
            )
        return rows
