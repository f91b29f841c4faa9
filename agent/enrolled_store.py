"""The agent's record of enrolled pods on disk, so a restarted agent can unenroll pods it no longer wants.

The datapath's pins survive the agent, but bpffs holds no pod netns paths or IPs, and unenrolling
needs both (netns cookie lookup, sockhash key). The file lives next to other runtime state
(``/run/nodemesh/agent/<node>/enrolled.json`` by default: tmpfs, cleared at reboot like bpffs).
Written atomically (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from agent.datapath.interface import PodRef

log = logging.getLogger("nodemesh.agent.store")

DEFAULT_STATE_ROOT = Path("/run/nodemesh/agent")
FILENAME = "enrolled.json"


class EnrolledStore:
    """Reads and writes ``<state_dir>/enrolled.json``: pod key → {netns_path, ip}."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME

    def load(self) -> dict[str, PodRef]:
        """The pods recorded by the previous run; an unreadable file is logged and treated as empty."""
        try:
            raw = json.loads(self.path.read_text())
            pods = raw["pods"]
            return {key: PodRef(uid=key, netns_path=str(v["netns_path"]), ip=str(v["ip"]))
                    for key, v in pods.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("event=state_unreadable path=%s error=%r action=ignored", self.path, exc)
            return {}

    def save(self, pods: Mapping[str, PodRef]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"pods": {k: {"netns_path": p.netns_path, "ip": p.ip} for k, p in sorted(pods.items())}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Forget everything (uninstall)."""
        for p in (self.path, self.path.with_suffix(".tmp")):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty or already gone: not ours to force
            self.path.parent.rmdir()
