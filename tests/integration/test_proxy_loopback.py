"""NodeProxy end to end on loopback: two proxies (two "nodes"), real CA, real TLS, real sockets.

Each pod is an IP of 127/8 (a random /24 per test run). Its listeners are real sockets: 15001 is
bound to `<pod ip>:<ephemeral>` and the test "app" connects to it after registering its original
destination in a fake datapath (what connect4 + sockops do); 15008 is `<pod ip>:<hbone port>`; a
15006 listener is bound to an alias IP on the app's port, so that `getsockname()` gives the
original port as sk_lookup's steering does. Pod netns paths are this process's own netns, so the
proxy's in-netns socket creation really runs (setns needs root).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2client import h2_connect

from agent.admin.flows import FlowEvent, FlowRecord, Verdict
from agent.datapath.interface import EnrolledPod, PodRef
from agent.identity import CertificateManager
from agent.proxy import tls
from agent.proxy.core import ProxyError
from agent.proxy.server import NodeProxy
from api.csr import new_workload_csr
from api.resources import Endpoint, PolicyObject, Service, ServicePort, TunnelProtocol, Workload
from api.spiffe import SpiffeId
from controller.ca.authority import CertificateAuthority

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="setns into a netns needs root"),
]

TD = "cluster.local"
OWN_NETNS = "/proc/self/ns/net"
APP_PORT = 8080


async def assert_eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class FakeDatapath:
    """original_destination from a dict filled by the test app before it connects."""

    def __init__(self) -> None:
        self.orig: dict[tuple[int, int], tuple[str, int]] = {}

    def load(self, node: str, pod_cgroup: Path) -> None: ...
    def enroll(self, pod: PodRef) -> EnrolledPod:
        raise NotImplementedError

    def unenroll(self, pod: PodRef) -> None: ...

    def original_destination(self, netns_cookie: int, peer: tuple[str, int]) -> tuple[str, int] | None:
        return self.orig.get((netns_cookie, peer[1]))

    def counters(self) -> dict[str, int]:
        return {}

    def uninstall(self, node: str) -> None: ...


@dataclass
class App:
    """An echo server on `<pod ip>:<port>` that prefixes its first reply, recording what it got."""

    addr: tuple[str, int]
    prefix: bytes = b""
    received: bytearray = field(default_factory=bytearray)
    peers: list[tuple[str, int]] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.peers.append(w.get_extra_info("peername"))
            prefix = self.prefix
            try:
                while data := await r.read(65536):
                    self.received += data
                    w.write(prefix + data)
                    prefix = b""
                    await w.drain()
                w.close()
            except ConnectionError:
                w.close()

        self.server = await asyncio.start_server(handle, *self.addr)


@dataclass
class Pod:
    name: str
    namespace: str
    sa: str
    node: str
    ip: str
    cookie: int
    labels: tuple[tuple[str, str], ...] = ()
    netns: str = OWN_NETNS
    ep: EnrolledPod | None = None

    @property
    def workload(self) -> Workload:
        return Workload(
            uid=self.name,  # opaque, as Kubernetes pod uids: the pod's key (`pod_key`) is the same
            name=self.name,
            namespace=self.namespace,
            service_account=self.sa,
            node=self.node,
            ips=(self.ip,),
            labels=self.labels,
            protocol=TunnelProtocol.HBONE,
            netns=self.netns,
        )

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId.for_workload(TD, self.namespace, self.sa)


def listener(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(128)
    s.setblocking(False)
    return s


@dataclass
class Mesh:
    ca: CertificateAuthority
    net: str  # "127.a.b."
    hbone_port: int
    dp: dict[str, FakeDatapath]
    proxies: dict[str, NodeProxy]
    certs: dict[str, CertificateManager]
    pods: dict[str, Pod]
    apps: dict[str, App]
    services: list[Service] = field(default_factory=list)
    policies: list[PolicyObject] = field(default_factory=list)
    extra_workloads: list[Workload] = field(default_factory=list)

    def push(self) -> None:
        workloads = [p.workload for p in self.pods.values()] + self.extra_workloads
        for proxy in self.proxies.values():
            proxy.update(workloads, self.services, self.policies)

    def set_policies(self, *policies: PolicyObject) -> None:
        self.policies = list(policies)
        self.push()

    async def connect(
        self, src: str, dst: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """What an app in pod `src` sees when it connects to `dst` (captured to the pod's 15001)."""
        pod = self.pods[src]
        assert pod.ep is not None and pod.ep.outbound is not None
        s = socket.socket()
        s.bind((pod.ip, 0))
        self.dp[pod.node].orig[(pod.cookie, s.getsockname()[1])] = dst
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, pod.ep.outbound.getsockname())
        return await asyncio.open_connection(sock=s)

    def flows(self, node: str) -> list[FlowRecord]:
        return list(self.proxies[node].flows.ring)

    def sample(self, node: str, name: str, **labels: str) -> float:
        total = 0.0
        for metric in self.proxies[node].metrics.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, expect: int
) -> bytes:
    writer.write(data)
    await writer.drain()
    got = bytearray()
    while len(got) < expect:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The proxy closed the connection without delivering anything."""
    try:
        writer.write(b"hello")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(100), 5)
    except ConnectionError:
        return True
    return data == b""


def make_ca(tmp: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp, TD)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(Path(tmp_path_factory.mktemp("ca")))


@pytest.fixture
async def mesh(ca: CertificateAuthority) -> AsyncIterator[Mesh]:
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}."
    pods = {
        "a": Pod("a", "front", "a", "node1", net + "11", 101, (("app", "a"),)),
        "c": Pod("c", "front", "c", "node1", net + "13", 103, (("app", "c"),)),
        "b": Pod("b", "back", "b", "node2", net + "12", 102, (("app", "b"), ("version", "v1"))),
    }

    async def sign(csr: bytes, ttl: int) -> list[bytes]:
        return ca.sign(ca.validate_csr(csr), timedelta(seconds=ttl)).chain_pem

    # one HBONE port for every pod (different IPs); find one free on all three
    # bind every pod's HBONE listener at once, before anything else takes an ephemeral port on
    # these IPs (a port-0 bind could otherwise land on the probed port: EADDRINUSE, seen in CI)
    for _ in range(20):
        probe = listener((pods["a"].ip, 0))
        hbone_port = probe.getsockname()[1]
        probe.close()
        hbone_socks: dict[str, socket.socket] = {}
        try:
            for key, pod in pods.items():
                hbone_socks[key] = listener((pod.ip, hbone_port))
            break
        except OSError:
            for sock in hbone_socks.values():
                sock.close()
    else:
        raise RuntimeError("no common free HBONE port on the test IPs")
    dps = {n: FakeDatapath() for n in ("node1", "node2")}
    certs = {n: CertificateManager(sign, ca.trust_bundle_pem, TD) for n in ("node1", "node2")}
    proxies = {
        n: NodeProxy(dps[n], certs[n], TD, node=n, bundle=ca.trust_bundle_pem, hbone_port=hbone_port)
        for n in ("node1", "node2")
    }
    apps = {k: App((p.ip, APP_PORT), prefix=k.encode() + b":") for k, p in pods.items()}
    m = Mesh(ca, net, hbone_port, dps, proxies, certs, pods, apps)
    try:
        for app in apps.values():
            await app.start()
        m.push()
        for i, (key, pod) in enumerate(pods.items()):
            pod.ep = EnrolledPod(
                pod=PodRef(uid=pod.name, netns_path=pod.netns, ip=pod.ip),
                netns_cookie=pod.cookie,
                pod_index=i,
                outbound=listener((pod.ip, 0)),
                # sk_lookup keeps the original port: an alias IP with the app's port stands in for it
                inbound=listener((net + str(100 + int(pod.ip.rsplit(".", 1)[1])), APP_PORT)),
                hbone=hbone_socks[key],
            )
            await proxies[pod.node].serve(pod.ep)
        for pod in pods.values():
            await asyncio.wait_for(certs[pod.node].wait_ready(pod.identity), 10)
        yield m
    finally:
        for proxy in proxies.values():
            await proxy.stop()
        for mgr in certs.values():
            await mgr.close()
        for app in apps.values():
            if app.server is not None:
                app.server.close()
        for pod in pods.values():
            if pod.ep is not None:
                pod.ep.close()
        for sock in hbone_socks.values():
            sock.close()  # idempotent; covers a failure before the pods got their listeners


def policy(name: str, namespace: str, spec: dict[str, Any]) -> PolicyObject:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return PolicyObject.of("AuthorizationPolicy", namespace, name, body)


def peer_authentication(name: str, namespace: str, mode: str) -> PolicyObject:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    }
    return PolicyObject.of("PeerAuthentication", namespace, name, body)


# --- HBONE between nodes ------------------------------------------------------------------------


async def test_hbone_round_trip_with_the_right_identities(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    app_port = w.get_extra_info("sockname")[1]
    assert await exchange(r, w, b"ping", 6) == b"b:ping"
    w.close()
    await assert_eventually(lambda: any(f.event is FlowEvent.CLOSE for f in mesh.flows("node2")))
    opened = [f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN]
    assert len(opened) == 1
    f = opened[0]
    assert f.src_identity == str(mesh.pods["a"].identity)
    assert (f.src_ip, f.src_pod, f.src_namespace) == (mesh.pods["a"].ip, "a", "front")
    # the app's source port (from `forwarded`, its IP being the tunnel's), as node1 records it
    assert f.src_port == app_port
    assert [x.src_port for x in mesh.flows("node1") if x.event is FlowEvent.OPEN] == [app_port]
    assert (f.dst_ip, f.dst_port, f.dst_pod, f.dst_namespace) == (b.ip, APP_PORT, "b", "back")
    assert f.reason == "ALLOWED_NO_POLICY"
    # the source side used HBONE with both principals known
    assert (
        mesh.sample(
            "node1",
            "istio_tcp_connections_opened_total",
            reporter="source",
            source_principal=str(mesh.pods["a"].identity),
            destination_principal=str(b.identity),
            destination_workload="b",
            destination_version="v1",
            connection_security_policy="mutual_tls",
        )
        == 1
    )
    assert (
        mesh.sample(
            "node2",
            "istio_tcp_connections_closed_total",
            reporter="destination",
            source_workload="a",
            source_principal=str(mesh.pods["a"].identity),
            connection_security_policy="mutual_tls",
        )
        == 1
    )


async def test_byte_counters_match_the_bytes_sent(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    sent_total, got_total, prefix = 0, 0, b"b:"
    for size in (1, 1000, 300_000):
        payload = os.urandom(size)
        got = await exchange(r, w, payload, size + len(prefix))
        assert got == prefix + payload
        sent_total += size
        got_total += size + len(prefix)
        prefix = b""
    w.close()
    for node, reporter in (("node1", "source"), ("node2", "destination")):

        def closed(n: str = node, rep: str = reporter) -> bool:
            return mesh.sample(n, "istio_tcp_connections_closed_total", reporter=rep) == 1

        await assert_eventually(closed)
        # Istio: received = from the client (request direction), sent = to the client
        assert mesh.sample(node, "istio_tcp_received_bytes_total", reporter=reporter) == sent_total
        assert mesh.sample(node, "istio_tcp_sent_bytes_total", reporter=reporter) == got_total
    close = next(f for f in mesh.flows("node2") if f.event is FlowEvent.CLOSE)
    assert (close.bytes_sent, close.bytes_received) == (sent_total, got_total)


async def test_many_connections_share_one_pooled_hbone_connection(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    conns = [await mesh.connect("a", (b.ip, APP_PORT)) for _ in range(20)]
    for i, (r, w) in enumerate(conns):
        assert await exchange(r, w, b"%d" % i, len(b"b:%d" % i)) == b"b:%d" % i
    assert mesh.proxies["node2"].inbound.hbone_stats["connections"] == 1
    for _, w in conns:
        w.close()


async def test_pooled_hbone_connections_are_kept_alive_with_pings(mesh: Mesh) -> None:
    outbound = mesh.proxies["node1"].outbound
    assert outbound.keepalive is not None  # on by default (10 s / 20 s)
    outbound.keepalive = (0.02, 2.0)  # pings every 20 ms for this test's new connections
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await exchange(r, w, b"k", len(b"b:k")) == b"b:k"
    clients = [e.client for slot in outbound.pool(mesh.pods["a"].ep)._slots.values() for e in slot.entries]
    assert len(clients) == 1
    await assert_eventually(lambda: clients[0].pings_acked >= 3)  # answered by node2's 15008
    assert await exchange(r, w, b"again", len(b"again")) == b"again"  # the stream is unaffected
    w.close()


def _pinged_by(addr: tuple[str, int], ctx: ssl.SSLContext, within: float) -> bool:
    """Connect to a 15008 as a bare h2 client and wait up to `within` s for the server's PING."""
    raw = socket.create_connection(addr, timeout=within)
    with raw, ctx.wrap_socket(raw, server_hostname=None) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                return False
            if any(isinstance(e, h2.events.PingReceived) for e in conn.receive_data(data)):
                return True
            s.sendall(conn.data_to_send())
    return False


async def test_inbound_hbone_connections_are_kept_alive_with_pings_too(mesh: Mesh) -> None:
    """15008 PINGs its connections as the pool does: a source node gone silent, or whose reset
    uvloop's poll dropped, does not hold a connection and its streams' app connections for ever."""
    proxy = mesh.proxies["node2"]
    assert proxy.inbound.keepalive == proxy.outbound.keepalive  # on by default (10 s / 20 s)
    proxy.inbound.keepalive = (0.02, 2.0)
    b = mesh.pods["b"]
    ctx = svid_context(mesh.ca, SpiffeId.for_workload(TD, "ops", "tester"), mesh.ca.trust_bundle_pem())
    assert await asyncio.to_thread(_pinged_by, (b.ip, mesh.hbone_port), ctx, 3.0)


# --- refusals at 15008 ----------------------------------------------------------------------------


def svid_context(ca: CertificateAuthority, identity: SpiffeId, bundle: bytes) -> ssl.SSLContext:
    key, csr = new_workload_csr(identity)
    issued = ca.sign(ca.validate_csr(csr))
    return tls.client_context(issued.chain_pem, key, bundle)


async def refused_handshake(addr: tuple[str, int], ctx: ssl.SSLContext, authority: str) -> bool:
    """TLS 1.3: the client may finish its side first; the refusal then shows as an alert or EOF."""
    try:
        status, body = await asyncio.to_thread(h2_connect, addr, ctx, authority, b"x")
    except (ssl.SSLError, OSError):
        return True
    return status == 0 and body == b""


async def test_independent_h2_client_reaches_the_app_through_15008(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    ctx = svid_context(mesh.ca, SpiffeId.for_workload(TD, "ops", "tester"), mesh.ca.trust_bundle_pem())
    status, body = await asyncio.to_thread(
        h2_connect, (b.ip, mesh.hbone_port), ctx, f"{b.ip}:{APP_PORT}", b"hello"
    )
    assert (status, body) == (200, b"b:hello")
    await assert_eventually(lambda: any(f.event is FlowEvent.CLOSE for f in mesh.flows("node2")))
    f = next(f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN)
    assert f.src_identity == f"spiffe://{TD}/ns/ops/sa/tester"
    assert f.src_pod == ""  # no workload proven by that certificate


async def test_forwarded_naming_another_ip_does_not_change_the_recorded_source(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    ctx = svid_context(mesh.ca, SpiffeId.for_workload(TD, "ops", "tester"), mesh.ca.trust_bundle_pem())
    spoof = (("forwarded", 'for="10.9.9.9:1234"'),)
    status, body = await asyncio.to_thread(
        h2_connect, (b.ip, mesh.hbone_port), ctx, f"{b.ip}:{APP_PORT}", b"hi", spoof
    )
    assert (status, body) == (200, b"b:hi")
    await assert_eventually(lambda: any(f.event is FlowEvent.CLOSE for f in mesh.flows("node2")))
    f = next(f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN)
    assert f.src_ip != "10.9.9.9" and f.src_port != 1234  # the TCP peer's address, all of it


async def test_authority_ip_not_the_tls_destination_gets_400(mesh: Mesh) -> None:
    b, c = mesh.pods["b"], mesh.pods["c"]
    ctx = svid_context(mesh.ca, mesh.pods["a"].identity, mesh.ca.trust_bundle_pem())
    status, _ = await asyncio.to_thread(h2_connect, (b.ip, mesh.hbone_port), ctx, f"{c.ip}:{APP_PORT}", b"x")
    assert status == 400
    assert mesh.apps["c"].peers == [] and mesh.apps["b"].peers == []


async def test_client_certificate_from_another_ca_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    b = mesh.pods["b"]
    rogue = make_ca(tmp_path)
    ctx = svid_context(rogue, mesh.pods["a"].identity, mesh.ca.trust_bundle_pem())
    assert await refused_handshake((b.ip, mesh.hbone_port), ctx, f"{b.ip}:{APP_PORT}")
    await assert_eventually(lambda: mesh.proxies["node2"].inbound.hbone_stats["handshake_failures"] == 1)
    assert mesh.apps["b"].peers == []


async def test_no_client_certificate_is_refused(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.ca.trust_bundle_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    assert await refused_handshake((b.ip, mesh.hbone_port), ctx, f"{b.ip}:{APP_PORT}")
    await assert_eventually(lambda: mesh.proxies["node2"].inbound.hbone_stats["handshake_failures"] == 1)
    assert mesh.apps["b"].peers == []


# --- L4 authorization -----------------------------------------------------------------------------

_A_PRINCIPAL = f"{TD}/ns/front/sa/a"

DENY_CASES: dict[str, tuple[list[dict[str, Any]], bool]] = {
    # name: (policies in namespace "back" as (action, rules) specs, allowed?)
    "deny-principal": (
        [{"action": "DENY", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]}],
        False,
    ),
    "deny-other-principal": (
        [{"action": "DENY", "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/x/sa/y"]}}]}]}],
        True,
    ),
    "deny-namespace": (
        [{"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}],
        False,
    ),
    "deny-ipblock": (
        [{"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["IPA/32"]}}]}]}],
        False,
    ),
    "deny-other-ipblock": (
        [{"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.9.9.9"]}}]}]}],
        True,
    ),
    "deny-port": (
        [{"action": "DENY", "rules": [{"to": [{"operation": {"ports": [str(APP_PORT)]}}]}]}],
        False,
    ),
    "deny-other-port": ([{"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}], True),
    "deny-beats-allow": (
        [
            {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]},
            {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]},
        ],
        False,
    ),
    "allow-other-only": (
        [{"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/x/sa/y"]}}]}]}],
        False,
    ),
    "allow-a": (
        [{"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]}],
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(DENY_CASES))
async def test_authorization_policy_at_the_destination(mesh: Mesh, case: str) -> None:
    specs, allowed = DENY_CASES[case]
    a, b = mesh.pods["a"], mesh.pods["b"]
    objs = [
        policy(f"p{i}", "back", json.loads(json.dumps(spec).replace("IPA", a.ip)))
        for i, spec in enumerate(specs)
    ]
    mesh.set_policies(*objs)
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    if allowed:
        assert await exchange(r, w, b"hi", 4) == b"b:hi"
        w.close()
        return
    assert await refused(r, w)
    deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
    assert len(deny) == 1 and deny[0].verdict is Verdict.DENIED
    assert deny[0].src_identity == str(a.identity)
    if case == "allow-other-only":
        assert deny[0].reason == "NOT_ALLOWED"
    else:
        assert deny[0].reason == "DENIED_BY_POLICY"
        assert deny[0].policy == f"back/p{len(specs) - 1}" and deny[0].rule == 0
    # the source side saw the 401
    assert any(f.event is FlowEvent.DENY and f.reason == "DENIED_BY_DESTINATION" for f in mesh.flows("node1"))
    assert mesh.apps["b"].peers == []


async def test_policy_update_closes_a_now_denied_open_connection(mesh: Mesh) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await exchange(r, w, b"one", 5) == b"b:one"
    r2, w2 = await mesh.connect("c", (b.ip, APP_PORT))  # another source: stays allowed
    assert await exchange(r2, w2, b"two", 5) == b"b:two"
    mesh.set_policies(
        policy(
            "no-a",
            "back",
            {"action": "DENY", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]},
        )
    )
    assert await asyncio.wait_for(r.read(100), 5) == b""
    assert await exchange(r2, w2, b"three", 5) == b"three"
    deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
    assert len(deny) == 1 and deny[0].policy == "back/no-a" and deny[0].src_identity == str(a.identity)
    await assert_eventually(lambda: mesh.proxies["node2"].stats()["policy_closed"] == 1)
    w.close()
    w2.close()


DENY_A = {"action": "DENY", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]}


def hold_dials(mesh: Mesh, node: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make `node`'s dials wait for `go` once they have their socket, after setting `started`: an
    app slow to accept."""
    core = mesh.proxies[node].core
    real: Callable[..., Awaitable[socket.socket]] = core.new_socket
    started, go = asyncio.Event(), asyncio.Event()

    async def slow_dial(*args: Any, **kwargs: Any) -> socket.socket:
        sock = await real(*args, **kwargs)
        started.set()
        await go.wait()
        return sock

    core.new_socket = slow_dial  # type: ignore[method-assign]
    return started, go


async def test_a_policy_pushed_while_the_app_is_dialled_applies_to_that_connection(mesh: Mesh) -> None:
    """Authorized, then a DENY arrives while the proxy still dials the app (not open yet, so the
    push's re-check cannot see it): the connection must not open on the old decision."""
    b = mesh.pods["b"]
    started, go = hold_dials(mesh, "node2")
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    await asyncio.wait_for(started.wait(), 5)
    mesh.set_policies(policy("no-a", "back", DENY_A))
    go.set()
    assert await refused(r, w)
    deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
    assert [(f.policy, f.reason) for f in deny] == [("back/no-a", "DENIED_BY_POLICY")]
    assert not [f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN]
    assert not mesh.proxies["node2"].tracker.open
    w.close()


async def test_two_quick_pushes_report_a_closed_connection_once(mesh: Mesh) -> None:
    """A connection killed by one push is closing, not closed, when the next push re-checks: one
    `deny` record, one `policy_closed`."""
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await exchange(r, w, b"one", 5) == b"b:one"
    mesh.set_policies(policy("no-a", "back", DENY_A))
    mesh.set_policies(policy("no-a", "back", DENY_A), policy("other", "front", DENY_A))
    assert await asyncio.wait_for(r.read(100), 5) == b""
    await assert_eventually(lambda: not mesh.proxies["node2"].tracker.open)
    deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
    assert len(deny) == 1, [(f.connection_id, f.reason) for f in deny]
    assert mesh.proxies["node2"].stats()["policy_closed"] == 1
    w.close()


async def test_a_pod_stopped_while_its_app_is_dialled_gets_no_connection(mesh: Mesh) -> None:
    """stop(uid) closes the pod's open connections; one still dialling must not open afterwards
    (nothing would close it with the pod)."""
    b = mesh.pods["b"]
    proxy = mesh.proxies["node2"]
    started, go = hold_dials(mesh, "node2")
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    await asyncio.wait_for(started.wait(), 5)
    await proxy.stop("b")
    go.set()
    assert await refused(r, w)
    assert not [t for t in proxy.tracker.open.values() if "b" in t.pod_uids]
    deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
    assert [f.reason for f in deny] == ["DESTINATION_POD_STOPPED"]
    w.close()


async def test_connections_being_set_up_when_the_proxy_stops_are_recorded_as_its_shutdown(
    mesh: Mesh,
) -> None:
    """stop() cancels what is still authorizing or dialling: recorded PROXY_SHUTDOWN (not as if the
    client had given up, nor as whatever the teardown would have made the dial fail with) by the
    time stop() returns, counted closed with `-`; the HBONE client gets its 503."""
    b = mesh.pods["b"]
    proxy = mesh.proxies["node2"]
    started, go = hold_dials(mesh, "node2")
    try:
        r, w = await mesh.connect("a", (b.ip, APP_PORT))  # HBONE to node2
        await asyncio.wait_for(started.wait(), 5)
        started.clear()
        r2, w2 = await plaintext_to(mesh, "b")  # 15006
        await asyncio.wait_for(started.wait(), 5)
        await proxy.stop()
        deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
        assert sorted((f.reason, f.src_identity) for f in deny) == [
            ("PROXY_SHUTDOWN", ""),
            ("PROXY_SHUTDOWN", str(mesh.pods["a"].identity)),
        ]
        assert not [f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN]
        assert by_flag(mesh, "node2", "istio_tcp_connections_closed_total", reporter="destination") == {
            "-": 2.0
        }
        assert proxy.tracker.in_use == 0
        assert await refused(r, w) and await refused(r2, w2)
        await assert_eventually(
            lambda: [f.reason for f in mesh.flows("node1") if f.event is FlowEvent.DENY] == ["HBONE_503"]
        )
        w.close()
        w2.close()
    finally:
        go.set()


async def test_outbound_being_set_up_when_the_proxy_stops_is_recorded_and_its_peer_sees_it_abandoned(
    mesh: Mesh,
) -> None:
    """node1 stops while its CONNECT waits for node2's answer: node1 records PROXY_SHUTDOWN; node2,
    whose client went away, still records ABANDONED_BEFORE_ESTABLISHED."""
    b = mesh.pods["b"]
    started, go = hold_dials(mesh, "node2")
    try:
        r, w = await mesh.connect("a", (b.ip, APP_PORT))
        await asyncio.wait_for(started.wait(), 5)
        await mesh.proxies["node1"].stop()
        deny = [f for f in mesh.flows("node1") if f.event is FlowEvent.DENY]
        assert [(f.reason, f.dst_ip) for f in deny] == [("PROXY_SHUTDOWN", b.ip)]
        assert by_flag(mesh, "node1", "istio_tcp_connections_closed_total", reporter="source") == {"-": 1.0}
        assert await refused(r, w)
        await assert_eventually(lambda: any(f.event is FlowEvent.DENY for f in mesh.flows("node2")))
        assert [f.reason for f in mesh.flows("node2")] == ["ABANDONED_BEFORE_ESTABLISHED"]
        w.close()
    finally:
        go.set()


async def test_a_stopping_proxy_sends_goaway_on_its_inbound_hbone_connections(mesh: Mesh) -> None:
    """node2's agent stops: its HBONE connection from node1's pool ends with GOAWAY at once, so
    node1 stops using it (its next stream dials anew) instead of sending CONNECTs nobody answers
    until the answer timeout (before: the connection stayed open until node2's process exited)."""
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await exchange(r, w, b"ping", 6) == b"b:ping"
    w.close()
    pool = mesh.proxies["node1"].outbound.pools["a"]
    clients = [e.client for slot in pool._slots.values() for e in slot.entries]
    assert len(clients) == 1 and clients[0].usable
    stopped = time.monotonic()
    await mesh.proxies["node2"].stop()
    async with asyncio.timeout(2):  # the answer timeout is 10 s
        await asyncio.shield(clients[0].closed)
    assert clients[0]._proto.goaway and time.monotonic() - stopped < 2.0
    assert not any(e.client.usable for slot in pool._slots.values() for e in slot.entries)


async def test_same_node_connection_being_set_up_when_the_proxy_stops_is_recorded_once(mesh: Mesh) -> None:
    started, go = hold_dials(mesh, "node1")
    try:
        r, w = await mesh.connect("a", (mesh.pods["c"].ip, APP_PORT))
        await asyncio.wait_for(started.wait(), 5)
        await mesh.proxies["node1"].stop()
        assert [(f.event, f.reason) for f in mesh.flows("node1")] == [(FlowEvent.DENY, "PROXY_SHUTDOWN")]
        assert by_flag(mesh, "node1", "istio_tcp_connections_closed_total") == {"-": 2.0}  # both sides
        assert await refused(r, w)
        w.close()
    finally:
        go.set()


# --- plaintext inbound (15006) ------------------------------------------------------------------


async def plaintext_to(mesh: Mesh, pod: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ep = mesh.pods[pod].ep
    assert ep is not None and ep.inbound is not None
    return await asyncio.open_connection(*ep.inbound.getsockname())


async def test_permissive_admits_plaintext_without_identity(mesh: Mesh) -> None:
    r, w = await plaintext_to(mesh, "b")
    assert await exchange(r, w, b"plain", 7) == b"b:plain"
    w.close()
    await assert_eventually(lambda: mesh.sample("node2", "istio_tcp_connections_closed_total") == 1)
    f = next(f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN)
    assert f.src_identity == "" and f.dst_port == APP_PORT
    assert (
        mesh.sample(
            "node2",
            "istio_tcp_connections_opened_total",
            connection_security_policy="none",
            source_principal="unknown",
            reporter="destination",
        )
        == 1
    )


async def test_strict_refuses_plaintext(mesh: Mesh) -> None:
    mesh.set_policies(peer_authentication("strict", "back", "STRICT"))
    r, w = await plaintext_to(mesh, "b")
    assert await refused(r, w)
    f = next(f for f in mesh.flows("node2") if f.event is FlowEvent.DENY)
    assert f.reason == "STRICT_MTLS_PLAINTEXT"
    # mTLS still works under STRICT
    r2, w2 = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
    assert await exchange(r2, w2, b"m", 3) == b"b:m"
    w2.close()


async def test_strict_pushed_closes_open_plaintext_connections(mesh: Mesh) -> None:
    """Istio applies STRICT as an authorization rule (istiod hands it to ztunnel as one), so a push
    re-checks open plaintext connections against it as against AuthorizationPolicies."""
    r, w = await plaintext_to(mesh, "b")
    assert await exchange(r, w, b"plain", 7) == b"b:plain"
    r2, w2 = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))  # mTLS: stays
    assert await exchange(r2, w2, b"m", 3) == b"b:m"
    mesh.set_policies(peer_authentication("strict", "back", "STRICT"))
    assert await asyncio.wait_for(r.read(100), 5) == b""
    assert await exchange(r2, w2, b"n", 1) == b"n"
    deny = [f for f in mesh.flows("node2") if f.event is FlowEvent.DENY]
    assert [(f.reason, f.src_identity) for f in deny] == [("STRICT_MTLS_PLAINTEXT", "")]
    assert mesh.proxies["node2"].stats()["policy_closed"] == 1
    w.close()
    w2.close()


async def test_strict_pushed_while_a_plaintext_connection_dials_refuses_it(mesh: Mesh) -> None:
    started, go = hold_dials(mesh, "node2")
    r, w = await plaintext_to(mesh, "b")
    await asyncio.wait_for(started.wait(), 5)
    mesh.set_policies(peer_authentication("strict", "back", "STRICT"))
    go.set()
    assert await refused(r, w)
    assert [f.reason for f in mesh.flows("node2") if f.event is FlowEvent.DENY] == ["STRICT_MTLS_PLAINTEXT"]
    w.close()


async def test_permissive_plaintext_cannot_match_an_allow_on_principals(mesh: Mesh) -> None:
    mesh.set_policies(
        peer_authentication("permissive", "back", "PERMISSIVE"),
        policy(
            "only-a",
            "back",
            {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]},
        ),
    )
    r, w = await plaintext_to(mesh, "b")
    assert await refused(r, w)
    f = next(f for f in mesh.flows("node2") if f.event is FlowEvent.DENY)
    assert f.reason == "NOT_ALLOWED"


# --- refused connections in the metrics, plaintext sources ---------------------------------------
# As ztunnel (inbound.rs, inbound_passthrough.rs, outbound.rs): opened with response_flags="-" once
# both ends are known, closed with DENY (authorization, STRICT), CONNECT (HBONE inbound, the app
# could not be connected to) or "-" (the source side, the plaintext inbound's failed dial).

OPENED, CLOSED = "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"


def by_flag(mesh: Mesh, node: str, name: str, **labels: str) -> dict[str, float]:
    """{response_flags: value} of `name`'s series with these labels (zeros left out)."""
    out: dict[str, float] = {}
    for metric in mesh.proxies[node].metrics.registry.collect():
        for s in metric.samples:
            if s.name == name and s.value and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels["response_flags"]] = out.get(s.labels["response_flags"], 0.0) + s.value
    return out


async def test_hbone_denied_by_policy_is_counted_closed_with_deny_at_the_destination(mesh: Mesh) -> None:
    a, b = mesh.pods["a"], mesh.pods["b"]
    mesh.set_policies(policy("no-a", "back", DENY_A))
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await refused(r, w)
    w.close()
    dst = {"reporter": "destination", "source_principal": str(a.identity), "destination_workload": "b"}
    await assert_eventually(lambda: by_flag(mesh, "node2", CLOSED, **dst) == {"DENY": 1.0})
    assert by_flag(mesh, "node2", OPENED, **dst) == {"-": 1.0}
    # the source side records the 401 it got without a flag, as ztunnel's outbound
    src = {"reporter": "source", "destination_workload": "b", "connection_security_policy": "mutual_tls"}
    await assert_eventually(lambda: by_flag(mesh, "node1", CLOSED, **src) == {"-": 1.0})
    assert by_flag(mesh, "node1", OPENED, **src) == {"-": 1.0}
    # one deny record on each node, no open or close records
    assert [f.event for f in mesh.flows("node2")] == [FlowEvent.DENY]
    assert [f.event for f in mesh.flows("node1")] == [FlowEvent.DENY]


async def test_strict_plaintext_is_counted_closed_with_deny(mesh: Mesh) -> None:
    mesh.set_policies(peer_authentication("strict", "back", "STRICT"))
    r, w = await plaintext_to(mesh, "b")
    assert await refused(r, w)
    w.close()
    labels = {"reporter": "destination", "connection_security_policy": "none", "destination_workload": "b"}
    await assert_eventually(lambda: by_flag(mesh, "node2", CLOSED, **labels) == {"DENY": 1.0})
    assert by_flag(mesh, "node2", OPENED, **labels) == {"-": 1.0}


async def test_hbone_to_a_closed_app_port_is_counted_closed_with_connect(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT + 1))  # nothing listens there
    assert await refused(r, w)
    w.close()
    dst = {"reporter": "destination", "destination_workload": "b"}
    await assert_eventually(lambda: by_flag(mesh, "node2", CLOSED, **dst) == {"CONNECT": 1.0})
    assert by_flag(mesh, "node2", OPENED, **dst) == {"-": 1.0}
    await assert_eventually(lambda: by_flag(mesh, "node1", CLOSED, reporter="source") == {"-": 1.0})
    assert any(f.reason == "UPSTREAM_CONNECT_FAILED" for f in mesh.flows("node2"))


async def test_plaintext_to_a_closed_app_port_is_counted_closed_without_a_flag(mesh: Mesh) -> None:
    server = mesh.apps["b"].server
    assert server is not None
    server.close()  # b's app stops listening
    await server.wait_closed()
    r, w = await plaintext_to(mesh, "b")
    assert await refused(r, w)
    w.close()
    await assert_eventually(lambda: by_flag(mesh, "node2", CLOSED, reporter="destination") == {"-": 1.0})
    assert by_flag(mesh, "node2", OPENED, reporter="destination") == {"-": 1.0}
    assert [f.reason for f in mesh.flows("node2")] == ["UPSTREAM_CONNECT_FAILED"]


async def test_passthrough_to_a_closed_port_is_counted_at_the_source(mesh: Mesh) -> None:
    r, w = await mesh.connect("a", (mesh.net + "201", APP_PORT))  # outside the mesh, nothing listens
    assert await refused(r, w)
    w.close()
    src = {"reporter": "source", "destination_workload": "unknown", "connection_security_policy": "unknown"}
    await assert_eventually(lambda: by_flag(mesh, "node1", CLOSED, **src) == {"-": 1.0})
    assert by_flag(mesh, "node1", OPENED, **src) == {"-": 1.0}


async def plaintext_from(
    mesh: Mesh, src_ip: str, pod: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plaintext connection to `pod`'s 15006 from `src_ip`."""
    ep = mesh.pods[pod].ep
    assert ep is not None and ep.inbound is not None
    s = socket.socket()
    s.bind((src_ip, 0))
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ep.inbound.getsockname())
    return await asyncio.open_connection(sock=s)


def legacy_workload(mesh: Mesh) -> Workload:
    """A pod outside the mesh (not captured) at `<net>.50`, in the registry."""
    return Workload(
        uid="legacy",
        name="legacy",
        namespace="old",
        service_account="legacy",
        node="node3",
        ips=(mesh.net + "50",),
        labels=(("app", "legacy"),),
        protocol=TunnelProtocol.NONE,
    )


async def test_plaintext_source_is_labelled_with_the_workload_of_its_ip(mesh: Mesh) -> None:
    legacy = legacy_workload(mesh)
    mesh.extra_workloads = [legacy]
    mesh.push()
    r, w = await plaintext_from(mesh, legacy.ips[0], "b")
    assert await exchange(r, w, b"old", 5) == b"b:old"
    w.close()
    await assert_eventually(lambda: mesh.sample("node2", CLOSED) == 1)
    labels = {"reporter": "destination", "source_workload": "legacy", "source_workload_namespace": "old"}
    assert mesh.sample("node2", OPENED, **labels, source_principal="unknown", source_app="legacy") == 1
    assert mesh.sample("node2", OPENED, **labels, connection_security_policy="none") == 1
    opened = next(f for f in mesh.flows("node2") if f.event is FlowEvent.OPEN)
    assert (opened.src_ip, opened.src_pod, opened.src_namespace) == (legacy.ips[0], "legacy", "old")
    assert opened.src_identity == ""


async def test_plaintext_source_ip_is_no_identity_to_authorization(mesh: Mesh) -> None:
    """The workload a plaintext source IP names labels the telemetry only: an ALLOW on its namespace
    still cannot match (a plaintext source address can be spoofed)."""
    legacy = legacy_workload(mesh)
    mesh.extra_workloads = [legacy]
    mesh.set_policies(
        policy(
            "only-old",
            "back",
            {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["old"]}}]}]},
        )
    )
    r, w = await plaintext_from(mesh, legacy.ips[0], "b")
    assert await refused(r, w)
    w.close()
    (deny,) = mesh.flows("node2")
    assert (deny.reason, deny.src_pod, deny.src_identity) == ("NOT_ALLOWED", "legacy", "")
    await assert_eventually(
        lambda: (
            by_flag(mesh, "node2", CLOSED, source_workload="legacy", source_principal="unknown")
            == {"DENY": 1.0}
        )
    )
    assert mesh.apps["b"].peers == []


# --- same node, services, passthrough, failures -----------------------------------------------------


async def test_same_node_goes_in_process_under_the_same_authorization(mesh: Mesh) -> None:
    c = mesh.pods["c"]
    r, w = await mesh.connect("a", (c.ip, APP_PORT))
    assert await exchange(r, w, b"near", 6) == b"c:near"
    w.close()
    await assert_eventually(lambda: any(f.event is FlowEvent.CLOSE for f in mesh.flows("node1")))
    f = next(f for f in mesh.flows("node1") if f.event is FlowEvent.OPEN)
    assert f.src_identity == str(mesh.pods["a"].identity) and f.dst_pod == "c"
    assert mesh.proxies["node1"].inbound.hbone_stats["connections"] == 0  # no TLS on the way
    for reporter in ("source", "destination"):
        assert mesh.sample("node1", "istio_tcp_received_bytes_total", reporter=reporter) == 4
    mesh.set_policies(
        policy(
            "no-a",
            "front",
            {"action": "DENY", "rules": [{"from": [{"source": {"principals": [_A_PRINCIPAL]}}]}]},
        )
    )
    r, w = await mesh.connect("a", (c.ip, APP_PORT))
    assert await refused(r, w)
    assert any(f.event is FlowEvent.DENY and f.policy == "front/no-a" for f in mesh.flows("node1"))


async def test_service_vip_round_robins_over_endpoints_with_target_port(mesh: Mesh) -> None:
    b, c = mesh.pods["b"], mesh.pods["c"]
    mesh.services = [
        Service(
            "echo",
            "back",
            "10.96.0.10",
            (ServicePort(80, APP_PORT),),
            (Endpoint("b", b.ip), Endpoint("c", c.ip)),
        )
    ]
    mesh.push()
    answers = []
    for _ in range(4):
        r, w = await mesh.connect("a", ("10.96.0.10", 80))
        answers.append(await exchange(r, w, b"x", 3))
        w.close()
    assert sorted(answers) == [b"b:x", b"b:x", b"c:x", b"c:x"]
    await assert_eventually(
        lambda: (
            mesh.sample(
                "node1",
                "istio_tcp_connections_closed_total",
                reporter="source",
                destination_service="echo.back.svc.cluster.local",
            )
            == 4
        )
    )
    assert all(f.dst_service == "echo.back.svc.cluster.local" for f in mesh.flows("node1"))


# The destination side's `destination_service` (and flow records' `dst_service`) of connections that
# do not carry the Service (HBONE, 15006): the destination workload's Service whose targetPort is the
# connection's port, as ztunnel's `guess_inbound_service`. Istio's dashboards select TCP traffic
# with reporter="destination" and destination_service.
ECHO_VIP = "10.96.0.77"
ECHO_HOST = "echo.back.svc.cluster.local"


def echo_service(mesh: Mesh, *pods: str) -> None:
    mesh.services = [
        Service(
            "echo",
            "back",
            ECHO_VIP,
            (ServicePort(80, APP_PORT),),
            tuple(Endpoint(p, mesh.pods[p].ip) for p in pods),
        )
    ]
    mesh.push()


async def test_destination_series_of_a_cross_node_vip_connection_names_the_service(mesh: Mesh) -> None:
    echo_service(mesh, "b")  # b runs on node2: HBONE from node1
    r, w = await mesh.connect("a", (ECHO_VIP, 80))
    assert await exchange(r, w, b"x", 3) == b"b:x"
    w.close()
    await assert_eventually(
        lambda: mesh.sample("node2", "istio_tcp_connections_closed_total", reporter="destination") == 1
    )
    src = {"reporter": "source", "destination_service": ECHO_HOST}
    dst = {"reporter": "destination", "destination_service": ECHO_HOST, "destination_service_name": "echo"}
    assert mesh.sample("node1", "istio_tcp_connections_opened_total", **src) == 1
    assert mesh.sample("node2", "istio_tcp_connections_opened_total", **dst) == 1
    assert mesh.sample("node2", "istio_tcp_received_bytes_total", **dst) == 1


async def test_same_node_and_cross_node_destination_series_name_the_same_service(mesh: Mesh) -> None:
    """The same client, the same Service: only the endpoint's node differs."""
    echo_service(mesh, "c")  # c runs on node1: same node
    r, w = await mesh.connect("a", (ECHO_VIP, 80))
    assert await exchange(r, w, b"x", 3) == b"c:x"
    w.close()
    echo_service(mesh, "b")
    r, w = await mesh.connect("a", (ECHO_VIP, 80))
    assert await exchange(r, w, b"y", 3) == b"b:y"
    w.close()
    await assert_eventually(
        lambda: (
            mesh.sample("node1", "istio_tcp_connections_closed_total", reporter="destination")
            + mesh.sample("node2", "istio_tcp_connections_closed_total", reporter="destination")
            == 2
        )
    )
    dst = {"reporter": "destination", "destination_service": ECHO_HOST}
    same = mesh.sample("node1", "istio_tcp_connections_opened_total", **dst)
    cross = mesh.sample("node2", "istio_tcp_connections_opened_total", **dst)
    assert (same, cross) == (1, 1)


async def test_plaintext_connection_to_a_service_endpoint_is_reported_under_the_service(mesh: Mesh) -> None:
    echo_service(mesh, "b")
    r, w = await plaintext_to(mesh, "b")
    assert await exchange(r, w, b"p", 3) == b"b:p"
    w.close()
    await assert_eventually(lambda: mesh.sample("node2", "istio_tcp_connections_closed_total") == 1)
    dst = {"reporter": "destination", "destination_service": ECHO_HOST}
    assert mesh.sample("node2", "istio_tcp_connections_opened_total", **dst) == 1
    assert [f.dst_service for f in mesh.flows("node2")] == [ECHO_HOST, ECHO_HOST]


async def test_destination_flow_records_of_a_cross_node_vip_connection_name_the_service(mesh: Mesh) -> None:
    echo_service(mesh, "b")
    r, w = await mesh.connect("a", (ECHO_VIP, 80))
    assert await exchange(r, w, b"x", 3) == b"b:x"
    w.close()
    await assert_eventually(lambda: any(f.event is FlowEvent.CLOSE for f in mesh.flows("node2")))
    assert [f.dst_service for f in mesh.flows("node1")] == [ECHO_HOST, ECHO_HOST]
    assert [f.dst_service for f in mesh.flows("node2")] == [ECHO_HOST, ECHO_HOST]


async def test_destination_port_no_service_targets_is_reported_without_a_service(mesh: Mesh) -> None:
    """A connection to a Service's endpoint on a port that no Service targets names no Service."""
    mesh.services = [
        Service("echo", "back", ECHO_VIP, (ServicePort(80, 9999),), (Endpoint("b", mesh.pods["b"].ip),))
    ]
    mesh.push()
    r, w = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
    assert await exchange(r, w, b"x", 3) == b"b:x"
    w.close()
    await assert_eventually(
        lambda: mesh.sample("node2", "istio_tcp_connections_closed_total", reporter="destination") == 1
    )
    dst = {"reporter": "destination", "destination_service": "unknown"}
    assert mesh.sample("node2", "istio_tcp_connections_opened_total", **dst) == 1
    assert {f.dst_service for f in mesh.flows("node2")} == {""}


async def test_destination_outside_the_mesh_is_passed_through(mesh: Mesh) -> None:
    outside = App((mesh.net + "200", APP_PORT), prefix=b"out:")
    await outside.start()
    try:
        r, w = await mesh.connect("a", outside.addr)
        assert await exchange(r, w, b"z", 5) == b"out:z"
        w.close()
        await assert_eventually(lambda: any(f.event is FlowEvent.CLOSE for f in mesh.flows("node1")))
        assert (
            mesh.sample(
                "node1",
                "istio_tcp_connections_opened_total",
                connection_security_policy="unknown",  # reported by the source (Istio: not `none`)
                destination_workload="unknown",
            )
            == 1
        )
    finally:
        assert outside.server is not None
        outside.server.close()


async def test_no_original_destination_fails_closed(mesh: Mesh) -> None:
    a = mesh.pods["a"]
    assert a.ep is not None and a.ep.outbound is not None
    r, w = await asyncio.open_connection(*a.ep.outbound.getsockname())  # nothing registered
    assert await refused(r, w)
    f = next(f for f in mesh.flows("node1") if f.event is FlowEvent.DENY)
    assert f.reason == "NO_ORIGINAL_DESTINATION"


async def test_vanished_destination_netns_gives_503_and_no_crash(mesh: Mesh) -> None:
    b = mesh.pods["b"]
    assert b.ep is not None
    b.ep.pod = PodRef(uid=b.ep.pod.uid, netns_path="/run/netns/nmpx-vanished", ip=b.ip)
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await refused(r, w)
    assert any(f.reason == "POD_NETNS_UNAVAILABLE" for f in mesh.flows("node2"))
    assert any(f.reason == "HBONE_503" for f in mesh.flows("node1"))
    # the proxy keeps serving others
    r, w = await mesh.connect("a", (mesh.pods["c"].ip, APP_PORT))
    assert await exchange(r, w, b"ok", 4) == b"c:ok"
    w.close()


async def test_no_socket_is_made_in_the_netns_of_a_pod_no_longer_served(mesh: Mesh) -> None:
    """A connection that outlived its pod's removal (it waited for a certificate, say) gets no
    socket there: a new stock would be dropped by nothing and keep the netns alive."""
    proxy = mesh.proxies["node1"]
    for name in ("a", "c"):  # node1's pods (all test pods share this process's netns path)
        await proxy.stop(name)
    with pytest.raises(ProxyError, match=r"^POD_NETNS_UNAVAILABLE: .*no longer served"):
        await proxy.core.new_socket(OWN_NETNS)
    assert proxy.core.sockets.idle() == 0


async def test_connection_cap_refuses_beyond_the_limit(mesh: Mesh) -> None:
    proxy = mesh.proxies["node1"]
    proxy.tracker.max_connections = proxy.tracker.in_use  # full
    r, w = await mesh.connect("a", (mesh.pods["c"].ip, APP_PORT))
    assert await refused(r, w)
    assert proxy.stats()["overload"] >= 1


async def test_hbone_connections_refused_at_the_cap_are_logged_once(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """15008 at the cap: each authenticated HBONE connection is refused, one log line in all (the
    tracker's, when refusing starts), not one per connection."""
    proxy = mesh.proxies["node2"]
    full = proxy.tracker.max_connections = proxy.tracker.in_use
    caplog.set_level(logging.DEBUG, logger="agent.proxy")
    for _ in range(3):
        r, w = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
        assert await refused(r, w)
    # each connection once: the CONNECT that came with its handshake is not handled (and refused
    # again) on a connection being closed
    assert proxy.stats()["overload"] == 3
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=overload")]
    assert lines == [f"event=overload slots_in_use={full} slots={full}"]


async def test_a_pod_at_its_share_of_the_cap_is_refused_while_another_pod_connects(mesh: Mesh) -> None:
    """Outbound (15001): one pod of the node cannot take every slot of the node's proxy."""
    proxy, a = mesh.proxies["node1"], mesh.pods["a"]
    proxy.tracker.max_per_source = 1
    r, w = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
    assert await exchange(r, w, b"held", 6) == b"b:held"
    assert proxy.tracker.source_slots(a.ip) == 1
    r2, w2 = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
    assert await refused(r2, w2)
    r3, w3 = await mesh.connect("c", (mesh.pods["b"].ip, APP_PORT))
    assert await exchange(r3, w3, b"other", 7) == b"b:other"
    stats = proxy.stats()
    assert stats["source_overload"] == 1 and stats["overload"] == 0
    assert stats["connection_slots_per_source"] == 1
    assert not any(f.src_ip == a.ip and f.event is FlowEvent.DENY for f in mesh.flows("node1"))
    for writer in (w, w2, w3):
        writer.close()
    # every path gave its source's slots back
    await assert_eventually(lambda: proxy.tracker.in_use == 0 and proxy.tracker._by_source == {})


async def test_a_remote_peer_at_its_share_gets_503_on_new_streams_while_another_connects(mesh: Mesh) -> None:
    """15008: the share is the TLS peer's IP (the source pod dials its HBONE connection from it):
    its authenticated connection and each of its streams count."""
    proxy, a = mesh.proxies["node2"], mesh.pods["a"]
    proxy.tracker.max_per_source = 2  # a's pooled HBONE connection and one stream
    r, w = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
    assert await exchange(r, w, b"held", 6) == b"b:held"
    assert proxy.tracker.source_slots(a.ip) == 2
    r2, w2 = await mesh.connect("a", (mesh.pods["b"].ip, APP_PORT))
    assert await refused(r2, w2)
    assert any(f.reason == "HBONE_503" for f in mesh.flows("node1"))
    r3, w3 = await mesh.connect("c", (mesh.pods["b"].ip, APP_PORT))
    assert await exchange(r3, w3, b"other", 7) == b"b:other"
    assert proxy.stats()["source_overload"] == 1 and proxy.stats()["overload"] == 0
    for writer in (w, w2, w3):
        writer.close()
    # the streams gave their slots back; the pooled connections keep theirs
    await assert_eventually(lambda: proxy.tracker.source_slots(a.ip) == 1)
    await mesh.proxies["node1"].stop()
    await assert_eventually(lambda: proxy.tracker.in_use == 0 and proxy.tracker._by_source == {})


async def test_a_plaintext_source_at_its_share_is_refused_while_another_connects(mesh: Mesh) -> None:
    """15006: the share is the peer's IP."""
    proxy = mesh.proxies["node2"]
    proxy.tracker.max_per_source = 1
    noisy, quiet = mesh.net + "61", mesh.net + "62"
    r, w = await plaintext_from(mesh, noisy, "b")
    assert await exchange(r, w, b"held", 6) == b"b:held"
    r2, w2 = await plaintext_from(mesh, noisy, "b")
    assert await refused(r2, w2)
    r3, w3 = await plaintext_from(mesh, quiet, "b")
    assert await exchange(r3, w3, b"other", 7) == b"b:other"
    assert proxy.stats()["source_overload"] == 1
    for writer in (w, w2, w3):
        writer.close()
    await assert_eventually(lambda: proxy.tracker.in_use == 0 and proxy.tracker._by_source == {})


async def idle_sockets(dst: tuple[str, int], src_ip: str, n: int) -> list[socket.socket]:
    """`n` TCP connections from `src_ip` that never start TLS (a peer holding handshake slots)."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((src_ip, 0))
        s.setblocking(False)
        await loop.sock_connect(s, dst)
        socks.append(s)
    return socks


async def closed_by_peer(s: socket.socket, wait: float) -> bool:
    """The server closed `s` within `wait` seconds (EOF or reset) without sending anything."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 100), wait) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_idle_sockets_on_15008_do_not_take_the_pods_connection_slots(mesh: Mesh) -> None:
    """Unauthenticated sockets on 15008 (no TLS started) wait in the handshake budget, not in
    `max_connections`: an outsider's idle sockets cannot lock the node's pods out."""
    proxy, b = mesh.proxies["node2"], mesh.pods["b"]
    idle = await idle_sockets((b.ip, mesh.hbone_port), mesh.net + "201", 10)
    try:
        await assert_eventually(lambda: proxy.handshakes.pending == 10)
        # room for exactly one authenticated HBONE connection and its one stream
        proxy.tracker.max_connections = proxy.tracker.in_use + 2
        r, w = await mesh.connect("a", (b.ip, APP_PORT))
        assert await exchange(r, w, b"ping", 6) == b"b:ping"
        w.close()
        assert proxy.stats()["overload"] == 0
    finally:
        for s in idle:
            s.close()
    await assert_eventually(lambda: proxy.handshakes.pending == 0)  # each gave its slot back


async def test_pending_handshakes_are_capped_per_source_ip(mesh: Mesh) -> None:
    proxy, b = mesh.proxies["node2"], mesh.pods["b"]
    proxy.handshakes.per_ip = 4
    dst = (b.ip, mesh.hbone_port)
    held = await idle_sockets(dst, mesh.net + "201", 4)
    extra = await idle_sockets(dst, mesh.net + "201", 2)
    other = await idle_sockets(dst, mesh.net + "202", 1)
    try:
        assert all([await closed_by_peer(s, 2) for s in extra])  # refused at once
        assert not any([await closed_by_peer(s, 0.2) for s in held + other])  # still waiting for TLS
        assert proxy.stats()["handshake_overload"] == 2
        assert proxy.handshakes.pending == 5
        # a mesh peer from a third address still gets through
        r, w = await mesh.connect("a", (b.ip, APP_PORT))
        assert await exchange(r, w, b"ping", 6) == b"b:ping"
        w.close()
    finally:
        for s in held + extra + other:
            s.close()
    await assert_eventually(lambda: proxy.handshakes.pending == 0)


async def test_throughput_through_both_proxies_is_printed(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    """32 MiB app → proxy → HBONE → proxy → echo app and back (64 MiB proxied per proxy), one process."""
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await exchange(r, w, b"warm", 6) == b"b:warm"
    size = 32 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    async def send() -> None:
        for _ in range(size // len(block)):
            w.write(block)
            await w.drain()

    start = time.perf_counter()
    sender = asyncio.create_task(send())
    got = 0
    while got < size:
        chunk = await asyncio.wait_for(r.read(1 << 20), 10)
        assert chunk
        got += len(chunk)
    await sender
    elapsed = time.perf_counter() - start
    w.close()
    with capsys.disabled():
        print(
            f"\nproxy throughput: {size / elapsed / 2**20:.0f} MiB/s each way "
            f"({elapsed:.2f} s for 32 MiB echoed)"
        )


async def test_connection_setup_latency_is_printed(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    """Sequential connect + 1-byte echo + close through both proxies (pooled HBONE connection)."""
    b = mesh.pods["b"]
    r, w = await mesh.connect("a", (b.ip, APP_PORT))
    assert await exchange(r, w, b"w", 3) == b"b:w"
    w.close()
    samples = []
    for _ in range(100):
        start = time.perf_counter()
        r, w = await mesh.connect("a", (b.ip, APP_PORT))
        assert await exchange(r, w, b"x", 3) == b"b:x"
        samples.append(time.perf_counter() - start)
        w.close()
    samples.sort()
    with capsys.disabled():
        print(
            f"\nproxy connect+echo: p50 {samples[50] * 1e3:.2f} ms, "
            f"p95 {samples[95] * 1e3:.2f} ms (pooled HBONE)"
        )
