"""Proxy workers: extra agent processes that carry traffic on more cores.

The main agent process (worker 0) owns the datapath (programs, maps, links, the pods' source-IP
set-up), the enrolled-pod record, the metrics port and the admin socket. With `--proxy-workers N`
it starts N-1 worker processes (`nodemesh agent run ... --worker-index I`). A worker is a proxy
only: it reads the pinned maps, follows the controller's config, has its own certificates, and
opens its own 15001/15006/15008 listeners in every pod netns the main process has enrolled, with
SO_REUSEPORT, so the kernel spreads new connections over the processes' listeners (sk_lookup's
assignment to 15006 included). Each worker serves its own admin socket
(`worker-<I>.sock` next to `admin.sock`), which the main process reads to merge connections,
flows and metrics into its own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def worker_socket_path(main_socket: Path, index: int) -> Path:
    """Admin socket of proxy worker `index` (>= 1): `worker-<index>.sock` next to the main
    process's admin socket (`/run/nodemesh/<node>/admin.sock` by default)."""
    if index < 1:
        raise ValueError(f"worker index {index} must be >= 1 (0 is the main process)")
    return main_socket.with_name(f"worker-{index}.sock")


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the main process knows of one proxy worker."""

    index: int  # 1..N-1 (0 is the main process)
    pid: int | None  # None while not running
    admin_socket: Path
    up: bool  # running and its admin socket exists
    restarts: int = 0
    started_at: float | None = None  # Unix time of the current process's start
    last_exit: str = ""  # how the previous process ended ("exit 1", "signal 9"), "" if none


PR_SET_PDEATHSIG = 1
PARENT_ENV = "NODEMESH_WORKER_PARENT"  # the main process's pid, set in each worker's environment
RESTARTS_ENV = "NODEMESH_WORKER_RESTARTS"  # how often this worker was restarted before (ids stay unique)


def worker_id_prefix(index: int) -> str:
    """Connection-id prefix of proxy worker `index`: `w1`, and `w1r3` after its third restart, so a
    node's ids never repeat across its processes (the main process's flow ring holds them all)."""
    restarts = int(os.environ.get(RESTARTS_ENV) or 0)
    return f"w{index}r{restarts}" if restarts else f"w{index}"


def die_with_parent() -> bool:
    """In a worker: get SIGKILL when the main process dies (prctl PR_SET_PDEATHSIG). False when
    the main process is already gone (this process was re-parented before the call).

    SIGKILL, not SIGTERM: SIGTERM is acted on by the worker's event loop, and one that is stuck
    would never act on it, keeping its SO_REUSEPORT listeners (and a share of the pods' new
    connections) past the next agent's start. Nothing waits for a worker's graceful exit on this
    path: a main process that stops gracefully stops its workers itself (`WorkerSupervisor.close`:
    SIGTERM, then SIGKILL). What a killed main process's workers lose is what the main process
    lost: up to 50 ms of buffered log lines (api/logsink.py) and the close records of the
    connections they still held, which are reset either way."""
    expected = os.environ.get(PARENT_ENV)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return expected is None or os.getppid() == int(expected)


def describe_exit(returncode: int) -> str:
    return f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"


class _Child:
    """A worker process, started by `subprocess` (vfork, then exec) rather than the event loop's
    fork: fork runs gRPC's pthread_atfork handlers, which abort the child while the main process's
    gRPC threads are busy ("Check failed: next_worker->state == KICKED", seen on restarts); vfork
    runs none. Its exit is awaited through a pidfd on the loop; started on the loop's thread, which
    PR_SET_PDEATHSIG in the worker refers to."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self._popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, env=env, close_fds=True)
        self.pid = self._popen.pid
        self._pidfd = os.pidfd_open(self.pid)  # works until the process is reaped (by `_exited`)
        self._exit: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            loop.add_reader(self._pidfd, self._exited, loop)
        return await asyncio.shield(self._exit)

    def _exited(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        code = self._popen.wait()  # the pidfd is readable: the process has exited, this reaps it
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    def send(self, sig: int) -> None:
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


@dataclass(slots=True)
class _Worker:
    index: int
    socket: Path
    proc: _Child | None = None
    restarts: int = 0
    started_at: float | None = None
    last_exit: str = ""


class WorkerSupervisor:
    """Starts proxy workers 1..count-1, restarts any that exits (capped backoff; the delay starts
    over once a worker has run for `stable_after` seconds) and stops them on `close()`.

    Workers inherit stdout/stderr (their log lines say `worker=<index>`) and the main process's
    cgroup and netns. Each sets PR_SET_PDEATHSIG (SIGKILL), so none outlives a main process that is
    killed, even one whose event loop is stuck.
    """

    def __init__(
        self,
        main_socket: Path,
        count: int,
        argv: Callable[[int], Sequence[str]],
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if count < 1:
            raise ValueError(f"proxy workers {count}: at least 1 (the main process)")
        self._argv = argv
        self._workers = [_Worker(i, worker_socket_path(main_socket, i)) for i in range(1, count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._backoff = (backoff_initial, backoff_max)
        self._stable_after = stable_after
        self._stop_timeout = stop_timeout

    def workers(self) -> list[WorkerInfo]:
        """The workers' state now (the main process is not listed)."""
        out = []
        for w in self._workers:
            running = w.proc is not None and w.proc.returncode is None
            out.append(WorkerInfo(
                index=w.index, pid=w.proc.pid if running and w.proc is not None else None,
                admin_socket=w.socket, up=running and w.socket.exists(), restarts=w.restarts,
                started_at=w.started_at if running else None, last_exit=w.last_exit,
            ))  # fmt: skip
        return out

    async def start(self) -> None:
        for w in self._workers:
            self._tasks.append(asyncio.create_task(self._keep(w), name=f"proxy-worker-{w.index}"))

    async def _keep(self, w: _Worker) -> None:
        initial, cap = self._backoff
        delay = initial
        while not self._stopping:
            began = time.monotonic()
            env = {**os.environ, PARENT_ENV: str(os.getpid()), RESTARTS_ENV: str(w.restarts)}
            try:
                w.proc = _Child(self._argv(w.index), env)
            except OSError as exc:
                w.last_exit = f"spawn failed: {exc}"
                log.error("event=proxy_worker_spawn_failed worker=%d error=%r action=retry_in_%.0fs",
                          w.index, str(exc), delay)
            else:
                w.started_at = time.time()
                log.info("event=proxy_worker_started worker=%d pid=%d", w.index, w.proc.pid)
                code = await w.proc.wait()
                if self._stopping:
                    return
                w.last_exit = describe_exit(code)
                if time.monotonic() - began >= self._stable_after:
                    delay = initial
                log.error("event=proxy_worker_exited worker=%d pid=%d how=%r action=restart_in_%.0fs",
                          w.index, w.proc.pid, w.last_exit, delay)
            w.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    async def close(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after `stop_timeout`, wait for all."""
        self._stopping = True
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            p.send(signal.SIGTERM)
        if procs:
            _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                         timeout=self._stop_timeout)
            for p in procs:
                if p.returncode is None:
                    log.error("event=proxy_worker_kill pid=%d reason=no_exit_after_sigterm", p.pid)
                    p.send(signal.SIGKILL)
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
