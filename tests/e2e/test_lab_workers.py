"""Proxy workers in the lab (`agent run --proxy-workers 2`): real eBPF, real mTLS, real processes.

Each agent runs one worker beside its main process. New connections are spread over both by the
kernel (SO_REUSEPORT, sk_lookup's assignment to 15006 included); every connection is still
authorized, re-checked on policy changes and seen by the apps with the caller's IP; a killed worker
is restarted, and a killed main process takes its worker with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
from conftest import LabHandle
from labtools import cli_json, flows_json, metric_sum, parse_metrics, run_example, scrape_15020, series
from meshlab import Policies, flows, flows_from, request_ok, wait_for
from test_lab_authz import KEEPALIVE, from_source

from nodemesh.lab.lab import _listeners

LAB_PROXY_WORKERS = 2
MAX_TRIES = 30  # connections opened until both processes have carried some (P(one-sided) = 2^-29)


def agent_pid(lab: LabHandle, node: str) -> int:
    state = lab.lab.load_state()
    assert state is not None
    return int(state["processes"][f"agent/{node}"])


def worker_pids(lab: LabHandle, node: str) -> list[int]:
    return list(lab.lab.proxy_workers(node).values())


def gone(pid: int) -> bool:
    """The process exited (a zombie not reaped yet counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_of(conn_ids: list[str]) -> set[str]:
    """Which processes the connection ids name: `c…` main, `w1c…` / `w1r<restarts>c…` worker 1."""
    return {"worker-1" if re.match(r"w1(r\d+)?c", c) else "main" for c in conn_ids}


def spread_requests(lab: LabHandle, pod: str, node: str, dst: str) -> list[dict[str, str]]:
    """Requests from `pod` (one connection each) until `node` logged connections of both
    processes; returns their open records. Every answer must name the caller's IP."""
    src = lab.plan.pod(pod).ip
    before = len(flows_from(lab, node, src, event="open"))
    for n in range(1, MAX_TRIES + 1):
        body = request_ok(lab, pod, f"http://{dst}:8000/spread/{n}")
        assert body["peer"].split(":")[0] == src, body
        recs = wait_for(lambda n=n: len(r := flows_from(lab, node, src, event="open")[before:]) >= n and r,
                        5, f"{n} open records on {node}")
        if processes_of([r["conn"] for r in recs]) == {"main", "worker-1"}:
            return recs
    raise AssertionError(f"{MAX_TRIES} connections from {pod} all landed on one process of {node}")


def test_every_agent_runs_its_worker(lab: LabHandle) -> None:
    for node in ("node1", "node2"):
        pids = wait_for(lambda node=node: worker_pids(lab, node), 10, f"the worker of {node}")
        assert len(pids) == 1
        assert "event=proxy_worker_started worker=1" in lab.log(f"agent-{node}")
        # the worker serves every pod the main process enrolled, with the same source-IP set-up
        enrolled = [p for p in lab.plan.pods if p.node == node and p.enrolled]

        def worker_lines(node: str = node) -> list[str]:
            log = lab.log(f"agent-{node}").splitlines()
            return [ln for ln in log if " worker=1 " in ln and "event=pod_enrolled" in ln]

        # the lab waited for the listeners; the log line may still be in the writer's buffer
        want = len(enrolled)
        lines = wait_for(lambda want=want: len(worker_lines()) >= want and worker_lines(), 5, "worker lines")
        assert len(lines) == len(enrolled) and all("source_ip=preserved" in ln for ln in lines), lines


def test_outbound_and_hbone_connections_are_spread(lab: LabHandle) -> None:
    v2 = lab.plan.pod("httpbin-v2")
    recs = spread_requests(lab, "client", "node1", v2.ip)  # 15001 in the client pod
    assert all(r["verdict"] == "allowed" for r in recs)
    # both of node1's processes reach node2 over mTLS: node2 logged the client's identity for each
    for r in recs:
        assert r.get("src_identity", "").endswith("/sa/client"), r


def test_inbound_plaintext_through_sk_lookup_is_spread(lab: LabHandle) -> None:
    """outsider (not enrolled) → httpbin-v2 on the same node: sk_lookup assigns 15006, and the
    kernel's reuseport selection picks the process; the app still sees the outsider's IP."""
    recs = spread_requests(lab, "outsider", "node2", lab.plan.pod("httpbin-v2").ip)
    assert all(r["verdict"] == "allowed" for r in recs)


class Held:
    """Long-lived keep-alive connections from `outsider` to httpbin-v2 (both on node2; plaintext
    through sk_lookup to 15006), opened until each of node2's processes holds `each` of them."""

    def __init__(self, lab: LabHandle, tmp_path: Path, each: int) -> None:
        self.lab, self.tmp, self.each = lab, tmp_path, each
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def lines(self, log: Path, kind: str) -> list[list[str]]:
        return [ln.split() for ln in log.read_text().splitlines() if ln.startswith(kind + " ")]

    def open(self) -> list[str]:
        """Returns the connection ids node2 logged for them."""
        v2, outsider = self.lab.plan.pod("httpbin-v2"), self.lab.plan.pod("outsider")
        before = len(flows_from(self.lab, "node2", outsider.ip, event="open"))
        for n in range(MAX_TRIES):
            log = self.tmp / f"keepalive-{n}.log"
            argv = ["python3", "-c", KEEPALIVE, v2.ip, "8000", "60"]
            self.procs.append(self.lab.lab.popen("outsider", argv, log=log))
            self.logs.append(log)
            wait_for(lambda log=log: self.lines(log, "ok"), 10, "an answer on the new connection")
            held = wait_for(lambda n=n: len(h := [r["conn"] for r in flows_from(
                self.lab, "node2", outsider.ip, event="open")[before:]]) > n and h, 5, "its open record")
            if all(sum(processes_of([c]) == {p} for c in held) >= self.each for p in ("main", "worker-1")):
                return held
        raise AssertionError(f"{MAX_TRIES} connections did not reach both processes of node2")

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)


def test_the_main_admin_api_answers_for_every_process(lab: LabHandle, tmp_path: Path) -> None:
    """status, conns, flows and :15020 on the main process's socket include the worker's part."""
    for node in ("node1", "node2"):
        [pid] = wait_for(lambda node=node: worker_pids(lab, node), 10, f"the worker of {node}")
        workers = wait_for(lambda node=node: (w := cli_json(node, "status")["workers"]) and w[0]["up"] and w,
                           10, f"{node}'s worker up in status")
        assert [(w["index"], w["pid"], w["restarts"]) for w in workers] == [(1, pid, 0)]

    # flows: the main ring has the worker's records too (fed from its admin socket)
    v2 = lab.plan.pod("httpbin-v2")
    samples = parse_metrics(scrape_15020(lab.plan.node("node1").netns_path))
    opened_before = metric_sum(samples, "istio_tcp_connections_opened_total", reporter="source",
                               destination_workload="httpbin-v2")
    recs = spread_requests(lab, "client", "node1", v2.ip)
    ids = {r["conn"] for r in recs}
    def stored_ids() -> set[str]:
        return {f["connection_id"] for f in flows_json("node1", "--all")}

    stored = wait_for(lambda: ids <= (got := stored_ids()) and got, 5, "the connections in `nodemesh flows`")
    assert processes_of(sorted(ids & stored)) == {"main", "worker-1"}

    # metrics: one exposition, traffic summed over both processes, per-process values labelled
    def opened() -> float:
        samples = parse_metrics(scrape_15020(lab.plan.node("node1").netns_path))
        return metric_sum(samples, "istio_tcp_connections_opened_total", reporter="source",
                          destination_workload="httpbin-v2")

    wait_for(lambda: opened() - opened_before == len(recs), 5, f"{len(recs)} more connections opened")
    text = scrape_15020(lab.plan.node("node1").netns_path)
    assert text.count("# TYPE istio_tcp_connections_opened_total ") == 1
    rss = series(parse_metrics(text), "nodemesh_agent_resident_memory_bytes")
    assert sorted(s.get("worker", "main") for s in rss) == ["1", "main"]

    # conns: open connections of both processes, each saying which one holds it
    held = Held(lab, tmp_path, each=1)
    try:
        ids = set(held.open())
        rows = cli_json("node2", "conns")
        listed = {r["id"]: r["worker"] for r in (rows["connections"] if isinstance(rows, dict) else rows)}
        assert ids <= set(listed), (ids, listed)
        assert {listed[i] for i in ids} == {0, 1}
        assert all((listed[i] == 1) == (processes_of([i]) == {"worker-1"}) for i in ids)
    finally:
        held.close()


def test_the_proxy_workers_example_shows_who_carried_each_connection(lab: LabHandle) -> None:
    proc = run_example("proxy-workers.sh")
    line = r"^ *(\S+)  [\d.]+:\d+ -> [\d.]+:8000  carried by (main process|worker 1)$"
    carried = re.findall(line, proc.stdout, re.M)
    assert len(carried) == 12, proc.stdout
    assert all(processes_of([conn]) == {"worker-1" if who == "worker 1" else "main"} for conn, who in carried)
    assert re.search(r"^processes that carried them: [12]$", proc.stdout, re.M), proc.stdout
    assert re.search(r"proxy workers: 1 of 1 up \(pids \d+\)", proc.stdout), proc.stdout


def test_a_policy_change_closes_denied_connections_in_every_process(
    lab: LabHandle, policies: Policies, tmp_path: Path
) -> None:
    outsider = lab.plan.pod("outsider")
    held = Held(lab, tmp_path, each=2)
    try:
        held.open()
        t0 = time.time()
        deny = from_source("DENY", ipBlocks=[f"{outsider.ip}/32"])
        name = policies.apply("AuthorizationPolicy", "deny-outsider-live", deny)
        for log in held.logs:
            closed = wait_for(lambda log=log: held.lines(log, "closed"), 5, f"{log.name} to be closed")[0]
            assert float(closed[2]) - t0 < 5, closed
        # each process re-decided its own connections with the new policy and said so
        want = len(held.logs)
        denied = wait_for(lambda: len(d := flows(lab, "node2", event="deny", policy=name)) >= want and d,
                          5, "a deny record per connection")
        assert processes_of([r["conn"] for r in denied]) == {"main", "worker-1"}, denied
    finally:
        held.close()


def test_a_killed_worker_is_restarted(lab: LabHandle) -> None:
    [old] = wait_for(lambda: worker_pids(lab, "node1"), 10, "node1's worker")
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: [p for p in worker_pids(lab, "node1") if p != old], 10, "a new worker")
    assert len(new) == 1
    assert "event=proxy_worker_exited worker=1" in lab.log("agent-node1")
    assert "how='signal 9'" in lab.log("agent-node1")
    # the new worker serves again: connections reach both processes
    state = lab.lab.load_state()
    assert state is not None
    pause = state["processes"]["pod/default/client/pause"]
    wait_for(lambda: _listeners(pause, 15001) >= 2, 15, "the new worker's listeners in the client pod")
    recs = spread_requests(lab, "client", "node1", lab.plan.pod("httpbin-v2").ip)
    # the restarted worker's connection ids differ from its predecessor's
    assert any(r["conn"].startswith("w1r1c") for r in recs), recs


def test_sigterm_stops_the_worker_before_the_main_process(lab: LabHandle) -> None:
    """A restart as an operator does it: SIGTERM to the agent stops its worker cleanly, then itself;
    the next start brings both back and serves again."""
    [worker] = wait_for(lambda: worker_pids(lab, "node1"), 10, "node1's worker")
    main = agent_pid(lab, "node1")
    lab.lab.stop_agent("node1")  # SIGTERM, waits for the main process to exit
    assert gone(worker)
    lines = lab.log("agent-node1").splitlines()
    stopped = [i for i, ln in enumerate(lines) if "event=agent_stopped" in ln]
    by_worker = [i for i in stopped if " worker=1 " in lines[i]]
    by_main = [i for i in stopped if " worker=" not in lines[i]]
    assert by_worker and by_main, [lines[i] for i in stopped]  # both ended cleanly ...
    last_worker_line = max(i for i, ln in enumerate(lines) if " worker=1 " in ln)
    assert by_main[-1] > last_worker_line  # ... the worker first
    assert not any("event=proxy_worker_kill" in ln for ln in lines)  # it needed no SIGKILL
    assert gone(main)
    lab.lab.start_agent("node1")  # waits for both processes' listeners in node1's pods
    assert len(wait_for(lambda: worker_pids(lab, "node1"), 10, "the new worker")) == 1
    spread_requests(lab, "client", "node1", lab.plan.pod("httpbin-v2").ip)


def test_a_killed_main_process_takes_its_worker_along(lab: LabHandle) -> None:
    [worker] = wait_for(lambda: worker_pids(lab, "node2"), 10, "node2's worker")
    os.kill(agent_pid(lab, "node2"), signal.SIGKILL)
    wait_for(lambda: gone(worker), 10, "the worker to exit after its main process died")
    lab.lab.start_agent("node2")  # waits for both processes' listeners in every pod of node2
    assert len(wait_for(lambda: worker_pids(lab, "node2"), 10, "the new worker")) == 1
    spread_requests(lab, "outsider", "node2", lab.plan.pod("httpbin-v2").ip)
