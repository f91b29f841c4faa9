"""The controller inside the lab: health, both agents connected, `nodemesh apply` / `get` through it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import LabHandle, nodemesh_cli

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "examples" / "lab" / "policies" / "httpbin-allow-client.yaml"


def underlay_curl(lab: LabHandle, path: str) -> subprocess.CompletedProcess[str]:
    ctl = lab.status()["controller"]
    return subprocess.run(
        ["nsenter", f"--net={ctl['netns']}", "--", "curl", "-sS", "--max-time", "5",
         "-o", "/dev/stdout", "-w", "\n%{http_code}", f"http://{ctl['metrics']}{path}"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip


def test_controller_is_healthy_and_both_agents_are_connected(lab: LabHandle) -> None:
    for path in ("/healthz", "/readyz"):
        proc = underlay_curl(lab, path)
        assert proc.returncode == 0 and proc.stdout.endswith("\n200"), proc
    streams = 2 * lab.proxy_workers  # a config stream per agent process
    deadline = time.monotonic() + 10
    while True:
        metrics = underlay_curl(lab, "/metrics").stdout
        if (f"nodemesh_controller_connected_agents {streams}.0" in metrics
                and "nodemesh_controller_connected_nodes 2.0" in metrics):
            break
        assert time.monotonic() < deadline, metrics[-1500:]
        time.sleep(0.1)
    # each agent signed nothing yet (no proxy), but every node got its snapshot and ACKed it
    assert 'nodemesh_controller_pushes_total{node="node1",result="ack"}' in metrics
    assert 'nodemesh_controller_pushes_total{node="node2",result="ack"}' in metrics


def test_get_lists_the_lab_workloads_from_the_controller(lab: LabHandle) -> None:
    proc = nodemesh_cli("get", "Workload", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    keys = {row["key"] for row in json.loads(proc.stdout)}
    assert keys == {f"Workload/default/{p}" for p in ("client", "httpbin-v1", "httpbin-v2", "outsider")}


def test_apply_stores_a_policy_and_refuses_a_broken_one(lab: LabHandle, tmp_path: Path) -> None:
    proc = nodemesh_cli("apply", "-f", str(POLICY))
    assert proc.returncode == 0, proc.stderr
    assert (lab.state_dir / "config" / POLICY.name).exists()
    proc = nodemesh_cli("get", "AuthorizationPolicy", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["key"] for r in rows] == ["AuthorizationPolicy/default/httpbin-allow-client"]
    assert rows[0]["object"]["spec"]["action"] == "ALLOW"

    broken = tmp_path / "broken.yaml"
    broken.write_text(POLICY.read_text().replace("action: ALLOW", "action: PERMIT"))
    proc = nodemesh_cli("apply", "-f", str(broken))
    assert proc.returncode == 1
    assert "broken.yaml" in proc.stderr and "action" in proc.stderr, proc.stderr
    assert not (lab.state_dir / "config" / "broken.yaml").exists()
    # the controller is still serving, with the good policy intact
    rows = json.loads(nodemesh_cli("get", "AuthorizationPolicy", "-o", "json").stdout)
    assert [r["key"] for r in rows] == ["AuthorizationPolicy/default/httpbin-allow-client"]
