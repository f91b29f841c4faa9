"""Issue-5 benchmark: L4 cost of the mesh on the lab path client (node1) -> httpbin-v2 (node2).

Three modes over the same pods, servers and ports, each on a freshly built lab (docs/benchmarks.md):
- `no-mesh`: lab without agents, the pods talk directly;
- `nodemesh`: lab with agents, which capture the traffic and carry it however they do today;
- `stunnel`: lab without agents plus an stunnel mTLS (TLS 1.3, ECDSA P-256) pair in the two pods.

Per mode: bulk throughput with iperf3 (1 and 8 streams), HTTP/1.1 requests against nginx
(`return 200 "ok"`) at saturation with wrk and at a fixed 1,000 req/s with tests/bench/open_loop.py,
each with keep-alive and with a new connection per request. Run as root:
`.venv/bin/python tests/bench/bench_l4.py [--seconds 5] [--modes no-mesh,nodemesh,stunnel] [--rounds 3]`.
With `--rounds N` the modes are measured N times in turn and each figure is the median round's
(ratios: the median of each round's ratio), since the host's speed drifts between minutes.
Prints a table and writes bench-results/l4.json; never asserts on the figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stunnel_pair
from proc_usage import Watch
from stunnel_pair import Tunnel

from agent.datapath.netns import in_netns
from nodemesh.lab.lab import Lab
from nodemesh.lab.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench-results" / "l4.json"
TOPOLOGY = ROOT / "examples" / "lab" / "topology.yaml"
OPEN_LOOP = Path(__file__).resolve().parent / "open_loop.py"
CLIENT, SERVER = "client", "httpbin-v2"
HTTP_PORT, IPERF_PORT = 8080, 5201
TUNNELS = [Tunnel("http", HTTP_PORT, 18080), Tunnel("iperf", IPERF_PORT, 15201)]
MODES = ("no-mesh", "nodemesh", "stunnel")
STEPS = ("bulk_1", "bulk_8", "fixed_keepalive", "fixed_close", "sat_keepalive", "sat_close")
AIM_RATE = 1000  # req/s at which the issue-5 aim bounds the added p50
LAB_WAIT_S = 240.0  # another session's e2e run may hold the (single) lab for a while


@dataclass(frozen=True)
class Settings:
    seconds: float = 5.0
    rate: float = 1000.0
    wrk_threads: int = 2
    wrk_connections: int = 32
    pause: float = 1.0  # between runs, so one run's teardown does not land in the next
    steps: tuple[str, ...] = STEPS  # a subset measures only those rows (the table shows "-" for others)
    proxy_workers: int = 1  # nodemesh: processes per agent that carry traffic (`--proxy-workers`)


class BenchError(Exception):
    """A mode could not be measured; the message says which tool failed and what it printed."""


# ---- lab -------------------------------------------------------------------------------------
def wait_for_free_lab(lab: Lab, timeout: float = LAB_WAIT_S) -> None:
    """Wait until no lab is up: it may be another session's, so it is never torn down from here."""
    deadline = time.monotonic() + timeout
    announced = False
    while lab.state_file.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"a lab is still up ({lab.state_file}) after {timeout:.0f} s; not touching it")
        if not announced:
            print(f"waiting for the lab in use to go down ({lab.state_file})...", flush=True)
            announced = True
        time.sleep(2.0)


@contextmanager
def lab_up(agents: bool, proxy_workers: int = 1) -> Iterator[Lab]:
    lab = Lab()
    wait_for_free_lab(lab)
    try:
        lab.up(load_topology(TOPOLOGY), agents=agents, timeout=60, proxy_workers=proxy_workers)
        yield lab
    finally:
        lab.down(quiet=True)


def wait_listening(lab: Lab, pod: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Connect to 127.0.0.1:port from inside `pod` until it answers (the process must stay alive)."""
    netns = lab.plan().pod(pod).netns_path
    deadline = time.monotonic() + 10
    while True:
        with in_netns(netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        finally:
            s.close()
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"{proc.args!r} in {pod}: nothing on :{port}\n{tail}")
        time.sleep(0.05)


# ---- servers -----------------------------------------------------------------------------------
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    server {{
        listen {port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def start_servers(lab: Lab, tmp: Path) -> list[subprocess.Popen[bytes]]:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=HTTP_PORT))
    nginx_log, iperf_log = tmp / "nginx.out", tmp / "iperf3-server.out"
    nginx = lab.popen(
        SERVER, ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)], log=nginx_log
    )
    iperf = lab.popen(SERVER, ["iperf3", "-s", "-p", str(IPERF_PORT)], log=iperf_log)
    wait_listening(lab, SERVER, HTTP_PORT, nginx, nginx_log)
    wait_listening(lab, SERVER, IPERF_PORT, iperf, iperf_log)
    return [nginx, iperf]


def start_stunnel(lab: Lab, tmp: Path) -> list[subprocess.Popen[bytes]]:
    server_ip = lab.plan().pod(SERVER).ip
    stunnel_pair.write_certificates(tmp, server_ip)
    server_conf = stunnel_pair.server_config(tmp, TUNNELS)
    client_conf = stunnel_pair.client_config(tmp, server_ip, TUNNELS)
    server = lab.popen(SERVER, ["stunnel", str(server_conf)], log=tmp / "stunnel-server.out")
    client = lab.popen(CLIENT, ["stunnel", str(client_conf)], log=tmp / "stunnel-client.out")
    for t in TUNNELS:
        wait_listening(lab, SERVER, t.tls_port, server, tmp / "stunnel-server.log")
        wait_listening(lab, CLIENT, t.port, client, tmp / "stunnel-client.log")
    return [server, client]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop what we started (Lab.down would kill it with the pod cgroups anyway)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


# ---- load --------------------------------------------------------------------------------------
def run_in_client(lab: Lab, argv: list[str], timeout: float) -> str:
    proc = lab.exec(CLIENT, argv, timeout=timeout)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` in {CLIENT} exited {proc.returncode}: {(out + err)[-1500:]}")
    return out


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat; idle and iowait are idle)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def iperf(lab: Lab, host: str, streams: int, s: Settings, proxies: dict[str, int]) -> dict[str, Any]:
    """`proxies`: name -> pid of the processes that carry the traffic (agents, stunnels), whose share
    of a core and context switches are sampled inside the run (after the omitted second)."""
    seconds = max(1, round(s.seconds))
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1",
            "-P", str(streams), "-J"]  # fmt: skip
    watch = Watch(proxies, start=1.5, end=seconds + 0.5).begin()
    busy0, total0 = _cpu_jiffies()
    report = json.loads(run_in_client(lab, argv, timeout=s.seconds + 30))
    busy1, total1 = _cpu_jiffies()
    if "error" in report:
        raise BenchError(f"iperf3 -P {streams}: {report['error']}")
    received = report["end"]["sum_received"]
    gbit_s = received["bits_per_second"] / 1e9
    # the whole machine (apps, proxies, kernel) during the run, as a share and per GB carried: the
    # host's speed drifts between runs, CPU per byte shows what a mode costs regardless
    busy = (busy1 - busy0) / max(1, total1 - total0)
    proxies_used = watch.result()
    return {
        "streams": streams,
        "gbit_s": round(gbit_s, 3),
        "retransmits": report["end"]["sum_sent"].get("retransmits"),
        "machine_busy": round(busy, 3),
        "cpu_s_per_gb": round(busy * (os.cpu_count() or 1) / (gbit_s / 8), 3) if gbit_s else None,
        "proxies": proxies_used,
        "proxies_cpu_s_per_gb": proxies_per_gb(proxies_used, gbit_s),
    }


def proxies_per_gb(used: dict[str, dict[str, float]], gbit_s: float) -> dict[str, float] | None:
    """CPU seconds per GB carried of all proxy processes together, in user space and in the kernel:
    what the proxies themselves cost per byte, apart from the apps and the rest of the machine."""
    if not used or not gbit_s:
        return None
    gb_per_s = gbit_s / 8
    return {
        kind: round(sum(u[f"{kind}_share"] for u in used.values()) / gb_per_s, 3)
        for kind in ("user", "system")
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise BenchError(f"wrk: cannot read latency {text!r}")
    return round(float(m.group(1)) * _UNITS[m.group(2)], 3)


def parse_wrk(out: str) -> dict[str, Any]:
    pct = dict(re.findall(r"^\s+(50|90|99)(?:\.000)?%\s+(\S+)$", out, re.M))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rps is None or total is None or "50" not in pct:
        raise BenchError(f"wrk: unexpected output:\n{out}")
    return {
        "rps": round(float(rps.group(1)), 1),
        "requests": int(total.group(1)),
        "p50_ms": _ms(pct["50"]),
        "p90_ms": _ms(pct["90"]),
        "p99_ms": _ms(pct["99"]),
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def wrk(lab: Lab, host: str, keep_alive: bool, s: Settings) -> dict[str, Any]:
    argv = ["wrk", "-t", str(s.wrk_threads), "-c", str(s.wrk_connections), "-d", f"{s.seconds:g}s",
            "--timeout", "2s", "--latency"]  # fmt: skip
    if not keep_alive:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{host}:{HTTP_PORT}/")
    return {
        "connection": "keep-alive" if keep_alive else "close",
        **parse_wrk(run_in_client(lab, argv, s.seconds + 30)),
    }


def open_loop(lab: Lab, host: str, keep_alive: bool, s: Settings) -> dict[str, Any]:
    argv = [sys.executable, str(OPEN_LOOP), "--host", host, "--port", str(HTTP_PORT),
            "--rate", f"{s.rate:g}", "--seconds", f"{s.seconds:g}",
            "--connection", "keep-alive" if keep_alive else "close"]  # fmt: skip
    result: dict[str, Any] = json.loads(run_in_client(lab, argv, timeout=s.seconds + 30))
    return result


# ---- what the agents did --------------------------------------------------------------------------
def agent_path(lab: Lab) -> dict[str, Any]:
    """What carried the bench's connections, according to the agents' logs.

    Counts `event=` names (all, and on lines naming a bench port), keeps one flow line per node as
    a sample, and names the carrier: HBONE when node1 opened pooled connections to a peer's :15008
    and node2's flows for the bench ports carry the client's SPIFFE identity (which it only knows
    from the mTLS peer certificate); the placeholder relay when `relay_open` lines show up.
    """
    events: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    samples: dict[str, str] = {}
    denies: list[str] = []
    inbound_with_identity = 0
    ports = tuple(f":{p} " for p in (HTTP_PORT, IPERF_PORT))
    for node in ("node1", "node2"):
        path = lab.state_dir / "logs" / f"agent-{node}.log"
        if not path.exists():
            continue
        with path.open(errors="replace") as f:
            for line in f:
                m = re.search(r"\bevent=(\w+)", line)
                if m is None:
                    continue
                key = f"{node}:{m.group(1)}"
                events[key] += 1
                if m.group(1) == "deny" and len(denies) < 3:
                    denies.append(f"{node}: " + line.split("msg=", 1)[-1].strip())
                if any(p in line for p in ports):
                    ours[key] += 1
                    samples.setdefault(node, line.split("msg=", 1)[-1].strip())
                    if node == "node2" and "src_identity=spiffe://" in line:
                        inbound_with_identity += 1
    if events["node1:hbone_pool_connect"] and inbound_with_identity:
        carrier = "HBONE (mTLS to :15008); node2 saw the client's SPIFFE identity"
    elif any(k.endswith(":relay_open") for k in ours):
        carrier = "plaintext placeholder relay (agent/relay.py)"
    elif ours:
        carrier = "captured by the agents; carrier not recognised (see events)"
    else:
        carrier = "not captured: no agent log line names the bench ports"
    return {
        "carrier": carrier,
        "events_on_bench_ports": dict(ours.most_common(12)),
        "events": dict(events.most_common(16)),
        "sample_lines": samples,
        "deny_lines": denies,
    }


# ---- one mode --------------------------------------------------------------------------------------
def measure_mode(mode: str, s: Settings) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"nm-bench-l4-{mode}-"))
    tmp.chmod(0o755)  # nginx workers run as nobody
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with lab_up(agents=mode == "nodemesh", proxy_workers=s.proxy_workers) as lab:
            procs += start_servers(lab, tmp)
            host = lab.plan().pod(SERVER).ip
            proxies: dict[str, int] = {}
            if mode == "stunnel":
                server, client = start_stunnel(lab, tmp)
                procs += [server, client]
                proxies = {"stunnel/client": client.pid, "stunnel/server": server.pid}
                host = "127.0.0.1"
            elif mode == "nodemesh":
                state = lab.load_state() or {}
                proxies = {n: pid for n, pid in state.get("processes", {}).items() if n.startswith("agent/")}
                for node in [n.removeprefix("agent/") for n in list(proxies)]:  # and their proxy workers
                    proxies |= {f"agent/{node}/w{i}": pid for i, pid in lab.proxy_workers(node).items()}
            out: dict[str, Any] = {"mode": mode, "target": host}
            steps: list[tuple[str, Any]] = [
                ("bulk_1", lambda: iperf(lab, host, 1, s, proxies)),
                ("bulk_8", lambda: iperf(lab, host, 8, s, proxies)),
                ("fixed_keepalive", lambda: open_loop(lab, host, True, s)),
                ("fixed_close", lambda: open_loop(lab, host, False, s)),
                ("sat_keepalive", lambda: wrk(lab, host, True, s)),
                ("sat_close", lambda: wrk(lab, host, False, s)),
            ]
            for name, step in steps:
                if name not in s.steps:
                    continue
                print(f"  {mode}: {name}...", flush=True)
                out[name] = step()
                time.sleep(s.pause)
            if mode == "nodemesh":
                out["agent_path"] = agent_path(lab)
            stop(procs)
            return out
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


# the figure a step is ranked by when rounds are combined (and the one its aim is about)
MAIN_FIGURE = {"bulk_1": "gbit_s", "bulk_8": "gbit_s", "fixed_keepalive": "p50_ms",
               "fixed_close": "p50_ms", "sat_keepalive": "rps", "sat_close": "rps"}  # fmt: skip
RATIO_KEYS = tuple((key, MAIN_FIGURE[key]) for key in ("bulk_1", "bulk_8", "sat_keepalive", "sat_close"))


def median_of_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per mode and step, the result of the round whose main figure is the median (the lower middle
    one of an even count): every row of the table then comes from one real run, not a mix."""
    out: dict[str, dict[str, Any]] = {}
    for mode in rounds[0]:
        merged = dict(rounds[0][mode])
        for step, field in MAIN_FIGURE.items():
            results = [r[mode][step] for r in rounds if mode in r and step in r[mode]]
            ranked = sorted((x for x in results if x.get(field) is not None), key=lambda x: x[field])
            if ranked:
                merged[step] = ranked[(len(ranked) - 1) // 2]
        out[mode] = merged
    return out


def ratios_per_round(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, list[float | None]]:
    """nodemesh / stunnel of each round, for the steps with a throughput aim."""
    out: dict[str, list[float | None]] = {key: [] for key, _ in RATIO_KEYS}
    for r in rounds:
        nm, st = r.get("nodemesh", {}), r.get("stunnel", {})
        for key, field in RATIO_KEYS:
            out[key].append(_ratio(nm[key][field], st[key][field]) if key in nm and key in st else None)
    return out


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def _at_least_one(ratios: dict[str, float | None] | None, *keys: str) -> bool | None:
    if ratios is None:
        return None
    return all((ratios[k] or 0.0) >= 1.0 for k in keys)


def summarize(
    modes: dict[str, dict[str, Any]], rounds: list[dict[str, dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """The ratios and aims. With several `rounds` (`modes` is then `median_of_rounds(rounds)`), a ratio
    is the median of the rounds' own ratios: the two modes of a round ran minutes apart, the rounds
    further apart, and this host's speed drifts at that scale."""
    nm, st, base = modes.get("nodemesh"), modes.get("stunnel"), modes.get("no-mesh")
    out: dict[str, Any] = {}
    if nm and st:
        measured = rounds if rounds is not None and len(rounds) > 1 else [modes]
        many = len(measured) > 1
        per_round = ratios_per_round(measured)
        out["nodemesh_vs_stunnel"] = {key: _median(v) if many else v[0] for key, v in per_round.items()}
        if many:
            out["nodemesh_vs_stunnel_per_round"] = per_round
    if base:
        for name, m in (("nodemesh", nm), ("stunnel", st)):
            if m and "fixed_keepalive" in m:
                out[f"{name}_added_p50_ms_at_{int(m['fixed_keepalive']['target_rps'])}rps"] = {
                    conn: round(m[key]["p50_ms"] - base[key]["p50_ms"], 3)
                    for conn, key in (("keep-alive", "fixed_keepalive"), ("close", "fixed_close"))
                    if key in m and key in base
                    and m[key]["p50_ms"] is not None and base[key]["p50_ms"] is not None
                }
    ratios = out.get("nodemesh_vs_stunnel")
    added = out.get(f"nodemesh_added_p50_ms_at_{AIM_RATE}rps", {}).get("keep-alive")
    # the issue-5 aims; None where the figure was not measured
    out["aims"] = {
        "throughput_ge_stunnel": _at_least_one(ratios, "bulk_1", "bulk_8"),
        "rps_ge_stunnel": _at_least_one(ratios, "sat_keepalive", "sat_close"),
        "added_p50_le_0.3ms_keepalive": added <= 0.3 if added is not None else None,
    }
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def _achieved(r: dict[str, Any]) -> str:
    """The achieved rate, flagged when the path could not keep up with the offered one."""
    text = f"{r['achieved_rps']:,.0f}"
    return text + " (overloaded)" if r["achieved_rps"] < 0.95 * r["target_rps"] else text


def _cpu_cell(r: dict[str, Any]) -> str:
    if r.get("cpu_s_per_gb") is None:  # results from before the bench measured it
        return "-"
    return f"{r['machine_busy'] * 100:.0f} / {r['cpu_s_per_gb']:.2f}"


def _proxies_cell(r: dict[str, Any]) -> str:
    per_gb = r.get("proxies_cpu_s_per_gb")
    if not per_gb:  # no proxy processes (no mesh), or results from before the bench measured it
        return "-"
    return f"{per_gb['user']:.2f} / {per_gb['system']:.2f}"


def _busiest_cell(r: dict[str, Any]) -> str:
    """The proxy process that used most CPU: its share of a core and how often it slept per second."""
    if not r.get("proxies"):
        return "-"
    name, u = max(r["proxies"].items(), key=lambda item: item[1]["core_share"])
    return f"{u['core_share'] * 100:.0f}% / {u['voluntary_per_s']:,.0f} ({name})"


def table(modes: dict[str, dict[str, Any]], s: Settings) -> str:
    names = [m for m in MODES if m in modes]
    show_ratio = "nodemesh" in modes and "stunnel" in modes
    rate = f"{s.rate:,.0f} req/s"
    rows: list[tuple[str, list[str], str]] = []

    def add(label: str, getter: Any, ratio: bool = False, digits: int = 2) -> None:
        def get(m: dict[str, Any]) -> Any:
            try:
                return getter(m)
            except KeyError:  # a step not run (--steps)
                return None

        vals = [get(modes[n]) for n in names]
        r = ""
        if ratio and show_ratio:
            r = _fmt(_ratio(get(modes["nodemesh"]), get(modes["stunnel"]))) + "x"
        rows.append((label, [_fmt(v, digits) for v in vals], r))

    def errs(r: dict[str, Any]) -> int:
        return int(r.get("errors", 0) + r.get("socket_errors", 0) + r.get("non_2xx", 0))

    for key, label in (("bulk_1", "1 stream"), ("bulk_8", "8 streams")):
        add(f"bulk, {label} (Gbit/s)", lambda m, k=key: m[k]["gbit_s"], ratio=True)
        add("  machine busy (%) / CPU-s per GB", lambda m, k=key: _cpu_cell(m[k]))
        add("  busiest proxy: % of a core / sleeps per s", lambda m, k=key: _busiest_cell(m[k]))
        add("  proxies' CPU-s per GB: user / kernel", lambda m, k=key: _proxies_cell(m[k]))
    for key, label in (("sat_keepalive", "keep-alive"), ("sat_close", "new conn/request")):
        add(f"saturation, {label} (req/s)", lambda m, k=key: m[k]["rps"], ratio=True, digits=0)
        add("  p50 / p99 (ms)", lambda m, k=key: f"{m[k]['p50_ms']:.2f} / {m[k]['p99_ms']:.2f}")
        add("  errors", lambda m, k=key: errs(m[k]))
    for key, label in (("fixed_keepalive", "keep-alive"), ("fixed_close", "new conn/request")):
        add(f"{rate}, {label}: achieved (req/s)", lambda m, k=key: _achieved(m[k]))
        add("  p50 / p99 (ms)", lambda m, k=key: f"{m[k]['p50_ms']:.3f} / {m[k]['p99_ms']:.3f}")
        if "no-mesh" in modes:
            add(
                "  added p50 vs no mesh (ms)",
                lambda m, k=key: round(m[k]["p50_ms"] - modes["no-mesh"][k]["p50_ms"], 3),
                digits=3,
            )
        add("  errors", lambda m, k=key: errs(m[k]))
    header = ["", *names] + (["nodemesh/stunnel"] if show_ratio else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, vals, r in rows:
        cells = [label, *vals] + ([r] if show_ratio else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout + p.stderr).strip().splitlines()
    return next((ln.strip() for ln in text if re.search(r"\d+\.\d+", ln) and "inetd" not in ln), "?")


def run(modes: list[str], s: Settings, results_path: Path = RESULTS, rounds: int = 1) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("bench_l4 needs root (it builds the lab)")
    for tool in ("iperf3", "wrk", "nginx", "stunnel"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run `make setup` (scripts/setup.sh)")
    measured_rounds: list[dict[str, dict[str, Any]]] = []
    started = time.monotonic()
    for n in range(rounds):
        this: dict[str, dict[str, Any]] = {}
        for mode in modes:
            of = f" (round {n + 1} of {rounds})" if rounds > 1 else ""
            print(f"mode {mode}{of}: building the lab...", flush=True)
            this[mode] = measure_mode(mode, s)
        measured_rounds.append(this)
    measured = measured_rounds[0] if rounds == 1 else median_of_rounds(measured_rounds)
    summary = summarize(measured, measured_rounds)
    report = {
        "benchmark": "l4",
        "path": f"{CLIENT} (node1) -> {SERVER} (node2), default lab topology",
        "settings": {"seconds": s.seconds, "fixed_rate_rps": s.rate, "wrk_threads": s.wrk_threads,
                     "wrk_connections": s.wrk_connections, "proxy_workers": s.proxy_workers},
        "rounds": rounds,
        "modes": measured,  # with several rounds: per mode and step, the median round's result
        "summary": summary,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "tools": {t: _version(a) for t, a in (("stunnel", ["stunnel", "-version"]),
                                                   ("nginx", ["nginx", "-v"]),
                                                   ("wrk", ["wrk", "-v"]),
                                                   ("iperf3", ["iperf3", "--version"]))},
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    if rounds > 1:
        report["per_round"] = measured_rounds
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    if rounds > 1:
        print(f"{rounds} rounds; each row is the median round's result for that mode and step")
    print(table(measured, s))
    if rounds > 1:
        for key, values in summary.get("nodemesh_vs_stunnel_per_round", {}).items():
            if all(v is None for v in values):  # a step not run (--steps)
                continue
            each, median = ", ".join(_fmt(v) for v in values), _fmt(summary["nodemesh_vs_stunnel"][key])
            print(f"nodemesh/stunnel per round, {key}: {each} (median {median})")
    print()
    print(json.dumps(summary, indent=2))
    if "nodemesh" in measured:
        print(f"nodemesh carrier per the agent logs: {measured['nodemesh']['agent_path']['carrier']}")
    print(f"wrote {results_path}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load run")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed request rate")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS)
    )
    parser.add_argument("--wrk-connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--proxy-workers", type=int, default=1, help="nodemesh: processes per agent")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the modes this many times, alternating; report medians (ratios: median of rounds)",
    )
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    steps = tuple(x.strip() for x in args.steps.split(",") if x.strip())
    if bad := [x for x in steps if x not in STEPS]:
        parser.error(f"unknown step(s) {bad}; choose from {', '.join(STEPS)}")
    s = Settings(
        seconds=args.seconds,
        rate=args.rate,
        wrk_threads=args.wrk_threads,
        wrk_connections=args.wrk_connections,
        steps=steps,
        proxy_workers=args.proxy_workers,
    )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    run(modes, s, args.out, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
