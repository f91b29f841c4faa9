"""Temporary plaintext relay for enrolled pods, until the real proxy lands (issue 4 item 3).

Outbound: accepts on the pod's 15001 listener, asks the datapath for the original destination
(unknown -> close: fail closed), connects to it from inside the pod netns with a socket created
by this process (not in the pod cgroup, so not captured again) and pipes bytes both ways.
Inbound: accepts on 15006, takes the original port from ``getsockname()`` and connects to
``<pod ip>:<port>`` from inside the pod netns; that goes over ``lo``, which sk_lookup passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from agent.datapath.interface import Datapath, EnrolledPod
from agent.datapath.netns import in_netns

log = logging.getLogger(__name__)

Addr = tuple[str, int]
BUFFER_LIMIT = 64 * 1024  # per direction, bytes held before back-pressure
CONNECT_TIMEOUT = 5.0
MAX_RECORDED = 1024  # relayed connections kept for relayed(); oldest dropped first


@dataclass(frozen=True)
class RelayedConnection:
    """One relayed connection: direction, pod, peer as accepted, original and dialled target."""

    direction: str  # "outbound" | "inbound"
    pod_uid: str
    peer: Addr
    original_dst: Addr
    upstream: Addr


class Relay:
    """Accept loops on the listeners of enrolled pods; ``vips`` maps a service VIP to a backend."""

    def __init__(self, datapath: Datapath, vips: Mapping[Addr, Addr] | None = None) -> None:
        self._dp = datapath
        self._vips = dict(vips or {})
        self._servers: dict[str, list[asyncio.Server]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: deque[RelayedConnection] = deque(maxlen=MAX_RECORDED)
        self.stats: dict[str, int] = {"outbound": 0, "inbound": 0, "fail_closed": 0, "upstream_error": 0}

    async def serve(self, ep: EnrolledPod) -> None:
        """Start relaying the pod's 15001 and 15006 listeners (idempotent)."""
        if ep.pod.uid in self._servers or ep.outbound is None or ep.inbound is None:
            return
        out = await asyncio.start_server(lambda r, w: self._outbound(ep, r, w), sock=ep.outbound,
                                         limit=BUFFER_LIMIT)
        inb = await asyncio.start_server(lambda r, w: self._inbound(ep, r, w), sock=ep.inbound,
                                         limit=BUFFER_LIMIT)
        self._servers[ep.pod.uid] = [out, inb]

    async def stop(self, pod_uid: str | None = None) -> None:
        """Stop accepting for one pod (or all) and cancel their open relays when stopping all."""
        uids = [pod_uid] if pod_uid is not None else list(self._servers)
        for uid in uids:
            for srv in self._servers.pop(uid, []):
                srv.close()
        if pod_uid is None:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def relayed(self) -> list[RelayedConnection]:
        """The last ``MAX_RECORDED`` relayed connections (oldest first)."""
        return list(self.connections)

    async def _outbound(self, ep: EnrolledPod, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        peer: Addr = writer.get_extra_info("peername")
        try:
            orig = self._dp.original_destination(ep.netns_cookie, peer)
        except Exception as exc:  # the datapath must not kill the accept loop
            log.warning("event=relay_lookup_error pod=%s peer=%s:%d error=%r", ep.pod.uid, *peer, exc)
            orig = None
        if orig is None:
            self.stats["fail_closed"] += 1
            log.warning("event=relay_fail_closed pod=%s peer=%s:%d reason=no_original_destination",
                        ep.pod.uid, *peer)
            writer.close()
            return
        upstream = self._vips.get(orig, orig)
        self.stats["outbound"] += 1
        await self._relay("outbound", ep, peer, orig, upstream, reader, writer)

    async def _inbound(self, ep: EnrolledPod, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        peer: Addr = writer.get_extra_info("peername")
        local: Addr = writer.get_extra_info("sockname")
        self.stats["inbound"] += 1
        await self._relay("inbound", ep, peer, local, (ep.pod.ip, local[1]), reader, writer)

    async def _relay(self, direction: str, ep: EnrolledPod, peer: Addr, orig: Addr, upstream: Addr,
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RelayedConnection(direction, ep.pod.uid, peer, orig, upstream)
        try:
            with in_netns(ep.pod.netns_path):  # synchronous: no await while in the pod netns
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, upstream),
                                       CONNECT_TIMEOUT)
            except BaseException:
                sock.close()
                raise
            up_r, up_w = await asyncio.open_connection(sock=sock, limit=BUFFER_LIMIT)
        except Exception as exc:
            self.stats["upstream_error"] += 1
            log.warning("event=relay_upstream_error direction=%s pod=%s peer=%s:%d upstream=%s:%d error=%r",
                        direction, ep.pod.uid, *peer, *upstream, exc)
            writer.close()
            return
        self.connections.append(conn)
        log.info("event=relay_open direction=%s pod=%s peer=%s:%d original_dst=%s:%d upstream=%s:%d",
                 direction, ep.pod.uid, *peer, *orig, *upstream)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        finally:
            if task is not None:
                self._tasks.discard(task)
            for w in (writer, up_w):
                w.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; drain() bounds the bytes buffered."""
    try:
        while data := await src.read(BUFFER_LIMIT):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        with contextlib.suppress(Exception):
            dst.close()
