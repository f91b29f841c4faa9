"""tests/bench/proc_usage.py: what bench_l4 reports about the proxy processes during bulk runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from proc_usage import Sample, Watch, parse_switches, thread_switches, usage

STATUS = (
    "Name:\tpython\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t29\nnonvoluntary_ctxt_switches:\t752\n"
)


def test_parses_context_switches() -> None:
    assert parse_switches(STATUS) == (29, 752)
    assert parse_switches("Name:\tx\n") == (0, 0)


def test_switches_are_summed_over_the_threads(tmp_path: Path) -> None:
    for tid, (vol, invol) in {7: (10, 1), 8: (5, 2)}.items():
        (tmp_path / "7" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "7" / "task" / str(tid) / "status").write_text(
            f"voluntary_ctxt_switches:\t{vol}\nnonvoluntary_ctxt_switches:\t{invol}\n"
        )
    assert thread_switches(7, tmp_path) == (15, 3)
    assert thread_switches(8, tmp_path) == (0, 0)  # no such process: nothing


def test_usage_is_a_share_of_one_core_and_switches_per_second() -> None:
    u = usage(Sample(6.0, 4.0, 100, 10), Sample(8.4, 5.32, 216, 3010), seconds=4.0)
    assert u == {"core_share": 0.93, "user_share": 0.6, "system_share": 0.33, "voluntary_per_s": 29,
                 "involuntary_per_s": 750}  # fmt: skip
    # a thread that exited takes its count along: never a negative rate
    assert usage(Sample(0.0, 0.0, 500, 0), Sample(0.0, 0.0, 100, 0), 1.0)["voluntary_per_s"] == 0


def test_watch_tells_a_busy_process_from_a_sleeping_one() -> None:
    import os

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)  # past the interpreter's start-up
        watch = Watch({"me": os.getpid(), "sleeper": sleeper.pid, "gone": 2**22 + 1}, 0.05, 0.65).begin()
        deadline = time.monotonic() + 0.75
        while time.monotonic() < deadline:  # keep this process on the CPU through the window
            sum(range(1000))
        got = watch.result()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert set(got) == {"me", "sleeper"}  # the pid that does not exist is left out
    assert got["me"]["core_share"] > 0.3
    assert got["me"]["user_share"] > got["me"]["system_share"]  # summing integers: user space
    assert got["sleeper"]["core_share"] < 0.1
    assert got["sleeper"]["voluntary_per_s"] < 20  # asleep the whole window: it barely switched


def test_a_window_that_ends_before_it_starts_samples_nothing() -> None:
    assert Watch({"me": 1}, start=2.0, end=1.0).begin().result() == {}


def test_bench_l4_gives_the_proxies_cpu_per_gb_in_user_space_and_in_the_kernel() -> None:
    from bench_l4 import _proxies_cell, proxies_per_gb

    used = {
        "agent/node1": {"core_share": 0.9, "user_share": 0.6, "system_share": 0.3},
        "agent/node2": {"core_share": 0.7, "user_share": 0.5, "system_share": 0.2},
    }
    per_gb = proxies_per_gb(used, gbit_s=4.0)  # 0.5 GB/s
    assert per_gb == {"user": 2.2, "system": 1.0}
    assert _proxies_cell({"proxies_cpu_s_per_gb": per_gb}) == "2.20 / 1.00"
    assert proxies_per_gb({}, 4.0) is None  # no mesh: no proxy processes
    assert proxies_per_gb(used, 0.0) is None
    assert _proxies_cell({"gbit_s": 30.0}) == "-"
