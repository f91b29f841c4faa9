"""Issue 5 in the lab: Istio AuthorizationPolicy (security.istio.io/v1) enforced by the node proxies.

Each policy goes through the real `nodemesh apply` into the controller, is pushed to both agents
(checked on their admin API), is judged on the destination node against real connections (mTLS
identities over HBONE, plaintext from the non-enrolled outsider), and is removed again by deleting
its file from the controller's config directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import LabHandle
from meshlab import Policies, flows, flows_from, request_ok, request_refused, wait_for, wait_new_flow

CLIENT_PRINCIPAL = "cluster.local/ns/default/sa/client"
CLIENT_ID = f"spiffe://{CLIENT_PRINCIPAL}"
HTTPBIN = {"matchLabels": {"app": "httpbin"}}


def url(lab: LabHandle, pod: str, port: int = 8000, path: str = "/authz") -> str:
    return f"http://{lab.plan.pod(pod).ip}:{port}{path}"


def policy(action: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"selector": HTTPBIN, "action": action, "rules": list(rules)}


def from_source(action: str, **source: list[str]) -> dict[str, Any]:
    return policy(action, {"from": [{"source": source}]})


def to_ports(action: str, ports: list[str]) -> dict[str, Any]:
    return policy(action, {"to": [{"operation": {"ports": ports}}]})


def assert_denied(
    lab: LabHandle, src: str, dst: str, *, reason: str, policy: str | None = None
) -> dict[str, str]:
    """`src` → `dst`:8000 is refused, and the destination node's proxy says why (flow record)."""
    src_ip, dst_pod = lab.plan.pod(src).ip, lab.plan.pod(dst)
    fields = {"event": "deny", "dst": f"{dst_pod.ip}:8000", "reason": reason}
    if policy is not None:
        fields["policy"] = policy
    before = len(flows_from(lab, dst_pod.node, src_ip, **fields))
    src_node = lab.plan.pod(src).node
    cross_mtls = lab.plan.pod(src).enrolled and src_node != dst_pod.node
    before_src = len(flows_from(lab, src_node, src_ip, event="deny", reason="DENIED_BY_DESTINATION"))
    request_refused(lab, src, url(lab, dst))
    rec = wait_new_flow(lab, dst_pod.node, before, src_ip, **fields)
    assert rec["verdict"] == "denied" and rec["dst_pod"] == f"default/{dst}"
    if policy is None:
        assert "policy" not in rec
    if cross_mtls:  # the source node was told 401 over HBONE and closed the app's connection
        wait_new_flow(lab, src_node, before_src, src_ip, event="deny", reason="DENIED_BY_DESTINATION")
    return rec


def assert_allowed(lab: LabHandle, src: str, dst: str) -> None:
    assert request_ok(lab, src, url(lab, dst))["pod"] == dst


# ---- 2. ALLOW / DENY by principal, namespace, ipBlock, port; DENY wins -------------------------
def test_allow_only_the_client_principal(lab: LabHandle, policies: Policies) -> None:
    name = policies.apply(
        "AuthorizationPolicy",
        "allow-client",
        policy(
            "ALLOW",
            {
                "from": [{"source": {"principals": [CLIENT_PRINCIPAL]}}],
                "to": [{"operation": {"ports": ["8000"]}}],
            },
        ),
    )
    assert name == "default/allow-client"
    assert_allowed(lab, "client", "httpbin-v2")  # HBONE
    assert_allowed(lab, "client", "httpbin-v1")  # same node
    client_ip = lab.plan.pod("client").ip
    before = len(flows_from(lab, "node2", client_ip, event="close", reason="ALLOWED_BY_POLICY"))
    assert_allowed(lab, "client", "httpbin-v2")
    rec = wait_new_flow(lab, "node2", before, client_ip, event="close", reason="ALLOWED_BY_POLICY")
    assert rec["src_identity"] == CLIENT_ID
    # the outsider speaks plaintext: no principal, so no ALLOW rule matches it
    rec = assert_denied(lab, "outsider", "httpbin-v2", reason="NOT_ALLOWED")
    assert "src_identity" not in rec
    assert_denied(lab, "outsider", "httpbin-v1", reason="NOT_ALLOWED")
    policies.remove("allow-client.yaml")
    assert_allowed(lab, "outsider", "httpbin-v2")


def test_deny_from_a_namespace(lab: LabHandle, policies: Policies) -> None:
    # a namespace nobody is in denies nobody
    policies.apply("AuthorizationPolicy", "deny-ns-other", from_source("DENY", namespaces=["other"]))
    assert_allowed(lab, "client", "httpbin-v2")
    name = policies.apply(
        "AuthorizationPolicy", "deny-ns-default", from_source("DENY", namespaces=["default"])
    )
    rec = assert_denied(lab, "client", "httpbin-v2", reason="DENIED_BY_POLICY", policy=name)
    assert rec["src_identity"] == CLIENT_ID and rec["rule"] == "0"
    assert_denied(lab, "client", "httpbin-v1", reason="DENIED_BY_POLICY", policy=name)  # same node
    # plaintext has no namespace: a positive `namespaces` never matches it
    assert_allowed(lab, "outsider", "httpbin-v2")


def test_deny_an_ip_block(lab: LabHandle, policies: Policies) -> None:
    outsider = lab.plan.pod("outsider")
    name = policies.apply(
        "AuthorizationPolicy", "deny-outsider-ip", from_source("DENY", ipBlocks=[f"{outsider.ip}/32"])
    )
    assert_denied(lab, "outsider", "httpbin-v2", reason="DENIED_BY_POLICY", policy=name)
    assert_denied(lab, "outsider", "httpbin-v1", reason="DENIED_BY_POLICY", policy=name)  # across nodes
    assert_allowed(lab, "client", "httpbin-v2")  # another address
    # a block holding the whole node2 pod range catches it too, and not node1's client
    policies.remove("deny-outsider-ip.yaml")
    name = policies.apply(
        "AuthorizationPolicy", "deny-node2-pods", from_source("DENY", ipBlocks=["10.100.2.0/24"])
    )
    assert_denied(lab, "outsider", "httpbin-v1", reason="DENIED_BY_POLICY", policy=name)
    assert_allowed(lab, "client", "httpbin-v1")


def test_allow_on_another_port_refuses_8000(lab: LabHandle, policies: Policies) -> None:
    policies.apply("AuthorizationPolicy", "allow-port-9000", to_ports("ALLOW", ["9000"]))
    rec = assert_denied(lab, "client", "httpbin-v2", reason="NOT_ALLOWED")
    assert rec["src_identity"] == CLIENT_ID
    assert_denied(lab, "outsider", "httpbin-v2", reason="NOT_ALLOWED")
    # and a DENY of that other port leaves 8000 alone
    policies.remove("allow-port-9000.yaml")
    policies.apply("AuthorizationPolicy", "deny-port-9000", to_ports("DENY", ["9000"]))
    assert_allowed(lab, "client", "httpbin-v2")


def test_deny_takes_precedence_over_a_matching_allow(lab: LabHandle, policies: Policies) -> None:
    rule = {"from": [{"source": {"principals": [CLIENT_PRINCIPAL]}}]}
    policies.apply("AuthorizationPolicy", "allow-client-too", policy("ALLOW", rule))
    deny = policies.apply("AuthorizationPolicy", "deny-client-too", policy("DENY", rule))
    assert_denied(lab, "client", "httpbin-v2", reason="DENIED_BY_POLICY", policy=deny)
    assert_denied(lab, "client", "httpbin-v1", reason="DENIED_BY_POLICY", policy=deny)
    policies.remove("deny-client-too.yaml")  # the ALLOW alone admits it again
    assert_allowed(lab, "client", "httpbin-v2")
    assert_denied(lab, "outsider", "httpbin-v2", reason="NOT_ALLOWED")


# ---- 6. a policy change closes an open connection it now denies ------------------------------
# HTTP/1.1 keep-alive on one connection, a request every 100 ms; prints each answer and how it ended.
KEEPALIVE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", s.getsockname()[1], flush=True)
deadline, n, buf = time.monotonic() + float(sys.argv[3]), 0, b""
pod = (sys.argv[4] if len(sys.argv) > 4 else "httpbin-v2").encode()  # who must answer
def fill(pred):
    global buf
    while not pred():
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("closed by the peer")
        buf += chunk
try:
    while time.monotonic() < deadline:
        s.sendall(b"GET /live/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
        fill(lambda: b"\r\n\r\n" in buf)
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        fill(lambda: len(buf) >= length)
        assert b'"pod": "%s"' % pod in buf[:length], buf[:length]
        buf, n = buf[length:], n + 1
        print("ok", n, time.time(), flush=True)
        time.sleep(0.1)
    print("still-open", n, flush=True)
except (EOFError, OSError) as exc:
    print("closed", n, time.time(), repr(exc), flush=True)
"""


@contextlib.contextmanager
def keepalive(
    lab: LabHandle, pod: str, ip: str, answering: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """KEEPALIVE from `pod` to `ip`:8000 for at most 40 s (`answering` must answer); killed on exit."""
    proc = lab.lab.popen(pod, ["python3", "-c", KEEPALIVE, ip, "8000", "40", answering], log=log)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def test_a_policy_change_closes_an_open_connection_it_now_denies(
    lab: LabHandle, policies: Policies, tmp_path: Path
) -> None:
    v2 = lab.plan.pod("httpbin-v2")
    out = tmp_path / "keepalive.log"

    def lines(kind: str) -> list[list[str]]:
        return [ln.split() for ln in out.read_text().splitlines() if ln.startswith(kind + " ")]

    with keepalive(lab, "client", v2.ip, "httpbin-v2", out) as proc:
        wait_for(lambda: len(lines("ok")) >= 5, 10, "5 answers on the long-lived connection")
        # an unrelated policy change re-checks the connection and keeps it
        policies.apply("AuthorizationPolicy", "deny-ns-other-live", from_source("DENY", namespaces=["other"]))
        seen = len(lines("ok"))
        wait_for(lambda: len(lines("ok")) >= seen + 5, 5, "answers after an unrelated policy change")
        assert lines("closed") == []

        t0 = time.time()
        name = policies.apply(
            "AuthorizationPolicy", "deny-client-live", from_source("DENY", principals=[CLIENT_PRINCIPAL])
        )
        closed = wait_for(lambda: lines("closed"), 5, "the connection to be closed")[0]
        assert float(closed[2]) - t0 < 5, closed
        print(f"DENY applied (CLI → controller → agents) → connection closed: {float(closed[2]) - t0:.2f} s")
        assert int(closed[1]) >= 10, closed  # it had been working all along
        proc.wait(5)
    # node2 re-decided it with the new policy, said so, and closed it
    deny = wait_for(lambda: flows(lab, "node2", event="deny", policy=name, dst=f"{v2.ip}:8000"), 5)
    assert len(deny) == 1 and deny[0]["src_identity"] == CLIENT_ID, deny
    conn = deny[0]["conn"]
    (close,) = wait_for(lambda: flows(lab, "node2", event="close", conn=conn), 5)
    assert close["reason"] == "policy_changed:DENIED_BY_POLICY" and int(close["bytes_received"]) > 0
    said = f"event=connection_closed_by_policy conn={conn} policy={name}"
    wait_for(lambda: said in lab.log("agent-node2"), 5, said)
    # a new connection is refused; once the policy is gone, the client is served again
    assert_denied(lab, "client", "httpbin-v2", reason="DENIED_BY_POLICY", policy=name)
    policies.remove("deny-client-live.yaml")
    assert request_ok(lab, "client", f"http://{v2.ip}:8000/after")["pod"] == "httpbin-v2"


def test_strict_closes_an_open_plaintext_connection(
    lab: LabHandle, policies: Policies, tmp_path: Path
) -> None:
    """The outsider (not in the mesh) keeps a plaintext connection to httpbin-v1 under PERMISSIVE;
    STRICT applied for the namespace closes it, as Istio (STRICT is an authorization rule there)."""
    v1 = lab.plan.pod("httpbin-v1")
    out = tmp_path / "plaintext.log"

    def lines(kind: str) -> list[list[str]]:
        return [ln.split() for ln in out.read_text().splitlines() if ln.startswith(kind + " ")]

    with keepalive(lab, "outsider", v1.ip, "httpbin-v1", out) as proc:
        wait_for(lambda: len(lines("ok")) >= 5, 10, "5 answers on the plaintext connection")
        t0 = time.time()
        policies.apply("PeerAuthentication", "strict-live", {"mtls": {"mode": "STRICT"}}, namespace="default")
        closed = wait_for(lambda: lines("closed"), 5, "the plaintext connection to be closed")[0]
        print(f"STRICT applied → plaintext connection closed: {float(closed[2]) - t0:.2f} s")
        proc.wait(5)
    deny = wait_for(lambda: flows(lab, "node1", event="deny", reason="STRICT_MTLS_PLAINTEXT",
                                  dst=f"{v1.ip}:8000"), 5)
    assert len(deny) == 1 and "src_identity" not in deny[0], deny
    (close,) = wait_for(lambda: flows(lab, "node1", event="close", conn=deny[0]["conn"]), 5)
    assert close["reason"] == "policy_changed:STRICT_MTLS_PLAINTEXT" and int(close["bytes_received"]) > 0
