"""The inbound side of the node proxy: HBONE on 15008, plaintext on 15006, same-node hand-off.

Every inbound connection ends the same way (`deliver`): L4 authorization of (source principal,
namespace, IP, destination port) against the destination workload's AuthorizationPolicies, then a
connection to the app at `<pod ip>:<port>` made inside the pod's netns (it arrives on `lo`, which
sk_lookup passes) from the peer's IP where the pod is set up for it (`agent.datapath.source_ip`),
then bytes both ways. They differ in what they know about the peer:

- 15008 (HBONE): the mTLS peer's SPIFFE ID; the certificate presented is the destination
  workload's, picked by the local IP the TLS connection was accepted on (no SNI). Answers
  200 / 401 (denied) / 503 (app unreachable) on the CONNECT stream; 400s are `HboneServer`'s.
- 15006 (plaintext): no identity. PeerAuthentication STRICT refuses it; PERMISSIVE and DISABLE
  admit it under the same authorization (principals and namespaces cannot match). The workload
  owning the peer IP labels its metrics and flow records (ztunnel's inbound passthrough does the
  same), never its authorization: a plaintext source address can be spoofed.
- same node: the outbound side hands the connection over in-process with the source pod's identity.

Each entry point (`_hbone_stream`, `plaintext`, and for the same node `Outbound.handle`) owns the
connection's `Tracked` and records it if it ends before its outcome was (`ConnTracker.unfinished`:
cancelled, an unexpected error), so every connection has exactly one outcome in the flow log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Final

from agent.admin.sources import ConnPath
from agent.datapath.abi import PORT_INBOUND, PORT_OUTBOUND
from agent.datapath.interface import EnrolledPod
from agent.proxy.conns import (
    REASON_SOURCE_POD_STOPPED,
    REASON_STRICT,
    Tracked,
    new_connection_id,
    refusal,
)
from agent.proxy.core import ProxyCore, ProxyError
from agent.proxy.hbone import ConnectTarget, IpAddress, Status, canonical_ip
from agent.proxy.metrics import ResponseFlags, TcpPeers
from agent.proxy.pipe import End, SocketEnd, StreamEnd
from agent.proxy.tunnel import HboneServer, ServerStream
from api.authz import MtlsMode
from api.resources import Workload
from api.spiffe import SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

Addr = tuple[str, int]

REASON_UNKNOWN_DST = "UNKNOWN_DESTINATION_WORKLOAD"
# the destination pod stopped being served (removed, opted out) while its app was being dialled
REASON_POD_STOPPED = "DESTINATION_POD_STOPPED"
# a connection to one of the proxy's own ports in the pod (15001/15006/15008): never an app's
REASON_PROXY_PORT = "PROXY_PORT"


# 15008 counters in NodeProxy.stats(); cut_off_*: connections ended for abusing HTTP/2
# (tunnel.MAX_PENDING_RESETS, MAX_OWED_WHILE_PAUSED, MAX_EMPTY_DATA_FRAMES, MAX_PRIORITY_FRAMES_PER_STREAM,
# MAX_WINDOW_UPDATES_PER_DATA_FRAME_SENT; hbone.MAX_HEADER_BLOCK)
HBONE_STATS: Final = (
    "handshake_failures",
    "rejected_400",
    "connections",
    "cut_off_rapid_reset",
    "cut_off_control_flood",
    "cut_off_header_flood",
    "cut_off_empty_frames",
    "cut_off_priority_flood",
    "cut_off_window_update_flood",
    "cut_off_buffer_overflow",  # not abuse as such: the process's receive budget (tunnel.ReceiveBudget)
    "handshake_overload",  # accepted sockets closed at once: too many handshakes pending (HandshakeBudget)
    "streams_abandoned",  # handlers stopped before their answer: the stream was reset or the peer left
)


class Inbound:
    """Accepts connections for the pods this proxy serves."""

    def __init__(self, core: ProxyCore, keepalive: tuple[float, float] | None = None) -> None:
        self.core = core
        self.keepalive = keepalive  # PINGs on each 15008 connection (interval, timeout), as the pool's
        self.hbone_stats: dict[str, int] = dict.fromkeys(HBONE_STATS, 0)
        # handlers of the CONNECT streams being served (`HboneServer` starts them, not NodeProxy):
        # what `NodeProxy.stop()` cancels along with its own connection tasks
        self.stream_tasks: set[asyncio.Task[None]] = set()

    # -- 15008 --
    async def pick_identity(self, local_ip: IpAddress) -> ssl.SSLContext | None:
        """The certificate of the workload that owns the local IP (None: refuse the handshake),
        waiting briefly for a first one: a peer may connect as soon as a new pod's 15008 listens."""
        hit = self.core.local_workload(str(local_ip))
        if hit is None:
            log.info("event=hbone_unknown_local_ip local_ip=%s", local_ip)
            return None
        return await self.core.first_server_context(self.core.index.identity(hit[1]))

    async def serve_hbone(self, sock: socket.socket, established: Callable[[], bool] | None = None) -> None:
        """Run one accepted 15008 connection until it ends; never raises for a bad peer.
        `established()` runs once the peer is authenticated; False: close the connection."""
        try:
            sock_peer: Addr = sock.getpeername()[:2]
        except OSError as exc:
            log.info("event=hbone_accept_failed error=%r", exc)
            sock.close()
            return

        async def on_stream(peer: SpiffeId, target: ConnectTarget, stream: ServerStream) -> int | None:
            return await self._hbone_stream(sock_peer, peer, target, stream)

        trust_domain = self.core.index.trust_domain
        server = HboneServer(self.pick_identity, on_stream, trust_domain, keepalive=self.keepalive)
        self.hbone_stats["connections"] += 1
        try:
            await server.serve(sock, established)
        finally:
            self.hbone_stats["handshake_failures"] += server.handshake_failures
            self.hbone_stats["rejected_400"] += server.rejected
            for reason, n in server.abuse.items():
                key = f"cut_off_{reason}"
                self.hbone_stats[key] = self.hbone_stats.get(key, 0) + n

    async def _hbone_stream(
        self, sock_peer: Addr, peer: SpiffeId, target: ConnectTarget, stream: ServerStream
    ) -> int | None:
        core = self.core
        dst_ip = str(target.ip)
        # The TCP peer, not `forwarded`: the source proxy dials from inside the source pod's netns,
        # so the peer address is the source pod's IP, and a peer cannot claim another address. The
        # port is the app's (from `forwarded`) when it names that same IP: both nodes' flow records then
        # show one source address (nothing decides on source ports).
        src = sock_peer
        fwd = target.forwarded_for
        if fwd is not None and fwd[1] is not None and fwd[0] == canonical_ip(sock_peer[0]):
            src = (sock_peer[0], fwd[1])
        # its share of the cap is the TLS peer's IP: the source pod's, which dials from its own netns
        source = sock_peer[0]
        if not core.tracker.reserve(source):  # at the cap or its share: the tracker logs it, once
            return int(Status.SERVICE_UNAVAILABLE)
        task = stream.task
        if task is not None:
            self.stream_tasks.add(task)
        t = Tracked(
            new_connection_id(), ConnPath.HBONE, (), src, (dst_ip, target.port), src_identity=str(peer)
        )
        try:
            hit = core.local_workload(dst_ip)
            if hit is None:
                core.tracker.denied(t, REASON_UNKNOWN_DST)
                return int(Status.SERVICE_UNAVAILABLE)
            ep, dst_wl = hit
            # an IP is not an identity: only label what the certificate proves
            t.src_workload = self._proven(core.index.workload_by_ip(src[0]), peer)

            def answer(status: int) -> None:
                stream.respond(status)

            await self.deliver(
                t,
                ep=ep,
                dst_workload=dst_wl,
                port=target.port,
                src_identity=peer,
                client=StreamEnd(stream),
                answer=answer,
                mtls=True,
            )
            return None
        except asyncio.CancelledError:  # the stream was reset, its connection went away, or stop()
            core.tracker.cancelled(t)
            raise
        except Exception as exc:
            log.exception("event=inbound_failed side=hbone conn=%s peer=%s error=%r", t.id, peer, exc)
            core.tracker.failed(t)
            return int(Status.SERVICE_UNAVAILABLE)
        finally:
            core.tracker.release(source)
            if task is not None:
                self.stream_tasks.discard(task)
            if stream.abandoned:  # counted now: a pooled connection may live for days
                self.hbone_stats["streams_abandoned"] += 1

    def _proven(self, workload: Workload | None, peer: SpiffeId) -> Workload | None:
        """`workload` when its identity is the one `peer` proved, else None."""
        if workload is None:
            return None
        try:
            return workload if self.core.index.identity(workload) == peer else None
        except SpiffeIdError:  # a stale entry whose identity cannot be formed: not the peer's
            return None

    # -- 15006 --
    async def plaintext(self, ep: EnrolledPod, client: SocketEnd) -> None:
        """A connection captured by sk_lookup to a pod port: the original port is getsockname()'s."""
        core = self.core
        peer, local = client.peername, client.sockname
        if peer is None or local is None:
            client.close()
            return
        source = peer[0]
        if not core.tracker.reserve(source):  # at the cap or its share: the tracker logs it, once
            client.close()
            return
        dst = (ep.pod.ip, local[1])
        t = Tracked(new_connection_id(), ConnPath.PLAINTEXT_INBOUND, (ep.pod.uid,), peer, dst)
        try:
            dst_wl = core.workload_of(ep)  # its own workload, never another one with its IP
            # For metrics and flow records only, as ztunnel's inbound passthrough (the source
            # workload fetched by the connection's source address): whoever can send from that
            # address gets these labels, so it stays identity-less (`src_identity=None`) to policy.
            t.src_workload = core.index.workload_by_ip(peer[0])
            if dst_wl is None:
                core.tracker.denied(t, REASON_UNKNOWN_DST)
                client.close()
                return

            def answer(status: int) -> None:
                if status != Status.OK:
                    client.close()

            await self.deliver(
                t,
                ep=ep,
                dst_workload=dst_wl,
                port=local[1],
                src_identity=None,
                client=client,
                answer=answer,
                mtls=False,
            )
        except asyncio.CancelledError:
            core.tracker.cancelled(t)
            client.close()
            raise
        except Exception as exc:
            log.exception(
                "event=inbound_failed side=plaintext conn=%s pod=%s peer=%s:%d error=%r",
                t.id,
                ep.pod.uid,
                *peer,
                exc,
            )
            core.tracker.failed(t)
            client.close()
        finally:
            core.tracker.release(source)

    # -- shared --
    async def deliver(
        self,
        t: Tracked,
        *,
        ep: EnrolledPod,
        dst_workload: Workload,
        port: int,
        src_identity: SpiffeId | None,
        client: End,
        answer: Callable[[int], None],
        mtls: bool,
    ) -> None:
        """Refuse a proxy port, refuse plaintext under STRICT, authorize, connect to the app in the
        pod netns, answer (`answer(200|401|503)`), pipe.

        `t` is the connection as its entry point knows it: its path, source (`src`, `src_workload`,
        `src_identity`), the Service the client dialled when known (same node) and the series it is
        already counted under (same node: the source side's). `deliver` completes it and records
        its outcome, unless it raises: then the caller records it (`ConnTracker.unfinished`).

        Counted in the metrics as ztunnel's inbound counts (`inbound.rs` `serve_connect`,
        `inbound_passthrough.rs` `proxy_inbound_plaintext`): not when refused before it knows the
        connection well enough (a proxy port: its `log_early_deny`); from then on opened, with a
        refusal closing it under `response_flags` `DENY` (authorization, STRICT) or, over HBONE
        and same node, `CONNECT` (the app could not be connected to; the passthrough records that
        without a flag), else `-`. A same-node connection's source side (`t.series` on entry) is
        counted as ztunnel's outbound records a CONNECT the destination refused: closed with `-`.
        """
        core = self.core
        dst = (ep.pod.ip, port)
        index = core.index
        src, src_workload = t.src, t.src_workload
        if t.service is None:  # HBONE and 15006 do not carry the Service the client dialled
            t.service = index.inbound_service(dst_workload, port)
        # a plaintext peer's workload is only its IP's: it must not tie the connection to that pod
        src_ep = self._src_pod(src_workload) if src_identity is not None else None
        src_uid = src_ep.pod.uid if src_ep is not None else ""
        t.pod_uids = tuple(dict.fromkeys(p for p in (ep.pod.uid, src_uid) if p))
        t.dst, t.dst_workload = dst, dst_workload
        src_side = t.series
        if port in (PORT_OUTBOUND, PORT_INBOUND, core.hbone_port):
            # Dialling it would be accepted by the proxy again (15006 listens on the pod IP), which
            # dials it again: one connection from anyone who reaches the pod took every slot.
            core.tracker.denied(t, REASON_PROXY_PORT, src_side)
            answer(Status.SERVICE_UNAVAILABLE)
            return
        peers = TcpPeers(
            reporter="destination",
            src_workload=src_workload,
            src_principal=t.src_identity or None,
            dst_workload=dst_workload,
            dst_principal=str(index.identity(dst_workload)),
            service=t.service,
            mtls=mtls,
        )
        t.series = (*src_side, core.metrics.series(peers))
        plaintext = t.path is ConnPath.PLAINTEXT_INBOUND

        def refuse(reason: str, status: int, flags: ResponseFlags) -> None:
            core.tracker.denied(t, reason, (*src_side, core.metrics.series(peers, flags)))
            answer(status)

        # istiod hands STRICT to ztunnel as an authorization rule: refused like a policy deny
        if plaintext and index.peer_auth(dst_workload, port) is MtlsMode.STRICT:
            refuse(REASON_STRICT, Status.UNAUTHORIZED, ResponseFlags.DENY)
            return
        authz, decision = index.authorize(
            dst_workload=dst_workload, src_ip=src[0], src_identity=src_identity, dst_ip=dst[0], dst_port=port
        )
        t.authz, t.deciding = authz, decision
        if not decision.allowed:
            refuse(str(decision.reason), Status.UNAUTHORIZED, ResponseFlags.DENY)
            return
        try:
            # from the peer's IP (the app sees who called); a pod calling itself already does
            source_ip = src[0] if ep.source_ip and src[0] != ep.pod.ip else None
            app = await core.dial(ep.pod.netns_path, dst, source_ip)
        except ProxyError as exc:
            core.tracker.stats["upstream_error"] += 1
            log.warning(
                "event=inbound_upstream_failed conn=%s pod=%s dst=%s:%d reason=%s detail=%r",
                t.id,
                ep.pod.uid,
                *dst,
                exc.reason,
                exc.detail,
            )
            refuse(
                exc.reason,
                Status.SERVICE_UNAVAILABLE,
                ResponseFlags.NONE if plaintext else ResponseFlags.CONNECT,
            )
            return
        try:
            # The dial can take up to the connect timeout, and the connection is not open yet, so a
            # push or a pod stop in the meantime could not reach it (`tracker.recheck`,
            # `kill_pods`): it must not open on what no longer holds.
            if not core.serves(ep):
                app.close()
                refuse(REASON_POD_STOPPED, Status.SERVICE_UNAVAILABLE, ResponseFlags.NONE)
                return
            # the same for a source pod of this node (same node): the connection is its too
            if src_ep is not None and not core.serves(src_ep):
                app.close()
                refuse(REASON_SOURCE_POD_STOPPED, Status.SERVICE_UNAVAILABLE, ResponseFlags.NONE)
                return
            if core.index is not index:
                reason = refusal(core.index, t)
                if reason is not None:
                    app.close()
                    refuse(reason, Status.UNAUTHORIZED, ResponseFlags.DENY)
                    return
            answer(Status.OK)
        except BaseException:  # nothing else would close the app's connection (pipe() has not begun)
            app.close()
            raise
        await core.pipe(t, client, app)

    def _src_pod(self, src_workload: Workload | None) -> EnrolledPod | None:
        """The pod this proxy serves for the (proven) source workload, if any (same node)."""
        if src_workload is None or not src_workload.ips:
            return None
        return self.core.served.get(src_workload.ips[0])
