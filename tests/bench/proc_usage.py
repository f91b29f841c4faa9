"""CPU and context switches of some processes over a window inside a load (bench_l4's bulk rows).

A process's CPU is its whole thread group's (psutil's `cpu_times`, which keeps what exited threads
used). Its context switches are summed over the threads alive at each sample
(/proc/<pid>/task/*/status; psutil's `num_ctx_switches` reads the first thread's only, wrong for
stunnel's thread per connection): a thread that exits inside the window takes its count with it, so
the window has to lie inside the load, while the threads that carry it exist at both ends.

Why: on a 2-core host the share of a core the busiest proxy process uses, and how often it sleeps
(voluntary switches) against how often it is preempted (involuntary ones), tell a single thread at
its limit from a path that waits.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

PROC = Path("/proc")


@dataclass(frozen=True)
class Sample:
    user: float  # CPU seconds of the thread group in user space
    system: float  # and in the kernel
    voluntary: int  # context switches summed over the live threads
    involuntary: int

    @property
    def cpu(self) -> float:
        return self.user + self.system


def parse_switches(status: str) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches from the text of a /proc/.../status."""
    voluntary = involuntary = 0
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "voluntary_ctxt_switches":
            voluntary = int(value)
        elif key == "nonvoluntary_ctxt_switches":
            involuntary = int(value)
    return voluntary, involuntary


def thread_switches(pid: int, proc: Path = PROC) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches summed over the process's live threads."""
    voluntary = involuntary = 0
    for status in (proc / str(pid) / "task").glob("*/status"):
        try:
            v, i = parse_switches(status.read_text())
        except OSError:  # the thread exited between the listing and the read
            continue
        voluntary += v
        involuntary += i
    return voluntary, involuntary


def sample(pid: int) -> Sample | None:
    """The process's counters now, or None when it is gone or unreadable."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return Sample(times.user, times.system, *thread_switches(pid))


def usage(before: Sample, after: Sample, seconds: float) -> dict[str, float]:
    """Share of one core (in all, in user space, in the kernel), and context switches per second,
    between two samples `seconds` apart."""
    return {
        "core_share": round((after.cpu - before.cpu) / seconds, 3),
        "user_share": round((after.user - before.user) / seconds, 3),
        "system_share": round((after.system - before.system) / seconds, 3),
        "voluntary_per_s": round(max(0, after.voluntary - before.voluntary) / seconds),
        "involuntary_per_s": round(max(0, after.involuntary - before.involuntary) / seconds),
    }


class Watch:
    """Samples `pids` `start` s after `begin()` and again `end` s after it, on a thread of its own."""

    def __init__(self, pids: dict[str, int], start: float, end: float) -> None:
        self.pids = pids
        self.start, self.end = start, end
        self._samples: list[tuple[float, dict[str, Sample | None]]] = []
        self._thread = threading.Thread(target=self._run, name="proc-usage", daemon=True)

    def begin(self) -> Watch:
        if self.pids and self.end > self.start:
            self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        for at in (self.start, self.end):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            self._samples.append((time.monotonic(), {n: sample(p) for n, p in self.pids.items()}))

    def result(self) -> dict[str, dict[str, float]]:
        """Per name, what `usage` gives; names whose process could not be read at both ends are left out."""
        if self._thread.ident is not None:  # started
            self._thread.join()
        if len(self._samples) != 2:
            return {}
        (t1, first), (t2, second) = self._samples
        out = {}
        for name in self.pids:
            a, b = first.get(name), second.get(name)
            if a is not None and b is not None:
                out[name] = usage(a, b, t2 - t1)
        return out
