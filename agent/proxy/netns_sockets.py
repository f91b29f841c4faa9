"""Unconnected TCP sockets made ahead of time inside pod network namespaces.

A socket belongs to the netns it was created in, and only a thread that entered the netns (setns) can
create one there. Doing that per connection costs a hop to a worker thread, two setns calls and the
GIL handover both ways: at a thousand new connections per second it was most of the proxy's
per-connection cost. `NetnsSockets` makes them in batches instead: one hop and one pair of setns
per `batch` sockets, and `take` is then a pop from a list on the event loop's thread.

Bounded: at most `batch` idle sockets per netns (a pod that never dials has none), refilled when a
take leaves fewer than `low` (a refill in flight is shared, never doubled). `drop(netns_path)` closes
a pod's sockets when the pod leaves, and a refill that finishes after that closes what it made, so a
socket of a removed netns is never handed out (a new pod with the same netns path gets new ones).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.datapath.netns import in_netns

log = logging.getLogger(__name__)

BATCH = 16
LOW = 4


async def connect(
    sock: socket.socket, dst: tuple[str, int], loop: asyncio.AbstractEventLoop | None = None
) -> None:
    """Connect a non-blocking socket to a numeric `dst`; OSError as connect(2) reports it.

    Not `loop.sock_connect`: uvloop's resolves the address string with getaddrinfo (IDNA encoding
    included) on every call, a tenth of the proxy's CPU at a thousand new connections per second.
    A connection to this host is mostly established after one loop turn: checked then, before
    registering with the poller (two epoll_ctl(2) fewer).
    """
    err = sock.connect_ex(dst)
    if err == 0:
        return
    if err != errno.EINPROGRESS:
        raise OSError(err, f"connect {dst[0]}:{dst[1]}: {os.strerror(err)}")
    await asyncio.sleep(0)  # one loop turn: a peer on this host has answered by then, mostly
    # Linux: 0 (first call after it completed) or EISCONN once connected, EALREADY while pending,
    # else the error that ended it
    err = sock.connect_ex(dst)
    if err in (0, errno.EISCONN):
        return
    if err not in (errno.EALREADY, errno.EINPROGRESS):
        raise OSError(err, f"connect {dst[0]}:{dst[1]}: {os.strerror(err)}")
    loop = asyncio.get_running_loop() if loop is None else loop
    fd = sock.fileno()
    writable = loop.create_future()
    loop.add_writer(fd, _set_done, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err != 0:
        raise OSError(err, f"connect {dst[0]}:{dst[1]}: {os.strerror(err)}")


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def make_sockets(netns_path: str, count: int) -> list[socket.socket]:
    """`count` non-blocking TCP sockets (TCP_NODELAY) created inside the netns at `netns_path`.

    Runs on a worker thread (setns is per thread). Raises DatapathError when the netns is gone.
    """
    made: list[socket.socket] = []
    try:
        with in_netns(netns_path):  # synchronous: nothing else runs on this thread meanwhile
            for _ in range(count):
                made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        for sock in made:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


@dataclass(eq=False)
class _Pool:
    idle: list[socket.socket] = field(default_factory=list)
    refill: asyncio.Task[None] | None = None
    dropped: bool = False


class NetnsSockets:
    """Per-netns stock of fresh TCP sockets; use from the event loop's thread only."""

    def __init__(
        self,
        *,
        batch: int = BATCH,
        low: int = LOW,
        make: Callable[[str, int], list[socket.socket]] = make_sockets,
    ) -> None:
        if not 0 <= low < batch:
            raise ValueError(f"need 0 <= low < batch, got low={low} batch={batch}")
        self.batch = batch
        self.low = low
        self._make = make
        self._pools: dict[str, _Pool] = {}

    async def take(self, netns_path: str) -> socket.socket:
        """A new, unconnected, non-blocking TCP socket of that netns. Raises what `make` raised
        (DatapathError for a netns that is gone, OSError for no fds)."""
        pool = self._pools.get(netns_path)
        if pool is None:
            pool = self._pools[netns_path] = _Pool()
        while not pool.idle:  # (again when other takers emptied the new batch first)
            await asyncio.shield(self._refill(netns_path, pool))
            if pool.dropped:  # the pod left while we waited: its netns may be gone or reused
                raise ConnectionAbortedError(f"{netns_path}: pod removed")
        sock = pool.idle.pop()
        if len(pool.idle) < self.low:
            self._refill(netns_path, pool)
        return sock

    def _refill(self, netns_path: str, pool: _Pool) -> asyncio.Task[None]:
        if pool.refill is None:
            pool.refill = asyncio.get_running_loop().create_task(self._fill(netns_path, pool))
            pool.refill.add_done_callback(_retrieved)
        return pool.refill

    async def _fill(self, netns_path: str, pool: _Pool) -> None:
        try:
            made = await asyncio.to_thread(self._make, netns_path, self.batch - len(pool.idle))
        finally:
            pool.refill = None
        if pool.dropped:
            for sock in made:
                sock.close()
            return
        pool.idle.extend(made)

    def drop(self, netns_path: str) -> None:
        """Close the idle sockets of a netns (its pod left); a refill in flight closes its own."""
        pool = self._pools.pop(netns_path, None)
        if pool is None:
            return
        pool.dropped = True
        for sock in pool.idle:
            sock.close()
        pool.idle.clear()

    def close(self) -> None:
        for path in list(self._pools):
            self.drop(path)

    def idle(self) -> int:
        """Idle sockets held, over all netns (for stats)."""
        return sum(len(p.idle) for p in self._pools.values())


def _retrieved(task: asyncio.Task[None]) -> None:
    """A background refill's failure is the next `take`'s to report (it makes its own): no
    "exception was never retrieved" noise, one debug line."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("event=netns_socket_refill_failed error=%r", exc)
