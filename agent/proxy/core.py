"""State shared by the outbound and inbound sides of the node proxy, and the I/O helpers they share.

`ProxyCore` holds the current `MeshIndex`, the pods this proxy serves (by IP), the certificate
manager, TLS contexts cached per certificate, the connection tracker, metrics and the HBONE pool.
Sockets toward apps and remote nodes are created inside a pod's netns on a worker thread (setns is
per thread and must not run on the event loop), then connected on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from agent.datapath.interface import Datapath, EnrolledPod
from agent.datapath.source_ip import transparent
from agent.identity import CertificateManager, WorkloadCertificate
from agent.proxy import tls
from agent.proxy.conns import REASON_INTERNAL_ERROR, ConnTracker, Tracked
from agent.proxy.index import MeshIndex
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.netns_sockets import NetnsSockets, connect
from agent.proxy.pipe import End, SocketEnd, splice
from api.resources import Workload
from api.spiffe import SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

Addr = tuple[str, int]
CONNECT_TIMEOUT = 5.0
CERT_WAIT = 5.0  # how long a new connection waits for its workload's first certificate


class ProxyError(Exception):
    """A connection cannot be proxied; `reason` is the flow record's reason (UPPER_SNAKE)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class _CachedContext:
    cert: WorkloadCertificate
    bundle: bytes
    context: ssl.SSLContext


class ProxyCore:
    """What both directions of the proxy read: config, identities, pods served, telemetry."""

    def __init__(
        self,
        *,
        datapath: Datapath,
        certs: CertificateManager,
        bundle: Callable[[], bytes],
        index: MeshIndex,
        tracker: ConnTracker,
        metrics: ProxyMetrics,
        hbone_port: int,
        connect_timeout: float = CONNECT_TIMEOUT,
        cert_wait: float = CERT_WAIT,
        sockets: NetnsSockets | None = None,
    ) -> None:
        self.datapath = datapath
        self.certs = certs
        self.bundle = bundle
        self.index = index
        self.tracker = tracker
        self.metrics = metrics
        self.hbone_port = hbone_port
        self.connect_timeout = connect_timeout
        self.cert_wait = cert_wait
        self.served: dict[str, EnrolledPod] = {}  # pod IP → enrolled pod
        self.local_ips: set[str] = set()
        self._server_ctx: dict[SpiffeId, _CachedContext] = {}
        self._client_ctx: dict[SpiffeId, _CachedContext] = {}
        self.sockets = sockets if sockets is not None else NetnsSockets()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- pods --
    def add_pod(self, ep: EnrolledPod) -> None:
        self.served[ep.pod.ip] = ep
        self.local_ips.add(ep.pod.ip)

    def serves(self, ep: EnrolledPod) -> bool:
        """`ep` is still served as this enrollment: not stopped, not replaced by a new one with its IP
        (checked after every await of a connection's set-up, which a pod stop cannot reach)."""
        return self.served.get(ep.pod.ip) is ep

    def remove_pod(self, uid: str) -> EnrolledPod | None:
        for ip, ep in list(self.served.items()):
            if ep.pod.uid == uid:
                del self.served[ip]
                self.local_ips.discard(ip)
                self.sockets.drop(ep.pod.netns_path)
                return ep
        return None

    def workload_of(self, ep: EnrolledPod) -> Workload | None:
        """The workload a served pod was enrolled for, None (connections fail closed) when it is
        gone or has no valid identity: another workload with the pod's IP is never taken for it."""
        wl = self.index.pod_workload(ep.pod.uid, ep.pod.ip)
        if wl is None:
            return None
        try:
            self.index.identity(wl)  # cached once valid
        except SpiffeIdError:  # no identity, no certificate: nothing may be served as it
            return None
        return wl

    def local_workload(self, ip: str) -> tuple[EnrolledPod, Workload] | None:
        """The served pod owning `ip` and its workload (None when either is unknown)."""
        ep = self.served.get(ip)
        wl = self.workload_of(ep) if ep is not None else None
        return None if ep is None or wl is None else (ep, wl)

    # -- TLS --
    def _context(
        self,
        cache: dict[SpiffeId, _CachedContext],
        identity: SpiffeId,
        cert: WorkloadCertificate,
        make: Callable[[list[bytes], object, bytes], ssl.SSLContext],
    ) -> ssl.SSLContext:
        bundle = self.bundle()
        hit = cache.get(identity)
        if hit is not None and hit.cert is cert and hit.bundle == bundle:
            return hit.context
        context = make(cert.chain_pem, cert.key, bundle)
        cache[identity] = _CachedContext(cert, bundle, context)
        return context

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """The HBONE server context presenting `identity`'s current certificate (None: none yet)."""
        cert = self.certs.certificate(identity)
        if cert is None:
            self._server_ctx.pop(identity, None)
            return None
        return self._context(self._server_ctx, identity, cert, tls.server_context)  # type: ignore[arg-type]

    async def first_server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """`server_context`, waiting up to `cert_wait` for a first certificate (a pod that was just
        enrolled while its certificate is being signed); None: still none, or not managed here."""
        context = self.server_context(identity)
        if context is None:
            try:
                await self._certificate(identity)
            except ProxyError:
                return None
            context = self.server_context(identity)
        return context

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """The HBONE client context of a source identity, waiting briefly for a first certificate."""
        cert = await self._certificate(identity)
        return self._context(self._client_ctx, identity, cert, tls.client_context)  # type: ignore[arg-type]

    async def _certificate(self, identity: SpiffeId) -> WorkloadCertificate:
        """`identity`'s current certificate, waiting up to `cert_wait` for a first one;
        ProxyError("NO_CERTIFICATE") when none came (or the identity is not managed here)."""
        cert = self.certs.certificate(identity)
        if cert is None:
            try:
                cert = await asyncio.wait_for(self.certs.wait_ready(identity), self.cert_wait)
            except (TimeoutError, KeyError) as exc:
                raise ProxyError("NO_CERTIFICATE", f"no certificate for {identity}: {exc!r}") from exc
        return cert

    def forget_identity(self, identity: SpiffeId) -> None:
        self._server_ctx.pop(identity, None)
        self._client_ctx.pop(identity, None)

    # -- sockets in a pod netns --
    async def new_socket(self, netns_path: str) -> socket.socket:
        """A new non-blocking TCP socket (TCP_NODELAY) of the pod netns, from `sockets`' stock.

        Only for a pod still served: a connection whose pod was removed while it waited (for its
        certificate, say) would otherwise start a new stock there that nothing drops, and the
        sockets would keep the pod's netns alive."""
        # a scan of the pods served (a hundred or so: microseconds, next to a connection's setup)
        if not any(ep.pod.netns_path == netns_path for ep in self.served.values()):
            raise ProxyError("POD_NETNS_UNAVAILABLE", f"{netns_path}: pod no longer served")
        try:
            return await self.sockets.take(netns_path)
        except Exception as exc:  # DatapathError (netns vanished), OSError, pod removed meanwhile
            raise ProxyError("POD_NETNS_UNAVAILABLE", f"{netns_path}: {exc}") from exc

    async def pipe(self, t: Tracked, client: End, upstream: End) -> None:
        """Carry an accepted connection: recorded open (with a closer for policy re-checks and pod
        removal), bytes both ways counted, recorded closed with the error that ended it, if any."""

        def closer() -> None:
            client.close()
            upstream.close()

        t.closer = closer
        error = ""
        # `opened` inside: whatever fails once it has recorded the connection open (its last steps,
        # or what comes before the copy) still records the close and closes both ends, which
        # nothing else would (the entry point only closes the client, and records nothing more)
        try:
            self.tracker.opened(t)
            error = await splice(client, upstream, t.count_up, t.count_down)
        except BaseException as exc:  # splice closes both ends itself; not what fails before it
            if isinstance(exc, Exception):
                error = REASON_INTERNAL_ERROR
            closer()
            raise
        finally:
            self.tracker.closed(t, error)

    async def dial(self, netns_path: str, dst: Addr, source_ip: str | None = None) -> SocketEnd:
        """Connect to `dst` from inside the pod netns; ProxyError("UPSTREAM_CONNECT_FAILED") if not.

        `source_ip`: connect from that address (`source_ip.transparent`; the pod netns must be set
        up for it, `EnrolledPod.source_ip`)."""
        sock = await self.new_socket(netns_path)
        try:
            if source_ip is not None:
                transparent(sock, source_ip)
            if self._loop is None:  # once: get_running_loop() costs a getpid(2) per call
                self._loop = asyncio.get_running_loop()
            loop = self._loop
            async with asyncio.timeout(self.connect_timeout):  # no extra task, unlike wait_for
                await connect(sock, dst, loop)
            _, end = await loop.create_connection(SocketEnd, sock=sock)
            return end
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise ProxyError("UPSTREAM_CONNECT_FAILED", f"{dst[0]}:{dst[1]}: {exc!r}") from exc
        except BaseException:
            sock.close()
            raise
