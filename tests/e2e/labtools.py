"""Helpers of the node-CLI lab tests: run `nodemesh <cmd>` against a lab agent, apply and remove
policies, follow `nodemesh flows -f -o json`, read Prometheus text, try connections from a pod.

Every wait here is bounded (a timeout raises AssertionError with what was last seen).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")

CLI = [sys.executable, "-m", "nodemesh.cli"]


def cli_env() -> dict[str, str]:
    """The CLI's environment: wide tables (under pytest children inherit COLUMNS=80)."""
    env = dict(os.environ)
    env["COLUMNS"] = "400"
    return env


def node_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env())


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """`examples/lab/<name>` against the running lab with this checkout's CLI (rc 0 asserted)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "lab" / name
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NODEMESH": " ".join(CLI)})
    assert proc.returncode == 0, proc.stderr
    return proc


def cli_json(node: str, *args: str) -> Any:
    """`nodemesh <args> --node NODE -o json`, parsed (rc 0 asserted)."""
    proc = node_cli(*args, "--node", node, "-o", "json")
    assert proc.returncode == 0, f"nodemesh {' '.join(args)} --node {node}: {proc.returncode} {proc.stderr}"
    return json.loads(proc.stdout)


def flows_json(node: str, *args: str) -> list[dict[str, Any]]:
    """`nodemesh flows ... -o json`: one object per line."""
    proc = node_cli("flows", *args, "--node", node, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wait_for(check: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)
        last = check()
    return last


# --- policies ---------------------------------------------------------------------------------------


def apply_policy(state_dir: Path, filename: str, text: str) -> Path:
    """`nodemesh apply -f <filename>` (stored as <state>/config/<filename>); returns the stored path."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / filename
        src.write_text(text)
        proc = node_cli("apply", "-f", str(src))
    assert proc.returncode == 0, f"apply {filename}: {proc.stderr}"
    stored = state_dir / "config" / filename
    assert stored.exists(), f"{stored} not stored"
    return stored


def remove_policy(state_dir: Path, filename: str) -> None:
    (state_dir / "config" / filename).unlink(missing_ok=True)


def wait_policies(nodes: Iterable[str], names: set[str], timeout: float = 15.0) -> None:
    """Until every node's agent holds exactly the policy objects `names` (`ns/name`), all active."""
    for node in nodes:
        def held(node: str = node) -> bool:
            rows = cli_json(node, "policies")
            return {f"{r['namespace']}/{r['name']}" for r in rows} == names and all(
                r["state"] == "active" for r in rows)

        wait_for(held, timeout, f"node {node} to hold policies {sorted(names)}")


# --- flows --follow -----------------------------------------------------------------------------------


class Follower:
    """`nodemesh flows --follow -o json --node NODE ...` as a subprocess; lines read by a thread and
    stamped with their arrival time (time.time(), the clock the agent stamps records with)."""

    def __init__(self, node: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "flows", "--follow", "-o", "json", "--node", node, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), bufsize=1,
        )
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.stderr: list[str] = []
        self._out = threading.Thread(target=self._read, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put((time.time(), json.loads(line)))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def next(self, timeout: float) -> tuple[float, dict[str, Any]] | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[tuple[float, dict[str, Any]]]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._out.join(timeout=5)
        self._err.join(timeout=5)


# --- Prometheus ---------------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample as {(name, labels): value}."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    want = set(labels.items())
    return [dict(ls) for (n, ls), _ in samples.items() if n == name and want <= ls]


def scrape_15020(node_netns_path: str) -> str:
    """`curl :15020/metrics` from inside the node's netns, as Prometheus on the node would."""
    proc = subprocess.run(
        ["nsenter", f"--net={node_netns_path}", "--", "curl", "-sS", "--max-time", "5",
         "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert proc.returncode == 0, f"curl :15020/metrics: rc={proc.returncode} {proc.stderr}"
    return proc.stdout


# --- connections from a pod ---------------------------------------------------------------------------

# Tries each "ip:port" in argv in order with an HTTP GET; prints one JSON line per target:
# {"target", "ok", "pod" (who answered), "error", "local" (the client's port), "peer" (getpeername),
# "connected_at" (Unix time)}.
TRY = r"""
import json, socket, sys, time
timeout = float(sys.argv[1])
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    out = {"target": target, "ok": False, "pod": None, "error": "", "local": None}
    t0 = time.monotonic()
    try:
        s = socket.create_connection((host, int(port)), timeout=timeout)
        out["connected_at"] = time.time()
        out["local"] = s.getsockname()[1]
        out["peer"] = "%s:%d" % s.getpeername()
        s.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
        s.sendall(b"GET /try HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 200"):
            out["ok"] = True
            out["pod"] = json.loads(data.split(b"\r\n\r\n", 1)[1])["pod"]
        else:
            out["error"] = "no answer" if not data else "bad answer: %r" % data[:60]
    except Exception as exc:
        out["error"] = repr(exc)
    out["elapsed"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out), flush=True)
"""
