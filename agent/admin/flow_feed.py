"""The proxy workers' flows in the main process's flow ring, so `nodemesh flows` shows the node's.

One follower per up worker reads the worker's `/v1/flows?follow=1` (no filter: its stored history,
then every new record) and adds each record to the main ring as is; the worker has already logged
it, so nothing is logged again. A stream that ends (the worker stopped or restarted) is opened again
with capped backoff while the supervisor reports the worker up (`workers()` is polled each second).

No record is taken twice and none is missed across a reconnect: the stream's first line names the
worker's ring (`ring_id`, one per process) and its `added` count, which numbers the records that
follow. Reconnecting to the same ring skips the numbers already taken; a new ring (a restarted
worker) is taken whole. Records a worker reports lost for this follower (`dropped` lines), or that
left its ring before they could be read, are counted, as are malformed lines (logged and skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

from agent.admin import client
from agent.admin.client import PeerError
from agent.admin.flows import FlowRecord, FlowRing
from agent.admin.sources import Workers

log = logging.getLogger("nodemesh.agent.admin")

FOLLOW_TARGET = "/v1/flows?follow=1"
POLL_INTERVAL = 1.0  # seconds between reads of the supervisor's `workers()`
CONNECT_TIMEOUT = 1.0  # to connect and get the stream's head
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
# What a line that is not understood raises: json.loads (ValueError; RecursionError when nested too
# deep), a missing or wrongly typed field (KeyError, TypeError, AttributeError), int() of an
# infinite float (OverflowError)
_BAD_LINE = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)


def _count(value: object) -> int:
    """A count a worker sent: an integer >= 0 (a negative one would move the cursor back and the
    `lost` counter down; a float or a string is not what the worker writes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


@dataclass(slots=True)
class _Position:
    """How far the main ring has one worker's records: which ring, and the last sequence number taken."""

    ring_id: str = ""
    seen: int = 0


@dataclass(slots=True)
class _Stream:
    """One connection's reading state: the sequence number of the last line read."""

    started: bool = False
    cursor: int = 0  # sequence number of the last record read (or reported dropped)
    skip_until: int = 0  # records up to this number are in the main ring already
    malformed: int = 0


class WorkerFlowFeed:
    """Copies every up proxy worker's flow records into `ring` until `close()`. Also a Prometheus
    collector of its own counters (register it in the main process's registry)."""

    def __init__(
        self,
        workers: Workers,
        ring: FlowRing,
        *,
        poll_interval: float = POLL_INTERVAL,
        connect_timeout: float = CONNECT_TIMEOUT,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
    ) -> None:
        self._workers = workers
        self._ring = ring
        self._poll_interval = poll_interval
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._poller: asyncio.Task[None] | None = None
        self._followers: dict[int, asyncio.Task[None]] = {}
        self._positions: dict[int, _Position] = {}
        self._sockets: dict[int, Path] = {}
        # per worker index: records added to the ring, lost (dropped by the worker or evicted
        # before read), malformed lines; and streams that failed or broke
        self.flows: dict[str, Counter[int]] = {
            "received": Counter(), "lost": Counter(), "malformed": Counter()
        }
        self.stream_errors: Counter[int] = Counter()

    async def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="worker-flows")

    async def close(self) -> None:
        tasks = [t for t in (self._poller, *self._followers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._poller = None
        self._followers.clear()

    async def _poll(self) -> None:
        while True:
            self.sync()
            await asyncio.sleep(self._poll_interval)

    def sync(self) -> None:
        """Follow every up worker, stop following the others (done by the poller each second)."""
        try:
            workers = list(self._workers())
        except Exception as exc:  # a supervisor bug must not end the feed
            log.exception("event=worker_flows_poll_failed error=%r", str(exc))
            return
        up = {w.index: w for w in workers if w.up}
        for index, task in list(self._followers.items()):
            if index not in up or task.done():
                task.cancel()  # a down worker's stream has ended anyway; its socket may be reused
                del self._followers[index]
        for index, w in up.items():
            self._sockets[index] = w.admin_socket
            if index not in self._followers:
                self._followers[index] = asyncio.create_task(
                    self._follow(index), name=f"worker-flows-{index}"
                )

    async def _follow(self, index: int) -> None:
        delay, cap = self._backoff
        failures = 0
        while True:
            stream = _Stream()
            lines = client.stream_lines(self._sockets[index], FOLLOW_TARGET, timeout=self._connect_timeout)
            try:
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        self._take(index, stream, line)
                        if failures and stream.started:
                            log.info("event=worker_flows_following worker=%d after_failures=%d",
                                     index, failures)
                            failures = 0
                log.info("event=worker_flows_ended worker=%d", index)  # it stopped or is restarting
            except PeerError as exc:
                self.stream_errors[index] += 1
                failures += 1
                # the first failure is worth a warning; a worker being restarted fails a few times more
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "event=worker_flows_failed worker=%d error=%r failures=%d retry_in=%.2fs",
                        index, str(exc), failures, delay)
            if stream.started:
                delay = self._backoff[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    def _take(self, index: int, stream: _Stream, line: bytes) -> None:
        """One line of a worker's stream: a record goes to the ring, the rest is counted. A line that
        is not understood is skipped (PeerError ends the stream when it is the first one)."""
        if not line.strip():
            return
        if not stream.started:
            self._start(index, stream, line)
            return
        try:
            item = json.loads(line)
            kind = item["kind"]
            if kind == "flow":
                stream.cursor += 1
                if stream.cursor <= stream.skip_until:
                    return
                self._positions[index].seen = stream.cursor  # taken, even if it turns out malformed
                self._ring.add(FlowRecord.from_dict(item["flow"]))
                self.flows["received"][index] += 1
            elif kind == "dropped":
                count = _count(item["count"])
                stream.cursor += count
                self._positions[index].seen = max(self._positions[index].seen, stream.cursor)
                self.flows["lost"][index] += count
            else:
                raise ValueError(f"unexpected line kind {kind!r}")
        except _BAD_LINE as exc:
            self.flows["malformed"][index] += 1
            stream.malformed += 1
            log.log(logging.WARNING if stream.malformed == 1 else logging.DEBUG,
                    "event=worker_flow_malformed worker=%d error=%r line=%r", index, str(exc), line[:200])

    def _start(self, index: int, stream: _Stream, line: bytes) -> None:
        try:
            item = json.loads(line)
            if item["kind"] != "start":
                raise ValueError(f"first line is {item['kind']!r}, not start")
            ring_id = str(item.get("ring_id") or "")
            added, stored = _count(item["ring"]["added"]), _count(item["ring"]["stored"])
            if stored > added:
                raise ValueError(f"ring stores {stored} records of {added} added")
        except _BAD_LINE as exc:
            raise PeerError(f"bad first line of the flow stream: {exc}; {line[:200]!r}") from None
        pos = self._positions.setdefault(index, _Position())
        first = added - stored + 1  # sequence number of the first stored record (all are sent)
        if ring_id and ring_id == pos.ring_id and added >= pos.seen:
            stream.skip_until = pos.seen
            evicted_unseen = first - 1 - pos.seen  # left the ring before this reader could take them
            if evicted_unseen > 0:
                self.flows["lost"][index] += evicted_unseen
        else:  # a new process: all of its records are new here
            pos.ring_id, pos.seen = ring_id, 0
        stream.cursor = first - 1
        stream.started = True

    def collect(self) -> Iterator[Metric]:
        flows = CounterMetricFamily(
            "nodemesh_proxy_worker_flows",
            "Flow records of proxy workers read by the main process: received (added to its flow ring), "
            "lost (dropped by the worker for this reader, or gone from its ring), malformed",
            labels=["worker", "outcome"],
        )
        for outcome, counts in self.flows.items():
            for index, count in sorted(counts.items()):  # items() copied at once: the loop adds keys
                flows.add_metric([str(index), outcome], count)
        yield flows
        errors = CounterMetricFamily(
            "nodemesh_proxy_worker_flow_stream_errors",
            "Flow streams from proxy workers that could not be opened or broke (then retried)",
            labels=["worker"],
        )
        for index, count in sorted(self.stream_errors.items()):
            errors.add_metric([str(index)], count)
        yield errors
