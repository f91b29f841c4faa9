"""e2e harness rules: with NODEMESH_REQUIRE_E2E=1 (CI) a skipped e2e test fails the run.

A skip looks like a pass in a summary; CI runs as root on a machine that has everything, so an
e2e test that cannot run there is a broken test or a broken machine, and either must be red.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

REQUIRE_E2E = os.environ.get("NODEMESH_REQUIRE_E2E") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_E2E and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"NODEMESH_REQUIRE_E2E=1 and this e2e test skipped: {reason}"


# ---- the lab fixture --------------------------------------------------------------------------
# One lab per test module (module scope keeps modules independent); always torn down, and the
# teardown checks that nothing of the lab is left on the host.

import fcntl  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from nodemesh.lab.lab import BPFFS_NODEMESH, CGROUP_NAME, DEFAULT_STATE_DIR, PREFIX, Lab  # noqa: E402
from nodemesh.lab.system import cgroup2_root, list_netns  # noqa: E402
from nodemesh.lab.topology import load_topology  # noqa: E402


class LabHandle:
    """What an e2e test gets: the running lab and helpers to talk to its pods."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state_dir = lab.state_dir
        self.plan = lab.plan()
        state = lab.load_state() or {}
        self.proxy_workers = int(state.get("proxy_workers", 1))  # processes per agent

    def status(self) -> dict[str, Any]:
        return self.lab.status()

    def exec(self, pod: str, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
        return self.lab.exec(pod, list(argv), timeout=timeout)

    def curl_json(self, pod: str, url: str, *extra: str) -> dict[str, Any]:
        proc = self.exec(pod, "curl", "-sS", "--max-time", "5", *extra, url)
        assert proc.returncode == 0, f"curl from {pod} to {url}: rc={proc.returncode} {proc.stderr!r}"
        body: dict[str, Any] = json.loads(proc.stdout)
        return body

    def log(self, name: str) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def lab_leftovers() -> list[str]:
    """Everything of a lab still on the host (netns, cgroups, pins, processes): empty when clean."""
    left = [f"netns {ns}" for ns in list_netns() if ns.startswith(PREFIX)]
    cg = cgroup2_root() / CGROUP_NAME
    if cg.exists():
        left.append(f"cgroup {cg}")
    # pins of the lab's nodes (other e2e harnesses pin under their own unique `nmdp-` names)
    left += [f"bpffs {pin}" for pin in sorted(BPFFS_NODEMESH.glob("*")) if not pin.name.startswith("nmdp-")]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    # the lab's processes name its state dir in their arguments (controller, agents) or are echo servers
    left += [
        f"process {ln.strip()}"
        for ln in ps.splitlines()
        if ("nodemesh.cli" in ln and str(DEFAULT_STATE_DIR) in ln) or "nodemesh.lab.echo" in ln
    ]
    if DEFAULT_STATE_DIR.exists():
        left.append(f"state {DEFAULT_STATE_DIR}")
    return left


LAB_LOCK = Path("/run/lock/nodemesh-lab.lock")


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Generator[LabHandle, None, None]:
    """The default lab, up for one test module. There is one lab per host (fixed names), so the
    fixture holds an exclusive lock for the module: concurrent test runs wait instead of
    tearing down each other's lab. A module's `LAB_PROXY_WORKERS` sets the agents' processes;
    NODEMESH_TEST_PROXY_WORKERS sets them for every module (a whole run against proxy workers)."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (netns, cgroups, eBPF)")
    LAB_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LAB_LOCK, "w")  # noqa: SIM115 - held for the module
    fcntl.flock(lock, fcntl.LOCK_EX)
    the_lab = Lab(DEFAULT_STATE_DIR)
    try:
        workers = int(
            os.environ.get("NODEMESH_TEST_PROXY_WORKERS") or getattr(request.module, "LAB_PROXY_WORKERS", 1)
        )
        the_lab.up(load_topology(), proxy_workers=workers)
        yield LabHandle(the_lab)
    finally:
        logs = the_lab.state_dir / "logs"
        if logs.is_dir() and os.environ.get("NODEMESH_KEEP_LAB_LOGS"):
            import shutil

            shutil.copytree(
                logs,
                Path(os.environ["NODEMESH_KEEP_LAB_LOGS"]) / f"lab-{time.time():.0f}",
                dirs_exist_ok=True,
            )
        try:
            the_lab.down(quiet=True)
            left = lab_leftovers()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
        assert left == [], f"lab down left these behind: {left}"


@pytest.fixture
def policies(lab: LabHandle, tmp_path: Path) -> Generator[Any, None, None]:
    """`meshlab.Policies` on the module's lab: every policy a test applied is removed after it."""
    from meshlab import Policies  # meshlab imports this module

    p = Policies(lab, tmp_path)
    try:
        yield p
    finally:
        p.remove_all()


def nodemesh_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the real `nodemesh` CLI (the installed entry point's module) as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "nodemesh.cli", *args], capture_output=True, text=True, timeout=timeout
    )
