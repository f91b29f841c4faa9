"""`nodemesh lab demo` (what `make demo` runs): the default lab, real requests, what the mesh saw."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from nodemesh.lab.lab import Lab
from nodemesh.lab.topology import load_topology

POLICY = Path(__file__).resolve().parents[2] / "examples" / "lab" / "policies" / "httpbin-allow-client.yaml"


def _curl(lab: Lab, pod: str, url: str) -> tuple[int, dict[str, Any] | str]:
    proc = lab.exec(pod, ["curl", "-sS", "--max-time", "3", "-H", "x-demo: nodemesh", url], timeout=15)
    out = proc.stdout.decode(errors="replace").strip() or proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        return proc.returncode, out
    try:
        return 0, json.loads(out)
    except ValueError:
        return 0, out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodemesh.cli", *args], capture_output=True, text=True, timeout=60
    )


def run_demo(lab: Lab, *, keep: bool, out: TextIO) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    t0 = time.monotonic()
    say("== bringing the lab up (2 nodes, 4 pods, controller, one agent per node)")
    lab.up(load_topology())
    say(f"   up in {time.monotonic() - t0:.1f} s; state in {lab.state_dir}")
    plan = lab.plan()
    v2 = plan.pod("httpbin-v2")
    v1 = plan.pod("httpbin-v1")
    svc = plan.services[0]
    ok = True
    try:
        cases = [
            ("client (node1) -> httpbin-v2 pod IP (node2): HBONE, mutual TLS between the nodes", "client",
             f"http://{v2.ip}:8000/hello", "httpbin-v2"),
            (f"client -> service {svc.name} VIP {svc.vip}", "client", f"http://{svc.vip}:8000/via-vip", None),
            ("outsider (node2, not in the mesh) -> httpbin-v1 (node1): plaintext, admitted (PERMISSIVE)",
             "outsider", f"http://{v1.ip}:8000/outside", "httpbin-v1"),
        ]  # fmt: skip
        for title, src, url, expect in cases:
            say(f"\n== {title}\n   $ nodemesh lab exec {src} -- curl {url}")
            code, body = _curl(lab, src, url)
            if code != 0 or not isinstance(body, dict):
                say(f"   FAILED: {body}")
                ok = False
                continue
            say(f"   answered by pod {body['pod']}: {body['method']} {body['path']}")
            if expect and body["pod"] != expect:
                say(f"   FAILED: expected {expect}")
                ok = False

        say(f"\n== a policy: only the client's identity may call httpbin\n   $ nodemesh apply -f {POLICY}")
        applied = _cli("apply", "-f", str(POLICY))
        say("   " + (applied.stdout.strip() or applied.stderr.strip()))
        ok = ok and applied.returncode == 0
        say(f"   $ nodemesh lab exec outsider -- curl http://{v1.ip}:8000/again")
        deadline = time.monotonic() + 5
        while True:
            code, body = _curl(lab, "outsider", f"http://{v1.ip}:8000/again")
            if code != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if code != 0:
            say(f"   refused, as it should be: {body}")
        else:
            say("   FAILED: the outsider still got through")
            ok = False
        code, body = _curl(lab, "client", f"http://{svc.vip}:8000/still-allowed")
        say(
            "   the client still gets through: "
            + (f"answered by {body['pod']}" if isinstance(body, dict) else str(body))
        )
        ok = ok and code == 0

        for node in plan.nodes:
            say(f"\n== $ nodemesh flows --node {node.name}   (the node proxy's flow log)")
            flows = _cli("flows", "--node", node.name, "--last", "8")
            for line in (flows.stdout or flows.stderr).rstrip().splitlines():
                say(f"   {line}")
        for text in (
            "\n== what you just saw: eBPF (cgroup/connect4, sk_lookup) steered every connection of enrolled",
            "   pods into the node agent's proxy inside the pod; between nodes it went over HBONE (HTTP/2",
            "   CONNECT in mutual TLS 1.3 with SPIFFE certificates from the controller's CA); the",
            "   AuthorizationPolicy then refused the outsider (no identity); the flow log says why.",
        ):
            say(text)
    finally:
        if keep:
            say("\n== the lab stays up: `nodemesh lab status`, `nodemesh lab exec client -- curl ...`, "
                "`nodemesh flows --node node1`, `nodemesh lab down`")  # fmt: skip
        else:
            lab.down()
            say("\n== lab removed (`nodemesh lab demo --keep` leaves it up)")
    say("\nRESULT: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1
