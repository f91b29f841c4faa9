"""Benchmark the datapath: load time, time to enroll one pod (p50/p95), agent RSS with 2 and 50 pods.

Run as root: ``.venv/bin/python tests/bench/bench_datapath.py [--pods 50]``. Prints a table and
writes ``bench-results/datapath.json``. Creates its own netns, cgroup and pins; removes them.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.datapath import PodRef  # noqa: E402
from agent.datapath.bcc_datapath import BccDatapath  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "datapath.json")
    args = ap.parse_args()
    prefix = f"nmdp-b{secrets.token_hex(3)}"
    cg = CGROUP_ROOT / f"nodemesh-dp-test-{prefix}" / "pods"
    namespaces: list[str] = []
    dp = BccDatapath()
    results: dict[str, float | int] = {}
    try:
        cg.mkdir(parents=True)
        rss_before = rss_kib()
        t0 = time.perf_counter()
        dp.load(prefix, cg)
        results["load_s"] = round(time.perf_counter() - t0, 3)
        results["rss_loaded_kib"] = rss_kib()
        results["rss_before_load_kib"] = rss_before
        times: list[float] = []
        for i in range(args.pods):
            ns = f"{prefix}-{i}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            namespaces.append(ns)
            t = time.perf_counter()
            ip = f"10.253.{i // 250}.{i % 250 + 1}"
            dp.enroll(PodRef(uid=f"bench-{i}", netns_path=f"/var/run/netns/{ns}", ip=ip))
            times.append(time.perf_counter() - t)
            if i + 1 == 2:
                results["rss_2_pods_kib"] = rss_kib()
        results[f"rss_{args.pods}_pods_kib"] = rss_kib()
        results["enroll_p50_ms"] = round(statistics.median(times) * 1000, 3)
        results["enroll_p95_ms"] = round(sorted(times)[int(len(times) * 0.95) - 1] * 1000, 3)
        results["pods"] = args.pods
        t = time.perf_counter()
        for i in range(args.pods):
            dp.unenroll(PodRef(uid=f"bench-{i}", netns_path=f"/var/run/netns/{prefix}-{i}", ip="10.253.0.1"))
        results["unenroll_mean_ms"] = round((time.perf_counter() - t) / args.pods * 1000, 3)
    finally:
        dp.uninstall(prefix)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        for d in (cg, cg.parent):
            if d.exists():
                d.rmdir()
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
