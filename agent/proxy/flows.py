"""Flow records of the node proxy: one per connection event (open, close, deny), ring + log line.

The records are the admin API's `FlowRecord` (so `nodemesh flows` shows them unchanged) kept in the
node's bounded `FlowRing`, and each is also logged as one structured line:
`msg=flow event=deny verdict=denied conn=c1 src=10.1.0.4:40000 dst=10.2.0.5:8080 ...
reason=DENIED_BY_POLICY policy=ns/name rule=0`.
"""

from __future__ import annotations

import logging
import re

from agent.admin.flows import FlowEvent, FlowRecord, FlowRing, Verdict

log = logging.getLogger("nodemesh.flow")

__all__ = ["FlowEvent", "FlowLog", "FlowRecord", "FlowRing", "Verdict", "format_flow"]

_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-\[\]]*$")


def _value(value: object) -> str:
    text = "" if value is None else str(value)
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_flow(r: FlowRecord) -> str:
    """`flow key=value ...`: the record as one logfmt line (empty fields left out)."""
    parts = [
        "flow",
        f"event={r.event}",
        f"verdict={r.verdict}",
        f"conn={_value(r.connection_id)}",
        f"src={r.src_ip}:{r.src_port}",
        f"dst={r.dst_ip}:{r.dst_port}",
    ]
    optional: tuple[tuple[str, object], ...] = (
        ("src_pod", f"{r.src_namespace}/{r.src_pod}" if r.src_pod else ""),
        ("src_identity", r.src_identity),
        ("dst_pod", f"{r.dst_namespace}/{r.dst_pod}" if r.dst_pod else ""),
        ("dst_service", r.dst_service),
        ("reason", r.reason),
        ("policy", r.policy),
        ("rule", r.rule),
    )
    parts += (f"{k}={_value(v)}" for k, v in optional if v not in ("", None))
    if r.event is FlowEvent.CLOSE:
        parts.append(f"bytes_sent={r.bytes_sent} bytes_received={r.bytes_received}")
        if r.duration is not None:
            parts.append(f"duration={r.duration:.3f}")
    return " ".join(parts)


class FlowLog:
    """Adds records to the ring and logs them; never blocks (the ring is bounded, logging is sync)."""

    def __init__(self, ring: FlowRing | None = None) -> None:
        self.ring = ring if ring is not None else FlowRing()

    def add(self, record: FlowRecord) -> None:
        self.ring.add(record)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", format_flow(record))
