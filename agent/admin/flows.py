"""The node's flow log: a bounded ring of connection records, and live followers (`nodemesh flows -f`).

The proxy calls `FlowRing.add(record)` for every connection it opens, closes or denies. `add` is O(1)
in the ring size and never blocks or awaits: the ring is a `deque(maxlen=capacity)` and each follower
has a bounded queue. A follower that falls behind loses records (the producer never waits for it);
the loss is counted and handed to the follower as a `Dropped` marker at the place of the gap, like
`hubble observe` reports lost events. Call `add` from the event loop's thread (asyncio queues are not
thread-safe).
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, get_args, get_type_hints

DEFAULT_CAPACITY = 10_000
DEFAULT_SUBSCRIBER_QUEUE = 4_096


class Verdict(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


class FlowEvent(StrEnum):
    """`open`: a connection was accepted; `close`: it ended (bytes and duration final); `deny`: refused."""

    OPEN = "open"
    CLOSE = "close"
    DENY = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowRecord:
    """One connection event as the node proxy saw it.

    Pods are `<namespace>/<name>` split in two fields; `src_identity` is the peer's SPIFFE ID
    (`spiffe://...`), empty for plaintext; `dst_service` is the Service hostname
    (`<svc>.<ns>.svc.cluster.local`): the one the client dialled (a VIP), or on the destination side
    the Service of the workload's target port (docs/proxy.md "Metrics"); empty for none. `policy` and
    `rule` name what decided (`<ns>/<name>`, index in `spec.rules`), empty/None when no policy did.
    `reason` is the evaluator's `Reason` (or a proxy reason such as `STRICT_MTLS_PLAINTEXT`).
    """

    time: float  # Unix time of the event
    event: FlowEvent
    verdict: Verdict
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    src_pod: str = ""
    src_namespace: str = ""
    src_identity: str = ""
    dst_pod: str = ""
    dst_namespace: str = ""
    dst_service: str = ""
    policy: str = ""
    rule: int | None = None
    reason: str = ""
    bytes_sent: int = 0  # client → server
    bytes_received: int = 0  # server → client
    duration: float | None = None  # seconds, on close
    connection_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        # every field is a scalar: no deep copy (dataclasses.asdict was a third of a follower's cost)
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["event"] = self.event.value
        d["verdict"] = self.verdict.value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowRecord:
        # per record of every proxy worker in the main process (agent/admin/flow_feed.py): a dict
        # made once, not `dataclasses.fields` per call (which was half of this method's cost)
        values = {k: v for k, v in data.items() if k in _FIELD_TYPES}
        # A worker's record joins the main ring as is: a wrongly typed field (a `time` that is a
        # string) would break every later `?since=` filter and the CLI's table, not this call.
        for name, value in values.items():
            # exact types, as JSON gives them: a bool is no int here; NaN and Infinity are no time
            kind = type(value)
            if kind not in _FIELD_TYPES[name] or (kind is float and not math.isfinite(value)):
                raise TypeError(f"flow field {name} is {value!r:.50} ({type(value).__name__})")
        values["event"] = FlowEvent(values["event"])
        values["verdict"] = Verdict(values["verdict"])
        return cls(**values)


def _json_types(hint: Any) -> tuple[type, ...]:
    """The exact types a field of type `hint` is read from: an enum's value is its string (or the
    enum), a float may be written as an int."""
    out: list[type] = []
    for t in get_args(hint) or (hint,):
        if t is float:
            out += [int, float]
        elif isinstance(t, type) and issubclass(t, StrEnum):
            out += [str, t]
        else:
            out.append(t)
    return tuple(out)


_FIELD_NAMES = tuple(f.name for f in fields(FlowRecord))
_FIELD_TYPES = {name: _json_types(hint) for name, hint in get_type_hints(FlowRecord).items()}


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Server-side selection. `pod` is `name` or `namespace/name` and matches either end; so does
    `namespace`. `since` is a Unix time (inclusive). Empty fields select everything."""

    pod: str = ""
    namespace: str = ""
    verdict: Verdict | None = None
    since: float | None = None

    def matches(self, r: FlowRecord) -> bool:
        if self.verdict is not None and r.verdict is not self.verdict:
            return False
        if self.since is not None and r.time < self.since:
            return False
        if self.namespace and self.namespace not in (r.src_namespace, r.dst_namespace):
            return False
        if self.pod:
            ns, sep, name = self.pod.rpartition("/")
            if sep:
                return (r.src_namespace == ns and r.src_pod == name) or (
                    r.dst_namespace == ns and r.dst_pod == name
                )
            return name in (r.src_pod, r.dst_pod)
        return True

    @property
    def everything(self) -> bool:
        return not self.pod and not self.namespace and self.verdict is None and self.since is None


@dataclass(frozen=True, slots=True)
class Dropped:
    """`count` records matching the follower's filter were lost here; `total` since it subscribed."""

    count: int
    total: int


class Subscription:
    """One follower: a bounded queue fed by `FlowRing.add`, read with `await next()`.

    Drops are not hidden: when the queue is full, matching records are counted; as soon as there is
    room again a `Dropped` marker is queued before the next record, so the follower sees where the
    gap is. Close it (or use it as a context manager) to stop receiving.
    """

    def __init__(self, ring: FlowRing, flt: FlowFilter, maxsize: int) -> None:
        self._ring = ring
        self.filter = flt
        self._queue: asyncio.Queue[FlowRecord | Dropped] = asyncio.Queue(maxsize)
        self._pending_drops = 0
        self.dropped = 0  # total records lost by this follower
        self.delivered = 0

    def offer(self, record: FlowRecord) -> None:
        """Called by the ring for each new record; never blocks."""
        if not self.filter.matches(record):
            return
        q = self._queue
        if self._pending_drops:
            # Two slots: the marker and the record, so the record never overtakes the marker.
            if q.maxsize - q.qsize() < 2:
                self._drop()
                return
            q.put_nowait(Dropped(self._pending_drops, self.dropped))
            self._pending_drops = 0
        if q.full():
            self._drop()
            return
        q.put_nowait(record)

    def _drop(self) -> None:
        self._pending_drops += 1
        self.dropped += 1
        self._ring.dropped += 1

    def pending(self) -> int:
        return self._queue.qsize()

    def get_nowait(self) -> FlowRecord | Dropped | None:
        """The next item if one is ready (a pending drop marker counts), else None."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if not self._pending_drops:
                return None
            item = Dropped(self._pending_drops, self.dropped)
            self._pending_drops = 0
        if isinstance(item, FlowRecord):
            self.delivered += 1
        return item

    async def next(self) -> FlowRecord | Dropped:
        item = self.get_nowait()
        if item is not None:
            return item
        got = await self._queue.get()
        if isinstance(got, FlowRecord):
            self.delivered += 1
        return got

    def close(self) -> None:
        self._ring.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlowRing:
    """The last `capacity` flow records of this node, plus live subscribers."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE):
        if capacity < 1 or subscriber_queue < 2:
            raise ValueError("capacity must be >= 1 and subscriber_queue >= 2")
        self.capacity = capacity
        self.subscriber_queue = subscriber_queue
        self._records: deque[FlowRecord] = deque(maxlen=capacity)
        self._subscribers: list[Subscription] = []
        self.added = 0  # records ever added: the last record's sequence number
        self.dropped = 0  # records lost by slow followers, all followers together
        # Which ring this is (one per process): a follower that reconnects to the same ring skips
        # the sequence numbers it has already taken, and takes all of a new ring (a restarted worker).
        self.id = secrets.token_hex(8)

    def add(self, record: FlowRecord) -> None:
        """Store `record` and hand it to the followers. O(1) in the ring size, never blocks."""
        self._records.append(record)
        self.added += 1
        for sub in self._subscribers:
            sub.offer(record)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[FlowRecord]:
        return iter(self._records)

    @property
    def evicted(self) -> int:
        """Records pushed out of the ring by newer ones."""
        return self.added - len(self._records)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def snapshot(self, flt: FlowFilter = FlowFilter(), last: int | None = None) -> list[FlowRecord]:
        """The stored records that match, oldest first; at most the `last` newest when given."""
        rows = list(self._records) if flt.everything else [r for r in self._records if flt.matches(r)]
        if last is not None:
            rows = rows[-last:] if last > 0 else []
        return rows

    def subscribe(self, flt: FlowFilter = FlowFilter(), maxsize: int | None = None) -> Subscription:
        """A follower of records added from now on (take a `snapshot` first, without awaiting in
        between, to get history with no gap and no duplicate)."""
        sub = Subscription(self, flt, maxsize or self.subscriber_queue)
        self._subscribers = [*self._subscribers, sub]  # copy: add() may be iterating
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers = [s for s in self._subscribers if s is not sub]

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "stored": len(self._records),
            "added": self.added,
            "evicted": self.evicted,
            "followers": len(self._subscribers),
            "follower_drops": self.dropped,
        }
