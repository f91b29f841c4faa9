"""Issue 4 in the lab: eBPF redirection by the node agents, on the default two-node topology.

Runs last in alphabetical order among lab modules that share nothing: it restarts and finally
uninstalls an agent, so it builds its own lab (module-scoped fixture).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

from conftest import LabHandle, nodemesh_cli
from meshlab import flows, wait_for

from agent.datapath.netns import in_netns
from nodemesh.lab.lab import BPFFS_NODEMESH

# Connects like an app would, then reports what getpeername() says and what the server answered.
PROBE = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
peer = s.getpeername()
s.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps({"getpeername": list(peer), "local": list(s.getsockname()),
                  "body": json.loads(data.split(b"\r\n\r\n", 1)[1])}))
"""


def probe(lab: LabHandle, pod: str, ip: str, port: int) -> dict[str, object]:
    proc = lab.exec(pod, "python3", "-c", PROBE, ip, str(port))
    assert proc.returncode == 0, proc.stderr.decode()
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def nodemesh_programs() -> tuple[int, int]:
    """(programs, links) of nodemesh in the kernel, as bpftool lists them."""
    progs = json.loads(
        subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
    )
    ids = {p["id"] for p in progs if str(p.get("name", "")).startswith("nm_")}
    links = json.loads(
        subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True).stdout
    )
    return len(ids), sum(1 for link in links if link.get("prog_id") in ids)


def test_outbound_to_a_pod_on_another_node_goes_through_the_agent(lab: LabHandle) -> None:
    v2 = lab.plan.pod("httpbin-v2")
    client = lab.plan.pod("client")
    out = probe(lab, "client", v2.ip, 8000)
    assert out["getpeername"] == [v2.ip, 8000]  # the app sees what it dialled
    assert out["body"]["pod"] == "httpbin-v2"  # type: ignore[index]
    # node1's proxy saw the right source pod and port, and the original destination
    src = f"{client.ip}:{out['local'][1]}"  # type: ignore[index]
    (rec,) = wait_for(lambda: flows(lab, "node1", event="close", src=src, dst=f"{v2.ip}:8000"))
    assert rec["src_pod"] == "default/client" and rec["dst_pod"] == "default/httpbin-v2"
    # node2's proxy received it over HBONE (from the tunnel's port), with the client's identity
    recs = wait_for(lambda: flows(lab, "node2", event="close", dst=f"{v2.ip}:8000"))
    assert any(
        r["src"].startswith(f"{client.ip}:")
        and r["src_identity"] == "spiffe://cluster.local/ns/default/sa/client"
        for r in recs
    ), recs


def test_outbound_to_the_service_vip_is_resolved_by_the_agent(lab: LabHandle) -> None:
    svc = lab.plan.services[0]
    client = lab.plan.pod("client")
    out = probe(lab, "client", svc.vip, 8000)
    assert out["getpeername"] == [svc.vip, 8000]  # the app still sees the VIP
    served_by = out["body"]["pod"]  # type: ignore[index]
    assert served_by in {"httpbin-v1", "httpbin-v2"}
    src = f"{client.ip}:{out['local'][1]}"  # type: ignore[index]
    (rec,) = wait_for(lambda: flows(lab, "node1", event="close", src=src))
    assert rec["dst_service"] == "httpbin.default.svc.cluster.local"
    assert rec["dst_pod"] == f"default/{served_by}"


def test_outsider_is_untouched_but_its_inbound_to_an_enrolled_pod_lands_on_15006(lab: LabHandle) -> None:
    v2 = lab.plan.pod("httpbin-v2")
    outsider = lab.plan.pod("outsider")
    out = probe(lab, "outsider", v2.ip, 8000)
    assert out["getpeername"] == [v2.ip, 8000] and out["body"]["pod"] == "httpbin-v2"  # type: ignore[index]
    src = f"{outsider.ip}:{out['local'][1]}"  # type: ignore[index]
    # the inbound side of httpbin-v2 captured it with the original port, as plaintext (no identity;
    # the source pod is named from its IP, for telemetry only)
    (rec,) = wait_for(lambda: flows(lab, "node2", event="close", src=src, dst=f"{v2.ip}:8000"))
    assert "src_identity" not in rec and rec["src_pod"] == "default/outsider"
    # and nothing of the outsider went through any outbound side, whose records would carry its
    # identity (agents write log lines within 50 ms: give node1's writer that long before looking for
    # what must not be there)
    time.sleep(0.2)
    assert [r for r in flows(lab, "node2", src_pod="default/outsider") if "src_identity" in r] == []
    assert flows(lab, "node1", src=src) == []


def test_a_connection_with_no_original_destination_is_closed(lab: LabHandle) -> None:
    client = lab.plan.pod("client")
    before = len(flows(lab, "node1", event="deny", reason="NO_ORIGINAL_DESTINATION"))
    # a socket made by the test inside client's netns but outside its cgroup: connect4 never saw it
    with in_netns(client.netns_path):
        s = socket.socket()
    with s:
        s.settimeout(5)
        s.connect(("127.0.0.1", 15001))
        try:
            s.sendall(b"hello?")
            data = s.recv(100)
        except ConnectionResetError:
            data = b""  # reset: closed with our bytes unread
        assert data == b""  # closed by the agent: fail closed
    wait_for(lambda: len(flows(lab, "node1", event="deny", reason="NO_ORIGINAL_DESTINATION")) > before)


def test_restarting_an_agent_twice_keeps_the_same_programs_and_links(lab: LabHandle) -> None:
    before = nodemesh_programs()
    assert before[0] >= 8 and before[1] >= before[0]  # 4 programs per node; cgroup + per-pod links
    for _ in range(2):
        lab.lab.stop_agent("node1")
        lab.lab.start_agent("node1")
        assert nodemesh_programs() == before
    out = probe(lab, "client", lab.plan.pod("httpbin-v2").ip, 8000)
    assert out["body"]["pod"] == "httpbin-v2"  # type: ignore[index]


def test_uninstall_leaves_nothing_of_the_node(lab: LabHandle) -> None:
    per_node_before = nodemesh_programs()
    lab.lab.stop_agent("node2")
    proc = nodemesh_cli("uninstall", "--node", "node2", "--state-dir", str(lab.state_dir / "agents"))
    assert proc.returncode == 0, proc.stderr
    assert not (BPFFS_NODEMESH / "node2").exists()
    progs, links = nodemesh_programs()
    assert progs == per_node_before[0] // 2 and links < per_node_before[1]  # node1's stay
    # traffic on node2 is plain again: the outsider's connection to httpbin-v2 is not captured
    out = probe(lab, "outsider", lab.plan.pod("httpbin-v2").ip, 8000)
    assert out["body"]["pod"] == "httpbin-v2"  # type: ignore[index]
    src = f"{lab.plan.pod('outsider').ip}:{out['local'][1]}"  # type: ignore[index]
    time.sleep(0.3)
    assert flows(lab, "node2", src=src) == []
