"""The flow log under a burst of new connections, in the real lab.

Run as root: `.venv/bin/python tests/bench/bench_flows_lab.py [--seconds 5] [--load wrk|python]
[--clients N] [--rate 2000]`; writes bench-results/flows-lab.json. Takes the lab lock of the e2e
fixture (/run/lock/nodemesh-lab.lock: it waits while a test module holds the lab), brings the default
lab up and removes it at the end.

Every connection goes client (node1) -> node1's proxy (15001) -> same-node delivery -> a sink in
httpbin-v1 on port 9000, and gives node1 an `open` and a `close` record, while
`nodemesh flows --follow -o json --node node1 --last 0 --pod default/client` reads the whole time.
Load:
- `wrk` (default): `wrk -t 2 -c CLIENTS -H "Connection: close"` against nginx (`return 200`): a new
  connection per request, as many per second as the path takes (closed loop, C: the load generator
  leaves the CPU to the agent);
- `python`: CLIENTS Python processes each opening, using (4 bytes) and closing connections paced to
  RATE/CLIENTS per second, against an asyncio sink (read to EOF, close). On this 2-core box the
  processes themselves take most of a core.
Reported: connections made and per second, records received by the follower, records the agent
added, drops the follower was told about, records the ring still holds that the follower did not
get (must be 0), and the agent's RSS before, at its peak and after.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from bench_l4 import NGINX_CONF, parse_wrk  # noqa: E402
from labtools import CLI, cli_env, cli_json, wait_for  # noqa: E402

from nodemesh.lab.lab import DEFAULT_STATE_DIR, Lab, _listening  # noqa: E402
from nodemesh.lab.topology import load_topology  # noqa: E402

OUT = REPO / "bench-results" / "flows-lab.json"
LAB_LOCK = Path("/run/lock/nodemesh-lab.lock")  # the e2e fixture's lock (tests/e2e/conftest.py)
SINK_PORT = 9000

SINK = r"""
import asyncio
async def handle(r, w):
    try:
        while await r.read(65536):
            pass
    finally:
        w.close()
async def main():
    srv = await asyncio.start_server(handle, "0.0.0.0", 9000, backlog=4096)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"""

# argv: host port seconds rate start_at; paced open loop (never more than `rate` per second, and it
# catches up no further than 50 ms behind); prints a JSON summary.
CLIENT = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
seconds, rate, start_at = (float(x) for x in sys.argv[3:6])
while time.time() < start_at:
    time.sleep(0.005)
t0 = time.monotonic()
ok = failed = 0
errors = {}
i = 0
while True:
    now = time.monotonic() - t0
    if now >= seconds:
        break
    due = i / rate
    if due > now:
        time.sleep(due - now)
    elif now - due > 0.05:
        i = int(now * rate)  # behind: skip, do not burst
    i += 1
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
        s.close()
        ok += 1
    except OSError as exc:
        failed += 1
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
elapsed = time.monotonic() - t0
print(json.dumps({"ok": ok, "failed": failed, "errors": errors, "elapsed": elapsed}), flush=True)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(lab: Lab, seconds: float, rate: float, clients: int, load: str, tmp: Path) -> dict[str, object]:
    plan = lab.plan()
    v1 = plan.pod("httpbin-v1")
    logs = lab.state_dir / "logs"
    if load == "wrk":  # nginx answers `200 ok`; each request on its own connection (Connection: close)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=SINK_PORT))
        sink = lab.popen("httpbin-v1", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
                                        "-c", str(conf)], log=logs / "bench-sink.log")  # fmt: skip
    else:
        sink = lab.popen("httpbin-v1", [sys.executable, "-c", SINK], log=logs / "bench-sink.log")
    wait_for(lambda: _listening(sink.pid, SINK_PORT), 10, "the sink")
    agent_pid = lab.load_state()["processes"]["agent/node1"]  # type: ignore[index]
    time.sleep(1.0)
    rss_before = rss_kib(agent_pid)
    status_before = cli_json("node1", "status")

    follower = subprocess.Popen(
        [*CLI, "flows", "--follow", "-o", "json", "--node", "node1", "--last", "0",
         "--pod", "default/client"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), bufsize=1,
    )  # fmt: skip
    received: list[dict[str, object]] = []
    stderr: list[str] = []

    def read_out() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            if line.strip():
                received.append(json.loads(line))

    def read_err() -> None:
        assert follower.stderr is not None
        stderr.extend(follower.stderr)

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    wait_for(lambda: cli_json("node1", "status")["flows"]["followers"] == 1, 10, "the follower")

    if load == "wrk":
        start_at = time.time()
        wrk_log = logs / "bench-wrk.log"
        wrk_log.unlink(missing_ok=True)
        procs = [lab.popen("client", ["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds:g}s",
                                      "--timeout", "2s", "--latency", "-H", "Connection: close",
                                      f"http://{v1.ip}:{SINK_PORT}/"], log=wrk_log)]  # fmt: skip
    else:
        start_at = time.time() + 1.0  # every client starts together, after its interpreter is up
        procs, client_logs = [], []
        for i in range(clients):
            log = logs / f"bench-client-{i}.log"
            log.unlink(missing_ok=True)
            client_logs.append(log)
            procs.append(lab.popen("client", [sys.executable, "-c", CLIENT, v1.ip, str(SINK_PORT),
                                              str(seconds), str(rate / clients), f"{start_at:.3f}"],
                                   log=log))  # fmt: skip
    peak_rss = rss_before
    while any(p.poll() is None for p in procs) and time.time() < start_at + seconds + 60:
        peak_rss = max(peak_rss, rss_kib(agent_pid))
        time.sleep(0.1)
    for p in procs:
        p.wait(timeout=10)
    if load == "wrk":
        w = parse_wrk(wrk_log.read_text(errors="replace"))
        made, failed, elapsed = w["requests"] - w["non_2xx"], w["socket_errors"] + w["non_2xx"], seconds
        errors = {"socket_errors": w["socket_errors"], "non_2xx": w["non_2xx"]}
    else:
        summaries = [json.loads(log.read_text().strip().splitlines()[-1]) for log in client_logs]
        made = sum(s["ok"] for s in summaries)
        failed = sum(s["failed"] for s in summaries)
        elapsed = max(s["elapsed"] for s in summaries)
        errors = {k: v for s in summaries for k, v in s["errors"].items()}

    # drain: until the follower has every record the agent added for these connections (bounded)
    expected = 2 * made
    deadline = time.monotonic() + 30
    while len(received) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    status_after = cli_json("node1", "status")
    rss_after = rss_kib(agent_pid)
    stored = [json.loads(line) for line in subprocess.run(
        [*CLI, "flows", "-o", "json", "--node", "node1", "--all", "--pod", "default/client"],
        capture_output=True, text=True, env=cli_env(), timeout=60).stdout.splitlines() if line.strip()]
    follower.terminate()
    follower.wait(timeout=10)
    for t in threads:
        t.join(timeout=5)
    sink.terminate()
    sink.wait(timeout=10)

    got = {(r["connection_id"], r["event"]) for r in received}
    in_ring = [r for r in stored if r["time"] >= start_at - 0.5]
    missing = [r for r in in_ring if (r["connection_id"], r["event"]) not in got]
    dropped = sum(json.loads(line)["dropped"] for line in stderr if line.startswith("{"))
    by_event: dict[str, int] = {}
    for r in received:
        by_event[str(r["event"])] = by_event.get(str(r["event"]), 0) + 1
    return {
        "seconds": seconds,
        "load": load,
        "target_rate_per_s": rate if load == "python" else None,  # wrk: as fast as the path goes
        "clients": clients,
        "connections_made": made,
        "connections_failed": failed,
        "achieved_rate_per_s": round(made / elapsed, 1),
        "records_expected": expected,
        "records_received_by_follower": len(received),
        "records_received_by_event": by_event,
        "records_added_by_agent": status_after["flows"]["added"] - status_before["flows"]["added"],
        "follower_drops_reported": dropped,
        "agent_follower_drops": status_after["flows"]["follower_drops"],
        "ring_capacity": status_after["flows"]["capacity"],
        "ring_held_from_run": len(in_ring),
        "ring_held_missing_from_follower": len(missing),
        "agent_rss_mib_before": round(rss_before / 1024, 1),
        "agent_rss_mib_peak": round(peak_rss / 1024, 1),
        "agent_rss_mib_after": round(rss_after / 1024, 1),
        "client_errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--load", choices=("wrk", "python"), default="wrk",
                        help="wrk: as many new connections as the path takes (HTTP/1.1, Connection: close, "
                             "nginx answers); python: paced to --rate by --clients processes")  # fmt: skip
    parser.add_argument("--rate", type=float, default=2000.0, help="--load python: target connections/s")
    parser.add_argument("--clients", type=int, default=None,
                        help="wrk connections (default 32) or python processes (default 8)")  # fmt: skip
    parser.add_argument("--proxy-workers", type=int, default=1, help="processes per agent")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    clients = args.clients or (32 if args.load == "wrk" else 8)
    tmp = Path(tempfile.mkdtemp(prefix="nm-bench-flows-"))
    tmp.chmod(0o755)  # nginx workers run as nobody
    LAB_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LAB_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab = Lab(DEFAULT_STATE_DIR)
        try:
            lab.up(load_topology(), proxy_workers=args.proxy_workers)
            result = {"proxy_workers": args.proxy_workers,
                      **run(lab, args.seconds, args.rate, clients, args.load, tmp)}
        finally:
            lab.down(quiet=True)
            fcntl.flock(lock, fcntl.LOCK_UN)
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        print(f"{k:<34} {v}")
    ok = result["ring_held_missing_from_follower"] == 0
    print("OK: every record the ring still holds reached the follower" if ok else "LOST records")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
