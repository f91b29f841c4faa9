"""E2e: `nodemesh agent run` as a real process in a node netns, fed by a real controller server.

The controller (gRPC + TLS, in-memory mesh model) runs on a thread of this process that entered
the node netns, so the agent reaches it on the node's 127.0.0.1 and no address is added to the
host. The agent runs via ``nsenter --net`` (``ip netns exec`` would remount /sys) from the
topology's ``system`` cgroup, never the pods' cgroup. Everything (agents, controller, netns,
cgroups, pins) is removed by the fixture's finalizer, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dpnet import BPFFS_NODEMESH, CLIENT, ECHO_SERVER, DpNet, assert_eventually
from meshlab import parse_flow_lines

from agent.admin.paths import remove_stale
from agent.datapath import bpfsys, source_ip
from agent.datapath.netns import in_netns
from agent.main import uninstall
from api.resources import Endpoint, Resource, Service, ServicePort, TunnelProtocol, Workload, resource_key
from controller.ca import CertificateAuthority
from controller.server.app import ControllerServer
from controller.server.model import ApplyResult

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, cgroups, eBPF"),
]
REPO = Path(__file__).resolve().parents[2]
VIP = ("10.96.0.10", 8000)
TOKEN = "node-token-e2e"


@dataclass
class Mesh:
    """A MeshModel over mutable lists: one node, its workloads and services."""

    node: str
    workloads: list[Workload] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    def trust_domain(self) -> str:
        return "cluster.local"

    def node_for_token(self, token: str) -> str | None:
        return self.node if token == TOKEN else None

    def node_view(self, node: str) -> Mapping[str, Resource]:
        items: list[Resource] = [w for w in self.workloads if w.node == node]
        items += self.services
        return {resource_key(r): r for r in items}

    def identity_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        return any(
            w.node == node and w.namespace == namespace and w.service_account == service_account
            for w in self.workloads
        )

    def resources(self) -> Mapping[str, Resource]:
        return self.node_view(self.node)

    def apply(self, filename: str, yaml_text: str) -> ApplyResult:
        return ApplyResult(errors=("read-only test model",))


class Controller:
    """A ControllerServer on its own loop thread, listening inside the node netns."""

    def __init__(self, mesh: Mesh, node_netns: str, state: Path) -> None:
        self.mesh = mesh
        self.ca = CertificateAuthority.load_or_create(state, "cluster.local")
        self.server = ControllerServer(mesh, self.ca)
        self.loop = asyncio.new_event_loop()
        started: Future[int] = Future()

        def main() -> None:
            # This thread stays in the node netns: the grpc listener is created in it.
            with in_netns(node_netns):
                try:
                    addrs = self.loop.run_until_complete(self.server.start("127.0.0.1:0"))
                    started.set_result(addrs.grpc_port)
                except BaseException as exc:
                    started.set_exception(exc)
                    return
                self.loop.run_forever()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        self.port = started.result(10)

    def changed(self) -> None:
        self.loop.call_soon_threadsafe(self.server.notify_changed)

    def close(self) -> None:
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def in_cgroup(cgroup: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run from ``cgroup``: a shell joins it, then execs. No preexec_fn: forking Python
    code while this process runs grpc threads can crash the child."""
    return ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]


class Agent:
    """One `nodemesh agent run` process; its log is a file the tests read."""

    def __init__(self, env: Env, index: int, extra: tuple[str, ...] = ()) -> None:
        self.log_path = env.tmp / f"agent-{index}.log"
        cmd = [
            "nsenter",
            f"--net=/var/run/netns/{env.net.node_ns}",
            "--",
            sys.executable,
            "-m",
            "nodemesh.cli",
            "agent",
            "run",
            "--node",
            env.net.node,
            "--controller",
            env.controller_addr,
            "--token",
            str(env.token_file),
            "--ca",
            str(env.ca_file),
            "--pod-cgroup",
            str(env.net.pod_cgroup),
            "--state-dir",
            str(env.state_root),
            "--resync-interval",
            "0.5",
            *extra,
        ]
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(
                in_cgroup(env.net.system_cgroup, cmd), stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[re.Match[str]]:
        def check() -> list[re.Match[str]]:
            rc = self.proc.poll()
            assert rc is None or count == 0, f"agent exited rc={rc}:\n{self.log()}"
            found = list(re.finditer(pattern, self.log()))
            assert len(found) >= count, f"{pattern!r} x{count} not in agent log:\n{self.log()}"
            return found

        return assert_eventually(check, timeout=timeout, interval=0.05)

    def stop(self) -> int:
        """SIGTERM and wait: what the lab and systemd do."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Env:
    """DpNet topology + controller + agent processes for one test.

    ``yaml_controller=False``: an in-process ControllerServer over ``Mesh`` (tests edit
    ``mesh``); True: ``nodemesh controller run`` on a YAML directory (tests edit the files).
    """

    def __init__(self, tmp: Path, yaml_controller: bool = False) -> None:
        self.tmp = tmp
        self.agents: list[Agent] = []
        self.net = DpNet()
        self.controller: Controller | None = None
        self.controller_proc: subprocess.Popen[bytes] | None = None
        try:
            self.state_root = tmp / "agent-state"
            self.token_file = tmp / "token"
            self.token_file.write_text(TOKEN + "\n")
            p = self.net.pods
            self.mesh = Mesh(
                self.net.node,
                workloads=[
                    self.workload("client"),
                    self.workload("server"),
                    self.workload("outsider", TunnelProtocol.NONE),
                ],
                services=[
                    Service(
                        "web",
                        "shop",
                        VIP[0],
                        (ServicePort(VIP[1], 8000),),
                        (Endpoint("shop/server", p["server"].ip),),
                    )
                ],
            )
            if yaml_controller:
                self._start_yaml_controller()
            else:
                node_netns = f"/var/run/netns/{self.net.node_ns}"
                self.controller = Controller(self.mesh, node_netns, tmp / "controller")
                self.controller_addr = f"127.0.0.1:{self.controller.port}"
                self.ca_file = tmp / "ca.pem"
                self.ca_file.write_bytes(self.controller.ca.trust_bundle_pem())
        except BaseException:
            self.close()
            raise

    def _start_yaml_controller(self) -> None:
        self.config_dir = self.tmp / "config"
        self.config_dir.mkdir()
        self.write_pods(["client", "server", "outsider"])
        state = self.tmp / "controller"
        self.ca_file = state / "ca.pem"
        self.controller_addr = "127.0.0.1:15012"  # the node netns is ours alone
        self.controller_log = self.tmp / "controller.log"
        cmd = [
            "nsenter",
            f"--net=/var/run/netns/{self.net.node_ns}",
            "--",
            sys.executable,
            "-m",
            "nodemesh.cli",
            "controller",
            "run",
            "--config-dir",
            str(self.config_dir),
            "--state-dir",
            str(state),
            "--listen",
            self.controller_addr,
            "--metrics-listen",
            "127.0.0.1:15014",
        ]
        with self.controller_log.open("w") as out:
            self.controller_proc = subprocess.Popen(
                in_cgroup(self.net.system_cgroup, cmd), stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )

        def serving() -> None:
            assert self.controller_proc is not None and self.controller_proc.poll() is None, (
                self.controller_log.read_text()
            )
            assert "controller.serving" in self.controller_log.read_text()

        assert_eventually(serving, timeout=20)

    def write_pods(self, names: list[str]) -> None:
        """The YAML directory: node token, the named pods, the web Service (selector app=server)."""
        docs = [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "nodemesh.io/node-token",
                "metadata": {"name": "node-token", "namespace": "nodemesh-system"},
                "stringData": {"node": self.net.node, "token": TOKEN},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {
                    "clusterIP": VIP[0],
                    "selector": {"app": "server"},
                    "ports": [{"port": VIP[1], "targetPort": 8000}],
                },
            },
        ]
        for name in names:
            pod = self.net.pods[name]
            labels = {"app": name}
            if name == "outsider":
                labels["nodemesh.io/dataplane-mode"] = "none"
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": "shop",
                        "labels": labels,
                        "annotations": {"nodemesh.io/netns": pod.netns_path},
                    },
                    "spec": {"nodeName": self.net.node, "serviceAccountName": name},
                    "status": {"podIP": pod.ip},
                }
            )
        tmp = self.config_dir / ".mesh.yaml.tmp"
        tmp.write_text("---\n".join(json.dumps(d) + "\n" for d in docs))  # JSON is YAML
        tmp.replace(self.config_dir / "mesh.yaml")

    def workload(self, name: str, protocol: TunnelProtocol = TunnelProtocol.HBONE) -> Workload:
        pod = self.net.pods[name]
        return Workload(
            f"shop/{name}",
            name,
            "shop",
            name,
            self.net.node,
            (pod.ip,),
            protocol=protocol,
            netns=pod.netns_path,
        )

    def start_agent(self, *extra: str) -> Agent:
        agent = Agent(self, len(self.agents), extra)
        self.agents.append(agent)
        return agent

    def set_workloads(self, names: list[str]) -> None:
        assert self.controller is not None
        self.mesh.workloads = [w for w in self.mesh.workloads if w.name in names]
        self.controller.changed()

    def run_in_pod(self, name: str, code: str, *args: str) -> subprocess.Popen[str]:
        """DpNet.run_in_pod without preexec_fn (see ``in_cgroup``); DpNet still reaps it."""
        pod = self.net.pods[name]
        cmd = ["nsenter", f"--net={pod.netns_path}", sys.executable, "-c", code, *args]
        p = subprocess.Popen(
            in_cgroup(pod.cgroup, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.net._procs.append(p)
        return p

    def echo_server(self, name: str, port: int = 8000) -> None:
        proc = self.run_in_pod(name, ECHO_SERVER, str(port))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

    def connect(self, src: str, ip: str, port: int, msg: str) -> dict[str, Any]:
        p = self.run_in_pod(src, CLIENT, ip, str(port), msg)
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0, f"client in {src} failed rc={p.returncode}: {err.strip()}"
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def pins(self) -> Path:
        return BPFFS_NODEMESH / self.net.node

    def source_ip_set_up(self, name: str) -> bool:
        """Whether the pod's netns has the rule, route and sysctl of source-IP preservation."""
        with in_netns(self.net.pods[name].netns_path):
            return source_ip.installed()

    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(Exception):
                a.kill()
        if self.controller is not None:
            self.controller.close()
        if self.controller_proc is not None and self.controller_proc.poll() is None:
            self.controller_proc.kill()
            self.controller_proc.wait(5)
        with contextlib.suppress(Exception):
            uninstall(self.net.node, self.state_root)
        remove_stale(self.net.node)  # the killed agents' /run/nodemesh/<node>/admin.sock
        self.net.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def flow_lines(agent: Agent, **fields: str) -> list[dict[str, str]]:
    """The node proxy's flow records (`msg=flow key=value ...` log lines) matching `fields`."""
    return parse_flow_lines(agent.log(), **fields)


def prog_ids(env: Env) -> set[int]:
    """Kernel ids of the node's pinned nodemesh programs."""
    pinned = (env.pins() / "progs").iterdir()
    return {int(bpfsys.bpftool_json("prog", "show", "pinned", str(p))["id"]) for p in pinned}


def node_bpf_state(env: Env) -> tuple[int, int]:
    """(nodemesh programs pinned for the node, BPF links of those programs), as bpftool sees them."""
    ids = prog_ids(env)
    links = [lk for lk in bpfsys.bpftool_json("link", "show") or [] if lk.get("prog_id") in ids]
    return len(ids), len(links)


def test_enrolled_pod_connection_is_relayed_and_logged_with_original_destination(env: Env) -> None:
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
    env.echo_server("server")
    server, client = env.net.pods["server"], env.net.pods["client"]

    out = env.connect("client", server.ip, 8000, "direct")
    assert '"data": "direct"' in out["reply"]
    assert out["getpeername"] == [server.ip, 8000]  # the app sees what it dialled
    # ... and the server sees who dialled: the client's IP, not its own (source-IP preservation)
    assert json.loads(out["reply"])["peer"][0] == client.ip
    assert env.source_ip_set_up("server") and env.source_ip_set_up("client")
    agent.wait_for(r"msg=flow event=close .*src_pod=shop/client ")
    (rec,) = flow_lines(agent, event="close", src_pod="shop/client")
    assert rec["dst"] == f"{server.ip}:8000"  # the original destination
    assert rec["src"] == f"{client.ip}:{out['local'][1]}"  # the source socket of this very connection
    assert (
        rec["dst_pod"] == "shop/server" and rec["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
    )

    out = env.connect("client", *VIP[:1], VIP[1], "via-vip")
    assert '"data": "via-vip"' in out["reply"]
    agent.wait_for(r"msg=flow event=close .*src_pod=shop/client ", count=2)
    vip_rec = flow_lines(agent, event="close", src_pod="shop/client")[-1]
    assert vip_rec["dst"] == f"{server.ip}:8000"  # the VIP resolved to the server's endpoint
    assert vip_rec.get("dst_service") == "web.shop.svc.cluster.local", vip_rec


def test_non_enrolled_pod_is_untouched(env: Env) -> None:
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_server ")
    agent.wait_for(r"config\.applied")
    env.echo_server("client", 8001)  # an enrolled pod as the target: only its inbound side is captured
    outsider = env.net.pods["outsider"]
    out = env.connect("outsider", env.net.pods["client"].ip, 8001, "plain")
    assert '"data": "plain"' in out["reply"]
    assert out["local"][0] == outsider.ip  # not rewritten to 127.0.0.1:15001
    assert json.loads(out["reply"])["peer"][0] == outsider.ip  # through 15006, from the outsider's IP
    assert not env.source_ip_set_up("outsider")
    # the inbound side's record of it (written within 50 ms), and no outbound one: that would carry
    # the outsider's identity (the inbound side names its pod from its IP, with no identity)
    src = f"{outsider.ip}:{out['local'][1]}"
    agent.wait_for(rf"msg=flow event=close .*src={re.escape(src)} ")
    assert [r for r in flow_lines(agent, src_pod="shop/outsider") if "src_identity" in r] == []
    assert not (env.pins() / "links" / "sk_lookup-shop_outsider").exists()
    assert "shop_outsider" not in agent.log()


def test_removing_a_pod_from_config_unenrolls_it(env: Env) -> None:
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
    env.set_workloads(["server", "outsider"])
    agent.wait_for(r"event=pod_unenrolled pod=shop_client .*source_ip_removed=True")
    assert not (env.pins() / "links" / "sk_lookup-shop_client").exists()
    assert not env.source_ip_set_up("client") and env.source_ip_set_up("server")
    env.echo_server("server")
    out = env.connect("client", env.net.pods["server"].ip, 8000, "after-removal")
    assert '"data": "after-removal"' in out["reply"]
    assert out["local"][0] == env.net.pods["client"].ip  # dialled directly, not via 15001
    assert flow_lines(agent, src_pod="shop/client") == []
    # the server is still enrolled: its inbound side (15006, plaintext) took the connection
    agent.wait_for(rf"msg=flow event=close .*src={re.escape(env.net.pods['client'].ip)}:")


def test_agent_restarts_keep_program_and_link_counts_and_reconcile_the_first_snapshot(env: Env) -> None:
    env.echo_server("server")
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
    first = node_bpf_state(env)
    assert first == (4, 5)  # connect4, getpeername4, sockops (cgroup links) + sk_lookup (one link per pod)
    for round_ in range(2):
        assert agent.stop() == 0
        assert "event=agent_stopped" in agent.log()
        assert node_bpf_state(env) == first  # pins and links outlive the agent
        agent = env.start_agent()
        agent.wait_for(r"event=datapath_loaded node=\S+ mode=reused")
        agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
        assert node_bpf_state(env) == first, f"after restart {round_ + 1}"
        assert "event=stale_sk_lookup_link" not in agent.log()  # the pinned links were re-used
        out = env.connect("client", env.net.pods["server"].ip, 8000, f"restart-{round_}")
        assert f'"data": "restart-{round_}"' in out["reply"]
        agent.wait_for(r"msg=flow event=close .*src_pod=shop/client ")
    # A pod removed while the agent is away is unenrolled by the first snapshot after the restart.
    assert agent.stop() == 0
    env.set_workloads(["server", "outsider"])
    agent = env.start_agent()
    agent.wait_for(r"event=pod_unenrolled pod=shop_client ")
    agent.wait_for(r"event=pod_enrolled pod=shop_server ")
    assert node_bpf_state(env) == (4, 4)
    out = env.connect("client", env.net.pods["server"].ip, 8000, "gone")
    assert out["local"][0] == env.net.pods["client"].ip


def test_a_pod_sandbox_recreated_while_the_agent_was_away_is_captured_again(env: Env) -> None:
    """Same pod, same netns path and IP, a new netns (the sandbox was recreated): the pinned
    sk_lookup link of the old netns must not be re-used, or the new netns has none and inbound
    connections reach the app without the proxy."""
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
    assert agent.stop() == 0
    host = int(env.net.pods["server"].ip.rsplit(".", 1)[1])
    env.net.remove_pod("server")
    server = env.net.add_pod("server", host)
    agent = env.start_agent()
    agent.wait_for(r"event=stale_sk_lookup_link pod=shop_server .*action=replace")
    agent.wait_for(r"event=pod_enrolled pod=shop_server ")
    assert node_bpf_state(env) == (4, 5)  # replaced, not added
    env.echo_server("server")
    outsider = env.net.pods["outsider"]
    out = env.connect("outsider", server.ip, 8000, "recreated")
    assert '"data": "recreated"' in out["reply"]
    # taken by sk_lookup to 15006: the inbound side recorded it
    agent.wait_for(rf"msg=flow event=close .*src={re.escape(outsider.ip)}:{out['local'][1]} ")


def test_without_source_ip_preservation_apps_see_their_own_pod_ip(env: Env) -> None:
    env.echo_server("server")
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_server .*source_ip=preserved")
    assert agent.stop() == 0
    agent = env.start_agent("--no-preserve-source-ip")  # also undoes what the first run set up
    agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) .*source_ip=pod", count=2)
    assert not env.source_ip_set_up("server") and not env.source_ip_set_up("client")
    server = env.net.pods["server"]
    out = env.connect("client", server.ip, 8000, "no-preserve")
    assert '"data": "no-preserve"' in out["reply"]
    assert json.loads(out["reply"])["peer"][0] == server.ip  # the proxy's connection, from the pod IP
    out = env.connect("outsider", server.ip, 8000, "no-preserve-plain")
    assert json.loads(out["reply"])["peer"][0] == server.ip


def test_uninstall_leaves_nothing_pinned_or_attached(env: Env) -> None:
    env.echo_server("server")
    agent = env.start_agent()
    agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
    ids = prog_ids(env)
    assert agent.stop() == 0
    assert env.source_ip_set_up("server")  # outlives the agent, like the pins
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodemesh.cli",
            "uninstall",
            "--node",
            env.net.node,
            "--state-dir",
            str(env.state_root),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert not env.pins().exists()
    assert not (env.state_root / env.net.node).exists()
    assert (bpfsys.bpftool_json("cgroup", "show", str(env.net.pod_cgroup)) or []) == []
    assert not env.source_ip_set_up("server") and not env.source_ip_set_up("client")

    def gone() -> None:
        assert not ids & {p["id"] for p in bpfsys.bpftool_json("prog", "show")}
        assert not [lk for lk in bpfsys.bpftool_json("link", "show") or [] if lk.get("prog_id") in ids]

    assert_eventually(gone)
    out = env.connect("client", env.net.pods["server"].ip, 8000, "uninstalled")  # plain traffic again
    assert f'"peer": ["{env.net.pods["client"].ip}"' in out["reply"]


def test_agent_follows_the_yaml_directory_of_a_real_controller(tmp_path: Path) -> None:
    env = Env(tmp_path, yaml_controller=True)
    try:
        env.echo_server("server")
        agent = env.start_agent()
        agent.wait_for(r"event=pod_enrolled pod=shop_(client|server) ", count=2)
        assert "shop_outsider" not in agent.log()  # nodemesh.io/dataplane-mode: none
        out = env.connect("client", *VIP[:1], VIP[1], "yaml-vip")
        assert '"data": "yaml-vip"' in out["reply"]
        agent.wait_for(r"msg=flow event=close .*src_pod=shop/client ")
        rec = flow_lines(agent, event="close", src_pod="shop/client")[-1]
        assert rec["dst_service"] == "web.shop.svc.cluster.local"  # the VIP it dialled
        assert rec["dst"] == f"{env.net.pods['server'].ip}:8000"
        env.write_pods(["server", "outsider"])  # the client pod is deleted from the directory
        agent.wait_for(r"event=pod_unenrolled pod=shop_client ", timeout=30)
        assert agent.stop() == 0
    finally:
        env.close()
