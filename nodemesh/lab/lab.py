"""The local lab: nodes and pods as network namespaces + cgroups, a controller, one agent per node.

Layout (names fixed so that a crashed lab can always be found and removed):
- netns `nm-underlay` holds bridge `br0` (10.99.0.254/24, the controller's address); node *i* is
  netns `nm-<node>` whose `eth0` (10.99.0.<i>) is a veth into that bridge, plus a bridge `cni0`
  holding the node's pod gateway (first address of its pod CIDR) and routes to the other nodes'
  pod CIDRs via their underlay IPs;
- pod `ns/name` is netns `nm-pod-<ns>-<name>` whose `eth0` is a veth into its node's `cni0`;
- cgroups under `<cgroup2>/nodemesh-lab/`: `controller`, `<node>/system` (the agent) and
  `<node>/pods/<ns>_<name>` (every process of a pod, joined before it enters the pod netns);
- the state directory (default /run/nodemesh/lab) holds `lab.json`, the rendered controller
  config, tokens, the controller's CA and every process's log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from agent.admin.paths import remove_stale
from agent.datapath.netns import in_netns
from nodemesh.lab import system
from nodemesh.lab.system import LabError
from nodemesh.lab.topology import CONTROLLER_IP, UNDERLAY, Topology

log = logging.getLogger("nodemesh.lab")

DEFAULT_STATE_DIR = Path(os.environ.get("NODEMESH_LAB_STATE", "/run/nodemesh/lab"))
PREFIX = "nm-"
UNDERLAY_NETNS = "nm-underlay"
CGROUP_NAME = "nodemesh-lab"
BPFFS_NODEMESH = Path("/sys/fs/bpf/nodemesh")
CONTROLLER_PORT = 15012
CONTROLLER_METRICS_PORT = 15014
ANNOTATION_NETNS = "nodemesh.io/netns"
LABEL_DATAPLANE_MODE = "nodemesh.io/dataplane-mode"


@dataclass
class NodeInfo:
    name: str
    netns: str
    netns_path: str
    underlay_ip: str
    pod_cidr: str
    gateway: str
    cgroup: str
    pod_cgroup: str


@dataclass
class PodInfo:
    name: str
    namespace: str
    service_account: str
    labels: dict[str, str]
    node: str
    ip: str
    netns: str
    netns_path: str
    cgroup: str
    enrolled: bool
    serve: list[int] = field(default_factory=list)


@dataclass
class ServiceInfo:
    name: str
    namespace: str
    vip: str
    ports: list[dict[str, Any]]
    selector: dict[str, str]


@dataclass
class Plan:
    """Every name and address of a lab, computed from a topology before anything is created."""

    trust_domain: str
    nodes: list[NodeInfo]
    pods: list[PodInfo]
    services: list[ServiceInfo]

    def pod(self, name: str) -> PodInfo:
        """A pod by `name` or `namespace/name`."""
        ns, _, short = name.rpartition("/")
        hits = [p for p in self.pods if p.name == short and (not ns or p.namespace == ns)]
        if len(hits) != 1:
            known = ", ".join(f"{p.namespace}/{p.name}" for p in self.pods)
            raise LabError(f"no single pod {name!r} in the lab (pods: {known})")
        return hits[0]

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(n.name for n in self.nodes)})")


def plan(topology: Topology, cgroup_root: Path) -> Plan:
    base = cgroup_root / CGROUP_NAME
    nodes: list[NodeInfo] = []
    hosts = list(UNDERLAY.hosts())
    for i, spec in enumerate(topology.nodes, start=1):
        cidr = ipaddress.ip_network(spec.pod_cidr or f"10.100.{i}.0/24")
        underlay = spec.underlay_ip or str(hosts[i - 1])
        if ipaddress.ip_address(underlay) not in UNDERLAY or underlay == CONTROLLER_IP:
            raise LabError(
                f"node {spec.name}: underlayIP {underlay} must be in {UNDERLAY}, not {CONTROLLER_IP}"
            )
        netns = PREFIX + spec.name
        nodes.append(
            NodeInfo(
                name=spec.name,
                netns=netns,
                netns_path=system.netns_path(netns),
                underlay_ip=underlay,
                pod_cidr=str(cidr),
                gateway=str(next(cidr.hosts())),
                cgroup=str(base / spec.name),
                pod_cgroup=str(base / spec.name / "pods"),
            )
        )
    by_node = {n.name: n for n in nodes}
    next_host: dict[str, int] = {n.name: 10 for n in nodes}
    pods: list[PodInfo] = []
    used: set[str] = set()
    for pspec in topology.pods:
        node = by_node[pspec.node]
        cidr = ipaddress.ip_network(node.pod_cidr)
        if pspec.ip:
            ip = pspec.ip
            if ipaddress.ip_address(ip) not in cidr:
                raise LabError(f"pod {pspec.name}: ip {ip} is outside node {node.name}'s pod CIDR {cidr}")
        else:
            ip = str(cidr.network_address + next_host[node.name])
            next_host[node.name] += 1
        if ip in used:
            raise LabError(f"pod {pspec.name}: ip {ip} is used twice")
        used.add(ip)
        netns = f"{PREFIX}pod-{pspec.namespace}-{pspec.name}"
        pods.append(
            PodInfo(
                name=pspec.name,
                namespace=pspec.namespace,
                service_account=pspec.service_account,
                labels=dict(pspec.labels),
                node=node.name,
                ip=ip,
                netns=netns,
                netns_path=system.netns_path(netns),
                cgroup=str(Path(node.pod_cgroup) / f"{pspec.namespace}_{pspec.name}"),
                enrolled=pspec.enrolled,
                serve=list(pspec.serve),
            )
        )
    services = [
        ServiceInfo(
            name=s.name,
            namespace=s.namespace,
            vip=s.vip,
            ports=[{"port": p.port, "targetPort": p.target_port or p.port, "name": p.name} for p in s.ports],
            selector=dict(s.selector),
        )
        for s in topology.services
    ]
    return Plan(topology.trust_domain, nodes, pods, services)


def render_objects(p: Plan, tokens: dict[str, str]) -> list[dict[str, Any]]:
    """The controller's config for this lab, as Kubernetes-form objects (v1 Pod, Service, Secret)."""
    objs: list[dict[str, Any]] = []
    for node in p.nodes:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"node-token-{node.name}", "namespace": "nodemesh-system"},
                "type": "nodemesh.io/node-token",
                "stringData": {"node": node.name, "token": tokens[node.name]},
            }
        )
    for pod in p.pods:
        labels = dict(pod.labels)
        if not pod.enrolled:
            labels[LABEL_DATAPLANE_MODE] = "none"
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod.name,
                    "namespace": pod.namespace,
                    "labels": labels,
                    "annotations": {ANNOTATION_NETNS: pod.netns_path},
                },
                "spec": {
                    "nodeName": pod.node,
                    "serviceAccountName": pod.service_account,
                    "containers": [{"name": "main", "image": "lab"}],
                },
                "status": {"podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "phase": "Running"},
            }
        )
    for svc in p.services:
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": svc.name, "namespace": svc.namespace},
                "spec": {
                    "clusterIP": svc.vip,
                    "selector": svc.selector,
                    "ports": [
                        {"port": pt["port"], "targetPort": pt["targetPort"], "protocol": "TCP"}
                        | ({"name": pt["name"]} if pt["name"] else {})
                        for pt in svc.ports
                    ],
                },
            }
        )
    return objs


class Lab:
    """One lab on this host, described by `<state_dir>/lab.json` while it exists."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.state_dir = state_dir
        self.state_file = state_dir / "lab.json"

    # ---- state -------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(
                f"{self.state_file}: unreadable lab state ({exc}); run `nodemesh lab down`"
            ) from exc
        return data

    def plan(self) -> Plan:
        state = self.load_state()
        if state is None:
            raise LabError(f"no lab is up (no {self.state_file}); run `nodemesh lab up`")
        return Plan(
            trust_domain=state["trust_domain"],
            nodes=[NodeInfo(**n) for n in state["nodes"]],
            pods=[PodInfo(**p) for p in state["pods"]],
            services=[ServiceInfo(**s) for s in state["services"]],
        )

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    # ---- up ----------------------------------------------------------------------------------
    def up(
        self, topology: Topology, *, agents: bool = True, timeout: float = 30.0, proxy_workers: int = 1
    ) -> dict[str, Any]:
        """Remove leftovers, then build the lab; on any failure everything built is removed.
        `proxy_workers`: processes per agent that carry traffic (`agent run --proxy-workers`)."""
        self.down(quiet=True)
        cg_root = system.cgroup2_root()
        p = plan(topology, cg_root)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("logs", "config", "tokens", "controller"):
            (self.state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        state: dict[str, Any] = {
            "phase": "creating",
            "trust_domain": p.trust_domain,
            "state_dir": str(self.state_dir),
            "cgroup": str(cg_root / CGROUP_NAME),
            "controller": f"{CONTROLLER_IP}:{CONTROLLER_PORT}",
            "controller_metrics": f"{CONTROLLER_IP}:{CONTROLLER_METRICS_PORT}",
            "controller_netns": system.netns_path(UNDERLAY_NETNS),
            "ca": str(self.state_dir / "controller" / "ca.pem"),
            "admin_token_file": str(self.state_dir / "tokens" / "admin.token"),
            "nodes": [asdict(n) for n in p.nodes],
            "pods": [asdict(x) for x in p.pods],
            "services": [asdict(s) for s in p.services],
            "agents": agents,
            "proxy_workers": proxy_workers,
            "processes": {},
        }
        self._write_state(state)  # written first: a crash from here on is cleaned by `down`
        try:
            self._build_network(p)
            self._build_cgroups(p)
            tokens = self._write_tokens(p)
            self._write_config(p, tokens)
            procs: dict[str, int] = {}
            procs.update(self._start_pods(p))
            procs["controller"] = self._start_controller(state, timeout)
            if agents:
                procs.update(self._start_agents(p, state))
                self._wait_agents(p, procs, timeout, proxy_workers)
            state["processes"] = procs
            state["phase"] = "up"
            self._write_state(state)
        except BaseException:
            with contextlib.suppress(Exception):
                self._keep_logs_for_debugging()
            self.down(quiet=True)
            raise
        return state

    def _build_network(self, p: Plan) -> None:
        system.run("ip", "netns", "add", UNDERLAY_NETNS)
        system.ip_batch(
            [
                "link set lo up",
                "link add br0 type bridge",
                f"addr add {CONTROLLER_IP}/{UNDERLAY.prefixlen} dev br0",
                "link set br0 up",
            ],
            UNDERLAY_NETNS,
        )
        for i, node in enumerate(p.nodes, start=1):
            system.run("ip", "netns", "add", node.netns)
            system.ip_batch(
                [
                    f"link add nmu{i} type veth peer name eth0 netns {node.netns}",
                    f"link set nmu{i} master br0",
                    f"link set nmu{i} up",
                ],
                UNDERLAY_NETNS,
            )
            cidr = ipaddress.ip_network(node.pod_cidr)
            cmds = [
                "link set lo up",
                f"addr add {node.underlay_ip}/{UNDERLAY.prefixlen} dev eth0",
                "link set eth0 up",
                "link add cni0 type bridge",
                f"addr add {node.gateway}/{cidr.prefixlen} dev cni0",
                "link set cni0 up",
            ]
            cmds += [f"route add {o.pod_cidr} via {o.underlay_ip}" for o in p.nodes if o.name != node.name]
            system.ip_batch(cmds, node.netns)
            system.sysctl_in(node.netns, "net.ipv4.ip_forward", "1")
        for j, pod in enumerate(p.pods, start=1):
            node = p.node(pod.node)
            prefix = ipaddress.ip_network(node.pod_cidr).prefixlen
            system.run("ip", "netns", "add", pod.netns)
            system.ip_batch(
                [
                    f"link add nmp{j} type veth peer name eth0 netns {pod.netns}",
                    f"link set nmp{j} master cni0",
                    f"link set nmp{j} up",
                ],
                node.netns,
            )
            system.ip_batch(
                [
                    "link set lo up",
                    f"addr add {pod.ip}/{prefix} dev eth0",
                    "link set eth0 up",
                    f"route add default via {node.gateway}",
                ],
                pod.netns,
            )

    def _build_cgroups(self, p: Plan) -> None:
        for node in p.nodes:
            Path(node.cgroup, "system").mkdir(parents=True, exist_ok=True)
            Path(node.pod_cgroup).mkdir(parents=True, exist_ok=True)
        for pod in p.pods:
            Path(pod.cgroup).mkdir(parents=True, exist_ok=True)
        Path(p.nodes[0].cgroup).parent.joinpath("controller").mkdir(exist_ok=True)

    def _write_tokens(self, p: Plan) -> dict[str, str]:
        tokens = {n.name: secrets.token_hex(24) for n in p.nodes}
        tdir = self.state_dir / "tokens"
        for name, tok in {**tokens, "admin": secrets.token_hex(24)}.items():
            path = tdir / f"{name}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tok + "\n")
        return tokens

    def _write_config(self, p: Plan, tokens: dict[str, str]) -> None:
        path = self.state_dir / "config" / "00-lab.yaml"
        header = "# Rendered by `nodemesh lab up` from the topology; objects in Kubernetes form.\n"
        path.write_text(header + yaml.safe_dump_all(render_objects(p, tokens), sort_keys=False))
        os.chmod(path, 0o600)

    def _python(self) -> list[str]:
        return [sys.executable, "-m", "nodemesh.cli"]

    def _start_pods(self, p: Plan) -> dict[str, int]:
        procs: dict[str, int] = {}
        for pod in p.pods:
            logf = self.state_dir / "logs" / f"pod-{pod.namespace}-{pod.name}.log"
            cg = Path(pod.cgroup)
            pause = system.spawn(["sleep", "infinity"], netns=pod.netns, cgroup=cg, log=logf)
            procs[f"pod/{pod.namespace}/{pod.name}/pause"] = pause.pid
            if pod.serve:
                args = [sys.executable, "-m", "nodemesh.lab.echo", "--name", pod.name]
                for port in pod.serve:
                    args += ["--port", str(port)]
                echo = system.spawn(args, netns=pod.netns, cgroup=cg, log=logf)
                procs[f"pod/{pod.namespace}/{pod.name}/echo"] = echo.pid
        for pod in p.pods:
            for port in pod.serve:
                _wait_port(pod.netns_path, "127.0.0.1", port, 10.0, f"echo server of pod {pod.name}")
        return procs

    def _start_controller(self, state: dict[str, Any], timeout: float) -> int:
        cg = Path(state["cgroup"]) / "controller"
        argv = [
            *self._python(), "controller", "run",
            "--config-dir", str(self.state_dir / "config"),
            "--state-dir", str(self.state_dir / "controller"),
            "--listen", state["controller"],
            "--metrics-listen", state["controller_metrics"],
            "--trust-domain", state["trust_domain"],
            "--admin-token-file", state["admin_token_file"],
        ]  # fmt: skip
        proc = system.spawn(
            argv, netns=UNDERLAY_NETNS, cgroup=cg, log=self.state_dir / "logs" / "controller.log"
        )
        _wait_port(
            system.netns_path(UNDERLAY_NETNS),
            CONTROLLER_IP,
            CONTROLLER_PORT,
            timeout,
            "controller",
            proc=proc,
            log=self.state_dir / "logs" / "controller.log",
        )
        return proc.pid

    def _start_agents(self, p: Plan, state: dict[str, Any]) -> dict[str, int]:
        return {f"agent/{node.name}": self._spawn_agent(node, state) for node in p.nodes}

    def _spawn_agent(self, node: NodeInfo, state: dict[str, Any]) -> int:
        argv = [
            *self._python(), "agent", "run",
            "--node", node.name,
            "--controller", state["controller"],
            "--token", str(self.state_dir / "tokens" / f"{node.name}.token"),
            "--ca", state["ca"],
            "--pod-cgroup", node.pod_cgroup,
            "--state-dir", str(self.state_dir / "agents"),
            "--proxy-workers", str(state.get("proxy_workers", 1)),
        ]  # fmt: skip
        log_file = self.state_dir / "logs" / f"agent-{node.name}.log"
        proc = system.spawn(argv, netns=node.netns, cgroup=Path(node.cgroup) / "system", log=log_file)
        return proc.pid

    def _wait_agents(self, p: Plan, procs: dict[str, int], timeout: float, workers: int = 1) -> None:
        """Ready when every enrolled pod has the outbound listener (15001) of each of the agent's
        `workers` processes in its netns.

        Read from /proc/<pause pid>/net/tcp (the pod netns's socket table) rather than by
        connecting: a probe connection would be a real connection with no original destination.
        """
        deadline = time.monotonic() + timeout
        for pod in p.pods:
            if not pod.enrolled:
                continue
            pid = procs[f"pod/{pod.namespace}/{pod.name}/pause"]
            while _listeners(pid, 15001) < workers:
                if time.monotonic() > deadline:
                    log_file = self.state_dir / "logs" / f"agent-{pod.node}.log"
                    raise LabError(
                        f"agent of {pod.node} opened no listener in pod {pod.name} after {timeout:.0f} s"
                        + _tail(log_file)
                    )
                time.sleep(0.05)

    def proxy_workers(self, node: str) -> dict[int, int]:
        """The running proxy workers of `node`'s agent (`agent run --proxy-workers`): the agent's
        children started with `--worker-index`, as {index: pid}."""
        state = self._require_state()
        pid = state["processes"].get(f"agent/{node}")
        if pid is None:
            return {}
        found: dict[int, int] = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children():
                with contextlib.suppress(psutil.Error):
                    argv = child.cmdline()
                    if "--worker-index" in argv and child.status() != psutil.STATUS_ZOMBIE:
                        found[int(argv[argv.index("--worker-index") + 1])] = child.pid
        return found

    def stop_agent(self, node: str, timeout: float = 10.0) -> None:
        """SIGTERM one node's agent and wait for it to exit (its pins stay, as on a real restart)."""
        state = self._require_state()
        pid = state["processes"].get(f"agent/{node}")
        if pid is None or not _pid_alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                raise LabError(f"agent of {node} (pid {pid}) did not exit within {timeout:.0f} s of SIGTERM")
            time.sleep(0.02)

    def start_agent(self, node: str, timeout: float = 30.0) -> int:
        """(Re)start one node's agent and wait until it serves every enrolled pod of the node."""
        state = self._require_state()
        p = self.plan()
        pid = self._spawn_agent(p.node(node), state)
        state["processes"][f"agent/{node}"] = pid
        self._write_state(state)
        on_node = Plan(p.trust_domain, p.nodes, [x for x in p.pods if x.node == node], p.services)
        self._wait_agents(on_node, state["processes"], timeout, state.get("proxy_workers", 1))
        return pid

    def _require_state(self) -> dict[str, Any]:
        state = self.load_state()
        if state is None:
            raise LabError(f"no lab is up (no {self.state_file}); run `nodemesh lab up`")
        return state

    def _keep_logs_for_debugging(self) -> None:
        logs = self.state_dir / "logs"
        if logs.is_dir():
            dest = Path("/tmp") / f"nodemesh-lab-failed-{int(time.time())}"
            shutil.copytree(logs, dest)
            log.warning("lab up failed; logs kept in %s", dest)

    # ---- down --------------------------------------------------------------------------------
    def down(self, quiet: bool = False) -> list[str]:
        """Remove everything a lab (this one or a crashed one) made. Returns what was removed."""
        removed: list[str] = []
        state = None
        with contextlib.suppress(LabError):
            state = self.load_state()
        nodes = [n["name"] for n in state["nodes"]] if state else []
        cg_base: Path | None
        try:
            cg_base = system.cgroup2_root() / CGROUP_NAME
        except LabError:
            cg_base = None
        if cg_base is not None and cg_base.is_dir():
            nodes += [p.name for p in cg_base.iterdir() if p.is_dir() and (p / "pods").is_dir()]
            system.kill_cgroup_tree(cg_base)
        for node in sorted(set(nodes)):
            pins = BPFFS_NODEMESH / node
            if pins.exists():
                # the product's own uninstall first; plain removal of the pins if that fails
                agents_dir = str(self.state_dir / "agents")
                proc = system.run(
                    *self._python(),
                    "uninstall",
                    "--node",
                    node,
                    "--state-dir",
                    agents_dir,
                    check=False,
                    timeout=60,
                )
                if proc.returncode != 0:
                    log.warning("nodemesh uninstall --node %s failed: %s", node, proc.stderr.strip()[-500:])
                shutil.rmtree(pins, ignore_errors=True)
                removed.append(f"bpffs {pins}")
        for node in sorted(set(nodes)):  # the killed agents' admin sockets (live ones stay)
            if remove_stale(node):
                removed.append(f"admin socket of {node}")
        with contextlib.suppress(OSError):
            if BPFFS_NODEMESH.is_dir() and not any(BPFFS_NODEMESH.iterdir()):
                BPFFS_NODEMESH.rmdir()
        lab_ns = [ns for ns in system.list_netns() if ns.startswith(PREFIX)]
        # pods first, then nodes, then the underlay: deleting a netns deletes the veth ends in it
        order = sorted(
            lab_ns, key=lambda ns: 0 if ns.startswith(PREFIX + "pod-") else 2 if ns == UNDERLAY_NETNS else 1
        )
        for ns in order:
            system.run("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
        if cg_base is not None and cg_base.exists():
            system.remove_cgroup_tree(cg_base)
            removed.append(f"cgroup {cg_base}")
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)
            removed.append(f"state {self.state_dir}")
        if not quiet:
            log.info("lab down removed %d items", len(removed))
        return removed

    # ---- status / exec ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self.load_state()
        if state is None:
            raise LabError(f"no lab is up (no {self.state_file}); run `nodemesh lab up`")
        alive = {}
        for name, pid in state.get("processes", {}).items():
            alive[name] = _pid_alive(pid)
        existing = set(system.list_netns())
        return {
            "phase": state["phase"],
            "stateDir": state["state_dir"],
            "controller": {
                "address": state["controller"],
                "metrics": state["controller_metrics"],
                "netns": state["controller_netns"],
                "ca": state["ca"],
                "running": alive.get("controller", False),
            },
            "nodes": [
                {
                    "name": n["name"],
                    "netns": n["netns_path"],
                    "underlayIP": n["underlay_ip"],
                    "podCIDR": n["pod_cidr"],
                    "agentRunning": alive.get(f"agent/{n['name']}", False),
                    "present": n["netns"] in existing,
                }
                for n in state["nodes"]
            ],
            "pods": [
                {
                    "name": x["name"],
                    "namespace": x["namespace"],
                    "serviceAccount": x["service_account"],
                    "labels": x["labels"],
                    "node": x["node"],
                    "ip": x["ip"],
                    "netns": x["netns_path"],
                    "enrolled": x["enrolled"],
                    "present": x["netns"] in existing,
                }
                for x in state["pods"]
            ],
            "services": [
                {"name": s["name"], "namespace": s["namespace"], "vip": s["vip"], "ports": s["ports"]}
                for s in state["services"]
            ],
        }

    def exec(
        self,
        pod: str,
        argv: list[str],
        *,
        timeout: float | None = None,
        capture: bool = True,
        input_bytes: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command as a process of `pod` (its cgroup, then its netns), to completion."""
        if not argv:
            raise LabError("nothing to run: give a command after `--`")
        info = self.plan().pod(pod)
        return system.run_in(
            argv,
            netns=info.netns,
            cgroup=Path(info.cgroup),
            timeout=timeout,
            capture=capture,
            input_bytes=input_bytes,
        )

    def popen(self, pod: str, argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        info = self.plan().pod(pod)
        return system.spawn(argv, netns=info.netns, cgroup=Path(info.cgroup), log=log)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _wait_port(
    netns_path: str,
    host: str,
    port: int,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with in_netns(netns_path):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        finally:
            s.close()
        if proc is not None and proc.poll() is not None:
            raise LabError(f"{what} exited with code {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} not listening on {host}:{port} after {timeout:.0f} s{_tail(log)}")
        time.sleep(0.05)


def _listening(pid: int, port: int) -> bool:
    """Whether the netns of process `pid` has a TCP listener on `port` (any address)."""
    return _listeners(pid, port) > 0


def _listeners(pid: int, port: int) -> int:
    """TCP listeners on `port` (any address) in the netns of process `pid`."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 0
    want = f":{port:04X}"
    return sum(1 for f in (ln.split() for ln in lines) if f[1].endswith(want) and f[3] == "0A")


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n  " + "\n  ".join(text)
