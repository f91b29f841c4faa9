"""The lab itself: topology, status, exec, traffic across nodes, and a clean teardown."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import LabHandle, lab_leftovers, nodemesh_cli
from labtools import run_example
from meshlab import wait_for

from nodemesh.lab.lab import Lab
from nodemesh.lab.topology import load_topology


def test_status_json_describes_the_default_topology(lab: LabHandle) -> None:
    proc = nodemesh_cli("lab", "status", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert [n["name"] for n in st["nodes"]] == ["node1", "node2"]
    assert {n["podCIDR"] for n in st["nodes"]} == {"10.100.1.0/24", "10.100.2.0/24"}
    assert all(Path(n["netns"]).exists() and n["underlayIP"].startswith("10.99.0.") for n in st["nodes"])
    pods = {p["name"]: p for p in st["pods"]}
    assert set(pods) == {"client", "httpbin-v1", "httpbin-v2", "outsider"}
    assert pods["httpbin-v2"]["labels"] == {"app": "httpbin", "version": "v2"}
    assert (pods["httpbin-v2"]["node"], pods["httpbin-v2"]["serviceAccount"]) == ("node2", "httpbin")
    assert pods["outsider"]["enrolled"] is False and pods["client"]["enrolled"] is True
    assert all(Path(p["netns"]).exists() for p in pods.values())
    assert st["services"] == [
        {
            "name": "httpbin",
            "namespace": "default",
            "vip": "10.96.0.10",
            "ports": [{"port": 8000, "targetPort": 8000, "name": "http"}],
        }
    ]
    assert st["controller"]["running"] is True and st["controller"]["address"] == "10.99.0.254:15012"
    assert st["stateDir"] == str(lab.state_dir)


def test_exec_runs_in_the_pod_netns_and_cgroup(lab: LabHandle) -> None:
    proc = nodemesh_cli(
        "lab", "exec", "httpbin-v2", "--", "sh", "-c", "ip -4 -o addr show eth0; cat /proc/self/cgroup"
    )
    assert proc.returncode == 0, proc.stderr
    assert "10.100.2.10/24" in proc.stdout
    assert "/nodemesh-lab/node2/pods/default_httpbin-v2" in proc.stdout


def test_exec_reports_unknown_pod_and_propagates_exit_code(lab: LabHandle) -> None:
    proc = nodemesh_cli("lab", "exec", "nosuchpod", "--", "true")
    assert proc.returncode == 1 and "no single pod 'nosuchpod'" in proc.stderr
    proc = nodemesh_cli("lab", "exec", "client", "--", "sh", "-c", "exit 7")
    assert proc.returncode == 7


def test_client_reaches_httpbin_v2_on_the_other_node(lab: LabHandle) -> None:
    v2 = lab.plan.pod("httpbin-v2")
    body = lab.curl_json("client", f"http://{v2.ip}:8000/cross-node?x=1", "-H", "x-test: lab")
    assert body["pod"] == "httpbin-v2"
    assert (body["method"], body["path"]) == ("GET", "/cross-node?x=1")
    assert body["headers"]["x-test"] == "lab"
    assert body["local"] == f"{v2.ip}:8000"
    # over HBONE, and the app still sees the client's IP (source-IP preservation), not its own
    assert body["peer"].split(":")[0] == lab.plan.pod("client").ip


def test_apps_see_the_callers_ip_on_every_inbound_path(lab: LabHandle) -> None:
    client, v1, v2 = (lab.plan.pod(n) for n in ("client", "httpbin-v1", "httpbin-v2"))
    same_node = lab.curl_json("client", f"http://{v1.ip}:8000/same-node")  # handed over in-process
    assert (same_node["pod"], same_node["peer"].split(":")[0]) == ("httpbin-v1", client.ip)
    seen = set()
    for i in range(4):  # round robin over both endpoints: one same-node, one over HBONE
        body = lab.curl_json("client", f"http://10.96.0.10:8000/vip-{i}")
        assert body["peer"].split(":")[0] == client.ip, body
        seen.add(body["pod"])
    assert seen == {"httpbin-v1", "httpbin-v2"}
    cross = lab.curl_json("httpbin-v2", f"http://{v1.ip}:8000/back")  # the other way round
    assert cross["peer"].split(":")[0] == v2.ip
    own = lab.curl_json("httpbin-v1", f"http://{v1.ip}:8000/self")  # a pod calling itself
    assert (own["pod"], own["peer"].split(":")[0]) == ("httpbin-v1", v1.ip)


def test_the_source_ip_example_shows_every_caller_ip(lab: LabHandle) -> None:
    proc = run_example("source-ip.sh")
    paths = re.findall(r"^(.+?): (\S+) saw ([\d.]+):\d+ +\(caller ([\d.]+)\)$", proc.stdout, re.M)
    assert len(paths) == 4, proc.stdout
    assert all(saw == caller for _, _, saw, caller in paths), proc.stdout
    assert "lookup 20045" in proc.stdout and "tcp_fwmark_accept = 1" in proc.stdout


def test_outsider_reaches_an_enrolled_pod_directly(lab: LabHandle) -> None:
    v1 = lab.plan.pod("httpbin-v1")
    body = lab.curl_json("outsider", f"http://{v1.ip}:8000/from-outside")
    assert body["pod"] == "httpbin-v1"
    assert body["peer"].split(":")[0] == lab.plan.pod("outsider").ip  # through 15006, its IP kept
    # the outsider is not enrolled, but httpbin-v1 is: node1's proxy took the inbound side (plaintext)
    outsider_ip = lab.plan.pod("outsider").ip

    def inbound() -> list[str]:  # the agent writes its log lines within 50 ms (api/logsink.py)
        return [
            ln
            for ln in lab.log("agent-node1").splitlines()
            if "msg=flow event=open" in ln and f"src={outsider_ip}:" in ln and "dst=10.100.1.11:8000" in ln
        ]

    wait_for(inbound, 5, "node1's flow record of the outsider's connection")


def test_controller_serves_metrics_in_the_underlay(lab: LabHandle) -> None:
    proc = subprocess.run(
        [
            "nsenter",
            f"--net={lab.status()['controller']['netns']}",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            f"http://{lab.status()['controller']['metrics']}/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert "nodemesh_controller" in proc.stdout


def test_up_replaces_a_crashed_lab_and_down_leaves_nothing(lab: LabHandle) -> None:
    """Runs last in this module: kill the lab's processes hard (a crash), `up` again, then `down`."""
    for pid in lab.lab.load_state()["processes"].values():  # type: ignore[index]
        subprocess.run(["kill", "-9", str(pid)], check=False)
    # `lab up` on top of the wreck: removes the leftovers first, then builds a working lab
    again = Lab(lab.state_dir)
    again.up(load_topology())
    v2 = again.plan().pod("httpbin-v2")
    out = again.exec("client", ["curl", "-sS", "--max-time", "5", f"http://{v2.ip}:8000/again"], timeout=20)
    assert out.returncode == 0 and json.loads(out.stdout)["pod"] == "httpbin-v2"
    proc = nodemesh_cli("lab", "down")
    assert proc.returncode == 0, proc.stderr
    assert lab_leftovers() == []
    ip_link = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "nmu" not in ip_link and "nmp" not in ip_link and "cni0" not in ip_link
