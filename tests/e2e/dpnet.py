"""Mini topology for the datapath e2e tests: pod netns joined to a node netns by veths.

``DpNet`` creates (unique prefix ``nmdp-<rand>``) a node netns with a bridge, pod netns with a
veth each, a cgroup ``nodemesh-dp-test-<rand>/pods/<pod>`` per pod plus ``.../system``, and
removes every netns, cgroup and bpffs pin in ``close()``, which the fixture calls even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BPFFS_NODEMESH = Path("/sys/fs/bpf/nodemesh")
SUBNET = "10.251.{n}.{h}"
T = TypeVar("T")


def sh(*args: str) -> str:
    """Run a command, raise with its stderr on failure."""
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc={r.returncode} {r.stderr.strip()}")
    return r.stdout


def assert_eventually(check: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll ``check`` until it returns without AssertionError; re-raise the last one on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


@dataclass
class Pod:
    """A pod of the mini topology."""

    name: str
    netns: str  # name under /var/run/netns
    ip: str
    cgroup: Path

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"


class DpNet:
    """Node netns + bridge + pods, cgroups, and the pin directory name for one test."""

    def __init__(self, pods: tuple[str, ...] = ("client", "server", "outsider")) -> None:
        self.prefix = f"nmdp-{secrets.token_hex(3)}"
        self.node = self.prefix
        self.net = 200 + secrets.randbelow(50)
        self.cg_base = CGROUP_ROOT / f"nodemesh-dp-test-{self.prefix}"
        self.pod_cgroup = self.cg_base / "pods"
        self.system_cgroup = self.cg_base / "system"
        self.node_ns = f"{self.prefix}-node"
        self.pods: dict[str, Pod] = {}
        self._procs: list[subprocess.Popen[str]] = []
        self._netns: list[str] = []
        try:
            self._netns.append(self.node_ns)
            sh("ip", "netns", "add", self.node_ns)
            self._ip(self.node_ns, "link", "set", "lo", "up")
            self._ip(self.node_ns, "link", "add", "br0", "type", "bridge")
            self._ip(self.node_ns, "addr", "add", f"{SUBNET.format(n=self.net, h=1)}/24", "dev", "br0")
            self._ip(self.node_ns, "link", "set", "br0", "up")
            self.pod_cgroup.mkdir(parents=True)
            self.system_cgroup.mkdir()
            for i, name in enumerate(pods):
                self.add_pod(name, 10 + i)
        except BaseException:
            self.close()
            raise

    def _ip(self, ns: str, *args: str) -> None:
        sh("ip", "-n", ns, *args)

    def add_pod(self, name: str, host: int) -> Pod:
        """Create pod netns ``name`` with IP 10.251.<net>.<host>/24 and its cgroup leaf."""
        ns = f"{self.prefix}-{name}"
        ip = SUBNET.format(n=self.net, h=host)
        self._netns.append(ns)
        sh("ip", "netns", "add", ns)
        veth = f"v{self.prefix[5:]}{host}"
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "netns", self.node_ns)
        self._ip(self.node_ns, "link", "set", veth, "master", "br0", "up")
        self._ip(ns, "link", "set", "lo", "up")
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", SUBNET.format(n=self.net, h=1))
        cg = self.pod_cgroup / name
        cg.mkdir(exist_ok=True)
        pod = Pod(name, ns, ip, cg)
        self.pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        """Delete a pod's netns and cgroup."""
        pod = self.pods.pop(name)
        with contextlib.suppress(RuntimeError):
            sh("ip", "netns", "del", pod.netns)
        self._netns.remove(pod.netns)
        with contextlib.suppress(OSError):
            pod.cgroup.rmdir()

    def run_in_pod(self, pod: Pod, code: str, *args: str) -> subprocess.Popen[str]:
        """Start ``python -c code`` as a pod process: cgroup joined first, then the netns."""
        cgroup_procs = pod.cgroup / "cgroup.procs"

        def join() -> None:
            cgroup_procs.write_text(str(os.getpid()))

        p = subprocess.Popen(
            ["nsenter", f"--net={pod.netns_path}", sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=join,
        )
        self._procs.append(p)
        return p

    def run_json(self, pod: Pod, code: str, *args: str, timeout: float = 10.0) -> dict[str, object]:
        """Run a pod process to completion and parse its last stdout line as JSON."""
        p = self.run_in_pod(pod, code, *args)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"pod {pod.name} process failed rc={p.returncode}: {err.strip()}")
        result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        return result

    def close(self) -> None:
        """Remove everything this topology created (idempotent, best effort, never raises)."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.communicate(timeout=5)
        for ns in reversed(self._netns):
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", ns)
        self._netns.clear()
        pins = BPFFS_NODEMESH / self.node
        if pins.exists():
            shutil.rmtree(pins, ignore_errors=True)
        for cg in sorted(self.cg_base.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                cg.rmdir()


# Pod programs (run with the pod's cgroup and netns).
ECHO_SERVER = r"""
import json, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    with c:
        data = c.recv(1024)
        c.sendall(json.dumps({"data": data.decode(), "peer": list(peer),
                              "sockname": list(c.getsockname())}).encode())
"""

CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
out = {"getpeername": None, "local": None, "reply": "", "error": ""}
try:
    out["getpeername"] = list(s.getpeername())
    out["local"] = list(s.getsockname())
    s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR)
    buf = b""
    while chunk := s.recv(4096):
        buf += chunk
    out["reply"] = buf.decode()
except OSError as exc:  # the relay may close (fail closed) before any of these
    out["error"] = exc.strerror or repr(exc)
print(json.dumps(out))
"""
