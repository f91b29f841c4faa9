"""Helpers for the lab e2e tests of issue 5 (mTLS, authorization): flow records, bounded waits,
policies applied through the real controller and checked on every agent, mesh certificates.

Not a test module: imported by test_lab_mtls.py and test_lab_authz.py.
"""

from __future__ import annotations

import json
import shlex
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from conftest import LabHandle, nodemesh_cli
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.datapath.netns import in_netns
from api.csr import new_workload_csr
from api.spiffe import SpiffeId
from controller.ca import CertificateAuthority

T = TypeVar("T")
NODES = ("node1", "node2")
TRUST_DOMAIN = "cluster.local"


def wait_for(check: Callable[[], T], timeout: float = 5.0, what: str = "condition", step: float = 0.05) -> T:
    """Poll `check` until it returns something truthy (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(step)


# ---- flow records (the agents' log lines `msg=flow key=value ...`) ------------------------------
def parse_flow_lines(log_text: str, **fields: str) -> list[dict[str, str]]:
    """The flow records (`msg=flow key=value ...` lines) of an agent log whose fields match `fields`."""
    out = []
    for line in log_text.splitlines():
        if "msg=flow " not in line:
            continue
        rec = dict(kv.split("=", 1) for kv in shlex.split(line.split("msg=flow ", 1)[1]) if "=" in kv)
        if all(rec.get(k) == v for k, v in fields.items()):
            out.append(rec)
    return out


def flows(lab: LabHandle, node: str, **fields: str) -> list[dict[str, str]]:
    """The flow records in the log of `node`'s agent whose fields match `fields`."""
    return parse_flow_lines(lab.log(f"agent-{node}"), **fields)


def flows_from(lab: LabHandle, node: str, src_ip: str, **fields: str) -> list[dict[str, str]]:
    return [r for r in flows(lab, node, **fields) if r.get("src", "").startswith(f"{src_ip}:")]


def wait_new_flow(
    lab: LabHandle, node: str, before: int, src_ip: str, timeout: float = 5.0, **fields: str
) -> dict[str, str]:
    """The first record from `src_ip` matching `fields` beyond the `before` such records already logged."""
    recs = wait_for(
        lambda: flows_from(lab, node, src_ip, **fields)[before:],
        timeout,
        f"a flow record on {node} from {src_ip} with {fields}",
    )
    return recs[0]


# ---- requests from pods ------------------------------------------------------------------------
def curl(lab: LabHandle, pod: str, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return lab.exec(pod, "curl", "-sS", "--max-time", "5", *extra, url, timeout=20)


def request_ok(lab: LabHandle, pod: str, url: str, *extra: str) -> dict[str, Any]:
    proc = curl(lab, pod, url, *extra)
    assert proc.returncode == 0, f"{pod} → {url}: rc={proc.returncode} {proc.stderr!r}"
    body: dict[str, Any] = json.loads(proc.stdout)
    return body


def request_refused(lab: LabHandle, pod: str, url: str) -> subprocess.CompletedProcess[bytes]:
    """The request got no answer from the app: the connection was closed or reset by the mesh."""
    proc = curl(lab, pod, url)
    assert proc.returncode != 0 and b'"pod"' not in proc.stdout, (
        f"{pod} → {url} was answered: rc={proc.returncode} {proc.stdout!r}"
    )
    # 52: empty reply (closed before any answer), 56: reset; 7 / 28 would mean the mesh never accepted
    assert proc.returncode in (52, 56), f"unexpected curl failure rc={proc.returncode} {proc.stderr!r}"
    return proc


# ---- the agents' admin API ---------------------------------------------------------------------
def admin_get(node: str, path: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--unix-socket", f"/run/nodemesh/{node}/admin.sock",
         f"http://agent{path}"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert proc.returncode == 0, f"admin {node}{path}: {proc.stderr!r}"
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def agent_policies(node: str) -> set[tuple[str, str, str]]:
    return {(p["kind"], p["namespace"], p["name"]) for p in admin_get(node, "/v1/policies")["policies"]}


def controller_policies(kind: str) -> set[tuple[str, str, str]]:
    proc = nodemesh_cli("get", kind, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return {tuple(row["key"].split("/", 2)) for row in json.loads(proc.stdout)}  # type: ignore[misc]


# ---- policies through `nodemesh apply` ---------------------------------------------------------
class Policies:
    """Applies policy files with the real CLI and removes them by deleting the stored file; both wait
    (bounded) until the controller and every agent have the change."""

    def __init__(self, lab: LabHandle, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.applied: dict[str, tuple[str, str, str]] = {}  # file name → (kind, ns, name)

    def apply(self, kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> str:
        doc = {
            "apiVersion": "security.istio.io/v1",
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
        proc = nodemesh_cli("apply", "-f", str(path))
        assert proc.returncode == 0, proc.stderr
        assert (self.lab.state_dir / "config" / path.name).exists()
        key = (kind, namespace, name)
        self.applied[path.name] = key
        assert key in controller_policies(kind)  # Admin/Apply refreshes the state before returning
        for node in NODES:
            wait_for(lambda n=node: key in agent_policies(n), 5.0, f"{key} on the agent of {node}")  # type: ignore[misc]
        return f"{namespace}/{name}"

    def remove(self, filename: str) -> None:
        key = self.applied.pop(filename)
        (self.lab.state_dir / "config" / filename).unlink()
        wait_for(lambda: key not in controller_policies(key[0]), 5.0, f"the controller to drop {key}", 0.2)
        for node in NODES:
            wait_for(lambda n=node: key not in agent_policies(n), 5.0, f"{node} to drop {key}")  # type: ignore[misc]

    def remove_all(self) -> None:
        for filename in list(self.applied):
            self.remove(filename)


# ---- certificates ------------------------------------------------------------------------------
def spiffe(ns: str, sa: str) -> SpiffeId:
    return SpiffeId(TRUST_DOMAIN, f"/ns/{ns}/sa/{sa}")


def issue(ca: CertificateAuthority, identity: SpiffeId) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a fresh SVID for `identity` signed by `ca` (a CSR through api.csr)."""
    key, csr_pem = new_workload_csr(identity)
    issued = ca.sign(ca.validate_csr(csr_pem), timedelta(hours=1))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return b"".join(issued.chain_pem), key_pem


def client_tls(bundle_pem: bytes, cert: tuple[bytes, bytes] | None, tmp: Path) -> ssl.SSLContext:
    """A plain `ssl` client context, independent of agent.proxy.tls: TLS 1.3, ALPN h2, verifies the
    server chain against `bundle_pem` (the SPIFFE SAN is checked by the caller), optional client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        chain, key = cert
        (tmp / "client.pem").write_bytes(chain)
        (tmp / "client-key.pem").write_bytes(key)
        ctx.load_cert_chain(tmp / "client.pem", tmp / "client-key.pem")
    return ctx


def uri_sans(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def connect_from(netns_path: str, addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP socket created inside `netns_path` (outside any pod cgroup: never redirected), connected."""
    with in_netns(netns_path):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except OSError:
        s.close()
        raise
    return s
