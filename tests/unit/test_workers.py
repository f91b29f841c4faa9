"""Proxy workers: the supervisor (real child processes), the worker command line, connection ids."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.main import AgentOptions, worker_argv
from agent.proxy import conns
from agent.workers import (
    PARENT_ENV,
    RESTARTS_ENV,
    WorkerSupervisor,
    describe_exit,
    worker_id_prefix,
    worker_socket_path,
)

# Writes its pid, the parent pid and the restart count it was given, then sleeps; SIGTERM ends it.
REPORTER = (
    "import os, sys, time; "
    "open(sys.argv[1], 'a').write(f\"{os.getpid()} {os.environ.get('" + PARENT_ENV + "')} "
    "{os.environ.get('" + RESTARTS_ENV + "')}\\n\"); "
    "time.sleep(60)"
)
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def _wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_socket_paths_sit_next_to_the_main_socket(tmp_path: Path) -> None:
    main = tmp_path / "node1" / "admin.sock"
    assert worker_socket_path(main, 2) == tmp_path / "node1" / "worker-2.sock"
    with pytest.raises(ValueError):
        worker_socket_path(main, 0)


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exit 1"
    assert describe_exit(-signal.SIGKILL) == "signal 9"


def test_supervisor_starts_restarts_and_stops_workers(tmp_path: Path) -> None:
    log = tmp_path / "started"

    async def scenario() -> None:
        sup = WorkerSupervisor(tmp_path / "admin.sock", 3,
                               lambda i: [sys.executable, "-c", REPORTER, str(log)],
                               backoff_initial=0.05, backoff_max=0.2)
        assert [w.index for w in sup.workers()] == [1, 2]
        assert not any(w.up for w in sup.workers())
        await sup.start()
        await _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
        first = {w.index: w.pid for w in sup.workers()}
        assert all(first.values())
        # every worker is told its parent (the main process) to check against after PR_SET_PDEATHSIG
        assert {line.split()[1] for line in log.read_text().splitlines()} == {str(os.getpid())}
        assert {line.split()[2] for line in log.read_text().splitlines()} == {"0"}
        # "up" needs the worker's admin socket too
        (tmp_path / "worker-1.sock").touch()
        assert [w.up for w in sup.workers()] == [True, False]

        pid1 = first[1]
        assert pid1 is not None
        os.kill(pid1, signal.SIGKILL)
        await _wait_for(lambda: sup.workers()[0].pid not in (None, pid1))
        w1 = sup.workers()[0]
        assert w1.restarts == 1 and w1.last_exit == "signal 9"
        # the restarted process is told so (its connection ids differ from its predecessor's)
        await _wait_for(lambda: len(log.read_text().splitlines()) == 3)
        assert log.read_text().splitlines()[2].split()[2] == "1"
        assert sup.workers()[1].pid == first[2] and sup.workers()[1].restarts == 0
        pids = [w.pid for w in sup.workers()]

        await sup.close()
        assert all(w.pid is None and not w.up for w in sup.workers())
        assert not any(_alive(p) for p in pids if p is not None)

    asyncio.run(scenario())


def test_supervisor_backs_off_a_worker_that_keeps_failing(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = WorkerSupervisor(tmp_path / "admin.sock", 2,
                               lambda i: [sys.executable, "-c", "raise SystemExit(3)"],
                               backoff_initial=0.1, backoff_max=0.4)
        await sup.start()
        await asyncio.sleep(1.5)
        w = sup.workers()[0]
        await sup.close()
        # delays 0.1, 0.2, 0.4, 0.4, ... plus each start (~0.05-0.1 s): far fewer than an
        # unthrottled loop, yet it kept trying
        assert 2 <= w.restarts <= 7, w.restarts
        assert w.last_exit == "exit 3"

    asyncio.run(scenario())


def test_supervisor_reports_a_command_that_cannot_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        sup = WorkerSupervisor(tmp_path / "admin.sock", 2, lambda i: [str(tmp_path / "no-such-binary")],
                               backoff_initial=0.05, backoff_max=0.05)
        await sup.start()
        await _wait_for(lambda: sup.workers()[0].restarts >= 2)
        await sup.close()
        assert sup.workers()[0].last_exit.startswith("spawn failed:")

    asyncio.run(scenario())


def test_supervisor_kills_a_worker_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = STUBBORN.replace("time.sleep(60)", f"open({str(ready)!r}, 'w').close(); time.sleep(60)")

    async def scenario() -> None:
        sup = WorkerSupervisor(tmp_path / "admin.sock", 2, lambda i: [sys.executable, "-c", code],
                               stop_timeout=0.3)
        await sup.start()
        await _wait_for(ready.exists)
        pid = sup.workers()[0].pid
        assert pid is not None
        began = time.monotonic()
        await sup.close()
        assert time.monotonic() - began < 3
        assert not _alive(pid)

    asyncio.run(scenario())


def test_one_process_means_no_workers(tmp_path: Path) -> None:
    assert WorkerSupervisor(tmp_path / "admin.sock", 1, lambda i: ["true"]).workers() == []
    with pytest.raises(ValueError):
        WorkerSupervisor(tmp_path / "admin.sock", 0, lambda i: ["true"])


def test_worker_command_line_is_accepted_by_agent_run(tmp_path: Path, seen: list[AgentOptions]) -> None:
    """The argv the main process builds parses into the same options plus the worker index."""
    from nodemesh.cli import app

    (tmp_path / "cg").mkdir()
    opts = AgentOptions("node1", "10.0.0.1:15012", tmp_path / "tok", tmp_path / "ca.pem", tmp_path / "cg",
                        tmp_path / "state", server_name="ctl.example", resync_interval=2.5,
                        trust_domain="example.org", admin_socket=tmp_path / "a.sock", flow_ring_size=77,
                        proxy_workers=3, event_loop="asyncio", log_level="debug", max_connections=600,
                        max_connections_per_source=150, max_hbone_queued=64 * 1024 * 1024)
    argv = worker_argv(opts, 2)
    assert argv[:3] == [sys.executable, "-m", "nodemesh.cli"]
    assert argv[3:5] == ["agent", "run"]
    result = CliRunner().invoke(app, argv[3:])
    assert result.exit_code == 0, result.output
    got = seen[0]
    assert got.worker_index == 2 and got.proxy_workers == 1
    for field in ("node", "controller", "token_file", "ca_file", "pod_cgroup", "state_root",
                  "server_name", "resync_interval", "trust_domain", "admin_socket", "flow_ring_size",
                  "event_loop", "log_level", "max_connections", "max_connections_per_source",
                  "max_hbone_queued"):
        assert getattr(got, field) == getattr(opts, field), field


def test_workers_get_the_default_share_when_none_is_set(tmp_path: Path) -> None:
    """Without --max-connections-per-source a worker derives it from its --max-connections, as the
    main process does."""
    opts = AgentOptions("n", "c:1", tmp_path / "t", tmp_path / "ca", tmp_path, max_connections=600)
    argv = worker_argv(opts, 1)
    assert argv[argv.index("--max-connections") + 1] == "600"
    assert "--max-connections-per-source" not in argv


def test_worker_id_prefixes_differ_per_worker_and_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESTARTS_ENV, raising=False)
    assert worker_id_prefix(1) == "w1"
    monkeypatch.setenv(RESTARTS_ENV, "3")
    assert worker_id_prefix(2) == "w2r3"


def test_connection_ids_carry_the_worker_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conns, "_id_prefix", conns._id_prefix)
    main_id = conns.new_connection_id()
    assert main_id.startswith("c") and int(main_id[1:], 16) > 0
    conns.set_id_prefix("w3")
    ids = {conns.new_connection_id() for _ in range(5)}
    assert len(ids) == 5 and all(i.startswith("w3c") for i in ids)


# Run in a child interpreter: the at-fork handler it registers would abort every later fork() there.
ATFORK = r"""
import asyncio, ctypes, os, sys
from pathlib import Path
import uvloop
from agent.workers import WorkerSupervisor

libc = ctypes.CDLL(None)
# what gRPC's fork support does to a child forked while its threads are busy: abort
assert libc.__register_atfork(None, None, ctypes.cast(libc.abort, ctypes.c_void_p), None) == 0
pid = os.fork()
if pid == 0:
    os._exit(0)
status = os.waitpid(pid, 0)[1]
print("fork:", os.WTERMSIG(status) if os.WIFSIGNALED(status) else "no signal")

async def main():
    sup = WorkerSupervisor(Path(sys.argv[1]) / "admin.sock", 2,
                           lambda i: [sys.executable, "-c", "raise SystemExit(5)"], backoff_initial=30)
    await sup.start()
    while sup.workers()[0].restarts == 0:
        await asyncio.sleep(0.02)
    print("worker:", sup.workers()[0].last_exit)
    await sup.close()

uvloop.run(main())
"""


def test_workers_start_without_running_at_fork_handlers(tmp_path: Path) -> None:
    """gRPC's pthread_atfork child handler aborted restarted workers (the main process's gRPC threads
    were busy); uvloop's spawn forks and runs it, the supervisor's vfork does not."""
    proc = subprocess.run([sys.executable, "-c", ATFORK, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"fork: {signal.SIGABRT}", lines  # the handler is in place: a forked child aborts
    assert lines[1] == "worker: exit 5", lines  # the worker ran its own code to the end


# A worker as agent/main.py runs one (die_with_parent, SIGTERM handled on its loop), whose loop hangs.
HUNG_WORKER = """
import asyncio, os, signal, sys, time
from agent.workers import die_with_parent
async def main():
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.Event().set)
    assert die_with_parent()
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(60)  # the loop is stuck (a blocking call, a deadlock): it never acts on SIGTERM
asyncio.run(main())
"""

# A main process that starts one such worker, then waits to be killed.
KILLED_MAIN = """
import asyncio, sys
from pathlib import Path
from agent.workers import WorkerSupervisor
async def main():
    sup = WorkerSupervisor(Path(sys.argv[1]) / "admin.sock", 2,
                           lambda i: [sys.executable, "-c", sys.argv[2], sys.argv[3]])
    await sup.start()
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_a_worker_with_a_stuck_loop_dies_with_a_killed_main_process(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG is SIGKILL: a SIGTERM would wait for the worker's loop, and a stuck one would
    keep its SO_REUSEPORT listeners (a share of the pods' new connections) after the next agent starts."""
    pid_file = tmp_path / "worker.pid"
    root = Path(__file__).resolve().parents[2]
    main = subprocess.Popen([sys.executable, "-c", KILLED_MAIN, str(tmp_path), HUNG_WORKER, str(pid_file)],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    worker_pid = None
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker did not start"
            assert main.poll() is None, "the main process exited"
            time.sleep(0.05)
        worker_pid = int(pid_file.read_text())
        main.kill()  # OOM killer, kubectl delete --force, a crash: no close(), no SIGTERM to the workers
        main.wait()
        deadline = time.monotonic() + 3
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "the worker outlived the killed main process"
            time.sleep(0.02)
    finally:
        main.kill()
        main.wait()
        if worker_pid is not None and _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
