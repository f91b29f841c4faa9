"""Issue 6 in the lab: the node CLI (`nodemesh status/workloads/services/certs/policies/conns/flows/
metrics`) against the real agents of the default two-node lab, each checked against traffic the test
makes itself, and the agent's Prometheus endpoint `:15020/metrics` scraped from the node netns.

Default lab: node1 {client (sa client), httpbin-v1 (sa httpbin)}, node2 {httpbin-v2, outsider (not
enrolled)}, Service httpbin 10.96.0.10:8000.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LabHandle
from cryptography import x509
from labtools import (
    TRY,
    Follower,
    Samples,
    apply_policy,
    cli_json,
    flows_json,
    metric_sum,
    node_cli,
    parse_metrics,
    remove_policy,
    scrape_15020,
    series,
    wait_for,
    wait_policies,
)

TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
HTTPBIN_ID = f"spiffe://{TD}/ns/default/sa/httpbin"
VIP = "10.96.0.10"


def main_process(samples: Samples, name: str) -> float:
    """The value of `name` for the agent's main process (workers' samples have a `worker` label)."""
    [value] = [v for (n, labels), v in samples.items() if n == name and "worker" not in dict(labels)]
    return value


def try_connect(lab: LabHandle, pod: str, *targets: str, timeout: float = 3.0) -> list[dict[str, object]]:
    proc = lab.exec(pod, "python3", "-c", TRY, str(timeout), *targets, timeout=timeout * len(targets) + 15)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def traffic(lab: LabHandle) -> None:
    """A few allowed connections: same node via the VIP, across nodes over HBONE, plaintext inbound."""
    v1, v2 = lab.plan.pod("httpbin-v1").ip, lab.plan.pod("httpbin-v2").ip
    for out in try_connect(lab, "client", f"{VIP}:8000", f"{v1}:8000", f"{v2}:8000"):
        assert out["ok"] and out["peer"] == out["target"], out  # getpeername restored
    (out,) = try_connect(lab, "outsider", f"{v2}:8000")
    assert out["ok"], out


# --- status -----------------------------------------------------------------------------------------


def test_status_shows_programs_counters_controller_and_certificates(lab: LabHandle) -> None:
    before = cli_json("node1", "status")
    traffic(lab)
    doc = cli_json("node1", "status")
    assert doc["node"] == "node1" and doc["enrolled_pods"] == 2
    # 15001/6/8 x 2 pods, in each of the agent's processes
    assert doc["proxy"]["state"] == "running" and doc["proxy"]["listeners"] == 6 * lab.proxy_workers
    assert (doc["proxy"]["pods"], doc["proxy"]["source_ip_pods"]) == (2, 2)  # both keep callers' IPs
    progs = " ".join(doc["datapath"]["programs"])
    for prog in ("cgroup/connect4", "sockops", "cgroup/getpeername4", "sk_lookup"):
        assert prog in progs, progs
    assert doc["datapath"]["pin_dir"] == "/sys/fs/bpf/nodemesh/node1"
    assert Path(doc["datapath"]["pin_dir"]).is_dir()
    counters, counters0 = doc["datapath"]["counters"], before["datapath"]["counters"]
    # 3 outbound connections from client were redirected by connect4 and restored by getpeername4
    assert counters["connect_redirected"] >= counters0["connect_redirected"] + 3, (counters0, counters)
    assert counters["getpeername_restored"] > counters0["getpeername_restored"]
    assert counters["sklookup_fail_closed"] == 0 and counters["connect_save_failed"] == 0
    ctl = doc["controller"]
    assert ctl["connected"] is True and ctl["address"] == lab.lab.load_state()["controller"]  # type: ignore[index]
    assert ctl["last_push_version"] and ctl["since_last_push"] is not None
    certs = doc["certificates"]
    assert certs["count"] == 2 and certs["valid"] == 2 and certs["expired"] == 0 and certs["pending"] == 0
    assert 0 < certs["next_renewal_in"] < certs["soonest_expiry_in"] <= 24 * 3600
    assert doc["flows"]["added"] >= before["flows"]["added"] + 6  # open + close of 3 connections

    doc2 = cli_json("node2", "status")
    assert doc2["enrolled_pods"] == 1 and doc2["certificates"]["count"] == 1  # outsider is not enrolled
    assert doc2["datapath"]["counters"]["sklookup_redirected"] >= 1  # the outsider's plaintext inbound

    table = node_cli("status", "--node", "node1")
    assert table.returncode == 0, table.stderr
    assert f"connected to {ctl['address']}" in table.stdout
    assert "Certificates  2 (2 valid, 0 renewing, 0 expired, 0 pending)" in table.stdout
    assert "program cgroup/connect4 nm_connect4" in table.stdout
    assert "counters conn_closed=" in table.stdout and "connect_redirected=" in table.stdout


def test_no_agent_and_unknown_node_are_errors(lab: LabHandle) -> None:
    proc = node_cli("status", "--node", "node9")
    assert proc.returncode == 1
    assert "agent for node node9 is not running" in proc.stderr


# --- workloads, services, certs ----------------------------------------------------------------------


def test_workloads_list_every_lab_pod_with_its_protocol(lab: LabHandle) -> None:
    for node in ("node1", "node2"):
        rows = {f"{w['namespace']}/{w['name']}": w for w in cli_json(node, "workloads")}
        assert set(rows) == {f"{p.namespace}/{p.name}" for p in lab.plan.pods}
        for p in lab.plan.pods:
            w = rows[f"{p.namespace}/{p.name}"]
            assert w["node"] == p.node and w["ips"] == [p.ip] and w["service_account"] == p.service_account
            assert w["protocol"] == ("HBONE" if p.enrolled else "NONE"), w
            assert w["labels"].items() >= p.labels.items()
    table = node_cli("workloads", "--node", "node1").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "NODE", "IP", "SERVICE", "ACCOUNT", "PROTOCOL"]
    assert ["default", "outsider", "node2", lab.plan.pod("outsider").ip, "outsider", "NONE"] in [
        ln.split() for ln in table[1:]]


def test_services_list_the_vip_ports_and_endpoints(lab: LabHandle) -> None:
    (svc,) = cli_json("node1", "services")
    assert (svc["namespace"], svc["name"], svc["vip"]) == ("default", "httpbin", VIP)
    assert svc["hostname"] == "httpbin.default.svc.cluster.local"
    assert [(p["port"], p["target_port"], p["protocol"]) for p in svc["ports"]] == [(8000, 8000, "TCP")]
    eps = {e["ip"] for e in svc["endpoints"]}
    assert eps == {lab.plan.pod("httpbin-v1").ip, lab.plan.pod("httpbin-v2").ip}
    out = node_cli("services", "--node", "node2").stdout
    assert f"httpbin  {VIP}  8000→8000/TCP" in out


def test_certs_are_the_node_pods_identities_issued_by_the_lab_ca(lab: LabHandle) -> None:
    ca = x509.load_pem_x509_certificate(Path(lab.lab.load_state()["ca"]).read_bytes())  # type: ignore[index]
    now = time.time()
    for node, identities in (("node1", {CLIENT_ID, HTTPBIN_ID}), ("node2", {HTTPBIN_ID})):
        rows = cli_json(node, "certs")
        assert {c["identity"] for c in rows} == identities, rows
        for c in rows:
            assert c["issuer"] == ca.subject.rfc4514_string(), (c["issuer"], ca.subject.rfc4514_string())
            assert c["state"] == "valid" and c["pods"] == 1 and c["last_error"] == ""
            assert c["not_before"] <= now + 1 < c["renew_at"] < c["not_after"]
            assert int(c["serial"], 16) > 0
    # the serial node2 shows is the certificate httpbin-v2 really presents on 15008 (the TLS server
    # certificate comes before the client certificate request, so a client without one still sees it);
    # with proxy workers each process has its own, and the kernel picks the process that answers
    node2_certs = cli_json("node2", "certs")
    assert sorted(c["worker"] for c in node2_certs) == list(range(lab.proxy_workers))
    v2 = lab.plan.pod("httpbin-v2").ip
    proc = lab.exec("outsider", "sh", "-c",
                    f"openssl s_client -connect {v2}:15008 -alpn h2 </dev/null 2>/dev/null"
                    " | openssl x509 -noout -serial", timeout=20)  # fmt: skip
    served = proc.stdout.decode().strip().removeprefix("serial=")
    serials = {int(c["serial"], 16) for c in node2_certs}
    assert served and int(served, 16) in serials, (proc.stdout, proc.stderr, serials)
    table = node_cli("certs", "--node", "node1").stdout
    assert CLIENT_ID in table and HTTPBIN_ID in table and ca.subject.rfc4514_string() in table


# --- policies and denied flows ------------------------------------------------------------------------

DENY_OUTSIDER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-outsider, namespace: default}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: DENY
  rules:
    - from: [{{source: {{ipBlocks: ["{ip}/32"]}}}}]
"""

DENY_CLIENT_V2 = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client-to-v2, namespace: default}}
spec:
  selector: {{matchLabels: {{version: v2}}}}
  action: DENY
  rules:
    - from: [{{source: {{principals: ["{TD}/ns/default/sa/client"]}}}}]
      to: [{{operation: {{ports: ["8000"]}}}}]
"""


@contextlib.contextmanager
def denying(lab: LabHandle) -> Iterator[None]:
    """deny-outsider (plaintext from the outsider to httpbin) and deny-client-to-v2 (HBONE) held by
    both agents."""
    files = {"cli-deny-outsider.yaml": DENY_OUTSIDER.format(ip=lab.plan.pod("outsider").ip),
             "cli-deny-client-v2.yaml": DENY_CLIENT_V2}
    try:
        for name, text in files.items():
            apply_policy(lab.state_dir, name, text)
        wait_policies(["node1", "node2"], {"default/deny-outsider", "default/deny-client-to-v2"})
        yield
    finally:
        for name in files:
            remove_policy(lab.state_dir, name)
        wait_policies(["node1", "node2"], set())


@pytest.fixture
def deny_policies(lab: LabHandle) -> Iterator[None]:
    with denying(lab):
        yield


def test_policies_and_denied_flows_name_the_policy(lab: LabHandle, deny_policies: None) -> None:
    rows = {r["name"]: r for r in cli_json("node2", "policies")}
    deny = rows["deny-outsider"]
    assert deny["kind"] == "AuthorizationPolicy" and deny["action"] == "DENY"
    assert rows["deny-outsider"]["selector"] == {"app": "httpbin"} and rows["deny-outsider"]["rules"] == 1
    assert rows["deny-client-to-v2"]["selector"] == {"version": "v2"}
    table = node_cli("policies", "--node", "node1").stdout
    row = ["AuthorizationPolicy", "default", "deny-client-to-v2", "version=v2", "DENY", "1", "active"]
    assert any(ln.split() == row for ln in table.splitlines()), table

    outsider, client = lab.plan.pod("outsider"), lab.plan.pod("client")
    v1, v2 = lab.plan.pod("httpbin-v1").ip, lab.plan.pod("httpbin-v2").ip
    (o,) = try_connect(lab, "outsider", f"{v2}:8000")
    assert not o["ok"], o  # plaintext inbound denied by deny-outsider
    c_v2, c_v1 = try_connect(lab, "client", f"{v2}:8000", f"{v1}:8000")
    assert not c_v2["ok"] and c_v1["ok"], (c_v2, c_v1)  # deny-client-to-v2 selects v2 only

    def denied(node: str, src_ip: str, src_port: object) -> list[dict[str, object]]:
        return [f for f in flows_json(node, "--verdict", "denied", "--since", "2m")
                if f["src_ip"] == src_ip and f["src_port"] == src_port]

    (rec,) = wait_for(lambda: denied("node2", outsider.ip, o["local"]), 5, "the outsider's deny flow")
    assert rec["event"] == "deny" and rec["verdict"] == "denied"
    assert rec["policy"] == "default/deny-outsider" and rec["rule"] == 0
    assert rec["reason"] == "DENIED_BY_POLICY"
    assert rec["dst_ip"] == v2 and rec["dst_port"] == 8000 and rec["dst_pod"] == "httpbin-v2"
    assert rec["src_identity"] == ""  # plaintext
    # over HBONE the destination node decides (its source port is the tunnel's, so match by identity)
    recs = wait_for(lambda: [f for f in flows_json("node2", "--verdict", "denied", "--pod", "default/client")
                             if f["policy"] == "default/deny-client-to-v2"], 5, "the client's deny flow")
    assert recs[-1]["src_identity"] == CLIENT_ID and recs[-1]["reason"] == "DENIED_BY_POLICY"
    assert recs[-1]["src_pod"] == "client" and recs[-1]["dst_pod"] == "httpbin-v2"
    # and the source node records that the destination refused it, for the client's own port
    (src_rec,) = wait_for(lambda: denied("node1", client.ip, c_v2["local"]), 5, "node1's deny flow")
    assert src_rec["reason"] == "DENIED_BY_DESTINATION", src_rec
    # the allowed connection is not in the denied view; the table names policy and rule
    assert denied("node1", client.ip, c_v1["local"]) == []
    table = node_cli("flows", "--node", "node2", "--verdict", "denied", "--last", "5").stdout
    assert "DENIED DENIED_BY_POLICY default/deny-outsider rules[0]" in table, table


# --- conns: a long-lived connection ------------------------------------------------------------------

# One TCP connection to HOST:PORT kept open for at most `seconds`: a keep-alive GET with a 2 KiB body
# every 0.1 s; prints "ready <local port>" after the first answer.
KEEPALIVE = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=5)
req = b"POST /keep HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n" + b"k" * 2048
end = time.monotonic() + seconds
first = True
while time.monotonic() < end:
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
    length = int(length[0].split(b":")[1])
    while len(body) < length:
        body += s.recv(65536)
    if first:
        print("ready", s.getsockname()[1], flush=True)
        first = False
    time.sleep(0.1)
"""


def test_conns_shows_a_long_lived_connection_with_growing_bytes(lab: LabHandle, tmp_path: Path) -> None:
    v2, client = lab.plan.pod("httpbin-v2").ip, lab.plan.pod("client")
    log = tmp_path / "keepalive.log"
    proc = lab.lab.popen("client", ["python3", "-c", KEEPALIVE, v2, "8000", "30"], log=log)
    try:
        wait_for(lambda: "ready" in log.read_text(), 10, "the keep-alive client's first answer")
        port = int(log.read_text().split("ready", 1)[1].split()[0])

        def mine() -> list[dict[str, object]]:
            return [c for c in cli_json("node1", "conns") if c["src"] == f"{client.ip}:{port}"]

        (first,) = wait_for(mine, 5, "the connection in node1's conns")
        assert first["src_pod"] == "default/client"
        assert (first["dst"], first["path"]) == (f"{v2}:8000", "hbone")
        assert first["dst_workload"] == "default/httpbin-v2" and first["src_identity"] == CLIENT_ID
        time.sleep(1.0)
        (second,) = mine()
        assert second["id"] == first["id"]
        # ~10 requests of 2 KiB each way in a second
        assert second["bytes_sent"] >= first["bytes_sent"] + 5 * 2048, (first, second)  # type: ignore[operator]
        assert second["bytes_received"] > first["bytes_received"], (first, second)  # type: ignore[operator]
        assert second["age"] > first["age"]  # type: ignore[operator]
        # the destination node sees it too, inbound over HBONE, with the client's identity
        inbound = [c for c in cli_json("node2", "conns")
                   if c["src_identity"] == CLIENT_ID and c["dst"] == f"{v2}:8000"]
        assert len(inbound) == 1 and inbound[0]["bytes_sent"] > 0, inbound
        table = node_cli("conns", "--node", "node1").stdout
        skip = 1 if table.split()[0] == "WORKER" else 0  # a column of its own with proxy workers
        row = ["default/client", "default/httpbin-v2", f"{v2}:8000", "hbone"]
        assert any(ln.split()[skip:skip + 4] == row for ln in table.splitlines()), table
        status = cli_json("node1", "status")
        proxy = status["proxy"]
        assert proxy["active_connections"] >= 1
        # each open connection holds a slot of max_connections (10,000 per proxy process)
        assert proxy["connection_slots"] == 10_000 * (1 + len(status["workers"])), proxy
        assert proxy["connection_slots_in_use"] >= proxy["active_connections"], proxy
        assert "slots in use)" in node_cli("status", "--node", "node1").stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # once closed it is gone from conns
    wait_for(lambda: not mine(), 5, "the closed connection to leave conns")


# --- flows --follow -----------------------------------------------------------------------------------


def test_flows_follow_delivers_a_new_record_within_a_second(lab: LabHandle) -> None:
    client, v1 = lab.plan.pod("client"), lab.plan.pod("httpbin-v1").ip
    before = cli_json("node1", "status")["flows"]["followers"]
    follower = Follower("node1", "--last", "0", "--pod", "default/client")
    try:
        wait_for(lambda: cli_json("node1", "status")["flows"]["followers"] == before + 1, 10, "the follower")
        assert follower.drain() == []  # --last 0: nothing stored is replayed
        latencies = []
        for _ in range(3):
            t_start = time.time()
            (out,) = try_connect(lab, "client", f"{v1}:8000")
            t_done = time.time()
            assert out["ok"], out
            got: dict[str, float] = {}
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                item = follower.next(timeout=0.5)
                if item is None:
                    continue
                arrived, rec = item
                if rec["src_ip"] == client.ip and rec["src_port"] == out["local"]:
                    assert rec["src_pod"] == "client" and rec["dst_ip"] == v1
                    got[rec["event"]] = arrived
                    assert arrived - rec["time"] < 1.0, (rec, arrived)  # event -> printed line
                    assert t_start <= rec["time"] <= t_done + 1.0
                    latencies.append(arrived - rec["time"])
            assert set(got) == {"open", "close"}, (got, follower.stderr)
            # the open record was printed within 1 s of the client's connect() returning
            assert got["open"] - out["connected_at"] < 1.0, (got, out)  # type: ignore[operator]
        print(f"follow latency (record time -> line read): max {max(latencies) * 1000:.1f} ms")
        assert follower.proc.poll() is None and follower.stderr == []
    finally:
        follower.close()


# --- Prometheus :15020 --------------------------------------------------------------------------------

BODY = 1_000_000


def post(lab: LabHandle, pod: str, url: str, body: Path) -> tuple[int, int]:
    """A 1 MB POST with curl; returns (bytes the client sent, bytes it received) at the TCP level."""
    proc = lab.exec(pod, "curl", "-sS", "--max-time", "20", "-H", "Expect:", "--data-binary", f"@{body}",
                    "-o", "/dev/null", "-w", "%{http_code} %{size_request} %{size_upload} %{size_header}"
                    " %{size_download}", url, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    code, req, up, hdr, down = (int(x) for x in proc.stdout.split())
    assert code == 200 and up == BODY
    return req + up, hdr + down


def test_metrics_15020_counts_the_bytes_sent_with_istio_labels(lab: LabHandle, tmp_path: Path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * BODY)
    node1, node2 = lab.plan.node("node1").netns_path, lab.plan.node("node2").netns_path
    v2 = lab.plan.pod("httpbin-v2").ip
    m1a, m2a = parse_metrics(scrape_15020(node1)), parse_metrics(scrape_15020(node2))
    hb_up, hb_down = post(lab, "client", f"http://{v2}:8000/upload", body)  # HBONE
    pt_up, pt_down = post(lab, "outsider", f"http://{v2}:8000/upload", body)  # plaintext inbound
    m1b, m2b = parse_metrics(scrape_15020(node1)), parse_metrics(scrape_15020(node2))

    def delta(a: dict, b: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
        return metric_sum(b, name, **labels) - metric_sum(a, name, **labels)

    hbone = {"reporter": "destination", "source_workload": "client", "destination_workload": "httpbin-v2",
             "source_principal": CLIENT_ID, "connection_security_policy": "mutual_tls"}
    # plaintext: the source workload is the one owning the peer IP (telemetry only), with no principal
    plain = {"reporter": "destination", "source_workload": "outsider", "destination_workload": "httpbin-v2",
             "source_principal": "unknown", "connection_security_policy": "none", "source_app": "outsider"}
    for labels, up, down in ((hbone, hb_up, hb_down), (plain, pt_up, pt_down)):
        assert delta(m2a, m2b, "istio_tcp_connections_opened_total", **labels) == 1, labels
        assert delta(m2a, m2b, "istio_tcp_connections_closed_total", **labels) == 1, labels
        # the proxy counts application bytes (HBONE framing is not in them): exactly what curl sent
        assert delta(m2a, m2b, "istio_tcp_received_bytes_total", **labels) == up, labels
        assert delta(m2a, m2b, "istio_tcp_sent_bytes_total", **labels) == down, labels
    # (other tests' denied connections have series of their own, response_flags="DENY")
    (s,) = series(m2b, "istio_tcp_received_bytes_total", **hbone, response_flags="-")
    assert s["destination_principal"] == HTTPBIN_ID and s["source_workload_namespace"] == "default"
    assert s["destination_app"] == "httpbin" and s["destination_version"] == "v2"
    assert s["request_protocol"] == "tcp" and s["source_app"] == "client"
    # the source side (node1) reports the same connection with reporter=source
    src = {"reporter": "source", "source_workload": "client", "destination_workload": "httpbin-v2",
           "connection_security_policy": "mutual_tls"}
    assert delta(m1a, m1b, "istio_tcp_connections_opened_total", **src) == 1
    assert delta(m1a, m1b, "istio_tcp_received_bytes_total", **src) == hb_up
    assert delta(m1a, m1b, "istio_tcp_sent_bytes_total", **src) == hb_down

    # process metrics: RSS (against /proc of the agent) and fds, and the datapath counters
    pid = lab.lab.load_state()["processes"]["agent/node2"]  # type: ignore[index]
    vmrss = next(int(ln.split()[1]) * 1024 for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if ln.startswith("VmRSS:"))
    # with proxy workers their samples carry `worker="<I>"`: the agent's own have no such label
    rss = main_process(m2b, "nodemesh_agent_resident_memory_bytes")
    assert 0.8 * vmrss < rss < 1.25 * vmrss, (rss, vmrss)
    fds = main_process(m2b, "nodemesh_agent_open_fds")
    assert 10 < fds < 1000 and abs(fds - len(list(Path(f"/proc/{pid}/fd").iterdir()))) < 20
    assert metric_sum(m2b, "nodemesh_agent_cpu_seconds_total") > 0
    assert metric_sum(m2b, "nodemesh_agent_log_records_dropped_total") == 0  # stderr kept up
    # the startup heap was frozen (agent/heap.py) after the pause hook went in: its full collection counts
    assert metric_sum(m2b, "nodemesh_agent_gc_pause_seconds_count", generation="2") >= 1
    started = re.search(r"event=agent_started .* gc_frozen=(\d+)",
                        (lab.lab.state_dir / "logs" / "agent-node2.log").read_text())
    assert started is not None and int(started.group(1)) > 10_000, started
    assert delta(m2a, m2b, "nodemesh_datapath_events_total", counter="sklookup_redirected", node="node2") >= 1
    assert delta(m1a, m1b, "nodemesh_datapath_events_total", counter="connect_redirected", node="node1") >= 1
    assert delta(m2a, m2b, "nodemesh_proxy_stat", stat="opened") >= 2
    # `nodemesh metrics` serves the same registry
    text = node_cli("metrics", "--node", "node2").stdout
    via_cli = parse_metrics(text)
    assert metric_sum(via_cli, "istio_tcp_received_bytes_total", **hbone) == metric_sum(
        m2b, "istio_tcp_received_bytes_total", **hbone)

    # refused connections are counted as ztunnel counts them: opened with response_flags="-", closed
    # with DENY where authorization refused them; the source side got a 401, recorded without a flag
    with denying(lab):
        r1a, r2a = parse_metrics(scrape_15020(node1)), parse_metrics(scrape_15020(node2))
        (o,) = try_connect(lab, "outsider", f"{v2}:8000")  # plaintext: deny-outsider
        (c,) = try_connect(lab, "client", f"{v2}:8000")  # HBONE: deny-client-to-v2
        assert not o["ok"] and not c["ok"], (o, c)
        plain_denied = plain | {"response_flags": "DENY"}
        hbone_denied = hbone | {"response_flags": "DENY"}

        def node2_counted() -> Samples | None:
            m = parse_metrics(scrape_15020(node2))
            return m if delta(r2a, m, "istio_tcp_connections_closed_total", **hbone_denied) == 1 else None

        r2b = wait_for(node2_counted, 5, "node2 to count the denied HBONE connection")
        r1b = parse_metrics(scrape_15020(node1))
    for labels in (plain, hbone):
        opened = delta(r2a, r2b, "istio_tcp_connections_opened_total", **labels, response_flags="-")
        closed = delta(r2a, r2b, "istio_tcp_connections_closed_total", **labels, response_flags="-")
        assert (opened, closed) == (1, 0), labels
    for labels in (plain_denied, hbone_denied):
        assert delta(r2a, r2b, "istio_tcp_connections_closed_total", **labels) == 1, labels
        assert delta(r2a, r2b, "istio_tcp_received_bytes_total", **labels) == 0, labels
    src_refused = src | {"response_flags": "-"}
    assert delta(r1a, r1b, "istio_tcp_connections_opened_total", **src_refused) == 1
    assert delta(r1a, r1b, "istio_tcp_connections_closed_total", **src_refused) == 1
