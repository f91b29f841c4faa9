"""The node CLI without an agent: choosing the socket, error messages, formatting, and rendering of
canned API documents (built by the same `agent.admin.views` functions the server uses)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from agent.admin import views
from agent.admin.flows import FlowEvent, FlowRecord, FlowRing, Verdict
from agent.admin.sources import CertInfo
from api.resources import PolicyObject
from nodemesh import node_cli
from nodemesh.cli import app
from nodemesh.node_cli import AdminClient, fmt_bytes, fmt_duration, parse_since


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NODEMESH_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("NODEMESH_ADMIN_SOCKET", raising=False)
    return tmp_path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_named_node_without_agent_is_a_clear_error(run_dir: Path) -> None:
    result = invoke("status", "--node", "node7")
    assert result.exit_code == 1
    assert (
        f"error: agent for node node7 is not running (no socket at {run_dir}/node7/admin.sock)"
        in result.output
    )


def test_no_agent_at_all(run_dir: Path) -> None:
    result = invoke("workloads")
    assert result.exit_code == 1
    assert f"no nodemesh agent is running here (no {run_dir}/*/admin.sock)" in result.output


def _bind(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


def test_several_agents_need_node(run_dir: Path) -> None:
    socks = [_bind(run_dir / n / "admin.sock") for n in ("node1", "node2")]
    (run_dir / "lab").mkdir()  # other runtime directories without a socket are not nodes
    try:
        result = invoke("certs")
        assert result.exit_code == 1
        assert "several agents run here (node1, node2): choose one with --node" in result.output
    finally:
        for s in socks:
            s.close()


def test_stale_socket_is_reported_as_not_running(run_dir: Path) -> None:
    s = _bind(run_dir / "node1" / "admin.sock")  # bound but not listening: a dead agent's socket
    try:
        result = invoke("status")
        assert result.exit_code == 1
        assert "agent for node node1 is not running (socket at" in result.output
    finally:
        s.close()


def test_bad_node_name(run_dir: Path) -> None:
    result = invoke("status", "--node", "../etc")
    assert result.exit_code == 1 and "is not a valid node name" in result.output


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.25, "250ms"),
        (42, "42s"),
        (192, "3m12s"),
        (18180, "5h03m"),
        (187200, "2d4h"),
        (-75, "-1m15s"),
    ],
)
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_fmt_bytes() -> None:
    assert [fmt_bytes(n) for n in (0, 1023, 18432, 1_204_211)] == ["0 B", "1023 B", "18.0 KiB", "1.1 MiB"]


def test_parse_since() -> None:
    assert parse_since("5m", 1000.0) == 700.0
    assert parse_since("30", 1000.0) == 970.0
    assert parse_since("1970-01-01T00:10:00+00:00", 0) == 600.0
    with pytest.raises(typer.BadParameter):
        parse_since("yesterday", 0)


def test_flows_rejects_bad_since_and_verdict(run_dir: Path) -> None:
    assert invoke("flows", "--since", "soon", "--node", "x").exit_code == 2
    assert invoke("flows", "--verdict", "maybe").exit_code == 2


# --- an agent that stops mid-answer ----------------------------------------------------------------


@contextlib.contextmanager
def canned_agent(path: Path, answer: bytes, hold: bool = False) -> Iterator[None]:
    """An "agent" on `path` that reads each request and sends `answer`, then hangs up (or, with
    `hold`, keeps the connection open and says nothing more)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return  # the listening socket was closed: the test is over
            conn.recv(65536)
            conn.sendall(answer)
            if hold:
                held.append(conn)
            else:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        srv.shutdown(socket.SHUT_RDWR)  # wakes accept()
        srv.close()
        path.unlink()
        thread.join(5)
        for conn in held:
            conn.close()


CUT_SHORT = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n"
             b"Connection: close\r\n\r\n{\"flows\": [")


@pytest.mark.parametrize("args", [["status"], ["flows"], ["metrics"]], ids=str)
def test_an_answer_cut_short_is_an_error_not_a_traceback(run_dir: Path, args: list[str]) -> None:
    """docs/cli.md: errors go to stderr with exit status 1; `http.client` raises IncompleteRead when
    the agent stops mid-answer, past `_open`, which only covers the answer's head."""
    path = run_dir / "node1" / "admin.sock"
    with canned_agent(path, CUT_SHORT):
        result = invoke(*args, "--socket", str(path))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error: the answer from node node1 broke off: IncompleteRead(11 bytes read" in result.output


def test_an_error_answer_cut_short_and_a_silent_agent_are_errors(run_dir: Path) -> None:
    path = run_dir / "node1" / "admin.sock"
    error = CUT_SHORT.replace(b"200 OK", b"500 Internal Server Error")
    with canned_agent(path, error), pytest.raises(node_cli.CliError, match="broke off"):
        AdminClient("node1", path).get_json("/v1/status")
    silent = pytest.raises(node_cli.CliError, match=r"stopped mid-answer \(silent 0\.2s\)")
    with canned_agent(path, CUT_SHORT, hold=True), silent:
        AdminClient("node1", path, timeout=0.2).get_text("/metrics")


def test_a_follow_stream_with_invalid_json_is_an_error(run_dir: Path) -> None:
    path = run_dir / "node1" / "admin.sock"
    body = b'{"kind":"start","ring":{}}\n{"kind":"flo\n'
    stream = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
              % (len(body), body))
    with canned_agent(path, stream):
        result = invoke("flows", "--follow", "--socket", str(path))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error: the stream from node node1 sent invalid JSON" in result.output


# --- rendering canned documents -------------------------------------------------------------------


class FakeClient(AdminClient):
    def __init__(self, docs: dict[str, Any]) -> None:
        super().__init__("node1", Path("/nonexistent"))
        self.docs = docs
        self.asked: list[tuple[str, dict[str, object]]] = []

    def get_json(self, path: str, **params: object) -> Any:
        self.asked.append((path, params))
        doc = self.docs[path]
        if isinstance(doc, Exception):
            raise doc
        return doc

    def stream(self, path: str, **params: object) -> Iterator[dict[str, Any]]:
        self.asked.append((path, params))
        yield from self.docs["stream"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient({})
    monkeypatch.setattr(node_cli, "select_client", lambda node, sock: client)
    monkeypatch.setenv("COLUMNS", "200")
    return client


FLOW = FlowRecord(
    time=1_700_000_000.0,
    event=FlowEvent.DENY,
    verdict=Verdict.DENIED,
    src_ip="10.1.0.2",
    src_port=41000,
    dst_ip="10.2.0.4",
    dst_port=5432,
    src_pod="web",
    src_namespace="shop",
    dst_pod="db-1",
    dst_namespace="shop",
    policy="shop/freeze",
    rule=2,
    reason="DENIED_BY_POLICY",
)


def test_flows_are_printed_one_line_each_and_filters_go_to_the_server(fake: FakeClient) -> None:
    fake.docs["/v1/flows"] = {"flows": [FLOW.to_dict()], "ring": FlowRing().stats()}
    result = invoke("flows", "--pod", "shop/web", "--verdict", "denied", "--last", "5")
    assert result.exit_code == 0, result.output
    assert "DENY  shop/web (10.1.0.2:41000) [plaintext] -> shop/db-1 (10.2.0.4:5432) DENIED" in result.output
    assert "DENIED_BY_POLICY shop/freeze rules[2]" in result.output
    assert fake.asked == [
        ("/v1/flows", {"pod": "shop/web", "namespace": None, "verdict": "denied", "since": None, "last": 5})
    ]


def test_follow_reports_drops_on_stderr(fake: FakeClient) -> None:
    fake.docs["stream"] = [
        {"kind": "start", "ring": {}},
        {"kind": "flow", "flow": FLOW.to_dict()},
        {"kind": "dropped", "count": 3, "total": 3},
    ]
    result = CliRunner().invoke(app, ["flows", "-f", "-o", "json"])
    assert result.exit_code == 1  # the stream ended: the agent went away
    assert json.loads(result.stdout.splitlines()[0])["dst_pod"] == "db-1"
    assert '{"dropped": 3, "total_dropped": 3}' in result.stderr
    assert "ended the stream" in result.stderr


def test_server_error_message_is_shown(fake: FakeClient) -> None:
    fake.docs["/v1/policy/explain"] = node_cli.CliError("no pod 'x'; known pods: shop/web")
    result = invoke("policy", "explain", "--from", "x", "--to", "web:80")
    assert result.exit_code == 1 and "error: no pod 'x'; known pods: shop/web" in result.output


def test_certs_table_states(fake: FakeClient) -> None:
    now = 1_700_000_000.0
    certs = [
        CertInfo("spiffe://td/ns/a/sa/ok", "ab12", "O=nodemesh", now - 3600, now + 82800, now + 39600),
        CertInfo(
            "spiffe://td/ns/a/sa/late",
            "cd34",
            "O=nodemesh",
            now - 50000,
            now + 36400,
            now - 6800,
            last_error="controller unreachable",
        ),
        CertInfo("spiffe://td/ns/a/sa/gone", "ef56", "O=nodemesh", now - 90000, now - 3600, now - 46800),
    ]
    fake.docs["/v1/certs"] = {"certs": [views.cert_dict(c, now) for c in certs]}
    out = invoke("certs").output
    assert "11h00m" in out and "valid" in out
    assert "renewing (controller unreachable)" in out and "expired" in out
    summary = views.cert_summary(certs, now)
    assert (summary["valid"], summary["renewing"], summary["expired"]) == (1, 1, 1)


def test_policies_table_shows_rejected_and_skipped_objects(fake: FakeClient) -> None:
    def ap(name: str, spec: dict[str, Any]) -> PolicyObject:
        return PolicyObject.of(
            "AuthorizationPolicy",
            "shop",
            name,
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": spec,
            },
        )

    objects = [
        ap("bad-action", {"action": "MAYBE"}),
        ap(
            "waypoint",
            {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "w"}]},
        ),
        ap("ok", {"rules": [{}]}),
    ]
    fake.docs["/v1/policies"] = {"policies": views.policies_list(objects, "istio-system")}
    out = invoke("policies").output
    assert "skipped: targetRef" in out and "rejected: spec.action" in out
    assert out.count("active") == 1


def _conn_row(cid: str, worker: int | None) -> dict[str, Any]:
    row = {"id": cid, "path": "hbone", "src_pod": "shop/web", "src_identity": "", "src": "10.1.0.2:41000",
           "dst_service": "", "dst_workload": "shop/db-0", "dst": "10.2.0.3:5432", "bytes_sent": 10,
           "bytes_received": 20, "age": 3.0, "opened_at": 1_700_000_000.0}
    return row if worker is None else {**row, "worker": worker}


@pytest.mark.parametrize(
    ("workers", "column"),
    [
        ([None, None], False),  # an agent of before proxy workers: no field
        ([0, 0], False),  # no workers, or none carries a connection now
        ([0, 2], True),
    ],
)
def test_conns_has_a_worker_column_only_when_workers_carry_connections(
    fake: FakeClient, workers: list[int | None], column: bool
) -> None:
    fake.docs["/v1/connections"] = {"connections": [_conn_row(f"c{i}", w) for i, w in enumerate(workers)],
                                    "workers_unreachable": []}
    lines = invoke("conns").output.splitlines()
    assert (lines[0].split()[0] == "WORKER") is column
    if column:
        assert [line.split()[0] for line in lines[1:]] == ["0", "2"]
    result = invoke("conns", "-o", "json")
    assert [r.get("worker") for r in json.loads(result.stdout)] == workers


def test_conns_warns_about_workers_that_did_not_answer(fake: FakeClient) -> None:
    fake.docs["/v1/connections"] = {"connections": [_conn_row("c1", 0)], "workers_unreachable": [2]}
    result = CliRunner().invoke(app, ["conns", "-o", "json"])
    assert result.exit_code == 0
    assert [r["id"] for r in json.loads(result.stdout)] == ["c1"]
    assert "warning: proxy worker 2 did not answer: its connections are not listed" in result.stderr


def _status(workers: list[dict[str, Any]]) -> dict[str, Any]:
    from agent.admin.sources import AgentStatus, ControllerLink, DatapathStatus, ProxyState, ProxyStatus

    st = AgentStatus("node1", "0.1.0", 1_700_000_000.0, ProxyStatus(ProxyState.RUNNING, 3, 5, pods=1),
                     DatapathStatus("bcc"), ControllerLink("10.0.0.1:15012", False))
    return {**views.status_dict(st, [], FlowRing(), 1_700_000_060.0), "workers": workers}


def _worker(index: int, pid: int | None, restarts: int = 0, connections: int | None = 0,
            last_exit: str = "") -> dict[str, Any]:
    return {"index": index, "pid": pid, "up": pid is not None, "restarts": restarts, "started_at": None,
            "last_exit": last_exit, "connections": connections}


@pytest.mark.parametrize(
    ("workers", "line"),
    [
        ([], None),
        ([_worker(1, 123, 1), _worker(2, 456)], "proxy workers: 2 of 2 up (pids 123, 456), 1 restart"),
        ([_worker(1, 123), _worker(2, None, 3, None, "signal 9"), _worker(3, 789, connections=None)],
         "proxy workers: 2 of 3 up (pids 123, 789), 3 restarts; worker 2 down (last exit: signal 9); "
         "worker 3 not answering"),
    ],
)
def test_status_has_a_workers_line_only_with_workers(
    fake: FakeClient, workers: list[dict[str, Any]], line: str | None
) -> None:
    fake.docs["/v1/status"] = _status(workers)
    out = invoke("status").output
    found = [x.strip() for x in out.splitlines() if "proxy workers" in x]
    assert found == ([line] if line else [])
    assert "running, 3 listeners, 5 connections" in out


def test_status_shows_how_full_the_connection_cap_is(fake: FakeClient) -> None:
    from agent.admin.sources import AgentStatus, ControllerLink, DatapathStatus, ProxyState, ProxyStatus

    proxy = ProxyStatus(ProxyState.RUNNING, 3, 5, pods=1, slots_in_use=8_123, slots=10_000)
    st = AgentStatus("node1", "0.1.0", 1_700_000_000.0, proxy, DatapathStatus("bcc"),
                     ControllerLink("10.0.0.1:15012", False))
    doc = views.status_dict(st, [], FlowRing(), 1_700_000_060.0)
    assert (doc["proxy"]["connection_slots_in_use"], doc["proxy"]["connection_slots"]) == (8_123, 10_000)
    fake.docs["/v1/status"] = doc
    out = invoke("status").output
    assert "running, 3 listeners, 5 connections (8,123 of 10,000 slots in use), callers'" in out
