"""Issue 5 in the lab: mutual TLS between nodes, PeerAuthentication, and the HBONE port itself.

Real eBPF redirection, the real controller's CA and certificates, real sockets: what crosses the
underlay is captured with tcpdump in node2's netns; httpbin-v2's 15008 is probed from sockets made
inside the outsider's netns (not enrolled, so nothing redirects them) with our own TLS and HTTP/2
clients (`ssl` + the `h2` library), independent of the proxy's code.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from conftest import LabHandle
from labtools import metric_sum, parse_metrics, scrape_15020
from meshlab import (
    Policies,
    admin_get,
    client_tls,
    connect_from,
    flows,
    flows_from,
    issue,
    request_ok,
    request_refused,
    spiffe,
    uri_sans,
    wait_for,
    wait_new_flow,
)

from agent.datapath.netns import in_netns
from agent.proxy.conns import MAX_PENDING_HANDSHAKES_PER_IP, REASON_ABANDONED
from controller.ca import CertificateAuthority

HTTPBIN_ID = "spiffe://cluster.local/ns/default/sa/httpbin"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture(scope="module")
def lab_ca(lab: LabHandle) -> CertificateAuthority:
    """The lab controller's CA, opened read-only in the test process (its files exist: nothing is written)."""
    return CertificateAuthority.load_or_create(lab.state_dir / "controller", "cluster.local")


def bundle(lab: LabHandle) -> bytes:
    return (lab.state_dir / "controller" / "ca.pem").read_bytes()


# ---- 1. only TLS on the underlay ---------------------------------------------------------------
@contextlib.contextmanager
def capture(netns_path: str, pcap: Path, iface: str = "eth0") -> Generator[None, None, None]:
    """tcpdump on `iface` of a netns for the block; bounded (-c, timeout) and always stopped."""
    err = pcap.with_suffix(".log")
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path}", "--", "timeout", "60",
             "tcpdump", "--immediate-mode", "-i", iface, "-n", "-U", "-s", "0", "-c", "5000", "-Z", "root",
             "-w", str(pcap), "tcp"],
            stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: b"listening on" in err.read_bytes() or proc.poll() is not None, 10, "tcpdump")
        assert proc.poll() is None, err.read_text()
        yield
        time.sleep(0.3)  # let the last packets of the exchange reach the capture
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def pcap_packets(pcap: Path, bpf_filter: str) -> list[str]:
    out = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-n", "-tt", bpf_filter], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@contextlib.contextmanager
def control_server(lab: LabHandle, pod: str, port: int) -> Generator[None, None, None]:
    """An extra echo server in a pod (for a plaintext control exchange), killed afterwards."""
    info = lab.plan.pod(pod)
    proc = lab.lab.popen(pod, [sys.executable, "-m", "nodemesh.lab.echo", "--port", str(port), "--name", pod])
    try:

        def listening() -> bool:
            try:
                connect_from(info.netns_path, ("127.0.0.1", port), 1).close()
            except OSError:
                return False
            return True

        wait_for(listening, 10, f"control echo server on {pod}:{port}")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_cross_node_request_crosses_the_underlay_only_as_tls(lab: LabHandle, tmp_path: Path) -> None:
    node2 = lab.plan.node("node2")
    client, v2, outsider = (lab.plan.pod(n) for n in ("client", "httpbin-v2", "outsider"))
    secret = f"nm-secret-{uuid.uuid4().hex}"
    plain = f"nm-plaintext-control-{uuid.uuid4().hex}"
    body = (secret + "\n") * 64  # 3 KiB: spans packets, so a leak would show as well as a whole copy
    pcap = tmp_path / "underlay.pcap"
    with control_server(lab, "outsider", 9000), capture(node2.netns_path, pcap):
        got = request_ok(
            lab, "client", f"http://{v2.ip}:8000/{secret}", "--data-binary", body, "-H", f"x-secret: {secret}"
        )
        # control: the same capture sees payload bytes of a plaintext (passthrough) exchange
        ctl = request_ok(lab, "client", f"http://{outsider.ip}:9000/{plain}", "--data-binary", plain)
    # the app got everything, in the clear, from the client's identity
    assert got["pod"] == "httpbin-v2" and got["method"] == "POST"
    assert got["path"] == f"/{secret}" and got["headers"]["x-secret"] == secret
    assert got["body_bytes"] == len(body)
    assert ctl["pod"] == "outsider" and ctl["body_bytes"] == len(plain)
    raw = pcap.read_bytes()
    assert plain.encode() in raw, "the capture does not see plaintext payloads: it proves nothing"
    assert secret.encode() not in raw, "the marker crossed the underlay in the clear"
    # what carried it: the client pod's IP to httpbin-v2's HBONE port, enough bytes for the body
    hbone = pcap_packets(pcap, f"src host {client.ip} and dst host {v2.ip} and tcp dst port 15008")
    sizes = [int(m.group(1)) for ln in hbone if (m := re.search(r"length (\d+)$", ln))]
    assert sum(sizes) >= len(body), hbone[-5:]
    # and nothing went to the app port (8000) across the underlay
    assert pcap_packets(pcap, f"dst host {v2.ip} and tcp dst port 8000") == []
    # node2 accepted it over HBONE with the client's certificate identity
    recs = wait_for(lambda: flows(lab, "node2", event="close", dst=f"{v2.ip}:8000", src_identity=CLIENT_ID))
    assert any(r["src"].startswith(f"{client.ip}:") and int(r["bytes_sent"]) > len(body) for r in recs)


# ---- 3. PeerAuthentication -------------------------------------------------------------------
@pytest.mark.parametrize("namespace", ["default", "istio-system"])
def test_strict_refuses_plaintext_and_keeps_mtls(lab: LabHandle, policies: Policies, namespace: str) -> None:
    v1, v2, outsider, client = (lab.plan.pod(n) for n in ("httpbin-v1", "httpbin-v2", "outsider", "client"))
    url = f"http://{v1.ip}:8000/strict"
    # PERMISSIVE (no PeerAuthentication): the outsider's plaintext is admitted, with no identity
    before = len(flows_from(lab, "node1", outsider.ip, event="close", dst=f"{v1.ip}:8000"))
    assert request_ok(lab, "outsider", url)["pod"] == "httpbin-v1"
    rec = wait_new_flow(lab, "node1", before, outsider.ip, event="close", dst=f"{v1.ip}:8000")
    assert "src_identity" not in rec

    name = f"strict-{namespace}"
    policies.apply("PeerAuthentication", name, {"mtls": {"mode": "STRICT"}}, namespace=namespace)
    before = len(flows_from(lab, "node1", outsider.ip, event="deny", reason="STRICT_MTLS_PLAINTEXT"))
    request_refused(lab, "outsider", url)
    rec = wait_new_flow(lab, "node1", before, outsider.ip, event="deny", reason="STRICT_MTLS_PLAINTEXT")
    assert rec["dst"] == f"{v1.ip}:8000" and rec["dst_pod"] == "default/httpbin-v1"
    # plaintext to the other node's httpbin is refused too (PeerAuthentication is namespace/mesh-wide)
    request_refused(lab, "outsider", f"http://{v2.ip}:8000/strict")
    # mTLS still works: same node (in-process hand-off with identity), other node (HBONE), the VIP
    for target in (v1.ip, v2.ip, "10.96.0.10"):
        got = request_ok(lab, "client", f"http://{target}:8000/strict")
        assert got["pod"] in ("httpbin-v1", "httpbin-v2")
    before = len(flows_from(lab, "node2", client.ip, event="close", src_identity=CLIENT_ID))
    assert request_ok(lab, "client", f"http://{v2.ip}:8000/strict")["pod"] == "httpbin-v2"
    wait_new_flow(lab, "node2", before, client.ip, event="close", src_identity=CLIENT_ID)

    policies.remove(f"{name}.yaml")  # back to PERMISSIVE
    assert request_ok(lab, "outsider", url)["pod"] == "httpbin-v1"


# ---- 4/5. httpbin-v2's 15008 from our own TLS + HTTP/2 client ---------------------------------
class H2Tunnel:
    """A minimal HBONE client: `h2` over an `ssl` socket, CONNECT streams, blocking, bounded."""

    def __init__(self, sock: ssl.SSLSocket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.status: dict[int, int] = {}
        self.data: dict[int, bytearray] = collections.defaultdict(bytearray)
        self.ended: set[int] = set()
        self.conn.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        if out := self.conn.data_to_send():
            self.sock.sendall(out)

    def _pump(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        for ev in self.conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = dict(ev.headers)
                self.status[ev.stream_id] = int(headers[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.data[ev.stream_id] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                raise EOFError(f"GOAWAY {ev.error_code}")
        self._flush()

    def _until(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self._pump()

    def connect(self, authority: str) -> tuple[int, int]:
        """CONNECT `authority` (no :scheme/:path): (stream id, response status)."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        self._flush()
        self._until(lambda: sid in self.status, f"the answer to CONNECT {authority}")
        return sid, self.status[sid]

    def send(self, sid: int, data: bytes) -> None:
        self.conn.send_data(sid, data)
        self._flush()

    def http11(self, sid: int, request: bytes) -> tuple[str, dict[str, Any]]:
        """Send an HTTP/1.1 request (Connection: close) through the stream; (status line, JSON body)."""
        self.send(sid, request)
        self._until(lambda: sid in self.ended, "the app's answer through the tunnel")
        head, _, body = bytes(self.data[sid]).partition(b"\r\n\r\n")
        return head.split(b"\r\n", 1)[0].decode(), json.loads(body)


def tls_to_hbone(lab: LabHandle, ctx: ssl.SSLContext, ip: str) -> tuple[ssl.SSLSocket, int]:
    """TLS to `ip`:15008 from the outsider's netns: (socket after the client handshake, local port)."""
    raw = connect_from(lab.plan.pod("outsider").netns_path, (ip, 15008))
    port = raw.getsockname()[1]
    try:
        tls = ctx.wrap_socket(raw, server_hostname=None)
    except BaseException:
        raw.close()
        raise
    # the server is httpbin-v2's workload, proven by its SVID (checked here, not by the proxy's code)
    assert tls.version() == "TLSv1.3" and tls.selected_alpn_protocol() == "h2"
    der = tls.getpeercert(binary_form=True)
    assert der is not None and uri_sans(der) == [HTTPBIN_ID]
    return tls, port


def client_to_hbone(
    lab: LabHandle, lab_ca: CertificateAuthority, tmp_path: Path, ip: str
) -> tuple[ssl.SSLSocket, int]:
    """`tls_to_hbone` with a fresh certificate of the `client` identity (default/client)."""
    ctx = client_tls(bundle(lab), issue(lab_ca, spiffe("default", "client")), tmp_path)
    return tls_to_hbone(lab, ctx, ip)


@pytest.mark.parametrize("client_cert", ["other-ca", "none"])
def test_hbone_refuses_a_foreign_or_missing_client_certificate(
    lab: LabHandle, tmp_path: Path, client_cert: str
) -> None:
    v2 = lab.plan.pod("httpbin-v2")
    cert = None
    if client_cert == "other-ca":
        other = CertificateAuthority.load_or_create(tmp_path / "other-ca", "cluster.local")
        assert other.trust_bundle_pem() != bundle(lab)
        cert = issue(other, spiffe("default", "client"))  # right trust domain and name, wrong root
    ctx = client_tls(bundle(lab), cert, tmp_path)
    # TLS 1.3: the client's side of the handshake ends before the server has judged its certificate,
    # so the refusal shows on the first read: the connection ends and no HTTP/2 byte comes back.
    # (The server closes without sending a TLS alert: asyncio's SSL transport drops the alert
    # OpenSSL queued when the handshake fails, so EOF is what a client sees.)
    tls, port = tls_to_hbone(lab, ctx, v2.ip)
    with tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            data = tls.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            data = b""
        assert data == b"", f"the server answered a refused client: {data[:40]!r}"
    # the server refused it in the TLS handshake, for the reason we expect
    reason = "CERTIFICATE_VERIFY_FAILED" if client_cert == "other-ca" else "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    outsider = lab.plan.pod("outsider").ip
    outsider_ip = re.escape(outsider)
    line = wait_for(
        lambda: re.search(
            rf"event=hbone_handshake_failed local_ip={re.escape(v2.ip)} "
            rf"peer_addr=\('{outsider_ip}', {port}\) error=.*{reason}",
            lab.log("agent-node2"),
        ),
        5,
        "the handshake failure in node2's log",
    )
    assert line
    assert flows(lab, "node2", src=f"{outsider}:{port}") == []  # no stream was ever opened


def test_hbone_answers_400_when_the_authority_is_not_the_tls_destination(
    lab: LabHandle, lab_ca: CertificateAuthority, tmp_path: Path
) -> None:
    v1, v2 = lab.plan.pod("httpbin-v1"), lab.plan.pod("httpbin-v2")
    tls, _ = client_to_hbone(lab, lab_ca, tmp_path, v2.ip)
    with tls:
        h2c = H2Tunnel(tls)
        # a certificate accepted at httpbin-v2 cannot be used to reach httpbin-v1 (another pod)
        _, status = h2c.connect(f"{v1.ip}:8000")
        assert status == 400
        # nor another address of the node; the same connection still works for its own destination
        _, status = h2c.connect(f"{lab.plan.node('node2').gateway}:8000")
        assert status == 400
        sid, status = h2c.connect(f"{v2.ip}:8000")
        assert status == 200
        line, body = h2c.http11(sid, b"GET /after-400 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert line.startswith("HTTP/1.1 200") and body["pod"] == "httpbin-v2"


def test_an_independent_h2_client_tunnels_http11_to_the_app(
    lab: LabHandle, lab_ca: CertificateAuthority, tmp_path: Path
) -> None:
    v2, outsider = lab.plan.pod("httpbin-v2"), lab.plan.pod("outsider")
    tls, port = client_to_hbone(lab, lab_ca, tmp_path, v2.ip)
    with tls:
        h2c = H2Tunnel(tls)
        sid, status = h2c.connect(f"{v2.ip}:8000")
        assert status == 200
        marker = uuid.uuid4().hex
        line, body = h2c.http11(
            sid,
            f"POST /h2/{marker} HTTP/1.1\r\nHost: httpbin\r\nContent-Length: 5\r\n"
            f"Connection: close\r\n\r\nhello".encode(),
        )
    assert line.startswith("HTTP/1.1 200")
    assert body["pod"] == "httpbin-v2" and body["method"] == "POST" and body["path"] == f"/h2/{marker}"
    assert body["body_bytes"] == 5
    # node2 authorized it as the certificate's identity, from the TCP peer (the outsider's IP)
    rec = wait_for(
        lambda: flows(lab, "node2", event="close", src=f"{outsider.ip}:{port}", dst=f"{v2.ip}:8000"),
        5,
        "node2's close record of the tunnelled connection",
    )[0]
    assert rec["src_identity"] == CLIENT_ID and rec["dst_pod"] == "default/httpbin-v2"
    assert "src_pod" not in rec  # the outsider's IP does not prove the client's workload


def proxy_stat(lab: LabHandle, node: str, stat: str) -> float:
    """`nodemesh_proxy_stat{stat=...}` from the node's :15020 (summed over its proxy processes)."""
    samples = parse_metrics(scrape_15020(lab.plan.node(node).netns_path))
    return metric_sum(samples, "nodemesh_proxy_stat", stat=stat)


def assert_cut_off_and_serving(lab: LabHandle, reason: str, before: float) -> None:
    """node2 counted one more connection cut off for `reason`, logged it with the client's identity,
    and still serves the client's requests to httpbin-v2."""
    wait_for(
        lambda: proxy_stat(lab, "node2", f"cut_off_{reason}") == before + 1,
        5,
        "node2 counting the connection it cut off",
    )
    said = f"event=hbone_abuse reason={reason} peer=spiffe://cluster.local/ns/default/sa/client"
    wait_for(lambda: said in lab.log("agent-node2"), 5, said)  # a worker's lines may come later
    v2 = lab.plan.pod("httpbin-v2")
    body = request_ok(lab, "client", f"http://{v2.ip}:8000/after-{reason}")
    assert body["pod"] == "httpbin-v2"


def test_rapid_reset_gets_goaway_and_the_agent_keeps_serving(
    lab: LabHandle, lab_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """A mesh identity opening CONNECTs and resetting them at once, 200 times in one go (HTTP/2 rapid
    reset, CVE-2023-44487): node2's agent ends that connection with GOAWAY ENHANCE_YOUR_CALM, counts
    it, and goes on serving everyone else."""
    v2 = lab.plan.pod("httpbin-v2")
    before = proxy_stat(lab, "node2", "cut_off_rapid_reset")
    tls, _ = client_to_hbone(lab, lab_ca, tmp_path, v2.ip)
    with tls:
        h2c = H2Tunnel(tls)
        for _ in range(200):
            sid = h2c.conn.get_next_available_stream_id()
            h2c.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", f"{v2.ip}:8000")])
            h2c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        h2c._flush()
        with pytest.raises(EOFError, match=f"GOAWAY {int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)}"):
            h2c._until(lambda: False, "the GOAWAY")
    assert_cut_off_and_serving(lab, "rapid_reset", before)


def test_continuation_flood_gets_goaway_and_the_agent_keeps_serving(
    lab: LabHandle, lab_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """A mesh identity sending a CONNECT's HEADERS and then CONTINUATION frames that never end the
    header block (CVE-2024-27316 and kin): node2's agent stops it past 65 KiB, before h2 would have
    kept 64 of those 256 KiB frames, with GOAWAY ENHANCE_YOUR_CALM; it counts it and goes on serving."""
    v2 = lab.plan.pod("httpbin-v2")
    before = proxy_stat(lab, "node2", "cut_off_header_flood")
    tls, _ = client_to_hbone(lab, lab_ca, tmp_path, v2.ip)
    with tls:
        h2c = H2Tunnel(tls)
        # a first stream settles the settings exchange, so nothing the client owes (a SETTINGS ACK)
        # goes out inside the header block below: that alone would end the connection (a frame other
        # than CONTINUATION there is a PROTOCOL_ERROR), with or without the limit
        assert h2c.connect(f"{v2.ip}:8000")[1] == 200
        block = h2c.conn.encoder.encode([(":method", "CONNECT"), (":authority", f"{v2.ip}:8000")])
        sid = h2c.conn.get_next_available_stream_id()
        chunk = 256 * 1024
        tls.sendall(len(block).to_bytes(3, "big") + b"\x01\x00" + sid.to_bytes(4, "big") + block)
        continuation = chunk.to_bytes(3, "big") + b"\x09\x00" + sid.to_bytes(4, "big") + b"\x00" * chunk
        with contextlib.suppress(OSError):  # the agent may close while frames are still going out
            for _ in range(8):
                tls.sendall(continuation)
        with pytest.raises(EOFError, match=f"GOAWAY {int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)}"):
            h2c._until(lambda: False, "the GOAWAY")
    assert_cut_off_and_serving(lab, "header_flood", before)


PROXY_PORT_PROBE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.settimeout(5)
t0 = time.monotonic()
data = s.recv(100)
print(repr(data), round(time.monotonic() - t0, 2), flush=True)
"""


def test_a_connection_to_a_pods_proxy_port_is_refused_not_looped(lab: LabHandle, tmp_path: Path) -> None:
    """15006 listens on the pod IP: a connection to it was taken by the proxy, which dialled
    <pod ip>:15006 again, and again, until the node's connection slots and fds ran out (one socket
    from anyone reaching the pod). Now refused with `deny PROXY_PORT`, plaintext and over HBONE."""
    v1, v2, outsider, client = (lab.plan.pod(n) for n in ("httpbin-v1", "httpbin-v2", "outsider", "client"))
    # plaintext, from outside the mesh, to httpbin-v1 (node1)
    before = len(flows_from(lab, "node1", outsider.ip, event="deny", reason="PROXY_PORT"))
    with contextlib.closing(connect_from(outsider.netns_path, (v1.ip, 15006))) as sock:
        assert sock.recv(100) == b""  # closed at once
    wait_new_flow(lab, "node1", before, outsider.ip, event="deny", reason="PROXY_PORT")
    # over HBONE, from the client (node1) to httpbin-v2 (node2): the client's 15001 sees it refused
    before = len(flows_from(lab, "node2", client.ip, event="deny", reason="PROXY_PORT"))
    log = tmp_path / "probe.log"
    proc = lab.lab.popen("client", ["python3", "-c", PROXY_PORT_PROBE, v2.ip, "15006"], log=log)
    assert proc.wait(10) == 0, log.read_text()
    assert log.read_text().startswith("b''"), log.read_text()
    wait_new_flow(lab, "node2", before, client.ip, event="deny", reason="PROXY_PORT")
    for node in ("node1", "node2"):  # nothing left holding a slot (at most the pooled HBONE ones)
        proxy = admin_get(node, "/v1/status")["proxy"]
        wait_for(lambda n=node: admin_get(n, "/v1/status")["proxy"]["active_connections"] == 0, 5,
                 f"{node}'s connections to end")
        assert proxy["connection_slots_in_use"] < 10, proxy


BOUND_CLIENT = r"""
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))  # as `curl --interface` or a client pinning its source address
s.settimeout(5)
s.connect((sys.argv[2], 8000))
s.sendall(b"GET /bound HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b"\r\n", 1)[0].decode(), flush=True)
"""


def test_an_app_that_binds_its_pod_ip_before_connecting_is_proxied(lab: LabHandle, tmp_path: Path) -> None:
    """The redirected socket keeps the pod IP it bound, so 15001 sees that as the peer: the original
    destination was refused for not coming from 127.0.0.1 (NO_ORIGINAL_DESTINATION, every such
    connection closed)."""
    client, v2 = lab.plan.pod("client"), lab.plan.pod("httpbin-v2")
    for target in (v2.ip, "10.96.0.10"):  # a pod on the other node, the Service VIP
        before = len(flows_from(lab, "node1", client.ip, event="close", src_pod="default/client"))
        log = tmp_path / f"bound-{target}.log"
        proc = lab.lab.popen("client", ["python3", "-c", BOUND_CLIENT, client.ip, target], log=log)
        assert proc.wait(10) == 0, log.read_text()
        assert log.read_text().startswith("HTTP/1.1 200"), log.read_text()
        # carried by the client's node proxy (its outbound record), not passed around it
        wait_new_flow(lab, "node1", before, client.ip, event="close", src_pod="default/client")


def test_a_closed_app_port_is_refused_at_once_not_after_the_connect_timeout(
    lab: LabHandle, tmp_path: Path
) -> None:
    """The app's netns answers the proxy's transparent SYN to a closed port with a RST the kernel
    builds itself; without `fwmark_reflect` it carried no mark, left through eth0 to the caller
    pod, and the proxy retried its SYN until its 5 s connect timeout."""
    client, v1, v2 = (lab.plan.pod(n) for n in ("client", "httpbin-v1", "httpbin-v2"))
    for node, target in (("node1", v1), ("node2", v2)):  # same node, and over HBONE
        before = len(flows_from(lab, node, client.ip, event="deny", reason="UPSTREAM_CONNECT_FAILED"))
        log = tmp_path / f"closed-{target.name}.log"
        proc = lab.lab.popen("client", ["python3", "-c", PROXY_PORT_PROBE, target.ip, "9"], log=log)
        assert proc.wait(10) == 0, log.read_text()
        data, elapsed = log.read_text().split()
        assert data == "b''" and float(elapsed) < 1.0, log.read_text()
        wait_new_flow(lab, node, before, client.ip, event="deny", reason="UPSTREAM_CONNECT_FAILED")


STUCK_PORT = 9099  # an app port in httpbin-v2 whose accept queue the test fills


def test_connects_reset_while_they_dial_a_stuck_app_are_cancelled(
    lab: LabHandle, lab_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Rapid reset with a pause: 100 CONNECTs to an app that does not accept (its accept queue is
    full, so each dial would wait for the 5 s connect timeout), reset once their handlers dial, three
    times on one connection. node2's agent cancels those 300 dials at once instead of letting them
    hold connection slots until they time out (`connection_slots_in_use`), and the connection goes
    on serving."""
    v2 = lab.plan.pod("httpbin-v2")
    with in_netns(v2.netns_path):
        stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with stuck:
        stuck.bind((v2.ip, STUCK_PORT))
        stuck.listen(0)  # room for one connection, never accepted
        filler = connect_from(v2.netns_path, (v2.ip, STUCK_PORT))  # SYNs to it are dropped from now on
        stats = ("streams_abandoned", "upstream_error", "connection_slots_in_use")
        before = {stat: proxy_stat(lab, "node2", stat) for stat in stats}
        with filler, client_to_hbone(lab, lab_ca, tmp_path, v2.ip)[0] as tls:
            h2c = H2Tunnel(tls)
            for _ in range(3):
                sids = []
                for _ in range(100):
                    sid = h2c.conn.get_next_available_stream_id()
                    h2c.conn.send_headers(
                        sid, [(":method", "CONNECT"), (":authority", f"{v2.ip}:{STUCK_PORT}")]
                    )
                    sids.append(sid)
                h2c._flush()
                time.sleep(0.5)  # their handlers authorize and dial
                for sid in sids:
                    h2c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                h2c._flush()
            wait_for(
                lambda: proxy_stat(lab, "node2", "streams_abandoned") - before["streams_abandoned"] == 300,
                3,
                "node2 cancelling the 300 dials",
            )
            # their slots are free again: what this test still holds is its HBONE connection
            slots = proxy_stat(lab, "node2", "connection_slots_in_use") - before["connection_slots_in_use"]
            assert slots <= 1
            sid, status = h2c.connect(f"{v2.ip}:8000")
            assert status == 200
            line, body = h2c.http11(
                sid, b"GET /after-reset-dials HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n"
            )
            assert line.startswith("HTTP/1.1 200") and body["pod"] == "httpbin-v2"
    time.sleep(6.0)  # past the connect timeout: a dial left running would fail now
    assert proxy_stat(lab, "node2", "upstream_error") == before["upstream_error"]
    # each left a record of what happened to it
    denied = flows(lab, "node2", event="deny", dst=f"{v2.ip}:{STUCK_PORT}")
    assert [r["reason"] for r in denied] == [REASON_ABANDONED] * 300
    assert {r["src_identity"] for r in denied} == {CLIENT_ID}


def test_idle_sockets_on_15008_are_capped_per_source_ip_and_lock_nobody_out(lab: LabHandle) -> None:
    """An outsider (no certificate) opening far more sockets to httpbin-v2's 15008 than one address
    may hold in the TLS handshake: beyond MAX_PENDING_HANDSHAKES_PER_IP (per proxy process) they are
    closed at once and counted, and the client pod's HBONE traffic to the same pod still flows."""
    v2 = lab.plan.pod("httpbin-v2")
    before = proxy_stat(lab, "node2", "handshake_overload")
    n = MAX_PENDING_HANDSHAKES_PER_IP * lab.proxy_workers + 64  # the kernel spreads them over the processes
    socks = [connect_from(lab.plan.pod("outsider").netns_path, (v2.ip, 15008)) for _ in range(n)]
    try:
        time.sleep(0.5)
        readable, _, _ = select.select(socks, [], [], 0)
        closed = [s for s in readable if s.recv(1) == b""]
        assert len(closed) >= 64
        assert proxy_stat(lab, "node2", "handshake_overload") - before == len(closed)
        body = request_ok(lab, "client", f"http://{v2.ip}:8000/while-idle-sockets-wait")
        assert body["pod"] == "httpbin-v2"
    finally:
        for s in socks:
            s.close()
    said = "event=hbone_handshake_overload pod=default_httpbin-v2"
    wait_for(lambda: said in lab.log("agent-node2"), 5, said)


# An app that accepts and never reads: its small receive buffer fills at once, and what node2's
# agent receives for it over HBONE queues in the agent.
NON_READING_APP = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.bind(("0.0.0.0", {port}))
s.listen(16)
held = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    s.settimeout(1)
    try:
        held.append(s.accept()[0])
    except OSError:
        pass
"""

# Eight connections to host:port (eight streams of the pod's HBONE connection), sending up to 16 MiB
# each for at most 10 s; prints how much went on each.
SENDER = """
import socket, time
conns = [socket.create_connection(("{host}", {port}), timeout=5) for _ in range(8)]
for c in conns:
    c.setblocking(False)
chunk, sent = b"s" * 65536, [0] * 8
deadline = time.monotonic() + 10
while min(sent) < 16 * 1024 * 1024 and time.monotonic() < deadline:
    for i, c in enumerate(conns):
        try:
            sent[i] += c.send(chunk)
        except BlockingIOError:
            pass
        except OSError:
            sent[i] = 16 * 1024 * 1024  # cut off: nothing more to send on it
    time.sleep(0.005)
print(sent)
"""


def test_data_queued_for_an_app_that_does_not_read_is_bounded(lab: LabHandle) -> None:
    """Two pods of node1 send to an app on node2 that never reads, each over its own HBONE
    connection (pools are per source pod) with eight streams. Each connection can queue up to
    16 MiB in node2's agent (4 MiB of window per stream, 16 MiB per connection; measured: 1.6 MiB a
    stream, the rest waits with the copying task and the app's socket); with the receive budget at
    16 MiB, the agent cuts the one queueing most off once both together pass it, and goes on
    serving."""
    if lab.proxy_workers > 1:
        pytest.skip("the budget is per proxy process; the two connections may land in different ones")
    v2 = lab.plan.pod("httpbin-v2")
    port = 9300
    app = lab.lab.popen("httpbin-v2", [sys.executable, "-c", NON_READING_APP.format(port=port)])
    os.environ["NODEMESH_MAX_HBONE_QUEUED_MIB"] = "16"
    try:
        lab.lab.stop_agent("node2")
        lab.lab.start_agent("node2")  # it inherits the budget from the environment
        assert proxy_stat(lab, "node2", "hbone_queued_limit") == 16 * 1024 * 1024
        before = proxy_stat(lab, "node2", "cut_off_buffer_overflow")
        senders = [
            lab.lab.popen(pod, [sys.executable, "-c", SENDER.format(host=v2.ip, port=port)])
            for pod in ("client", "httpbin-v1")
        ]
        for proc in senders:
            proc.wait(timeout=30)
        wait_for(
            lambda: proxy_stat(lab, "node2", "cut_off_buffer_overflow") == before + 1,
            10,
            "node2 cutting off the connection queueing most",
        )
        said = "event=hbone_buffer_overflow"
        wait_for(lambda: said in lab.log("agent-node2"), 5, said)
        # what stays queued is the other connection's, within the budget
        assert proxy_stat(lab, "node2", "hbone_queued_bytes") <= 16 * 1024 * 1024
        # Until its app reads, the other connection's window is spent on that app's streams, so a
        # new stream of the same pooled connection waits too (HTTP/2 flow control, as in ztunnel).
        # With the app gone its connections end, nothing stays queued, and both pods get through.
        app.kill()
        app.wait(timeout=10)
        wait_for(lambda: proxy_stat(lab, "node2", "hbone_queued_bytes") == 0, 10, "node2's queue to empty")
        for pod in ("client", "httpbin-v1"):
            body = request_ok(lab, pod, f"http://{v2.ip}:8000/after-buffer-overflow")
            assert body["pod"] == "httpbin-v2"
    finally:
        del os.environ["NODEMESH_MAX_HBONE_QUEUED_MIB"]
        app.kill()
        app.wait(timeout=10)
        lab.lab.stop_agent("node2")
        lab.lab.start_agent("node2")
