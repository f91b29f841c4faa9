"""The outbound side of the node proxy: connections an enrolled pod's app makes, captured on 15001.

The original destination comes from the datapath (none: close, fail closed). `MeshIndex.route`
decides where it goes: a Service VIP picks an endpoint (round robin, targetPort); a mesh workload on
another node is reached over HBONE (TLS from inside the source pod's netns with the source
workload's certificate, server identity checked, CONNECT `<pod ip>:<port>`, pooled); one on this
node is handed to the inbound side in-process; anything else is passed through in plaintext.

Metrics as ztunnel's outbound (`outbound.rs` `proxy_to`): a connection refused before it is routed
(no original destination, no endpoint, no source workload: its `log_early_deny`) is not counted; one
routed is counted opened, and closed with `response_flags` `-` whatever ends it, a failed dial or
HBONE connection and a CONNECT the destination refused included (ztunnel records those with
`record`, no flag), and so is one cut short by an unexpected error or cancelled while being set up
(`ConnTracker.unfinished`: `INTERNAL_ERROR`, `PROXY_SHUTDOWN`).
"""

from __future__ import annotations

import asyncio
import logging

from agent.admin.sources import ConnPath
from agent.datapath.interface import EnrolledPod
from agent.proxy.conns import REASON_SOURCE_POD_STOPPED, Tracked, new_connection_id
from agent.proxy.core import ProxyCore, ProxyError
from agent.proxy.hbone import HboneError, Status
from agent.proxy.inbound import REASON_UNKNOWN_DST, Inbound
from agent.proxy.index import Route, RouteKind
from agent.proxy.metrics import TcpPeers
from agent.proxy.pipe import SocketEnd, StreamEnd
from agent.proxy.pool import ANSWER_TIMEOUT, HbonePool, PoolKey
from agent.proxy.tls import PeerIdentityError
from agent.proxy.tunnel import AnswerTimeout, HboneClient, TunnelError
from api.resources import Workload

log = logging.getLogger(__name__)

Addr = tuple[str, int]

HBONE_KEEPALIVE_INTERVAL = 10.0  # seconds between PINGs on an HBONE connection of the pool
HBONE_KEEPALIVE_TIMEOUT = 20.0  # an unanswered PING closes the connection after this long
REASON_NO_ORIGINAL_DST = "NO_ORIGINAL_DESTINATION"
REASON_NO_ENDPOINT = "NO_HEALTHY_UPSTREAM"
REASON_UNKNOWN_SOURCE = "UNKNOWN_SOURCE_WORKLOAD"
REASON_ANSWER_TIMEOUT = "HBONE_ANSWER_TIMEOUT"
_NO_DST: Addr = ("0.0.0.0", 0)  # the destination of a connection before it is known


class Outbound:
    """Handles the 15001 listeners of the pods this proxy serves."""

    def __init__(
        self,
        core: ProxyCore,
        inbound: Inbound,
        *,
        keepalive: tuple[float, float] | None = (HBONE_KEEPALIVE_INTERVAL, HBONE_KEEPALIVE_TIMEOUT),
    ) -> None:
        self.core = core
        self.inbound = inbound
        # (interval, timeout) of HTTP/2 PINGs on every pooled connection: a peer node that went away
        # without a FIN/RST is noticed and the connection dropped, not kept in the pool until TCP gives up
        self.keepalive = keepalive
        # one pool per source pod: a pooled connection was made inside that pod's netns, so two pods
        # sharing an identity must not share connections (ztunnel's pool key includes the source IP)
        self.pools: dict[str, HbonePool] = {}

    def pool(self, ep: EnrolledPod) -> HbonePool:
        pool = self.pools.get(ep.pod.uid)
        if pool is None:
            netns, src_ip = ep.pod.netns_path, ep.pod.ip

            async def dial(key: PoolKey) -> HboneClient:
                return await self.dial(key, netns, src_ip)

            # the peer node answers a CONNECT within its dial timeout (as ours, unless configured
            # otherwise); twice that leaves room, and only a stuck or hostile peer runs into it
            answer = max(ANSWER_TIMEOUT, 2 * self.core.connect_timeout)
            pool = self.pools[ep.pod.uid] = HbonePool(dial, answer_timeout=answer)
        return pool

    async def close_pool(self, uid: str | None) -> None:
        """Close the pooled HBONE connections of one pod (all when None)."""
        uids = list(self.pools) if uid is None else [uid]
        for u in uids:
            pool = self.pools.pop(u, None)
            if pool is not None:
                await pool.close()

    async def reap(self) -> int:
        return sum([await pool.reap() for pool in list(self.pools.values())])

    async def handle(self, ep: EnrolledPod, client: SocketEnd) -> None:
        core = self.core
        peer = client.peername
        if peer is None:
            client.close()
            return
        source = ep.pod.ip  # its share of the cap is the source pod's
        if not core.tracker.reserve(source):  # at the cap or its share: the tracker logs it, once
            client.close()
            return
        # from here on it ends in one flow record outcome, whatever happens (`tracker.unfinished`);
        # the source is the client's address as other pods see it: the pod IP, with the port it bound
        t = Tracked(new_connection_id(), ConnPath.PASSTHROUGH, (ep.pod.uid,), (ep.pod.ip, peer[1]), _NO_DST)
        try:
            await self._handle(ep, peer, t, client)
        except asyncio.CancelledError:
            core.tracker.cancelled(t)
            client.close()
            raise
        except Exception as exc:  # never let one connection take the accept loop down
            log.exception(
                "event=outbound_failed conn=%s pod=%s peer=%s:%d error=%r", t.id, ep.pod.uid, *peer, exc
            )
            core.tracker.failed(t)
            client.close()
        finally:
            core.tracker.release(source)

    async def _handle(self, ep: EnrolledPod, peer: Addr, t: Tracked, client: SocketEnd) -> None:
        core = self.core
        try:
            # one lookup in a BPF hash map: a syscall that never sleeps (a few µs), so on the loop; a
            # worker thread cost 20x that per connection (hand-over, wake-up, the GIL both ways)
            orig = core.datapath.original_destination(ep.netns_cookie, peer)
        except Exception as exc:
            log.warning("event=outbound_lookup_error pod=%s peer=%s:%d error=%r", ep.pod.uid, *peer, exc)
            orig = None
        src_wl = t.src_workload = core.workload_of(ep)  # its own workload, never another one with its IP
        if orig is None:
            core.tracker.stats["fail_closed"] += 1
            core.tracker.denied(t, REASON_NO_ORIGINAL_DST)
            client.close()
            return
        t.dst = orig
        route = core.index.route(orig, local_ips=core.local_ips)
        t.path = {
            RouteKind.HBONE: ConnPath.HBONE,
            RouteKind.SAME_NODE: ConnPath.SAME_NODE,
        }.get(route.kind, ConnPath.PASSTHROUGH)
        t.dst, t.dst_workload, t.service = route.dst, route.workload, route.service
        if src_wl is not None:
            t.src_identity = str(core.index.identity(src_wl))
        if route.kind is RouteKind.NO_ENDPOINT:
            core.tracker.denied(t, REASON_NO_ENDPOINT)
            client.close()
            return
        mtls = route.kind is not RouteKind.PASSTHROUGH
        if mtls and src_wl is None:
            # without the source workload there is no identity to present: fail closed
            core.tracker.denied(t, REASON_UNKNOWN_SOURCE)
            client.close()
            return
        # routed: counted from now on, whatever ends it (ztunnel's `ConnectionResult` exists)
        t.series = (core.metrics.series(self._source_peers(route, src_wl, mtls)),)
        if src_wl is None or route.kind is RouteKind.PASSTHROUGH:  # without a source: passthrough
            await self._passthrough(ep, route, t, client)
        elif route.kind is RouteKind.SAME_NODE:
            await self._same_node(route, t, src_wl, client)
        else:
            await self._hbone(ep, route, t, src_wl, client)

    def _source_peers(self, route: Route, src_wl: Workload | None, mtls: bool) -> TcpPeers:
        index = self.core.index
        dst_principal = None
        if mtls and route.workload is not None:
            dst_principal = str(index.identity(route.workload))
        return TcpPeers(
            reporter="source",
            src_workload=src_wl,
            src_principal=str(index.identity(src_wl)) if src_wl is not None and mtls else None,
            dst_workload=route.workload,
            dst_principal=dst_principal,
            service=route.service,
            mtls=mtls,
        )

    async def _passthrough(self, ep: EnrolledPod, route: Route, t: Tracked, client: SocketEnd) -> None:
        core = self.core
        try:
            upstream = await core.dial(ep.pod.netns_path, route.dst)
        except ProxyError as exc:
            core.tracker.stats["upstream_error"] += 1
            log.info(
                "event=outbound_upstream_failed conn=%s dst=%s:%d reason=%s detail=%r",
                t.id,
                *route.dst,
                exc.reason,
                exc.detail,
            )
            core.tracker.denied(t, exc.reason, t.series)
            client.close()
            return
        # The dial can take up to the connect timeout and the connection is not open yet, so a stop
        # of its pod meanwhile could not reach it (`kill_pods`): it must not open now. As the
        # destination side's check after its dial (`Inbound.deliver`).
        if not core.serves(ep):
            upstream.close()
            self._refuse_source_stopped(t, client)
            return
        await core.pipe(t, client, upstream)

    def _refuse_source_stopped(self, t: Tracked, client: SocketEnd) -> None:
        """Its source pod stopped being served while `t`'s upstream was set up (closed already)."""
        self.core.tracker.denied(t, REASON_SOURCE_POD_STOPPED, t.series)
        client.close()

    async def _hbone(
        self, ep: EnrolledPod, route: Route, t: Tracked, src_wl: Workload, client: SocketEnd
    ) -> None:
        core = self.core
        assert route.workload is not None
        src_id = core.index.identity(src_wl)
        dst_id = core.index.identity(route.workload)
        key = PoolKey(src_id, dst_id, (route.dst[0], core.hbone_port))
        if not core.serves(ep):
            # stopped before this task got here (accepted just before `stop`): its pool was closed,
            # and one made now would stay in `pools` until the proxy stops
            self._refuse_source_stopped(t, client)
            return
        try:
            stream = await self.pool(ep).open_stream(key, route.dst, t.src)
        except HboneError as exc:
            reason = "DENIED_BY_DESTINATION" if exc.status == Status.UNAUTHORIZED else f"HBONE_{exc.status}"
            log.info("event=outbound_hbone_refused conn=%s dst=%s:%d status=%d", t.id, *route.dst, exc.status)
            core.tracker.denied(t, reason, t.series)
            client.close()
            return
        except (ProxyError, TunnelError, PeerIdentityError, OSError, TimeoutError) as exc:
            if isinstance(exc, ProxyError):
                reason = exc.reason
            elif isinstance(exc, AnswerTimeout):
                reason = REASON_ANSWER_TIMEOUT
            else:
                reason = "HBONE_CONNECT_FAILED"
            core.tracker.stats["upstream_error"] += 1
            log.warning(
                "event=outbound_hbone_failed conn=%s pod=%s dst=%s:%d reason=%s error=%r",
                t.id,
                ep.pod.uid,
                *route.dst,
                reason,
                exc,
            )
            core.tracker.denied(t, reason, t.series)
            client.close()
            return
        # the same after a CONNECT (a dial of the HBONE connection, then up to the answer timeout)
        if not core.serves(ep):
            stream.close()  # RST_STREAM CANCEL: the peer closes the app's connection too
            self._refuse_source_stopped(t, client)
            return
        await core.pipe(t, client, StreamEnd(stream))

    async def _same_node(self, route: Route, t: Tracked, src_wl: Workload, client: SocketEnd) -> None:
        core = self.core
        hit = core.local_workload(route.dst[0])
        if hit is None:
            # route() found the IP among this node's pods, but the pod served there is not known as
            # a workload with that IP and a valid identity (its workload gone from the config or
            # moved, the pod about to be re-enrolled; a stale workload claiming the IP): refused as
            # its 15008 would refuse it, counted as the source side of a refused CONNECT (`-`)
            core.tracker.denied(t, REASON_UNKNOWN_DST, t.series)
            client.close()
            return
        dst_ep, dst_wl = hit

        def answer(status: int) -> None:
            if status != Status.OK:
                client.close()

        # the destination side takes it from here, on the same `Tracked`: the connection's one
        # record, and its series (this source side's, which `t.series` has, and the destination's)
        await self.inbound.deliver(
            t,
            ep=dst_ep,
            dst_workload=dst_wl,
            port=route.dst[1],
            src_identity=core.index.identity(src_wl),
            client=client,
            answer=answer,
            mtls=True,
        )

    # -- dialling for the pool --
    async def dial(self, key: PoolKey, netns_path: str, src_ip: str) -> HboneClient:
        """A new HBONE connection for `key`, from inside the source pod's netns.

        Bound to the pod IP: that is the source the destination authorizes (`ipBlocks`), and what the
        kernel would pick in the pod netns anyway.
        """
        core = self.core
        context = await core.client_context(key.src_identity)
        sock = await core.new_socket(netns_path)
        try:
            sock.bind((src_ip, 0))
            client = await HboneClient.connect(
                key.dst_addr, context, key.dst_identity, sock=sock, handshake_timeout=core.connect_timeout
            )
        except BaseException:
            sock.close()
            raise
        if self.keepalive is not None:
            client.start_keepalive(*self.keepalive)
        return client
