"""The L4 node proxy: serves the 15001/15006/15008 listeners of every enrolled pod on this node.

`NodeProxy` has the placeholder relay's shape (`serve(ep)`, `stop(uid | None)`) plus `update(...)`
for config pushes. It wires the pure `MeshIndex` to the outbound side (`agent.proxy.outbound`), the
inbound side (`agent.proxy.inbound`), the connection tracker (metrics, flow records, policy
re-checks) and the workload certificates (`agent.identity.CertificateManager`, one identity per
served workload, ensured and released as pods come and go). See docs/proxy.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from agent.admin.sources import ConnectionInfo
from agent.datapath.interface import Datapath, EnrolledPod
from agent.identity import CertificateManager
from agent.proxy import tunnel
from agent.proxy.conns import DEFAULT_MAX_CONNECTIONS, ConnTracker, HandshakeBudget, Refusals
from agent.proxy.core import CONNECT_TIMEOUT, ProxyCore
from agent.proxy.flows import FlowLog, FlowRing
from agent.proxy.hbone import HBONE_PORT
from agent.proxy.inbound import Inbound
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.outbound import HBONE_KEEPALIVE_INTERVAL, HBONE_KEEPALIVE_TIMEOUT, Outbound
from agent.proxy.pipe import SocketEnd
from api.authz import DEFAULT_ROOT_NAMESPACE
from api.resources import PolicyObject, Service, Workload
from api.spiffe import SpiffeId

log = logging.getLogger(__name__)

REAP_INTERVAL = 30.0


class _Served:
    """The accept loops of one pod."""

    def __init__(self, ep: EnrolledPod) -> None:
        self.ep = ep
        self.servers: list[asyncio.Server] = []
        self.hbone_task: asyncio.Task[None] | None = None


class NodeProxy:
    """One proxy per node, shared by all its enrolled pods (what the agent runs instead of `Relay`)."""

    def __init__(
        self,
        datapath: Datapath,
        certs: CertificateManager,
        trust_domain: str,
        *,
        node: str,
        bundle: Callable[[], bytes],
        flow_ring: FlowRing | None = None,
        metrics: ProxyMetrics | None = None,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_source: int | None = None,  # None: half of max_connections
        max_hbone_queued: int | None = None,  # the process's HBONE receive budget; None: as it is
        hbone_port: int = HBONE_PORT,
        connect_timeout: float = CONNECT_TIMEOUT,
        manage_identities: bool = True,
        hbone_keepalive: tuple[float, float] | None = (HBONE_KEEPALIVE_INTERVAL, HBONE_KEEPALIVE_TIMEOUT),
    ) -> None:
        self.flows = FlowLog(flow_ring)
        self.metrics = metrics or ProxyMetrics()
        self.tracker = ConnTracker(self.flows, max_connections, max_connections_per_source)
        if max_hbone_queued is not None:  # one budget per process (tunnel.RECEIVE_BUDGET)
            tunnel.RECEIVE_BUDGET.limit = max_hbone_queued
        self.handshakes = HandshakeBudget()
        self._handshake_refusals = Refusals(log)  # until the next accepted one (key "")
        self.metrics.before_collect(self.tracker.report_bytes)
        self.certs = certs
        self.core = ProxyCore(
            datapath=datapath,
            certs=certs,
            bundle=bundle,
            index=MeshIndex(node=node, trust_domain=trust_domain, root_namespace=root_namespace),
            tracker=self.tracker,
            metrics=self.metrics,
            hbone_port=hbone_port,
            connect_timeout=connect_timeout,
        )
        self.inbound = Inbound(self.core, keepalive=hbone_keepalive)
        self.outbound = Outbound(self.core, self.inbound, keepalive=hbone_keepalive)
        self._manage_identities = manage_identities
        self._identities: dict[str, SpiffeId] = {}  # pod uid → identity ensured for it
        self._served: dict[str, _Served] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None

    # -- config --
    @property
    def index(self) -> MeshIndex:
        return self.core.index

    def update(
        self,
        workloads: Iterable[Workload],
        services: Iterable[Service],
        policies: Iterable[PolicyObject],
        *,
        trust_domain: str | None = None,
    ) -> None:
        """Apply a config push (synchronous: call it from the config handler on the loop).

        Open inbound connections are re-checked against the new policies; those now denied close.
        """
        old = self.core.index
        new = old.rebuilt(workloads, services, policies, trust_domain=trust_domain)
        self.core.index = new
        self._sync_identities()
        if new.policies != old.policies or new.workloads != old.workloads:
            killed = self.tracker.recheck(new)
            if killed:
                log.info("event=policy_recheck closed=%d", len(killed))
        log.debug(
            "event=proxy_config workloads=%d services=%d policies=%d",
            len(new.workloads),
            len(new.services),
            len(new.policies),
        )

    def _sync_identities(self) -> None:
        """Ensure a certificate for every served pod's identity; release those no longer needed."""
        if not self._manage_identities:
            return
        wanted: dict[str, SpiffeId] = {}
        for uid, served in self._served.items():
            # by the pod's own key, not its IP, which a finished pod may still claim
            wl = self.core.index.pod_workload(uid, served.ep.pod.ip)
            if wl is None:
                continue
            try:
                wanted[uid] = self.core.index.identity(wl)
            except ValueError as exc:  # SpiffeIdError: one bad pod must not stop the push for the others
                log.error("event=identity_invalid pod=%s workload=%s error=%r", uid, wl.uid, exc)
        for uid, identity in list(self._identities.items()):
            if wanted.get(uid) != identity:
                del self._identities[uid]
                self.certs.release(identity)
                if identity not in self._identities.values():
                    self.core.forget_identity(identity)
        for uid, identity in wanted.items():
            if uid not in self._identities:
                try:
                    self.certs.ensure(identity)
                except ValueError as exc:  # another trust domain: never served
                    log.error("event=identity_refused pod=%s identity=%s error=%r", uid, identity, exc)
                    continue
                self._identities[uid] = identity

    # -- pods --
    async def serve(self, ep: EnrolledPod) -> None:
        """Start serving the pod's three listeners (idempotent)."""
        if ep.pod.uid in self._served or ep.outbound is None or ep.inbound is None or ep.hbone is None:
            return
        served = _Served(ep)
        loop = asyncio.get_running_loop()
        out = await loop.create_server(
            lambda: SocketEnd(lambda end: self._spawn(self.outbound.handle(ep, end))), sock=ep.outbound
        )
        inb = await loop.create_server(
            lambda: SocketEnd(lambda end: self._spawn(self.inbound.plaintext(ep, end))), sock=ep.inbound
        )
        served.servers = [out, inb]
        served.hbone_task = asyncio.get_running_loop().create_task(
            self._accept_hbone(ep, ep.hbone), name=f"hbone-accept {ep.pod.uid}"
        )
        self._served[ep.pod.uid] = served
        self.core.add_pod(ep)
        self._sync_identities()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="hbone-pool-reaper")
        log.info("event=proxy_serving pod=%s ip=%s", ep.pod.uid, ep.pod.ip)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if self._loop is None:  # once: get_running_loop() costs a getpid(2) per call
            self._loop = asyncio.get_running_loop()
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_hbone(self, ep: EnrolledPod, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                log.warning("event=hbone_accept_error pod=%s error=%r", ep.pod.uid, exc)
                await asyncio.sleep(0.1)
                continue
            ip = addr[0]
            if not self.handshakes.take(ip):
                self.inbound.hbone_stats["handshake_overload"] += 1
                self._handshake_refusals.refused(
                    "",
                    "event=hbone_handshake_overload pod=%s peer_ip=%s pending=%d pending_from_ip_cap=%d",
                    ep.pod.uid,
                    ip,
                    self.handshakes.pending,
                    self.handshakes.per_ip,
                )
                conn.close()
                continue
            if self._handshake_refusals:
                self._handshake_refusals.ended("", "event=hbone_handshake_overload_ended refused=%d")
            self._spawn(self._serve_hbone(conn, ip))

    async def _serve_hbone(self, conn: socket.socket, ip: str) -> None:
        """One accepted 15008 socket: a handshake slot until the peer is authenticated, then a
        connection slot (`max_connections`) until it closes."""
        handshaking, admitted = True, False

        def established() -> bool:
            nonlocal handshaking, admitted
            handshaking = False
            self.handshakes.give_back(ip)
            # the TLS peer's IP: the source pod dials from it; refused (at the cap or its share):
            # the tracker logs it, once
            admitted = bool(self.tracker.reserve(ip))
            return admitted

        try:
            await self.inbound.serve_hbone(conn, established)
        except Exception as exc:
            log.exception("event=hbone_connection_failed error=%r", exc)
            conn.close()
        finally:
            if handshaking:
                self.handshakes.give_back(ip)
            if admitted:
                self.tracker.release(ip)

    async def stop(self, pod_uid: str | None = None) -> None:
        """Stop serving one pod (close its listeners, connections and pooled tunnels), or all.

        All: the proxy is stopping (final). What is still being set up is cancelled first and
        recorded PROXY_SHUTDOWN; with a pod, it ends on the pod's removal (`DESTINATION_POD_STOPPED`,
        its dial failing) as it would anyway."""
        if pod_uid is None:
            await self._cancel_connections()
        uids = [pod_uid] if pod_uid is not None else list(self._served)
        for uid in uids:
            served = self._served.pop(uid, None)
            if served is None:
                continue
            for srv in served.servers:
                srv.close()
            if served.hbone_task is not None:
                served.hbone_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await served.hbone_task
            served.ep.close()
            self.core.remove_pod(uid)
        self.tracker.kill_pods(
            None if pod_uid is None else uids, "pod_stopped" if pod_uid else "proxy_stopped"
        )
        for uid in uids:
            await self.outbound.close_pool(uid)
        self._sync_identities()
        if pod_uid is None:
            await self.outbound.close_pool(None)
            self.core.sockets.close()
            if self._reaper is not None:
                self._reaper.cancel()
                self._reaper = None
            await self._cancel_connections()  # any accepted meanwhile

    async def _cancel_connections(self) -> None:
        """Stop accepting, close the open connections (`proxy_stopped`) and cancel those still being
        set up, which the tracker then records as cut short by the shutdown (`stopping`): before any
        pod, pool or netns socket stock goes away, or their dials would fail for it and be recorded
        as failures of the pod or the peer. Each connection's task records it (the tracker's
        `cancelled`, `ProxyCore.pipe`): all of them by the time this returns."""
        self.tracker.stopping = True
        for served in self._served.values():
            for srv in served.servers:
                srv.close()
            if served.hbone_task is not None:
                served.hbone_task.cancel()
        self.tracker.kill_pods(None, "proxy_stopped")
        # The CONNECT streams' handlers first (the HBONE servers start them: cancelling a 15008
        # socket's task does not stop them), while their connections are up: each answers its peer
        # (503) as it ends. Then the outbound and 15006 connections and the 15008 sockets.
        for tasks in (list(self.inbound.stream_tasks), list(self._tasks)):
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                await self.outbound.reap()
            except Exception as exc:
                log.warning("event=hbone_reap_failed error=%r", exc)

    # -- views --
    def connections(self) -> list[ConnectionInfo]:
        return self.tracker.infos()

    def metrics_text(self) -> str:
        return self.metrics.text()

    def stats(self) -> dict[str, int]:
        return {
            **self.tracker.stats,
            **self.tracker.gauges(),
            **self.inbound.hbone_stats,
            "active": len(self.tracker.open),
            "pods": len(self._served),
            "pods_source_ip": sum(1 for s in self._served.values() if s.ep.source_ip),
            "netns_sockets_idle": self.core.sockets.idle(),
            # HBONE DATA received and queued for apps that have not taken it yet (tunnel.ReceiveBudget)
            **tunnel.RECEIVE_BUDGET.stats(),
        }
