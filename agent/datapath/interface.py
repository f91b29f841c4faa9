"""The typed interface between the agent and its datapath, plus the values it exchanges."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class PodRef:
    """A pod to enroll: its uid, the path of its netns (``/var/run/netns/x``) and IPv4."""

    uid: str
    netns_path: str
    ip: str


@dataclass
class EnrolledPod:
    """An enrolled pod and the listeners the agent holds inside its netns.

    ``outbound`` is 127.0.0.1:15001, ``inbound`` 0.0.0.0:15006, ``hbone`` 0.0.0.0:15008; all
    listening and non-blocking. Sockets are None in the fake datapath. ``source_ip``: the pod's
    netns is set up for connections to its apps from the peer's IP (`agent.datapath.source_ip`).
    """

    pod: PodRef
    netns_cookie: int
    pod_index: int
    source_ip: bool = False
    outbound: socket.socket | None = field(default=None, repr=False)
    inbound: socket.socket | None = field(default=None, repr=False)
    hbone: socket.socket | None = field(default=None, repr=False)

    def close(self) -> None:
        """Close the listeners (idempotent)."""
        for s in (self.outbound, self.inbound, self.hbone):
            if s is not None:
                s.close()


class Datapath(Protocol):
    """What the agent needs from the datapath. Calls block; run them from a thread."""

    def load(self, node: str, pod_cgroup: Path) -> None:
        """Load and attach every program (all or nothing), re-using pins of a previous run."""

    def enroll(self, pod: PodRef) -> EnrolledPod:
        """Capture the pod's traffic (idempotent). DatapathError when another ref of the same
        key is enrolled: enrollments are kept by key, so the old one must be unenrolled first."""

    def unenroll(self, pod: PodRef) -> None:
        """Stop capturing the pod's traffic and forget its state (idempotent)."""

    def original_destination(self, netns_cookie: int, peer: tuple[str, int]) -> tuple[str, int] | None:
        """Destination the app dialled for a connection accepted on 15001; None: close it.

        Called on the proxy's event loop for every connection: must not sleep (a hash map lookup)."""

    def counters(self) -> dict[str, int]:
        """Datapath counters by name (see ``abi.COUNTERS``)."""

    def uninstall(self, node: str) -> None:
        """Detach everything and remove every pin of ``node``."""
