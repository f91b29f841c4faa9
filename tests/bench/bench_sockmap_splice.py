"""Measure splicing a loopback TCP hop with a SOCKHASH and `sk_msg` redirect, against the TCP stack.

The question (issue 5, bulk on 8 streams): the pod -> node proxy hop and the proxy -> app hop are
loopback TCP connections inside the pod's netns; could the agent splice them in the kernel, as
Merbridge does for sidecars, to save CPU per byte? Two measurements, each with and without the
splice, inside a netns and a cgroup this script creates:

1. bulk: iperf3 over 127.0.0.1 (one stream), machine CPU seconds per GB carried;
2. slow reader: a sender writes as fast as it can while the receiver reads 64 KiB every 10 ms; how
   much piles up between them. The TCP stack holds the sender back at the receiver's window; a
   redirected message is queued on the receiver's socket with no window, so this shows whether the
   sender is held back at all. Bounded: it stops at `--queue-limit` MiB queued or after 8 s.

The splice: `sockops` puts both ends of a connection to port 5201 into a SOCKHASH once established
(key: netns cookie and 4-tuple); the `sk_msg` program redirects each message to the peer's ingress
queue. Its verdict is fixed per socket at the first message (a socket never mixes the two paths).

Run as root: ``.venv/bin/python tests/bench/bench_sockmap_splice.py [--rounds 2]``. Writes
``bench-results/sockmap-splice.json``. Removes its netns, cgroup and programs, also on failure.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nodemesh.lab import system  # noqa: E402

PORT = 5201
BPF_F_ALLOW_MULTI = 2

BPF_TEXT = r"""
#include <uapi/linux/bpf.h>
struct splice_key { u64 netns; u32 lip; u32 rip; u32 lport; u32 rport; };
BPF_SOCKHASH(splice, struct splice_key, 65536);
BPF_SK_STORAGE(verdict, u8);   /* 0 undecided, 1 redirect, 2 stack */
BPF_ARRAY(ctr, u64, 4);        /* inserted, redirected, passed, dropped */
BPF_ARRAY(enabled, u32, 1);

static __always_inline void count(int i) { u64 *v = ctr.lookup(&i); if (v) __sync_fetch_and_add(v, 1); }

int splice_sockops(struct bpf_sock_ops *s) {
    if (s->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && s->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    int zero = 0;
    u32 *on = enabled.lookup(&zero);
    if (!on || !*on)
        return 1;
    u32 lport = s->local_port, rport = bpf_ntohl(s->remote_port);
    if (lport != PORT && rport != PORT)
        return 1;
    struct splice_key k = {};
    k.netns = bpf_get_netns_cookie(s);
    k.lip = s->local_ip4; k.rip = s->remote_ip4; k.lport = lport; k.rport = rport;
    int err = splice.sock_hash_update(s, &k, BPF_NOEXIST);  /* bcc: a map call only as a statement */
    if (err == 0)
        count(0);
    return 1;
}

int splice_msg(struct sk_msg_md *m) {
    struct bpf_sock *sk = m->sk;
    if (!sk)
        return SK_PASS;
    u8 *v = verdict.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!v || *v == 2) { count(2); return SK_PASS; }
    struct splice_key k = {};
    k.netns = bpf_get_netns_cookie(m);
    k.lip = m->remote_ip4; k.rip = m->local_ip4; k.lport = bpf_ntohl(m->remote_port); k.rport = m->local_port;
    int verdict_now = splice.msg_redirect_hash(m, &k, BPF_F_INGRESS);
    if (verdict_now == SK_PASS) { *v = 1; count(1); return SK_PASS; }
    if (*v == 1) { count(3); return SK_DROP; }   /* the peer left: never fall back to the stack */
    *v = 2; count(2); return SK_PASS;
}
"""

SLOW_READER = r"""
import socket, sys, threading, time
limit, port = int(sys.argv[1]) << 20, int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen()
c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
c.settimeout(0.5)
got = [0]
def reader():
    while True:
        d = s.recv(65536)
        if not d: return
        got[0] += len(d); time.sleep(0.01)
threading.Thread(target=reader, daemon=True).start()
buf, sent, error, t0 = b"x" * (128 << 10), 0, "", time.monotonic()
while time.monotonic() - t0 < 8 and sent - got[0] < limit:
    try:
        sent += c.send(buf)
    except socket.timeout:
        pass
    except OSError as e:
        error = str(e); break
print(sent, got[0], time.monotonic() - t0, error, sep="\t")
"""


def machine_busy_jiffies() -> int:
    """Jiffies the whole machine spent busy (all but idle and iowait) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


class Sandbox:
    """A netns with lo up and a cgroup of its own (`nodemesh.lab.system`); removed with whatever
    still runs in them."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.netns = f"nm-splice-{tag}"
        self.cgroup = system.cgroup2_root() / f"nodemesh-splice-{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="nm-splice-"))

    def __enter__(self) -> Sandbox:
        self.cgroup.mkdir()
        system.run("ip", "netns", "add", self.netns)
        system.ip_batch(["link set lo up"], netns=self.netns)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            system.remove_cgroup_tree(self.cgroup)
        finally:
            system.run("ip", "netns", "del", self.netns, check=False)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return system.spawn(argv, netns=self.netns, cgroup=self.cgroup)

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        return system.run_in(argv, netns=self.netns, cgroup=self.cgroup, timeout=timeout)


class Splice:
    """The two programs, attached to the sandbox's cgroup (sockops) and to the SOCKHASH (sk_msg)."""

    def __init__(self, cgroup: Path) -> None:
        from bcc import BPF, BPFAttachType  # type: ignore[import-untyped]
        from bcc.libbcc import lib  # type: ignore[import-untyped]

        self._bpf = BPF(text=BPF_TEXT, cflags=[f"-DPORT={PORT}"])
        self._attach_type = BPFAttachType.CGROUP_SOCK_OPS
        self._sockops = self._bpf.load_func("splice_sockops", BPF.SOCK_OPS)
        msg = self._bpf.load_func("splice_msg", BPF.SK_MSG)
        self._bpf.attach_func(
            msg, lib.bpf_table_fd(self._bpf.module, b"splice"), BPFAttachType.SK_MSG_VERDICT
        )
        self._cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        self._bpf.attach_func(self._sockops, self._cgroup_fd, self._attach_type, BPF_F_ALLOW_MULTI)

    def enable(self, on: bool) -> None:
        self._bpf["enabled"][ctypes.c_int(0)] = ctypes.c_uint32(int(on))

    def counters(self) -> dict[str, int]:
        values = [v.value for v in self._bpf["ctr"].values()]
        return dict(zip(("inserted", "redirected", "passed", "dropped"), values, strict=True))

    def close(self) -> None:
        try:
            self._bpf.detach_func(self._sockops, self._cgroup_fd, self._attach_type)
        finally:
            os.close(self._cgroup_fd)
            self._bpf.cleanup()


def bulk(box: Sandbox, seconds: float) -> dict[str, float]:
    report_file = box.tmp / "iperf3-server.json"
    report_file.unlink(missing_ok=True)
    server = box.spawn(
        ["iperf3", "-s", "-1", "-J", "--logfile", str(report_file), "-B", "127.0.0.1", "-p", str(PORT)]
    )
    try:
        time.sleep(0.5)
        busy0 = machine_busy_jiffies()
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(PORT), "-t", str(seconds), "-l", "128K"]
        client = box.run(argv, timeout=seconds + 30)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    busy1 = machine_busy_jiffies()
    report = json.loads(report_file.read_text())
    if client.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 failed: {report.get('error') or client.stderr.decode().strip()}")
    received = report["end"]["sum_received"]
    gb = received["bytes"] / 1e9
    hz = os.sysconf("SC_CLK_TCK")
    return {"gbit_s": received["bits_per_second"] / 1e9, "cpu_s_per_gb": (busy1 - busy0) / hz / gb}


def slow_reader(box: Sandbox, limit_mib: int) -> dict[str, Any]:
    done = box.run([sys.executable, "-c", SLOW_READER, str(limit_mib), str(PORT)], timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"slow reader failed: {done.stderr.decode().strip()[-500:]}")
    sent, got, seconds, error = done.stdout.decode().strip("\n").split("\t")
    return {
        "sent_mib": int(sent) / 2**20,
        "read_mib": int(got) / 2**20,
        "queued_mib": (int(sent) - int(got)) / 2**20,
        "seconds": float(seconds),
        "send_error": error,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--queue-limit", type=int, default=256, help="MiB queued at which the slow reader stops")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "sockmap-splice.json")
    args = ap.parse_args()
    results: dict[str, Any] = {
        "stack": {"bulk": [], "slow_reader": []},
        "splice": {"bulk": [], "slow_reader": []},
    }
    with Sandbox() as box:
        splice = Splice(box.cgroup)
        try:
            for i in range(args.rounds):
                for mode in ("stack", "splice") if i % 2 == 0 else ("splice", "stack"):
                    splice.enable(mode == "splice")
                    before = splice.counters()
                    b = bulk(box, args.seconds)
                    b["redirected_msgs"] = splice.counters()["redirected"] - before["redirected"]
                    results[mode]["bulk"].append(b)
                    print(
                        f"round {i + 1} {mode}: {b['gbit_s']:.1f} Gbit/s,"
                        f" {b['cpu_s_per_gb']:.3f} CPU-s per GB, {b['redirected_msgs']} messages redirected",
                        flush=True,
                    )
            for mode in ("stack", "splice"):
                splice.enable(mode == "splice")
                r = slow_reader(box, args.queue_limit)
                results[mode]["slow_reader"].append(r)
                print(
                    f"slow reader, {mode}: queued {r['queued_mib']:.1f} MiB after {r['seconds']:.1f} s"
                    f" (sent {r['sent_mib']:.0f}, read {r['read_mib']:.0f} MiB) {r['send_error']}",
                    flush=True,
                )
            results["counters"] = splice.counters()
        finally:
            splice.close()
    for mode in ("stack", "splice"):
        runs = results[mode]["bulk"]
        results[mode]["median"] = {
            k: statistics.median(r[k] for r in runs) for k in ("gbit_s", "cpu_s_per_gb")
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({m: results[m]["median"] for m in ("stack", "splice")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
