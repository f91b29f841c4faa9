"""The main agent process's reads of its proxy workers' admin APIs: connections, certificates, status.

The main process's admin server (worker 0) asks every up worker's socket at once, each within
`timeout`, so `nodemesh conns`, `certs` and `status` show the node and not one process. A worker
that does not answer in time, or answers nonsense, is left out and named in the answer
(`workers_unreachable`, or `connections: null` in the status), never a failed request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from agent.admin import client
from agent.admin.client import PeerError
from agent.admin.sources import ProxyCounts, ProxyWorker, Workers

log = logging.getLogger("nodemesh.agent.admin")

PEER_TIMEOUT = 0.75  # seconds a worker has to answer one admin request


class WorkerPeers:
    """Asks the proxy workers' admin sockets; `workers` is the supervisor's `workers()`."""

    def __init__(self, workers: Workers, *, timeout: float = PEER_TIMEOUT) -> None:
        self._workers = workers
        self.timeout = timeout
        self.failures = 0  # answers that could not be used, each one logged

    async def _ask_all(self, target: str) -> list[tuple[ProxyWorker, Any | None]]:
        """Every worker with its JSON answer to `target`; None when it is down or gave no usable answer."""
        workers = sorted(self._workers(), key=lambda w: w.index)

        async def ask(w: ProxyWorker) -> Any | None:
            if not w.up:
                return None
            try:
                return await client.get_json(w.admin_socket, target, timeout=self.timeout)
            except PeerError as exc:
                self._failed(w, target, str(exc))
            except Exception as exc:  # what the client did not foresee: a worker's nonsense or a bug
                self._failed(w, target, repr(exc), unexpected=True)
            return None

        answers = await asyncio.gather(*(ask(w) for w in workers))
        return list(zip(workers, answers, strict=True))

    def _failed(self, w: ProxyWorker, target: str, error: str, *, unexpected: bool = False) -> None:
        """Count and log a worker left out; `unexpected` (not a PeerError) is logged as an error with
        its traceback: one worker's answer never fails the main process's, but the bug is found."""
        self.failures += 1
        log.log(logging.ERROR if unexpected else logging.WARNING,
                "event=proxy_worker_unreachable worker=%d socket=%s request=%s error=%r",
                w.index, w.admin_socket, target, error, exc_info=unexpected)

    async def connections(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The up workers' connections (each row with its `worker` index), and the indexes of the up
        workers whose connections could not be read."""
        return await self._rows("/v1/connections", "connections", _connection_rows)

    async def certs(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The up workers' certificates (each process has its own key and certificate for every
        local identity; each row with its `worker` index), and the up workers that did not answer."""
        return await self._rows("/v1/certs", "certs", _cert_rows)

    async def _rows(
        self, target: str, what: str, parse: Callable[[Any], list[dict[str, Any]] | None]
    ) -> tuple[list[dict[str, Any]], list[int]]:
        rows: list[dict[str, Any]] = []
        unreachable: list[int] = []
        for w, doc in await self._ask_all(target):
            if not w.up:
                continue
            got = None if doc is None else parse(doc)
            if got is None:
                if doc is not None:
                    self._failed(w, target, f"not a {what} document")
                unreachable.append(w.index)
                continue
            for row in got:
                row["worker"] = w.index
            rows += got
        return rows, unreachable

    async def proxy_counts(self) -> list[tuple[ProxyWorker, ProxyCounts | None]]:
        """Every worker with its proxy's active connections and listeners (None: down, or no answer)."""
        out: list[tuple[ProxyWorker, ProxyCounts | None]] = []
        for w, doc in await self._ask_all("/v1/status"):
            counts = None if doc is None else _proxy_counts(doc)
            if counts is None and doc is not None:
                self._failed(w, "/v1/status", "no proxy.active_connections/listeners in the status")
            out.append((w, counts))
        return out


def _connection_rows(doc: Any) -> list[dict[str, Any]] | None:
    """The rows of a `/v1/connections` document, or None when it is not one (each row needs a
    numeric `opened_at`: the merged list is sorted by it)."""
    rows = doc.get("connections") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        return None
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("opened_at"), int | float):
            return None
    return rows


def _cert_rows(doc: Any) -> list[dict[str, Any]] | None:
    """The rows of a `/v1/certs` document, or None when it is not one (each row needs a string
    `identity`: the merged list is sorted by it)."""
    rows = doc.get("certs") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        return None
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("identity"), str):
            return None
    return rows


def _proxy_counts(doc: Any) -> ProxyCounts | None:
    proxy = doc.get("proxy") if isinstance(doc, dict) else None
    if not isinstance(proxy, dict):
        return None
    connections, listeners = proxy.get("active_connections"), proxy.get("listeners")
    if not isinstance(connections, int) or not isinstance(listeners, int):
        return None
    if isinstance(connections, bool) or isinstance(listeners, bool) or min(connections, listeners) < 0:
        return None
    keys = ("connection_slots_in_use", "connection_slots", "connection_slots_per_source")
    slots = [proxy.get(k, 0) for k in keys]
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in slots):
        return None
    return ProxyCounts(
        connections=connections,
        listeners=listeners,
        slots_in_use=slots[0],
        slots=slots[1],
        slots_per_source=slots[2],
    )
