"""Sans-IO core of one node's config stream: what the node ACKed, what is in flight, what to send next.

Level-based: the stream never queues intermediate states. When the mesh changes while a push is
in flight, the next push is computed from the latest view against what the node ACKed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from api.resources import Resource, resource_version


@dataclass(frozen=True, slots=True)
class Delta:
    """Resources to upsert `(key, version, resource)` and keys to remove, sorted by key."""

    upserts: tuple[tuple[str, str, Resource], ...]
    removals: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals)


def diff(known: Mapping[str, str], desired: Mapping[str, Resource]) -> Delta:
    """What turns a node holding `known` (key → version) into one holding `desired`."""
    upserts = []
    for key in sorted(desired):
        version = resource_version(desired[key])
        if known.get(key) != version:
            upserts.append((key, version, desired[key]))
    removals = tuple(sorted(k for k in known if k not in desired))
    return Delta(tuple(upserts), removals)


@dataclass(frozen=True, slots=True)
class Push:
    """One response to send: its nonce, whether it is a full snapshot, and the delta."""

    nonce: str
    snapshot: bool
    delta: Delta


@dataclass(slots=True)
class StreamState:
    """Per-stream bookkeeping; the I/O layer calls `next_push`, `on_ack` and `on_nack`."""

    acked: dict[str, str]
    inflight: tuple[str, dict[str, str]] | None = None
    rejected: dict[str, str] | None = None  # the target versions of the last NACKed push
    sent_first: bool = False
    _counter: int = field(default=0)

    def next_push(self, view: Mapping[str, Resource]) -> Push | None:
        """The push that brings the node to `view`, or None (nothing new, or a push in flight)."""
        if self.inflight is not None:
            return None
        delta = diff(self.acked, view)
        target = {key: resource_version(res) for key, res in view.items()}
        if self.sent_first and (not delta or target == self.rejected):
            return None
        snapshot = not self.sent_first and not self.acked
        self.sent_first = True
        self._counter += 1
        nonce = str(self._counter)
        self.inflight = (nonce, target)
        return Push(nonce, snapshot, delta)

    def on_ack(self, nonce: str) -> bool:
        """Record an ACK; False when the nonce is not the in-flight push (stale or bogus)."""
        if self.inflight is None or self.inflight[0] != nonce:
            return False
        self.acked = self.inflight[1]
        self.inflight = None
        self.rejected = None
        return True

    def on_nack(self, nonce: str) -> bool:
        """Record a NACK: the node keeps its previous versions and the same target is not resent."""
        if self.inflight is None or self.inflight[0] != nonce:
            return False
        self.rejected = self.inflight[1]
        self.inflight = None
        return True
