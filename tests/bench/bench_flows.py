"""Benchmark: the flow ring at 2,000 records/s with one `nodemesh flows --follow` client on the socket.

The admin server and a producer (standing in for the proxy, calling `ring.add` in 10 ms ticks) share
one event loop, as in the agent; the follower is the real CLI (`nodemesh flows -f -o json`) in its own
process. Reports records lost by the follower (must be 0: every record it missed would still be in
the ring), the drops the ring counted, delivery latency, and the server's memory growth once the
ring is full. Run as a script (`python tests/bench/bench_flows.py [--rate 2000] [--seconds 5]`) or
with pytest. Prints a table and writes `bench-results/flows.json`; never asserts on wall-clock figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.admin import (  # noqa: E402
    AdminServer,
    AgentStatus,
    CertInfo,
    ConnectionInfo,
    ControllerLink,
    DatapathStatus,
    FlowEvent,
    FlowRecord,
    FlowRing,
    MeshSettings,
    ProxyState,
    ProxyStatus,
    Verdict,
)
from api.resources import PolicyObject, Service, Workload  # noqa: E402

RESULTS = ROOT / "bench-results" / "flows.json"
NODEMESH = ROOT / ".venv" / "bin" / "nodemesh"
CAPACITY = 10_000


class _Sources:
    def status(self) -> AgentStatus:
        return AgentStatus(
            "bench",
            "0",
            time.time(),
            ProxyStatus(ProxyState.RUNNING),
            DatapathStatus("none"),
            ControllerLink("-", False),
        )

    def mesh(self) -> MeshSettings:
        return MeshSettings("cluster.local")

    def workloads(self) -> Sequence[Workload]:
        return ()

    def services(self) -> Sequence[Service]:
        return ()

    def policies(self) -> Sequence[PolicyObject]:
        return ()

    def certs(self) -> Sequence[CertInfo]:
        return ()

    def connections(self) -> Sequence[ConnectionInfo]:
        return ()

    def metrics_text(self) -> str:
        return ""


def _record(i: int) -> FlowRecord:
    denied = i % 10 == 0
    return FlowRecord(
        time=time.time(),
        event=FlowEvent.DENY if denied else FlowEvent.CLOSE,
        verdict=Verdict.DENIED if denied else Verdict.ALLOWED,
        src_ip="10.1.0.2",
        src_port=30000 + i % 30000,
        dst_ip="10.2.0.3",
        dst_port=5432,
        src_pod="web-7d9f",
        src_namespace="shop",
        src_identity="spiffe://cluster.local/ns/shop/sa/web",
        dst_pod="db-0",
        dst_namespace="shop",
        dst_service="db.shop.svc.cluster.local",
        policy="shop/db-allow-web",
        rule=0,
        reason="DENIED_BY_POLICY" if denied else "ALLOWED_BY_POLICY",
        bytes_sent=812,
        bytes_received=20_480,
        duration=0.012,
        connection_id=f"b{i}",
    )


class _Follower:
    """The CLI in a process; a thread reads its stdout and notes which record arrived, and when.

    Its bookkeeping is preallocated, so that it does not count as the server's memory growth.
    """

    def __init__(self, run_dir: Path, total: int) -> None:
        env = {**os.environ, "NODEMESH_RUN_DIR": str(run_dir)}
        self.proc = subprocess.Popen(
            [str(NODEMESH), "flows", "-f", "-o", "json", "--last", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.seen = bytearray(total)
        self.count = 0
        self.latencies = array("d", bytes(8 * total))
        self.drop_notices: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            flow = json.loads(line)
            i = int(flow["connection_id"][1:])
            if 0 <= i < len(self.seen):
                self.seen[i] = 1
                self.latencies[self.count] = time.time() - flow["time"]
                self.count += 1

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.drop_notices.extend(self.proc.stderr)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for t in self._threads:
            t.join(5)


async def _measure(rate: int, seconds: float, run_dir: Path) -> dict[str, Any]:
    proc = psutil.Process()
    ring = FlowRing(capacity=CAPACITY)
    rss_empty = proc.memory_info().rss
    for i in range(CAPACITY):  # a full ring first, so growth below is not the ring filling up
        ring.add(_record(-1 - i))
    rss_full = proc.memory_info().rss
    server = AdminServer(_Sources(), ring, run_dir / "bench" / "admin.sock")
    await server.start()
    total = int(rate * seconds)
    follower = _Follower(run_dir, total)
    try:
        deadline = time.monotonic() + 30
        while ring.subscribers == 0:
            if time.monotonic() > deadline or follower.proc.poll() is not None:
                raise RuntimeError("the follower did not connect")
            await asyncio.sleep(0.01)
        rss_before = proc.memory_info().rss
        tick = 0.01
        per_tick = rate * tick
        added = 0
        add_time = 0.0
        start = time.monotonic()
        while added < total:
            due = min(total, int((time.monotonic() - start) / tick * per_tick) + int(per_tick))
            t0 = time.perf_counter()
            while added < due:
                ring.add(_record(added))
                added += 1
            add_time += time.perf_counter() - t0
            await asyncio.sleep(tick)
        produced_in = time.monotonic() - start
        rss_after = proc.memory_info().rss
        settle = time.monotonic() + 5
        while follower.count < total and time.monotonic() < settle:
            await asyncio.sleep(0.05)
    finally:
        follower.stop()
        await server.close()
    oldest_kept = int(ring.snapshot(last=CAPACITY)[0].connection_id[1:])
    missing = [i for i in range(total) if not follower.seen[i]]
    lat = sorted(follower.latencies[: follower.count]) or [0.0]
    return {
        "benchmark": "flows",
        "rate_per_s": rate,
        "seconds": round(produced_in, 2),
        "records_added": total,
        "records_received": follower.count,
        "records_lost": len(missing),
        "records_lost_still_in_ring": len([i for i in missing if i >= oldest_kept]),
        "follower_drops_counted": ring.dropped,
        "drop_notices": len(follower.drop_notices),
        "produce_us_per_record": round(add_time / total * 1e6, 2),
        "latency_ms_p50": round(lat[len(lat) // 2] * 1000, 2),
        "latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
        "ring_capacity": CAPACITY,
        "rss_ring_fill_kib": (rss_full - rss_empty) // 1024,
        "rss_growth_while_following_kib": (rss_after - rss_before) // 1024,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }


def run(rate: int = 2000, seconds: float = 5.0, results_path: Path = RESULTS) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="nm-bench-"))
    try:
        figures = asyncio.run(_measure(rate, seconds, run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\nflow ring benchmark: {rate} records/s for {figures['seconds']} s, one `flows -f` follower")
    for key, value in figures.items():
        print(f"  {key:<34} {value}")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def test_bench_flows_follower_loses_nothing(tmp_path: Path) -> None:
    figures = run(seconds=3.0, results_path=tmp_path / "flows.json")
    assert figures["records_lost"] == figures["follower_drops_counted"]  # every loss is accounted for
    assert figures["records_lost_still_in_ring"] == 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    run(args.rate, args.seconds)
