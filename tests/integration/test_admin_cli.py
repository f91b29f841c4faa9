"""The node CLI against a real admin server on a Unix socket, fed by an in-test `AdminSources`.

The server runs on its own event loop in a thread (as in the agent); the CLI runs in this thread
through Typer's runner, or as the installed `nodemesh` program for `flows --follow`.
Run as a script (`python tests/integration/test_admin_cli.py DIR`) to serve the same data on
DIR/demo/admin.sock until interrupted: docs/cli.md's examples come from that.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from controller_fixtures import assert_eventually
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.admin import (  # noqa: E402
    AdminServer,
    AgentStatus,
    CertInfo,
    ConnectionInfo,
    ConnPath,
    ControllerLink,
    DatapathStatus,
    FlowEvent,
    FlowRecord,
    FlowRing,
    MeshSettings,
    ProxyState,
    ProxyStatus,
    Verdict,
)
from api.resources import Endpoint, PolicyObject, Service, ServicePort, TunnelProtocol, Workload  # noqa: E402
from nodemesh.cli import app  # noqa: E402

NODE = "demo"
NODEMESH = ROOT / ".venv" / "bin" / "nodemesh"


def _wl(ns: str, name: str, ip: str, node: str, sa: str, mesh: bool = True, **labels: str) -> Workload:
    return Workload(
        f"{ns}/{name}",
        name,
        ns,
        sa,
        node,
        (ip,),
        tuple(sorted(labels.items())),
        TunnelProtocol.HBONE if mesh else TunnelProtocol.NONE,
    )


def _policy(kind: str, ns: str, name: str, spec: dict[str, Any], **meta: Any) -> PolicyObject:
    return PolicyObject.of(
        kind,
        ns,
        name,
        {
            "apiVersion": "security.istio.io/v1",
            "kind": kind,
            "metadata": {"name": name, "namespace": ns, **meta},
            "spec": spec,
        },
    )


def _certificate(identity: str, not_before: dt.datetime) -> x509.Certificate:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, "nodemesh root CA"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(0x3A5F9C2E11D04B7788AA01FE2C9D4410)
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(hours=24))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


class DemoSources:
    """A two-node mesh as the agent of node `demo` would see it."""

    def __init__(self) -> None:
        now = time.time()
        self.started = now - 7325
        self.workloads_ = [
            _wl("shop", "web-7d9f", "10.1.0.2", NODE, "web", app="web"),
            _wl("shop", "db-0", "10.2.0.3", "node2", "db", app="db", version="v1"),
            _wl("shop", "db-1", "10.2.0.4", "node2", "db", app="db", version="v2"),
            _wl("default", "legacy", "10.1.0.9", NODE, "default", mesh=False),
        ]
        self.services_ = [
            Service(
                "db",
                "shop",
                "10.96.0.10",
                (ServicePort(5432, 5432, "pg"),),
                (Endpoint("shop/db-0", "10.2.0.3"), Endpoint("shop/db-1", "10.2.0.4")),
            ),
            Service(
                "web",
                "shop",
                "10.96.0.11",
                (ServicePort(80, 8080, "http"),),
                (Endpoint("shop/web-7d9f", "10.1.0.2"),),
            ),
        ]
        self.policies_ = [
            _policy(
                "AuthorizationPolicy",
                "shop",
                "db-allow-web",
                {
                    "selector": {"matchLabels": {"app": "db"}},
                    "action": "ALLOW",
                    "rules": [
                        {
                            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
                            "to": [{"operation": {"ports": ["5432"]}}],
                        }
                    ],
                },
            ),
            _policy(
                "AuthorizationPolicy",
                "shop",
                "freeze-v2",
                {
                    "selector": {"matchLabels": {"version": "v2"}},
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}],
                },
            ),
            _policy("AuthorizationPolicy", "istio-system", "audit-all", {"action": "AUDIT", "rules": [{}]}),
            _policy("PeerAuthentication", "shop", "strict", {"mtls": {"mode": "STRICT"}}),
        ]
        nb = dt.datetime.fromtimestamp(now - 3 * 3600, dt.UTC).replace(microsecond=0)
        self.certs_ = [
            CertInfo.from_certificate(
                "spiffe://cluster.local/ns/shop/sa/web",
                _certificate("spiffe://cluster.local/ns/shop/sa/web", nb),
                pods=1,
            )
        ]
        self.conns_ = [
            ConnectionInfo(
                "c1",
                ConnPath.HBONE,
                "10.1.0.2",
                41234,
                "10.2.0.3",
                5432,
                now - 42.5,
                "shop/web-7d9f",
                "spiffe://cluster.local/ns/shop/sa/web",
                "db.shop.svc.cluster.local",
                "shop/db-0",
                18_432,
                1_204_211,
            ),
            ConnectionInfo(
                "c2",
                ConnPath.PLAINTEXT_INBOUND,
                "10.1.0.9",
                50500,
                "10.1.0.2",
                8080,
                now - 3.2,
                "default/legacy",
                "",
                "",
                "shop/web-7d9f",
                512,
                0,
            ),
        ]

    def status(self) -> AgentStatus:
        return AgentStatus(
            node=NODE,
            version="0.1.0",
            started_at=self.started,
            proxy=ProxyStatus(
                ProxyState.RUNNING, listeners=3, active_connections=len(self.conns_), pods=1,
                source_ip_pods=1, slots_in_use=len(self.conns_), slots=10_000,
            ),
            datapath=DatapathStatus(
                backend="bcc",
                programs=(
                    "cgroup/connect4 nodemesh_connect4",
                    "sockops nodemesh_sockops",
                    "cgroup/getpeername4 nodemesh_getpeername4",
                    "sk_lookup nodemesh_sk_lookup",
                ),
                maps=("pod_by_netns", "orig_dst", "sockhash"),
                counters={"redirected": 1289, "no_orig_dst": 0},
                fast_path=True,
                pin_dir=f"/sys/fs/bpf/nodemesh/{NODE}",
            ),
            controller=ControllerLink("10.0.0.1:15012", True, "5f0c2a91e7d3b6a4", "17", time.time() - 12),
            enrolled_pods=2,
        )

    def mesh(self) -> MeshSettings:
        return MeshSettings("cluster.local")

    def workloads(self) -> Sequence[Workload]:
        return self.workloads_

    def services(self) -> Sequence[Service]:
        return self.services_

    def policies(self) -> Sequence[PolicyObject]:
        return self.policies_

    def certs(self) -> Sequence[CertInfo]:
        return self.certs_

    def connections(self) -> Sequence[ConnectionInfo]:
        return self.conns_

    def metrics_text(self) -> str:
        return (
            "# HELP istio_tcp_connections_opened_total Total TCP connections opened\n"
            "# TYPE istio_tcp_connections_opened_total counter\n"
            'istio_tcp_connections_opened_total{reporter="destination",source_workload="web",'
            'destination_service="db.shop.svc.cluster.local",connection_security_policy="mutual_tls"} 7.0\n'
        )


def demo_flows(now: float) -> list[FlowRecord]:
    web = {
        "src_ip": "10.1.0.2",
        "src_pod": "web-7d9f",
        "src_namespace": "shop",
        "src_identity": "spiffe://cluster.local/ns/shop/sa/web",
    }
    return [
        FlowRecord(
            time=now - 30,
            event=FlowEvent.OPEN,
            verdict=Verdict.ALLOWED,
            src_port=41234,
            dst_ip="10.2.0.3",
            dst_port=5432,
            dst_pod="db-0",
            dst_namespace="shop",
            dst_service="db.shop.svc.cluster.local",
            policy="shop/db-allow-web",
            rule=0,
            reason="ALLOWED_BY_POLICY",
            connection_id="c1",
            **web,
        ),
        FlowRecord(
            time=now - 20,
            event=FlowEvent.DENY,
            verdict=Verdict.DENIED,
            src_port=41240,
            dst_ip="10.2.0.4",
            dst_port=5432,
            dst_pod="db-1",
            dst_namespace="shop",
            dst_service="db.shop.svc.cluster.local",
            policy="shop/freeze-v2",
            rule=0,
            reason="DENIED_BY_POLICY",
            connection_id="c3",
            **web,
        ),
        FlowRecord(
            time=now - 10,
            event=FlowEvent.CLOSE,
            verdict=Verdict.ALLOWED,
            src_ip="10.1.0.9",
            src_port=50400,
            dst_ip="10.1.0.2",
            dst_port=8080,
            src_pod="legacy",
            src_namespace="default",
            dst_pod="web-7d9f",
            dst_namespace="shop",
            reason="ALLOWED_NO_POLICY",
            bytes_sent=731,
            bytes_received=15_320,
            duration=0.0421,
            connection_id="c0",
        ),
    ]


class AgentThread:
    """An admin server on its own loop in a thread, like the agent's."""

    def __init__(self, run_dir: Path, sources: DemoSources, ring: FlowRing) -> None:
        self.socket = run_dir / NODE / "admin.sock"
        self.ring = ring
        self.loop = asyncio.new_event_loop()
        self.server = AdminServer(sources, ring, self.socket)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> AgentThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def add(self, record: FlowRecord) -> None:
        self.loop.call_soon_threadsafe(self.ring.add, record)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nm-admin-"))  # short: AF_UNIX paths hold 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentThread]:
    monkeypatch.setenv("NODEMESH_RUN_DIR", str(run_dir))
    monkeypatch.delenv("NODEMESH_ADMIN_SOCKET", raising=False)
    ring = FlowRing(capacity=100)
    for record in demo_flows(time.time()):
        ring.add(record)
    with AgentThread(run_dir, DemoSources(), ring) as a:
        yield a


def cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    return result


def test_socket_is_root_only(agent: AgentThread) -> None:
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.socket.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(agent.socket.stat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the socket as another user")
def test_other_users_cannot_connect(agent: AgentThread) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(agent.socket)!r})",
        ],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert proc.returncode != 0 and "PermissionError" in proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["status"],
            [
                "demo",
                "running, 3 listeners, 2 connections (2 of 10,000 slots in use), callers' IPs kept in 1/1",
                "cgroup/connect4 nodemesh_connect4",
                "connected to 10.0.0.1:15012",
                "1 (1 valid",
                "3/100 stored",
            ],
        ),
        (["workloads"], ["NAMESPACE", "web-7d9f", "10.2.0.4", "NONE"]),
        (["services"], ["10.96.0.10", "5432→5432/TCP", "10.2.0.3,10.2.0.4", "80→8080/TCP"]),
        (["policies"], ["db-allow-web", "app=db", "freeze-v2", "DENY", "STRICT", "audit-all", "mesh"]),
        (
            ["certs"],
            ["spiffe://cluster.local/ns/shop/sa/web", "3a5f9c2e11d04b77", "CN=nodemesh root CA", "valid"],
        ),
        (
            ["conns"],
            [
                "shop/web-7d9f",
                "db.shop.svc.cluster.local (shop/db-0)",
                "hbone",
                "1.1 MiB",
                "plaintext-inbound",
            ],
        ),
        (
            ["flows"],
            ["DENY", "shop/freeze-v2 rules[0]", "via db.shop.svc.cluster.local", "[plaintext]", "in 42ms"],
        ),
        (["metrics"], ['istio_tcp_connections_opened_total{reporter="destination"']),
        (
            ["policy", "explain", "--from", "web-7d9f", "--to", "db:5432"],
            [
                "shop/db-0 10.2.0.3:5432",
                "ALLOWED_BY_POLICY by shop/db-allow-web rules[0]",
                "DENIED_BY_POLICY by shop/freeze-v2 rules[0]",
                "PeerAuthentication: STRICT",
                "verdict: MIXED",
            ],
        ),
    ],
)
def test_tables(agent: AgentThread, args: list[str], expected: list[str]) -> None:
    result = cli(*args)  # the only socket under NODEMESH_RUN_DIR is picked without --node
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output, f"{text!r} missing from:\n{result.output}"


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (["status"], lambda d: d["node"] == "demo" and d["datapath"]["counters"]["redirected"] == 1289),
        (["workloads"], lambda d: [w["name"] for w in d] == ["legacy", "db-0", "db-1", "web-7d9f"]),
        (["services"], lambda d: d[0]["hostname"] == "db.shop.svc.cluster.local"),
        (["policies"], lambda d: {p["state"] for p in d} == {"active"}),
        (["certs"], lambda d: d[0]["state"] == "valid" and 8.9 * 3600 < d[0]["renews_in"] <= 9 * 3600),
        (["conns"], lambda d: d[0]["path"] == "hbone" and d[0]["age"] >= 42),
        (
            ["policy", "explain", "--from", "legacy", "--to", "shop/web-7d9f", "--port", "8080"],
            lambda d: d["verdict"] == "denied" and "STRICT" in d["endpoints"][0]["summary"],
        ),
    ],
)
def test_json_output(agent: AgentThread, args: list[str], check: Any) -> None:
    result = cli(*args, "--node", NODE, "-o", "json")
    assert result.exit_code == 0, result.output
    assert check(json.loads(result.output))


def test_flows_json_is_one_object_per_line_and_filters_on_the_server(agent: AgentThread) -> None:
    result = cli("flows", "-o", "json", "--verdict", "denied")
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [f["connection_id"] for f in lines] == ["c3"]
    result = cli("flows", "-o", "json", "--pod", "default/legacy")
    assert [json.loads(line)["connection_id"] for line in result.output.splitlines()] == ["c0"]
    result = cli("flows", "-o", "json", "--since", "15s", "--namespace", "shop")
    assert [json.loads(line)["connection_id"] for line in result.output.splitlines()] == ["c0"]
    result = cli("flows", "-o", "json", "--last", "1")
    assert [json.loads(line)["connection_id"] for line in result.output.splitlines()] == ["c0"]


def test_explain_error_is_reported(agent: AgentThread) -> None:
    result = cli("policy", "explain", "--from", "ghost", "--to", "db:5432")
    assert result.exit_code == 1
    assert "error: no pod 'ghost'; known pods: default/legacy" in result.output


def test_follow_delivers_a_new_record_within_a_second(agent: AgentThread, run_dir: Path) -> None:
    env = {**os.environ, "NODEMESH_RUN_DIR": str(run_dir)}
    proc = subprocess.Popen(
        [str(NODEMESH), "flows", "--follow", "-o", "json", "--last", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 15  # the program's start-up (imports) is not what is measured
        while agent.ring.subscribers == 0:
            assert time.monotonic() < deadline, "the follower never subscribed"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.01)
        sent = time.monotonic()
        agent.add(
            FlowRecord(
                time=time.time(),
                event=FlowEvent.OPEN,
                verdict=Verdict.ALLOWED,
                src_ip="10.1.0.2",
                src_port=1,
                dst_ip="10.2.0.3",
                dst_port=5432,
                connection_id="live",
            )
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.monotonic() - sent
        assert json.loads(line)["connection_id"] == "live"
        assert elapsed < 1.0
    finally:
        proc.terminate()
        proc.wait(5)
    deadline = time.monotonic() + 5
    while agent.ring.subscribers:  # the server noticed the hang-up and dropped the follower
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_follow_ends_with_an_error_when_the_agent_stops(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODEMESH_RUN_DIR", str(run_dir))
    a = AgentThread(run_dir, DemoSources(), FlowRing()).__enter__()
    proc = subprocess.Popen(
        [str(NODEMESH), "flows", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NODEMESH_RUN_DIR": str(run_dir)},
    )
    try:
        deadline = time.monotonic() + 15
        while a.ring.subscribers == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        a.__exit__(None, None, None)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "ended the stream" in err


def test_missing_agent_is_a_clear_error(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEMESH_RUN_DIR", str(run_dir))
    proc = subprocess.run(
        [str(NODEMESH), "workloads", "--node", "node7"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "NODEMESH_RUN_DIR": str(run_dir)},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: agent for node node7 is not running (no socket at {run_dir}/node7/admin.sock)"
    )


def test_a_second_server_on_a_live_socket_is_refused_and_a_stale_one_replaced(
    agent: AgentThread, run_dir: Path
) -> None:
    from agent.admin import AdminError
    from agent.admin.server import prepare_socket_path

    with pytest.raises(AdminError, match="in use"):
        prepare_socket_path(agent.socket)
    stale = run_dir / "old" / "admin.sock"
    stale.parent.mkdir()
    import socket as socket_mod

    s = socket_mod.socket(socket_mod.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: what a crashed agent leaves
    prepare_socket_path(stale)
    assert not stale.exists()


def _ask(path: Path, raw: bytes) -> bytes:
    """Send `raw` to the admin socket; everything it answers until it closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_bad_requests_get_json_errors(agent: AgentThread) -> None:
    def ask(raw: bytes) -> bytes:
        return _ask(agent.socket, raw)

    assert ask(b"GET /v1/nope HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert ask(b"POST /v1/status HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 405"
    )
    assert ask(b"GET /v1/flows?verdict=maybe HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    assert ask(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    # keep-alive: two requests on one connection
    two = ask(b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert two.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/status HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT x:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/flows?last=%C2%B2 HTTP/1.1\r\nConnection: close\r\n\r\n",  # '2' superscript: isdigit()
        b"GET /v1/flows?last=" + b"9" * 5000 + b" HTTP/1.1\r\nConnection: close\r\n\r\n",  # int() refuses
        b"GET /v1/policy/explain?from=a&to=b&port=%C2%B2 HTTP/1.1\r\nConnection: close\r\n\r\n",
    ],
    ids=["upgrade", "connect", "superscript-last", "5000-digit-last", "superscript-port"],
)
def test_upgrade_connect_and_bad_integers_are_answered_400(agent: AgentThread, request_bytes: bytes) -> None:
    """docs/cli.md: errors are `{"error": ...}`, 400 for a bad request. httptools raises HttpParserUpgrade
    (no HttpParserError) for Upgrade and CONNECT; `int()` refuses some of what `str.isdigit()` takes."""
    head, _, body = _ask(agent.socket, request_bytes).partition(b"\r\n\r\n")
    # a handler that died of an exception has it logged when its task is finalized: here, not in
    # pytest's report (where CPython 3.11.2's ast.parse then fails with a SystemError)
    gc.collect()
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["error"].startswith(("bad request", "last must be", "port must be"))
    assert agent.server.errors == 0  # not an internal error (logged with a traceback, counted)


async def test_close_does_not_wait_for_a_follower_that_never_reads(run_dir: Path) -> None:
    """`nodemesh flows -f | less`, paused, or a follower stopped with Ctrl-Z: the agent's SIGTERM path
    awaits `admin.close()`, which drops what that follower has not read rather than wait for it."""
    ring = FlowRing()
    server = AdminServer(DemoSources(), ring, run_dir / NODE / "admin.sock")
    await server.start()
    record = demo_flows(time.time())[0]
    with socket.socket(socket.AF_UNIX) as follower:
        follower.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        follower.connect(str(server.path))
        follower.sendall(b"GET /v1/flows?follow=1 HTTP/1.1\r\n\r\n")
        await assert_eventually(lambda: ring.subscribers == 1)
        for _ in range(3000):  # ~1.5 MB: far more than the sockets hold; the follower reads nothing
            ring.add(record)
        await asyncio.sleep(0.3)  # the handler has filled the socket and waits in drain()
        began = time.monotonic()
        await asyncio.wait_for(server.close(), 5)
        assert time.monotonic() - began < 1
    assert ring.subscribers == 0


if __name__ == "__main__":  # serve the demo data for docs/cli.md
    base = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="nm-demo-"))
    demo_ring = FlowRing()
    for r in demo_flows(time.time()):
        demo_ring.add(r)
    with AgentThread(base, DemoSources(), demo_ring) as demo:
        print(f"serving {demo.socket}; NODEMESH_RUN_DIR={base}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
