"""Agent memory and enroll time in the lab: RSS of node1's agent with 2 and with 50 enrolled pods.

Run as root: `python tests/bench/bench_agent_lab.py`; writes bench-results/agent-lab.json. Builds
a lab from a generated topology (one node, N pods), waits until the agent serves every pod, reads
the agent's VmRSS, and removes the lab.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from nodemesh.lab.lab import Lab
from nodemesh.lab.topology import load_topology

OUT = Path(__file__).resolve().parents[2] / "bench-results" / "agent-lab.json"


def rss_kib(pid: int) -> int:
    """VmRSS of the agent: the lab records the pid of the wrapper, which exec'd into the agent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(pods: int) -> dict[str, float]:
    topo = {
        "nodes": [{"name": "node1"}],
        "pods": [{"name": f"p{i}", "node": "node1", "serviceAccount": f"sa{i % 5}"} for i in range(pods)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "topo.yaml"
        path.write_text(yaml.safe_dump(topo))
        lab = Lab()
        t0 = time.monotonic()
        lab.up(load_topology(path), timeout=120)
        up_s = time.monotonic() - t0
        try:
            time.sleep(2.0)  # let the agent settle after the first snapshot
            pid = lab.load_state()["processes"]["agent/node1"]  # type: ignore[index]
            return {"pods": pods, "lab_up_s": round(up_s, 2), "agent_rss_mib": round(rss_kib(pid) / 1024, 1)}
        finally:
            lab.down(quiet=True)


def main() -> int:
    results = [measure(n) for n in (2, 50)]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    for r in results:
        print(
            f"pods={r['pods']:>3}  lab up {r['lab_up_s']:>6.2f} s  agent RSS {r['agent_rss_mib']:>6.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
